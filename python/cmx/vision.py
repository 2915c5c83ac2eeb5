"""Image encoding through llama.cpp's mtmd (libmtmd from llama-cpp-python, via its ctypes API).

mtmd does what llama.cpp does for an mmproj file: it splits a prompt holding media markers into
text and image chunks, preprocesses each image (resize/pad to the encoder's size, normalise with
the file's mean/std) and runs the vision encoder + projector. We take the image embeddings and
feed them into our own decoder graph at the positions mtmd assigns.

Known upstream behaviour (llama.cpp issue #25814): for CLIP towers with a class token, the
llava graph of this llama.cpp puts the class token after the patches, so its embeddings differ
from Hugging Face's LLaVA for the same weights. cmx reproduces llama.cpp; the demo model is
trained on what mtmd computes (docs/decisions.md).
"""

from __future__ import annotations

import ctypes
import math
import os
import struct
from dataclasses import dataclass, field

import numpy as np
from gguf import GGUFValueType

from .images import RGBImage


class VisionModelError(ValueError):
    """The mmproj file is missing, not an mmproj, or does not fit the text model."""


@dataclass
class TextChunk:
    tokens: list[int]


@dataclass
class ImageChunk:
    """One image chunk of a prompt. mtmd gives an image as one chunk (LLaVA-1.5, Qwen2-VL), or as
    several: the slices and the overview of LLaVA-1.6 (adjacent), SmolVLM's tiles and global image
    (with text tokens between them). `index`: which image of the prompt it belongs to; `offset`:
    its first row among that image's embedding rows (all chunks of the image, in prompt order).
    `nx`, `ny`: its token grid (columns, rows; tokens run row by row); `n_pos`: how far it moves
    the text position on (n_tokens, or max(nx, ny) for M-RoPE models)."""

    image: RGBImage
    n_tokens: int
    _chunk: object = field(repr=False, default=None)  # mtmd_input_chunk_p, valid while its Prompt lives
    index: int = 0
    offset: int = 0
    nx: int = 0
    ny: int = 0
    n_pos: int = 0


def mrope_positions(segments, start: int = 0) -> tuple[np.ndarray, int]:
    """M-RoPE position components (temporal, row, column, unused) of a sequence, as the pinned
    llama.cpp and mtmd give them, and the text position that follows it. `segments`: in order,
    ints (that many text tokens) and (nx, ny) grids (an image's tokens, row by row).

    A text token at position p is (p, p, p, 0), p counting on by one; an image starting at p has
    token i at (p, p + i // nx, p + i % nx, 0), and the text after it starts at p + max(nx, ny)
    (mtmd_image_tokens_get_decoder_pos, mtmd_image_tokens_get_n_pos)."""
    parts, p = [], start
    for seg in segments:
        if isinstance(seg, (int, np.integer)):
            t = np.arange(p, p + int(seg), dtype=np.int32)
            parts.append(np.stack([t, t, t, np.zeros_like(t)], axis=1))
            p += int(seg)
        else:
            nx, ny = int(seg[0]), int(seg[1])
            i = np.arange(nx * ny, dtype=np.int32)
            parts.append(np.stack([np.full_like(i, p), p + i // nx, p + i % nx, np.zeros_like(i)], axis=1))
            p += max(nx, ny)
    rows = np.concatenate(parts) if parts else np.zeros((0, 4), np.int32)
    return rows.astype(np.int32), p


def prompt_segments(chunks: list) -> list:
    """mrope_positions' segments of a prompt's chunks."""
    return [len(c.tokens) if isinstance(c, TextChunk) else (c.nx, c.ny) for c in chunks]


class Prompt:
    """A prompt split by mtmd into text and image chunks. Owns the mtmd chunk list."""

    def __init__(self, mtmd, chunks_ptr, chunks: list):
        self._mtmd = mtmd
        self._ptr = chunks_ptr
        self.chunks = chunks

    def close(self) -> None:
        # the pointer is dropped before the free: a KeyboardInterrupt can be raised right after
        # any call returns, and one raised between the free and the reset made __del__ free the
        # list a second time (a crash under tools/sanitize.sh, tests/test_threads.py)
        ptr, self._ptr = self._ptr, None
        if ptr:
            self._mtmd.mtmd_input_chunks_free(ptr)

    def __del__(self):
        self.close()


# Where llama.cpp's clip loader finds the output width of each image projector type it knows
# (clip_n_mmproj_embd in tools/mtmd/clip.cpp, llama-cpp-python 0.3.36): the width is a dimension
# of one of the projector's own tensors, never a header key (granite4_vision aside, below).
# Value: (tensor name, ggml dimension ne[i] that is the width).
_MM2_OUT = ("mm.2.weight", 1)
_MM2_BIAS = ("mm.2.bias", 0)
_FC_OUT = ("mm.model.fc.weight", 1)
_DOWN_OUT = ("mm.down.weight", 1)
_PROJECTOR_WIDTH = {
    "mlp": _MM2_OUT,  # LLaVA-1.5; with mm.3.* it is the Yi-style "mlp_norm" (see _projection_width)
    "ldp": ("mm.model.mb_block.1.block.2.1.bias", 0),
    "ldpv2": ("mm.model.peg.0.bias", 0),
    "resampler": ("resampler.proj.weight", 0),
    "minicpmv4_6": _DOWN_OUT,
    "adapter": ("adapter.linear.dense_4h_to_h.weight", 1),
    "qwen2vl_merger": _MM2_BIAS,
    "qwen2.5vl_merger": _MM2_BIAS,
    "qwen2.5o": _MM2_BIAS,  # its vision half loads as qwen2.5vl_merger
    "qwen3vl_merger": _MM2_BIAS,  # times (1 + deepstack layers), see _projection_width
    "exaone4_5": _MM2_BIAS,
    "youtuvl": _MM2_BIAS,
    "ling3vl": _MM2_BIAS,
    "mimovl": _MM2_OUT,
    "step3vl": _FC_OUT,
    "gemma3": ("mm.input_projection.weight", 0),
    "gemma3nv": ("mm.input_projection.weight", 0),
    "gemma4v": ("mm.input_projection.weight", 1),
    "gemma4uv": ("mm.input_projection.weight", 1),
    "idefics3": _FC_OUT,
    "llama4": _FC_OUT,
    "hunyuanvl": _FC_OUT,
    "deepseekocr": _FC_OUT,
    "deepseekocr2": _FC_OUT,
    "internvl": ("mm.model.mlp.3.weight", 1),
    "nemotron_v2_vl": ("mm.model.mlp.3.weight", 1),
    "cogvlm": _DOWN_OUT,
    "glm4v": _DOWN_OUT,
    "glm5v": _DOWN_OUT,
    "minimax_m3": ("mm.merger.fc2.bias", 0),
    "janus_pro": ("mm.1.bias", 0),
    "phi4": _MM2_OUT,
    "pixtral": _MM2_OUT,
    "lightonocr": _MM2_OUT,
    "dots_ocr": _MM2_OUT,
    "dots3note_v": _MM2_OUT,
    "muse-glimmer": _MM2_OUT,
    "lfm2": _MM2_OUT,
    "kimivl": _MM2_OUT,
    "kimik25": _MM2_OUT,
    "paddleocr": _MM2_OUT,
    "yasa2": _MM2_OUT,
    "deepseek4v": _MM2_OUT,
    "granite4_vision": None,  # one block per feature layer, each clip.vision.projection_dim wide
}
# projector types of llama.cpp that encode sound, not images
_AUDIO_PROJECTORS = {
    "gemma3na", "gemma4a", "gemma4ua", "ultravox", "qwen2a", "qwen3a", "glma", "voxtral", "meralion",
    "musicflamingo", "lfm2a", "dots3note_a", "granite_speech", "parakeet", "mimo_audio",
    "qwen3tts_spkenc", "qwen3tts_gen", "pockettts_spkenc", "pockettts_gen",
}


class _BadGGUF(Exception):
    pass


_SCALAR_FORMATS = {GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
                   GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
                   GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
                   GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d"}
_MAX_ARRAY = 1 << 16  # an mmproj's arrays are short: layer indices, grid points, mean and std
_MAX_NAME = 63  # GGML_MAX_NAME - 1


class GGUFHeader:
    """An mmproj's metadata and tensor infos, read with every count and length checked against
    the file (gguf-py's reader walks arrays element by element without bounds: a corrupt count
    kept it busy for minutes). fields: key -> (types, value), types as gguf-py names them (an
    array: (ARRAY, item type)); tensors: name -> (shape in ggml order, ggml type number)."""

    def __init__(self, path: str):
        self.fields: dict[str, tuple[tuple, object]] = {}
        self.tensors: dict[str, tuple[list[int], int]] = {}
        self._size = os.path.getsize(path)
        with open(path, "rb") as f:
            self._f, self._buf, self._base, self._pos = f, b"", 0, 0
            self._parse()

    def _need(self, n: int) -> memoryview:
        if n < 0 or self._pos + n > self._size:
            raise _BadGGUF(f"a count or length ({n}) runs past the end of the file")
        end = self._pos + n
        if end > self._base + len(self._buf):  # read ahead in chunks of at least 1 MiB
            self._f.seek(self._base + len(self._buf))
            self._buf = self._buf[self._pos - self._base :] + self._f.read(max(end - self._base - len(self._buf), 1 << 20))
            self._base = self._pos
        view = memoryview(self._buf)[self._pos - self._base : end - self._base]
        self._pos = end
        return view

    def _scalar(self, fmt: str):
        return struct.unpack(fmt, self._need(struct.calcsize(fmt)))[0]

    def _string(self) -> bytes:
        return bytes(self._need(self._scalar("<Q")))

    def _value(self, vtype: int, in_array: bool = False):
        try:
            vtype = GGUFValueType(vtype)
        except ValueError:
            raise _BadGGUF(f"unknown value type {vtype}") from None
        if vtype in _SCALAR_FORMATS:
            return (vtype,), self._scalar(_SCALAR_FORMATS[vtype])
        if vtype == GGUFValueType.STRING:
            return (vtype,), self._string()
        item, n = self._scalar("<I"), self._scalar("<Q")
        try:
            item_type = GGUFValueType(item)
        except ValueError:
            raise _BadGGUF(f"unknown array item type {item}") from None
        if in_array or item_type == GGUFValueType.ARRAY:
            raise _BadGGUF("an array of arrays")
        if n > _MAX_ARRAY:
            raise _BadGGUF(f"an array of {n} elements (an mmproj's arrays are short)")
        return (vtype, item_type), [self._value(item_type, True)[1] for _ in range(n)]

    def _parse(self) -> None:
        if bytes(self._need(4)) != b"GGUF":
            raise _BadGGUF("bad magic")
        version = self._scalar("<I")
        if version not in (2, 3):
            raise _BadGGUF(f"version {version}")
        n_tensors, n_kv = self._scalar("<Q"), self._scalar("<Q")
        if n_kv * 13 > self._size or n_tensors * 32 > self._size:
            raise _BadGGUF(f"{n_kv} keys and {n_tensors} tensors cannot fit in {self._size} bytes")
        for _ in range(n_kv):
            key = self._string().decode("utf-8", errors="replace")
            if key in self.fields:
                raise _BadGGUF(f"key {key!r} appears twice")
            self.fields[key] = self._value(self._scalar("<I"))
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._scalar("<I")
            if len(name) > _MAX_NAME or n_dims > 4:
                raise _BadGGUF(f"tensor info {name[:80]!r} ({n_dims} dimensions)")
            shape = [self._scalar("<Q") for _ in range(n_dims)]
            ggml_type, _offset = self._scalar("<I"), self._scalar("<Q")
            name = name.decode("utf-8", errors="replace")
            if name in self.tensors:
                raise _BadGGUF(f"tensor {name!r} appears twice")
            self.tensors[name] = (shape, ggml_type)


def _field(reader: GGUFHeader, key: str):
    """A metadata value (strings decoded), or None."""
    f = reader.fields.get(key)
    if f is None:
        return None
    types, value = f

    def text(v):
        if not isinstance(v, bytes):
            return v
        try:
            return v.decode("utf-8")
        except UnicodeDecodeError:
            raise VisionModelError(f"mmproj metadata key {key!r} is not valid UTF-8") from None

    return [text(v) for v in value] if types[0] == GGUFValueType.ARRAY else text(value)


def projector_type(reader: GGUFHeader) -> str | None:
    """The image projector's type, read as llama.cpp reads it: ``clip.projector_type``, or
    ``clip.vision.projector_type`` where that is empty (files holding audio and vision)."""
    return _field(reader, "clip.projector_type") or _field(reader, "clip.vision.projector_type") or None


def _tensor_shapes(reader: GGUFHeader) -> dict[str, list[int]]:
    """name -> shape in ggml order (ne[0] first: for a matrix, ne[0] is the input width)."""
    return {name: list(shape) for name, (shape, _) in reader.tensors.items()}


def _uint_field(reader: GGUFHeader, key: str, path: str) -> int | None:
    value = _field(reader, key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise VisionModelError(f"{path}: {key} is {value!r}, not a non-negative integer")
    return value


def _int_list(reader: GGUFHeader, key: str, path: str) -> list[int]:
    """An array of integers ([] when the key is absent)."""
    value = _field(reader, key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise VisionModelError(f"{path}: {key} is {value!r:.80}, not an array of integers")
    return value


def _projection_width(reader: GGUFHeader, path: str = "mmproj") -> int:
    """Output width of the image projector, taken from its tensors as llama.cpp does.

    Header keys are not trusted: llama.cpp's legacy converter writes CLIP's own projection_dim
    (768 for ViT-L/14) into clip.vision.projection_dim, whatever the projector's output is."""
    ptype = projector_type(reader)
    if ptype is None:
        raise VisionModelError(f"{path} has no projector type (clip.projector_type)")
    if ptype in _AUDIO_PROJECTORS:
        raise VisionModelError(f"{path} has an audio projector ({ptype!r}), not an image projector")
    if ptype not in _PROJECTOR_WIDTH:
        raise VisionModelError(f"{path} has a projector type llama.cpp does not know: {ptype!r}")
    shapes = _tensor_shapes(reader)

    def dim(name: str, axis: int) -> int:
        shape = shapes.get(name)
        if shape is None:
            raise VisionModelError(f"{path}: a {ptype!r} projector needs the tensor {name!r}, which the file lacks")
        if axis >= len(shape):
            raise VisionModelError(f"{path}: tensor {name!r} has shape {shape}, too few dimensions for a {ptype!r} projector")
        return shape[axis]

    if ptype == "granite4_vision":
        layers = _int_list(reader, "clip.vision.feature_layer", path)
        return len(layers) * (_uint_field(reader, "clip.vision.projection_dim", path) or 0)
    name, axis = _PROJECTOR_WIDTH[ptype]
    if ptype == "mlp" and "mm.3.weight" in shapes:
        name, axis = "mm.3.bias", 0  # Yi-style LLaVA: llama.cpp switches it to "mlp_norm"
    width = dim(name, axis)
    if ptype == "qwen3vl_merger":  # the main path plus one per deepstack layer, concatenated
        n_layer = _uint_field(reader, "clip.vision.block_count", path) or 0
        width *= 1 + sum(f"v.deepstack.{il}.fc1.weight" in shapes for il in range(n_layer))
    return width


# projector types that mtmd runs on its llava graph: a CLIP/SigLIP ViT (patch convolution, learned
# position table, blocks with separate q/k/v) in front of the projector
_LLAVA_GRAPH = {"mlp", "ldp", "ldpv2", "adapter"}


def _check_vit_tower(reader: GGUFHeader, ptype: str, path: str) -> None:
    """The tower's header keys against the tensors they describe, for the llava-graph projectors.

    mtmd builds its graph from clip.vision.embedding_length, attention.head_count (head_dim),
    image_size, patch_size and feature_layer; where the tensors disagree, llama.cpp loads the
    file and then stops the process with a GGML_ASSERT at the first image. A key that is missing
    is left to mtmd, which refuses such a file with an error."""
    keys = {k: _uint_field(reader, f"clip.vision.{k}", path) for k in
            ("embedding_length", "attention.head_count", "attention.head_dim", "image_size", "patch_size", "block_count")}
    n_embd, n_head, image_size, patch = (keys[k] for k in ("embedding_length", "attention.head_count", "image_size", "patch_size"))
    if None in (n_embd, n_head, image_size, patch, keys["block_count"]) or patch == 0:
        return
    shapes = _tensor_shapes(reader)

    def tensor(name: str) -> list[int]:
        if name not in shapes:
            raise VisionModelError(f"{path}: the vision tower has no tensor {name!r}")
        return shapes[name] + [1] * (4 - len(shapes[name]))

    def expect(name: str, axis: int, want: int, what: str) -> None:
        got = tensor(name)[axis]
        if got != want:
            raise VisionModelError(f"{path}: {what} is {want} but tensor {name!r} has {got} (ne[{axis}]); "
                                   f"the header does not describe this file's weights")

    d_head = keys["attention.head_dim"] or (n_embd // n_head if n_head else 0)
    if n_head == 0 or d_head * n_head == 0 or (not keys["attention.head_dim"] and n_embd % n_head):
        raise VisionModelError(f"{path}: clip.vision.embedding_length {n_embd} does not split into "
                               f"clip.vision.attention.head_count {n_head} heads")
    width = "clip.vision.embedding_length"
    expect("v.patch_embd.weight", 3, n_embd, width)
    expect("v.position_embd.weight", 0, n_embd, width)
    if "v.class_embd" in shapes:
        expect("v.class_embd", 0, n_embd, width)
    kernel = tensor("v.patch_embd.weight")[:2]
    grid = image_size // patch
    if any(image_size < k or (image_size - k) // patch + 1 != grid for k in kernel):
        raise VisionModelError(f"{path}: clip.vision.image_size {image_size} and patch_size {patch} do not fit the "
                               f"{kernel[0]}x{kernel[1]} patch convolution of 'v.patch_embd.weight'")
    n_pos = grid * grid + ("v.class_embd" in shapes)
    if tensor("v.position_embd.weight")[1] < n_pos:
        raise VisionModelError(f"{path}: clip.vision.image_size {image_size} / patch_size {patch} needs {n_pos} positions "
                               f"but 'v.position_embd.weight' has {tensor('v.position_embd.weight')[1]}")
    for il in range(keys["block_count"]):
        for part in ("attn_q", "attn_k", "attn_v"):
            name = f"v.blk.{il}.{part}.weight"
            expect(name, 0, n_embd, width)
            expect(name, 1, d_head * n_head, "attention.head_count x head size")
        expect(f"v.blk.{il}.attn_out.weight", 0, d_head * n_head, "attention.head_count x head size")
        expect(f"v.blk.{il}.attn_out.weight", 1, n_embd, width)
    layers = _int_list(reader, "clip.vision.feature_layer", path)
    deepest = max(layers, default=-1)
    if deepest > keys["block_count"]:  # mtmd's graph would run layers the file does not have
        raise VisionModelError(f"{path}: clip.vision.feature_layer {deepest} is past the {keys['block_count']} blocks of the tower")
    if ptype == "mlp":
        # the projector's input: the tower's output, or the outputs of the feature layers side by side
        n_stacked = len({v for v in layers if v >= 0})
        expect("mm.0.weight", 0, n_embd * max(n_stacked, 1),
               width + (f" x {n_stacked} feature layers" if n_stacked > 1 else ""))
    _check_vit_shapes_and_types(reader, ptype, path, n_embd, d_head * n_head, keys["block_count"])


# ggml types whose matrices the CPU backend multiplies (it has their dot product); the others
# (integers, f64, the q8_1 / q8_K activation formats) abort mid-graph
_MATMUL_TYPES = {0, 1, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 16, 17, 18, 19, 20, 21, 22, 23, 29, 30, 34, 35, 39, 40, 41, 42}


def _check_vit_shapes_and_types(reader: GGUFHeader, ptype: str, path: str, n_embd: int, n_qkv: int, n_block: int) -> None:
    """The ViT's other tensors and the MLP projector, where mtmd's graph would stop the process
    (GGML_ASSERT on a matrix product, or no backend for an op) rather than refuse the file:
    shapes that chain, vectors (norms, biases) in f32 as the graph adds them to f32 activations,
    the patch convolution in f16/f32, matrices of a type the CPU backend multiplies."""
    shapes = {name: shape + [1] * (4 - len(shape)) for name, (shape, _) in reader.tensors.items()}

    def exact(name: str, want: list[int]) -> None:
        if name in shapes and shapes[name] != want + [1] * (4 - len(want)):
            raise VisionModelError(f"{path}: tensor {name!r} has shape {shapes[name][:max(len(want), 1)]}, "
                                   f"the vision tower needs {want}")

    E = n_embd
    for name in ("v.patch_embd.bias", "v.class_embd", "v.pre_ln.weight", "v.pre_ln.bias", "v.post_ln.weight", "v.post_ln.bias"):
        exact(name, [E])
    if "v.patch_embd.weight" in shapes and shapes["v.patch_embd.weight"][2] != 3:
        raise VisionModelError(f"{path}: 'v.patch_embd.weight' convolves {shapes['v.patch_embd.weight'][2]} channels, not RGB's 3")
    if "v.position_embd.weight" in shapes and shapes["v.position_embd.weight"][2:] != [1, 1]:
        raise VisionModelError(f"{path}: 'v.position_embd.weight' has shape {shapes['v.position_embd.weight']}, not a matrix")
    for il in range(n_block):
        p = f"v.blk.{il}."
        for part in ("attn_q", "attn_k", "attn_v"):
            exact(p + part + ".bias", [n_qkv])
        exact(p + "attn_out.bias", [E])
        for part in ("ln1", "ln2"):
            exact(p + part + ".weight", [E])
            exact(p + part + ".bias", [E])
        up, down = p + "ffn_up", p + "ffn_down"
        if down + ".weight" in shapes and shapes[down + ".weight"][0] == E:  # legacy naming: llama.cpp swaps them
            up, down = down, up
        if up + ".weight" in shapes and down + ".weight" in shapes:
            n_ff = shapes[up + ".weight"][1]
            exact(up + ".weight", [E, n_ff])
            exact(down + ".weight", [n_ff, E])
            exact(p + "ffn_gate.weight", [E, n_ff])
            exact(up + ".bias", [n_ff])
            exact(down + ".bias", [E])
    if ptype == "mlp":  # tensors mtmd's loader takes as optional but its graph uses when it runs
        needed = [f"mm.{i}.{part}" for i in (0, 1, 3, 4) for part in ("weight", "bias")] if "mm.3.weight" in shapes else \
            ["mm.0.weight", "mm.0.bias"] + (["mm.2.bias"] if "mm.2.weight" in shapes else [])
        for name in needed:
            if name not in shapes:
                raise VisionModelError(f"{path}: the 'mlp' projector has no tensor {name!r}")
    if ptype == "mlp" and "mm.3.weight" not in shapes and "mm.0.weight" in shapes and "mm.2.weight" in shapes:
        hidden = shapes["mm.0.weight"][1]
        exact("mm.0.weight", [shapes["mm.0.weight"][0], hidden])
        exact("mm.0.bias", [hidden])
        exact("mm.2.weight", [hidden, shapes["mm.2.weight"][1]])
        exact("mm.2.bias", [shapes["mm.2.weight"][1]])
    for name, (shape, ggml_type) in reader.tensors.items():
        if name == "v.position_embd.weight":  # rows taken with get_rows: converted to f32
            ok, want = ggml_type in _MATMUL_TYPES, "a type ggml reads rows of"
        elif len([d for d in shape if d != 1]) <= 1 and name != "v.patch_embd.weight":
            ok, want = ggml_type == 0, "f32"
        elif name == "v.patch_embd.weight":
            ok, want = ggml_type in (0, 1), "f32 or f16"
        else:
            ok, want = ggml_type in _MATMUL_TYPES, "a type ggml multiplies"
        if not ok:
            raise VisionModelError(f"{path}: tensor {name!r} has ggml type {ggml_type}, the vision tower needs {want}")


# Keys that llama.cpp's clip loader reads with gguf_get_val_<type>, which stops the process
# (GGML_ASSERT) when the file stores the key with another type; checked here first. From
# tools/mtmd/clip.cpp of llama-cpp-python 0.3.36 (its arrays are type-checked by clip itself).
_CLIP_KEY_TYPES: dict[str, GGUFValueType] = {
    "general.name": GGUFValueType.STRING,
    "general.description": GGUFValueType.STRING,
    "clip.has_vision_encoder": GGUFValueType.BOOL,
    "clip.has_audio_encoder": GGUFValueType.BOOL,
    "clip.has_gen_audio_encoder": GGUFValueType.BOOL,
    "clip.use_gelu": GGUFValueType.BOOL,
    "clip.use_silu": GGUFValueType.BOOL,
    "clip.projector_type": GGUFValueType.STRING,
    "clip.vision.projector_type": GGUFValueType.STRING,
    "clip.audio.projector_type": GGUFValueType.STRING,
    "clip.gen.audio.projector_type": GGUFValueType.STRING,
    "clip.gen.audio.model_variant": GGUFValueType.STRING,
    "clip.vision.mm_patch_merge_type": GGUFValueType.STRING,
    "clip.minicpmv_version": GGUFValueType.INT32,
    "clip.vision.swiglu_clamp": GGUFValueType.FLOAT32,
    **{f"clip.{m}.attention.layer_norm_epsilon": GGUFValueType.FLOAT32 for m in ("vision", "audio", "gen.audio")},
    **{f"clip.{m}.{k}": GGUFValueType.UINT32 for m in ("vision", "audio", "gen.audio") for k in (
        "attention.head_count", "attention.head_count_kv", "attention.head_dim", "block_count", "embedding_length",
        "feed_forward_length", "projection_dim")},
    **{k: GGUFValueType.UINT32 for k in (
        "clip.minicpmv_query_num", "clip.audio.chunk_size", "clip.audio.conv_kernel_size", "clip.audio.local_block_count",
        "clip.audio.local_group_size", "clip.audio.max_pos_emb", "clip.audio.num_mel_bins",
        "clip.audio.projector.downsample_rate", "clip.audio.projector.head_count", "clip.audio.projector.stack_factor",
        "clip.audio.projector.window_size", "clip.audio.rvq.num_quantizers", "clip.audio.subsampling_factor",
        "clip.audio.window_size", "clip.vision.expert_used_count", "clip.vision.image_max_pixels",
        "clip.vision.image_min_pixels", "clip.vision.image_size", "clip.vision.n_wa_pattern", "clip.vision.patch_size",
        "clip.vision.preproc_image_size", "clip.vision.preproc_max_tiles", "clip.vision.preproc_min_tiles",
        "clip.vision.projector.query_side", "clip.vision.projector.scale_factor", "clip.vision.projector.window_side",
        "clip.vision.sam.block_count", "clip.vision.sam.embedding_length", "clip.vision.sam.head_count",
        "clip.vision.spatial_merge_size", "clip.vision.window_size")},
}


def _check_key_types(reader: GGUFHeader, path: str) -> None:
    for key, want in _CLIP_KEY_TYPES.items():
        f = reader.fields.get(key)
        if f is not None and f[0] != (want,):
            got = "/".join(t.name for t in f[0])
            raise VisionModelError(f"{path}: {key} is stored as {got}, llama.cpp reads it as {want.name}")


def inspect_mmproj(path: str) -> dict:
    """Reads an mmproj's header (no weights) and checks it is a vision projector."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"mmproj file not found: {path}")
    try:
        reader = GGUFHeader(path)
    except (_BadGGUF, struct.error) as e:
        raise VisionModelError(f"{path} is not a valid GGUF file ({e})") from None
    _check_key_types(reader, path)
    arch = _field(reader, "general.architecture")
    if arch != "clip":
        raise VisionModelError(f"{path} is not an mmproj file (general.architecture is {arch!r}, expected 'clip')")
    has_vision = _field(reader, "clip.has_vision_encoder")
    if has_vision is not None and not has_vision:
        raise VisionModelError(f"{path} has no vision encoder")
    eps = _field(reader, "clip.vision.attention.layer_norm_epsilon")
    if eps is not None and not (math.isfinite(eps) and eps >= 0):  # ggml's norms assert eps >= 0
        raise VisionModelError(f"{path}: clip.vision.attention.layer_norm_epsilon is {eps}, not a finite eps >= 0")
    ptype = projector_type(reader)
    if ptype in _LLAVA_GRAPH:
        _check_vit_tower(reader, ptype, path)
    return {
        "projector_type": ptype,
        "n_embd": _projection_width(reader, path),
        "image_size": _uint_field(reader, "clip.vision.image_size", path),
    }


class VisionEncoder:
    """An mmproj loaded by mtmd, bound to a text model's vocabulary. Owns the mtmd context."""

    def __init__(self, mmproj_path: str, vocab, n_embd: int, n_threads: int = 0, use_gpu: bool = True,
                 text_mrope: bool = False, image_min_tokens: int | None = None, image_max_tokens: int | None = None):
        import llama_cpp
        from llama_cpp import mtmd_cpp

        self._M = mtmd_cpp
        self._ctx = None
        self.path = os.fspath(mmproj_path)
        meta = inspect_mmproj(self.path)
        if meta["n_embd"] != n_embd:
            raise VisionModelError(
                f"mmproj {os.path.basename(self.path)} projects to {meta['n_embd']} dimensions but the text model "
                f"has n_embd={n_embd}: this mmproj belongs to another model"
            )
        self.n_embd = n_embd
        self.meta = meta
        self.n_encodes = 0  # how many images went through the encoder (tests assert cache reuse)
        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu = use_gpu  # the text model's device (cmx.Model's device=)
        params.print_timings = False
        params.warmup = False
        params.n_threads = n_threads or os.cpu_count() or 1
        # the encoder's attention as llama-cpp-python runs it (its MTMD handler follows its Llama's
        # flash_attn=False default); mtmd's own default (auto: flash on CPU) rounds differently
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        # dynamic resolution's bounds on an image's tokens (mtmd's image_min_tokens / image_max_tokens;
        # -1: the projector's defaults, 8 and 4096 for Qwen2-VL / Qwen2.5-VL)
        params.image_min_tokens = -1 if image_min_tokens is None else image_min_tokens
        params.image_max_tokens = -1 if image_max_tokens is None else image_max_tokens
        self._ctx = mtmd_cpp.mtmd_init_from_file(self.path.encode(), vocab.llama_model, params)
        if not self._ctx:
            raise VisionModelError(f"llama.cpp's mtmd could not load {self.path}")
        if not mtmd_cpp.mtmd_support_vision(self._ctx):
            raise VisionModelError(f"{self.path} does not support images")
        # mtmd lays images out by the text model's RoPE: on their token grid for M-RoPE models
        # (mrope_positions), one position per token otherwise, whatever the projector
        self.use_mrope = bool(mtmd_cpp.mtmd_decode_use_mrope(self._ctx))
        if self.use_mrope != text_mrope:  # cmx and llama.cpp disagree on the text model's RoPE
            self.close()
            raise VisionModelError(f"{self.path}: mtmd's image positions ({'M-RoPE' if self.use_mrope else 'one per token'}) "
                                   "do not fit the text model's RoPE")
        self.marker = mtmd_cpp.mtmd_default_marker().decode()

    def close(self) -> None:
        ctx, self._ctx = self._ctx, None  # dropped before the free (see Prompt.close)
        if ctx:
            self._M.mtmd_free(ctx)

    def __del__(self):
        self.close()

    def tokenize(self, text: str, images: list[RGBImage]) -> Prompt:
        """Splits text holding one marker per image into chunks (mtmd_tokenize)."""
        M = self._M
        n_markers = text.count(self.marker)
        if n_markers != len(images):
            raise ValueError(f"the prompt has {n_markers} image markers but {len(images)} images were given")
        bitmaps = []
        chunks_ptr = M.mtmd_input_chunks_init()
        try:
            for i, img in enumerate(images):
                buf = (ctypes.c_uint8 * img.pixels.size).from_buffer_copy(img.pixels.tobytes())
                bmp = M.mtmd_bitmap_init(img.width, img.height, buf)
                if not bmp:
                    raise RuntimeError("mtmd_bitmap_init failed")
                bitmaps.append(bmp)
                M.mtmd_bitmap_set_id(bmp, str(i).encode())  # each of its chunks carries it: which image
            raw = text.encode("utf-8")
            inp = M.mtmd_input_text(text=raw, text_len=len(raw), add_special=True, parse_special=True)
            arr = (M.mtmd_bitmap_p_ctypes * max(1, len(bitmaps)))(*bitmaps)
            rc = M.mtmd_tokenize(self._ctx, chunks_ptr, ctypes.byref(inp), arr, len(bitmaps))
            if rc != 0:
                raise ValueError(f"mtmd could not tokenize the prompt (error {rc})")
            chunks, rows_of = [], [0] * len(images)  # rows_of: embedding rows of each image so far
            for i in range(M.mtmd_input_chunks_size(chunks_ptr)):
                chunk = M.mtmd_input_chunks_get(chunks_ptr, i)
                kind = M.mtmd_input_chunk_get_type(chunk)
                if kind == M.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    n = ctypes.c_size_t()
                    ptr = M.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                    chunks.append(TextChunk([int(ptr[j]) for j in range(n.value)]))
                elif kind == M.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    n_tokens = int(M.mtmd_input_chunk_get_n_tokens(chunk))
                    n_pos = int(M.mtmd_input_chunk_get_n_pos(chunk))
                    tokens_image = M.mtmd_input_chunk_get_tokens_image(chunk)
                    nx, ny = int(M.mtmd_image_tokens_get_nx(tokens_image)), int(M.mtmd_image_tokens_get_ny(tokens_image))
                    # the layouts mrope_positions reproduces: one position per token, or a grid
                    if n_pos != (max(nx, ny) if self.use_mrope else n_tokens) or (self.use_mrope and nx * ny != n_tokens):
                        raise VisionModelError(f"mtmd gave an image chunk of {n_tokens} tokens ({nx} x {ny}) taking {n_pos} "
                                               "positions: a layout cmx does not support")
                    cid = M.mtmd_input_chunk_get_id(chunk)
                    index = int(cid.decode()) if cid else -1
                    if not 0 <= index < len(images):
                        raise VisionModelError(f"mtmd gave an image chunk of no known image (id {cid!r})")
                    chunks.append(ImageChunk(images[index], n_tokens, chunk, index, rows_of[index], nx, ny, n_pos))
                    rows_of[index] += n_tokens
                else:
                    raise ValueError("only text and image inputs are supported")
            prompt = Prompt(M, None, chunks)
            prompt._ptr, chunks_ptr = chunks_ptr, None  # one owner at any point (see Prompt.close)
            return prompt
        finally:
            for bmp in bitmaps:
                M.mtmd_bitmap_free(bmp)
            if chunks_ptr:
                M.mtmd_input_chunks_free(chunks_ptr)

    def _encode_chunk(self, chunk: ImageChunk) -> np.ndarray:
        rc = self._M.mtmd_encode_chunk(self._ctx, chunk._chunk)
        if rc != 0:
            raise RuntimeError(f"mtmd failed to encode the image (error {rc})")
        ptr = self._M.mtmd_get_output_embd(self._ctx)
        return np.ctypeslib.as_array(ptr, shape=(chunk.n_tokens * self.n_embd,)).reshape(chunk.n_tokens, self.n_embd).copy()

    def encode(self, chunk: ImageChunk) -> np.ndarray:
        """Embeddings of one image chunk, float32 [n_tokens, n_embd]."""
        self.n_encodes += 1
        return self._encode_chunk(chunk)

    def encode_parts(self, chunks: list[ImageChunk]) -> np.ndarray:
        """Embeddings of one image: all of its chunks in prompt order, concatenated (its rows by
        ImageChunk.offset). Counts as one encode."""
        if not chunks or any(c.index != chunks[0].index for c in chunks):
            raise ValueError("encode_parts takes the chunks of one image")
        self.n_encodes += 1
        return np.concatenate([self._encode_chunk(c) for c in chunks])

    def encode_image(self, image: RGBImage) -> np.ndarray:
        """Embeddings of one image on its own (what its image chunks of a prompt get, concatenated)."""
        prompt = self.tokenize(self.marker, [image])
        try:
            return self.encode_parts([c for c in prompt.chunks if isinstance(c, ImageChunk)])
        finally:
            prompt.close()

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
import os
from dataclasses import dataclass, field

import numpy as np
from gguf import GGUFReader

from .images import RGBImage


class VisionModelError(ValueError):
    """The mmproj file is missing, not an mmproj, or does not fit the text model."""


@dataclass
class TextChunk:
    tokens: list[int]


@dataclass
class ImageChunk:
    image: RGBImage
    n_tokens: int
    _chunk: object = field(repr=False, default=None)  # mtmd_input_chunk_p, valid while its Prompt lives


class Prompt:
    """A prompt split by mtmd into text and image chunks. Owns the mtmd chunk list."""

    def __init__(self, mtmd, chunks_ptr, chunks: list):
        self._mtmd = mtmd
        self._ptr = chunks_ptr
        self.chunks = chunks

    def close(self) -> None:
        if self._ptr:
            self._mtmd.mtmd_input_chunks_free(self._ptr)
            self._ptr = None

    def __del__(self):
        self.close()


def _projection_width(reader: GGUFReader) -> int | None:
    """Output width of the projector, from the tensors/keys llama.cpp's clip loader reads."""
    f = reader.fields.get("clip.vision.projection_dim")
    if f is not None:
        return int(f.contents())
    shapes = {t.name: [int(x) for x in t.shape] for t in reader.tensors}
    for name in ("mm.2.weight", "mm.model.fc.weight", "mm.model.mlp.3.weight"):
        if name in shapes and len(shapes[name]) == 2:
            return shapes[name][1]  # ggml ne1 = output features
    return None


def inspect_mmproj(path: str) -> dict:
    """Reads an mmproj's header (no weights) and checks it is a vision projector."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"mmproj file not found: {path}")
    try:
        reader = GGUFReader(path)
    except Exception as e:  # gguf-py raises ValueError/struct errors/IndexError on garbage
        raise VisionModelError(f"{path} is not a valid GGUF file ({type(e).__name__}: {e})") from None
    arch = reader.fields.get("general.architecture")
    arch = arch.contents() if arch is not None else None
    if arch != "clip":
        raise VisionModelError(f"{path} is not an mmproj file (general.architecture is {arch!r}, expected 'clip')")
    has_vision = reader.fields.get("clip.has_vision_encoder")
    if has_vision is not None and not has_vision.contents():
        raise VisionModelError(f"{path} has no vision encoder")
    ptype = reader.fields.get("clip.projector_type") or reader.fields.get("clip.vision.projector_type")
    return {
        "projector_type": ptype.contents() if ptype is not None else None,
        "n_embd": _projection_width(reader),
        "image_size": int(reader.fields["clip.vision.image_size"].contents()) if "clip.vision.image_size" in reader.fields else None,
    }


class VisionEncoder:
    """An mmproj loaded by mtmd, bound to a text model's vocabulary. Owns the mtmd context."""

    def __init__(self, mmproj_path: str, vocab, n_embd: int, n_threads: int = 0):
        import llama_cpp
        from llama_cpp import mtmd_cpp

        self._M = mtmd_cpp
        self._ctx = None
        self.path = os.fspath(mmproj_path)
        meta = inspect_mmproj(self.path)
        if meta["n_embd"] is None:
            raise VisionModelError(f"{self.path}: cannot determine the projector's output width")
        if meta["n_embd"] != n_embd:
            raise VisionModelError(
                f"mmproj {os.path.basename(self.path)} projects to {meta['n_embd']} dimensions but the text model "
                f"has n_embd={n_embd}: this mmproj belongs to another model"
            )
        self.n_embd = n_embd
        self.meta = meta
        self.n_encodes = 0  # how many images went through the encoder (tests assert cache reuse)
        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu = True
        params.print_timings = False
        params.warmup = False
        params.n_threads = n_threads or os.cpu_count() or 1
        # the encoder's attention as llama-cpp-python runs it (its MTMD handler follows its Llama's
        # flash_attn=False default); mtmd's own default (auto: flash on CPU) rounds differently
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self._ctx = mtmd_cpp.mtmd_init_from_file(self.path.encode(), vocab.llama_model, params)
        if not self._ctx:
            raise VisionModelError(f"llama.cpp's mtmd could not load {self.path}")
        if not mtmd_cpp.mtmd_support_vision(self._ctx):
            raise VisionModelError(f"{self.path} does not support images")
        if mtmd_cpp.mtmd_decode_use_mrope(self._ctx):
            raise VisionModelError(f"{self.path}: models with M-RoPE image positions are not supported yet")
        self.marker = mtmd_cpp.mtmd_default_marker().decode()

    def close(self) -> None:
        if self._ctx:
            self._M.mtmd_free(self._ctx)
            self._ctx = None

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
            for img in images:
                buf = (ctypes.c_uint8 * img.pixels.size).from_buffer_copy(img.pixels.tobytes())
                bmp = M.mtmd_bitmap_init(img.width, img.height, buf)
                if not bmp:
                    raise RuntimeError("mtmd_bitmap_init failed")
                bitmaps.append(bmp)
            raw = text.encode("utf-8")
            inp = M.mtmd_input_text(text=raw, text_len=len(raw), add_special=True, parse_special=True)
            arr = (M.mtmd_bitmap_p_ctypes * max(1, len(bitmaps)))(*bitmaps)
            rc = M.mtmd_tokenize(self._ctx, chunks_ptr, ctypes.byref(inp), arr, len(bitmaps))
            if rc != 0:
                raise ValueError(f"mtmd could not tokenize the prompt (error {rc})")
            chunks, next_image = [], 0
            for i in range(M.mtmd_input_chunks_size(chunks_ptr)):
                chunk = M.mtmd_input_chunks_get(chunks_ptr, i)
                kind = M.mtmd_input_chunk_get_type(chunk)
                if kind == M.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    n = ctypes.c_size_t()
                    ptr = M.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                    chunks.append(TextChunk([int(ptr[j]) for j in range(n.value)]))
                elif kind == M.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    n_tokens = int(M.mtmd_input_chunk_get_n_tokens(chunk))
                    if int(M.mtmd_input_chunk_get_n_pos(chunk)) != n_tokens:
                        raise VisionModelError("image chunks whose positions differ from their token count are not supported")
                    chunks.append(ImageChunk(images[next_image], n_tokens, chunk))
                    next_image += 1
                else:
                    raise ValueError("only text and image inputs are supported")
            prompt = Prompt(M, chunks_ptr, chunks)
            chunks_ptr = None
            return prompt
        finally:
            for bmp in bitmaps:
                M.mtmd_bitmap_free(bmp)
            if chunks_ptr:
                M.mtmd_input_chunks_free(chunks_ptr)

    def encode(self, chunk: ImageChunk) -> np.ndarray:
        """Image embeddings, float32 [n_tokens, n_embd]."""
        rc = self._M.mtmd_encode_chunk(self._ctx, chunk._chunk)
        if rc != 0:
            raise RuntimeError(f"mtmd failed to encode the image (error {rc})")
        self.n_encodes += 1
        ptr = self._M.mtmd_get_output_embd(self._ctx)
        return np.ctypeslib.as_array(ptr, shape=(chunk.n_tokens * self.n_embd,)).reshape(chunk.n_tokens, self.n_embd).copy()

    def encode_image(self, image: RGBImage) -> np.ndarray:
        """Embeddings of one image on its own (what an image chunk of a prompt gets)."""
        prompt = self.tokenize(self.marker, [image])
        try:
            (chunk,) = [c for c in prompt.chunks if isinstance(c, ImageChunk)]
            return self.encode(chunk)
        finally:
            prompt.close()

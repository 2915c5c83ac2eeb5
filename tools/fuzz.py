#!/usr/bin/env python
"""Fuzzing of cmx's inputs (issue 11, reliability): mutated model files, images and chat messages
must load (or answer) or raise a named Python exception; never a signal, an abort or a hang.

    python tools/fuzz.py --cases 20000 --seed 1 --workdir /tmp/cmx-fuzz --summary tools/runs/fuzz/summary.json
    python tools/fuzz.py --one smollm2 123 --seed 1     # one case, in this process (prints its outcome)
    python tools/fuzz.py --file gif crash.gif           # a kept input file as a case of that kind

Decisions
- Kinds (what is mutated -> what a case runs). Each runs the user's entry point, or the layer right
  below it where the full call would only add input-independent compute:
  smollm2  SmolLM2's GGUF: header, metadata and tensor infos. The tensor data region keeps its
           original size but is a hole of zeros (a sparse file: no 100 MB write per case; loading
           never reads weight values). cmx.Model(path, n_ctx=8); if it loads: logits of two tokens
           and a chat (n_ctx 8 stops it with "prompt too long" right after the template rendered
           and tokenized: a 30-token prefill per case would cost more than the rest together).
  tiny     a tiny qwen2 GGUF written here (2 layers, width 32, 269-token byte-level BPE vocabulary,
           f16/q8_0/f32 tensors), mutated anywhere, data included. Model, logits, generate, chat;
           every other case with CoreMatching on (core neurons gather the file's FFN rows).
  mmproj   the demo mmproj: header (and sometimes data). cmx.vision.VisionEncoder (what
           Model(mmproj=) builds) on SmolLM2's vocabulary; if it loads: an image is preprocessed
           (mtmd_tokenize), the encoder graph is built and its memory reserved (a second mtmd
           context with warmup, which builds the graph at the file's image size without computing),
           and every 8th such case encodes for real (1.2 s each on one core; CMX_FUZZ_ENCODE_EVERY=1
           encodes in all of them).
  lora     the demo LoRA: header and data. Engine(SmolLM2, lora=...) and, if it loads, a 2-token
           decode (Model adds only path checks and SmolLM2's vocabulary around the Engine).
  png, jpeg, gif, webp
           encodings of a scene (cmx.scenes) in several modes (alpha, palette, 16-bit, progressive,
           animated, lossless, extreme aspect ratios), mutated with chunk CRCs usually repaired (else
           nearly every PNG case stops at the CRC check). cmx.images.load_image from bytes, a data:
           URL, a path or a file:// URL, then mtmd's preprocessing of the pixels (mtmd_tokenize).
           The encoder itself always runs on the preprocessed 336x336 tensor, so it is not repeated.
  chat     random message structures and call options (wrong types, missing keys, nested garbage,
           huge strings, special tokens, lone surrogates) -> Model.chat on SmolLM2 without vision,
           n_ctx 64, one Model per worker (its KV cache carries over, as in a conversation).
  profile  the tiny model with a cmx-profile profile (cmx.* keys: version, sizes, rho/beta, K and
           bounds, per-layer tau, core frequencies and neuron order; made here from a seeded
           CoreProfile, written as cmx-profile writes it), its cmx.* keys mutated (profile_mutate:
           wrong types and array element types, array lengths, huge counts and sizes, neuron
           indices out of range / repeated / wider than int32, NaN/inf thresholds and frequencies,
           missing, duplicated or renamed keys, other versions, another model's sizes, truncation in
           the cmx.* keys). cmx.Model with CoreMatching on, every layer sparse, the profile's rho (so
           the tables are used); if it loads: info, a 2-token generate (the short-prompt table) and
           a 12-token one (thresholds).
- GGUF mutations (gguf_mutate): structure-aware ops on a parsed header (key values replaced by
  interesting values of the same or another type, keys dropped/duplicated/added/renamed, array
  elements and lengths, tensor shapes, types, names and offsets: overlapping, misaligned, past the
  end, huge) and byte-level ops (bit flips, interesting values written over count/length/type
  fields, inserted or deleted bytes, truncation), 1-3 per case.
- Case i of kind k is derived from random.Random(f"{seed}/{k}/{i}") alone, so any case can be
  regenerated (--one, the regression tests) and a run resumes by skipping the cases already in
  WORKDIR/results.jsonl. Changing a mutator changes what a (seed, kind, i) recipe means: a kept
  recipe stores the sha256 of its input, and its test checks it.
- Outcomes: ok; error:<Name> for an accepted exception: ValueError and its subclasses
  (cmx.ModelLoadError, cmx.ImageError, cmx.VisionModelError, UnicodeError), TypeError, OSError
  (FileNotFoundError, ...), MemoryError (a huge count met an allocation); unexpected:<Name> for any
  other exception (a finding: an unclear error); crash (the child died of a signal); hang (no answer
  within --timeout seconds).
- Processes: --jobs persistent workers (child processes) run cases in a row, each with one thread
  for ggml and an address-space limit (8 GiB: a huge size becomes an allocation error, not a
  machine out of memory). When a worker dies or stops answering, it is restarted and the case is
  re-run alone in a fresh child to confirm it (crash / hang), or recorded as *_unconfirmed (the
  worker's earlier cases are listed). Crashing inputs are written to WORKDIR/crashes/ (SmolLM2's as
  its header: the rest of the file is zeros). Each crash fixed is kept in tests/data/fuzz/
  (cases.json: small inputs as files, the others as recipes) and run by tests/test_fuzz.py.
"""

from __future__ import annotations

import argparse
import base64
import collections
import dataclasses
import hashlib
import io
import json
import math
import os
import random
import re
import selectors
import struct
import subprocess
import sys
import time
from collections.abc import Sequence

KINDS = ("smollm2", "tiny", "mmproj", "lora", "png", "jpeg", "gif", "webp", "chat", "profile")
# Share of the cases per kind (their costs differ: an image case is ~5 ms, a loading GGUF ~150 ms).
WEIGHTS = {"smollm2": 4, "tiny": 3, "mmproj": 2, "lora": 2, "png": 1.5, "jpeg": 1.5, "gif": 1.5, "webp": 1.5, "chat": 3,
           "profile": 2}

# A loaded mmproj encodes for real in every ENCODE_EVERY-th case (1.2 s each on one core).
ENCODE_EVERY = int(os.environ.get("CMX_FUZZ_ENCODE_EVERY", "8"))

ACCEPTED = (ValueError, TypeError, OSError, MemoryError)  # cmx's errors are ValueError subclasses

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "python", "cmx", "data")
MMPROJ = os.path.join(DATA, "cmx-demo-mmproj.gguf")
LORA = os.path.join(DATA, "cmx-demo-lora.gguf")
SCRATCH = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def smollm2_path() -> str:
    from cmx.defaults import default_text_model

    return default_text_model()


# ---------------------------------------------------------------------------------------------
# GGUF: a header parsed into blobs (the fixed prefix, each key-value, each tensor info), each with
# the positions of its numeric fields, so that mutated headers are re-serialized cheaply.

GGUF_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q", 11: "<q", 12: "<d"}
T_STRING, T_ARRAY = 8, 9
ALL_TYPES = list(GGUF_SCALAR) + [T_STRING, T_ARRAY]


@dataclasses.dataclass
class Blob:
    raw: bytes
    fields: list  # (offset in raw, struct format, label)
    name: str  # key or tensor name


@dataclasses.dataclass
class GGUF:
    prefix: Blob  # magic, version, n_tensors, n_kv
    kvs: list
    tensors: list
    alignment: int
    data: bytes | None  # the tensor data region (None: a hole of data_size zero bytes)
    data_size: int


class _Reader:
    def __init__(self, buf: bytes, pos: int = 0):
        self.buf, self.pos = buf, pos

    def take(self, fmt: str):
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return v

    def string(self, fields: list, base: int, label: str) -> bytes:
        fields.append((self.pos - base, "<Q", label + ".len"))
        n = self.take("<Q")
        s = self.buf[self.pos : self.pos + n]
        self.pos += n
        return s


def _read_value(r: _Reader, vtype: int, fields: list, base: int, label: str, depth: int = 0):
    if vtype in GGUF_SCALAR:
        fields.append((r.pos - base, GGUF_SCALAR[vtype], label))
        return r.take(GGUF_SCALAR[vtype])
    if vtype == T_STRING:
        return r.string(fields, base, label)
    if vtype == T_ARRAY and depth == 0:
        fields.append((r.pos - base, "<I", label + ".atype"))
        atype = r.take("<I")
        fields.append((r.pos - base, "<Q", label + ".alen"))
        n = r.take("<Q")
        items = [_read_value(r, atype, fields, base, f"{label}[]", 1) for _ in range(n)]
        return (atype, items)
    raise ValueError(f"bad GGUF type {vtype}")


def parse_gguf(buf: bytes, keep_data: bool = True) -> GGUF:
    r = _Reader(buf)
    if buf[:4] != b"GGUF":
        raise ValueError("not a GGUF file")
    r.pos = 8
    n_tensors, n_kv = r.take("<Q"), r.take("<Q")
    prefix = Blob(buf[:24], [(0, "<I", "magic"), (4, "<I", "version"), (8, "<Q", "n_tensors"), (16, "<Q", "n_kv")], "prefix")
    kvs, alignment = [], 32
    for _ in range(n_kv):
        start, fields = r.pos, []
        key = r.string(fields, start, "key").decode()
        fields.append((r.pos - start, "<I", "type"))
        vtype = r.take("<I")
        value = _read_value(r, vtype, fields, start, key)
        if key == "general.alignment":
            alignment = value
        kvs.append(Blob(buf[start : r.pos], fields, key))
    tensors = []
    for _ in range(n_tensors):
        start, fields = r.pos, []
        name = r.string(fields, start, "name").decode()
        fields.append((r.pos - start, "<I", "n_dims"))
        n_dims = r.take("<I")
        for d in range(n_dims):
            fields.append((r.pos - start, "<Q", f"ne[{d}]"))
            r.take("<Q")
        fields.append((r.pos - start, "<I", "ggml_type"))
        r.take("<I")
        fields.append((r.pos - start, "<Q", "offset"))
        r.take("<Q")
        tensors.append(Blob(buf[start : r.pos], fields, name))
    data_offset = (r.pos + alignment - 1) // alignment * alignment
    data = buf[data_offset:] if keep_data else None
    return GGUF(prefix, kvs, tensors, alignment, data, len(buf) - data_offset)


def read_gguf_header(path: str) -> GGUF:
    """The header of a big GGUF (the data region is not read)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(4 << 20)
    g = parse_gguf(head, keep_data=False)
    g.data_size = size - (len(head) - g.data_size)
    return g


def encode_string(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


def encode_value(vtype: int, value) -> bytes:
    if vtype in GGUF_SCALAR:
        return struct.pack(GGUF_SCALAR[vtype], value)
    if vtype == T_STRING:
        return encode_string(value)
    atype, items = value
    return struct.pack("<IQ", atype, len(items)) + b"".join(encode_value(atype, v) for v in items)


def kv_blob(key: bytes, vtype: int, value) -> Blob:
    raw = encode_string(key) + struct.pack("<I", vtype) + encode_value(vtype, value)
    fields: list = []
    r = _Reader(raw)
    r.string(fields, 0, "key")
    fields.append((r.pos, "<I", "type"))
    r.take("<I")
    _read_value(r, vtype, fields, 0, key.decode(errors="replace"))
    return Blob(raw, fields, key.decode(errors="replace"))


def decode_kv(blob: Blob):
    r = _Reader(blob.raw)
    key = r.string([], 0, "key")
    vtype = r.take("<I")
    return key, vtype, _read_value(r, vtype, [], 0, "v")


def tensor_blob(name: bytes, ne: list, ggml_type: int, offset: int) -> Blob:
    raw = encode_string(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", v & (2**64 - 1)) for v in ne)
    raw += struct.pack("<IQ", ggml_type & 0xFFFFFFFF, offset & (2**64 - 1))
    fields = [(0, "<Q", "name.len"), (len(name) + 8, "<I", "n_dims")]
    fields += [(len(name) + 12 + 8 * d, "<Q", f"ne[{d}]") for d in range(len(ne))]
    fields += [(len(raw) - 12, "<I", "ggml_type"), (len(raw) - 8, "<Q", "offset")]
    return Blob(raw, fields, name.decode(errors="replace"))


def decode_tensor(blob: Blob):
    r = _Reader(blob.raw)
    name = r.string([], 0, "name")
    n_dims = r.take("<I")
    ne = [r.take("<Q") for _ in range(n_dims)]
    return name, ne, r.take("<I"), r.take("<Q")


def serialize(g: GGUF, counts: tuple | None = None) -> bytes:
    """Header bytes, padded to the alignment (tensor offsets stay relative to the data start)."""
    n_tensors, n_kv = counts or (len(g.tensors), len(g.kvs))
    head = g.prefix.raw[:8] + struct.pack("<QQ", n_tensors, n_kv)
    head += b"".join(b.raw for b in g.kvs) + b"".join(b.raw for b in g.tensors)
    align = g.alignment if isinstance(g.alignment, int) and 0 < g.alignment < 1 << 16 else 32
    return head + b"\0" * (-len(head) % align)


# ---------------------------------------------------------------------------------------------
# Interesting values


def interesting_int(rng: random.Random, fmt: str, current: int | None = None) -> int:
    bits = struct.calcsize(fmt) * 8
    signed = fmt[-1].islower()
    top = 2 ** (bits - 1) if signed else 2**bits
    cands = [0, 1, 2, 3, 7, 8, 16, 31, 32, 33, 63, 64, 255, 256, 1023, 4096, 65535, 65536, 2**24, 2**31 - 1, 2**31,
             2**32 - 1, 2**32, 2**40, 2**48, 2**62, 2**63 - 1, 2**63, 2**64 - 1, -1, -2, -(2**31), -(2**63)]
    if current is not None:
        cands += [current + 1, current - 1, current * 2, current // 2, current + 32, current * 1000, -current]
    v = rng.choice(cands)
    lo, hi = (-top, top - 1) if signed else (0, top - 1)
    if not lo <= v <= hi:
        v = v % (2**bits)
        if signed and v >= top:
            v -= 2**bits
    return v


def interesting_float(rng: random.Random, current: float | None = None) -> float:
    cands = [0.0, -0.0, 1.0, -1.0, 0.5, 1e-30, 1e30, -1e30, 3.4e38, 1e-45, float("nan"), float("inf"), float("-inf"), 65504.0]
    if current is not None and math.isfinite(current):
        cands += [current * 2, -current, current / 1000, current * 1e6]
    return rng.choice(cands)


def random_text(rng: random.Random, n: int) -> str:
    alphabets = ["abc xyz", "\u00e9\u4e2d\u0416\U0001f600", "\x00\n\t\r", "<|im_start|><|im_end|>{}[]'\"\\", "\ud800\udfff"]
    pool = "".join(rng.sample(alphabets, rng.randint(1, len(alphabets))))
    return "".join(rng.choice(pool) for _ in range(n))


def random_bytes_value(rng: random.Random) -> bytes:
    kind = rng.randrange(6)
    if kind == 0:
        return b""
    if kind == 1:
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 40)))  # invalid UTF-8 mostly
    if kind == 2:
        return b"x" * rng.choice([65, 256, 5000, 100000])
    if kind == 3:
        return rng.choice([b"llama", b"qwen2", b"clip", b"gpt2", b"mlp", b"lora", b"adapter", b"mmproj", b"none",
                           b"yarn", b"linear", b"smollm", b"ldp", b"resampler", b"\xff\xfe"])
    if kind == 4:
        return random_text(rng, rng.randint(1, 30)).encode("utf-8", "surrogatepass")
    return "{% for m in messages %}{{ m['content'] }}{% endfor %}{{ undefined_thing.x }}{% if".encode()


def random_value(rng: random.Random, vtype: int, depth: int = 0):
    if vtype in (6, 12):
        return interesting_float(rng)
    if vtype == 7:
        return rng.choice([0, 1, 2, 255])
    if vtype in GGUF_SCALAR:
        return interesting_int(rng, GGUF_SCALAR[vtype])
    if vtype == T_STRING:
        return random_bytes_value(rng)
    atype = rng.choice([t for t in ALL_TYPES if t != T_ARRAY])
    n = rng.choice([0, 1, 2, 3, 8, 64])
    return (atype, [random_value(rng, atype, 1) for _ in range(n)])


# ---------------------------------------------------------------------------------------------
# GGUF mutation

# keys the loaders read, to add to a file that lacks them (cmx's loader, llama.cpp's vocab, clip)
EXTRA_KEYS = [
    "{a}.context_length", "{a}.embedding_length", "{a}.feed_forward_length", "{a}.block_count",
    "{a}.attention.head_count", "{a}.attention.head_count_kv", "{a}.attention.key_length",
    "{a}.attention.value_length", "{a}.attention.layer_norm_rms_epsilon", "{a}.rope.dimension_count",
    "{a}.rope.freq_base", "{a}.rope.scaling.type", "{a}.rope.scaling.factor", "{a}.rope.scale_linear",
    "{a}.rope.scaling.original_context_length", "{a}.rope.scaling.yarn_ext_factor", "{a}.rope.scaling.attn_factor",
    "{a}.vocab_size", "general.alignment", "general.architecture", "general.file_type", "general.type",
    "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.padding_token_id", "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.add_bos_token",
    "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.chat_template",
    "tokenizer.ggml.precompiled_charsmap", "tokenizer.ggml.add_space_prefix",
    "clip.projector_type", "clip.vision.projector_type", "clip.has_vision_encoder", "clip.has_audio_encoder",
    "clip.vision.image_size", "clip.vision.patch_size", "clip.vision.embedding_length",
    "clip.vision.feed_forward_length", "clip.vision.projection_dim", "clip.vision.attention.head_count",
    "clip.vision.attention.head_dim", "clip.vision.attention.layer_norm_epsilon", "clip.vision.block_count",
    "clip.vision.feature_layer", "clip.vision.image_mean", "clip.vision.image_std", "clip.use_gelu",
    "clip.use_silu", "clip.vision.image_grid_pinpoints", "clip.vision.spatial_merge_size",
    "clip.vision.projector.scale_factor", "adapter.type", "adapter.lora.alpha",
]
GGML_TYPES = list(range(0, 42)) + [2**31, 2**32 - 1]


def _arch(g: GGUF) -> str:
    for b in g.kvs:
        if b.name == "general.architecture":
            _, _, v = decode_kv(b)
            return v.decode(errors="replace") if isinstance(v, bytes) else "llama"
    return "llama"


def _pick_kv(rng: random.Random, g: GGUF) -> int:
    # the big tokenizer arrays are a few keys among many: pick them a fair share of the time
    return rng.randrange(len(g.kvs))


def _mutate_kv_value(rng: random.Random, g: GGUF, desc: list) -> None:
    i = _pick_kv(rng, g)
    key, vtype, value = decode_kv(g.kvs[i])
    r = rng.random()
    if r < 0.45 and vtype != T_ARRAY:  # same type, interesting value
        if vtype in (6, 12):
            new = interesting_float(rng, value)
        elif vtype == 7:
            new = rng.choice([0, 1, 2, 255])
        elif vtype in GGUF_SCALAR:
            new = interesting_int(rng, GGUF_SCALAR[vtype], value)
        else:
            new = random_bytes_value(rng)
        g.kvs[i] = kv_blob(key, vtype, new)
        desc.append(f"kv_value {key.decode(errors='replace')}")
    elif r < 0.75 and vtype == T_ARRAY:  # array elements or length
        atype, items = value
        items = list(items)
        op = rng.randrange(5)
        if op == 0 and items:
            del items[rng.randrange(len(items)) :]  # shorter
        elif op == 1:
            items += [random_value(rng, atype, 1) if atype != T_ARRAY else 0 for _ in range(rng.choice([1, 2, 100]))]
        elif op == 2 and len(items) > 1 and atype == T_STRING:
            a, b = rng.randrange(len(items)), rng.randrange(len(items))
            items[a] = items[b]  # a duplicate (a token twice in the vocabulary)
        elif items:
            for _ in range(rng.randint(1, 3)):
                j = rng.randrange(len(items))
                items[j] = random_value(rng, atype, 1) if atype != T_ARRAY else 0
        try:
            g.kvs[i] = kv_blob(key, vtype, (atype, items))
        except (struct.error, TypeError, ValueError):
            pass
        desc.append(f"kv_array {key.decode(errors='replace')} op{op}")
    else:  # another type
        new_type = rng.choice(ALL_TYPES)
        g.kvs[i] = kv_blob(key, new_type, random_value(rng, new_type))
        desc.append(f"kv_type {key.decode(errors='replace')} -> {new_type}")


def _mutate_kv_set(rng: random.Random, g: GGUF, desc: list) -> None:
    op = rng.randrange(4)
    if op == 0 and g.kvs:
        i = _pick_kv(rng, g)
        desc.append(f"kv_drop {g.kvs[i].name}")
        del g.kvs[i]
    elif op == 1 and g.kvs:
        i = _pick_kv(rng, g)
        desc.append(f"kv_dup {g.kvs[i].name}")
        g.kvs.insert(rng.randrange(len(g.kvs) + 1), g.kvs[i])
    elif op == 2:
        key = rng.choice(EXTRA_KEYS).format(a=_arch(g)).encode()
        vtype = rng.choice(ALL_TYPES + [4, 4, 5, 6, 8])
        g.kvs.insert(rng.randrange(len(g.kvs) + 1), kv_blob(key, vtype, random_value(rng, vtype)))
        desc.append(f"kv_add {key.decode()} type {vtype}")
    elif g.kvs:
        i = _pick_kv(rng, g)
        _, vtype, value = decode_kv(g.kvs[i])
        new_key = rng.choice([b"", g.kvs[rng.randrange(len(g.kvs))].name.encode(), random_bytes_value(rng)])
        desc.append(f"kv_rename {g.kvs[i].name} -> {new_key[:40]!r}")
        g.kvs[i] = kv_blob(new_key, vtype, value)


def _mutate_tensor(rng: random.Random, g: GGUF, desc: list) -> None:
    if not g.tensors:
        return
    i = rng.randrange(len(g.tensors))
    name, ne, gtype, offset = decode_tensor(g.tensors[i])
    op = rng.randrange(9)
    if op == 0:  # overlapping, misaligned, past the end, huge
        others = [decode_tensor(b)[3] for b in rng.sample(g.tensors, min(3, len(g.tensors)))]
        offset = rng.choice(others + [offset + 1, offset + 32, g.data_size, g.data_size - 32, g.data_size + 4096,
                                       2**63, 2**64 - 32, 2**40, 0])
    elif op == 1 and ne:  # a dimension
        d = rng.randrange(len(ne))
        ne[d] = rng.choice([0, 1, ne[d] + 1, ne[d] * 2, ne[d] // 2, 2**31, 2**32, 2**40, 2**62, 2**63, 2**64 - 1])
    elif op == 2:  # n_dims
        ne = ne[: rng.randrange(len(ne) + 1)] if rng.random() < 0.5 else ne + [rng.choice([1, 2, 3])] * rng.randint(1, 3)
    elif op == 3 and len(ne) > 1:
        rng.shuffle(ne)
    elif op == 4:
        gtype = rng.choice(GGML_TYPES)
    elif op == 5:
        other = decode_tensor(g.tensors[rng.randrange(len(g.tensors))])[0]
        name = rng.choice([other, b"", b"x" * 64, b"x" * 63, b"x" * 200, name + b"\0junk", random_bytes_value(rng)])
    elif op == 6:
        desc.append(f"tensor_drop {name.decode(errors='replace')}")
        del g.tensors[i]
        return
    elif op == 7:
        desc.append(f"tensor_dup {name.decode(errors='replace')}")
        g.tensors.insert(rng.randrange(len(g.tensors) + 1), g.tensors[i])
        return
    else:  # a shape of another tensor (type kept): a fitting size, the wrong layout
        ne = list(decode_tensor(g.tensors[rng.randrange(len(g.tensors))])[1])
    g.tensors[i] = tensor_blob(name, ne, gtype, offset)
    desc.append(f"tensor op{op} {g.tensors[i].name}")


def _byte_ops(rng: random.Random, head: bytearray, g: GGUF, desc: list) -> bytearray:
    """Bit flips, field overwrites and splices on serialized header bytes."""
    op = rng.randrange(4)
    if op == 0:  # bit flips anywhere in the header
        for _ in range(rng.choice([1, 1, 2, 4, 8])):
            p = rng.randrange(len(head))
            head[p] ^= 1 << rng.randrange(8)
        desc.append("flip")
        return head
    if op == 1:  # an interesting value over a numeric field (counts, lengths, types, dims, offsets, values)
        blobs = [(0, g.prefix)]
        pos = 24
        for b in g.kvs + g.tensors:
            blobs.append((pos, b))
            pos += len(b.raw)
        weights = [1.0 if b.name != "prefix" else 5.0 for _, b in blobs]
        start, blob = rng.choices(blobs, weights)[0]
        if not blob.fields:
            return head
        rel, fmt, label = rng.choice(blob.fields if len(blob.fields) < 64 or rng.random() < 0.5 else blob.fields[:8])
        p = start + rel
        if p + struct.calcsize(fmt) > len(head):
            return head
        if fmt in ("<f", "<d"):
            struct.pack_into(fmt, head, p, interesting_float(rng))
        else:
            struct.pack_into(fmt, head, p, interesting_int(rng, fmt, struct.unpack_from(fmt, head, p)[0]))
        desc.append(f"field {blob.name}:{label}")
        return head
    if op == 2:  # insert or delete a few bytes (everything after shifts)
        p = rng.randrange(len(head))
        if rng.random() < 0.5:
            del head[p : p + rng.choice([1, 2, 4, 8, 64])]
        else:
            head[p:p] = bytes(rng.randrange(256) for _ in range(rng.choice([1, 4, 8])))
        desc.append("splice")
        return head
    p = rng.randrange(len(head))  # interesting byte values
    head[p] = rng.choice([0, 0xFF, 0x7F, 0x80, 0x01])
    desc.append("byte")
    return head


def gguf_mutate(rng: random.Random, base: GGUF, data_mutations: bool) -> tuple[bytes, int, list]:
    """A mutated file: (head bytes, total file length, description). Bytes past len(head) up to the
    total length are the original data (base.data) or zeros (hole)."""
    g = GGUF(base.prefix, list(base.kvs), list(base.tensors), base.alignment, base.data, base.data_size)
    desc: list = []
    n_ops = rng.choice([1, 1, 1, 2, 2, 3])
    structural = [_mutate_kv_value, _mutate_kv_value, _mutate_kv_set, _mutate_tensor, _mutate_tensor]
    late = []
    for _ in range(n_ops):
        r = rng.random()
        if r < 0.6:
            rng.choice(structural)(rng, g, desc)
        else:
            late.append(rng.random())
    counts = None
    if rng.random() < 0.05:  # counts that disagree with the lists
        counts = (interesting_int(rng, "<Q", len(g.tensors)), interesting_int(rng, "<Q", len(g.kvs)))
        desc.append(f"counts {counts}")
    head = bytearray(serialize(g, counts))
    total = len(head) + g.data_size
    for r in late:
        if r < 0.85 or not data_mutations:
            head = _byte_ops(rng, head, g, desc)
            total = len(head) + g.data_size
        else:
            desc.append("data")  # applied by the caller to the data bytes
    if rng.random() < 0.12:  # truncation: in the header, at its end, or in the data
        total = rng.choice([rng.randrange(max(1, len(head))), len(head), len(head) + rng.randrange(max(1, g.data_size)),
                            total - 1, rng.randrange(64)])
        desc.append(f"truncate {total}")
    return bytes(head), total, desc


def mutate_data(rng: random.Random, data: bytes, desc: list) -> bytes:
    """The tensor data region, with a few bytes overwritten when an op asked for it."""
    if "data" not in desc or not data:
        return data
    body = bytearray(data)
    for _ in range(rng.choice([1, 8, 64])):
        p = rng.randrange(len(body))
        body[p] = rng.choice([0, 0xFF, 0x7F, 0x80, rng.randrange(256)])
    return bytes(body)


def write_file(path: str, head: bytes, total: int, data: bytes | None) -> None:
    """head + data, cut or zero-extended to total bytes (a sparse hole where data is None)."""
    with open(path, "wb") as f:
        f.write(head[:total])
        if data is not None and total > len(head):
            f.write(data[: total - len(head)])
        f.truncate(total)


# ---------------------------------------------------------------------------------------------
# The tiny model (qwen2, byte-level BPE vocabulary of 269 tokens)

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _byte_unicode() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values (byte-level BPE)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def write_tiny_model(path: str) -> str:
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    rng = np.random.default_rng(1234)
    merges = [("Ġ", "t"), ("h", "e"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("Ġt", "he"), ("o", "n"), ("r", "e"), ("a", "t"), ("e", "n")]
    tokens = _byte_unicode() + [a + b for a, b in merges] + ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    n_vocab, E, F, n_head, n_kv, n_layer = len(tokens), 32, 64, 4, 2, 2
    D = E // n_head
    w = GGUFWriter(path, "qwen2")
    w.add_name("cmx-fuzz-tiny")
    w.add_file_type(7)
    w.add_context_length(256)
    w.add_embedding_length(E)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(F)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(D)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (n_vocab - 3) + [3, 3, 3])
    w.add_token_merges([f"{a} {b}" for a, b in merges])
    w.add_bos_token_id(n_vocab - 3)
    w.add_eos_token_id(n_vocab - 1)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)

    def mat(rows, cols, qtype=GGMLQuantizationType.Q8_0):
        m = (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)
        if qtype == GGMLQuantizationType.F32:
            return m, qtype
        if qtype == GGMLQuantizationType.F16:
            return m.astype(np.float16), qtype
        return quantize(m, qtype), qtype

    def vec(n, mean=0.0):
        return (mean + 0.1 * rng.standard_normal(n)).astype(np.float32), GGMLQuantizationType.F32

    tensors = {"token_embd.weight": mat(n_vocab, E, GGMLQuantizationType.F16)}
    for il in range(n_layer):
        p = f"blk.{il}."
        tensors[p + "attn_norm.weight"] = vec(E, 1.0)
        tensors[p + "attn_q.weight"] = mat(E, E)
        tensors[p + "attn_k.weight"] = mat(D * n_kv, E)
        tensors[p + "attn_v.weight"] = mat(D * n_kv, E, GGMLQuantizationType.F32)
        tensors[p + "attn_q.bias"] = vec(E)
        tensors[p + "attn_k.bias"] = vec(D * n_kv)
        tensors[p + "attn_v.bias"] = vec(D * n_kv)
        tensors[p + "attn_output.weight"] = mat(E, E)
        tensors[p + "ffn_norm.weight"] = vec(E, 1.0)
        tensors[p + "ffn_gate.weight"] = mat(F, E)
        tensors[p + "ffn_up.weight"] = mat(F, E)
        tensors[p + "ffn_down.weight"] = mat(E, F)
    tensors["output_norm.weight"] = vec(E, 1.0)
    for name, (arr, qtype) in tensors.items():
        w.add_tensor(name, arr, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---------------------------------------------------------------------------------------------
# The profiled tiny model (cmx.* keys) and its mutations

PROFILE_RHO = 0.2  # the profile's rho: a case's Sparsity asks for it, so that the tables are used
PROFILE_SHORT = 4  # short_prompt_tokens: a 2-token prompt takes the stored table, 12 tokens thresholds


def write_profiled_tiny(src: str, path: str) -> str:
    """src (the tiny model) with a profile as cmx-profile writes it: seeded tables of the right
    shapes (no calibration run: what is fuzzed is the reading of the keys, not their values)."""
    import numpy as np

    from cmx.coreprofile import CoreProfile, write_profiled_gguf

    rng = np.random.default_rng(4321)
    n_layer, n_ff = 2, 64
    freq = rng.uniform(0.0, 1.0, (n_layer, n_ff)).astype(np.float32)
    order = np.stack([np.argsort(-f, kind="stable") for f in freq]).astype(np.int32)
    p = CoreProfile(n_layer=n_layer, n_ff=n_ff, rho=PROFILE_RHO, beta=0.4, frequency=freq, neuron_order=order,
                    tau=np.array([0.05, 0.08], np.float32), prune_layer=0, min_keep=0.25, max_keep=1.0,
                    short_prompt_tokens=PROFILE_SHORT, source="fuzz-tiny.gguf", calibration_kind="prompts",
                    calibration_prompts=8, calibration_tokens=200, date="2026-01-01T00:00:00Z",
                    measures='{"fuzz": true}')
    write_profiled_gguf(src, path, p)
    return path


PROFILE_ARRAYS = ("cmx.tau", "cmx.core_frequency", "cmx.neuron_order")
NUMERIC_TYPES = [t for t in GGUF_SCALAR if t != 7]


def _cmx_indices(g: GGUF) -> list[int]:
    return [i for i, b in enumerate(g.kvs) if b.name.startswith("cmx.")]


def _find_kv(g: GGUF, key: str) -> int | None:
    return next((i for i, b in enumerate(g.kvs) if b.name == key), None)


def _kv_value(g: GGUF, key: str):
    i = _find_kv(g, key)
    return None if i is None else decode_kv(g.kvs[i])[2]


def _set_kv(g: GGUF, key: str, vtype: int, value) -> None:
    try:
        blob = kv_blob(key.encode(), vtype, value)
    except (struct.error, TypeError, ValueError, OverflowError):
        return
    i = _find_kv(g, key)
    if i is None:
        g.kvs.append(blob)
    else:
        g.kvs[i] = blob


def _fits(vtype: int, v) -> bool:
    try:
        struct.pack(GGUF_SCALAR[vtype], v)
        return True
    except (struct.error, TypeError, OverflowError):
        return False


def _profile_array(rng: random.Random, g: GGUF, desc: list, n_layer: int, n_ff: int) -> None:
    """An array key's elements, length or element type."""
    key = rng.choice(PROFILE_ARRAYS)
    value = _kv_value(g, key)
    if not isinstance(value, tuple):
        return
    atype, items = value[0], list(value[1])
    op = rng.randrange(7)
    if op == 0:  # a wrong length: one short or long, a layer, empty, doubled, huge
        n = len(items)
        new_n = rng.choice([0, 1, n - 1, n + 1, n - n_ff, n + n_ff, n_layer, n_ff, 2 * n, 100000])
        items = (items * (new_n // max(1, n) + 1))[:new_n] if items else [0] * new_n
        desc.append(f"{key} length {n} -> {new_n}")
    elif op == 1 and key == "cmx.neuron_order":  # out-of-range or repeated indices
        j = rng.randrange(len(items)) if items else 0
        if items and rng.random() < 0.5:
            layer = j // n_ff
            k = layer * n_ff + rng.randrange(n_ff)
            items[j] = items[k]
            desc.append(f"{key}[{j}] = [{k}] (repeated)")
        elif items:
            items[j] = rng.choice([n_ff, n_ff + 1, -1, 2**31 - 1, -(2**31), 1000, n_ff * n_layer])
            desc.append(f"{key}[{j}] = {items[j]}")
    elif op == 2 and key == "cmx.neuron_order":  # a valid permutation of another kind, or one layer's twice
        if rng.random() < 0.5 and len(items) >= 2 * n_ff:
            items[n_ff : 2 * n_ff] = items[:n_ff]  # layer 1 = layer 0 (valid)
            desc.append(f"{key} layer 1 = layer 0")
        elif items:
            layer = rng.randrange(max(1, len(items) // n_ff))
            seg = items[layer * n_ff : (layer + 1) * n_ff]
            rng.shuffle(seg)
            items[layer * n_ff : (layer + 1) * n_ff] = seg
            desc.append(f"{key} layer {layer} shuffled")
    elif op == 3:  # another element type (wider ints that wrap to valid int32 indices, floats, bools, strings)
        new_atype = rng.choice(NUMERIC_TYPES + [7, T_STRING])
        wrap = rng.random() < 0.5 and new_atype in (10, 11) and key == "cmx.neuron_order"
        if new_atype == T_STRING:
            items = [str(v).encode() for v in items]
        elif new_atype in (6, 12):
            items = [float(v) for v in items]
        elif new_atype == 7:
            items = [1 if v else 0 for v in items]
        else:
            items = [int(v) if isinstance(v, int) or (isinstance(v, float) and math.isfinite(v)) else 0 for v in items]
            if wrap:  # 2^32 + i: i once cut to int32
                items = [v + 2**32 for v in items]
            items = [v if _fits(new_atype, v) else interesting_int(rng, GGUF_SCALAR[new_atype]) for v in items]
        atype = new_atype
        desc.append(f"{key} element type -> {new_atype}" + (" (+2^32)" if wrap else ""))
    else:  # special values: one element or all
        if atype in (6, 12):
            v = rng.choice([float("nan"), float("inf"), float("-inf"), 0.0, -0.0, -1.0, 1.5, 3.4e38, -3.4e38, 1e-45, 1e30])
        elif atype in GGUF_SCALAR and atype != 7:
            v = interesting_int(rng, GGUF_SCALAR[atype])
        else:
            return
        if items and rng.random() < 0.6:
            j = rng.randrange(len(items))
            items[j] = v
            desc.append(f"{key}[{j}] = {v!r}")
        else:
            items = [v] * len(items)
            desc.append(f"{key}[:] = {v!r}")
    _set_kv(g, key, T_ARRAY, (atype, items))


SCALAR_KEYS = {  # key: stored type (as profile_keys writes it)
    "cmx.version": 4, "cmx.block_count": 4, "cmx.feed_forward_length": 4, "cmx.rho": 6, "cmx.beta": 6,
    "cmx.prune_layer": 4, "cmx.min_keep": 6, "cmx.max_keep": 6, "cmx.short_prompt_tokens": 4,
    "cmx.profile.calibration.prompts": 4, "cmx.profile.calibration.tokens": 10,
}


def _profile_scalar(rng: random.Random, g: GGUF, desc: list, n_layer: int, n_ff: int) -> None:
    key = rng.choice(list(SCALAR_KEYS) + ["cmx.version", "cmx.short_prompt_tokens", "cmx.prune_layer"])
    vtype = SCALAR_KEYS[key]
    if rng.random() < 0.3:  # the same value in another numeric type (u8, i64, f64, bool, ...)
        cur = _kv_value(g, key)
        vtype = rng.choice(NUMERIC_TYPES + [7])
        v = cur if cur is not None else 1
        v = float(v) if vtype in (6, 12) else (int(v) if not isinstance(v, float) or math.isfinite(v) else 0)
        if not _fits(vtype, v):
            v = interesting_int(rng, GGUF_SCALAR[vtype]) if vtype not in (6, 12) else interesting_float(rng)
        desc.append(f"{key} as type {vtype} = {v!r}")
    elif vtype in (6, 12):
        v = interesting_float(rng, _kv_value(g, key))
        desc.append(f"{key} = {v!r}")
    else:
        special = {"cmx.version": [0, 2, 99], "cmx.block_count": [0, 1, n_layer + 1],
                   "cmx.feed_forward_length": [0, 1, n_ff - 1, n_ff + 1], "cmx.prune_layer": [1, n_layer - 1, n_layer],
                   "cmx.short_prompt_tokens": [0, 1, 2, 3, 100, 2**31 - 1, 2**31]}
        cands = special.get(key, [])
        v = rng.choice(cands) if cands and rng.random() < 0.5 else interesting_int(rng, GGUF_SCALAR[vtype], _kv_value(g, key))
        if not _fits(vtype, v):
            v = interesting_int(rng, GGUF_SCALAR[vtype])
        desc.append(f"{key} = {v}")
    _set_kv(g, key, vtype, v)


def _profile_other_model(rng: random.Random, g: GGUF, desc: list, n_layer: int, n_ff: int) -> None:
    """A consistent profile of other sizes (another model's, or huge sizes with arrays to match the
    product where it is small)."""
    L = rng.choice([1, 2, 3, 4])
    F = rng.choice([1, 8, 32, 63, 64, 65, 128])
    vtype = 4
    if rng.random() < 0.2:  # huge; the last two as u64 whose product wraps to the arrays' 128 values mod 2^64
        L, F = rng.choice([(2**16, 2**16), (2**31, 2), (1, 2**32 - 1), (2**32 - 1, 2**32 - 1), (2**63 + 64, 2), (2**62 + 32, 4)])
        vtype = 10 if max(L, F) >= 2**32 else 4
    _set_kv(g, "cmx.block_count", vtype, L)
    _set_kv(g, "cmx.feed_forward_length", vtype, F)
    if L * F <= 1 << 16:
        order = []
        for _ in range(L):
            perm = list(range(F))
            rng.shuffle(perm)
            order += perm
        _set_kv(g, "cmx.neuron_order", T_ARRAY, (5, order))
        _set_kv(g, "cmx.core_frequency", T_ARRAY, (6, [rng.random() for _ in range(L * F)]))
        _set_kv(g, "cmx.tau", T_ARRAY, (6, [0.05] * L))
        if rng.random() < 0.5:
            _set_kv(g, "cmx.prune_layer", 4, max(0, L - 2))
    desc.append(f"sizes {L} x {F}")


def _profile_keyset(rng: random.Random, g: GGUF, desc: list, n_layer: int, n_ff: int) -> None:
    idx = _cmx_indices(g)
    if not idx:
        return
    i = rng.choice(idx)
    key, vtype, value = decode_kv(g.kvs[i])
    op = rng.randrange(5)
    if op == 0:  # missing
        desc.append(f"drop {g.kvs[i].name}")
        del g.kvs[i]
    elif op == 1:  # twice (the same value, or another type)
        other = g.kvs[i]
        if rng.random() < 0.5:
            t = rng.choice(ALL_TYPES)
            other = kv_blob(key, t, random_value(rng, t))
        g.kvs.insert(rng.randrange(len(g.kvs) + 1), other)
        desc.append(f"dup {g.kvs[i].name}")
    elif op == 2:  # another type altogether (a scalar for an array, an array for a scalar, a string)
        t = rng.choice(ALL_TYPES)
        g.kvs[i] = kv_blob(key, t, random_value(rng, t))
        desc.append(f"type {key.decode()} -> {t}")
    elif op == 3:  # renamed: to another cmx key (one twice, one missing), or a near miss
        new = rng.choice([g.kvs[rng.choice(idx)].name.encode(), key + b"x", key.upper(), b"cmx.", b"cmx", key[:-1]])
        g.kvs[i] = kv_blob(new, vtype, value)
        desc.append(f"rename {key.decode()} -> {new.decode(errors='replace')}")
    else:  # an unknown cmx.* key (a newer writer's)
        t = rng.choice(ALL_TYPES)
        g.kvs.insert(rng.randrange(len(g.kvs) + 1), kv_blob(b"cmx.future_table", t, random_value(rng, t)))
        desc.append(f"add cmx.future_table type {t}")


def _profile_bytes(rng: random.Random, head: bytearray, g: GGUF, desc: list) -> None:
    """An interesting value over a numeric field of a cmx.* key (array counts, string lengths,
    types) or a bit flip inside the cmx.* keys: the file no longer parses as written."""
    pos, spans = 24, []
    for b in g.kvs:
        if b.name.startswith("cmx."):
            spans.append((pos, b))
        pos += len(b.raw)
    if not spans:
        return
    start, blob = rng.choice(spans)
    if rng.random() < 0.75:
        fields = [f for f in blob.fields if not f[2].endswith("[]")] or blob.fields
        rel, fmt, label = rng.choice(fields)
        if fmt in ("<f", "<d"):
            struct.pack_into(fmt, head, start + rel, interesting_float(rng))
        else:
            struct.pack_into(fmt, head, start + rel, interesting_int(rng, fmt, struct.unpack_from(fmt, head, start + rel)[0]))
        desc.append(f"field {blob.name}:{label}")
    else:
        p = start + rng.randrange(len(blob.raw))
        head[p] ^= 1 << rng.randrange(8)
        desc.append(f"flip in {blob.name}")


def profile_mutate(rng: random.Random, base: GGUF, n_layer: int = 2, n_ff: int = 64) -> tuple[bytes, int, list]:
    """A mutated profiled tiny model: (head, total length, description); its cmx.* keys only (the
    rest of the file is the tiny kind's business). The data after head is base.data."""
    g = GGUF(base.prefix, list(base.kvs), list(base.tensors), base.alignment, base.data, base.data_size)
    desc: list = []
    ops = [_profile_array, _profile_array, _profile_array, _profile_scalar, _profile_scalar, _profile_keyset,
           _profile_other_model]
    late = 0
    for _ in range(rng.choice([1, 1, 1, 2, 2, 3])):
        if rng.random() < 0.85:
            rng.choice(ops)(rng, g, desc, n_layer, n_ff)
        else:
            late += 1
    head = bytearray(serialize(g))
    for _ in range(late):
        _profile_bytes(rng, head, g, desc)
    total = len(head) + g.data_size
    if rng.random() < 0.08:  # truncated: in the cmx.* keys (the last keys), at the header's end, in the data
        first = 24 + sum(len(b.raw) for b in g.kvs[: (_cmx_indices(g) or [0])[0]])
        total = rng.choice([rng.randrange(first, max(first + 1, len(head))), len(head),
                            len(head) + rng.randrange(max(1, g.data_size))])
        desc.append(f"truncate {total}")
    return bytes(head), total, desc


# ---------------------------------------------------------------------------------------------
# Images


def base_images() -> dict[str, list[tuple[str, bytes]]]:
    """Encodings per format: (name, bytes), deterministic."""
    from PIL import Image

    from cmx.scenes import make_scene

    scene = make_scene(11).image  # a scene with several objects
    small = scene.resize((48, 48))
    tall = scene.resize((3, 120))
    wide = scene.resize((160, 2))
    one = scene.resize((1, 1))

    def enc(img, fmt, **kw) -> bytes:
        b = io.BytesIO()
        img.save(b, fmt, **kw)
        return b.getvalue()

    rgba = small.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(small.size))
    frames = [small, small.rotate(90), small.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90
    i16 = Image.fromarray((__import__("numpy").asarray(small.convert("L"), dtype="uint16") * 257)).convert("I;16")
    return {
        "png": [("rgb", enc(small, "PNG")), ("rgba", enc(rgba, "PNG")), ("palette", enc(small.convert("P"), "PNG", transparency=0)),
                ("gray16", enc(i16, "PNG")), ("tall", enc(tall, "PNG")), ("wide", enc(wide, "PNG")), ("one", enc(one, "PNG")),
                ("scene336", enc(scene, "PNG"))],
        "jpeg": [("baseline", enc(small, "JPEG", quality=80)), ("progressive", enc(small, "JPEG", progressive=True)),
                 ("gray", enc(small.convert("L"), "JPEG")), ("cmyk", enc(small.convert("CMYK"), "JPEG")),
                 ("exif", enc(small, "JPEG", exif=exif)), ("tall", enc(tall, "JPEG")), ("scene336", enc(scene, "JPEG", quality=60))],
        "gif": [("still", enc(small, "GIF")), ("animated", enc(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)),
                ("transparent", enc(small.convert("P"), "GIF", transparency=3)), ("wide", enc(wide, "GIF"))],
        "webp": [("lossy", enc(small, "WEBP", quality=70)), ("lossless", enc(small, "WEBP", lossless=True)),
                 ("alpha", enc(rgba, "WEBP")), ("animated", enc(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=50)),
                 ("tall", enc(tall, "WEBP"))],
    }


def _png_fix_crcs(data: bytearray) -> None:
    import zlib

    p = 8
    while p + 12 <= len(data):
        n = struct.unpack_from(">I", data, p)[0]
        if p + 12 + n > len(data):
            return
        struct.pack_into(">I", data, p + 8 + n, zlib.crc32(bytes(data[p + 4 : p + 8 + n])) & 0xFFFFFFFF)
        p += 12 + n


def _int_positions(data: bytes, fmt: str) -> list[int]:
    """Where the image format keeps sizes and lengths (header fields worth hitting)."""
    if fmt == "png":
        out, p = [16, 20, 24, 25], 8  # IHDR width, height, bit depth, colour type
        while p + 12 <= len(data) and len(out) < 40:
            out.append(p)  # chunk length
            p += 12 + struct.unpack_from(">I", data, p)[0]
        return out
    if fmt == "jpeg":
        out = []
        for p in range(2, len(data) - 8):
            if data[p] == 0xFF and data[p + 1] not in (0, 0xFF) and len(out) < 40:
                out += [p + 2, p + 5, p + 7]  # segment length, SOF height/width
        return out
    if fmt == "gif":
        return [6, 8, 10, 13] + [p + 5 for p in range(13, len(data) - 10) if data[p] == 0x2C][:10]
    return [4, 16, 20, 24, 26, 28]  # webp: RIFF size, chunk size, VP8/VP8L dims


def image_mutate(rng: random.Random, fmt: str, bases: list) -> tuple[bytes, list]:
    name, data = rng.choice(bases)
    data = bytearray(data)
    desc = [f"base {name}"]
    for _ in range(rng.choice([1, 1, 2, 3])):
        op = rng.randrange(6)
        if op == 0:
            for _ in range(rng.choice([1, 2, 4, 16])):
                p = rng.randrange(len(data))
                data[p] ^= 1 << rng.randrange(8)
            desc.append("flip")
        elif op == 1:  # a size or length field
            positions = [p for p in _int_positions(bytes(data), fmt) if p + 4 <= len(data)]
            if positions:
                p = rng.choice(positions)
                width = rng.choice([1, 2, 4])
                v = rng.choice([0, 1, 2**width * 8 - 1, 0x7F, 0x80, 0xFF, 0xFFFF, 0x7FFF, 0x10000, 0xFFFFFFFF, 0x7FFFFFFF])
                data[p : p + width] = (v % (2 ** (8 * width))).to_bytes(width, rng.choice(["big", "little"]))
                desc.append(f"field@{p}")
        elif op == 2:
            p = rng.randrange(len(data))
            data[p] = rng.choice([0, 0xFF, 0x7F, 0x80])
            desc.append("byte")
        elif op == 3:  # truncate
            cut = rng.randrange(len(data))
            del data[cut:]
            desc.append(f"truncate {cut}")
        elif op == 4:  # insert or delete
            p = rng.randrange(len(data) + 1)
            if rng.random() < 0.5:
                del data[p : p + rng.choice([1, 4, 32])]
            else:
                data[p:p] = bytes(rng.randrange(256) for _ in range(rng.choice([1, 4, 32])))
            desc.append("splice")
        else:  # duplicate a slice (repeated chunks, frames)
            a = rng.randrange(len(data))
            b = min(len(data), a + rng.choice([8, 64, 512]))
            data[b:b] = data[a:b] * rng.choice([1, 2, 50])
            desc.append("repeat")
        if not data:
            break
    if fmt == "png" and rng.random() < 0.8:
        _png_fix_crcs(data)
    return bytes(data), desc


# ---------------------------------------------------------------------------------------------
# Chat messages


class _Weird:
    def __str__(self):
        return "weird object"

    def __repr__(self):  # no address: a case's repr is part of its digest
        return "_Weird()"


def _garbage(rng: random.Random, depth: int):
    kinds = ["none", "int", "float", "str", "bytes", "list", "dict", "tuple", "bool", "set", "obj", "hugestr", "nan"]
    k = rng.choice(kinds if depth < 3 else kinds[:5])
    if k == "none":
        return None
    if k == "int":
        return rng.choice([0, -1, 2**31, 2**63, 10**30])
    if k == "float":
        return rng.choice([0.5, -1.0, 1e308])
    if k == "nan":
        return float("nan")
    if k == "str":
        return random_text(rng, rng.randint(0, 20))
    if k == "bytes":
        return random_bytes_value(rng)[:100]
    if k == "bool":
        return rng.choice([True, False])
    if k == "set":
        return {1, 2}
    if k == "obj":
        return _Weird()
    if k == "hugestr":
        return "word " * rng.choice([1000, 20000])
    if k == "list":
        return [_garbage(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if k == "tuple":
        return tuple(_garbage(rng, depth + 1) for _ in range(rng.randint(0, 3)))
    return {rng.choice(["role", "content", "type", "text", "image_url", "url", "image", 1, None]): _garbage(rng, depth + 1)
            for _ in range(rng.randint(0, 3))}


def _part(rng: random.Random):
    r = rng.random()
    if r < 0.4:
        return {"type": "text", "text": rng.choice([random_text(rng, rng.randint(0, 12)), _garbage(rng, 2)])}
    if r < 0.5:
        return random_text(rng, 5)
    if r < 0.65:
        return {"type": "image_url", "image_url": rng.choice([{"url": "x.png"}, "data:image/png;base64,AAAA", None, 5, {"url": None}, [1]])}
    if r < 0.7:
        return {"type": "image", "image": _garbage(rng, 2)}
    return _garbage(rng, 1)


def _message(rng: random.Random):
    r = rng.random()
    if r < 0.5:  # well-formed
        content = random_text(rng, rng.randint(0, 10)) if rng.random() < 0.6 else [_part(rng) for _ in range(rng.randint(0, 3))]
        return {"role": rng.choice(["user", "user", "assistant", "system", "tool", ""]), "content": content}
    if r < 0.8:  # one field wrong
        msg = {"role": rng.choice(["user", _garbage(rng, 2)]), "content": _garbage(rng, 1)}
        if rng.random() < 0.3:
            del msg[rng.choice(["role", "content"])]
        if rng.random() < 0.2:
            msg[rng.choice(["name", "tool_calls", "extra"])] = _garbage(rng, 2)
        return msg
    return _garbage(rng, 1)


def chat_case(rng: random.Random) -> tuple:
    """(messages, call options) for Model.chat."""
    r = rng.random()
    if r < 0.1:
        messages = _garbage(rng, 0)
    elif r < 0.15:
        messages = rng.choice([[], (), "hello", {"role": "user", "content": "hi"}, iter([{"role": "user", "content": "x"}])])
    else:
        messages = [_message(rng) for _ in range(rng.choice([1, 1, 2, 3, 6]))]
    opts = {"max_tokens": rng.choice([1, 2, 3])}
    if rng.random() < 0.3:
        key = rng.choice(["max_tokens", "temperature", "top_k", "top_p", "seed", "stream", "sparsity"])
        opts[key] = rng.choice([None, -1, 0, 2**63, float("nan"), float("inf"), "1", True, [], 0.5, 10**9])
        if key == "max_tokens" and isinstance(opts[key], int) and not isinstance(opts[key], bool) and opts[key] > 3:
            opts[key] = 3  # a long answer costs time, not coverage (n_ctx bounds it anyway)
    if rng.random() < 0.2:
        opts["stream"] = True
    return messages, opts


# ---------------------------------------------------------------------------------------------
# Cases


@dataclasses.dataclass
class Case:
    kind: str
    index: int
    desc: list
    head: bytes = b""  # GGUF kinds: header bytes; image kinds: the whole file
    total: int = 0
    data: bytes | None = None  # GGUF kinds: the bytes after head (None: zeros)
    chat: tuple | None = None
    source_mode: str = "bytes"  # image kinds: how load_image receives the image

    def file_bytes(self) -> bytes:
        """The whole file (head, then data or zeros, cut or zero-extended to total)."""
        out = (self.head + bytes(self.data or b""))[: self.total]
        return out + b"\0" * (self.total - len(out))

    def digest(self) -> str:
        h = hashlib.sha256(self.kind.encode())
        if self.chat is not None:
            h.update(re.sub(r" at 0x[0-9a-f]+", "", repr(self.chat)).encode())  # no addresses
        else:
            h.update(self.head)
            h.update(str(self.total).encode())
            h.update(self.data or b"")
        return h.hexdigest()


class Inputs:
    """The unmutated inputs, loaded once per process."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self._cache: dict = {}

    def get(self, name: str):
        if name not in self._cache:
            self._cache[name] = getattr(self, "_" + name)()
        return self._cache[name]

    def _smollm2(self) -> GGUF:
        return read_gguf_header(smollm2_path())

    def _tiny_path(self) -> str:
        path = os.path.join(self.workdir, "fuzz-tiny.gguf")
        if not os.path.exists(path):
            tmp = f"{path}.{os.getpid()}.tmp"
            write_tiny_model(tmp)
            os.replace(tmp, path)
        return path

    def _tiny(self) -> GGUF:
        with open(self.get("tiny_path"), "rb") as f:
            return parse_gguf(f.read())

    def _profile_path(self) -> str:
        path = os.path.join(self.workdir, "fuzz-tiny-profiled.gguf")
        if not os.path.exists(path):
            tmp = f"{path}.{os.getpid()}.tmp"
            write_profiled_tiny(self.get("tiny_path"), tmp)
            os.replace(tmp, path)
        return path

    def _profile(self) -> GGUF:
        with open(self.get("profile_path"), "rb") as f:
            return parse_gguf(f.read())

    def _mmproj(self) -> GGUF:
        with open(MMPROJ, "rb") as f:
            return parse_gguf(f.read())

    def _lora(self) -> GGUF:
        with open(LORA, "rb") as f:
            return parse_gguf(f.read())

    def _images(self) -> dict:
        return base_images()


def make_case(kind: str, index: int, seed: int, inputs: Inputs) -> Case:
    rng = random.Random(f"{seed}/{kind}/{index}")
    if kind in ("smollm2", "tiny", "mmproj", "lora"):
        base = inputs.get(kind)
        head, total, desc = gguf_mutate(rng, base, data_mutations=kind != "smollm2")
        if kind == "smollm2":
            return Case(kind, index, desc, head, total, None)
        return Case(kind, index, desc, head, total, mutate_data(rng, base.data, desc))
    if kind == "profile":
        base = inputs.get(kind)
        head, total, desc = profile_mutate(rng, base)
        return Case(kind, index, desc, head, total, base.data)
    if kind in ("png", "jpeg", "gif", "webp"):
        data, desc = image_mutate(rng, kind, inputs.get("images")[kind])
        mode = rng.choice(["bytes", "bytes", "data_url", "path", "file_url"])
        return Case(kind, index, desc, data, len(data), None, source_mode=mode)
    if kind == "chat":
        return Case(kind, index, ["chat"], chat=chat_case(rng))
    raise ValueError(f"unknown kind {kind!r}")


# ---------------------------------------------------------------------------------------------
# Running a case (in a worker or a --one child)


def scratch_dirs(workdir: str, pid: int) -> tuple[str, str]:
    """Where the child `pid` writes its case files: tmpfs, and the workdir for SmolLM2's sparse
    file (reading its hole through a mapping costs half what it does on tmpfs: 85 vs 160 ms for a
    two-token decode)."""
    return os.path.join(SCRATCH or workdir, f"cmx-fuzz-{pid}"), os.path.join(workdir, f"scratch-{pid}")


def remove_scratch(workdir: str, pid: int) -> None:
    """A child's case files, once it is gone (a crashed or killed one could not remove them)."""
    import shutil

    for d in scratch_dirs(workdir, pid):
        shutil.rmtree(d, ignore_errors=True)


class Runner:
    def __init__(self, workdir: str, seed: int):
        self.workdir, self.seed = workdir, seed
        self.inputs = Inputs(workdir)
        self.scratch, self.scratch_disk = scratch_dirs(workdir, os.getpid())
        for d in (self.scratch, self.scratch_disk):
            os.makedirs(d, exist_ok=True)
        self._vocab = self._vision = self._chat_model = None

    def close(self) -> None:
        remove_scratch(self.workdir, os.getpid())

    # shared, lazily built objects
    def vocab(self):
        if self._vocab is None:
            from cmx.vocab import Vocab

            self._vocab = Vocab(smollm2_path())
        return self._vocab

    def vision(self):
        if self._vision is None:
            from cmx.vision import VisionEncoder

            self._vision = VisionEncoder(MMPROJ, self.vocab(), 576, 1)
        return self._vision

    def chat_model(self):
        if self._chat_model is None:
            import cmx

            self._chat_model = cmx.Model(smollm2_path(), n_ctx=64, n_threads=1)
        return self._chat_model

    def run(self, case: Case) -> None:
        getattr(self, "_run_" + ("image" if case.kind in ("png", "jpeg", "gif", "webp") else case.kind))(case)

    def _path(self, case: Case, ext: str) -> str:
        path = os.path.join(self.scratch_disk if case.data is None else self.scratch, f"case.{ext}")
        write_file(path, case.head, case.total, case.data)
        return path

    def _exercise_text_model(self, m, generate: bool) -> None:
        tokens = m.tokenize("The cat", add_special=True)[:2] or [0]
        m.logits(tokens)
        if generate:
            list(m.generate(tokens, max_tokens=2))
        m.detokenize(tokens)
        m.chat([{"role": "user", "content": "Hi"}], max_tokens=2)

    def _run_smollm2(self, case: Case) -> None:
        import cmx

        m = cmx.Model(self._path(case, "gguf"), n_ctx=8, n_threads=1)
        try:
            self._exercise_text_model(m, generate=False)
        except ValueError as e:
            if "prompt too long" not in str(e):
                raise

    def _run_tiny(self, case: Case) -> None:
        import cmx

        # every other case with CoreMatching on (core neurons gather the file's FFN rows)
        sparsity = cmx.Sparsity(rho=0.5, dense_layers=[]) if case.index % 2 else None
        m = cmx.Model(self._path(case, "gguf"), n_ctx=64, n_threads=1, sparsity=sparsity)
        self._exercise_text_model(m, generate=True)

    def _run_profile(self, case: Case) -> None:
        import cmx

        # CoreMatching on in every layer, at the profile's rho: the stored tables are used
        sparsity = cmx.Sparsity(rho=PROFILE_RHO, dense_layers=[])
        m = cmx.Model(self._path(case, "gguf"), n_ctx=64, n_threads=1, sparsity=sparsity)
        m.info  # noqa: B018  (reports the profile)
        list(m.generate(m.tokenize("Hi", add_special=False)[:2] or [0], max_tokens=2))  # shorter than the cutoff: the table
        list(m.generate(list(range(40, 52)), max_tokens=2))  # longer: thresholds

    def _run_lora(self, case: Case) -> None:
        import numpy as np

        from cmx import _lib  # noqa: F401  (ggml before cmx._core)
        from cmx._core import Engine

        e = Engine(smollm2_path(), n_ctx=8, n_batch=8, n_threads=1, lora=self._path(case, "gguf"), lora_scale=1.0)
        e.decode(np.array([1, 2], np.int32), np.array([0, 1], np.int32), np.array([1], np.int32))

    def _run_mmproj(self, case: Case) -> None:
        from cmx.images import load_image
        from cmx.vision import VisionEncoder

        path = self._path(case, "gguf")
        enc = VisionEncoder(path, self.vocab(), 576, 1)
        try:
            image = load_image(self.inputs.get("images")["png"][0][1])
            prompt = enc.tokenize(enc.marker, [image])
            prompt.close()
            _mtmd_warmup(path, self.vocab())
            if case.index % ENCODE_EVERY == 0:
                enc.encode_image(image)
        finally:
            enc.close()

    def _run_image(self, case: Case) -> None:
        from cmx.images import load_image

        data = case.head
        if case.source_mode == "bytes":
            src = data
        elif case.source_mode == "data_url":
            src = f"data:image/{case.kind};base64," + base64.b64encode(data).decode()
        else:
            path = os.path.join(self.scratch, f"image.{case.kind}")
            with open(path, "wb") as f:
                f.write(data)
            src = path if case.source_mode == "path" else "file://" + path
        image = load_image(src)
        enc = self.vision()
        enc.tokenize(enc.marker, [image]).close()

    def _run_chat(self, case: Case) -> None:
        messages, opts = case.chat
        m = self.chat_model()
        out = m.chat(messages, **opts)
        if opts.get("stream"):
            for _ in out:
                pass


def _mtmd_warmup(path: str, vocab) -> None:
    """Builds the encoder graph of an mmproj at its image size and reserves its memory, without
    computing (mtmd's warmup): what the first encode would build."""
    import llama_cpp
    from llama_cpp import mtmd_cpp

    params = mtmd_cpp.mtmd_context_params_default()
    params.use_gpu = False
    params.print_timings = False
    params.warmup = True
    params.n_threads = 1
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    ctx = mtmd_cpp.mtmd_init_from_file(path.encode(), vocab.llama_model, params)
    if not ctx:
        raise ValueError("mtmd could not load the mmproj with warmup")
    mtmd_cpp.mtmd_free(ctx)


def outcome_of(runner: Runner, case: Case) -> dict:
    t0 = time.perf_counter()
    try:
        runner.run(case)
        outcome, exc, msg = "ok", None, ""
    except ACCEPTED as e:
        outcome, exc, msg = f"error:{type(e).__name__}", type(e).__name__, str(e)
    except Exception as e:  # an exception we do not accept: a finding
        outcome, exc, msg = f"unexpected:{type(e).__name__}", type(e).__name__, str(e)
    return {"kind": case.kind, "i": case.index, "outcome": outcome, "exc": exc, "msg": msg[:300],
            "ms": round((time.perf_counter() - t0) * 1e3, 1)}


def limit_memory(gib: float) -> None:
    import resource

    if "libasan" in os.environ.get("LD_PRELOAD", ""):
        return  # under tools/sanitize.sh: ASan's shadow alone reserves ~20 TiB of address space
    limit = int(gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def worker_main(args) -> None:
    """Reads 'kind index' lines on stdin, answers one JSON line per case on the protocol fd (the
    original stdout; fd 1 then points at stderr, so that native code printing cannot garble it)."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    limit_memory(args.memory_gib)
    runner = Runner(args.workdir, args.seed)
    proto.write(json.dumps({"ready": os.getpid()}) + "\n")
    try:
        for line in sys.stdin:
            kind, index = line.split()
            case = make_case(kind, int(index), args.seed, runner.inputs)
            print(f"[case] {kind} {index} {case.desc}", file=sys.stderr, flush=True)
            proto.write(json.dumps(outcome_of(runner, case)) + "\n")
    finally:
        runner.close()


def file_case(kind: str, path: str) -> Case:
    """A kept input file run as a case of `kind` (tests/data/fuzz/)."""
    with open(path, "rb") as f:
        data = f.read()
    if kind == "chat" or kind not in KINDS:
        raise ValueError(f"--file takes a file of a GGUF or image kind, not {kind!r}")
    return Case(kind, -1, [f"file {os.path.basename(path)}"], data, len(data), b"")


def one_main(args) -> None:
    limit_memory(args.memory_gib)
    runner = Runner(args.workdir, args.seed)
    try:
        if args.file:
            case = file_case(args.file[0], args.file[1])
        else:
            case = make_case(args.one[0], int(args.one[1]), args.seed, runner.inputs)
        result = outcome_of(runner, case)
        result["desc"] = case.desc
        result["sha256"] = case.digest()
        print(json.dumps(result), flush=True)
    finally:
        runner.close()


# ---------------------------------------------------------------------------------------------
# The parent: schedule, workers, confirmation, results, summary


def schedule(n_cases: int, kinds: Sequence[str]) -> list[tuple[str, int]]:
    """Cases of all kinds interleaved (each kind's share of n_cases by WEIGHTS)."""
    total_w = sum(WEIGHTS[k] for k in kinds)
    counts = {k: max(1, round(n_cases * WEIGHTS[k] / total_w)) for k in kinds}
    order = [(i / counts[k], k, i) for k in kinds for i in range(counts[k])]
    order.sort()
    return [(k, i) for _, k, i in order]


def child_env() -> dict:
    # ggml prints a backtrace on abort by attaching gdb (seconds per crash): the message is enough
    return dict(os.environ, GGML_NO_BACKTRACE="1")


class Worker:
    def __init__(self, args, slot: int):
        self.args, self.slot = args, slot
        self.proc = None
        self.case = None  # (kind, index) in flight
        self.started = 0.0
        self.history: collections.deque = collections.deque(maxlen=20)
        self.buf = b""

    def start(self) -> None:
        log = open(os.path.join(self.args.workdir, f"worker-{self.slot}.log"), "wb")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--seed", str(self.args.seed),
               "--workdir", self.args.workdir, "--memory-gib", str(self.args.memory_gib)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, bufsize=0, env=child_env())
        log.close()
        self.history.clear()
        self.buf = b""
        self.case = None
        line = self.proc.stdout.readline()  # the worker is up (imports done)
        if not line.startswith(b'{"ready"'):
            raise RuntimeError(f"worker {self.slot} did not start: {line!r} (see {self.args.workdir}/worker-{self.slot}.log)")

    def send(self, kind: str, index: int) -> None:
        self.case = (kind, index)
        self.started = time.monotonic()
        self.proc.stdin.write(f"{kind} {index}\n".encode())

    def stop(self, grace: float = 0.0) -> None:
        """Ends the worker: at once, or after `grace` seconds for it to finish on its own."""
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        remove_scratch(self.args.workdir, self.proc.pid)


def confirm(args, kind: str, index: int, history: list) -> dict:
    """Re-runs a case alone in a fresh child: crash (signal), hang (timeout), or not reproduced."""
    cmd = [sys.executable, os.path.abspath(__file__), "--one", kind, str(index), "--seed", str(args.seed),
           "--workdir", args.workdir, "--memory-gib", str(args.memory_gib)]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env())
    try:
        stdout, stderr = p.communicate(timeout=args.timeout * 2)
    except subprocess.TimeoutExpired:
        p.kill()
        _, stderr = p.communicate()
        remove_scratch(args.workdir, p.pid)
        return {"outcome": "hang", "stderr": stderr[-1500:].decode(errors="replace"), "ms": round((time.perf_counter() - t0) * 1e3)}
    remove_scratch(args.workdir, p.pid)
    stderr = stderr[-1500:].decode(errors="replace")
    if p.returncode < 0:
        return {"outcome": "crash", "signal": -p.returncode, "stderr": stderr, "ms": round((time.perf_counter() - t0) * 1e3)}
    if p.returncode != 0:
        return {"outcome": "crash", "exit_code": p.returncode, "stderr": stderr}
    result = json.loads(stdout.decode().strip().splitlines()[-1])
    result["alone"] = result.pop("outcome")
    result["history"] = history
    return result


def save_crash(args, kind: str, index: int, record: dict) -> None:
    folder = os.path.join(args.workdir, "crashes")
    os.makedirs(folder, exist_ok=True)
    case = make_case(kind, index, args.seed, Inputs(args.workdir))
    stem = os.path.join(folder, f"{kind}-{index}")
    if case.kind == "chat":
        with open(stem + ".repr.txt", "w") as f:
            f.write(repr(case.chat))
    elif case.kind == "smollm2":  # 100 MB: the header only (the rest is zeros up to total)
        with open(stem + ".head.bin", "wb") as f:
            f.write(case.head)
    else:
        with open(stem + ".bin", "wb") as f:
            f.write(case.file_bytes())
    with open(stem + ".json", "w") as f:
        json.dump({"seed": args.seed, "kind": kind, "index": index, "total": case.total, "desc": case.desc,
                   "sha256": case.digest(), **record}, f, indent=1)


def summarize(args, results: dict, elapsed: float) -> dict:
    per_kind: dict = {}
    problems, unexpected = [], {}
    for (kind, index), r in sorted(results.items()):
        o = r["outcome"]
        bucket = o.split(":")[0] if o.startswith(("error", "unexpected")) else o
        per_kind.setdefault(kind, collections.Counter())[o] += 1
        if bucket in ("crash", "hang", "crash_unconfirmed", "hang_unconfirmed"):
            problems.append({"kind": kind, "i": index, "outcome": o, "desc": r.get("desc"), "stderr": r.get("stderr", "")[-300:]})
        elif bucket == "unexpected":
            unexpected.setdefault(o, []).append({"kind": kind, "i": index, "msg": r.get("msg", "")[:200]})
    totals = collections.Counter()
    for c in per_kind.values():
        for o, n in c.items():
            totals[o.split(":")[0]] += n
    n = sum(totals.values())
    return {
        "command": "python tools/fuzz.py " + " ".join(sys.argv[1:]),
        "seed": args.seed, "cases": n, "wall_s": round(elapsed, 1), "cases_per_s": round(n / elapsed, 2) if elapsed else None,
        "jobs": args.jobs, "timeout_s": args.timeout,
        "totals": dict(totals),
        "crashes": totals["crash"] + totals["crash_unconfirmed"], "hangs": totals["hang"] + totals["hang_unconfirmed"],
        "per_kind": {k: dict(sorted(c.items(), key=lambda kv: -kv[1])) for k, c in per_kind.items()},
        "problems": problems,
        "unexpected_examples": {o: v[:5] for o, v in unexpected.items()},
    }


def parent_main(args) -> dict:
    os.makedirs(args.workdir, exist_ok=True)
    kinds = args.kinds.split(",") if args.kinds else list(KINDS)
    state_path = os.path.join(args.workdir, "state.json")
    results_path = os.path.join(args.workdir, "results.jsonl")
    config = {"seed": args.seed, "cases": args.cases, "kinds": kinds}
    state = {"config": config, "elapsed_s": 0.0}
    if os.path.exists(state_path):
        with open(state_path) as f:
            state = json.load(f)
        if state["config"] != config:
            sys.exit(f"{args.workdir} holds a run with {state['config']}; use another --workdir")
    results: dict = {}
    if os.path.exists(results_path):
        with open(results_path) as f:
            for line in f:
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by an interrupted run
                results[r["kind"], r["i"]] = r
    todo = collections.deque(c for c in schedule(args.cases, kinds) if c not in results)
    Inputs(args.workdir).get("profile_path")  # written once (with the tiny model), before the workers read them
    out = open(results_path, "a")
    t_start = time.monotonic()
    elapsed0 = state["elapsed_s"]

    def save_state():
        state["elapsed_s"] = elapsed0 + time.monotonic() - t_start
        with open(state_path + ".tmp", "w") as f:
            json.dump(state, f)
        os.replace(state_path + ".tmp", state_path)

    def record(r: dict) -> None:
        results[r["kind"], r["i"]] = r
        out.write(json.dumps(r) + "\n")
        out.flush()

    def lost(w: Worker, why: str) -> None:
        kind, index = w.case
        history = list(w.history)
        w.stop()
        c = confirm(args, kind, index, history)
        if c["outcome"] in ("crash", "hang"):
            r = {"kind": kind, "i": index, **c}
            save_crash(args, kind, index, c)
        else:
            r = {"kind": kind, "i": index, **c, "outcome": f"{why}_unconfirmed"}
            save_crash(args, kind, index, r)
        print(f"[fuzz] {kind} {index}: {r['outcome']} ({why} in a worker)", file=sys.stderr, flush=True)
        record(r)
        w.start()

    workers = [Worker(args, s) for s in range(args.jobs)]
    sel = selectors.DefaultSelector()
    for w in workers:
        w.start()
    last_report = time.monotonic()
    done_before = len(results)
    try:
        while todo or any(w.case for w in workers):
            for w in workers:
                if w.case is None and todo:
                    w.send(*todo.popleft())
            busy = [w for w in workers if w.case]
            for w in busy:
                sel.register(w.proc.stdout, selectors.EVENT_READ, w)
            now = time.monotonic()
            wait = max(0.0, min(w.started + args.timeout - now for w in busy))
            events = sel.select(timeout=wait)
            for w in busy:
                sel.unregister(w.proc.stdout)
            for key, _ in events:
                w = key.data
                chunk = os.read(w.proc.stdout.fileno(), 65536)
                if not chunk:
                    w.proc.wait()
                    lost(w, "crash")
                    continue
                w.buf += chunk
                while b"\n" in w.buf and w.case:
                    line, w.buf = w.buf.split(b"\n", 1)
                    r = json.loads(line)
                    record(r)
                    w.history.append([r["kind"], r["i"]])
                    w.case = None
            now = time.monotonic()
            for w in workers:
                if w.case and now - w.started > args.timeout:
                    lost(w, "hang")
            if now - last_report > 30:
                last_report = now
                save_state()
                n_done = len(results) - done_before
                rate = n_done / (now - t_start)
                print(f"[fuzz] {len(results)} done, {len(todo)} to go, {rate:.1f} cases/s", file=sys.stderr, flush=True)
    finally:
        for w in workers:
            if w.proc and w.proc.poll() is None:
                w.proc.stdin.close()  # the worker's loop ends: it removes its files and exits
        for w in workers:
            w.stop(grace=10.0)
        save_state()
        out.close()
    summary = summarize(args, results, state["elapsed_s"])
    if args.summary:
        os.makedirs(os.path.dirname(os.path.abspath(args.summary)), exist_ok=True)
        with open(args.summary, "w") as f:
            json.dump(summary, f, indent=1)
    with open(os.path.join(args.workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=20000, help="cases in the run, over all kinds")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--kinds", default="", help="comma-separated subset of " + ",".join(KINDS))
    ap.add_argument("--workdir", default="/tmp/cmx-fuzz", help="results.jsonl (resume state), crashes/, logs")
    ap.add_argument("--summary", default="", help="also write the summary JSON here")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds per case before it counts as a hang")
    ap.add_argument("--memory-gib", type=float, default=8.0, help="address-space limit of a child")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--one", nargs=2, metavar=("KIND", "INDEX"), help="run one case in this process, print its outcome")
    ap.add_argument("--file", nargs=2, metavar=("KIND", "PATH"), help="run a file as a case of KIND in this process, print its outcome")
    args = ap.parse_args(argv)
    if args.worker:
        worker_main(args)
        return 0
    if args.one or args.file:
        os.makedirs(args.workdir, exist_ok=True)
        one_main(args)
        return 0
    summary = parent_main(args)
    print(json.dumps({k: summary[k] for k in ("cases", "wall_s", "cases_per_s", "totals", "crashes", "hangs")}))
    return 1 if summary["crashes"] or summary["hangs"] else 0


if __name__ == "__main__":
    sys.exit(main())

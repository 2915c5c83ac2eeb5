"""Metal op check: every graph cmx builds would run entirely on Apple's Metal backend.

The promise checked here: each node of every graph the engine builds is an op, with source and
result types and layouts, that the pinned llama.cpp's Metal backend accepts and has a kernel for,
so that on a Mac `ggml_backend_sched` keeps the whole graph on the GPU. The graphs: dense prefill
(one graph, and split into several n_batch graphs); CoreMatching's pruned prefill (layers 0..K
over every row with the token scores: CoreMatching's anchor or paper activations, FastV's
attention row; then the kept rows; selections forced from Python, pooled groups; split into
n_batch graphs); per-layer neuron statistics (sorted, or a profile's thresholds); decode reading
the compact core-neuron FFN weights (one row and several); batches mixing token rows and image
embedding rows, with several images; decode's Prune hook; LoRA adapters, qkv biases, RoPE
frequency factors; for every weight type cmx runs (f32, f16, bf16, q8_0, q5_0, q5_1, q4_0, q4_1,
K-quants) and both architectures (llama, qwen2).

One exception, by design (docs/decisions.md, "Metal op check"): the neuron-statistics op
(GGML_OP_CUSTOM `neuron_stats_l<layer>`, `stats_rows` in cpp/graph.cpp) has no Metal kernel; the
scheduler runs it on the CPU backend. It is allowed in prefill graphs only, reading a layer's F32
activations and returning 1 + kmax I32 per row; a decode graph holding it fails.

The table (`metal_refusal`) is our own transcription of `ggml_metal_device_supports_op` in
ggml/src/ggml-metal/ggml-metal-device.m of llama.cpp 0c1e57098 (vendored by llama-cpp-python
0.3.36), for an Apple7-family GPU or later (every Apple silicon Mac: simdgroup reduction, simdgroup
matrices, bfloat), plus what its kernels need beyond that function: the kernel names the Metal
library defines (ggml-metal/kernels/*.metal) and the asserts in ggml-metal-ops.cpp (GET_ROWS reads
I32 indices and writes F32; SET_ROWS takes I32 or I64 indices; SOFT_MAX's mask is F16 or F32; ROPE
reads I32 positions and F32 frequency factors; MUL_MAT needs a kernel for its weight type). No Mac
is here: this checks the graphs against that list, not on the hardware.
"""

from __future__ import annotations

import numpy as np
import pytest

import cmx
import tiny_models
from cmx import selection
from cmx._core import Engine

# ---------------------------------------------------------------- the pinned Metal backend's table

F32_F16 = {"f32", "f16"}
# weight types with a kernel_mul_mv_<type>_f32 / kernel_mul_mm_<type>_f32 (kernels/mul_mv.metal, mul_mm.metal)
MUL_MAT_WEIGHT_TYPES = {"f32", "f16", "bf16", "q1_0", "q2_0", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "mxfp4", "q2_K",
                        "q3_K", "q4_K", "q5_K", "q6_K", "iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs",
                        "iq3_s", "iq4_nl", "iq4_xs", "tq2_0"}
# sources with a kernel_get_rows_<type> (kernels/quantize.metal)
GET_ROWS_SOURCE_TYPES = MUL_MAT_WEIGHT_TYPES | {"i32"}
# SET_ROWS from F32 into these (kernel_set_rows_f32_<index>_<type>)
SET_ROWS_F32_INTO = {"f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl", "tq2_0"}
CONCAT_TYPES = {"f32", "f16", "bf16", "i8", "i16", "i32", "i64", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0"}
# CPY / CONT / DUP / SET: source type -> result types
COPY_TYPES = {
    "f32": {"f32", "f16", "bf16", "q8_0", "q1_0", "q2_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl", "tq2_0", "i32"},
    "f16": {"f32", "f16"},
    "bf16": {"f32", "bf16"},
    **{q: {"f32", "f16"} for q in ("q1_0", "q2_0", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "tq2_0")},
    "i32": {"f32", "i32"},
}
UNARY_KINDS = {"TANH", "RELU", "SIGMOID", "GELU", "GELU_ERF", "GELU_QUICK", "SILU", "ELU", "NEG", "ABS", "SGN", "STEP",
               "HARDSWISH", "HARDSIGMOID", "EXP", "SOFTPLUS", "EXPM1", "FLOOR", "CEIL", "ROUND", "TRUNC", "XIELU"}
GLU_KINDS = {"REGLU", "GEGLU", "SWIGLU", "SWIGLU_OAI", "GEGLU_ERF", "GEGLU_QUICK", "SWIGLU_CLAMP"}
FLASH_ATTN_HEAD_SIZES = {32, 40, 48, 64, 72, 80, 96, 112, 128, 192, 256, 320, 512, 576}
FLASH_ATTN_KV_TYPES = {"f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"}


def _src(node: dict, i: int) -> dict | None:
    return node["src"][i] if i < len(node["src"]) else None


def _need(ok: bool, why: str) -> str | None:
    return None if ok else why


def _elementwise(node):  # SCALE, UNARY, ...: rows contiguous, F32 or F16
    s0 = _src(node, 0)
    return _need(s0["contiguous_rows"] and s0["type"] in F32_F16, "needs an F32/F16 source with contiguous rows")


def _binary(node):  # ADD, SUB, MUL, DIV, ADD_ID
    s0, s1 = _src(node, 0), _src(node, 1)
    return _need(s0["contiguous_rows"] and s1["contiguous_rows"] and s0["type"] in F32_F16 and s0["type"] == s1["type"],
                 "needs two F32/F16 sources of one type with contiguous rows")


def _rows_contiguous(node):  # SOFT_MAX, RMS_NORM, SUM_ROWS, ...
    return _need(_src(node, 0)["contiguous_rows"], "needs a source with contiguous rows")


def _concat(node):
    t0, t1 = _src(node, 0)["type"], _src(node, 1)["type"]
    return _need(t0 == t1 == node["type"] and t0 in CONCAT_TYPES, f"no concat of {t0} and {t1} into {node['type']}")


def _copy(node):
    t0 = _src(node, 0)["type"]
    return _need(node["type"] in COPY_TYPES.get(t0, set()), f"no copy from {t0} into {node['type']}")


def _get_rows(node):
    s0, idx = _src(node, 0), _src(node, 1)
    if s0["type"] not in GET_ROWS_SOURCE_TYPES:
        return f"no get_rows kernel for {s0['type']} rows"
    if idx["type"] != "i32":  # the kernels read int32 indices (supports_op does not look)
        return f"get_rows reads i32 indices, got {idx['type']}"
    want = "i32" if s0["type"] == "i32" else "f32"  # kernel_get_rows_* write float (i32 for i32)
    return _need(node["type"] == want, f"get_rows of {s0['type']} writes {want}, not {node['type']}")


def _set_rows(node):
    s0, idx = _src(node, 0), _src(node, 1)
    if s0["type"] == "f16":
        ok = node["type"] == "f16"
    else:
        ok = s0["type"] == "f32" and node["type"] in SET_ROWS_F32_INTO
    if not ok:
        return f"no set_rows from {s0['type']} into {node['type']}"
    return _need(idx["type"] in {"i32", "i64"}, f"set_rows indices must be i32 or i64, got {idx['type']}")


def _glu(node):
    if node["kind"] not in GLU_KINDS:
        return f"GLU kind {node['kind']} has no Metal kernel"
    s0, s1 = _src(node, 0), _src(node, 1)
    if not (s0["contiguous_1"] and s0["type"] in F32_F16):
        return "GLU needs an F32/F16 first source contiguous from dim 1"
    if s1 is not None and (s1["type"] != s0["type"] or s1["ne"] != s0["ne"]):  # split form: asserted same shape
        return "split GLU needs two sources of one type and shape"
    return None


def _soft_max(node):
    s0, mask = _src(node, 0), _src(node, 1)
    if not s0["contiguous_rows"]:
        return "soft_max needs a source with contiguous rows"
    if s0["type"] != "f32":  # kernel_soft_max_<mask type> reads float scores
        return f"soft_max reads f32 scores, got {s0['type']}"
    return _need(mask is None or mask["type"] in F32_F16, f"soft_max mask must be f16 or f32, got {mask and mask['type']}")


# rope modes (op_params[2]) and the kernel family the pinned Metal backend picks for each
# (ggml_metal_library_get_pipeline_rope): norm, neox, multi (M-RoPE, ggml_rope_multi), vision
ROPE_KERNELS = {0: "norm", 2: "neox", 8: "multi", 40: "multi", 24: "vision"}


def _rope(node):
    s0, pos, freq = _src(node, 0), _src(node, 1), _src(node, 2)
    mode = node["params"][2] if node.get("params") else 0
    if mode not in ROPE_KERNELS:
        return f"no rope kernel for mode {mode}"
    if s0["type"] not in F32_F16:  # kernel_rope_{norm,neox,multi,vision}_{f32,f16}
        return f"no rope kernel for {s0['type']}"
    if pos["type"] != "i32":
        return f"rope reads i32 positions, got {pos['type']}"
    per_row = 4 if mode & 8 else 1  # M-RoPE and vision: 4 position components per row (asserted)
    if pos["ne"][0] != per_row * s0["ne"][2]:
        return f"rope needs {per_row} position(s) for each row"
    return _need(freq is None or freq["type"] == "f32", f"rope frequency factors must be f32, got {freq and freq['type']}")


def _mul_mat(node, *, indexed=False):
    w, x = _src(node, 0), _src(node, 1)
    if w["type"] in {"nvfp4", "tq1_0"}:
        return f"no matrix product with {w['type']} weights"
    if x["type"] == "f16":  # an F16 second operand: only F16 weights by vector, else the matrix-matrix path
        if indexed:  # the expert ids' rows (src 2) decide
            mm_path = w["ne"][0] >= 64 and _src(node, 2)["ne"][1] >= 32
        else:
            mm_path = not w["transposed"] and not x["transposed"] and w["ne"][0] >= 64 and x["ne"][1] > 8
        if w["type"] == "bf16" or not ((w["type"] == "f16" and not indexed) or mm_path):
            return f"no matrix product of {w['type']} by f16 of this shape"
    elif x["type"] == "bf16":
        if w["type"] != "bf16":
            return f"no matrix product of {w['type']} by bf16"
    elif x["type"] != "f32" or w["type"] not in MUL_MAT_WEIGHT_TYPES:
        return f"no matrix product kernel for {w['type']} by {x['type']}"
    if w["ne"][0] != x["ne"][0]:
        return "matrix product with different inner sizes"
    if not indexed and (x["ne"][2] % w["ne"][2] or x["ne"][3] % w["ne"][3]):
        return "matrix product broadcast must divide the batch dims"
    return None


def _flash_attn(node):
    q, k, v = _src(node, 0), _src(node, 1), _src(node, 2)
    if q["ne"][0] not in FLASH_ATTN_HEAD_SIZES:
        return f"no flash attention kernel for head size {q['ne'][0]}"
    if k["ne"][0] < v["ne"][0] or (k["ne"][0] == 72 and v["ne"][0] != 72) or k["type"] != v["type"]:
        return "flash attention needs K, V of one type and K's head at least V's"
    return _need(k["type"] in FLASH_ATTN_KV_TYPES, f"no flash attention with {k['type']} K/V")


def _always(node):
    return None


def _types(*pairs):  # checks (source index, allowed types) pairs; -1: the result
    def check(node):
        for i, allowed in pairs:
            t = node["type"] if i < 0 else _src(node, i)["type"]
            if t not in allowed:
                return f"{'result' if i < 0 else f'source {i}'} type {t} not accepted"
        return None
    return check


def _all(*checks):
    def check(node):
        for c in checks:
            why = c(node)
            if why:
                return why
        return None
    return check


def _contiguous(*indices):  # -1: the result
    def check(node):
        for i in indices:
            t = node if i < 0 else _src(node, i)
            if not t["contiguous"]:
                return f"{'result' if i < 0 else f'source {i}'} must be contiguous"
        return None
    return check


METAL_OPS = {
    **{op: _elementwise for op in ("SCALE", "FILL", "CLAMP", "SQR", "SQRT", "SIN", "COS", "LOG", "LEAKY_RELU")},
    "UNARY": lambda n: _elementwise(n) if n["kind"] in UNARY_KINDS else f"unary {n['kind']} has no Metal kernel",
    "SILU_BACK": _all(_types((0, {"f32"}), (1, {"f32"}), (-1, {"f32"})), _contiguous(0, 1, -1),
                      lambda n: _need(_src(n, 0)["ne"] == _src(n, 1)["ne"], "sources of different shapes")),
    "GLU": _glu,
    **{op: _always for op in ("NONE", "RESHAPE", "VIEW", "TRANSPOSE", "PERMUTE", "REPEAT", "CONV_TRANSPOSE_1D",
                              "ARGMAX", "ROPE_BACK", "ARGSORT", "TOP_K", "ARANGE", "RWKV_WKV6", "RWKV_WKV7", "DIAG",
                              "SSM_SCAN", "SSM_CONV", "OPT_STEP_ADAMW", "OPT_STEP_SGD")},
    "CONCAT": _concat,
    **{op: _binary for op in ("ADD", "SUB", "MUL", "DIV", "ADD_ID")},
    "ACC": lambda n: _need(_src(n, 0)["contiguous_rows"] and _src(n, 1)["contiguous_rows"] and _src(n, 0)["type"] == "f32",
                           "needs F32 sources with contiguous rows"),
    "CONV_TRANSPOSE_2D": _all(_contiguous(0, 1), _types((0, F32_F16), (1, {"f32"}), (-1, {"f32"}))),
    "COL2IM_1D": _all(_contiguous(0, -1), _types((0, {"f32", "f16", "bf16"})),
                      lambda n: _need(n["type"] == _src(n, 0)["type"], "result type differs from the source's")),
    "CONV_3D": _all(_contiguous(0, 1), _types((0, F32_F16), (1, {"f32"}))),
    "SUM": _contiguous(0),
    **{op: _rows_contiguous for op in ("TRI", "SUM_ROWS", "CUMSUM", "MEAN", "GROUP_NORM", "L2_NORM", "NORM", "RMS_NORM")},
    "SOFT_MAX": _soft_max,
    "COUNT_EQUAL": _types((0, {"i32"}), (1, {"i32"}), (-1, {"i64"})),
    "ROPE": _rope,
    "IM2COL": _all(_contiguous(1), _types((1, {"f32"}), (-1, F32_F16))),
    "CONV_2D": _all(_contiguous(0), _types((0, F32_F16), (1, {"f32"}), (-1, {"f32"}))),
    "CONV_2D_DW": _types((0, F32_F16), (1, {"f32"}), (-1, {"f32"})),
    **{op: _types((0, {"f32"})) for op in ("UPSCALE", "POOL_2D", "PAD", "PAD_REFLECT_1D", "TIMESTEP_EMBEDDING")},
    "POOL_1D": _all(_contiguous(0), _types((0, {"f32"}))),
    "ROLL": _contiguous(0),
    "FLASH_ATTN_EXT": _flash_attn,
    "GATED_DELTA_NET": lambda n: _need(_src(n, 2)["ne"][0] % 32 == 0, "gated delta net needs a multiple of 32"),
    "SOLVE_TRI": _types((0, {"f32"})),
    "MUL_MAT": _mul_mat,
    "MUL_MAT_ID": lambda n: _mul_mat(n, indexed=True),
    **{op: _copy for op in ("SET", "CPY", "DUP", "CONT")},
    "GET_ROWS": _get_rows,
    "SET_ROWS": _set_rows,
    # Also accepted there, under op-specific shape conditions this table does not model (cmx builds
    # none of them): LIGHTNING_INDEXER, DSV4_HC_COMB, DSV4_HC_PRE, DSV4_HC_POST. Refused here, so a
    # graph that starts using one fails until the table learns it. Everything else (OUT_PROD,
    # CUSTOM, MAP_CUSTOM*, GET_ROWS_BACK, SOFT_MAX_BACK, ...) Metal refuses.
}


def metal_refusal(node: dict, *, bfloat: bool = True) -> str | None:
    """Why the pinned Metal backend would not run this graph node (None: it would). `node` is one
    of Engine.recorded_graphs()'s node dicts. bfloat: the GPU has bfloat (Apple6 family or
    later, unless GGML_METAL_BF16_DISABLE is set)."""
    if not bfloat and any(t is not None and t["type"] == "bf16" for t in [node, *node["src"][:3]]):
        return "bf16 without bfloat support"
    check = METAL_OPS.get(node["op"])
    if check is None:
        return f"{node['op']} is not on the Metal list"
    return check(node)


# ---------------------------------------------------------------- the one op that runs on the CPU by design

def is_neuron_stats(node: dict) -> bool:
    return node["op"] == "CUSTOM" and node["name"].startswith("neuron_stats_l")


def _stats_width(kmax: int) -> int:
    """The statistics op's row: 1 + kmax words, padded to whole cache lines (16 words)."""
    return -(-(1 + kmax) // 16) * 16


def graph_violations(graphs: list[dict], *, kmax: set[int] | None = None, bfloat: bool = True) -> list[str]:
    """Every node of the graphs that would not run on Metal, beyond the documented exception (the
    neuron-statistics op, allowed in prefill graphs with F32 activations in and 1 + kmax I32 per
    row out, padded to whole cache lines)."""
    out = []
    for gi, g in enumerate(graphs):
        where = f"graph {gi} ({g['call']}, layers {g['layers'][0]}..{g['layers'][1] - 1}, {g['n_rows']} rows)"
        for n in g["nodes"]:
            if is_neuron_stats(n):
                act = _src(n, 0)
                if g["call"] != "prefill":
                    out.append(f"{where}: {n['name']}: the CPU-only statistics op in a decode graph")
                elif n["type"] != "i32" or act["type"] != "f32" or n["ne"][1] != act["ne"][1] or n["ne"][0] % 16 or (
                        kmax is not None and not any(n["ne"][0] == _stats_width(k) for k in kmax)) or (
                        n["ne"][0] >= act["ne"][0]):
                    out.append(f"{where}: {n['name']}: statistics op of unexpected shape {n['type']}{n['ne']} from "
                               f"{act['type']}{act['ne']}")
                continue
            why = metal_refusal(n, bfloat=bfloat)
            if why:
                srcs = ", ".join("-" if s is None else f"{s['type']}{list(s['ne'])}" for s in n["src"])
                out.append(f"{where}: {n['op']}/{n['kind']} {n['name']!r} {n['type']}{list(n['ne'])} <- ({srcs}): {why}")
    return out


# ---------------------------------------------------------------- the checker can fail

def fake_node(op, type_="f32", *srcs, kind=None, name="x", ne=(64, 8, 1, 1), params=None):
    def tensor(t):
        if t is None:
            return None
        t = dict(t) if isinstance(t, dict) else {"type": t}
        base = {"name": "s", "ne": ne, "contiguous": True, "contiguous_1": True, "contiguous_rows": True, "transposed": False}
        return {**base, **t}
    return {**tensor({"type": type_, "name": name}), "op": op, "kind": kind or op, "src": [tensor(s) for s in srcs],
            "params": list(params or [0] * 16)}


def rope_node(mode: int, n_pos: int, freq=None):
    """A ROPE node of 8 rows ([D, n_head, 8]) in the given mode with n_pos positions."""
    q = {"type": "f32", "ne": (16, 4, 8, 1)}
    return fake_node("ROPE", "f32", q, {"type": "i32", "ne": (n_pos, 1, 1, 1)}, *([freq] if freq else []),
                     ne=(16, 4, 8, 1), params=[0, 16, mode] + [0] * 13)


@pytest.mark.parametrize("node, reason", [
    (fake_node("OUT_PROD", "f32", "f32", "f32"), "not on the Metal list"),
    (fake_node("CUSTOM", "i32", "f32", name="something_else"), "not on the Metal list"),
    (fake_node("GET_ROWS", "f16", "q4_0", "i32"), "writes f32, not f16"),
    (fake_node("GET_ROWS", "f32", "q4_0", "i64"), "reads i32 indices"),
    (fake_node("GET_ROWS", "f32", "tq1_0", "i32"), "no get_rows kernel"),
    (fake_node("SET_ROWS", "q4_K", "f32", "i64", "q4_K"), "no set_rows from f32 into q4_K"),
    (fake_node("SET_ROWS", "f32", "f16", "i64", "f32"), "no set_rows from f16 into f32"),
    (fake_node("SET_ROWS", "f16", "f32", "i16", "f16"), "indices must be i32 or i64"),
    (fake_node("GLU", "f32", {"type": "f32", "contiguous_1": False}, "f32", kind="SWIGLU"), "contiguous from dim 1"),
    (fake_node("GLU", "f32", "f32", "f16", kind="SWIGLU"), "one type and shape"),
    (fake_node("MUL_MAT", "f32", "tq1_0", "f32"), "no matrix product with tq1_0"),
    (fake_node("MUL_MAT", "f32", "q4_0", "f16", ne=(64, 1, 1, 1)), "by f16 of this shape"),
    (fake_node("MUL_MAT", "f32", "q8_1", "f32"), "no matrix product kernel"),
    (fake_node("CONCAT", "f32", "f32", "f16"), "no concat"),
    (fake_node("SOFT_MAX", "f32", "f32", "i32"), "mask must be f16 or f32"),
    (fake_node("SOFT_MAX", "f32", {"type": "f32", "contiguous_rows": False}, "f32"), "contiguous rows"),
    (fake_node("ROPE", "f32", "f32", {"type": "i64", "ne": (8, 1, 1, 1)}), "i32 positions"),
    (rope_node(0, 8, "f16"), "frequency factors must be f32"),
    (rope_node(8, 8), "4 position(s) for each row"),  # M-RoPE with one position per row
    (rope_node(4, 8), "no rope kernel for mode 4"),
    (fake_node("CPY", "q4_K", "f32"), "no copy from f32 into q4_K"),
    (fake_node("ADD", "f32", "f32", "f16"), "two F32/F16 sources of one type"),
    (fake_node("UNARY", "f32", "f32", kind="NOT_A_KERNEL"), "has no Metal kernel"),
])
def test_the_table_refuses_what_metal_refuses(node, reason):
    why = metal_refusal(node)
    assert why is not None and reason in why, why


@pytest.mark.parametrize("node", [
    fake_node("GET_ROWS", "f32", "q6_K", "i32"),
    fake_node("SET_ROWS", "f16", "f32", "i64", "f16"),
    fake_node("GLU", "f32", "f32", "f32", kind="SWIGLU"),
    fake_node("MUL_MAT", "f32", "q4_K", "f32"),
    fake_node("MUL_MAT", "f32", "f16", "f16", ne=(64, 1, 1, 1)),  # F16 by F16: the vector kernel
    fake_node("SOFT_MAX", "f32", "f32", "f16"),
    rope_node(0, 8, "f32"),
    rope_node(2, 8),
    rope_node(8, 32),  # ggml_rope_multi (M-RoPE): kernel_rope_multi_f32, 4 positions per row
    fake_node("CONCAT", "q8_0", "q8_0", "q8_0"),
    fake_node("CONT", "f32", "f16"),
])
def test_the_table_accepts_what_metal_runs(node):
    assert metal_refusal(node) is None


def test_bf16_needs_bfloat():
    node = fake_node("MUL_MAT", "f32", "bf16", "f32")
    assert metal_refusal(node) is None and "bfloat" in metal_refusal(node, bfloat=False)


def test_the_statistics_op_is_allowed_in_prefill_only():
    stats = fake_node("CUSTOM", "i32", {"type": "f32", "ne": (128, 5, 1, 1)}, name="neuron_stats_l1", ne=(32, 5, 1, 1))
    prefill = {"call": "prefill", "layers": (0, 2), "n_rows": 5, "nodes": [stats]}
    assert graph_violations([prefill], kmax={25}) == []
    assert "unexpected shape" in graph_violations([prefill], kmax={12})[0]
    decode = {**prefill, "call": "decode"}
    assert "in a decode graph" in graph_violations([decode])[0]
    wide = fake_node("CUSTOM", "i32", {"type": "f32", "ne": (128, 5, 1, 1)}, name="neuron_stats_l1", ne=(128, 5, 1, 1))
    assert "unexpected shape" in graph_violations([{**prefill, "nodes": [wide]}])[0]  # the activations leaving whole


# ---------------------------------------------------------------- every graph the engine builds

N_LAYER = 4  # K = 1, layers 1 and 2 sparse in decode (the first and last stay dense by default)
TEXT = [13, 300, 421, 77, 990, 5, 1234, 64, 318, 4000, 17, 29, 88, 1500, 7, 3]
i32 = lambda xs: np.asarray(xs, np.int32)  # noqa: E731


def mixed_batch(n_images: int, image_rows: int, n_embd: int, seed: int = 0):
    """Text rows around n_images images of image_rows embedding rows (-1): rows, embeddings,
    image spans (first row, n_rows), and the anchor row (a few rows from the end, as chat's)."""
    rows, spans = [], []
    for i in range(n_images):
        rows += TEXT[i * 3: i * 3 + 3]
        spans.append((len(rows), image_rows))
        rows += [-1] * image_rows
    rows += TEXT[:6]
    embd = np.random.default_rng(seed).standard_normal((n_images * image_rows, n_embd)).astype(np.float32)
    return i32(rows), embd, spans, len(rows) - 4


def build_every_graph(path: str, n_embd: int, *, lora: str = "", neurons: bool = True, full: bool = True,
                      n_layer: int = N_LAYER) -> tuple[list[dict], set[int]]:
    """Runs every kind of evaluation the engine offers on one model and returns the graphs it
    built (and the statistics ops' kmax values). full=False: only what the weight type changes
    (dense and CoreMatching prefill, decode with compact weights), for the other weight types."""
    graphs, kmax = [], set()

    def engine(n_batch=512):
        # one thread: the graphs do not depend on it, and the test stays quick on a busy machine
        e = Engine(path, n_ctx=512, n_batch=n_batch, n_threads=1, lora=lora)
        e.record_graphs(True)
        return e

    def sp(**kw):
        kw.setdefault("neurons", neurons)
        p = cmx.Sparsity(prune_layer=1, **kw).to_core(n_layer)
        kmax.add(int(np.floor(p.rho * n_ff)))
        return p

    def decode_steps(e, n_past, rows_per_step=(1, 1, 3)):
        for n in rows_per_step:  # one-token steps, then a several-row decode
            e.decode(i32(TEXT[:n]), i32(range(n_past, n_past + n)), i32([n - 1]))
            n_past += n

    def prefill(e, rows, embd, images=(), anchor=-1, sparsity=None):
        return e.prefill(rows, i32(range(len(rows))), i32([len(rows) - 1]), embd, images=list(images), anchor_row=anchor,
                         sparsity=sparsity)

    e = engine()
    n_ff = e.info["n_ff"]
    n = len(TEXT)
    rows, embd, spans, anchor = mixed_batch(2, 9, n_embd)
    scored = [(f, c, []) for f, c in spans]
    # dense: a text prompt, decode steps; every row's logits
    prefill(e, i32(TEXT), None)
    decode_steps(e, n)
    e.clear()
    e.decode(i32(TEXT), i32(range(n)), i32(range(n)))
    graphs += e.recorded_graphs()
    if not full:  # CoreMatching on mixed rows, core neurons in every layer, decode
        e = engine()
        prefill(e, rows, embd, scored, anchor, sp(dense_layers=()))
        decode_steps(e, len(rows))
        return graphs + e.recorded_graphs(), kmax

    # dense over one graph and several n_batch graphs, mixed rows with two images
    for n_batch in (512, 7):
        e = engine(n_batch)
        prefill(e, rows, embd)
        e.decode(rows, i32(range(len(rows), 2 * len(rows))), i32([len(rows) - 1]), embd=embd)
        graphs += e.recorded_graphs()
    # decode's Prune hook (forced kept rows)
    e = engine()
    keep = [r for r in range(len(rows)) if rows[r] >= 0 or r % 3 == 0]
    e.decode(rows, i32(range(len(rows))), i32([len(keep) - 1]), embd=embd, prune_after_layer=1, keep_rows=keep)
    graphs += e.recorded_graphs()

    # CoreMatching and the other selections: pruned prefills (one graph and n_batch graphs per
    # stage), their neuron statistics, then decode with the compact FFN weights
    pool_keep, pool_groups = selection.pool_groups(9, 4)
    settings = [
        dict(),                                   # anchor score, the elbow
        dict(score="paper", budget=4),            # statistics at K score the tokens
        dict(select="fastv", budget=4),           # K's attention row of the last token
        dict(tokens=False, dense_layers=()),      # core neurons only: statistics in every layer
        dict(neurons=False, min_keep=0.5),        # tokens only
    ]
    for n_batch in (512, 7):
        for kw in settings:
            e = engine(n_batch)
            r = prefill(e, rows, embd, scored, anchor, sp(**kw))
            assert len(r["kept"]) == len(spans)
            decode_steps(e, len(rows))
            graphs += e.recorded_graphs()
        # selections made in Python: forced kept tokens (random, DivPrune), pooled groups
        for images in ([(f, c, selection.random_subset(c, 4, 0)) for f, c in spans],
                       [(f, c, pool_keep, pool_groups) for f, c in spans]):
            e = engine(n_batch)
            prefill(e, rows, embd, images, anchor, sp(select="random", budget=4))
            decode_steps(e, len(rows))
            graphs += e.recorded_graphs()
    # a profile's thresholds instead of sorting, then a second turn on the pruned cache
    e = engine()
    p = sp()
    p.thresholds = [0.05] * n_layer
    prefill(e, rows, embd, scored, anchor, p)
    decode_steps(e, len(rows))
    e.truncate(len(rows))
    e.prefill(i32(TEXT[:5]), i32(range(len(rows), len(rows) + 5)), i32([4]), sparsity=sp())
    decode_steps(e, len(rows) + 5)
    return graphs + e.recorded_graphs(), kmax


def write_model(tmp_path, name, ftype, base="llama", rope_freqs=False):
    """A random N_LAYER-layer model of ARCH_CONFIGS[base] in ftype (K-quants through llama.cpp's
    quantizer); rope_freqs: with llama-3-style RoPE frequency factors (ROPE's third source)."""
    config = tiny_models.TinyConfig(**{**tiny_models.ARCH_CONFIGS[base].__dict__, "n_layer": N_LAYER})
    overrides = {"rope_freqs.weight": np.linspace(1.0, 4.0, config.head_dim // 2).astype(np.float32)} if rope_freqs else None
    path = str(tmp_path / f"{name}-{ftype}.gguf")
    if ftype in tiny_models.LLAMA_CPP_FTYPES:
        f32 = tiny_models.write_tiny_gguf(str(tmp_path / f"{name}-f32.gguf"), config, "f32", overrides=overrides)
        return tiny_models.quantize_with_llama_cpp(f32, path, ftype), config
    return tiny_models.write_tiny_gguf(path, config, ftype, overrides=overrides), config


def unaligned_nodes(graphs: list[dict]) -> list[str]:
    """The nodes computed into memory off the 64-byte grid (graph.cpp's new_input says why it matters),
    in graphs without core neurons: a core FFN's activations are as wide as its core set, any width."""
    return [f"graph {i} ({g['n_rows']} rows): {g['nodes'][j]['op']} {g['nodes'][j]['name']!r} {g['nodes'][j]['ne']}"
            for i, g in enumerate(graphs) if g["call"] == "prefill" for j in g["unaligned"]]


def features(graphs: list[dict]) -> set[str]:
    """What the graphs exercise, so that a scenario that silently stops building a graph kind
    fails instead of passing on less."""
    f = set()
    for g in graphs:
        for n in g["nodes"]:
            srcs = [s for s in n["src"] if s is not None]
            if is_neuron_stats(n):
                f.add("statistics")
            if n["op"] == "CONCAT":
                f.add("mixed rows")
            if n["op"] == "MUL_MAT" and srcs[0]["name"].startswith("core_"):
                f.add(f"core {g['call']}")
            if n["name"] == "last_attention":
                f.add("attention row")
            if n["name"] == "hidden_out":
                f.add("stage to K")
            if n["op"] == "ROPE" and len(srcs) == 3:
                f.add("rope factors")
            if n["op"] == "ROPE" and n["params"][2] == 8:
                f.add("mrope")
            if n["op"] == "SCALE":
                f.add("lora")
            if g["call"] == "prefill" and g["layers"][0] > 0:
                f.add("kept rows after K")
        if g["n_rows"] > 1 and g["call"] == "decode" and any(n["op"] == "MUL_MAT" and n["src"][0]["name"].startswith("core_")
                                                            for n in g["nodes"]):
            f.add("core decode, several rows")
    return f


# what every model's graphs must show; the full run adds FastV's attention row
WEIGHT_TYPE_RUN = {"statistics", "mixed rows", "core decode", "core decode, several rows", "stage to K", "kept rows after K"}
FULL_RUN = WEIGHT_TYPE_RUN | {"attention row"}

MODELS = [  # (name, ftype, write_model options, full run)
    ("llama", "f32", {}, True),
    ("llama", "q4_0", {}, True),
    ("llama-k", "q4_k_m", {"base": "llama-k"}, True),
    ("qwen2", "q8_0", {"base": "qwen2"}, True),
    ("qwen2vl", "q8_0", {"base": "qwen2vl"}, True),
    ("llama-rope-freqs", "q4_1", {"rope_freqs": True}, True),
    ("llama", "f16", {}, False),
    ("llama", "bf16", {}, False),
    ("llama", "q8_0", {}, False),
    ("llama", "q5_0", {}, False),
    ("llama", "q5_1", {}, False),
    ("llama-k", "q5_k_m", {"base": "llama-k"}, False),
    ("llama-k", "q6_k", {"base": "llama-k"}, False),
    ("qwen2", "f32", {"base": "qwen2"}, False),
]


@pytest.mark.parametrize("name, ftype, options, full", MODELS, ids=[f"{m[0]}-{m[1]}" for m in MODELS])
def test_every_graph_runs_on_metal(tmp_path, name, ftype, options, full):
    path, config = write_model(tmp_path, name, ftype, **options)
    graphs, kmax = build_every_graph(path, config.n_embd, full=full)
    expected = (FULL_RUN if full else WEIGHT_TYPE_RUN) | ({"rope factors"} if options.get("rope_freqs") else set()) \
        | ({"mrope"} if options.get("base") == "qwen2vl" else set())
    assert expected <= features(graphs), expected - features(graphs)
    assert graph_violations(graphs, kmax=kmax) == []


@pytest.mark.parametrize("modules", [("attn_q", "attn_k", "attn_v", "attn_output"),
                                     ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")],
                         ids=["attention", "attention+ffn"])
def test_graphs_with_a_lora_adapter_run_on_metal(tmp_path, modules):
    from test_lora import write_lora

    path, config = write_model(tmp_path, "llama", "q8_0")
    lora = write_lora(tmp_path / "adapter.gguf", config, modules)
    ffn = "ffn_up" in modules  # an adapter on the FFN refuses core neurons: tokens only
    graphs, kmax = build_every_graph(path, config.n_embd, lora=lora, neurons=not ffn)
    expected = {"lora", "mixed rows", "attention row", "kept rows after K"} | (set() if ffn else {"core decode", "statistics"})
    assert expected <= features(graphs), expected - features(graphs)
    assert graph_violations(graphs, kmax=kmax) == []


def test_gemma3_graphs_run_on_metal(tmp_path):
    """The gemma3 text model (tests/vlm_families.py's tiny one, f32 and quantized): every graph kind,
    with its q/k norms, post norms, scaled queries and token embeddings, GELU-gated FFN (dense,
    pruned, and the compact core-neuron decode), sliding-window layers besides a global one."""
    import vlm_families as vf

    tok = vf.gemma3_tokenizer()
    f32 = vf.export_gemma3_text(vf.build_tiny_gemma3(tok), tok, tmp_path / "gemma3-f32.gguf")
    # llama.cpp's Q4_K_M recipe (rows of 64 are no multiple of 256: its fallback types)
    quantized = tiny_models.quantize_with_llama_cpp(f32, str(tmp_path / "gemma3-q4_k_m.gguf"), "q4_k_m")
    for path, full in ((f32, True), (quantized, False)):
        graphs, kmax = build_every_graph(path, 64, full=full, n_layer=7)
        expected = FULL_RUN if full else WEIGHT_TYPE_RUN
        assert expected <= features(graphs), expected - features(graphs)
        core_geglu = [n for g in graphs if g["call"] == "decode" for n in g["nodes"]
                      if n["kind"] == "GEGLU" and n["src"][0]["ne"][0] < 128]  # [k core neurons, n_rows]
        assert core_geglu and not any(n["kind"] == "SWIGLU" for g in graphs for n in g["nodes"])
        assert sum(n["op"] == "RMS_NORM" for n in graphs[0]["nodes"]) == 7 * 6 + 1  # attn, q, k, post-attn, ffn, post-ffw; output
        assert graph_violations(graphs, kmax=kmax) == []


# ---------------------------------------------------------------- through cmx.Model, as a user runs it

@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    import llava_tiny as lt

    return lt.export_tiny_pair(tmp_path_factory.mktemp("tiny_llava_metal"), text_type="q8_0")


def test_chat_graphs_run_on_metal(tiny_llava):
    """Multi-turn chat with two images, CoreMatching (core neurons in every layer), then FastV and
    pooling, as cmx.Model drives the engine (its n_batch chunks included)."""
    text, mmproj, (a, b) = tiny_llava
    m = cmx.Model(text, mmproj=mmproj, n_ctx=2048, n_batch=256, n_threads=1)
    m._engine.record_graphs(True)
    image = lambda path: {"type": "image_url", "image_url": {"url": path}}  # noqa: E731
    msg = [{"role": "user", "content": [image(a), image(b), {"type": "text", "text": "What differs?"}]}]
    answer = m.chat(msg, max_tokens=3, sparsity=cmx.Sparsity(prune_layer=0, dense_layers=()))
    msg += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And now?"}]
    m.chat(msg, max_tokens=3, sparsity=cmx.Sparsity(prune_layer=0, dense_layers=()))
    for sp in (cmx.Sparsity(select="fastv", budget=32, prune_layer=0), cmx.Sparsity(select="pool", budget=36, prune_layer=0)):
        m.reset()
        m.chat(msg[:1], max_tokens=2, sparsity=sp)
    m.reset()
    m.chat(msg[:1], max_tokens=2, sparsity=None)
    graphs = m._engine.recorded_graphs()
    assert {"statistics", "mixed rows", "core decode", "attention row", "kept rows after K"} <= features(graphs)
    assert graph_violations(graphs) == []
    assert unaligned_nodes(graphs) == []


def test_qwen25vl_chat_graphs_run_on_metal(tmp_path):
    """A Qwen2.5-VL pair (qwen2vl text model: M-RoPE) as cmx.Model drives it: two images on their
    grids, CoreMatching's pruned prefill and core-neuron decode, a second turn, the dense engine."""
    import vlm_families as vf

    text, mmproj, images = vf.export_qwen25vl_pair(tmp_path)
    m = cmx.Model(text, mmproj=mmproj, n_ctx=1024, n_threads=1)
    m._engine.record_graphs(True)
    image = lambda path: {"type": "image_url", "image_url": {"url": path}}  # noqa: E731
    msg = [{"role": "user", "content": [image(images[0]), image(images[1]), {"type": "text", "text": "What differs?"}]}]
    sp = cmx.Sparsity(prune_layer=0, dense_layers=())
    answer = m.chat(msg, max_tokens=3, sparsity=sp)
    msg += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And now?"}]
    m.chat(msg, max_tokens=3, sparsity=sp)
    m.reset()
    m.chat(msg[:1], max_tokens=2, sparsity=None)
    graphs = m._engine.recorded_graphs()
    assert {"mrope", "statistics", "mixed rows", "core decode", "kept rows after K"} <= features(graphs)
    assert graph_violations(graphs) == []
    assert unaligned_nodes(graphs) == []


def test_gemma3_chat_graphs_run_on_metal(tmp_path):
    """Gemma 3 through cmx.Model: two images (each decoded bidirectionally, the second moved to a
    new graph by n_batch), CoreMatching with core neurons in every layer, a second turn."""
    import vlm_families as vf

    text, mmproj, images = vf.export_gemma3_pair(tmp_path)
    m = cmx.Model(text, mmproj=mmproj, n_ctx=1024, n_batch=100, n_threads=1)
    m._engine.record_graphs(True)
    image = lambda path: {"type": "image_url", "image_url": {"url": path}}  # noqa: E731
    msg = [{"role": "user", "content": [image(images[0]), image(images[1]), {"type": "text", "text": "What differs?"}]}]
    answer = m.chat(msg, max_tokens=3, sparsity=cmx.Sparsity(prune_layer=1, dense_layers=()))
    msg += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And now?"}]
    m.chat(msg, max_tokens=3, sparsity=cmx.Sparsity(prune_layer=1, dense_layers=()))
    m.reset()
    m.chat(msg[:1], max_tokens=2, sparsity=None)
    graphs = m._engine.recorded_graphs()
    assert {"statistics", "mixed rows", "core decode", "kept rows after K"} <= features(graphs)
    assert graph_violations(graphs) == []
    assert unaligned_nodes(graphs) == []

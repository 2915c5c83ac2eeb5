"""CoreMatching benchmark: cmx (dense and CoreMatching) against stock llama-cpp-python, in one run.

(a) The demo VLM (cmx.Model(): SmolLM2-135M, the demo mmproj and LoRA) on held-out synthetic VQA
    questions (tools/eval_vqa.py's test split, question types in turn, greedy, at most 8 answer
    tokens): accuracy, image encode ms, LLM prefill ms, time to first token and decode tokens/s of
    every configuration, the elbow's kept image tokens and the core neurons.
(b) A LLaVA-1.5-shaped llama model of about 1B parameters with random weights (n_embd 2048,
    n_ff 5632, 22 layers, 32 heads / 4 KV heads, vocab 32000; written with gguf-py in F16, then
    quantized to Q4_0 and Q8_0 by llama.cpp's quantizer; cached in ~/.cache/cmx-bench/). Prompt:
    20 text tokens + 576 random image embeddings (fixed seed, the RMS of the model's own token
    embeddings) + 20 text tokens; 64 greedy tokens decoded with end-of-generation ignored. Random
    weights rank no tokens, so the pruning keeps a fixed budget: the median share the elbow kept
    on (a), times 576.

Configurations (rows): llama-cpp-python dense; cmx dense; cmx CoreMatching tokens only, neurons
only, both (cmx.Sparsity defaults: rho 0.2, beta 0.4, K 2, anchor score).

With `--mrope-compare`, (b) instead compares CoreMatching's prefill speedup (cmx tokens only
against cmx dense, llama-cpp-python dense beside them) on the LLaVA-shaped model with its 576-token
image and on two `qwen2vl` models with a 1,296-token image (a 1024 x 1024 image: a 36 x 36 grid, at
mtmd's grid positions in both engines), at the same kept fraction (--keep-frac, default 0.25):
Qwen2.5-VL-3B's text model (n_embd 2048, n_ff 11008, 36 layers, 16 heads of 128, 2 KV heads, q/k/v
biases, M-RoPE sections 16/24/24/0, rope base 1e6; about 2.9B parameters with the 32000-token
vocabulary it has here instead of its 151936, which would change only the embedding and output
matrices: 1.5 GiB in Q4_0), and, for comparison at the LLaVA model's size, a qwen2vl model of
BIG's shape (n_embd 2048, n_ff 5632, 22 layers) with Qwen2.5-VL's attention and M-RoPE. The ideal
speedup N*L / (N*(K+1) + n*(L-K-1)) counts per-row work only; attention's cost per row grows with
the prompt's length, so a measured speedup somewhat above it is expected.

With `--profiled FILE` (the default text model with a cmx-profile profile, `cmx-profile --gguf ...`),
(a) has two more rows, both CoreMatching tokens + neurons on FILE: `tables only` keeps the
unprofiled defaults' K and kept-fraction bounds, so it differs from `both` only by the tables
(thresholds instead of per-token sorting; the stored core neurons for short prompts); `whole
profile` is FILE at cmx.Sparsity()'s defaults, what a user of the profiled file gets (the profile's
K and bounds too). Their table gives the prefill's selection time (per-token neuron statistics +
token scoring and elbow). (a) then also runs short text prompts (1-3 tokens, `generate`, 16 greedy
tokens; only core neurons act): how many leading tokens each configuration shares with cmx dense.

Every configuration runs in its own worker process (so peak RSS, VmHWM, is its own: model load,
mmap'd weights that were touched, compute buffers and compact weights included), all loaded
at once and called in turn: on (a) question by question, on (b) repetition by repetition
(A B C D E A B C D E ...), all with the same thread count. Timings are medians.

- LLM prefill: cmx's last_stats["prefill_ms"] (the engine's prefill, token selection and compact
  FFN copies included); llama-cpp-python: its llama_decode calls of the prompt (text evals and the
  image chunk's decode, measured around them; the image encode is separate).
- TTFT: wall time from the call until the first answer token is sampled (template, image
  tokenization and encode, prefill); on (b) there is no image encoder: the prompt holds
  embeddings.
- Decode tokens/s: single-token evaluations after the first token, tokens / their time; on (a)
  the median over the questions that decoded any (answers are 1-8 tokens: a few stalls of the
  shared machine, seconds on one token, would dominate a ratio of sums, which the JSON keeps as
  decode_tok_s_pooled).

    python tools/bench_corematching.py [--n-questions 300] [--threads 2] [--reps 3] [--skip-a] [--skip-b]
        [--profiled FILE] [--quick] [--out-md FILE] [--out-json FILE] [--plot FILE.png] [--mrope-compare]

cmx (its Python files and extension) and tools/eval_vqa.py are copied at start and every process
imports that copy: a rebuild of the installed extension during the run (it is overwritten in
place) or edited sources can neither change nor crash the run.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import ctypes
import io
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

CACHE = os.path.expanduser("~/.cache/cmx-bench")
MAX_ANSWER_TOKENS = 8  # as tools/eval_vqa.py

# name, engine, cmx.Sparsity kwargs (None: dense)
CONFIGS = [
    ("llama.cpp dense", "llama_cpp", None),
    ("cmx dense", "cmx", None),
    ("cmx tokens", "cmx", {"tokens": True, "neurons": False}),
    ("cmx neurons", "cmx", {"tokens": False, "neurons": True}),
    ("cmx both", "cmx", {"tokens": True, "neurons": True}),
]
LABELS = {
    "llama.cpp dense": "llama-cpp-python dense",
    "cmx dense": "cmx dense",
    "cmx tokens": "cmx CoreMatching: tokens only",
    "cmx neurons": "cmx CoreMatching: neurons only",
    "cmx both": "cmx CoreMatching: tokens + neurons",
    "cmx profile tables": "cmx CoreMatching, profiled file: tables only",
    "cmx profile": "cmx CoreMatching, profiled file: whole profile",
}
# (a)'s rows on a --profiled file; "unprofiled_bounds": K and bounds as an unprofiled file gets them
PROFILE_CONFIGS = [
    ("cmx profile tables", "cmx", {"tokens": True, "neurons": True, "unprofiled_bounds": True}),
    ("cmx profile", "cmx", {"tokens": True, "neurons": True}),
]
# (a)'s short text prompts: too short for a stable estimate of their own core neurons
SHORT_PROMPTS = ["Hi", "Paris is", "Once upon", "Water", "The sun", "Red and", "I like", "Two plus", "Cats",
                 "Hello there", "My name", "The sky", "Ten", "Apples are", "Dogs can", "Music"]
SHORT_TOKENS = 16

# the ~1B LLaVA-1.5-shaped text model of (b), and the tiny one of --quick
BIG = dict(n_embd=2048, n_ff=5632, n_layer=22, n_head=32, n_head_kv=4, n_vocab=32000, seed=0)
TINY = dict(n_embd=256, n_ff=768, n_layer=4, n_head=8, n_head_kv=2, n_vocab=32000, seed=0)
# --mrope-compare's models with a 36 x 36 image: Qwen2.5-VL-3B's text model (its shape, attention,
# M-RoPE sections and rope base; BIG's 32000-token vocabulary instead of its 151936, which changes
# only the output matrix), and a qwen2vl model of BIG's size; the tiny ones of --quick
QWEN3B = dict(arch="qwen2vl", n_embd=2048, n_ff=11008, n_layer=36, n_head=16, n_head_kv=2, n_vocab=32000, seed=0,
              sections=[16, 24, 24, 0], rope_theta=1e6)
QWEN = dict(BIG, arch="qwen2vl", n_head=16, n_head_kv=2, sections=[16, 24, 24, 0])
TINY_QWEN = dict(TINY, arch="qwen2vl", n_head=2, n_head_kv=1, sections=[16, 24, 24, 0])
TINY_QWEN3B = dict(TINY_QWEN, n_layer=6, rope_theta=1e6)
QWEN_GRID, TINY_QWEN_GRID = (36, 36), (8, 8)
LLAMA_FTYPES = {"q4_0": 2, "q8_0": 7}  # llama_ftype


# ---------------------------------------------------------------- a snapshot of cmx
def pin_cmx() -> None:
    """Import cmx (its Python files, its extension) and tools/eval_vqa.py from a private copy made
    once per run, at its start: the installed extension is overwritten in place by a rebuild, which
    crashes a process that has it loaded, and Python files edited meanwhile would not match it."""
    import llama_cpp  # noqa: F401  loads ggml first, as cmx._lib does

    root = os.environ.get("CMX_BENCH_SNAPSHOT")
    if not root:
        pkg, so = subprocess.check_output(
            [sys.executable, "-c", "import cmx, cmx._core as c; print(cmx.__file__); print(c.__file__)"], text=True).split()
        root = tempfile.mkdtemp(prefix="cmx-bench-")
        atexit.register(shutil.rmtree, root, True)
        shutil.copytree(os.path.dirname(pkg), os.path.join(root, "cmx"), ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        shutil.copy2(so, os.path.join(root, "cmx", os.path.basename(so)))
        shutil.copy2(os.path.join(HERE, "eval_vqa.py"), os.path.join(root, "eval_vqa.py"))
        # the extension's RUNPATH is $ORIGIN/../llama_cpp/lib: the same ggml as llama_cpp's
        os.symlink(os.path.dirname(llama_cpp.__file__), os.path.join(root, "llama_cpp"))
        os.environ["CMX_BENCH_SNAPSHOT"] = root
    # an editable install's finder would still map cmx to the source tree
    sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__module__.startswith("_editable")]
    sys.path.insert(0, root)
    import cmx

    assert os.path.dirname(cmx.__file__) == os.path.join(root, "cmx"), cmx.__file__


# ---------------------------------------------------------------- (b): the random-weight model
def model_name(cfg: dict, ftype: str) -> str:
    c = cfg
    theta = f"-r{int(c['rope_theta'])}" if c.get("rope_theta", 10000.0) != 10000.0 else ""
    return (f"rand-{c.get('arch', 'llama')}-e{c['n_embd']}-ff{c['n_ff']}-l{c['n_layer']}-h{c['n_head']}kv{c['n_head_kv']}"
            f"-v{c['n_vocab']}{theta}-s{c['seed']}-{ftype}.gguf")


def _tensor_specs(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    E, F, V = cfg["n_embd"], cfg["n_ff"], cfg["n_vocab"]
    D = E // cfg["n_head"]
    KV = D * cfg["n_head_kv"]
    specs = [("token_embd.weight", (V, E))]
    for il in range(cfg["n_layer"]):
        p = f"blk.{il}."
        specs += [(p + "attn_norm.weight", (E,)), (p + "attn_q.weight", (E, E)), (p + "attn_k.weight", (KV, E)),
                  (p + "attn_v.weight", (KV, E)), (p + "attn_output.weight", (E, E)), (p + "ffn_norm.weight", (E,)),
                  (p + "ffn_gate.weight", (F, E)), (p + "ffn_up.weight", (F, E)), (p + "ffn_down.weight", (E, F))]
        if cfg.get("arch") == "qwen2vl":  # qwen2's q/k/v biases
            specs += [(p + "attn_q.bias", (E,)), (p + "attn_k.bias", (KV,)), (p + "attn_v.bias", (KV,))]
    specs += [("output_norm.weight", (E,)), ("output.weight", (V, E))]
    return specs


def write_random_f16(path: str, cfg: dict) -> None:
    """A llama (or qwen2vl: cfg["arch"], M-RoPE cfg["sections"], q/k/v biases) GGUF with random F16
    matrices (F32 norms and biases), rope base cfg["rope_theta"] (default 10000), an untied output, and a synthetic
    32000-token SentencePiece vocabulary (<unk> <s> </s>, the 256 byte tokens, then ▁t<i>).
    Written tensor by tensor (gguf-py's tensor-info / tensor-data API) to keep memory low."""
    from gguf import GGUFWriter

    V = cfg["n_vocab"]
    toks = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    types = [2, 3, 3] + [6] * 256  # UNKNOWN, CONTROL, CONTROL, BYTE
    toks += [f"\u2581t{i}" for i in range(V - len(toks))]
    types += [1] * (V - len(types))
    scores = [0.0] * 259 + [-float(i) for i in range(V - 259)]
    E, H = cfg["n_embd"], cfg["n_head"]
    arch = cfg.get("arch", "llama")
    w = GGUFWriter(path, arch)
    w.add_name(f"cmx-bench random {arch}")
    w.add_file_type(1)  # MOSTLY_F16
    w.add_context_length(4096)
    w.add_embedding_length(E)
    w.add_block_count(cfg["n_layer"])
    w.add_feed_forward_length(cfg["n_ff"])
    w.add_head_count(H)
    w.add_head_count_kv(cfg["n_head_kv"])
    w.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(E // H)
    if cfg.get("sections"):
        w.add_rope_dimension_sections(cfg["sections"])
    w.add_vocab_size(V)
    w.add_tokenizer_model("llama")
    w.add_token_list(toks)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    specs = _tensor_specs(cfg)
    for name, shape in specs:
        dt = np.dtype(np.float32 if len(shape) == 1 else np.float16)
        w.add_tensor_info(name, shape, dt, int(np.prod(shape)) * dt.itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(cfg["seed"])
    for name, shape in specs:
        if name.endswith(".bias"):
            arr = (0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
        elif len(shape) == 1:  # RMS norm weights around 1
            arr = (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
        else:  # rows of unit-variance outputs for unit-variance inputs; token embeddings std 0.5
            scale = 0.5 if name == "token_embd.weight" else 1.0 / math.sqrt(shape[1])
            arr = (rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)).astype(np.float16)
        w.write_tensor_data(arr)
    w.close()


def ensure_models(cfg: dict, ftypes: list[str]) -> dict[str, str]:
    """The quantized files, made once (F16 written, quantized, the F16 removed) and cached."""
    import llama_cpp

    from cmx import _lib

    _lib.route_logs()  # the quantizer's per-tensor log lines to cmx's quiet logger
    os.makedirs(CACHE, exist_ok=True)
    paths = {ft: os.path.join(CACHE, model_name(cfg, ft)) for ft in ftypes}
    missing = [ft for ft, p in paths.items() if not os.path.exists(p)]
    if not missing:
        return paths
    f16 = os.path.join(CACHE, model_name(cfg, "f16"))
    if not os.path.exists(f16):
        log(f"writing {f16} (random weights) ...")
        t0 = time.perf_counter()
        write_random_f16(f16 + ".tmp", cfg)
        os.replace(f16 + ".tmp", f16)
        log(f"  {time.perf_counter() - t0:.0f} s, {os.path.getsize(f16) / 2**30:.2f} GiB")
    for ft in missing:
        log(f"quantizing to {ft} with llama.cpp's quantizer ...")
        t0 = time.perf_counter()
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = LLAMA_FTYPES[ft]
        params.nthread = 2
        tmp = paths[ft] + ".tmp"
        if llama_cpp.llama_model_quantize(f16.encode(), tmp.encode(), params) != 0:
            raise RuntimeError(f"llama_model_quantize to {ft} failed")
        os.replace(tmp, paths[ft])
        log(f"  {time.perf_counter() - t0:.0f} s, {os.path.getsize(paths[ft]) / 2**30:.2f} GiB")
    os.remove(f16)
    return paths


def weight_bytes(path: str) -> dict:
    """Bytes of each weight tensor of a GGUF, grouped as read by one decoded token."""
    from gguf import GGUFReader

    r = GGUFReader(path)
    t = {x.name: int(x.n_bytes) for x in r.tensors}
    n_layer = 1 + max(int(n.split(".")[1]) for n in t if n.startswith("blk."))
    vocab = int([x for x in r.tensors if x.name == "token_embd.weight"][0].shape[1])
    ffn = [sum(t[f"blk.{i}.{k}.weight"] for k in ("ffn_gate", "ffn_up", "ffn_down")) for i in range(n_layer)]
    blk = sum(v for n, v in t.items() if n.startswith("blk."))
    out = t["output_norm.weight"] + t.get("output.weight", t["token_embd.weight"])
    embd_row = t["token_embd.weight"] / vocab
    types = {x.name: x.tensor_type.name for x in r.tensors}
    return {"ffn_per_layer": ffn, "blocks": blk, "output": out, "token_embd_row": embd_row,
            "per_token": blk + out + embd_row, "file_bytes": os.path.getsize(path),
            "types": {k: types[k] for k in ("token_embd.weight", "blk.0.ffn_down.weight", "blk.0.attn_q.weight")}
            | {"output.weight": types.get("output.weight", "tied")}}


def b_prompt(n_embd: int, n_img: int, n_text: int, emb_rms: float, seed: int = 1234):
    rng = np.random.default_rng(seed)
    pre = [1] + rng.integers(259, 32000, n_text - 1).tolist()  # BOS + text
    post = rng.integers(259, 32000, n_text).tolist()
    img = (rng.standard_normal((n_img, n_embd), dtype=np.float32) * np.float32(emb_rms)).astype(np.float32)
    return pre, img, post


def token_embd_rms(path: str, n_rows: int = 256) -> float:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    r = GGUFReader(path)
    t = [x for x in r.tensors if x.name == "token_embd.weight"][0]
    rows = dequantize(np.asarray(t.data[1000 : 1000 + n_rows]), t.tensor_type)
    return float(np.sqrt(np.mean(rows.astype(np.float64) ** 2)))


# ---------------------------------------------------------------- workers
class CmxChat:
    """(a) through cmx: Model.chat, fresh cache per question, TTFT from the first sampled token."""

    def __init__(self, spec):
        import cmx
        from eval_vqa import examples

        from cmx import defaults

        if spec.get("model"):  # a profiled copy of the default text model, with the default mmproj and LoRA
            self.m = cmx.Model(spec["model"], mmproj=defaults.default_mmproj(), lora=defaults.default_lora(),
                               n_ctx=2048, n_threads=spec["threads"], n_batch=512)
        else:
            self.m = cmx.Model(n_ctx=2048, n_threads=spec["threads"], n_batch=512)
        self.sp = None
        if spec["sparsity"] is not None:
            kw = dict(spec["sparsity"])
            if kw.pop("unprofiled_bounds", False):  # the defaults a file without a profile gets
                base = cmx.Sparsity().resolved(self.m.info["n_layer"], None)
                kw.update(prune_layer=base.prune_layer, min_keep=base.min_keep, max_keep=base.max_keep)
            self.sp = cmx.Sparsity(**kw)
        self.data = examples("test", spec["n"])
        self.t_first = None
        orig = self.m._decode_loop

        def timed_loop(*a, **k):  # the first token is sampled when the loop first yields (or ends)
            first = True
            try:
                for tok in orig(*a, **k):
                    if first:
                        self.t_first, first = time.perf_counter(), False
                    yield tok
            finally:
                if first:
                    self.t_first = time.perf_counter()

        self.m._decode_loop = timed_loop
        image, q, _, _ = examples("train", 1)[0]  # warm-up (graphs, pages)
        self.answer(image, q)

    def answer(self, image, q):
        from eval_vqa import message

        self.m.reset()
        t0 = time.perf_counter()
        text = self.m.chat(message(image, q, {"type": "image", "image": image}), max_tokens=MAX_ANSWER_TOKENS,
                           sparsity=self.sp)
        st = dict(self.m.last_stats)
        n_img = st["image_tokens"][0]
        kept = st["kept_image_tokens"][0] if st["kept_image_tokens"] and st["kept_image_tokens"][0] else None
        return {"answer": text, "encode_ms": st["encode_ms"], "prefill_ms": st["prefill_ms"],
                "ttft_ms": (self.t_first - t0) * 1e3, "n_decoded": st["n_decoded"], "decode_ms": st["decode_ms"],
                "image_tokens": n_img, "kept": len(kept) if kept is not None else n_img,
                "core_neurons": st["core_neurons"], "n_ff": self.m.info["n_ff"], "n_prompt": st["n_prompt"],
                "select_ms": st["select_ms"], "stats_ms": st["stats_ms"], "compact_ms": st["compact_ms"]}

    def short(self):
        """Greedy continuations of SHORT_PROMPTS (raw text, no chat template)."""
        out = []
        for text in SHORT_PROMPTS:
            self.m.reset()
            toks = self.m.tokenize(text, add_special=True)
            out.append(list(self.m.generate(toks, max_tokens=SHORT_TOKENS, temperature=0.0, sparsity=self.sp)))
        return {"short": out}

    def run(self, msg):
        if msg.get("short"):
            return self.short()
        image, q, _, _ = self.data[msg["i"]]
        return self.answer(image, q)


class _TimedMtmd:
    """llama-cpp-python's mtmd module with the image chunk's evaluation split in two timed calls:
    mtmd_encode_chunk then mtmd_helper_decode_image_chunk, as mtmd_helper_eval_chunk_single does."""

    def __init__(self, mod, rec):
        self._mod, self._rec = mod, rec

    def __getattr__(self, name):
        return getattr(self._mod, name)

    def mtmd_helper_eval_chunk_single(self, mctx, lctx, chunk, n_past, seq_id, n_batch, logits_last, new_n_past):
        m = self._mod
        if m.mtmd_input_chunk_get_type(chunk) == m.MTMD_INPUT_CHUNK_TYPE_TEXT:
            return m.mtmd_helper_eval_chunk_single(mctx, lctx, chunk, n_past, seq_id, n_batch, logits_last, new_n_past)
        t0 = time.perf_counter()
        rc = m.mtmd_encode_chunk(mctx, chunk)
        t1 = time.perf_counter()
        if rc != 0:
            return rc
        embd = m.mtmd_get_output_embd(mctx)
        rc = m.mtmd_helper_decode_image_chunk(mctx, lctx, chunk, embd, n_past, seq_id, n_batch, new_n_past,
                                              m.mtmd_helper_post_decode_callback(), None)  # NULL callback
        t2 = time.perf_counter()
        self._rec["encode"] += t1 - t0
        self._rec["image_decode"] += t2 - t1
        self._rec["n_image"] = m.mtmd_input_chunk_get_n_tokens(chunk)
        return rc


class LlamaCppChat:
    """(a) through stock llama-cpp-python (tools/eval_vqa.py's LlamaCppEngine), timed around its calls."""

    def __init__(self, spec):
        from cmx.defaults import default_mmproj, default_text_model
        from eval_vqa import LlamaCppEngine, examples

        # the same files as cmx.Model(): text model, projector and, where shipped, the demo LoRA
        self.e = LlamaCppEngine(default_text_model(), default_mmproj(), spec["threads"], lora=spec["lora"])
        from cmx import _lib

        _lib.route_logs()  # llama.cpp's and mtmd's logs to cmx's quiet logger, as in the cmx workers
        self.data = examples("test", spec["n"])
        llm = self.e.llm
        self.rec = {}
        handler = llm.chat_handler
        handler._mtmd_cpp = _TimedMtmd(handler._mtmd_cpp, self.rec)
        orig_eval, orig_generate = llm.eval, llm.generate

        def timed_eval(tokens):
            t0 = time.perf_counter()
            orig_eval(tokens)
            self.rec["pre" if self.rec["t_first"] is None else "dec"].append((len(tokens), time.perf_counter() - t0))

        def timed_generate(*a, **k):
            first = True
            try:
                for tok in orig_generate(*a, **k):
                    if first:
                        self.rec["t_first"], first = time.perf_counter(), False
                    yield tok
            finally:
                if first and self.rec["t_first"] is None:
                    self.rec["t_first"] = time.perf_counter()

        llm.eval, llm.generate = timed_eval, timed_generate
        image, q, _, _ = examples("train", 1)[0]
        self.answer(image, q)

    def answer(self, image, q):
        buf = io.BytesIO()
        image.save(buf, "PNG")  # the data URL is made outside the timing
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        from eval_vqa import message

        self.rec.clear()
        self.rec.update(encode=0.0, image_decode=0.0, n_image=0, pre=[], dec=[], t_first=None)
        t0 = time.perf_counter()
        out = self.e.llm.create_chat_completion(
            messages=message(image, q, {"type": "image_url", "image_url": {"url": url}}),
            max_tokens=MAX_ANSWER_TOKENS, temperature=0.0, top_k=1, repeat_penalty=1.0, seed=0)
        r = self.rec
        n_pre = sum(n for n, _ in r["pre"]) + r["n_image"]
        return {"answer": out["choices"][0]["message"]["content"] or "", "encode_ms": r["encode"] * 1e3,
                "prefill_ms": (sum(dt for _, dt in r["pre"]) + r["image_decode"]) * 1e3,
                "ttft_ms": (r["t_first"] - t0) * 1e3, "n_decoded": len(r["dec"]),
                "decode_ms": sum(dt for _, dt in r["dec"]) * 1e3, "image_tokens": r["n_image"], "kept": r["n_image"],
                "core_neurons": [], "n_prompt": n_pre}

    def run(self, msg):
        image, q, _, _ = self.data[msg["i"]]
        return self.answer(image, q)


class CmxGen:
    """(b) through cmx: Model.generate on [text, image embeddings, text], end-of-generation ignored."""

    def __init__(self, spec):
        import cmx

        self.m = cmx.Model(spec["path"], n_ctx=2048, n_threads=spec["threads"], n_batch=512)
        self.m._vocab.is_eog = lambda token: False  # random weights: decode exactly n_gen tokens
        self.sp = cmx.Sparsity(**spec["sparsity"]) if spec["sparsity"] is not None else None
        pre, img, post = b_prompt(self.m.info["n_embd"], spec["n_img"], spec["n_text"], spec["emb_rms"])
        self.prompt = pre + [(img, tuple(spec["grid"])) if spec.get("grid") else img] + post  # M-RoPE: the image's grid
        self.n_gen = spec["n_gen"]
        list(self.m.generate(pre + post, max_tokens=4, sparsity=self.sp))  # warm-up: pages in every weight

    def run(self, msg):
        t0 = time.perf_counter()
        g = self.m.generate(self.prompt, max_tokens=self.n_gen, sparsity=self.sp)
        first = next(g)
        ttft = time.perf_counter() - t0
        toks = [first] + list(g)
        st = dict(self.m.last_stats)
        kept = st["kept_image_tokens"][0] if st["kept_image_tokens"] and st["kept_image_tokens"][0] else None
        return {"prefill_ms": st["prefill_ms"], "ttft_ms": ttft * 1e3, "decode_ms": st["decode_ms"],
                "n_decoded": st["n_decoded"], "kept": len(kept) if kept is not None else st["image_tokens"][0],
                "core_neurons": st["core_neurons"], "n_ff": self.m.info["n_ff"], "n_prompt": st["n_prompt"],
                "select_ms": st["select_ms"], "stats_ms": st["stats_ms"], "compact_ms": st["compact_ms"],
                "tokens": toks}


class LlamaCppGen:
    """(b) through llama-cpp-python's low-level API: the prompt as llama.cpp's mtmd evaluates it
    (token batches for the text, embedding batches of n_batch rows for the image), then greedy
    single-token decodes."""

    def __init__(self, spec):
        import llama_cpp

        self.lc = lc = llama_cpp
        self.llm = lc.Llama(spec["path"], n_ctx=2048, n_batch=512, n_ubatch=512, n_threads=spec["threads"],
                            n_threads_batch=spec["threads"], verbose=False)
        self.ctx = self.llm._ctx.ctx
        self.n_vocab = self.llm.n_vocab()
        n_embd = self.llm.n_embd()
        pre, img, post = b_prompt(n_embd, spec["n_img"], spec["n_text"], spec["emb_rms"])
        self.n_prompt, self.n_img = len(pre) + len(img) + len(post), len(img)
        self.batches, pos = [], 0
        self.batches.append(self._token_batch(pre, pos, False))
        pos += len(pre)
        grid = spec.get("grid")
        self._pos_arrays = []  # M-RoPE embedding batches read 4 positions per row from these
        for b in range(0, len(img), 512):
            rows = np.ascontiguousarray(img[b : b + 512])
            bt = lc.llama_batch_init(len(rows), n_embd, 1)
            ctypes.memmove(bt.embd, rows.ctypes.data, rows.nbytes)
            self._fill(bt, len(rows), pos, False)
            if grid:  # mtmd's grid positions, component by component (t..., row..., column..., 0...)
                i = np.arange(b, b + len(rows))
                comps = np.concatenate([np.full_like(i, pos), pos + i // grid[0], pos + i % grid[0], np.zeros_like(i)])
                arr = (lc.llama_pos * len(comps))(*comps.tolist())
                self._pos_arrays.append(arr)
                bt.pos = ctypes.cast(arr, ctypes.POINTER(lc.llama_pos))  # (never freed: llama_batch_free would free it)
            else:
                pos += len(rows)
            self.batches.append(bt)
        if grid:
            pos += max(grid)  # the text after an image starts past its grid's longer side
        self.batches.append(self._token_batch(post, pos, True))
        self.next_pos = pos + len(post)
        self.one = lc.llama_batch_init(1, 0, 1)
        self._fill(self.one, 1, 0, True)
        self.n_gen = spec["n_gen"]
        self._generate([self._token_batch(pre + post, 0, True)], 4)  # warm-up: pages in every weight

    def _fill(self, b, n, pos0, logits_last):
        b.n_tokens = n
        for i in range(n):
            b.pos[i] = pos0 + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = 1 if (logits_last and i == n - 1) else 0

    def _token_batch(self, toks, pos0, logits_last):
        b = self.lc.llama_batch_init(len(toks), 0, 1)
        for i, t in enumerate(toks):
            b.token[i] = t
        self._fill(b, len(toks), pos0, logits_last)
        return b

    def _argmax(self):
        ptr = self.lc.llama_get_logits_ith(self.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))))

    def _generate(self, batches, n_gen):
        lc = self.lc
        lc.llama_memory_clear(lc.llama_get_memory(self.ctx), True)
        t0 = time.perf_counter()
        for b in batches:
            if lc.llama_decode(self.ctx, b) != 0:
                raise RuntimeError("llama_decode failed")
        t_pre = time.perf_counter()
        tok = self._argmax()
        t_first = time.perf_counter()
        pos = self.next_pos if batches is self.batches else sum(b.n_tokens for b in batches)
        toks, dec = [tok], 0.0
        for _ in range(n_gen):
            self.one.token[0] = tok
            self.one.pos[0] = pos
            t = time.perf_counter()
            if lc.llama_decode(self.ctx, self.one) != 0:
                raise RuntimeError("llama_decode failed")
            tok = self._argmax()
            dec += time.perf_counter() - t
            pos += 1
            toks.append(tok)
        return {"prefill_ms": (t_pre - t0) * 1e3, "ttft_ms": (t_first - t0) * 1e3, "decode_ms": dec * 1e3,
                "n_decoded": n_gen, "tokens": toks[:n_gen]}  # n_gen decodes, as cmx's generate(max_tokens=n_gen) does

    def run(self, msg):
        r = self._generate(self.batches, self.n_gen)
        r.update(kept=self.n_img, core_neurons=[], n_prompt=self.n_prompt)
        return r


RUNNERS = {("a", "cmx"): CmxChat, ("a", "llama_cpp"): LlamaCppChat, ("b", "cmx"): CmxGen, ("b", "llama_cpp"): LlamaCppGen}


def peak_rss_mib() -> float:
    """This process's peak resident set since it started its program: VmHWM, the high-water mark of
    its own address space. (ru_maxrss would do on a shell-started process, but Linux carries the
    forked parent's peak across exec into it: a worker would report at least the parent's.)"""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    proto = os.fdopen(os.dup(1), "w", buffering=1)  # the protocol's channel; stray C output goes to stderr
    os.dup2(2, 1)

    def send(obj):
        proto.write(json.dumps(obj) + "\n")

    try:
        pin_cmx()
        t0 = time.perf_counter()
        runner = RUNNERS[(spec["part"], spec["engine"])](spec)
        send({"ready": True, "load_s": time.perf_counter() - t0})
        for line in sys.stdin:
            msg = json.loads(line)
            if msg["cmd"] == "quit":
                send({"maxrss_mib": peak_rss_mib()})
                return 0
            send(runner.run(msg))
    except Exception:
        send({"error": traceback.format_exc()})
        return 1
    return 0


class Worker:
    def __init__(self, name: str, spec: dict):
        self.name = name
        self.engine = spec["engine"]
        self.p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)

    def recv(self) -> dict:
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"worker '{self.name}' died (exit code {self.p.wait()})")
        r = json.loads(line)
        if "error" in r:
            raise RuntimeError(f"worker '{self.name}' failed:\n{r['error']}")
        return r

    def call(self, msg: dict) -> dict:
        self.p.stdin.write(json.dumps(msg) + "\n")
        return self.recv()

    def quit(self) -> float:
        r = self.call({"cmd": "quit"})
        self.p.wait()
        return r["maxrss_mib"]


_LIVE: list[Worker] = []


@atexit.register
def _kill_workers():
    for w in _LIVE:
        if w.p.poll() is None:
            w.p.kill()


def start_workers(specs: list[tuple[str, dict]]) -> list[Worker]:
    workers = [Worker(name, spec) for name, spec in specs]
    _LIVE.extend(workers)
    for w in workers:
        w.load_s = w.recv()["load_s"]
    return workers


def checkpoint(args, key: str, raw) -> None:
    """The raw results so far, in --out-json + '.partial' (a long run stopped early keeps them)."""
    if not args.out_json:
        return
    path = args.out_json + ".partial"
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        data = {}
    data[key] = raw
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, default=float)
    os.replace(path + ".tmp", path)


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- (a)
def decode_rate_a(rs: list[dict]) -> float:
    """(a)'s decode tokens/s: the median over questions of each answer's decoded tokens / their time."""
    rates = [r["n_decoded"] / (r["decode_ms"] / 1e3) for r in rs if r["n_decoded"] > 0 and r["decode_ms"] > 0]
    return statistics.median(rates) if rates else float("nan")


def a_configs(args) -> list:
    """(a)'s rows: the five, and the profiled file's two when --profiled is given."""
    return CONFIGS + (PROFILE_CONFIGS if getattr(args, "profiled", None) else [])


def run_a(args) -> dict:
    from cmx import scenes
    from eval_vqa import examples, majority_answers

    from cmx import defaults

    n = args.n_questions
    files = {"text": defaults.default_text_model(), "mmproj": defaults.default_mmproj(),
             "lora": getattr(defaults, "default_lora", lambda: None)()}  # what cmx.Model() loads
    configs = a_configs(args)
    profiled = {c[0] for c in PROFILE_CONFIGS}
    specs = [(name, {"part": "a", "engine": eng, "sparsity": sp, "threads": args.threads, "n": n, "lora": files["lora"],
                     "model": args.profiled if name in profiled else None})
             for name, eng, sp in configs]
    log(f"(a) loading {len(specs)} workers ...")
    workers = start_workers(specs)
    data = examples("test", n)
    rows = {w.name: [] for w in workers}
    t0 = time.perf_counter()
    for i in range(n):
        for w in workers:
            rows[w.name].append(w.call({"cmd": "run", "i": i}))
        if (i + 1) % 10 == 0 or i + 1 == n:
            log(f"(a) {i + 1}/{n} questions  {time.perf_counter() - t0:.0f} s")
            checkpoint(args, "a", rows)
    short = {}
    if args.profiled:  # short text prompts: the stored core neurons against the prompt's own
        short = {w.name: w.call({"cmd": "run", "short": True})["short"] for w in workers if w.engine == "cmx"}
    rss = {w.name: w.quit() for w in workers}
    majority = majority_answers()

    summary = {}
    dense = [scenes.normalize_answer(r["answer"]) for r in rows["cmx dense"]]
    for name, _, sp in configs:
        rs = rows[name]
        correct = [scenes.answer_matches(r["answer"], data[i][2]) for i, r in enumerate(rs)]
        n_dec = sum(r["n_decoded"] for r in rs)
        dec_ms = sum(r["decode_ms"] for r in rs)
        sparse_layers = [c for c in (rs[0]["core_neurons"] or []) if c != rs[0].get("n_ff")]
        kept_neurons = [np.mean([c / r["n_ff"] for c in r["core_neurons"] if c != r["n_ff"]])
                        for r in rs if r["core_neurons"] and any(c != r["n_ff"] for c in r["core_neurons"])]
        summary[name] = {
            "accuracy": float(np.mean(correct)),
            "same_as_cmx_dense": float(np.mean([scenes.normalize_answer(r["answer"]) == d for r, d in zip(rs, dense)])),
            "encode_ms": statistics.median(r["encode_ms"] for r in rs),
            "prefill_ms": statistics.median(r["prefill_ms"] for r in rs),
            "ttft_ms": statistics.median(r["ttft_ms"] for r in rs),
            "decode_tok_s": decode_rate_a(rs),
            "decode_tok_s_pooled": n_dec / (dec_ms / 1e3) if dec_ms > 0 else float("nan"),
            "n_decoded": n_dec,
            "kept_median": statistics.median(r["kept"] for r in rs),
            "kept_fraction_median": statistics.median(r["kept"] / r["image_tokens"] for r in rs),
            "kept_min": min(r["kept"] for r in rs), "kept_max": max(r["kept"] for r in rs),
            "kept_neurons": float(np.mean(kept_neurons)) if kept_neurons else 1.0,
            "sparse_layers": len(sparse_layers),
            "peak_rss_mib": rss[name],
            "load_s": [w.load_s for w in workers if w.name == name][0],
        }
        if sp is not None:
            summary[name].update(select_ms=statistics.median(r["select_ms"] for r in rs),
                                 stats_ms=statistics.median(r["stats_ms"] for r in rs),
                                 compact_ms=statistics.median(r["compact_ms"] for r in rs))
    # the elbow's choice is made by the dense prefill: tokens-only and both must keep the same tokens
    same_kept = float(np.mean([a["kept"] == b["kept"] for a, b in zip(rows["cmx tokens"], rows["cmx both"])]))
    qtypes = sorted(set(ex[3] for ex in data))
    per_type = {qt: {name: float(np.mean([scenes.answer_matches(rows[name][i]["answer"], data[i][2])
                                          for i in range(n) if data[i][3] == qt])) for name, _, _ in configs}
                for qt in qtypes}
    baseline = float(np.mean([scenes.answer_matches(majority[ex[3]], ex[2]) for ex in data]))
    short_summary = {}
    for name, outs in short.items():
        lead = [next((j for j, (a, b) in enumerate(zip(o, d)) if a != b), min(len(o), len(d)))
                for o, d in zip(outs, short["cmx dense"])]
        short_summary[name] = {"leading_tokens_as_dense": float(np.mean(lead)),
                               "all_as_dense": float(np.mean([o == d for o, d in zip(outs, short["cmx dense"])]))}
    return {"n_questions": n, "configs": [c[0] for c in configs], "profiled": args.profiled,
            "short_prompts": {"n": len(SHORT_PROMPTS), "max_tokens": SHORT_TOKENS, "summary": short_summary,
                              "tokens": short} if short else None, "files": {k: os.path.basename(v) if v else None for k, v in files.items()}, "summary": summary, "per_type": per_type, "majority_baseline": baseline,
            "kept_equal_tokens_vs_both": same_kept,
            "rows": [{"question": data[i][1], "answer": data[i][2], "qtype": data[i][3],
                      **{name: rows[name][i] for name, _, _ in configs}} for i in range(n)]}


# ---------------------------------------------------------------- (b)
def run_b(args, path: str, budget: int, n_img: int, n_text: int, n_gen: int, configs=CONFIGS, grid=None) -> dict:
    wb = weight_bytes(path)
    rms = token_embd_rms(path)
    specs = []
    for name, eng, sp in configs:
        if sp is not None and sp["tokens"]:
            sp = dict(sp, budget=budget)
        specs.append((name, {"part": "b", "engine": eng, "sparsity": sp, "threads": args.threads, "path": path,
                             "n_img": n_img, "n_text": n_text, "n_gen": n_gen, "emb_rms": rms, "grid": grid}))
    log(f"(b) {os.path.basename(path)}: loading {len(specs)} workers ...")
    workers = start_workers(specs)
    reps = {w.name: [] for w in workers}
    t0 = time.perf_counter()
    for rep in range(args.reps):
        for w in workers:
            reps[w.name].append(w.call({"cmd": "run", "rep": rep}))
        log(f"(b) rep {rep + 1}/{args.reps}  {time.perf_counter() - t0:.0f} s")
        checkpoint(args, "b " + os.path.basename(path), reps)
    rss = {w.name: w.quit() for w in workers}

    n_layer = len(wb["ffn_per_layer"])
    summary = {}
    for name, _, sp in configs:
        rs = reps[name]
        core = rs[-1]["core_neurons"]
        n_ff = rs[-1].get("n_ff")
        sparse = [i for i, c in enumerate(core) if c != n_ff] if core else []
        # bytes a decoded token reads: every weight matrix and norm, the output matrix, one embedding row
        saved = sum(wb["ffn_per_layer"][i] * (1 - core[i] / n_ff) for i in sparse)
        summary[name] = {
            "prefill_ms": statistics.median(r["prefill_ms"] for r in rs),
            "ttft_ms": statistics.median(r["ttft_ms"] for r in rs),
            "decode_tok_s": statistics.median(r["n_decoded"] / (r["decode_ms"] / 1e3) for r in rs),
            "kept": rs[-1]["kept"] if sp is not None and sp.get("tokens") else n_img,
            "kept_neurons": float(np.mean([core[i] / n_ff for i in sparse])) if sparse else 1.0,
            "sparse_layers": len(sparse),
            "beta_effective": float(np.mean([(core[i] / n_ff if i in sparse else 1.0) for i in range(n_layer)])) if core else 1.0,
            "ideal_decode_ratio": wb["per_token"] / (wb["per_token"] - saved),
            "peak_rss_mib": rss[name],
            "load_s": [w.load_s for w in workers if w.name == name][0],
            "tokens": rs[-1]["tokens"],
            "reps": [{k: v for k, v in r.items() if k not in ("core_neurons", "tokens")} for r in rs],
        }
        if sp is not None:
            summary[name].update(select_ms=statistics.median(r["select_ms"] for r in rs),
                                 stats_ms=statistics.median(r["stats_ms"] for r in rs),
                                 compact_ms=statistics.median(r["compact_ms"] for r in rs),
                                 core_neurons=core)
    import cmx

    K = cmx.Sparsity().resolved(n_layer).prune_layer
    N = n_img + 2 * n_text
    n_kept = budget + 2 * n_text
    f_ffn = sum(wb["ffn_per_layer"]) / wb["per_token"]
    return {"file": path, "file_gib": wb["file_bytes"] / 2**30, "weight_types": wb["types"], "image_embd_rms": rms,
            "n_layer": n_layer, "prune_layer": K, "n_prompt": N, "n_prompt_kept": n_kept, "budget": budget,
            "n_gen": n_gen, "f_ffn": f_ffn, "bytes_per_token": wb["per_token"],
            "ideal_prefill_ratio": N * n_layer / (N * (K + 1) + n_kept * (n_layer - K - 1)),
            "greedy_tokens_equal_llama_cpp": summary["cmx dense"]["tokens"] == summary["llama.cpp dense"]["tokens"],
            "summary": summary}


# ---------------------------------------------------------------- --mrope-compare
MROPE_CONFIGS = [c for c in CONFIGS if c[0] in ("llama.cpp dense", "cmx dense", "cmx tokens")]


def run_mrope_compare(args) -> dict:
    """The LLaVA-shaped model, Qwen2.5-VL-3B's text model and a LLaVA-sized qwen2vl model,
    tokens-only CoreMatching at one kept fraction."""
    frac = 0.25 if args.keep_frac is None else args.keep_frac
    ft = args.ftypes.split(",")[0]
    out = {"keep_fraction": frac, "ftype": ft, "models": {}}
    grid = TINY_QWEN_GRID if args.quick else QWEN_GRID
    shapes = [("LLaVA-1.5-shaped llama", TINY if args.quick else BIG, 64 if args.quick else 576, None),
              ("Qwen2.5-VL-3B-shaped qwen2vl", TINY_QWEN3B if args.quick else QWEN3B, None, grid),
              ("LLaVA-sized qwen2vl", TINY_QWEN if args.quick else QWEN, None, grid)]
    for label, cfg, n_img, grid in shapes:
        n_img = n_img or grid[0] * grid[1]
        budget = max(1, round(frac * n_img))
        path = ensure_models(cfg, [ft])[ft]
        log(f"(b, mrope) {label}: {n_img} image tokens, keeping {budget}")
        r = run_b(args, path, budget, n_img, 8 if args.quick else 20, args.n_gen, MROPE_CONFIGS, grid)
        r["model"], r["n_img"], r["grid"] = dict(cfg), n_img, grid
        out["models"][label] = r
    return out


def mrope_report(res: dict) -> str:
    M = res["mrope_compare"]
    lines = [f"Tokens-only CoreMatching at a kept fraction of {M['keep_fraction']} ({M['ftype']}, {res['threads']} threads, "
             f"medians of {res['reps']} reps; {res['machine']}):", "",
             "| model | image tokens | prompt (kept) | llama-cpp-python dense prefill | cmx dense prefill | cmx tokens prefill | "
             "speedup (cmx dense / tokens) | ideal | llama.cpp / cmx dense time | greedy = llama.cpp |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    shapes = []
    for label, r in M["models"].items():
        s = r["summary"]
        lc, dense, tok = (s[k]["prefill_ms"] for k in ("llama.cpp dense", "cmx dense", "cmx tokens"))
        grid = f" ({r['grid'][0]} x {r['grid'][1]})" if r["grid"] else ""
        lines.append(f"| {label} | {r['n_img']}{grid} | {r['n_prompt']} ({r['n_prompt_kept']}) | {lc:.0f} ms | {dense:.0f} ms | "
                     f"{tok:.0f} ms | {dense / tok:.2f}x | {r['ideal_prefill_ratio']:.2f}x | {lc / dense:.3f} | "
                     f"{r['greedy_tokens_equal_llama_cpp']} |")
        c = r["model"]
        shapes.append(f"{label}: {c.get('arch', 'llama')}, n_embd {c['n_embd']}, n_ff {c['n_ff']}, {c['n_layer']} layers, "
                      f"{c['n_head']} heads / {c['n_head_kv']} KV heads, vocab {c['n_vocab']}, rope base "
                      f"{c.get('rope_theta', 10000.0):g}" + (f", M-RoPE sections {c['sections']}" if c.get("sections") else "")
                      + f"; K = {r['prune_layer']} of {r['n_layer']} layers")
    lines += ["", "Models (random weights): " + "; ".join(shapes) + ".",
              "Ideal: N*L / (N*(K+1) + n*(L-K-1)) with N prompt rows, n kept rows; it counts per-row work only (attention's "
              "cost per row grows with the prompt, so a measured speedup somewhat above it is expected)."]
    return "\n".join(lines) + "\n"


def write_mrope_outputs(res: dict, args) -> int:
    save_report(mrope_report(res), res, args)
    return 0


# ---------------------------------------------------------------- report
def kept_neurons_cell(r: dict) -> str:
    """A configuration's kept-neuron share, as the tables show it."""
    return f"{r['kept_neurons']:.3f} ({r['sparse_layers']} layers)" if r["sparse_layers"] else "1 (dense)"


def ratio(a, b):
    return a / b if b else float("nan")


def build_report(res: dict) -> tuple[str, list[dict]]:
    A, B = res.get("a"), res.get("b", {})
    lines = [f"threads {res['threads']}, reps {res['reps']}, {res['machine']}; `{res['command']}`", ""]
    if res.get("quick"):
        lines[0] = "**Smoke run (--quick): 4 questions, a tiny random model, one repetition; the numbers mean nothing.** " + lines[0]
    targets = []
    acc = {n: A["summary"][n]["accuracy"] for n, _, _ in CONFIGS} if A else {}
    a_names = A.get("configs", [c[0] for c in CONFIGS]) if A else []
    if A:
        s = A["summary"]
        ref = s["llama.cpp dense"]
        files = " + ".join(v for v in A["files"].values() if v)
        lines += [f"### (a) demo VLM ({files}), {A['n_questions']} held-out questions "
                  f"(majority baseline {A['majority_baseline']:.1%})", "",
                  "| configuration | accuracy | same answer as cmx dense | encode ms | LLM prefill ms | TTFT ms | decode tok/s | peak RSS MiB | kept tokens (median, min-max) | kept neurons |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name in a_names:
            r = s[name]
            lines.append(f"| {LABELS[name]} | {r['accuracy']:.1%} | {r['same_as_cmx_dense']:.1%} | {r['encode_ms']:.0f} | "
                         f"{r['prefill_ms']:.0f} ({ratio(ref['prefill_ms'], r['prefill_ms']):.2f}x) | "
                         f"{r['ttft_ms']:.0f} ({ratio(ref['ttft_ms'], r['ttft_ms']):.2f}x) | "
                         f"{r['decode_tok_s']:.1f} ({ratio(r['decode_tok_s'], ref['decode_tok_s']):.2f}x) | "
                         f"{r['peak_rss_mib']:.0f} | {r['kept_median']:g} ({r['kept_min']}-{r['kept_max']}) | {kept_neurons_cell(r)} |")
        lines += ["", "Medians over questions (decode: of each answer's tokens after the first / their time; peak RSS: VmHWM of the "
                  "configuration's own worker process); (x): against llama-cpp-python dense. "
                  f"Tokens only and both kept the same image tokens on {A['kept_equal_tokens_vs_both']:.1%} of questions; "
                  f"the elbow's median kept fraction {s['cmx both']['kept_fraction_median']:.4f}.", ""]
        lines += ["| question type | " + " | ".join(LABELS[n] for n in a_names) + " |",
                  "|---|" + "---|" * len(a_names)]
        for qt, v in A["per_type"].items():
            lines.append(f"| {qt} | " + " | ".join(f"{v[n]:.1%}" for n in a_names) + " |")
        lines.append("")
        if A.get("profiled"):
            lines += profile_table(A)
        targets += [
            {"target": "(a) TTFT >= 2x llama-cpp-python", "measured": ratio(ref["ttft_ms"], s["cmx both"]["ttft_ms"]), "goal": 2.0,
             "detail": f"{ref['ttft_ms']:.0f} ms -> {s['cmx both']['ttft_ms']:.0f} ms"},
            {"target": "(a) accuracy within 1 point of dense cmx", "measured": 100 * (s["cmx both"]["accuracy"] - s["cmx dense"]["accuracy"]),
             "goal": -1.0, "detail": f"{s['cmx dense']['accuracy']:.1%} -> {s['cmx both']['accuracy']:.1%} (points)"},
        ]
    for ft, b in B.items():
        s = b["summary"]
        ref = s["llama.cpp dense"]
        lines += [f"### (b) {ft.upper()}: random-weight LLaVA-1.5-shaped llama, {b['file_gib']:.2f} GiB "
                  f"({b['n_layer']} layers), prompt {b['n_prompt']} rows ({b['n_prompt'] - b['n_prompt_kept'] + b['budget']} "
                  f"image embeddings + text), {b['n_gen']} decoded tokens", "",
                  "| configuration | LLM prefill ms | decode tok/s | TTFT ms | peak RSS MiB | kept tokens | kept neurons | accuracy (a) |",
                  "|---|---|---|---|---|---|---|---|"]
        n_img = b["n_prompt"] - (b["n_prompt_kept"] - b["budget"])
        for name, _, _ in CONFIGS:
            r = s[name]
            accuracy = f"{acc[name]:.1%}" if A else "n/a"
            lines.append(f"| {LABELS[name]} | {r['prefill_ms']:.0f} ({ratio(ref['prefill_ms'], r['prefill_ms']):.2f}x) | "
                         f"{r['decode_tok_s']:.2f} ({ratio(r['decode_tok_s'], ref['decode_tok_s']):.2f}x) | "
                         f"{r['ttft_ms']:.0f} ({ratio(ref['ttft_ms'], r['ttft_ms']):.2f}x) | {r['peak_rss_mib']:.0f} | "
                         f"{r['kept']}/{n_img} | {kept_neurons_cell(r)} | {accuracy} |")
        both, dense, neur = s["cmx both"], s["cmx dense"], s["cmx neurons"]
        lines += ["", "Medians over repetitions. Peak RSS: VmHWM of the configuration's own worker process (model "
                  "load, the mmap'd weights it touched, buffers, compact FFN copies). "
                  f"(x): against llama-cpp-python dense. Weights read per decoded token {b['bytes_per_token'] / 2**20:.0f} MiB, "
                  f"f_ffn = {b['f_ffn']:.3f} ({b['weight_types']}); K = {b['prune_layer']}, budget {b['budget']} tokens; "
                  f"ideal prefill ratio N*L/(N*(K+1)+n*(L-K-1)) = {b['ideal_prefill_ratio']:.2f}x; ideal decode ratio "
                  f"(kept neurons, {both['sparse_layers']} sparse layers) = {both['ideal_decode_ratio']:.3f}x "
                  f"(beta_effective {both['beta_effective']:.3f}); against cmx dense, cmx CoreMatching (both) prefills "
                  f"{ratio(dense['prefill_ms'], both['prefill_ms']):.2f}x faster (tokens only "
                  f"{ratio(dense['prefill_ms'], s['cmx tokens']['prefill_ms']):.2f}x) and decodes "
                  f"{ratio(both['decode_tok_s'], dense['decode_tok_s']):.2f}x (neurons only "
                  f"{ratio(neur['decode_tok_s'], dense['decode_tok_s']):.2f}x); cmx dense's greedy tokens "
                  f"{'equal' if b['greedy_tokens_equal_llama_cpp'] else 'DIFFER from'} llama-cpp-python's.", ""]
        ideal = both["ideal_decode_ratio"]
        targets += [
            {"target": f"(b) {ft}: LLM prefill >= 2.5x llama-cpp-python", "measured": ratio(ref["prefill_ms"], both["prefill_ms"]),
             "goal": 2.5, "detail": f"{ref['prefill_ms']:.0f} ms -> {both['prefill_ms']:.0f} ms (ideal {b['ideal_prefill_ratio']:.2f}x)"},
            {"target": f"(b) {ft}: TTFT >= 2x llama-cpp-python", "measured": ratio(ref["ttft_ms"], both["ttft_ms"]),
             "goal": 2.0, "detail": f"{ref['ttft_ms']:.0f} ms -> {both['ttft_ms']:.0f} ms"},
            {"target": f"(b) {ft}: decode >= 85% of ideal {ideal:.3f}x (both vs llama-cpp-python dense)",
             "measured": ratio(both["decode_tok_s"], ref["decode_tok_s"]) / ideal, "goal": 0.85,
             "detail": f"{ref['decode_tok_s']:.2f} -> {both['decode_tok_s']:.2f} tok/s = {ratio(both['decode_tok_s'], ref['decode_tok_s']):.3f}x"},
            {"target": f"(b) {ft}: decode >= 85% of ideal {neur['ideal_decode_ratio']:.3f}x (neurons only vs cmx dense)",
             "measured": ratio(neur["decode_tok_s"], dense["decode_tok_s"]) / neur["ideal_decode_ratio"], "goal": 0.85,
             "detail": f"{dense['decode_tok_s']:.2f} -> {neur['decode_tok_s']:.2f} tok/s = {ratio(neur['decode_tok_s'], dense['decode_tok_s']):.3f}x"},
        ]
    if B:
        bb = res["b_budget"]
        lines += [f"(b)'s token budget: {bb['tokens']} of {bb['of']} image tokens, kept fraction {bb['fraction']:.4f} "
                  f"({bb['source']}).", ""]
    lines += ["### Targets (cmx CoreMatching at the defaults: tokens + neurons)", "", "| target | measured | met |", "|---|---|---|"]
    for t in targets:
        unit = " points" if "points" in t["detail"] else ("" if "85%" in t["target"] else "x")
        m = t["measured"]
        shown = f"{m:+.1f}{unit}" if unit == " points" else (f"{m:.0%} of ideal" if "85%" in t["target"] else f"{m:.2f}{unit}")
        t["met"] = bool(m >= t["goal"]) if not math.isnan(m) else False
        lines.append(f"| {t['target']} | {shown}: {t['detail']} | {'yes' if t['met'] else 'NO'} |")
    return "\n".join(lines) + "\n", targets


def profile_table(A: dict) -> list[str]:
    """(a)'s rows with and without the profiled file's tables: the prefill's selection time, speed,
    accuracy, and the short text prompts."""
    s, short = A["summary"], (A.get("short_prompts") or {}).get("summary", {})
    lines = [f"#### What the profile's tables buy ({os.path.basename(A['profiled'])})", "",
             "| configuration | selection ms (statistics + scoring/elbow) | LLM prefill ms | TTFT ms | decode tok/s | "
             "kept tokens (median) | accuracy | short prompts: leading tokens as dense | short prompts: all as dense |",
             "|---|---|---|---|---|---|---|---|---|"]
    dense_len = short.get("cmx dense", {}).get("leading_tokens_as_dense", float("nan"))  # its continuations' mean length
    for name in ("cmx both", "cmx profile tables", "cmx profile", "cmx neurons"):
        r, sh = s[name], short.get(name, {})
        lines.append(f"| {LABELS[name]} | {r['stats_ms'] + r['select_ms']:.1f} ({r['stats_ms']:.1f} + {r['select_ms']:.1f}) | "
                     f"{r['prefill_ms']:.0f} | {r['ttft_ms']:.0f} | {r['decode_tok_s']:.1f} | {r['kept_median']:g} | "
                     f"{r['accuracy']:.1%} | {sh.get('leading_tokens_as_dense', float('nan')):.2f} of {dense_len:.1f} | "
                     f"{sh.get('all_as_dense', float('nan')):.0%} |")
    lines += ["", f"Medians over the questions. Short prompts: {A['short_prompts']['n']} text prompts of 1-3 tokens, "
              f"greedy, at most {A['short_prompts']['max_tokens']} tokens (dense's end after {dense_len:.1f} on average), no chat "
              "template, compared token by token with cmx dense's continuation (a CoreMatching "
              "row's image-token pruning has no image to act on there: only its core neurons do).", ""]
    return lines


def make_plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    A, B = res.get("a"), res.get("b", {})
    panels = (1 if B else 0) + (2 if A else 0)
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.2), squeeze=False)
    axes = list(axes[0])
    marks = {"llama.cpp dense": "s", "cmx dense": "o", "cmx tokens": "^", "cmx neurons": "v", "cmx both": "*",
             "cmx profile tables": "P", "cmx profile": "X"}
    if B:
        ax = axes.pop(0)
        for ft, b in B.items():
            s = b["summary"]
            ref = s["llama.cpp dense"]
            n_img = b["n_prompt"] - (b["n_prompt_kept"] - b["budget"])
            L, K, N, nt = b["n_layer"], b["prune_layer"], b["n_prompt"], b["n_prompt"] - n_img
            xs = np.arange(1, n_img + 1)
            ideal = ref["prefill_ms"] / s["cmx dense"]["prefill_ms"] * N * L / (N * (K + 1) + (xs + nt) * (L - K - 1))
            (line,) = ax.plot(xs, ideal, "--", lw=1, label=f"{ft}: ideal prefill (from cmx dense)")
            for name, _, _ in CONFIGS:
                r = s[name]
                ax.plot(r["kept"], ratio(ref["prefill_ms"], r["prefill_ms"]), marks[name], color=line.get_color(), ms=9 if name == "cmx both" else 6)
                ax.plot(r["kept"], ratio(r["decode_tok_s"], ref["decode_tok_s"]), marks[name], color=line.get_color(), mfc="none", ms=8)
        ax.set_xlim(0, 600)
        ax.set_xlabel("kept image tokens (of 576)")
        ax.set_ylabel("speed vs llama-cpp-python dense (x)")
        ax.set_title("(b) ~1B random LLaVA-shaped: prefill (filled), decode (open)", fontsize=9)
        ax.axhline(1, color="grey", lw=0.5)
        for name, _, _ in CONFIGS:  # marker legend
            ax.plot([], [], marks[name], color="grey", label=LABELS[name])
        ax.legend(fontsize=7)
    if A:
        ax = axes.pop(0)
        ref = [r["llama.cpp dense"] for r in A["rows"]]
        for name in ("cmx dense", "cmx tokens", "cmx both"):
            xs = [r[name]["kept"] for r in A["rows"]]
            ys = [a["ttft_ms"] / r[name]["ttft_ms"] for a, r in zip(ref, A["rows"])]
            ax.plot(xs, ys, marks[name], ms=4, alpha=0.5, label=LABELS[name])
        ax.set_xlim(0, 600)
        ax.set_xlabel("kept image tokens (per question, of 576)")
        ax.set_ylabel("TTFT speedup vs llama-cpp-python (x)")
        ax.set_title("(a) demo VLM: time to first token, per question", fontsize=9)
        ax.axhline(1, color="grey", lw=0.5)
        ax.legend(fontsize=7)
        ax = axes.pop(0)
        for name in A.get("configs", [c[0] for c in CONFIGS]):
            r = A["summary"][name]
            ax.plot(r["kept_median"], 100 * r["accuracy"], marks[name], ms=9, label=LABELS[name])
        ax.axhline(100 * A["majority_baseline"], color="grey", lw=0.8, ls=":", label="majority baseline")
        ax.set_xlim(0, 600)
        ax.set_xlabel("kept image tokens (median over questions, of 576)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"(a) demo VLM: accuracy on {A['n_questions']} questions", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def save_report(md: str, res: dict, args) -> None:
    """The report (printed, --out-md) and every number (--out-json)."""
    print(md)
    if args.out_md:
        with open(args.out_md, "w") as f:
            f.write(md)
    if args.out_json:
        with open(args.out_json, "w") as f:
            json.dump(res, f, indent=1, default=float)


def write_outputs(res: dict, args) -> int:
    """The report (printed, --out-md), every number (--out-json) and the plot (--plot)."""
    md, res["targets"] = build_report(res)
    save_report(md, res, args)
    if args.plot:
        make_plot(res, args.plot)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-questions", type=int, default=300, help="(a): held-out questions (default 300)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3, help="(b): repetitions of each configuration (default 3)")
    ap.add_argument("--skip-a", action="store_true")
    ap.add_argument("--skip-b", action="store_true")
    ap.add_argument("--ftypes", default="q4_0,q8_0", help="(b): file types (default q4_0,q8_0)")
    ap.add_argument("--n-gen", type=int, default=64, help="(b): decoded tokens (default 64)")
    ap.add_argument("--keep-frac", type=float, help="(b): kept image-token share (default: the elbow's median on (a))")
    ap.add_argument("--profiled", help="(a): also the rows of this profiled copy of the default text model (cmx-profile)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 4 questions, a tiny random model, 64 image rows, 1 rep")
    ap.add_argument("--out-md", help="write the markdown tables here")
    ap.add_argument("--out-json", help="write every number here")
    ap.add_argument("--plot", help="write a PNG plot here (needs matplotlib: pip install '.[bench]')")
    ap.add_argument("--report-from", metavar="JSON", help="rebuild --out-md / --plot from a finished run's --out-json "
                    "(recomputes (a)'s decode medians from its rows)")
    ap.add_argument("--mrope-compare", action="store_true",
                    help="(b) only: prefill speedup of tokens-only CoreMatching on the LLaVA-shaped model (576 image tokens), "
                    "Qwen2.5-VL-3B's text model and a LLaVA-sized qwen2vl model (1296 each), at --keep-frac (default 0.25); "
                    "--ftypes' first type")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    if args.report_from:
        with open(args.report_from) as f:
            res = json.load(f)
        if res.get("a"):
            A = res["a"]
            for name in A.get("configs", [c[0] for c in CONFIGS]):
                A["summary"][name]["decode_tok_s"] = decode_rate_a([r[name] for r in A["rows"]])
        return write_outputs(res, args)
    if args.quick:
        args.n_questions = min(args.n_questions, 4)
        args.reps = 1
        args.n_gen = min(args.n_gen, 8)
    if args.out_json and os.path.exists(args.out_json + ".partial"):
        os.remove(args.out_json + ".partial")
    pin_cmx()
    import llama_cpp

    import cmx

    cpu = ""
    try:
        cpu = [ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")][0]
    except (OSError, IndexError):
        pass
    res = {"threads": args.threads, "reps": args.reps, "quick": args.quick, "machine": f"{cpu}, {os.cpu_count()} cores",
           "llama_cpp_python": llama_cpp.__version__, "sparsity_defaults": cmx.Sparsity().__dict__,
           "command": " ".join([os.path.basename(sys.executable)] + sys.argv), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    t0 = time.perf_counter()
    if args.mrope_compare:
        res["mrope_compare"] = run_mrope_compare(args)
        res["seconds"] = time.perf_counter() - t0
        return write_mrope_outputs(res, args)
    if not args.skip_a:
        res["a"] = run_a(args)
    if not args.skip_b:
        if args.keep_frac is not None:
            frac, src = args.keep_frac, "--keep-frac"
        elif "a" in res:
            frac, src = res["a"]["summary"]["cmx both"]["kept_fraction_median"], "median elbow on (a)"
        else:
            frac, src = 0.1, "default 0.1 (no (a) run and no --keep-frac)"
        cfg, n_img, n_text = (TINY, 64, 8) if args.quick else (BIG, 576, 20)
        budget = max(1, round(frac * n_img))
        res["b_budget"] = {"fraction": frac, "source": src, "tokens": budget, "of": n_img}
        log(f"(b) budget {budget}/{n_img} image tokens ({src})")
        paths = ensure_models(cfg, args.ftypes.split(","))
        res["b_model"] = dict(cfg)
        res["b"] = {ft: run_b(args, p, budget, n_img, n_text, args.n_gen) for ft, p in paths.items()}
    res["seconds"] = time.perf_counter() - t0
    return write_outputs(res, args)


if __name__ == "__main__":
    sys.exit(main())

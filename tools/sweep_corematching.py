#!/usr/bin/env python3
"""Accuracy and kept image tokens of CoreMatching settings on the demo VLM's held-out questions.

Each question is answered by every setting in turn (same model, greedy), so the settings are
compared on the same questions. Used to choose the defaults (docs/decisions.md).

    python tools/sweep_corematching.py --n 60 --threads 2 \
        --configs "dense" "anchor" "paper" "anchor,K=8" "paper,K=8"

A setting is "dense" or comma-separated: anchor|paper, K=<prune layer>, min=<min_keep>,
max=<max_keep>, budget=<tokens>, beta=<beta>, rho=<rho>, tokens-only, neurons-only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cmx  # noqa: E402
from cmx import scenes  # noqa: E402
from eval_vqa import examples  # noqa: E402


def parse_config(text: str):
    if text == "dense":
        return None
    kw = {}
    for part in text.split(","):
        if part in ("anchor", "paper"):
            kw["score"] = part
        elif part == "tokens-only":
            kw["neurons"] = False
        elif part == "neurons-only":
            kw["tokens"] = False
        else:
            key, value = part.split("=")
            name = {"K": "prune_layer", "min": "min_keep", "max": "max_keep", "budget": "budget", "beta": "beta", "rho": "rho"}[key]
            kw[name] = int(value) if name in ("prune_layer", "budget") else float(value)
    return cmx.Sparsity(**kw)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--configs", nargs="+", default=["dense", "anchor", "paper"])
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--out", help="JSON with every answer")
    args = ap.parse_args()

    configs = {c: parse_config(c) for c in args.configs}
    m = cmx.Model(n_ctx=2048, n_threads=args.threads)
    rows = {c: {"correct": 0, "kept": [], "prefill_ms": [], "answers": []} for c in configs}
    for i, (image, question, answer, qtype) in enumerate(examples("test", args.n)):
        msg = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
        for name, sp in configs.items():
            m.reset()
            out = m.chat(msg, max_tokens=args.max_tokens, sparsity=sp)
            r = rows[name]
            r["correct"] += scenes.normalize_answer(out) == scenes.normalize_answer(answer)
            kept = m.last_stats["kept_image_tokens"]
            r["kept"].append(len(kept[0]) if kept else 576)
            r["prefill_ms"].append(m.last_stats["prefill_ms"])
            r["answers"].append(out)
        so_far = "  ".join(f"{name}: {r['correct']}/{i + 1} kept {r['kept'][-1]}" for name, r in rows.items())
        print(f"[{i + 1}/{args.n}] {time.strftime('%H:%M:%S')}  {so_far}", file=sys.stderr, flush=True)
    n = args.n
    print(f"{n} held-out questions (question types in turn)")
    print("| setting | accuracy | kept image tokens (median) | LLM prefill ms (median) |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {100 * r['correct'] / n:.1f}% | {statistics.median(r['kept']):.0f} / 576 | "
              f"{statistics.median(r['prefill_ms']):.0f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"n": n, "configs": args.configs, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

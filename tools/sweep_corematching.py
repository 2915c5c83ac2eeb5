#!/usr/bin/env python3
"""Accuracy and kept image tokens of CoreMatching settings on the demo VLM's held-out questions.

Each question is answered by every setting in turn (same model, greedy), so the settings are
compared on the same questions. Used to choose the defaults (docs/decisions.md).

    python tools/sweep_corematching.py --n 60 --threads 2 \
        --configs "dense" "anchor" "paper" "anchor,K=8" "paper,K=8"

"object patches kept": the share of the patches holding part of an object (from the scene's
drawing) that the selection kept; random selection keeps the kept fraction of them.

A setting is "dense" or comma-separated: anchor|paper, K=<prune layer>, min=<min_keep>,
max=<max_keep>, budget=<tokens>, beta=<beta>, rho=<rho>, tokens-only, neurons-only, text / all-tokens
(core neurons from the text tokens alone / from every token), and for
equal-budget comparisons random|divprune (with budget=, seed=).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cmx  # noqa: E402
from cmx import scenes  # noqa: E402


def parse_config(text: str):
    if text == "dense":
        return None
    kw = {}
    for part in text.split(","):
        if part in ("anchor", "paper"):
            kw["score"] = part
        elif part in ("random", "divprune"):
            kw["select"] = part
        elif part == "tokens-only":
            kw["neurons"] = False
        elif part == "neurons-only":
            kw["tokens"] = False
        elif part in ("text", "all-tokens"):  # the core neurons from the text rows / every row
            kw["neuron_tokens"] = "text" if part == "text" else "all"
        else:
            key, value = part.split("=")
            name = {"K": "prune_layer", "min": "min_keep", "max": "max_keep", "budget": "budget", "beta": "beta", "rho": "rho",
                    "seed": "seed"}[key]
            kw[name] = int(value) if name in ("prune_layer", "budget", "seed") else float(value)
    return cmx.Sparsity(**kw)


def object_patches(scene) -> np.ndarray:
    """(576,) bool: the 14x14 patches of the 24x24 grid that hold any pixel of an object."""
    lab = scenes.label_map(scene)
    g = scenes.IMAGE_SIZE // 14
    return (lab.reshape(g, 14, g, 14).max(axis=(1, 3)) > 0).reshape(-1)


def answer_questions(task):
    """One worker: answer questions [start, stop) of the test split with every setting."""
    texts, split, variant, start, stop, threads, max_tokens, device = task
    configs = {c: parse_config(c) for c in texts}
    m = cmx.Model(n_ctx=2048, n_threads=threads, device=device)
    out = []
    for i, seed in enumerate(scenes.split_seeds(split, stop)):  # the questions of eval_vqa.examples
        if i < start:
            continue
        scene, question, answer, qtype = scenes.make_example_full(seed, scenes.QUESTION_TYPES[i % len(scenes.QUESTION_TYPES)],
                                                                  variant)
        objects = object_patches(scene)
        msg = [{"role": "user", "content": [{"type": "image", "image": scene.image}, {"type": "text", "text": question}]}]
        per = {}
        for name, sp in configs.items():
            m.reset()
            text = m.chat(msg, max_tokens=max_tokens, sparsity=sp)
            kept = m.last_stats["kept_image_tokens"]
            kept_objects = objects[np.asarray(kept[0], np.int64)].sum() if kept else objects.sum()
            per[name] = {"object_recall": float(kept_objects / max(objects.sum(), 1)),"correct": scenes.normalize_answer(text) == scenes.normalize_answer(answer),
                         "kept": len(kept[0]) if kept else 576, "prefill_ms": m.last_stats["prefill_ms"],
                         "answer": text}
        out.append((i, qtype, per))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--split", default="val", choices=["val", "test"],
                    help="questions to answer (default val: defaults are chosen there, reported on test)")
    ap.add_argument("--variant", default="standard", choices=sorted(scenes.VARIANTS),
                    help="scene variant (default standard: the demo model's training distribution)")
    ap.add_argument("--threads", type=int, default=2, help="threads per worker")
    ap.add_argument("--workers", type=int, default=1, help="processes answering questions in parallel "
                    "(prefill ms are then only comparable within this run)")
    ap.add_argument("--configs", nargs="+", default=["dense", "anchor", "paper"])
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--chunk", type=int, default=10, help="questions per task handed to a worker")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"], help="cmx.Model's device (default auto)")
    ap.add_argument("--out", help="JSON with every answer")
    args = ap.parse_args()

    for c in args.configs:
        parse_config(c)  # fail before any work
    chunk = args.chunk
    tasks = [(args.configs, args.split, args.variant, s, min(s + chunk, args.n), args.threads, args.max_tokens, args.device)
             for s in range(0, args.n, chunk)]
    rows = {c: {"correct": 0, "kept": [], "object_recall": [], "prefill_ms": [], "answers": [], "by_type": {}}
            for c in args.configs}
    results = []
    if args.workers > 1:
        import multiprocessing as mp

        pool = mp.get_context("spawn").Pool(args.workers)
        parts = pool.imap_unordered(answer_questions, tasks)
    else:
        parts = map(answer_questions, tasks)
    for part in parts:
        results.extend(part)
        done = {c: sum(p[c]["correct"] for _, _, p in results) for c in args.configs}
        so_far = "  ".join(f"{c}: {done[c]}/{len(results)}" for c in args.configs)
        print(f"[{len(results)}/{args.n}] {time.strftime('%H:%M:%S')}  {so_far}", file=sys.stderr, flush=True)
        if args.out:  # what a run stopped early had answered
            with open(args.out + ".partial", "w") as f:
                json.dump(results, f)
    results.sort(key=lambda r: r[0])
    for _, qtype, per in results:
        for c, r in per.items():
            row = rows[c]
            row["correct"] += r["correct"]
            row["kept"].append(r["kept"])
            row["object_recall"].append(r["object_recall"])
            row["prefill_ms"].append(r["prefill_ms"])
            row["answers"].append(r["answer"])
            t = row["by_type"].setdefault(qtype, [0, 0])
            t[0] += r["correct"]
            t[1] += 1
    n = len(results)
    types = sorted(rows[args.configs[0]]["by_type"])
    print(f"{n} held-out questions of the {args.split} split, {args.variant} scenes (question types in turn)")
    print("| setting | accuracy | kept image tokens (median) | object patches kept (mean) | LLM prefill ms (median) | "
          + " | ".join(types) + " |")
    print("|---|---|---|---|---|" + "---|" * len(types))
    for name, r in rows.items():
        by = " | ".join(f"{100 * r['by_type'][t][0] / r['by_type'][t][1]:.0f}%" for t in types)
        print(f"| {name} | {100 * r['correct'] / n:.1f}% | {statistics.median(r['kept']):.0f} / 576 | "
              f"{100 * statistics.mean(r['object_recall']):.0f}% | {statistics.median(r['prefill_ms']):.0f} | {by} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"n": n, "configs": args.configs, "device": args.device, "rows": rows,
                       "questions": [[i, qtype] for i, qtype, _ in results]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Why answers differ between two devices (the CPU and a GPU), question by question, on the demo
VLM's held-out questions: dense and with CoreMatching's defaults.

    python tools/device_agreement.py --n 200 --a cpu --b gpu --workers 4 --threads 4 --out agree.json

For every question and setting, both models answer (greedy) and give the first answer token's
logits. Per question it records:
- the answers, and whether they agree (normalised as the benchmark scores them);
- `margin`: device A's gap between its two highest logits. A near tie (small margin) flips under
  any change of arithmetic;
- `d_margin`: how much device B moves that gap (A's top two tokens, B's logits), and `d_max`, the
  largest change of any logit;
- dense only, which half of the pipeline the change comes from: a third model on device B is given
  device A's image embeddings (`cross`: B's language model on A's image encoder), and `embd_rel`,
  the image embeddings' largest difference relative to their largest value.
The summary splits agreement by question type and by margin.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

import cmx
from cmx import scenes

SETTINGS = ("dense", "corematching")  # dense, and CoreMatching at cmx.Sparsity()'s defaults


def top_two(logits: np.ndarray) -> tuple[int, int]:
    i, j = np.argsort(logits)[-2:][::-1]
    return int(i), int(j)


def first_logits(m: cmx.Model, msg: list, sparsity) -> np.ndarray:
    """The logits of the first answer token, from a fresh cache. `_prefill_chat` is the prefill
    `chat` runs before it decodes; no public call returns these logits."""
    m.reset()
    return np.array(m._prefill_chat(msg, sparsity), np.float32)


def answer(m: cmx.Model, msg: list, sparsity, max_tokens: int) -> str:
    m.reset()
    return m.chat(msg, max_tokens=max_tokens, sparsity=sparsity)


def work(task):
    """One worker: questions [start, stop) of the split, every setting, both devices."""
    split, start, stop, dev_a, dev_b, threads, max_tokens = task
    a = cmx.Model(n_ctx=2048, n_threads=threads, device=dev_a)
    b = cmx.Model(n_ctx=2048, n_threads=threads, device=dev_b)
    cross = cmx.Model(n_ctx=2048, n_threads=threads, device=dev_b)  # B's language model, A's embeddings
    sparsity = {"dense": None, "corematching": cmx.Sparsity()}
    out = []
    for i, seed in enumerate(scenes.split_seeds(split, stop)):
        if i < start:
            continue
        scene, question, truth, qtype = scenes.make_example_full(seed, scenes.QUESTION_TYPES[i % len(scenes.QUESTION_TYPES)])
        msg = [{"role": "user", "content": [{"type": "image", "image": scene.image}, {"type": "text", "text": question}]}]
        row = {"i": i, "type": qtype, "truth": truth}
        for name in SETTINGS:
            sp = sparsity[name]
            la, lb = first_logits(a, msg, sp), first_logits(b, msg, sp)
            t1, t2 = top_two(la)
            r = {"answer_a": answer(a, msg, sp, max_tokens), "answer_b": answer(b, msg, sp, max_tokens),
                 "margin": float(la[t1] - la[t2]), "d_margin": float((lb[t1] - lb[t2]) - (la[t1] - la[t2])),
                 "d_max": float(np.abs(la - lb).max()), "first_same": int(np.argmax(la)) == int(np.argmax(lb))}
            if sp is None:
                digest, embd_a = next(reversed(a._image_embd._items.items()))  # this question's image, as A encoded it
                embd_b = b._image_embd.get(digest)
                r["embd_rel"] = float(np.abs(embd_a - embd_b).max() / np.abs(embd_a).max())
                cross._image_embd.put(digest, embd_a)
                lc = first_logits(cross, msg, None)
                r["answer_cross"] = answer(cross, msg, None, max_tokens)
                r["d_max_llm"] = float(np.abs(la - lc).max())      # same embeddings, the language model's device
                r["d_max_encoder"] = float(np.abs(lc - lb).max())  # same language model device, the encoder's
                r["d_margin_llm"] = float((lc[t1] - lc[t2]) - (la[t1] - la[t2]))
            row[name] = r
        out.append(row)
    return out


def summarize(rows: list, dev_a: str, dev_b: str) -> str:
    norm = scenes.normalize_answer
    lines = [f"{len(rows)} questions, device A = {dev_a}, device B = {dev_b}", "",
             "| setting | answers agree | agree, position questions left out | first token same | accuracy A | accuracy B |",
             "|---|---|---|---|---|---|"]
    for name in SETTINGS:
        same = [norm(r[name]["answer_a"]) == norm(r[name]["answer_b"]) for r in rows]
        nopos = [s for s, r in zip(same, rows) if r["type"] != "position"]
        acc = [sum(norm(r[name][k]) == norm(r["truth"]) for r in rows) / len(rows) for k in ("answer_a", "answer_b")]
        lines.append(f"| {name} | {sum(same)}/{len(rows)} ({100 * sum(same) / len(rows):.1f}%) | "
                     f"{sum(nopos)}/{len(nopos)} ({100 * sum(nopos) / max(len(nopos), 1):.1f}%) | "
                     f"{sum(r[name]['first_same'] for r in rows)}/{len(rows)} | {100 * acc[0]:.1f}% | {100 * acc[1]:.1f}% |")
    lines += ["", "Dense, by question type: answers agree; median first-token margin (A); median |margin change| (B - A)", "",
              "| type | agree | median margin | median abs d_margin |", "|---|---|---|---|"]
    for t in scenes.QUESTION_TYPES:
        sub = [r["dense"] for r in rows if r["type"] == t]
        if sub:
            agree = sum(norm(s["answer_a"]) == norm(s["answer_b"]) for s in sub)
            lines.append(f"| {t} | {agree}/{len(sub)} | {statistics.median(s['margin'] for s in sub):.3f} | "
                         f"{statistics.median(abs(s['d_margin']) for s in sub):.4f} |")
    d = [r["dense"] for r in rows]
    lines += ["", "Dense, by first-token margin on A:", "", "| margin | questions | answers agree |", "|---|---|---|"]
    for lo, hi in ((0, 0.05), (0.05, 0.2), (0.2, 1), (1, float("inf"))):
        sub = [s for s in d if lo <= s["margin"] < hi]
        agree = sum(norm(s["answer_a"]) == norm(s["answer_b"]) for s in sub)
        lines.append(f"| [{lo}, {hi}) | {len(sub)} | {agree} |")
    cross_same = sum(norm(s["answer_a"]) == norm(s["answer_cross"]) for s in d)
    lines += ["", f"Dense, where the difference comes from (medians over questions): image embeddings' largest relative "
              f"difference {statistics.median(s['embd_rel'] for s in d):.2e}; largest logit change from the language "
              f"model's device alone (same embeddings) {statistics.median(s['d_max_llm'] for s in d):.4f}, from the "
              f"encoder's device alone {statistics.median(s['d_max_encoder'] for s in d):.4f}; |margin change| from the "
              f"language model alone {statistics.median(abs(s['d_margin_llm']) for s in d):.4f}, in all "
              f"{statistics.median(abs(s['d_margin']) for s in d):.4f}. B's language model on A's embeddings answers as A "
              f"on {cross_same}/{len(d)} questions."]
    lines += ["", "Disagreements (dense): question, type, A / B / B on A's embeddings, margin, margin change:"]
    for r in rows:
        s = r["dense"]
        if norm(s["answer_a"]) != norm(s["answer_b"]):
            lines.append(f"- {r['i']} {r['type']}: {s['answer_a']!r} / {s['answer_b']!r} / {s['answer_cross']!r}, "
                         f"margin {s['margin']:.3f}, change {s['d_margin']:+.3f}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--split", default="test", choices=["val", "test"])
    ap.add_argument("--a", default="cpu", choices=["cpu", "gpu"], help="device A (default cpu)")
    ap.add_argument("--b", default="gpu", choices=["cpu", "gpu"], help="device B (default gpu)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads per model")
    ap.add_argument("--workers", type=int, default=1, help="processes, each with its own models")
    ap.add_argument("--chunk", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--out", help="JSON with every question's record")
    ap.add_argument("--summary", help="the summary as Markdown")
    args = ap.parse_args()
    if args.n < 1 or args.workers < 1 or args.chunk < 1:
        ap.error("--n, --workers and --chunk must be positive")
    tasks = [(args.split, s, min(s + args.chunk, args.n), args.a, args.b, args.threads, args.max_tokens)
             for s in range(0, args.n, args.chunk)]
    rows: list = []
    if args.workers > 1:
        import multiprocessing as mp

        parts = mp.get_context("spawn").Pool(args.workers).imap_unordered(work, tasks)
    else:
        parts = map(work, tasks)
    for part in parts:
        rows.extend(part)
        print(f"[{len(rows)}/{args.n}] {time.strftime('%H:%M:%S')}", file=sys.stderr, flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(sorted(rows, key=lambda r: r["i"]), f)
    rows.sort(key=lambda r: r["i"])
    text = summarize(rows, args.a, args.b)
    print(text)
    if args.summary:
        with open(args.summary, "w") as f:
            f.write(f"`python {' '.join(sys.argv)}`\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

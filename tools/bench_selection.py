#!/usr/bin/env python3
"""Equal-budget comparison of image-token selections on cmx's engine (issue 10).

Every method prunes at the same place (after layer K = 2, original RoPE positions, tokens only:
decode FFNs dense, so only the choice of tokens differs) and keeps the same number of image
tokens: k = 32, 64, 128, 192, and "elbow", per question the count CoreMatching's elbow keeps
(anchor score, no floor). Methods (cmx.Sparsity(select=...)):

  anchor    CoreMatching, anchor score (the default score)
  paper     CoreMatching, the paper's score (core neurons of the prompt)
  fastv     FastV: the prompt's last token's attention at layer K, averaged over heads
  divprune  DivPrune: max-min cosine diversity subset of the projected image embeddings
  pool      average pooling of the 24 x 24 token grid to the closest gh x gw grid
  random    a seeded uniform subset

Three subcommands:

  accuracy  the demo VLM (cmx.Model()) on held-out questions of tools/eval_vqa.py's split
            (question types in turn, greedy, at most 8 answer tokens), every method at every k,
            plus dense. One JSON line per question in --out (resumable: questions already there
            are skipped; several runs, e.g. on different machines, can fill disjoint ranges).
  timing    LLM prefill ms of every method at every k (elbow: --elbow-k) on the ~1B
            LLaVA-1.5-shaped random-weight model of tools/bench_corematching.py (Q4_0; prompt of
            20 text tokens + 576 image embeddings + 20), configurations in turn per repetition,
            medians; also the selection's own time (scoring and choosing: select_ms; for
            CoreMatching also the neuron statistics of layer K its scores need: stats_ms).
  report    the markdown tables and the PNG plot (accuracy against kept tokens, one line per
            method, dense as a horizontal line) from the JSON files.

    python tools/bench_selection.py accuracy --n 500 --variant standard --workers 2 --threads 1 \\
        --out tools/runs/bench_selection/acc_standard.jsonl
    python tools/bench_selection.py timing --reps 3 --threads 2 --out tools/runs/bench_selection/timing.json
    python tools/bench_selection.py report --acc tools/runs/bench_selection/acc_*.jsonl \\
        --timing tools/runs/bench_selection/timing.json --out-md tools/runs/bench_selection/report.md \\
        --plot tools/runs/bench_selection/accuracy.png
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

METHODS = ("anchor", "paper", "fastv", "divprune", "pool", "random")
LABELS = {"anchor": "CoreMatching (anchor)", "paper": "CoreMatching (paper score)", "fastv": "FastV",
          "divprune": "DivPrune", "pool": "pooling", "random": "random"}
BUDGETS = (32, 64, 128, 192)
MAX_ANSWER_TOKENS = 8  # as tools/eval_vqa.py


def sparsity_for(method: str, k: int | None, seed: int = 0):
    """cmx.Sparsity of `method` keeping k image tokens (None: the anchor score's elbow, no floor)."""
    import cmx

    if k is None:
        return cmx.Sparsity(tokens=True, neurons=False, min_keep=0.0)
    if method in ("anchor", "paper"):
        return cmx.Sparsity(tokens=True, neurons=False, score=method, budget=k)
    return cmx.Sparsity(tokens=True, neurons=False, select=method, budget=k, seed=seed)


# ---------------------------------------------------------------- accuracy
def answer_one(task):
    """All configurations on question i (in a worker: one cmx.Model per process)."""
    i, split, variant, threads = task
    import cmx
    from cmx import scenes
    from sweep_corematching import object_patches

    global _MODEL
    if "_MODEL" not in globals():
        _MODEL = cmx.Model(n_ctx=2048, n_threads=threads)
    m = _MODEL
    seed = scenes.split_seeds(split, i + 1)[i]
    scene, question, answer, qtype = scenes.make_example_full(seed, scenes.QUESTION_TYPES[i % len(scenes.QUESTION_TYPES)],
                                                              variant)
    objects = object_patches(scene)
    msg = [{"role": "user", "content": [{"type": "image", "image": scene.image}, {"type": "text", "text": question}]}]

    def run(sp):
        m.reset()
        text = m.chat(msg, max_tokens=MAX_ANSWER_TOKENS, sparsity=sp)
        st = m.last_stats
        kept = st["kept_image_tokens"][0]
        return {"answer": text, "correct": scenes.normalize_answer(text) == scenes.normalize_answer(answer),
                "kept": len(kept), "object_recall": round(float(objects[np.asarray(kept, np.int64)].sum() / max(objects.sum(), 1)), 4),
                "prefill_ms": round(st["prefill_ms"], 1), "select_ms": round(st["select_ms"], 3)}

    runs = {"dense": run(None), "anchor@elbow": run(sparsity_for("anchor", None))}
    e = runs["anchor@elbow"]["kept"]
    for method in METHODS:
        for k in BUDGETS:
            runs[f"{method}@{k}"] = run(sparsity_for(method, k, seed=i))
        if method != "anchor":  # the others at the elbow's count of this question
            runs[f"{method}@elbow"] = runs[f"{method}@{e}"] if e in BUDGETS else run(sparsity_for(method, e, seed=i))
    return {"i": i, "qtype": qtype, "variant": variant, "split": split, "truth": answer, "elbow_k": e, "runs": runs}


def cmd_accuracy(args) -> int:
    done = set()
    if os.path.exists(args.out):
        with open(args.out) as f:
            for line in f:
                if line.strip():
                    done.add(json.loads(line)["i"])
    todo = [i for i in range(args.start, args.n) if i not in done]
    print(f"{len(done)} questions already in {args.out}; {len(todo)} to answer", file=sys.stderr)
    tasks = [(i, args.split, args.variant, args.threads) for i in todo]
    if args.workers > 1:
        import multiprocessing as mp

        pool = mp.get_context("spawn").Pool(args.workers)
        results = pool.imap_unordered(answer_one, tasks)
    else:
        results = map(answer_one, tasks)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    t0 = time.time()
    with open(args.out, "a") as f:
        for n, r in enumerate(results, 1):
            f.write(json.dumps(r) + "\n")
            f.flush()
            if n % 10 == 0 or n == len(tasks):
                rate = n / (time.time() - t0)
                print(f"[{n}/{len(tasks)}] {time.strftime('%H:%M:%S')} {rate * 60:.1f} questions/min", file=sys.stderr, flush=True)
    return 0


# ---------------------------------------------------------------- timing on the ~1B model
def cmd_timing(args) -> int:
    import cmx
    from bench_corematching import BIG, b_prompt, ensure_models, token_embd_rms

    path = ensure_models(BIG, ["q4_0"])["q4_0"]
    m = cmx.Model(path, n_ctx=2048, n_threads=args.threads, n_batch=512)
    pre, img, post = b_prompt(m.info["n_embd"], 576, 20, token_embd_rms(path))
    prompt = pre + [img] + post
    configs = [("dense", None)] + [(f"{meth}@{k}", sparsity_for(meth, k)) for k in BUDGETS + (args.elbow_k,) for meth in METHODS]
    list(m.generate(pre + post, max_tokens=2))  # pages in every weight
    samples = {name: [] for name, _ in configs}
    for rep in range(args.reps):
        for name, sp in configs:
            list(m.generate(prompt, max_tokens=1, sparsity=sp))
            st = m.last_stats
            samples[name].append({"prefill_ms": st["prefill_ms"], "select_ms": st["select_ms"], "stats_ms": st["stats_ms"],
                                  "kept": len(st["kept_image_tokens"][0]) if st["kept_image_tokens"] else 576})
        print(f"rep {rep + 1}/{args.reps} done {time.strftime('%H:%M:%S')}", file=sys.stderr, flush=True)
    out = {"model": os.path.basename(path), "threads": args.threads, "reps": args.reps, "elbow_k": args.elbow_k,
           "cpu": _cpu_name(), "samples": samples,
           "median": {name: {key: statistics.median(s[key] for s in v) for key in ("prefill_ms", "select_ms", "stats_ms", "kept")}
                      for name, v in samples.items()}}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    return 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f", {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{os.cpu_count()} cores"


# ---------------------------------------------------------------- report
def load_accuracy(paths: list[str]) -> dict[str, list[dict]]:
    """variant -> question records (first record of each question index wins)."""
    by_variant: dict[str, dict[int, dict]] = {}
    for p in paths:
        with open(p) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    by_variant.setdefault(r["variant"], {}).setdefault(r["i"], r)
    return {v: [q[i] for i in sorted(q)] for v, q in by_variant.items()}


def points(records: list[dict]) -> dict:
    """method -> list of (k label, median kept, accuracy %, object recall %); plus dense."""
    n = len(records)
    acc = lambda key: 100.0 * sum(r["runs"][key]["correct"] for r in records) / n  # noqa: E731
    out = {"n": n, "dense": acc("dense"), "elbow_median": statistics.median(r["elbow_k"] for r in records)}
    for method in METHODS:
        rows = []
        for k in list(BUDGETS) + ["elbow"]:
            key = f"{method}@{k}"
            kept = statistics.median(r["runs"][key]["kept"] for r in records)
            recall = 100.0 * statistics.mean(r["runs"][key]["object_recall"] for r in records)
            rows.append((str(k), kept, acc(key), recall))
        out[method] = rows
    return out


def sign_test_p(a: int, b: int) -> float:
    """Two-sided exact sign test: a questions only one method answers, b only the other."""
    n, k = a + b, min(a, b)
    if n == 0:
        return 1.0
    return min(1.0, 2.0 * sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n)


def paired_lines(acc: dict[str, list[dict]], ks=(64, 128), ours: str = "anchor") -> list[str]:
    """CoreMatching (anchor) against the best other method at each k, question by question."""
    lines = ["CoreMatching (anchor) against the best other method at that k, on the same questions: questions "
             "only one of the two answers, and the two-sided sign test's p.\n",
             "| scenes | k | CoreMatching | best other | only CoreMatching | only the other | p |", "|---|---|---|---|---|---|---|"]
    for variant in sorted(acc, key=lambda v: (v != "standard", v)):
        recs = acc[variant]
        for k in ks:
            correct = {m: [r["runs"][f"{m}@{k}"]["correct"] for r in recs] for m in METHODS}
            other = max((m for m in METHODS if m != ours), key=lambda m: sum(correct[m]))
            only_ours = sum(a and not b for a, b in zip(correct[ours], correct[other]))
            only_other = sum(b and not a for a, b in zip(correct[ours], correct[other]))
            n = len(recs)
            lines.append(f"| {variant} ({n}) | {k} | {100 * sum(correct[ours]) / n:.1f}% | {LABELS[other]} "
                         f"{100 * sum(correct[other]) / n:.1f}% | {only_ours} | {only_other} | {sign_test_p(only_ours, only_other):.2f} |")
    lines.append("")
    return lines


def build_report(acc: dict[str, list[dict]], timing: dict | None) -> str:
    lines = []
    for variant in sorted(acc, key=lambda v: (v != "standard", v)):
        recs = acc[variant]
        p = points(recs)
        split = recs[0]["split"]
        lines.append(f"**{variant} scenes**, {p['n']} held-out questions ({split} split); dense {p['dense']:.1f}%; "
                     f"CoreMatching's elbow kept {p['elbow_median']:.0f} tokens (median)\n")
        head = [f"k = {k}" for k in BUDGETS] + [f"elbow ({p['elbow_median']:.0f})"]
        lines.append("| method | " + " | ".join(head) + " |")
        lines.append("|---|" + "---|" * len(head))
        for method in METHODS:
            best = [max(p[m][j][2] for m in METHODS) for j in range(len(head))]
            cells = [(f"**{a:.1f}%**" if a == best[j] else f"{a:.1f}%") + f" ({rec:.0f}%)"
                     for j, (_, _, a, rec) in enumerate(p[method])]
            lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("Accuracy (share of object patches kept, mean); bold: the best method at that k.\n")
    lines += paired_lines(acc)
    if timing:
        med = timing["median"]
        dense = med["dense"]["prefill_ms"]
        lines.append(f"**LLM prefill ms** on the ~1B random-weight model ({timing['model']}; {timing['cpu']}; "
                     f"{timing['threads']} threads; median of {timing['reps']}; dense {dense:.0f} ms); "
                     "in brackets the selection's own share of the pruned prefill: scoring and choosing, and for "
                     "CoreMatching the neuron statistics of layer K that its scores are made from\n")
        ks = list(BUDGETS) + [timing["elbow_k"]]
        lines.append("| method | " + " | ".join(f"k = {k}" for k in ks) + " |")
        lines.append("|---|" + "---|" * len(ks))
        for method in METHODS:
            cells = []
            for k in ks:
                r = med[f"{method}@{k}"]
                own = r["select_ms"] + r.get("stats_ms", 0.0)
                cells.append(f"{r['prefill_ms']:.0f} ({100 * own / r['prefill_ms']:.2f}%)")
            lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def make_plot(acc: dict[str, list[dict]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = sorted(acc, key=lambda v: (v != "standard", v))
    fig, axes = plt.subplots(1, len(variants), figsize=(5.2 * len(variants), 4.2), squeeze=False)
    for ax, variant in zip(axes[0], variants):
        p = points(acc[variant])
        for method in METHODS:
            xs = [kept for _, kept, _, _ in p[method]]
            ys = [a for _, _, a, _ in p[method]]
            order = np.argsort(xs)
            ax.plot(np.asarray(xs)[order], np.asarray(ys)[order], marker="o", label=LABELS[method])
        ax.axhline(p["dense"], color="k", linestyle="--", label="dense (576)")
        ax.set_xscale("log", base=2)
        ax.set_xticks([32, 64, 128, 192])
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("kept image tokens (of 576)")
        ax.set_ylabel("accuracy %")
        ax.set_title(f"{variant} scenes, {p['n']} questions")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def cmd_report(args) -> int:
    paths = sorted(p for pattern in args.acc for p in glob.glob(pattern))
    acc = load_accuracy(paths)
    timing = json.load(open(args.timing)) if args.timing and os.path.exists(args.timing) else None
    md = build_report(acc, timing)
    print(md)
    if args.out_md:
        with open(args.out_md, "w") as f:
            f.write(md + "\n")
    if args.plot:
        make_plot(acc, args.plot)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("accuracy")
    a.add_argument("--n", type=int, default=500, help="questions 0..n-1 of the split")
    a.add_argument("--start", type=int, default=0)
    a.add_argument("--split", default="test", choices=["test", "val"])
    a.add_argument("--variant", default="standard", choices=["standard", "crowded", "small"])
    a.add_argument("--workers", type=int, default=1)
    a.add_argument("--threads", type=int, default=1, help="threads per worker")
    a.add_argument("--out", required=True)
    t = sub.add_parser("timing")
    t.add_argument("--reps", type=int, default=3)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--elbow-k", type=int, default=64, help="kept tokens of the 'elbow' column (random weights rank nothing: "
                   "take the demo model's median elbow count)")
    t.add_argument("--out", required=True)
    r = sub.add_parser("report")
    r.add_argument("--acc", nargs="+", required=True, help="accuracy JSONL files (globs allowed)")
    r.add_argument("--timing")
    r.add_argument("--out-md")
    r.add_argument("--plot")
    args = ap.parse_args(argv)
    return {"accuracy": cmd_accuracy, "timing": cmd_timing, "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())

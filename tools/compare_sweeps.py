#!/usr/bin/env python3
"""Whether two tools/sweep_corematching.py runs over the same questions gave the same answers, per
setting: e.g. the CPU run against the GPU run (--device cpu / gpu) of the demo model.

    python tools/compare_sweeps.py cpu.json gpu.json

For every setting both runs hold: the share of questions whose normalised answers agree (and
whose raw answers are identical), each run's accuracy, and the questions that differ.
"""

from __future__ import annotations

import json
import sys

from cmx.scenes import normalize_answer


def truth(run: dict) -> list[str]:
    """The reference answers of a run's questions (the test split, as sweep_corematching asks them)."""
    from cmx import scenes

    n = max(i for i, _ in run["questions"]) + 1
    seeds = scenes.split_seeds("test", n)
    return [scenes.make_example_full(seeds[i], scenes.QUESTION_TYPES[i % len(scenes.QUESTION_TYPES)])[2] for i, _ in run["questions"]]


def load(path: str) -> dict:
    """A run's --out JSON, or the .partial file of a run stopped early (its answered questions)."""
    data = json.load(open(path))
    if isinstance(data, dict):
        return data
    data.sort(key=lambda r: r[0])
    configs = list(data[0][2]) if data else []
    rows = {c: {"answers": [per[c]["answer"] for _, _, per in data], "correct": sum(per[c]["correct"] for _, _, per in data)}
            for c in configs}
    return {"configs": configs, "rows": rows, "questions": [[i, qtype] for i, qtype, _ in data]}


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    a, b = (load(p) for p in argv[1:])
    common = sorted({i for i, _ in a["questions"]} & {i for i, _ in b["questions"]})  # a partial run: the shared ones
    for run in (a, b):
        keep = [k for k, (i, _) in enumerate(run["questions"]) if i in set(common)]
        run["questions"] = [run["questions"][k] for k in keep]
        for row in run["rows"].values():
            row["answers"] = [row["answers"][k] for k in keep]
    n = len(common)
    print(f"{n} questions: {argv[1]} ({a.get('device', '?')}) against {argv[2]} ({b.get('device', '?')})")
    print("| setting | answers agree (normalised) | identical text | accuracy A | accuracy B |")
    print("|---|---|---|---|---|")
    differ = {}
    for c in a["configs"]:
        if c not in b["rows"]:
            continue
        xa, xb = a["rows"][c]["answers"], b["rows"][c]["answers"]
        same = sum(normalize_answer(p) == normalize_answer(q) for p, q in zip(xa, xb))
        exact = sum(p == q for p, q in zip(xa, xb))
        differ[c] = [(a["questions"][i][0], p, q) for i, (p, q) in enumerate(zip(xa, xb)) if p != q]
        acc = [sum(normalize_answer(x) == normalize_answer(t) for x, t in zip(r["rows"][c]["answers"], truth(r))) for r in (a, b)]
        print(f"| {c} | {same}/{n} ({100 * same / n:.1f}%) | {exact}/{n} | {100 * acc[0] / n:.1f}% | {100 * acc[1] / n:.1f}% |")
    for c, rows in differ.items():
        for i, p, q in rows:
            print(f"{c} question {i}: {p!r} / {q!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

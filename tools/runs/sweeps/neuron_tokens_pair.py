"""Paired comparison: the test sweep (text) against bench_corematching's (a) rows (all), same questions,
scored as the benchmark scores (scenes.answer_matches).

    python tools/runs/sweeps/neuron_tokens_pair.py tools/runs/sweeps/neuron_tokens_test300.json
"""
import json, math, os, sys
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "python"))
from cmx import scenes
b = json.load(open(os.path.join(os.path.dirname(__file__), "..", "bench_corematching", "bench.json")))["a"]["rows"]
path = sys.argv[1]
sw = json.load(open(path))
if isinstance(sw, list):  # a .partial file: (index, qtype, {config: {...}})
    rows = sw
else:  # the finished JSON: answers per config, in the order of "questions"
    rows = [(i, qt, {c: {"answer": sw["rows"][c]["answers"][j]} for c in sw["configs"]})
            for j, (i, qt) in enumerate(sw["questions"])]
def ok(ans, ref): return scenes.answer_matches(ans, ref)
def sign_p(a, b):  # two-sided exact sign test
    n = a + b; k = min(a, b)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0
pairs = {"neurons-only,text": "cmx neurons", "anchor,text": "cmx both"}
for new, old in pairs.items():
    n = wins = losses = c_new = c_old = c_dense = same_dense = 0
    for i, qt, per in rows:
        q = b[i]
        a_new = ok(per[new]["answer"], q["answer"]); a_old = ok(q[old]["answer"], q["answer"]); a_d = ok(q["cmx dense"]["answer"], q["answer"])
        n += 1; c_new += a_new; c_old += a_old; c_dense += a_d
        wins += a_new and not a_old; losses += a_old and not a_new
        same_dense += scenes.normalize_answer(per[new]["answer"]) == scenes.normalize_answer(q["cmx dense"]["answer"])
    print(f"{new}: {c_new}/{n} = {100*c_new/n:.1f}%  | all-tokens ({old}) {c_old}/{n} = {100*c_old/n:.1f}% | dense {c_dense}/{n} = {100*c_dense/n:.1f}%"
          f" | text right where all wrong {wins}, opposite {losses}, sign test p = {sign_p(wins, losses):.3f} | same answer as dense {same_dense}/{n}")

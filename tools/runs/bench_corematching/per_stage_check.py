"""Per-stage check of tokens-only CoreMatching's prefill (session 10): in one cmx process, the
dense prefill of the whole prompt (N rows), the pruned prefill (tokens only, a fixed budget), and
the dense prefill of a prompt as long as the pruned one keeps (n rows: 20 text tokens, an image of
the kept size, 20 text tokens), alternating. The pruned prefill runs layers 0..K on N rows and the
rest on n, so (K+1)/L * dense(N) + (L-K-1)/L * dense(n) predicts it, attention included; a pruned
path with extra costs would come out slower than that.

    python tools/runs/bench_corematching/per_stage_check.py MODEL.gguf llava|qwen   # R=reps (default 2)

llava: 576 image rows (LLaVA-shaped model), budget 144; qwen: a 36 x 36 grid (1296 rows), budget
324, kept-size image 18 x 18. Models: tools/bench_corematching.py's cached random files."""
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import bench_corematching as bc  # noqa: E402

import cmx  # noqa: E402

path, mode = sys.argv[1], sys.argv[2]
reps = int(os.environ.get("R", 2))
m = cmx.Model(path, n_ctx=2048, n_threads=2, n_batch=512)
m._vocab.is_eog = lambda t: False
rms = bc.token_embd_rms(path)
E, L = m.info["n_embd"], m.info["n_layer"]


def prompt(n_img, grid=None):
    pre, img, post = bc.b_prompt(E, n_img, 20, rms)
    return pre + [(img, grid) if grid else img] + post


if mode == "qwen":
    full, small, budget, N = prompt(1296, (36, 36)), prompt(324, (18, 18)), 324, 1336
else:
    full, small, budget, N = prompt(576), prompt(144), 144, 616
n = budget + 40
sp = cmx.Sparsity(tokens=True, neurons=False, budget=budget)
list(m.generate(prompt(8, (2, 4)) if mode == "qwen" else prompt(8), max_tokens=2))  # warm-up
res = {"dense N": [], "tokens": [], "dense n": []}
for _ in range(reps):
    for name, p, s in (("dense N", full, None), ("tokens", full, sp), ("dense n", small, None)):
        list(m.generate(p, max_tokens=1, sparsity=s))
        res[name].append(m.last_stats["prefill_ms"])
med = {k: statistics.median(v) for k, v in res.items()}
K = cmx.Sparsity().resolved(L).prune_layer
expected = (K + 1) / L * med["dense N"] + (L - K - 1) / L * med["dense n"]
print(f"{os.path.basename(path)}: N {N}, n {n}, K {K}, L {L}; prefill ms", {k: [round(x) for x in v] for k, v in res.items()})
print(f"tokens prefill {med['tokens']:.0f} ms, per-stage estimate {expected:.0f} ms; speedup measured "
      f"{med['dense N'] / med['tokens']:.2f}x, estimated {med['dense N'] / expected:.2f}x, ideal "
      f"{N * L / (N * (K + 1) + n * (L - K - 1)):.2f}x; dense ms per row: {med['dense N'] / N:.2f} at N, {med['dense n'] / n:.2f} at n")

import time, numpy as np
from cmx._core import Engine
path = "/root/.cache/cmx-bench/rand-llama-e2048-ff5632-l22-h32kv4-v32000-s0-q4_0.gguf"
e = Engine(path, n_ctx=512, n_batch=512, n_threads=2, use_gpu=False)
rng = np.random.default_rng(0)
sets = [[] if il in (0, 21) else sorted(rng.choice(5632, 2272, replace=False).tolist()) for il in range(22)]
i32 = lambda a: np.asarray(a, np.int32)
prompt = rng.integers(100, 30000, 40).astype(np.int32)
def decode_rate(n=48):
    e.clear()
    e.decode(prompt, i32(np.arange(len(prompt))), i32([len(prompt) - 1]))
    tok = 1000; pos = len(prompt)
    t = time.perf_counter()
    for k in range(n):
        e.decode(i32([tok]), i32([pos]), i32([0])); pos += 1
    return n / (time.perf_counter() - t)
res = {"fresh": [], "reused": []}
for r in range(6):
    for mode in ("fresh", "reused"):
        if mode == "fresh": e.set_ffn_neurons([])  # releases (current code): the next build maps new pages
        t = time.perf_counter(); e.set_ffn_neurons(sets); b = (time.perf_counter() - t) * 1e3
        res[mode].append((round(b), round(decode_rate(), 1)))
for k, v in res.items(): print(k, v, "median tok/s", np.median([x[1] for x in v]), "median build ms", np.median([x[0] for x in v]))

"""Time the compact core-neuron copies alone: Engine.set_ffn_neurons on a GGUF, a random neuron set
of the given fraction in every layer but the first and last (CoreMatching's default dense layers).

    python tools/bench_compact.py MODEL.gguf [MODEL2.gguf ...] [--frac 0.4] [--reps 4] [--threads 2]

Prints each build's milliseconds and the median of all but the first (the first build also maps
fresh pages for the copies; later ones reuse them, as a chat's later answers do). Run two builds
of cmx side by side with PYTHONPATH to compare them on a noisy machine."""

import argparse
import statistics
import time

import numpy as np

from cmx._core import Engine


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--frac", type=float, default=0.4, help="share of each layer's neurons kept (rounded down to 32)")
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    for path in args.models:
        e = Engine(path, n_ctx=256, n_batch=256, n_threads=args.threads, use_gpu=False)
        n_ff, n_layer = e.info["n_ff"], e.info["n_layer"]
        k = max(32, int(args.frac * n_ff) // 32 * 32)
        rng = np.random.default_rng(0)
        sets = [[] if il in (0, n_layer - 1) else sorted(rng.choice(n_ff, k, replace=False).tolist()) for il in range(n_layer)]
        ts = []
        for _ in range(args.reps):
            t = time.perf_counter()
            e.set_ffn_neurons(sets)
            ts.append((time.perf_counter() - t) * 1e3)
        later = statistics.median(ts[1:]) if len(ts) > 1 else ts[0]
        print(f"{path.rsplit('/', 1)[-1]}: {k} of {n_ff} neurons in {n_layer - 2} layers; "
              f"builds {[round(x) for x in ts]} ms; median after the first {later:.0f} ms")


if __name__ == "__main__":
    main()

"""Compare two cmx-profile profiles of the same model (e.g. the tables pass on a GPU and on the CPU).

    python tools/compare_profiles.py A.gguf B.gguf [--out result.json]

Each argument is a profiled GGUF, or an .npz with the arrays `frequency`, `neuron_order` and `tau`
(what tools/runs/gpu_scripts/session7_profile_gpu.sh brings back from the GPU machine). Prints, per
layer, how many of the calibration set's core neurons C^beta (the first beta * n_ff of
`neuron_order`) the two share, the largest core-frequency difference and the largest relative
threshold difference.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def load(path: str, beta: float | None) -> tuple[dict, float]:
    if path.endswith(".npz"):
        z = np.load(path)
        return {k: z[k] for k in ("frequency", "neuron_order", "tau")}, beta
    from cmx.coreprofile import read_profile

    p = read_profile(path)
    if p is None:
        raise SystemExit(f"{path} has no cmx profile")
    return {"frequency": p.frequency, "neuron_order": p.neuron_order, "tau": p.tau}, beta if beta is not None else float(p.beta)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--beta", type=float, default=None, help="core share (default: the GGUF's cmx.beta)")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    a, beta = load(args.a, args.beta)
    b, beta = load(args.b, beta)
    if beta is None:
        raise SystemExit("--beta is needed when neither file is a GGUF")
    if a["neuron_order"].shape != b["neuron_order"].shape:
        raise SystemExit(f"different shapes: {a['neuron_order'].shape} vs {b['neuron_order'].shape}")
    n_layer, n_ff = a["neuron_order"].shape
    n_core = int(round(beta * n_ff))
    shared = [len(set(a["neuron_order"][l, :n_core]) & set(b["neuron_order"][l, :n_core])) / n_core for l in range(n_layer)]
    res = {
        "a": args.a, "b": args.b, "n_layer": n_layer, "n_ff": n_ff, "beta": beta, "n_core": n_core,
        "core_shared_mean": float(np.mean(shared)), "core_shared_min": float(np.min(shared)),
        "core_shared_per_layer": [round(s, 4) for s in shared],
        "order_rows_identical": int(sum(bool((a["neuron_order"][l] == b["neuron_order"][l]).all()) for l in range(n_layer))),
        "frequency_max_abs_diff": float(np.abs(a["frequency"] - b["frequency"]).max()),
        "tau_max_rel_diff": float((np.abs(a["tau"] - b["tau"]) / np.maximum(np.abs(a["tau"]), 1e-12)).max()),
    }
    print(f"C^beta ({n_core} of {n_ff} neurons) shared: mean {res['core_shared_mean']:.4f}, worst layer "
          f"{res['core_shared_min']:.4f}; whole neuron order identical in {res['order_rows_identical']} of {n_layer} "
          f"layers; core frequency max |diff| {res['frequency_max_abs_diff']:.2e}; tau max relative diff "
          f"{res['tau_max_rel_diff']:.2e}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

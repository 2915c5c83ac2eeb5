"""Token sampling on a logits row: greedy, or top-k -> top-p -> temperature (llama.cpp's order)."""

from __future__ import annotations

import numpy as np


def check_sampling_params(temperature: float, top_k: int, top_p: float) -> None:
    if not np.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def sample(logits: np.ndarray, temperature: float, top_k: int, top_p: float, rng: np.random.Generator) -> int:
    """One token id from a float logits row. temperature == 0 is greedy (argmax)."""
    if temperature == 0:
        return int(np.argmax(logits))
    ids = np.arange(logits.shape[0])
    vals = logits.astype(np.float64)
    if 0 < top_k < vals.shape[0]:
        keep = np.argpartition(-vals, top_k - 1)[:top_k]
        ids, vals = ids[keep], vals[keep]
    order = np.argsort(-vals, kind="stable")
    ids, vals = ids[order], vals[order]
    if top_p < 1.0:
        p = np.exp(vals - vals[0])
        p /= p.sum()
        cut = int(np.searchsorted(np.cumsum(p), top_p) + 1)
        ids, vals = ids[:cut], vals[:cut]
    p = np.exp((vals - vals[0]) / temperature)
    p /= p.sum()
    return int(ids[rng.choice(len(ids), p=p)])

"""Image-token selections other than CoreMatching's, for equal-budget comparisons
(`cmx.Sparsity(select=...)`). Each returns the kept indices of one image's tokens, ascending;
the engine then prunes at the same place as CoreMatching (after layer K, original positions).

- `random`:   a seeded uniform subset.
- `divprune`: the max-min diversity subset of the image's projected embeddings (DivPrune, CVPR
              2025): greedy farthest-point selection on cosine distance. The first token is the
              one farthest from its nearest neighbour; each next one maximises its distance to
              the nearest token already chosen.
"""

from __future__ import annotations

import numpy as np

METHODS = ("corematching", "random", "divprune")


def random_subset(n_tokens: int, k: int, seed: int) -> list[int]:
    k = min(k, n_tokens)
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(n_tokens, size=k, replace=False))


def divprune(embeddings: np.ndarray, k: int) -> list[int]:
    """Greedy max-min diversity subset of k rows of `embeddings` (n, d), cosine distance."""
    x = np.asarray(embeddings, np.float64)
    n = x.shape[0]
    k = min(k, n)
    if k <= 0:
        return []
    if n == 1:
        return [0]
    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    dist = 1.0 - unit @ unit.T  # (n, n), 0 on the diagonal
    chosen = np.zeros(n, bool)
    # first: the token whose nearest other token is farthest away
    off_diag = dist + np.diag(np.full(n, np.inf))
    first = int(np.argmax(off_diag.min(axis=1)))
    chosen[first] = True
    nearest = dist[first].copy()  # distance of every token to its nearest chosen token
    for _ in range(k - 1):
        cand = np.where(chosen, -np.inf, nearest)  # never pick a token twice (duplicates sit at 0)
        i = int(np.argmax(cand))
        chosen[i] = True
        np.minimum(nearest, dist[i], out=nearest)
    return np.flatnonzero(chosen).tolist()


def choose(method: str, embeddings: np.ndarray, k: int, seed: int) -> list[int]:
    """Kept token indices of one image by `method` ('random' or 'divprune'), k of them."""
    if method == "random":
        return random_subset(len(embeddings), k, seed)
    if method == "divprune":
        return divprune(embeddings, k)
    raise ValueError(f"no selection {method!r} here (CoreMatching's is made by the engine)")

"""Image-token selections other than CoreMatching's, for equal-budget comparisons
(`cmx.Sparsity(select=...)`). Each returns the kept indices of one image's tokens, ascending;
the engine then prunes at the same place as CoreMatching (after layer K, original positions).

- `random`:   a seeded uniform subset.
- `divprune`: the max-min diversity subset of the image's projected embeddings (DivPrune, CVPR
              2025): greedy farthest-point selection on cosine distance. The first token is the
              one farthest from its nearest neighbour; each next one maximises its distance to
              the nearest token already chosen.
- `pool`:     average pooling of the image's token grid to about k tokens: the grid (square, or
              an M-RoPE image's rows x columns) is cut into gh x gw windows (adaptive pooling's
              bounds, gh * gw the closest to k, windows the closest to square); each
              window becomes one token, the mean of its members' hidden states after layer K, at
              the position of the member nearest the window's centre.
- `fastv` is scored by the engine (FastV, ECCV 2024: the attention the prompt's last token pays
  each image token at layer K, averaged over heads; the top k stay).
"""

from __future__ import annotations

import numpy as np

import math

METHODS = ("corematching", "fastv", "divprune", "pool", "random")
MADE_IN_PYTHON = ("divprune", "pool", "random")


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


def pool_grid(rows: int, cols: int, k: int) -> tuple[int, int]:
    """(gh, gw), gh in [1, rows] and gw in [1, cols], with gh * gw closest to k, then the windows
    closest to square in tokens; on a square grid gh <= gw."""
    if rows <= 0 or cols <= 0 or k <= 0:
        raise ValueError("pool needs a non-empty grid and k > 0")
    best = None
    for gh in range(1, rows + 1):
        for gw in range(1, cols + 1):
            key = (abs(gh * gw - k), abs(math.log((rows / gh) / (cols / gw))))
            if best is None or key < best[0]:
                best = (key, (gh, gw))
    return best[1]


def _window(i: int, n_out: int, n_in: int) -> tuple[int, int]:
    """Adaptive pooling's bounds [start, end) of output cell i of n_out over n_in inputs."""
    return (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)


def pool_groups(n_tokens: int, k: int, grid: tuple[int, int] | None = None) -> tuple[list[int], list[list[int]]]:
    """Average pooling of an image's token grid (row by row; `grid` = (rows, columns), None: a
    square one) to about k tokens: the kept representatives (ascending) and, for each, the token
    indices its window averages."""
    if grid is None:
        side = math.isqrt(n_tokens)
        if side * side != n_tokens:
            raise ValueError(f"select='pool' needs a square grid of image tokens where the model does not give "
                             f"the image's grid (M-RoPE models do), got {n_tokens} tokens")
        grid = (side, side)
    rows, cols = grid
    if rows * cols != n_tokens:
        raise ValueError(f"select='pool': a {rows} x {cols} grid does not hold {n_tokens} tokens")
    gh, gw = pool_grid(rows, cols, min(k, n_tokens))
    cells = []
    for i in range(gh):
        r0, r1 = _window(i, gh, rows)
        for j in range(gw):
            c0, c1 = _window(j, gw, cols)
            members = [r * cols + c for r in range(r0, r1) for c in range(c0, c1)]
            centre = ((r0 + r1 - 1) // 2) * cols + (c0 + c1 - 1) // 2
            cells.append((centre, members))
    cells.sort()
    return [c for c, _ in cells], [m for _, m in cells]


def choose(method: str, embeddings: np.ndarray, k: int, seed: int,
           grid: tuple[int, int] | None = None) -> tuple[list[int], list[list[int]] | None]:
    """One image's kept token indices by `method` ('random', 'divprune' or 'pool'), about k of
    them, and for 'pool' the token groups each kept token averages (None otherwise). grid: the
    image's (rows, columns) of tokens where the model says it (M-RoPE models), for 'pool'."""
    if method == "random":
        return random_subset(len(embeddings), k, seed), None
    if method == "divprune":
        return divprune(embeddings, k), None
    if method == "pool":
        return pool_groups(len(embeddings), k, grid)
    raise ValueError(f"no selection {method!r} here (CoreMatching's and FastV's are scored by the engine)")

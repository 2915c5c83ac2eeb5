"""cmx.Sparsity: the CoreMatching settings of a model or of one call (docs/corematching.md)."""

from __future__ import annotations

from dataclasses import dataclass, field

SCORES = ("anchor", "paper")
SELECTIONS = ("corematching", "fastv", "divprune", "pool", "random")


def _fraction(name: str, value, low_open: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    ok = (0 < value <= 1) if low_open else (0 <= value <= 1)
    if not ok:
        raise ValueError(f"{name} must be in {'(0, 1]' if low_open else '[0, 1]'}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Sparsity:
    """CoreMatching: core tokens in the prefill, core neurons in the decode.

    tokens       prune image tokens after `prune_layer` (layers after it never see the others)
    neurons      each decode step's FFN reads only the prompt's core neurons
    rho          token-wise core neurons: this share of the mean number of activated neurons
    beta         core neurons kept per layer: this share of n_ff (rounded up to a quantization block)
    prune_layer  K: layers 0..K see every token (None: 2)
    score        'anchor' (neurons shared with the start of the answer turn: depends on the
                 question) or 'paper' (neurons shared with the prompt's core neurons)
    budget       keep exactly this many tokens per image instead of the elbow's count
    min_keep, max_keep  bounds on the kept fraction of each image when the elbow decides (the
                 default floor of 0.25 is measured: docs/decisions.md, "CoreMatching defaults")
    dense_layers layers whose decode FFN stays dense (None: the first and the last)
    select       which image tokens stay: 'corematching' (the scores above), or for comparisons at
                 an equal `budget`: 'fastv' (the most attended by the prompt's last token at layer
                 K), 'divprune' (the max-min cosine diversity subset of the image's embeddings),
                 'pool' (the image's token grid average-pooled to about `budget` tokens after
                 layer K) or 'random' (seeded by `seed`); all cut after `prune_layer`
    seed         the random selection's seed
    """

    tokens: bool = True
    neurons: bool = True
    rho: float = 0.2
    beta: float = 0.4
    prune_layer: int | None = None
    score: str = "anchor"
    budget: int | None = None
    min_keep: float = 0.25
    max_keep: float = 1.0
    dense_layers: tuple[int, ...] | None = field(default=None)
    select: str = "corematching"
    seed: int = 0

    def __post_init__(self):
        for name in ("tokens", "neurons"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        _fraction("rho", self.rho, True)
        _fraction("beta", self.beta, True)
        _fraction("min_keep", self.min_keep, False)
        _fraction("max_keep", self.max_keep, False)
        if self.min_keep > self.max_keep:
            raise ValueError(f"min_keep ({self.min_keep}) must not exceed max_keep ({self.max_keep})")
        if self.select not in SELECTIONS:
            raise ValueError(f"select must be one of {SELECTIONS}, got {self.select!r}")
        if self.select != "corematching" and (not self.tokens or self.budget is None):
            raise ValueError(f"select={self.select!r} compares selections at an equal budget: it needs tokens=True and budget=k")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {self.score!r}")
        if self.prune_layer is not None and (isinstance(self.prune_layer, bool) or not isinstance(self.prune_layer, int) or self.prune_layer < 0):
            raise ValueError(f"prune_layer must be a non-negative integer, got {self.prune_layer!r}")
        if self.budget is not None and (isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget <= 0):
            raise ValueError(f"budget must be a positive integer (tokens kept per image), got {self.budget!r}")
        if self.dense_layers is not None:
            layers = tuple(self.dense_layers)
            if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
                raise ValueError(f"dense_layers must be non-negative layer indices, got {self.dense_layers!r}")
            object.__setattr__(self, "dense_layers", layers)

    def resolved(self, n_layer: int) -> "Sparsity":
        """The settings with the model-dependent defaults filled in, checked against n_layer."""
        k = 2 if self.prune_layer is None else self.prune_layer
        k = min(k, n_layer - 2) if self.prune_layer is None else k
        if not 0 <= k <= n_layer - 2:
            raise ValueError(f"prune_layer must be in [0, {n_layer - 2}] for a model of {n_layer} layers, got {k}")
        dense = (0, n_layer - 1) if self.dense_layers is None else self.dense_layers
        if any(i >= n_layer for i in dense):
            raise ValueError(f"dense_layers {dense} out of range for a model of {n_layer} layers")
        return Sparsity(self.tokens, self.neurons, self.rho, self.beta, k, self.score, self.budget,
                        self.min_keep, self.max_keep, tuple(sorted(set(dense))), self.select, self.seed)

    def to_core(self, n_layer: int):
        """The engine's SparsityParams."""
        from ._core import SparsityParams, TokenScore

        s = self.resolved(n_layer)
        p = SparsityParams()
        p.tokens, p.neurons, p.rho, p.beta = s.tokens, s.neurons, s.rho, s.beta
        p.prune_layer = s.prune_layer
        p.score = TokenScore.fastv if s.select == "fastv" else getattr(TokenScore, s.score)
        p.budget = s.budget or 0
        p.min_keep, p.max_keep = s.min_keep, s.max_keep
        p.dense_layers = list(s.dense_layers)
        return p

"""cmx.Sparsity: the CoreMatching settings of a model or of one call (docs/corematching.md)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

SCORES = ("anchor", "paper")
NEURON_TOKENS = ("all", "text")
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
    prune_layer  K: layers 0..K see every token (None: the model file's profile, else 2)
    score        'anchor' (neurons shared with the start of the answer turn: depends on the
                 question) or 'paper' (neurons shared with the prompt's core neurons)
    budget       keep exactly this many tokens per image instead of the elbow's count
    min_keep, max_keep  bounds on the kept fraction of each image when the elbow decides (None:
                 the model file's profile, else 0.25 and 1.0; the floor of 0.25 is measured:
                 docs/decisions.md, "CoreMatching defaults")
    dense_layers layers whose decode FFN stays dense (None: the first and the last)
    neuron_tokens which prompt tokens' activations choose the core neurons: 'text' (the text
                 tokens alone: the answer is text) or 'all' (every token each layer holds, image
                 tokens included, as the paper states it); docs/decisions.md, "Core neurons from
                 the text tokens"
    select       which image tokens stay: 'corematching' (the scores above), or for comparisons at
                 an equal `budget`: 'fastv' (the most attended by the prompt's last token at layer
                 K), 'divprune' (the max-min cosine diversity subset of the image's embeddings),
                 'pool' (the image's token grid average-pooled to about `budget` tokens after
                 layer K) or 'random' (seeded by `seed`); all cut after `prune_layer`
    seed         the random selection's seed
    profile      use the model file's cmx-profile tables when it has them (docs/decisions.md,
                 "Offline profiles"): thresholds instead of per-token sorting and the stored core
                 neurons for short prompts (both when rho is the profile's), and its K and bounds
                 for the settings left at None
    """

    tokens: bool = True
    neurons: bool = True
    rho: float = 0.2
    beta: float = 0.4
    prune_layer: int | None = None
    score: str = "anchor"
    budget: int | None = None
    min_keep: float | None = None
    max_keep: float | None = None
    dense_layers: tuple[int, ...] | None = field(default=None)
    neuron_tokens: str = "text"
    select: str = "corematching"
    seed: int = 0
    profile: bool = True

    def __post_init__(self):
        for name in ("tokens", "neurons", "profile"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        _fraction("rho", self.rho, True)
        _fraction("beta", self.beta, True)
        if self.min_keep is not None:
            _fraction("min_keep", self.min_keep, False)
        if self.max_keep is not None:
            _fraction("max_keep", self.max_keep, False)
        if self.min_keep is not None and self.max_keep is not None and self.min_keep > self.max_keep:
            raise ValueError(f"min_keep ({self.min_keep}) must not exceed max_keep ({self.max_keep})")
        if self.select not in SELECTIONS:
            raise ValueError(f"select must be one of {SELECTIONS}, got {self.select!r}")
        if self.select != "corematching" and (not self.tokens or self.budget is None):
            raise ValueError(f"select={self.select!r} compares selections at an equal budget: it needs tokens=True and budget=k")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.neuron_tokens not in NEURON_TOKENS:
            raise ValueError(f"neuron_tokens must be one of {NEURON_TOKENS}, got {self.neuron_tokens!r}")
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

    def uses_tables(self, profile) -> bool:
        """Whether a model's profile (cmx.coreprofile.CoreProfile or None) supplies thresholds and
        short-prompt tables: it must be wanted and made for this rho (tau reproduces one rho)."""
        return self.profile and profile is not None and abs(float(profile.rho) - self.rho) < 1e-6

    def resolved(self, n_layer: int, profile=None) -> "Sparsity":
        """The settings with the model-dependent defaults filled in (from the model file's profile
        where it has one and `profile` is on), checked against n_layer."""
        stored = profile if (self.profile and profile is not None) else None
        if self.prune_layer is not None:
            k = self.prune_layer
        else:
            k = min(stored.prune_layer if stored else 2, n_layer - 2)
        if not 0 <= k <= n_layer - 2:
            raise ValueError(f"prune_layer must be in [0, {n_layer - 2}] for a model of {n_layer} layers, got {k}")
        dense = (0, n_layer - 1) if self.dense_layers is None else self.dense_layers
        if any(i >= n_layer for i in dense):
            raise ValueError(f"dense_layers {dense} out of range for a model of {n_layer} layers")
        min_keep = self.min_keep if self.min_keep is not None else (stored.min_keep if stored else 0.25)
        max_keep = self.max_keep if self.max_keep is not None else (stored.max_keep if stored else 1.0)
        if self.max_keep is None and max_keep < min_keep:  # a user's floor above the stored ceiling wins
            max_keep = 1.0
        if self.min_keep is None and min_keep > max_keep:
            min_keep = max_keep
        return replace(self, prune_layer=k, dense_layers=tuple(sorted(set(dense))), min_keep=float(min_keep),
                       max_keep=float(max_keep))

    def to_core(self, n_layer: int, profile=None):
        """The engine's SparsityParams (with the profile's tables when `uses_tables`)."""
        from ._core import NeuronTokens, SparsityParams, TokenScore

        s = self.resolved(n_layer, profile)
        p = SparsityParams()
        p.tokens, p.neurons, p.rho, p.beta = s.tokens, s.neurons, s.rho, s.beta
        p.prune_layer = s.prune_layer
        p.score = TokenScore.fastv if s.select == "fastv" else getattr(TokenScore, s.score)
        p.budget = s.budget or 0
        p.min_keep, p.max_keep = s.min_keep, s.max_keep
        p.dense_layers = list(s.dense_layers)
        p.neuron_tokens = getattr(NeuronTokens, s.neuron_tokens)
        if self.uses_tables(profile):
            p.thresholds = [float(t) for t in profile.tau]
            p.neuron_order = profile.neuron_order.tolist()
            p.short_prompt_tokens = int(profile.short_prompt_tokens)
        return p

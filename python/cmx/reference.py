"""Reference implementation of CoreMatching (docs/corematching.md) on Hugging Face models.

The engine is tested against it and the profiling tool reuses it, so it follows the spec to the
letter, tie-breaking included, and favours plain code over speed.

* Pure functions on numpy arrays (no torch): `activated`, `token_core_count`, `token_core_mask`,
  `core_frequencies`, `core_count`, `core_neurons`, `image_scores`, `elbow_count`, `keep_count`,
  `select_tokens`, `keep_rows`.
* `CoreMatchingReference`: a `LlamaForCausalLM` / `Qwen2ForCausalLM` run layer by layer on
  `inputs_embeds` rows, with image tokens dropped after layer K and core-neuron FFNs in decode.
  torch is imported only when it is built.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SCORES = ("anchor", "paper")


# ---------------------------------------------------------------------------------------------
# Core neurons


def activated(a) -> np.ndarray:
    """Gamma: which neurons a token activates (a > 0), elementwise."""
    return np.asarray(a) > 0


def _activation_rows(acts) -> np.ndarray:
    """One [T, n_ff] matrix from an array or from a list of row blocks (ubatches, cached turns)."""
    if isinstance(acts, np.ndarray):
        return acts if acts.ndim == 2 else acts.reshape(-1, acts.shape[-1])
    return np.concatenate([np.asarray(a).reshape(-1, np.shape(a)[-1]) for a in acts], axis=0)


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")


def token_core_count(acts, rho: float) -> int:
    """k = floor(rho * (activated neurons over all tokens) / (number of tokens)): one count for
    every token of the set. `acts` is [T, n_ff] or a list of such blocks."""
    _check_fraction("rho", rho)
    a = _activation_rows(acts)
    n_tokens = a.shape[0]
    if n_tokens == 0:
        return 0
    # (rho * total) / T in double precision, left to right as the spec writes it
    return int(math.floor(rho * int(np.count_nonzero(a > 0)) / n_tokens))


def token_core_mask(acts: np.ndarray, k: int) -> np.ndarray:
    """[T, n_ff] bool: each token's k largest activations (equal values: lower index first)."""
    a = np.asarray(acts)
    n_tokens, n_ff = a.shape
    if k <= 0:
        return np.zeros(a.shape, dtype=bool)
    if k >= n_ff:
        return np.ones(a.shape, dtype=bool)
    kth = -np.partition(-a, k - 1, axis=1)[:, k - 1 : k]  # each row's k-th largest value
    above = a > kth
    tied = a == kth
    # the values equal to the k-th largest fill the remaining places, lowest indices first
    room = k - above.sum(axis=1, keepdims=True)
    return above | (tied & (np.cumsum(tied, axis=1) <= room))


def core_frequencies(acts, rho: float) -> np.ndarray:
    """f(i): how many tokens have neuron i among their token-wise core neurons C_rho (int64 [n_ff])."""
    a = _activation_rows(acts)
    return token_core_mask(a, token_core_count(a, rho)).sum(axis=0, dtype=np.int64)


def core_count(n_ff: int, beta: float, block: int = 1) -> int:
    """n_core = floor(beta * n_ff) rounded up to a multiple of `block`, at most n_ff."""
    _check_fraction("beta", beta)
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block!r}")
    n = math.floor(beta * n_ff)
    return min(-(-n // block) * block, n_ff)


def core_neurons(acts, rho: float, beta: float, block: int = 1) -> np.ndarray:
    """C^beta: the n_core neurons with the largest frequency f (equal counts: lower index first),
    as ascending int32 indices. `acts` is [T, n_ff] or a list of such blocks."""
    a = _activation_rows(acts)
    f = core_frequencies(a, rho)
    by_frequency = np.argsort(-f, kind="stable")  # descending f, lower index first on ties
    return np.sort(by_frequency[: core_count(a.shape[1], beta, block)]).astype(np.int32)


# ---------------------------------------------------------------------------------------------
# Core tokens


def image_scores(
    acts_K: np.ndarray,
    image_rows,
    score: str = "anchor",
    core_K=None,
    anchor_row: int | None = None,
) -> np.ndarray:
    """Score (int64) of each image row of `acts_K` ([T, n_ff], the activations at layer K):
    'anchor' |Gamma(x) ∩ Gamma(x_anchor)| (anchor_row defaults to the last row), or
    'paper' |Gamma(x) ∩ core_K| (core_K: C^beta at layer K of every prompt token)."""
    acts_K = np.asarray(acts_K)
    image_gamma = activated(acts_K[np.asarray(image_rows, dtype=np.int64)])
    if score == "anchor":
        reference = activated(acts_K[acts_K.shape[0] - 1 if anchor_row is None else anchor_row])
    elif score == "paper":
        if core_K is None:
            raise ValueError("score='paper' needs core_K, the core neurons at layer K")
        reference = np.zeros(acts_K.shape[1], dtype=bool)
        reference[np.asarray(core_K, dtype=np.int64)] = True
    else:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    return (image_gamma & reference).sum(axis=1, dtype=np.int64)


def _score_array(scores) -> np.ndarray:
    # signed, so that negating for a descending sort cannot wrap around
    s = np.asarray(scores)
    return s.astype(np.int64) if s.dtype.kind in "biu" else s.astype(np.float64)


def elbow_count(scores) -> int:
    """The elbow ("maximum geometric distance") before any clamp: the number of scores strictly
    greater than s_{j*}, j* the first farthest point from the line through the first and last
    of the descending scores, on raw axes."""
    s = np.sort(_score_array(scores))[::-1]
    M = len(s)
    if M == 0:
        return 0
    j = np.arange(M)
    distance = np.abs((s[-1] - s[0]) * j - (M - 1) * (s - s[0]))
    j_star = int(np.argmax(distance))  # argmax: the first maximum
    return int(np.count_nonzero(s > s[j_star]))


def keep_count(scores, budget: int | None = None, min_keep: float = 0.0, max_keep: float = 1.0) -> int:
    """How many tokens of one image to keep: min(budget, M) with a budget, otherwise the elbow
    clamped to [ceil(min_keep*M), floor(max_keep*M)] and to at least 1 (M = 0 keeps 0)."""
    M = len(np.asarray(scores))
    if budget is not None:
        if budget < 0:
            raise ValueError(f"budget must be >= 0, got {budget!r}")
        return min(int(budget), M)
    _check_fraction("min_keep", min_keep)
    _check_fraction("max_keep", max_keep)
    if min_keep > max_keep:
        raise ValueError(f"min_keep ({min_keep}) must not exceed max_keep ({max_keep})")
    if M == 0:
        return 0
    n = elbow_count(scores)
    n = min(max(n, math.ceil(min_keep * M)), math.floor(max_keep * M))
    return max(n, 1)


def select_tokens(scores, budget: int | None = None, min_keep: float = 0.0, max_keep: float = 1.0) -> np.ndarray:
    """Kept token indices of one image (ascending int64): the first `keep_count` of the scores
    sorted descending, equal scores lower index first."""
    s = _score_array(scores)
    by_score = np.argsort(-s, kind="stable")
    return np.sort(by_score[: keep_count(s, budget, min_keep, max_keep)]).astype(np.int64)


def keep_rows(n_rows: int, image_spans, kept) -> np.ndarray:
    """Prompt rows that stay after layer K (ascending): every text row and the kept rows of each
    image. `image_spans` are (first_row, n_rows); `kept[i]` indexes into image i."""
    stays = np.ones(n_rows, dtype=bool)
    for (first, n), kept_in_image in zip(image_spans, kept):
        stays[first : first + n] = False
        stays[first + np.asarray(kept_in_image, dtype=np.int64)] = True
    return np.flatnonzero(stays)


# ---------------------------------------------------------------------------------------------
# The model


@dataclass
class PrefillResult:
    logits: np.ndarray  # [n_vocab] float32: logits of the last prompt row
    kept: list  # per image: kept token indices into the image (ascending int64)
    scores: list | None  # per image: its tokens' scores at layer K (None: no token pruning / an
    #                      image with an earlier selection)
    core_neurons: list  # per layer: C^beta of the prompt rows that layer saw (or their text rows; ascending int32)
    rows: np.ndarray  # prompt rows held by the layers after K (text + kept image rows), ascending
    sparse_layers: list  # layers whose decode FFN reads only their core neurons (empty: dense decode)


class _LayerKV:
    """Keys and values per layer. After pruning, layers hold different rows, so each layer's
    cache has its own length."""

    def __init__(self):
        self.keys: dict = {}
        self.values: dict = {}

    def length(self, layer_idx: int) -> int:
        return self.keys[layer_idx].shape[-2] if layer_idx in self.keys else 0

    def update(self, key, value, layer_idx, *args, **kwargs):  # called by the HF attention module
        import torch

        if layer_idx in self.keys:
            key = torch.cat([self.keys[layer_idx], key], dim=-2)
            value = torch.cat([self.values[layer_idx], value], dim=-2)
        self.keys[layer_idx], self.values[layer_idx] = key, value
        return key, value


class CoreMatchingReference:
    """CoreMatching on a Hugging Face `LlamaForCausalLM` / `Qwen2ForCausalLM`, as the spec states it.

    `prefill` runs a prompt given as embedding rows: layers 0..K on every row, the image rows
    selected per image at layer K, layers K+1.. on text + kept rows at their original positions.
    `decode` then runs one token at a time on a KV cache holding exactly those rows, each sparse
    layer's FFN restricted to the core neurons found in the prefill (the prefill itself is dense).
    `block` (int, or one per layer) is the quantization block n_core is rounded up to.
    `neuron_tokens` 'text' takes the core neurons from the text rows alone (image rows count for
    nothing), as `cmx.Sparsity(neuron_tokens='text')` does.
    """

    def __init__(
        self,
        model,
        *,
        prune_layer: int | None = None,
        rho: float = 0.2,
        beta: float = 0.4,
        score: str = "anchor",
        budget: int | None = None,
        min_keep: float = 0.0,
        max_keep: float = 1.0,
        dense_layers: Sequence[int] = (),
        tokens: bool = True,
        neurons: bool = True,
        block: int | Sequence[int] = 1,
        neuron_tokens: str = "all",
    ):
        import torch  # noqa: F401  (fail here, not in the middle of a forward)

        self.model = model.eval()
        self.decoder = model.model
        self.layers = list(self.decoder.layers)
        config = model.config
        n_layers = len(self.layers)
        if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
            raise NotImplementedError("sliding-window attention layers are not supported")
        if config._attn_implementation not in ("eager", "sdpa"):
            raise NotImplementedError(f"attention {config._attn_implementation!r}: use 'eager' or 'sdpa'")
        if tokens and (prune_layer is None or not 0 <= prune_layer < n_layers):
            raise ValueError(f"prune_layer must be in [0, {n_layers}) with tokens=True, got {prune_layer!r}")
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")
        if neuron_tokens not in ("all", "text"):
            raise ValueError(f"neuron_tokens must be 'all' or 'text', got {neuron_tokens!r}")
        self.neuron_tokens = neuron_tokens
        _check_fraction("rho", rho)
        _check_fraction("beta", beta)
        keep_count([], budget, min_keep, max_keep)  # validates the selection parameters
        self.prune_layer = prune_layer
        self.rho, self.beta = rho, beta
        self.score, self.budget, self.min_keep, self.max_keep = score, budget, min_keep, max_keep
        self.tokens, self.neurons = tokens, neurons
        self.block = [block] * n_layers if isinstance(block, int) else list(block)
        if len(self.block) != n_layers:
            raise ValueError(f"block needs one value per layer ({n_layers}), got {len(self.block)}")
        self.dense_layers = sorted({il % n_layers for il in dense_layers})
        self.sparse_layers = [il for il in range(n_layers) if il not in self.dense_layers] if neurons else []
        self.last_prefill: PrefillResult | None = None
        self._kv: _LayerKV | None = None
        self._decode_core: dict = {}  # sparse layer -> its core neurons (torch index tensor)
        self._next_position = 0

    # -- public ---------------------------------------------------------------------------------

    def embed(self, token_ids) -> np.ndarray:
        """Embedding rows [T, n_embd] of token ids (to build a text prompt or its text parts)."""
        import torch

        with torch.no_grad():
            ids = torch.as_tensor(np.asarray(token_ids, dtype=np.int64))
            return self.model.get_input_embeddings()(ids).float().numpy()

    def prefill(
        self, inputs_embeds, image_spans=(), anchor_row: int | None = None, earlier_kept: Sequence | None = None
    ) -> PrefillResult:
        """Runs the prompt (rows [T, n_embd]); image i is rows first..first+n-1 of
        image_spans[i] = (first, n). anchor_row (default: the last row) is the anchor token of
        score='anchor'. `earlier_kept[i]`, where given (not None), is image i's selection from an
        earlier turn: it is kept as is, not scored again (a fresh prefill of a chat's history then holds
        what the chat's cache holds). Starts a new KV cache for `decode`."""
        import torch

        x = self._embedding_rows(inputs_embeds)
        n_rows = x.shape[1]
        image_spans = [(int(first), int(n)) for first, n in image_spans]
        image_rows = self._check_spans(image_spans, n_rows)
        anchor_row = n_rows - 1 if anchor_row is None else range(n_rows)[anchor_row]
        earlier_kept = self._check_earlier_kept(earlier_kept, image_spans)
        if self.tokens and any(n_rows - 1 in rows for rows in image_rows):
            raise ValueError("the last prompt row is an image row: its logits could be pruned away")

        self._kv = _LayerKV()
        acts: list = [None] * len(self.layers)  # each layer's FFN activations of the rows it saw
        rows = np.arange(n_rows)  # prompt rows the next layer sees
        kept = [np.arange(n, dtype=np.int64) for _, n in image_spans]
        scores = None
        h = x
        seen = [None] * len(self.layers)  # the prompt rows each layer saw
        with torch.no_grad(), self._ffn_hooks(capture=acts):
            for il, layer in enumerate(self.layers):
                h = self._run_layer(layer, h, positions=rows)
                seen[il] = rows
                if self.tokens and il == self.prune_layer:
                    scores, kept = self._select_image_tokens(acts[il], image_rows, anchor_row, earlier_kept)
                    rows = keep_rows(n_rows, image_spans, kept)
                    h = h[:, torch.as_tensor(rows)]  # layers <= K hold every row: rows index h
            logits = self._logits(h[:, -1:])

        if self.neuron_tokens == "text":  # the core neurons from the text rows alone
            is_image = np.zeros(n_rows, dtype=bool)
            for r in image_rows:
                is_image[r] = True
            acts = [a[~is_image[seen_rows]] for a, seen_rows in zip(acts, seen)]
        core = [core_neurons(acts[il], self.rho, self.beta, self.block[il]) for il in range(len(self.layers))]
        self._decode_core = {il: torch.as_tensor(core[il], dtype=torch.long) for il in self.sparse_layers}
        self._next_position = n_rows
        self.last_prefill = PrefillResult(logits, kept, scores, core, rows, list(self.sparse_layers))
        return self.last_prefill

    def decode(self, token_id: int) -> np.ndarray:
        """Appends one generated token at the next position; returns its logits [n_vocab].
        Sparse layers compute its FFN from their core neurons only."""
        import torch

        if self._kv is None:
            raise RuntimeError("decode needs a prefill first")
        with torch.no_grad(), self._ffn_hooks(restrict=self._decode_core):
            h = self.model.get_input_embeddings()(torch.tensor([[int(token_id)]]))
            positions = np.array([self._next_position])
            for layer in self.layers:
                h = self._run_layer(layer, h, positions=positions)
            logits = self._logits(h)
        self._next_position += 1
        return logits

    def generate(
        self,
        inputs_embeds,
        image_spans=(),
        anchor_row: int | None = None,
        max_new_tokens: int = 32,
        stop_tokens: Sequence[int] = (),
    ) -> list:
        """Greedy answer (token ids, the stop token included when reached); the prefill's result
        stays in `last_prefill`."""
        logits = self.prefill(inputs_embeds, image_spans, anchor_row).logits
        answer: list = []
        while len(answer) < max_new_tokens:
            token = int(np.argmax(logits))
            answer.append(token)
            if token in stop_tokens or len(answer) == max_new_tokens:
                break
            logits = self.decode(token)
        return answer

    # -- steps ----------------------------------------------------------------------------------

    def _select_image_tokens(self, acts_K, image_rows, anchor_row, earlier_kept):
        """Scores and kept indices of each image at layer K, each image on its own scores; an
        image with an earlier selection keeps it (its score is None)."""
        core_K = None
        if self.score == "paper":  # C^beta_K of every prompt row (layer K still holds them all)
            core_K = core_neurons(acts_K, self.rho, self.beta, self.block[self.prune_layer])
        scores, kept = [], []
        for rows, earlier in zip(image_rows, earlier_kept):
            if earlier is not None:
                scores.append(None)
                kept.append(earlier)
                continue
            scores.append(image_scores(acts_K, rows, self.score, core_K, anchor_row))
            kept.append(select_tokens(scores[-1], self.budget, self.min_keep, self.max_keep))
        return scores, kept

    def _run_layer(self, layer, h, positions: np.ndarray):
        """One decoder layer on rows h at their (original) positions; the layer's KV cache
        grows by these rows and they attend causally to everything it holds."""
        import torch

        layer_idx = layer.self_attn.layer_idx
        position_ids = torch.as_tensor(positions, dtype=torch.long)[None]
        out = layer(
            h,
            attention_mask=_causal_mask(h.shape[1], self._kv.length(layer_idx), h.dtype),
            position_ids=position_ids,
            use_cache=True,
            position_embeddings=self.decoder.rotary_emb(h, position_ids=position_ids),
            **{_cache_kwarg(type(layer)): self._kv},
        )
        return out[0] if isinstance(out, tuple) else out

    def _logits(self, h_last) -> np.ndarray:
        return self.model.lm_head(self.decoder.norm(h_last))[0, -1].float().numpy()

    @contextlib.contextmanager
    def _ffn_hooks(self, capture: list | None = None, restrict: dict | None = None):
        """Forward pre-hooks on every mlp.down_proj, whose input is a = act(gate) * up:
        `capture[il]` receives layer il's activations (float32 [rows, n_ff]); layers in
        `restrict` zero every neuron outside their core neurons."""
        import torch

        handles = []

        def hook_for(il):
            def hook(module, args):
                a = args[0]
                if capture is not None:
                    capture[il] = a[0].detach().float().numpy().copy()
                if restrict and il in restrict:
                    core_only = torch.zeros_like(a)
                    core_only[..., restrict[il]] = a[..., restrict[il]]
                    return (core_only, *args[1:])
                return None

            return hook

        try:
            for il, layer in enumerate(self.layers):
                handles.append(layer.mlp.down_proj.register_forward_pre_hook(hook_for(il)))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _embedding_rows(self, inputs_embeds):
        import torch

        if not torch.is_tensor(inputs_embeds):
            inputs_embeds = torch.as_tensor(np.asarray(inputs_embeds, dtype=np.float32))
        x = inputs_embeds.to(self.model.get_input_embeddings().weight.dtype)
        if x.ndim == 2:
            x = x[None]
        if x.ndim != 3 or x.shape[0] != 1:
            raise ValueError(f"inputs_embeds must be [T, n_embd] (or [1, T, n_embd]), got {tuple(x.shape)}")
        return x

    def _check_earlier_kept(self, earlier_kept, image_spans) -> list:
        if earlier_kept is None:
            return [None] * len(image_spans)
        if len(earlier_kept) != len(image_spans):
            raise ValueError(f"earlier_kept needs one entry per image ({len(image_spans)}), got {len(earlier_kept)}")
        if not self.tokens and any(k is not None for k in earlier_kept):
            raise ValueError("earlier_kept is a token selection: it needs tokens=True")
        checked = []
        for k, (_, n) in zip(earlier_kept, image_spans):
            if k is not None:
                k = np.asarray(k, dtype=np.int64)
                if k.ndim != 1 or (k.size and (k.min() < 0 or k.max() >= n)) or np.any(np.diff(k) <= 0):
                    raise ValueError(f"kept indices must be ascending, distinct and in [0, {n})")
            checked.append(k)
        return checked

    @staticmethod
    def _check_spans(image_spans, n_rows: int) -> list:
        taken = np.zeros(n_rows, dtype=bool)
        image_rows = []
        for first, n in image_spans:
            if n < 0 or first < 0 or first + n > n_rows:
                raise ValueError(f"image span ({first}, {n}) is outside the {n_rows} prompt rows")
            if taken[first : first + n].any():
                raise ValueError(f"image span ({first}, {n}) overlaps another one")
            taken[first : first + n] = True
            image_rows.append(np.arange(first, first + n))
        return image_rows


@functools.lru_cache(maxsize=None)
def _cache_kwarg(layer_class) -> str:
    """The decoder layer's name for its KV cache argument: `cache` since transformers 5.2x,
    `past_key_values` before (an unknown keyword would be swallowed by **kwargs: no cache at all)."""
    params = inspect.signature(layer_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _causal_mask(n_query: int, n_past: int, dtype):
    """Additive [1, 1, n_query, n_past + n_query] mask (eager and sdpa attention both take it):
    query row q sees the n_past cached rows and the new rows up to itself."""
    import torch

    key = torch.arange(n_past + n_query)
    query = torch.arange(n_query)[:, None] + n_past
    mask = torch.zeros(n_query, n_past + n_query, dtype=dtype)
    return mask.masked_fill(key[None] > query, torch.finfo(dtype).min)[None, None]

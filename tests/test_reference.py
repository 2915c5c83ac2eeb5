"""cmx.reference: the PyTorch reference of CoreMatching (docs/corematching.md).

The pure functions are checked on cases worked out by hand; the model class against Hugging Face's
own forward, made to do the same thing independently: neurons zeroed by hooks on the HF model,
and token pruning as two HF runs (all rows through layers 0..K, then a copy of layers K+1.. on the
kept rows with their original position_ids).
"""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest

from cmx import reference as ref
from cmx.reference import (
    CoreMatchingReference,
    activated,
    core_count,
    core_frequencies,
    core_neurons,
    elbow_count,
    image_scores,
    keep_count,
    keep_rows,
    select_tokens,
    token_core_count,
    token_core_mask,
)

# ---------------------------------------------------------------------------------------------
# Pure functions, by hand

# 3 tokens x 6 neurons. Positive activations: 4 + 2 + 3 = 9.
ACTS = np.array(
    [
        [0.5, 2.0, -1.0, 2.0, 0.0, 1.0],
        [3.0, -0.5, 1.0, 0.0, 0.0, 0.0],
        [0.0, 1.0, 1.0, 1.0, -2.0, 0.0],
    ],
    dtype=np.float32,
)


def test_activated_is_strictly_positive():
    assert activated(np.array([-1.0, 0.0, -0.0, 1e-30, 2.0])).tolist() == [False, False, False, True, True]


def test_token_core_count():
    assert token_core_count(ACTS, 0.7) == 2  # floor(0.7 * 9 / 3) = floor(2.1)
    assert token_core_count(ACTS, 0.5) == 1  # floor(1.5)
    assert token_core_count(ACTS, 1.0) == 3
    assert token_core_count(ACTS, 0.0) == 0
    # one count over every token, however the rows are split (ubatches, turns)
    assert token_core_count([ACTS[:1], ACTS[1:]], 0.7) == 2
    assert token_core_count(np.zeros((0, 6)), 0.7) == 0


def test_core_neurons_by_hand():
    # k = 2: token 0 -> {1, 3} (the two 2.0s); token 1 -> {0, 2}; token 2 -> three 1.0s tie: {1, 2}
    assert core_frequencies(ACTS, 0.7).tolist() == [1, 2, 2, 1, 0, 0]
    # beta = 0.5 -> 3 neurons: 1 and 2 (f = 2), then f = 1 ties between 0 and 3: 0
    assert core_neurons(ACTS, 0.7, 0.5).tolist() == [0, 1, 2]
    assert core_neurons(ACTS, 0.7, 0.5).dtype == np.int32
    assert core_neurons(ACTS, 0.7, 0.34).tolist() == [1, 2]  # floor(2.04) = 2
    # n_core rounded up to the block, at most n_ff
    assert core_neurons(ACTS, 0.7, 0.5, block=4).tolist() == [0, 1, 2, 3]
    assert core_neurons(ACTS, 0.7, 0.5, block=32).tolist() == [0, 1, 2, 3, 4, 5]


def test_token_core_neurons_take_the_k_largest_even_when_not_positive():
    # k = 3 > 2 positive activations of token 1: its third is the first of its zeros (index 3)
    assert token_core_mask(ACTS, 3)[1].tolist() == [True, False, True, True, False, False]
    # token 0 -> {1, 3, 5}, token 1 -> {0, 2, 3}, token 2 -> {1, 2, 3}
    assert core_frequencies(ACTS, 1.0).tolist() == [1, 2, 2, 3, 0, 1]


def test_token_core_mask_equals_a_stable_sort_with_many_ties():
    rng = np.random.default_rng(0)
    a = rng.integers(-2, 3, size=(40, 17)).astype(np.float32)  # 5 values: ties everywhere
    for k in range(0, 18):
        expected = np.zeros(a.shape, dtype=bool)
        for t, row in enumerate(a):
            expected[t, np.argsort(-row, kind="stable")[:k]] = True
        assert (token_core_mask(a, k) == expected).all(), k


def test_core_count():
    assert core_count(64, 0.4) == 25
    assert core_count(64, 0.4, block=32) == 32
    assert core_count(1536, 0.4, block=256) == 768  # 614 -> 768
    assert core_count(100, 1.0, block=32) == 100  # capped at n_ff
    assert core_count(64, 0.0) == 0


def test_image_scores_by_hand():
    acts = np.array(
        [
            [1.0, 1.0, -2.0, 0.0],  # text, Gamma {0, 1}
            [1.0, 1.0, 0.0, 0.0],  # image, {0, 1}
            [0.5, 0.0, 3.0, -1.0],  # image, {0, 2}
            [-1.0, -1.0, -1.0, -1.0],  # image, {}
            [2.0, 0.0, 1.0, 1.0],  # text, {0, 2, 3}
        ]
    )
    image = [1, 2, 3]
    assert image_scores(acts, image).tolist() == [1, 2, 0]  # anchor: the last row
    assert image_scores(acts, image, "anchor", anchor_row=0).tolist() == [2, 1, 0]
    assert image_scores(acts, image, "paper", core_K=[1, 2]).tolist() == [1, 1, 0]
    assert image_scores(acts, image, "paper", core_K=[3]).tolist() == [0, 0, 0]
    with pytest.raises(ValueError):
        image_scores(acts, image, "paper")
    with pytest.raises(ValueError):
        image_scores(acts, image, "cosine")


def test_elbow_by_hand():
    # distances |(s6 - s0) j - 6 (sj - s0)| = |60 - 10 j - 6 sj| = 0, 4, 8, 18, 14, 4, 0: j* = 3 (s = 2)
    assert elbow_count([10, 9, 8, 2, 1, 1, 0]) == 3
    assert elbow_count([1, 10, 0, 8, 1, 9, 2]) == 3  # order of the input does not matter
    # |12 - 4 j - 3 sj| = 0, 1, 1, 0: the first maximum (j = 1, s = 3) -> 1; the last would give 2
    assert elbow_count([4, 3, 1, 0]) == 1
    # |18 - 6 j - 3 sj| = 0, 6, 12, 0: j* = 2 sits on s = 6, and no score is strictly greater
    assert elbow_count([6, 6, 6, 0]) == 0
    # |63 - 9 j - 7 sj| = 0, 19, 10, 1, 27, 18, 9, 0: j* = 4 (s = 0) -> the four positive scores
    assert elbow_count([9, 5, 5, 5, 0, 0, 0, 0]) == 4
    # raw float axes: |-0.75 j - 2 (sj - 1)| = 0, 0.25, 0: j* = 1 (s = 0.5)
    assert elbow_count([1.0, 0.5, 0.25]) == 1
    assert elbow_count([5, 5, 5]) == 0 and elbow_count([7]) == 0 and elbow_count([]) == 0
    assert elbow_count(np.array([3, 0, 1], dtype=np.uint8)) == elbow_count([3, 0, 1])  # no unsigned wrap


def test_select_tokens_elbow_and_clamps():
    s = [10, 9, 8, 2, 1, 1, 0]
    assert select_tokens(s).tolist() == [0, 1, 2]
    # min_keep 0.6: ceil(4.2) = 5; the two 1s tie: the lower index (4) comes first
    assert select_tokens(s, min_keep=0.6).tolist() == [0, 1, 2, 3, 4]
    assert select_tokens(s, max_keep=0.3).tolist() == [0, 1]  # floor(2.1)
    assert select_tokens(s, max_keep=0.1).tolist() == [0]  # floor(0.7) = 0, then at least 1
    # returned ascending, as indices into the image
    assert select_tokens([1, 10, 0, 8, 1, 9, 2]).tolist() == [1, 3, 5]
    assert select_tokens([6, 6, 6, 0]).tolist() == [0]  # elbow 0 -> at least 1, lowest index
    assert select_tokens([6, 6, 6, 0], min_keep=0.5).tolist() == [0, 1]
    assert select_tokens([]).tolist() == []
    # the clamps are computed in double precision (as Python and a C++ double do; float32 gives
    # 7 and 29): 0.07 * 100 = 7.000000000000001 -> ceil 8; 0.29 * 100 = 28.999999999999996 -> floor 28
    outlier = [100] + [0] * 99  # the elbow keeps 1
    assert keep_count(outlier) == 1
    assert keep_count(outlier, min_keep=0.07) == 8
    assert keep_count(np.arange(100), budget=None, min_keep=0.29, max_keep=0.29) == 28
    with pytest.raises(ValueError):
        select_tokens(s, min_keep=0.8, max_keep=0.5)


def test_select_tokens_budget_and_ties():
    s = [3, 5, 5, 1, 5]
    assert select_tokens(s, budget=2).tolist() == [1, 2]  # three 5s: lowest indices first
    assert select_tokens(s, budget=4).tolist() == [0, 1, 2, 4]
    assert select_tokens(s, budget=10).tolist() == [0, 1, 2, 3, 4]  # min(b, M)
    assert select_tokens(s, budget=0).tolist() == []
    # a budget replaces the elbow and its clamps
    assert select_tokens(s, budget=1, min_keep=0.8).tolist() == [1]


def test_keep_rows():
    rows = keep_rows(10, [(1, 3), (6, 2)], [np.array([0, 2]), np.array([1])])
    assert rows.tolist() == [0, 1, 3, 4, 5, 7, 8, 9]


def test_pure_functions_import_without_torch():
    code = "import sys, cmx, cmx.reference; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ref.__file__.rsplit("/cmx/", 1)[0])


# ---------------------------------------------------------------------------------------------
# The model class against Hugging Face

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

N_EMBD, N_FF, N_LAYERS, N_VOCAB = 32, 64, 4, 96
T_PROMPT = 26
SPANS = [(3, 10), (15, 8)]  # two images; text rows 0..2, 13..14, 23..25


def _randomize(model, seed):
    """Weights of order 1/sqrt(fan_in) (HF's 0.02 init leaves the activations tiny and similar)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_((1.0 if "norm" in name else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(p.shape[1]))
    return model.eval()


def tiny_model(arch="llama", attn="sdpa", seed=0):
    common = dict(
        vocab_size=N_VOCAB,
        hidden_size=N_EMBD,
        intermediate_size=N_FF,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        attn_implementation=attn,
    )
    if arch == "llama":
        cfg = transformers.LlamaConfig(num_key_value_heads=2, rope_theta=10000.0, **common)
        return _randomize(transformers.LlamaForCausalLM(cfg), seed)
    cfg = transformers.Qwen2Config(num_key_value_heads=1, rope_theta=1e6, **common)
    return _randomize(transformers.Qwen2ForCausalLM(cfg), seed)


def prompt_rows(model, seed=0):
    """Text rows are token embeddings, image rows random vectors of a similar scale."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        x = model.get_input_embeddings()(torch.as_tensor(rng.integers(0, N_VOCAB, T_PROMPT))).numpy().copy()
    for first, n in SPANS:
        x[first : first + n] = rng.standard_normal((n, N_EMBD)).astype(np.float32)
    return x


class NeuronHooks:
    """Test-side hooks on each mlp.down_proj: record the activations, and zero the non-core
    neurons of the rows from `first_row` on in the given layers."""

    def __init__(self, layers, restrict=None, first_row=0):
        self.acts = {}
        self.handles = [
            layer.mlp.down_proj.register_forward_pre_hook(self._hook(il, restrict or {}, first_row))
            for il, layer in enumerate(layers)
        ]

    def _hook(self, il, restrict, first_row):
        def hook(module, args):
            a = args[0].clone()
            self.acts[il] = a[0].numpy().copy()
            if il in restrict:
                outside = np.setdiff1d(np.arange(a.shape[-1]), restrict[il])
                a[0, first_row:, torch.as_tensor(outside)] = 0.0
                return (a,)
            return None

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def hf_logits(model, rows, n_prompt, prune_layer=None, keep=None, core=None, compact_positions=False):
    """Per-row logits of `rows` (prompt + generated) from HF's forward. With prune_layer, layers
    0..K run on every row, then a copy of layers K+1.. on the kept prompt rows + the generated rows
    at their original position_ids. `core` (layer -> neurons) restricts the generated rows' FFNs.
    Returns (logits [rows seen by the last layer, vocab], activations per layer of the prompt rows)."""
    core = core or {}
    x = torch.as_tensor(rows)[None]
    layers = list(model.model.layers)
    if prune_layer is None:
        hooks = NeuronHooks(layers, core, n_prompt)
        with torch.no_grad():
            logits = model(inputs_embeds=x).logits[0].numpy()
        hooks.remove()
        return logits, {il: a[:n_prompt] for il, a in hooks.acts.items()}

    K = prune_layer
    head = NeuronHooks(layers[: K + 1], core, n_prompt)
    after_K = {}
    grab = layers[K + 1].register_forward_pre_hook(lambda m, args, kw: after_K.update(h=args[0]), with_kwargs=True)
    with torch.no_grad():
        model(inputs_embeds=x)
    grab.remove()
    head.remove()

    tail = copy.deepcopy(model)
    tail.model.layers = torch.nn.ModuleList(list(tail.model.layers)[K + 1 :])
    tail.config.num_hidden_layers = len(tail.model.layers)
    seen = np.concatenate([keep, np.arange(n_prompt, len(rows))])
    tail_core = {il - (K + 1): c for il, c in core.items() if il > K}
    tail_hooks = NeuronHooks(tail.model.layers, tail_core, len(keep))
    positions = np.arange(len(seen)) if compact_positions else seen
    with torch.no_grad():
        logits = tail(
            inputs_embeds=after_K["h"][:, torch.as_tensor(seen)],
            position_ids=torch.as_tensor(positions)[None],
            attention_mask=torch.ones(1, len(seen), dtype=torch.long),  # causal by row order
            use_cache=False,
        ).logits[0].numpy()
    tail_hooks.remove()
    acts = {il: a[:n_prompt] for il, a in head.acts.items()}
    acts.update({il + K + 1: a[: len(keep)] for il, a in tail_hooks.acts.items()})
    return logits, acts


def decode_all(cm, x, n_new, **prefill_args):
    """Greedy: the prefill logits then each decode step's ([n_new + 1, vocab]), and the tokens decoded."""
    steps = [cm.prefill(x, **prefill_args).logits]
    tokens = []
    for _ in range(n_new):
        tokens.append(int(np.argmax(steps[-1])))
        steps.append(cm.decode(tokens[-1]))
    return np.stack(steps), tokens


@pytest.mark.parametrize("arch,attn", [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa")])
def test_without_token_pruning_prefill_is_the_hf_forward(arch, attn):
    model = tiny_model(arch, attn)
    x = prompt_rows(model)
    hf, hf_acts = hf_logits(model, x, T_PROMPT)
    result = CoreMatchingReference(model, tokens=False, neurons=True).prefill(x, SPANS)
    assert np.abs(result.logits - hf[-1]).max() < 1e-5
    assert [k.tolist() for k in result.kept] == [list(range(n)) for _, n in SPANS]
    assert result.rows.tolist() == list(range(T_PROMPT)) and result.scores is None
    for il in range(N_LAYERS):  # core neurons of every row at every layer
        assert result.core_neurons[il].tolist() == core_neurons(hf_acts[il], 0.2, 0.4).tolist()
        assert len(result.core_neurons[il]) == 25


def test_rho_beta_one_sparse_decode_equals_dense():
    model = tiny_model()
    x = prompt_rows(model)
    sparse = CoreMatchingReference(model, tokens=False, neurons=True, rho=1.0, beta=1.0)
    dense = CoreMatchingReference(model, tokens=False, neurons=False)
    sparse_logits, tokens = decode_all(sparse, x, 6)
    dense_logits, dense_tokens = decode_all(dense, x, 6)
    assert sparse.sparse_layers == [0, 1, 2, 3] and dense.sparse_layers == []
    assert all(len(c) == N_FF for c in sparse.last_prefill.core_neurons)
    assert tokens == dense_tokens
    assert np.abs(sparse_logits - dense_logits).max() < 1e-5
    # and the KV-cached decode is HF's forward over prompt + answer
    answer = sparse.embed(tokens)
    hf, _ = hf_logits(model, np.concatenate([x, answer]), T_PROMPT)
    assert np.abs(sparse_logits - hf[T_PROMPT - 1 :]).max() < 1e-4


def test_sparse_decode_restricts_generated_rows_only():
    model = tiny_model(seed=1)
    x = prompt_rows(model, seed=1)
    cm = CoreMatchingReference(model, tokens=False, dense_layers=(0, -1), block=[1, 16, 1, 1])
    logits, tokens = decode_all(cm, x, 5)
    core = cm.last_prefill.core_neurons
    assert cm.sparse_layers == [1, 2]
    assert [len(c) for c in core] == [25, 32, 25, 25]  # floor(0.4 * 64) = 25; 32 with a block of 16
    # oracle: HF's forward on prompt + answer, the answer rows' non-core neurons zeroed by hooks
    answer = cm.embed(tokens)
    hf, _ = hf_logits(model, np.concatenate([x, answer]), T_PROMPT, core={il: core[il] for il in (1, 2)})
    assert np.abs(logits - hf[T_PROMPT - 1 :]).max() < 1e-4
    # the restriction matters: the dense decode of the same tokens differs
    dense_hf, _ = hf_logits(model, np.concatenate([x, answer]), T_PROMPT)
    assert np.abs(logits[0] - dense_hf[T_PROMPT - 1]).max() < 1e-5  # the prefill stays dense
    assert np.abs(logits[1:] - dense_hf[T_PROMPT:]).max() > 1e-2


@pytest.mark.parametrize(
    "arch,prune_layer,params,anchor_row",
    [
        ("llama", 1, dict(score="anchor", neurons=False), None),
        ("llama", 2, dict(score="paper", budget=4, dense_layers=(0,)), None),
        ("llama", 0, dict(score="anchor", min_keep=0.25, block=8), 13),
        ("qwen2", 1, dict(score="anchor"), 24),
    ],
)
def test_token_pruning_is_hf_on_the_kept_rows_at_original_positions(arch, prune_layer, params, anchor_row):
    model = tiny_model(arch, seed=2)
    x = prompt_rows(model, seed=2)
    cm = CoreMatchingReference(model, prune_layer=prune_layer, **params)
    logits, tokens = decode_all(cm, x, 4, image_spans=SPANS, anchor_row=anchor_row)
    result = cm.last_prefill
    K, block = prune_layer, params.get("block", 1)

    # selection: the pure functions on HF's own activations at layer K, each image on its own
    _, full_acts = hf_logits(model, x, T_PROMPT)
    acts_K = full_acts[K]
    core_K = core_neurons(acts_K, 0.2, 0.4, block)
    anchor = T_PROMPT - 1 if anchor_row is None else anchor_row
    for (first, n), kept, scores in zip(SPANS, result.kept, result.scores):
        expected_scores = image_scores(acts_K, np.arange(first, first + n), cm.score, core_K, anchor)
        assert scores.tolist() == expected_scores.tolist()
        assert kept.tolist() == select_tokens(expected_scores, cm.budget, cm.min_keep, cm.max_keep).tolist()
    keep = keep_rows(T_PROMPT, SPANS, result.kept)
    assert result.rows.tolist() == keep.tolist()
    assert len(keep) < T_PROMPT  # something was pruned, so the checks below mean something

    # logits: HF on all rows through layer K, then on the kept rows at their original positions
    answer = cm.embed(tokens)
    core = {il: result.core_neurons[il] for il in cm.sparse_layers}
    all_rows = np.concatenate([x, answer])
    hf, hf_acts = hf_logits(model, all_rows, T_PROMPT, prune_layer=K, keep=keep, core=core)
    assert np.abs(logits - hf[len(keep) - 1 :]).max() < 1e-4
    # core neurons of each layer from the rows it saw: all rows up to K, the kept rows after
    for il in range(N_LAYERS):
        assert result.core_neurons[il].tolist() == core_neurons(hf_acts[il], 0.2, 0.4, block).tolist(), il

    # the positions are the original ones: compacted positions give other logits
    compact, _ = hf_logits(model, all_rows, T_PROMPT, prune_layer=K, keep=keep, core=core, compact_positions=True)
    assert np.abs(logits - compact[len(keep) - 1 :]).max() > 1e-3
    # and the dropped rows are really gone after K: the unpruned model answers otherwise
    unpruned, _ = hf_logits(model, x, T_PROMPT)
    assert np.abs(logits[0] - unpruned[-1]).max() > 1e-3


def test_an_earlier_selection_is_kept_as_is():
    model = tiny_model(seed=4)
    x = prompt_rows(model, seed=4)
    cm = CoreMatchingReference(model, prune_layer=1, score="paper")
    earlier = np.array([0, 4, 9])  # image 0 as an earlier turn chose it
    result = cm.prefill(x, SPANS, earlier_kept=[earlier, None])
    assert result.kept[0].tolist() == [0, 4, 9] and result.scores[0] is None
    fresh = cm.prefill(x, SPANS)  # image 1 is selected as without the earlier selection
    assert result.kept[1].tolist() == fresh.kept[1].tolist()
    assert result.scores[1].tolist() == fresh.scores[1].tolist()
    result = cm.prefill(x, SPANS, earlier_kept=[earlier, None])
    hf, _ = hf_logits(model, x, T_PROMPT, prune_layer=1, keep=keep_rows(T_PROMPT, SPANS, result.kept))
    assert np.abs(result.logits - hf[-1]).max() < 1e-4
    with pytest.raises(ValueError):
        cm.prefill(x, SPANS, earlier_kept=[np.array([3, 3]), None])


def test_generate_is_greedy_over_prefill_and_decode():
    model = tiny_model(seed=3)
    x = prompt_rows(model, seed=3)
    cm = CoreMatchingReference(model, prune_layer=1)
    logits, tokens = decode_all(cm, x, 5, image_spans=SPANS)
    assert cm.generate(x, SPANS, max_new_tokens=6) == tokens + [int(np.argmax(logits[-1]))]
    stop = tokens[2]
    assert cm.generate(x, SPANS, max_new_tokens=6, stop_tokens=[stop]) == tokens[: tokens.index(stop) + 1]


def test_bad_arguments():
    model = tiny_model()
    x = prompt_rows(model)
    with pytest.raises(ValueError):
        CoreMatchingReference(model)  # token pruning needs a layer
    with pytest.raises(ValueError):
        CoreMatchingReference(model, prune_layer=N_LAYERS)
    with pytest.raises(ValueError):
        CoreMatchingReference(model, prune_layer=1, block=[1, 1])
    cm = CoreMatchingReference(model, prune_layer=1)
    with pytest.raises(RuntimeError):
        cm.decode(1)
    with pytest.raises(ValueError):
        cm.prefill(x, [(20, 6)])  # the last row would be an image row
    with pytest.raises(ValueError):
        cm.prefill(x, [(3, 10), (10, 3)])  # overlap
    with pytest.raises(ValueError):
        cm.prefill(x, [(20, 9)])  # past the end

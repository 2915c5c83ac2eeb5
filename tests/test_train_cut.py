"""tools/train_vlm.py's CoreMatchingCut: the LM forward that trains the demo model under
CoreMatching must cut what the engine cuts. Checked against cmx.reference (itself checked against
the engine in test_reference_parity) on a tiny random llama: the same kept image rows, and the
logits of a decoded row (sparse FFNs from the prompt's text rows) within float tolerance. With the
cut off, the forward is the LM's own."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from cmx.reference import CoreMatchingReference  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
N_LAYERS, N_FF, N_EMBD = 5, 96, 64
P, M, N_SUFFIX = 3, 24, 7  # prefix rows, image rows, question + answer header rows
N_GEN = 3  # the answer header's tokens: the anchor is the first of them
K, KEEP = 1, 6


@pytest.fixture(scope="module")
def train_vlm():
    spec = importlib.util.spec_from_file_location("train_vlm", ROOT / "tools" / "train_vlm.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["train_vlm"] = mod
    spec.loader.exec_module(mod)
    return mod


def tiny_llama(seed=0):
    cfg = transformers.LlamaConfig(vocab_size=120, hidden_size=N_EMBD, intermediate_size=N_FF,
                                   num_hidden_layers=N_LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=128, tie_word_embeddings=False,
                                   attn_implementation="sdpa")
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape))
            elif p.ndim == 2:
                p.copy_(torch.randn(p.shape) / np.sqrt(p.shape[1]))
    return model.eval()


def rows(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 120, (P + M + N_SUFFIX + 1,), generator=g)
    with torch.no_grad():
        x = model.get_input_embeddings()(ids).clone()
        x[P:P + M] = torch.randn(M, N_EMBD, generator=g)  # image rows
    return x  # the prompt, then one answer token (a decoded row)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cut_matches_reference(train_vlm, seed):
    model = tiny_llama(seed)
    x = rows(model, seed)
    n_prompt = x.shape[0] - 1
    anchor = n_prompt - N_GEN
    dense_layers = (0, N_LAYERS - 1)

    ref = CoreMatchingReference(model, prune_layer=K, budget=KEEP, score="anchor", dense_layers=dense_layers,
                                neuron_tokens="text", rho=0.2, beta=0.4, block=8)
    pre = ref.prefill(x[:n_prompt].numpy(), image_spans=[(P, M)], anchor_row=anchor)
    tok = int(torch.randint(0, 120, (1,), generator=torch.Generator().manual_seed(seed + 99)))
    ref_logits = ref.decode(tok)
    with torch.no_grad():  # the decoded row: that token's embedding
        x[n_prompt] = model.get_input_embeddings()(torch.tensor(tok))

    cut = train_vlm.CoreMatchingCut(N_LAYERS, N_FF, prune_layer=K, keep=KEEP, rho=0.2, beta=0.4, block=8,
                                    dense_layers=dense_layers)
    cut.install(model)
    L = x.shape[0]
    stat_rows = torch.ones(1, L, dtype=torch.bool)
    stat_rows[0, P:P + M] = False
    stat_rows[0, n_prompt:] = False
    answer_turn = torch.full((1, L), -1, dtype=torch.long)
    answer_turn[0, n_prompt:] = 0
    cut.set_batch(P, M, stat_rows, answer_turn, torch.tensor([[n_prompt - 1]]), torch.tensor([anchor]))
    with torch.no_grad():
        cut.active = True
        h, kept_rows = cut.hidden(model, x[None])
        cut.active = False
        logits = model.lm_head(h[0]).float()
    kept = kept_rows[0, P:P + KEEP].numpy() - P
    assert sorted(kept.tolist()) == sorted(np.asarray(pre.kept[0]).tolist())
    # the prompt's last row (dense FFNs, after the cut) gives the reference's prefill logits,
    # the decoded row (sparse FFNs) its decode logits
    np.testing.assert_allclose(logits[-2].numpy(), np.asarray(pre.logits).reshape(-1), atol=2e-4, rtol=0)
    np.testing.assert_allclose(logits[-1].numpy(), np.asarray(ref_logits).reshape(-1), atol=2e-4, rtol=0)
    # and the sparse FFNs matter: the decoded row's logits differ from the dense forward's
    with torch.no_grad():
        dense = model.lm_head(model.model(inputs_embeds=x[None]).last_hidden_state[0]).float()
    assert float((dense[-1] - logits[-1]).abs().max()) > 1e-2


def test_cut_off_is_the_dense_lm(train_vlm):
    model = tiny_llama(3)
    x = rows(model, 3)
    with torch.no_grad():
        want = model.model(inputs_embeds=x[None]).last_hidden_state
    cut = train_vlm.CoreMatchingCut(N_LAYERS, N_FF, prune_layer=K, keep=KEEP)
    cut.install(model)
    with torch.no_grad():
        got = model.model(inputs_embeds=x[None]).last_hidden_state  # installed, inactive
        h, _ = cut.hidden(model, x[None])
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    torch.testing.assert_close(h, want, atol=1e-5, rtol=1e-5)


def test_batch_layout(train_vlm):
    """build_batch's rows for the cut: text rows, decoded answer rows per turn, turn ends, anchor."""

    class Tok:  # one token per character: positions are easy to read
        def __call__(self, text, add_special_tokens=False):
            return type("E", (), {"input_ids": [ord(c) for c in text]})

    pb = train_vlm.PromptBuilder.__new__(train_vlm.PromptBuilder)
    pb.prefix_ids, pb.n_img, pb.n_gen, pb.eot_id = [1, 2], 4, 2, 0
    pb._qcache, pb._tcache, pb._acache = {}, {}, {}
    pb.suffix = lambda q: [ord(c) for c in q] + [7, 8]   # question, answer header (2 tokens)
    pb.turn = lambda q: [9] + [ord(c) for c in q] + [7, 8]
    pb.answer = lambda a: [ord(c) for c in a] + [0]
    ids, tpos, tids, lay = train_vlm.build_batch(pb, [["ab", "c"]], [["xy", "z"]], "cpu", pad_id=5)
    # rows: 0-1 prefix, 2-5 image, 6-7 "ab", 8-9 header, 10-11 "xy", 12 eot, 13 "\x09", 14 "c", 15-16 header, 17 "z", 18 eot
    assert lay["turn_ends"].tolist() == [[9, 16]]
    assert int(lay["anchor"][0]) == 8
    assert [r for r in range(ids.shape[1]) if lay["answer_turn"][0, r] == 0] == [10, 11]
    assert [r for r in range(ids.shape[1]) if lay["answer_turn"][0, r] == 1] == [17]
    assert lay["stat_rows"][0].tolist() == [True, True] + [False] * 4 + [True] * 13
    assert tpos[:, 1].tolist() == [9, 10, 11, 16, 17]

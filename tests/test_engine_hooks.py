"""The layer loop's CoreMatching hooks: token pruning after a layer (per-layer cache lengths,
explicit positions) and an FFN restricted to a neuron index set."""

import numpy as np
import pytest

from cmx._core import Engine

i32 = lambda xs: np.asarray(xs, np.int32)  # noqa: E731


@pytest.fixture()
def engine(tiny_model_path):
    return Engine(tiny_model_path("llama", "f32"), n_ctx=256)


TOKENS = [13, 300, 421, 77, 990, 5, 1234, 64, 318, 4000, 17, 29]


def test_prune_keeping_everything_is_dense(engine):
    n = len(TOKENS)
    dense = engine.decode(i32(TOKENS), i32(range(n)), i32([n - 1]))
    engine.clear()
    kept = engine.decode(i32(TOKENS), i32(range(n)), i32([n - 1]), prune_after_layer=0, keep_rows=list(range(n)))
    assert np.abs(dense - kept).max() < 1e-5


def test_pruned_layers_cache_only_kept_tokens(engine):
    n, keep = len(TOKENS), [0, 1, 5, 9, 10, 11]
    pos = list(range(100, 100 + n))  # explicit positions, not starting at 0
    engine.decode(i32(TOKENS), i32(pos), i32([len(keep) - 1]), prune_after_layer=0, keep_rows=keep)
    assert engine.cache_len(0) == n and engine.cache_positions(0) == pos
    assert engine.cache_len(1) == len(keep)
    assert engine.cache_positions(1) == [pos[r] for r in keep]
    # decoding continues at the next position with layers of different lengths
    logits = engine.decode(i32([42]), i32([100 + n]), i32([0]))
    assert np.isfinite(logits).all()
    assert (engine.cache_len(0), engine.cache_len(1)) == (n + 1, len(keep) + 1)


def test_pruning_changes_what_later_layers_see(engine):
    n = len(TOKENS)
    dense = engine.decode(i32(TOKENS), i32(range(n)), i32([n - 1]))
    engine.clear()
    keep = [0, 3, n - 1]
    pruned = engine.decode(i32(TOKENS), i32(range(n)), i32([2]), prune_after_layer=0, keep_rows=keep)
    assert np.abs(dense - pruned).max() > 1e-3


def test_ffn_with_all_neurons_is_dense_and_subset_is_not(engine):
    n, n_ff = len(TOKENS), engine.info["n_ff"]
    dense = engine.decode(i32(TOKENS), i32(range(n)), i32([n - 1]))
    engine.clear()
    engine.set_ffn_neurons([list(range(n_ff)), list(range(n_ff))])
    full = engine.decode(i32(TOKENS), i32(range(n)), i32([n - 1]))
    assert np.abs(dense - full).max() < 1e-4
    engine.clear()
    engine.set_ffn_neurons([[], list(range(0, n_ff, 2))])  # layer 0 dense, layer 1 half
    half = engine.decode(i32(TOKENS), i32(range(n)), i32([n - 1]))
    assert np.abs(dense - half).max() > 1e-3
    with pytest.raises(ValueError, match="ascending"):
        engine.set_ffn_neurons([[3, 2]])


def test_mixed_token_and_embedding_rows(engine, tiny_model_path):
    """Rows given as float embeddings equal the same tokens given as ids."""
    from gguf import GGUFReader

    reader = GGUFReader(tiny_model_path("llama", "f32"))
    table = next(t for t in reader.tensors if t.name == "token_embd.weight").data  # [n_vocab, n_embd]
    n = len(TOKENS)
    ids = engine.decode(i32(TOKENS), i32(range(n)), i32(range(n)))
    engine.clear()
    as_embd = [3, 4, 5, 8]
    tokens = [-1 if i in as_embd else t for i, t in enumerate(TOKENS)]
    embd = np.stack([table[TOKENS[i]] for i in as_embd]).astype(np.float32)
    mixed = engine.decode(i32(tokens), i32(range(n)), i32(range(n)), embd=embd)
    assert np.abs(ids - mixed).max() < 1e-4

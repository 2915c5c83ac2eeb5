"""Selections for equal-budget comparisons (cmx.Sparsity(select=...)): random and DivPrune, made
in Python and pruned by the engine at the same place as CoreMatching."""

import numpy as np
import pytest

import cmx
import llava_tiny as lt
from cmx.selection import divprune, random_subset


def test_divprune_takes_one_token_per_cluster_first():
    rng = np.random.default_rng(0)
    centres = np.eye(4, 16) * 10  # four orthogonal directions
    x = np.concatenate([c + 0.01 * rng.standard_normal((25, 16)) for c in centres])  # 4 clusters of 25
    kept = divprune(x, 4)
    assert sorted(k // 25 for k in kept) == [0, 1, 2, 3]
    assert len(divprune(x, 10)) == 10 and divprune(x, 1000) == list(range(100))


def test_divprune_with_duplicates_never_repeats_and_prefers_outliers():
    x = np.tile([1.0, 0.0, 0.0], (50, 1))  # 50 identical background tokens
    x[[7, 31]] = [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]  # two distinct objects
    kept = divprune(x, 5)
    assert len(set(kept)) == 5 and {7, 31} <= set(kept)


def test_divprune_is_greedy_max_min():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((60, 8))
    kept = divprune(x, 12)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    d = 1 - unit @ unit.T
    np.fill_diagonal(d, np.inf)
    # the first pick is the token farthest from its nearest neighbour
    assert int(np.argmax(d.min(axis=1))) in kept


def test_random_subset_is_seeded():
    a, b = random_subset(576, 64, 3), random_subset(576, 64, 3)
    assert a == b and len(set(a)) == 64 and a == sorted(a)
    assert random_subset(576, 64, 4) != a
    assert random_subset(10, 64, 0) == list(range(10))


@pytest.mark.parametrize("kw, message", [({"select": "fastest"}, "select must be one of"),
                                         ({"select": "random"}, "needs tokens=True and budget"),
                                         ({"select": "divprune", "budget": 8, "tokens": False}, "needs tokens=True"),
                                         ({"select": "random", "budget": 8, "seed": -1}, "seed must be")])
def test_invalid_selection_options(kw, message):
    with pytest.raises(ValueError, match=message):
        cmx.Sparsity(**kw)


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    text, mmproj, images = lt.export_tiny_pair(tmp_path_factory.mktemp("tiny_llava_select"), n_images=1)
    return text, mmproj, images[0]


def ask(m, image, **kw):
    msg = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "What is it?"}]}]
    m.reset()
    text = m.chat(msg, max_tokens=4, **kw)
    return text, m.last_stats


def test_engine_prunes_the_selected_tokens(tiny_llava):
    text, mmproj, image = tiny_llava
    m = cmx.Model(text, mmproj=mmproj, n_ctx=2048, n_threads=2)
    _, dense_stats = ask(m, image, sparsity=None)
    n = dense_stats["image_tokens"][0]
    _, st = ask(m, image, sparsity=cmx.Sparsity(select="random", budget=20, seed=5))
    assert st["kept_image_tokens"] == [random_subset(n, 20, 5)]
    from cmx.chat import load_images

    embd = m.vision.encode_image(load_images([image])[0])
    _, st = ask(m, image, sparsity=cmx.Sparsity(select="divprune", budget=20, neurons=False))
    assert st["kept_image_tokens"] == [divprune(embd, 20)]
    # a budget of every token keeps all of them, whatever the method: same logits as CoreMatching's
    everything = []
    for sel in ("corematching", "random", "divprune"):
        m.reset()
        msg = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "What is it?"}]}]
        everything.append(m._prefill_chat(msg, cmx.Sparsity(select=sel, budget=n, neurons=False)))
    assert np.array_equal(everything[0], everything[1]) and np.array_equal(everything[0], everything[2])

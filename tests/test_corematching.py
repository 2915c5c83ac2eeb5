"""CoreMatching in the engine: staged prefill over any n_batch, kept tokens in later layers only,
core neurons in decode, multi-turn chat on a pruned cache, options and their errors."""

import numpy as np
import pytest
from PIL import Image

import cmx
import llava_tiny as lt
from cmx import _core
from devices import GPU, bound
from cmx._core import Engine
from cmx.chat import flatten_messages

i32 = lambda xs: np.asarray(xs, np.int32)  # noqa: E731


# ---------------------------------------------------------------- selection rules


def test_elbow_and_selection_rules():
    # line from (0, 10) to (6, 0); distances |-10 j - 6 (s_j - 10)| = 0, 4, 8, 18, 14, 4, 0:
    # first maximum at j = 3 (s = 2), so the tokens scoring > 2 stay
    assert _core.elbow_count([10, 9, 8, 2, 1, 1, 0]) == 3
    assert _core.select_tokens([1, 10, 0, 9, 1, 8, 2]) == [1, 3, 5]
    assert _core.select_tokens([1, 10, 0, 9, 1, 8, 2], budget=2) == [1, 3]
    assert _core.select_tokens([5, 5, 5, 5]) == [0]  # flat scores: the elbow keeps none, at least one stays
    assert _core.select_tokens([5, 5, 5, 5], budget=2) == [0, 1]  # ties: lower index first
    assert _core.select_tokens([1, 10, 0, 9, 1, 8, 2], min_keep=0.7) == [0, 1, 3, 5, 6]  # ceil(4.9); tie 0/4: lower index
    assert _core.select_tokens([1, 10, 0, 9, 1, 8, 2], max_keep=0.3) == [1, 3]


def test_core_neurons_by_hand():
    # 3 tokens, 6 neurons; activated counts 3, 2, 3 -> rho = 0.5: k = floor(0.5 * 8 / 3) = 1
    acts = np.array([[0.9, 0.1, -1, 0.5, -2, -3],
                     [-1, 0.2, 0.8, -1, -1, -1],
                     [0.7, -1, -1, 0.1, 0.3, -1]], np.float32)
    # each token's top neuron: 0, 2, 0 -> f = [2, 0, 1, 0, 0, 0]; beta = 0.5 -> 3 neurons: 0, 2, then 1 (tie, lower index)
    assert _core.core_neurons(acts, 0.5, 0.5) == [0, 1, 2]
    assert _core.core_neurons(acts, 0.5, 0.5, block=4) == [0, 1, 2, 3]  # rounded up to the block
    assert _core.core_neurons(acts, 1.0, 1.0) == list(range(6))


# ---------------------------------------------------------------- engine


TOKENS = [13, 300, 421, 77, 990, 5, 1234, 64, 318, 4000, 17, 29, 88, 1500, 7, 3]
IMAGE = (3, 9)  # rows 3..11 play an image's part


@pytest.fixture()
def engine_factory(tiny_model_path):
    def make(n_batch=512, ftype="f32", arch="llama"):
        return Engine(tiny_model_path(arch, ftype), n_ctx=256, n_batch=n_batch, n_threads=2)
    return make


def sparsity(**kw):
    return cmx.Sparsity(**kw).to_core(2)  # the tiny models have 2 layers: K = 0


def prefill(engine, keep=(), sp=None, tokens=TOKENS):
    n = len(tokens)
    images = [(IMAGE[0], IMAGE[1], list(keep))] if sp is not None else []
    return engine.prefill(i32(tokens), i32(range(n)), i32([n - 1]), images=images, anchor_row=n - 3, sparsity=sp)


@pytest.mark.parametrize("n_batch", [1, 5, 7])
def test_pruned_prefill_over_ubatches_equals_one_graph(engine_factory, n_batch):
    keep = [0, 4, 5, 8]
    one = prefill(engine_factory(), keep, sparsity(neurons=False))
    split_engine = engine_factory(n_batch)
    split = prefill(split_engine, keep, sparsity(neurons=False))
    assert split["kept"] == one["kept"] == [keep]
    # On a GPU the row count of a graph picks the kernels (CUDA: one row a vector kernel, up to 16
    # rows an mma kernel of ggml's own, more rows cuBLAS), and CUDA computes f32 products in TF32,
    # rounded differently by each: 0.03-0.04 between these graphs on the H200. On the CPU the
    # kernels do not depend on the row count.
    assert np.abs(one["logits"] - split["logits"]).max() < (0.1 if GPU else 1e-4)
    n_kept = len(TOKENS) - IMAGE[1] + len(keep)
    assert split_engine.cache_len(0) == len(TOKENS) and split_engine.cache_len(1) == n_kept
    assert split_engine.cache_positions(1) == [p for p in range(len(TOKENS)) if not IMAGE[0] <= p < sum(IMAGE)
                                               or p - IMAGE[0] in keep]


def test_forced_prune_equals_old_single_graph_hook(engine_factory):
    """prefill with forced kept image tokens == decode's Prune hook with the same rows."""
    keep = [1, 2, 7]
    e1 = engine_factory()
    a = prefill(e1, keep, sparsity(neurons=False))["logits"]
    rows = [r for r in range(len(TOKENS)) if not IMAGE[0] <= r < sum(IMAGE) or r - IMAGE[0] in keep]
    e2 = engine_factory()
    b = e2.decode(i32(TOKENS), i32(range(len(TOKENS))), i32([len(rows) - 1]), prune_after_layer=0, keep_rows=rows)
    assert np.abs(a - b).max() < 1e-5


def test_selection_follows_the_anchor(engine_factory):
    e = engine_factory()
    r = prefill(e, (), sparsity(neurons=False))
    (kept,) = r["kept"]
    assert 1 <= len(kept) <= IMAGE[1] and kept == sorted(kept)
    budget = prefill(engine_factory(), (), sparsity(neurons=False, budget=4))["kept"][0]
    assert len(budget) == 4


def test_dense_prefill_is_unchanged(engine_factory):
    e = engine_factory()
    n = len(TOKENS)
    dense = e.decode(i32(TOKENS), i32(range(n)), i32([n - 1]))
    e.clear()
    r = e.prefill(i32(TOKENS), i32(range(n)), i32([n - 1]))  # no sparsity: the dense engine
    assert np.array_equal(dense, r["logits"])
    assert all(len(s) == 0 for s in e.ffn_neurons())


@pytest.mark.parametrize("ftype", ["f32", "q8_0", "q4_0"])
def test_core_neurons_in_decode(engine_factory, ftype):
    n_ff = engine_factory(ftype=ftype).info["n_ff"]
    n = len(TOKENS)

    def run(sp):
        e = engine_factory(ftype=ftype)
        r = e.prefill(i32(TOKENS), i32(range(n)), i32([n - 1]), sparsity=sp)
        steps = [e.decode(i32([t]), i32([n + i]), i32([0]))[0] for i, t in enumerate([5, 77, 300])]
        return r, e.ffn_neurons(), np.stack(steps)

    _, _, dense = run(None)
    # rho = beta = 1: every neuron is core, decode is the dense one
    r1, sets1, full = run(sparsity(tokens=False, rho=1.0, beta=1.0, dense_layers=()))
    assert r1["core_neurons"] == [n_ff, n_ff] and np.abs(full - dense).max() < 1e-5
    # beta = 0.4: decode reads fewer neurons and its logits move, but stay close
    r2, sets2, sparse = run(sparsity(tokens=False, dense_layers=()))
    block = 1 if ftype == "f32" else 32
    expected = min(n_ff, -(-int(0.4 * n_ff) // block) * block)
    assert r2["core_neurons"] == [expected, expected]
    assert all(len(s) == expected and s == sorted(s) for s in sets2)
    assert np.abs(sparse - dense).max() > 1e-4
    assert np.corrcoef(sparse.ravel(), dense.ravel())[0, 1] > 0.5
    # dense_layers stay dense
    r3, sets3, _ = run(sparsity(tokens=False))  # default: first and last dense
    assert r3["core_neurons"] == [n_ff, n_ff] and all(len(s) == 0 for s in sets3)


def test_bad_sparsity_options(engine_factory):
    with pytest.raises(ValueError):
        cmx.Sparsity(rho=0)
    with pytest.raises(ValueError):
        cmx.Sparsity(beta=1.5)
    with pytest.raises(ValueError):
        cmx.Sparsity(score="attention")
    with pytest.raises(ValueError):
        cmx.Sparsity(budget=0)
    with pytest.raises(ValueError):
        cmx.Sparsity(min_keep=0.5, max_keep=0.2)
    with pytest.raises(ValueError, match="prune_layer"):
        cmx.Sparsity(prune_layer=1).to_core(2)  # no layer after it
    e = engine_factory()
    n = len(TOKENS)
    with pytest.raises(ValueError, match="image spans"):
        e.prefill(i32(TOKENS), i32(range(n)), i32([n - 1]), images=[(10, 20, [])], anchor_row=n - 1, sparsity=sparsity())
    with pytest.raises(ValueError, match="image rows"):
        e.prefill(i32(TOKENS), i32(range(n)), i32([4]), images=[(IMAGE[0], IMAGE[1], [])], anchor_row=n - 1, sparsity=sparsity())
    with pytest.raises(ValueError, match="kept tokens"):
        e.prefill(i32(TOKENS), i32(range(n)), i32([n - 1]), images=[(IMAGE[0], IMAGE[1], [3, 2])], anchor_row=n - 1,
                  sparsity=sparsity())
    for merge, message in [([[0, 1]], "one group per"), ([[0], [5, 9]], "out of the image"), ([[1], [0]], "hold its kept")]:
        with pytest.raises(ValueError, match=message):  # pooling's groups
            e.prefill(i32(TOKENS), i32(range(n)), i32([n - 1]), images=[(IMAGE[0], IMAGE[1], [0, 5], merge)],
                      anchor_row=n - 1, sparsity=sparsity())
    with pytest.raises(ValueError, match="an image is"):
        e.prefill(i32(TOKENS), i32(range(n)), i32([n - 1]), images=[(IMAGE[0], IMAGE[1])], anchor_row=n - 1, sparsity=sparsity())


def test_merged_rows_carry_their_groups_mean(engine_factory):
    """A pooled image token enters layer K + 1 as its group's mean: with groups of one it is the
    plain forced selection; merging changes the logits."""
    n = len(TOKENS)
    keep = [0, 4, 8]
    plain = prefill(engine_factory(), keep, sparsity(neurons=False))["logits"]
    run = lambda merge: engine_factory().prefill(  # noqa: E731
        i32(TOKENS), i32(range(n)), i32([n - 1]), images=[(IMAGE[0], IMAGE[1], keep, merge)], anchor_row=n - 1,
        sparsity=sparsity(neurons=False))["logits"]
    assert np.array_equal(run([[0], [4], [8]]), plain)
    assert np.abs(run([[0, 1, 2], [3, 4, 5], [6, 7, 8]]) - plain).max() > 1e-3


# ---------------------------------------------------------------- the user API, with images


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    from cmx.convert.llava import export_llava

    tok = lt.load_smollm2_tokenizer()
    model = lt.build_tiny_llava(vocab_size=len(tok))
    out = tmp_path_factory.mktemp("tiny_llava_cm")
    paths = export_llava(model, out, tokenizer=tok, text_type="f32", mmproj_type="f32")
    for seed in (0, 1):
        Image.fromarray(lt.test_image(seed=seed)).save(out / f"image{seed}.png")
    return str(paths["text"]), str(paths["mmproj"]), str(out / "image0.png"), str(out / "image1.png")


def turn(text, *images):
    return {"role": "user", "content": [*({"type": "image_url", "image_url": {"url": p}} for p in images),
                                        {"type": "text", "text": text}]}


def test_chat_prunes_each_image_and_reports(tiny_llava):
    text, mmproj, img0, img1 = tiny_llava
    m = cmx.Model(text, mmproj=mmproj, n_ctx=2048, n_threads=2, n_batch=256, sparsity=cmx.Sparsity(budget=40))
    m.chat([turn("Compare the two pictures.", img0, img1)], max_tokens=4)
    st = m.last_stats
    assert st["image_tokens"] == [576, 576]
    assert [len(k) for k in st["kept_image_tokens"]] == [40, 40]
    assert all(0 <= i < 576 for k in st["kept_image_tokens"] for i in k)
    n_layer = m.info["n_layer"]
    assert st["core_neurons"][0] == st["core_neurons"][-1] == m.info["n_ff"]  # first and last dense
    assert st["n_prompt"] > 1152 and st["prefill_ms"] > 0 and st["encode_ms"] > 0
    # layers after K hold the text and 2 x 40 image tokens; layers <= K hold everything
    K = min(2, n_layer - 2)
    eng = m._engine
    assert eng.cache_len(K) - eng.cache_len(K + 1) == 2 * (576 - 40)
    assert eng.cache_len(0) == eng.cache_len(K)


def test_pruned_multiturn_equals_a_fresh_prompt(tiny_llava):
    """Turn 2 on the pruned cache == a fresh prefill of the same history with the image pruned
    the same way: same logits, same core neurons (the sparse-decoded answer is re-evaluated)."""
    text, mmproj, img0, _ = tiny_llava
    sp = cmx.Sparsity(budget=50)
    m = cmx.Model(text, mmproj=mmproj, n_ctx=2048, n_threads=2, sparsity=sp)
    messages = [turn("What is in the picture?", img0)]
    answer = m.chat(messages, max_tokens=6)
    (kept,) = m.last_stats["kept_image_tokens"]
    messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And what colour is it?"}]
    logits_turn2 = m._prefill_chat(messages, sp)
    assert m.last_stats["image_tokens"] == []  # the image was neither encoded nor pruned again
    assert m.last_stats["encode_ms"] == 0.0

    fresh = cmx.Model(text, mmproj=mmproj, n_ctx=2048, n_threads=2)
    items = m._cached
    rows = np.array([t if isinstance(t, int) else -1 for t in items], np.int32)
    (first,) = [i for i, t in enumerate(items) if not isinstance(t, int) and t[1] == 0]
    embd = m._image_embd.get(items[first][0])
    anchor = len(items) - m._anchor_offset(flatten_messages(messages, m.vision.marker)[0])
    r = fresh._engine.prefill(rows, np.arange(len(rows), dtype=np.int32), i32([len(rows) - 1]), embd,
                              images=[(first, 576, kept)], anchor_row=anchor, sparsity=sp.to_core(m.info["n_layer"]))
    assert np.abs(r["logits"][-1] - logits_turn2).max() < bound(1e-4, 2e-3)
    assert fresh._engine.ffn_neurons() == m._engine.ffn_neurons()
    for layer in range(m.info["n_layer"]):
        assert fresh._engine.cache_positions(layer) == m._engine.cache_positions(layer)


def test_dense_after_sparse_is_dense(tiny_llava):
    text, mmproj, img0, _ = tiny_llava
    messages = [turn("What is in the picture?", img0)]
    dense = cmx.Model(text, mmproj=mmproj, n_ctx=2048, n_threads=2)
    ref = dense.chat(messages, max_tokens=8)
    dense.reset()
    ref_logits = dense._prefill_chat(messages, None)
    m = cmx.Model(text, mmproj=mmproj, n_ctx=2048, n_threads=2, sparsity=cmx.Sparsity())
    m.chat(messages, max_tokens=8)
    m.reset()
    assert m.chat(messages, max_tokens=8, sparsity=None) == ref
    m.reset()
    assert np.array_equal(m._prefill_chat(messages, None), ref_logits)


def test_generation_stops_at_n_ctx_on_a_pruned_cache(tiny_llava):
    text, mmproj, img0, _ = tiny_llava
    m = cmx.Model(text, mmproj=mmproj, n_ctx=640, n_threads=2, sparsity=cmx.Sparsity(budget=16))
    out = list(m.chat([turn("Describe it.", img0)], max_tokens=500, stream=True))
    n_prompt = m.last_stats["n_prompt"]
    assert n_prompt + m.last_stats["n_decoded"] <= 640 + 1
    assert len(m._cached) <= 640
    del out


def test_generate_with_embeddings_and_text(tiny_model_path):
    m = cmx.Model(tiny_model_path("llama", "f32"), n_ctx=256, n_threads=2, sparsity=cmx.Sparsity(budget=3, dense_layers=()))
    rng = np.random.default_rng(0)
    image = rng.standard_normal((10, m.info["n_embd"])).astype(np.float32)
    toks = list(m.generate([1, 2, 3, image, 4, 5, 6], max_tokens=3))
    assert m.last_stats["image_tokens"] == [10] and len(m.last_stats["kept_image_tokens"][0]) == 3
    assert len(toks) <= 3
    with pytest.raises(ValueError, match="n_embd"):
        list(m.generate([1, np.zeros((3, 7), np.float32)]))
    with pytest.raises(ValueError, match="sparsity"):
        list(m.generate([1, 2], sparsity="fast"))

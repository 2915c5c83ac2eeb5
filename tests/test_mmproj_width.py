"""Issue 12: header keys are checked against the tensors they describe.

* The projector's output width comes from the projector's tensors, per projector type, as
  llama.cpp's clip loader takes it: a LLaVA-1.5 mmproj from llama.cpp's legacy converter (whose
  clip.vision.projection_dim is CLIP's own 768) loads and matches llama-cpp-python, like one in
  the convert_hf_to_gguf.py --mmproj layout (cmx.convert); a pair that does not fit is refused.
* The CLIP tower's size keys against its tensors, where mtmd would abort the process.
* The text model's block_count against the blocks stored (cmx's loader, as llama.cpp refuses).
"""

from __future__ import annotations

import base64

import gguf
import numpy as np
import pytest
from gguf import GGUFReader

import cmx
import llama_cpp
import llava_tiny as lt
import tiny_models
import vlm_families as vf
from devices import GPU, N_GPU_LAYERS, assert_argmax_within, assert_greedy_within, bound, recorded_samples
from cmx.images import load_image
from cmx.vision import VisionModelError, inspect_mmproj

TEXT_WIDTH = 64  # n_embd of the tiny LLaVA's text model
VISION_WIDTH = 48  # its CLIP tower (not the text width, so that a mixed-up dimension shows)
CLIP_PROJECTION_DIM = 768  # CLIP's own projection_dim, as in ViT-L/14-336
QUESTION = "What is in the picture?"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny LLaVA-1.5 exported three ways: text model, mmproj as cmx.convert writes it
    (convert_hf_to_gguf.py --mmproj layout) and as llama.cpp's legacy converter writes it."""
    from PIL import Image

    from cmx.convert.llava import export_llava

    tok = lt.load_smollm2_tokenizer()
    model = lt.build_tiny_llava(
        vocab_size=len(tok), text_hidden=TEXT_WIDTH, vision_hidden=VISION_WIDTH, vision_projection_dim=CLIP_PROJECTION_DIM
    )
    out = tmp_path_factory.mktemp("mmproj_width")
    paths = export_llava(model, out, tokenizer=tok, text_type="f32", mmproj_type="f16")
    legacy = lt.export_legacy_mmproj(model, out / "mmproj-model-f16.gguf")
    Image.fromarray(lt.test_image()).save(out / "image.png")
    return {"text": str(paths["text"]), "hf": str(paths["mmproj"]), "legacy": legacy, "image": str(out / "image.png")}


# ---------------------------------------------------------------------------------------------
# helpers


def rewrite_gguf(src, dst, keys=None, drop=(), tensors=None) -> str:
    """Copy of a GGUF with keys set (existing ones keep their type), tensors dropped or added."""
    keys, tensors = keys or {}, tensors or {}
    r = GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), r.fields["general.architecture"].contents())
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture":
            continue
        v = keys.get(k, f.contents())
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            w.add_key_value(k, v, f.types[0], sub_type=f.types[1])
        else:
            w.add_key_value(k, v, f.types[0])
    for k, v in keys.items():  # new keys: integers as uint32, lists as int32 arrays
        if k in r.fields:
            continue
        if isinstance(v, list):
            w.add_array(k, v)
        else:
            w.add_uint32(k, v)
    for t in r.tensors:
        if t.name not in drop and t.name not in tensors:
            w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    for name, a in tensors.items():
        w.add_tensor(name, a)
    finish(w)
    return str(dst)


def finish(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def ggml_zeros(*ne) -> np.ndarray:
    """An f32 tensor with ggml shape ne (numpy holds it reversed)."""
    return np.full(tuple(reversed(ne)), 0.01, np.float32)


def mtmd_accepts(mmproj, text) -> bool:
    """Whether stock llama-cpp-python's mtmd loads this pair. The text model is loaded in full:
    mtmd compares widths only against a model that has its weights (not vocab_only)."""
    from llama_cpp import mtmd_cpp as M

    llm = llama_cpp.Llama(str(text), n_ctx=64, verbose=False)
    try:
        p = M.mtmd_context_params_default()
        p.use_gpu, p.warmup, p.print_timings, p.n_threads = False, False, False, 1
        ctx = M.mtmd_init_from_file(str(mmproj).encode(), llm.model, p)
        if ctx:
            M.mtmd_free(ctx)
        return bool(ctx)
    finally:
        llm.close()


def user_turn(image_path):
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_path}}, {"type": "text", "text": QUESTION}]}


def llama_cpp_reference(text_path, mmproj_path, prompt_text, image_path, n_gen):
    """llama-cpp-python's logits of every text position (None for image rows), the prompt split
    and evaluated by mtmd as its MTMD chat handler does, and its greedy continuation (token ids,
    up to n_gen, stopping at end of generation) with its bytes."""
    return vf.llama_cpp_reference(text_path, mmproj_path, prompt_text, [image_path], n_gen, n_ctx=2048, with_text=True,
                                  with_steps=True)


def llama_cpp_answer(text_path, mmproj_path, image_path, max_tokens):
    """The greedy answer of stock llama-cpp-python (Llama + its MTMD chat handler; message content
    reaches the template as a string, as cmx renders it: tools/eval_vqa.py)."""
    from llama_cpp.llama_chat_format import MTMDChatHandler

    from cmx.chat import flatten_messages

    class FlatContentMTMDChatHandler(MTMDChatHandler):
        def _get_template_messages(self, messages, media_marker):
            return flatten_messages(messages, media_marker)[0]

    handler = FlatContentMTMDChatHandler(clip_model_path=mmproj_path, verbose=False, use_gpu=GPU)
    llm = llama_cpp.Llama(text_path, chat_handler=handler, n_ctx=2048, n_batch=512, n_threads=2, n_threads_batch=2, verbose=False,
                          n_gpu_layers=N_GPU_LAYERS)
    try:
        url = "data:image/png;base64," + base64.b64encode(open(image_path, "rb").read()).decode()
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]}]
        out = llm.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=0.0, top_k=1, repeat_penalty=1.0, seed=0)
        return out["choices"][0]["message"]["content"] or ""
    finally:
        llm.close()


# ---------------------------------------------------------------------------------------------
# the two kinds of LLaVA-1.5 mmproj


def test_the_files_carry_what_each_converter_writes(files):
    legacy, hf = GGUFReader(files["legacy"]), GGUFReader(files["hf"])
    value = lambda r, k: r.fields[k].contents() if k in r.fields else None  # noqa: E731
    # legacy: CLIP's projection_dim (not the projector's width), one block dropped and no
    # feature_layer key, CLIP's fc1 under the name ffn_down, f16 matrices
    assert value(legacy, "clip.vision.projection_dim") == CLIP_PROJECTION_DIM != TEXT_WIDTH
    assert value(legacy, "clip.projector_type") == "mlp"
    assert value(legacy, "clip.has_text_encoder") is False and value(legacy, "clip.has_llava_projector") is True
    assert value(legacy, "clip.vision.block_count") == 2 and value(legacy, "clip.vision.feature_layer") is None
    shapes = {t.name: ([int(x) for x in t.shape], t.tensor_type.name) for t in legacy.tensors}
    assert shapes["v.blk.0.ffn_down.weight"] == ([VISION_WIDTH, 2 * VISION_WIDTH], "F16")
    assert shapes["mm.2.weight"] == ([TEXT_WIDTH, TEXT_WIDTH], "F16") and "v.blk.2.attn_q.weight" not in shapes
    # convert_hf_to_gguf.py --mmproj layout: the key holds the text width, explicit feature layer
    assert value(hf, "clip.vision.projection_dim") == TEXT_WIDTH
    assert value(hf, "clip.vision.feature_layer") == [2]


@pytest.mark.parametrize("kind", ["legacy", "hf"])
def test_width_from_the_projector_tensors(files, kind):
    assert inspect_mmproj(files[kind]) == {"projector_type": "mlp", "n_embd": TEXT_WIDTH, "image_size": 336}


@pytest.mark.parametrize("kind", ["legacy", "hf"])
def test_both_kinds_match_llama_cpp(files, kind):
    text, mmproj, image_path = files["text"], files[kind], files["image"]
    vlm = cmx.Model(text, mmproj=mmproj, n_ctx=2048, n_threads=2)
    assert vlm.vision.n_embd == TEXT_WIDTH
    messages = [user_turn(image_path)]
    from cmx.chat import flatten_messages

    flat, _ = flatten_messages(messages, vlm.vision.marker)
    prompt_text = vlm._template.render(flat)
    ref, ref_tokens, ref_bytes, ref_steps = llama_cpp_reference(text, mmproj, prompt_text, image_path, n_gen=16)

    prompt = vlm.vision.tokenize(prompt_text, [load_image(image_path)])
    rows, embd = [], []
    for c in prompt.chunks:
        if hasattr(c, "tokens"):
            rows += c.tokens
        else:
            rows += [-1] * c.n_tokens
            embd.append(vlm.vision.encode(c))
    prompt.close()
    assert len(embd) == 1 and embd[0].shape == (576, TEXT_WIDTH)
    vlm.reset()
    ours = vlm._eval(np.array(rows, np.int32), np.concatenate(embd), 0, all_logits=True)
    text_rows = [i for i, r in enumerate(rows) if r >= 0]
    assert len(rows) == len(ref) and len(text_rows) == sum(x is not None for x in ref)
    a, b = ours[text_rows], np.stack([ref[i] for i in text_rows])
    # the same ggml kernels and image embeddings: equal in practice on the CPU (tests/devices.py)
    logit_bound = bound(1e-4, 2e-2)
    assert np.abs(a - b).max() <= logit_bound
    assert_argmax_within(a, b, bound(0, logit_bound))

    # greedy answers: cmx's, and stock llama-cpp-python's through its MTMD chat handler, are the
    # reference's tokens (text: llama-cpp-python drops bytes that are not UTF-8, cmx shows U+FFFD);
    # cmx's on a GPU up to a step where the two may part at a near tie (tests/devices.py)
    assert len(ref_tokens) > 0
    with recorded_samples() as steps:
        answer = vlm.chat(messages, max_tokens=16)
    ours = [t for _, t in steps]
    assert_greedy_within(ours, [t for _, t in ref_steps], [x for x, _ in ref_steps], bound(0, logit_bound))
    if ours == [t for _, t in ref_steps]:
        assert answer == vlm.detokenize(ref_tokens)
    if not GPU:
        # The chat handler computes the logits of the last prompt row only (not logits_all), so on
        # a GPU its last layer and output run other kernels than the reference's, and it gives no
        # logits to tell a near tie: its answer is compared on the CPU, where ggml computes a row
        # the same in any batch (the logits above are compared on every device).
        assert llama_cpp_answer(text, mmproj, image_path, 16) == ref_bytes.decode("utf-8", errors="ignore")


# ---------------------------------------------------------------------------------------------
# pairs that do not fit


def test_a_mismatched_pair_is_refused(files, smollm2_path, tmp_path):
    for kind in ("legacy", "hf"):
        with pytest.raises(VisionModelError, match="projects to 64 dimensions but the text model has n_embd=576"):
            cmx.Model(smollm2_path, mmproj=files[kind])
    # a header that claims the width of the text model does not make the pair fit
    claims_576 = rewrite_gguf(files["legacy"], tmp_path / "claims-576.gguf", keys={"clip.vision.projection_dim": 576})
    with pytest.raises(VisionModelError, match="projects to 64 dimensions but the text model has n_embd=576"):
        cmx.Model(smollm2_path, mmproj=claims_576)
    # llama.cpp's mtmd judges these pairs the same way
    assert mtmd_accepts(files["legacy"], files["text"])
    assert not mtmd_accepts(files["legacy"], smollm2_path)
    assert not mtmd_accepts(claims_576, smollm2_path)


def yi_style(src, dst, width):
    """The projector of a Yi-style LLaVA (mm.0, mm.1 layer norm, mm.3, mm.4 norm): llama.cpp
    loads it as "mlp_norm", its width from mm.3.bias."""
    hidden = 40
    proj = {
        "mm.0.weight": ggml_zeros(VISION_WIDTH, hidden), "mm.0.bias": ggml_zeros(hidden),
        "mm.1.weight": ggml_zeros(hidden), "mm.1.bias": ggml_zeros(hidden),
        "mm.3.weight": ggml_zeros(hidden, width), "mm.3.bias": ggml_zeros(width),
        "mm.4.weight": ggml_zeros(width), "mm.4.bias": ggml_zeros(width),
    }
    return rewrite_gguf(src, dst, drop=("mm.2.weight", "mm.2.bias"), tensors=proj)


@pytest.mark.parametrize("width", [TEXT_WIDTH, 72])
def test_yi_style_projector_width_agrees_with_mtmd(files, tmp_path, width):
    path = yi_style(files["legacy"], tmp_path / f"yi-{width}.gguf", width)
    assert inspect_mmproj(path)["n_embd"] == width
    assert mtmd_accepts(path, files["text"]) == (width == TEXT_WIDTH)
    if width != TEXT_WIDTH:
        with pytest.raises(VisionModelError, match=f"projects to {width} dimensions but the text model has n_embd=64"):
            cmx.Model(files["text"], mmproj=path, n_ctx=256)
    else:
        assert cmx.Model(files["text"], mmproj=path, n_ctx=256).vision.n_embd == TEXT_WIDTH


def test_projector_without_its_output_tensor(files, tmp_path):
    """mtmd dereferences a missing mm.2.weight (segmentation fault); cmx names it first."""
    path = rewrite_gguf(files["legacy"], tmp_path / "no-mm2.gguf", drop=("mm.2.weight", "mm.2.bias"))
    with pytest.raises(VisionModelError, match="'mlp' projector needs the tensor 'mm.2.weight'"):
        cmx.Model(files["text"], mmproj=path, n_ctx=256)


# ---------------------------------------------------------------------------------------------
# every image projector type of this llama.cpp: where its width lives (checked against mtmd's own
# clip_n_mmproj_embd when written, by loading a minimal file of each type in llama-cpp-python 0.3.36)

W, O = 40, 24  # the width, another dimension
PROJECTORS = [
    ("mlp", {"mm.2.weight": (O, W)}, W),
    ("ldp", {"mm.model.mb_block.1.block.2.1.bias": (W,)}, W),
    ("ldpv2", {"mm.model.peg.0.bias": (W,)}, W),
    ("resampler", {"resampler.proj.weight": (W, O)}, W),
    ("minicpmv4_6", {"mm.down.weight": (O, W)}, W),
    ("adapter", {"adapter.linear.dense_4h_to_h.weight": (O, W)}, W),
    ("qwen2vl_merger", {"mm.2.weight": (O, O), "mm.2.bias": (W,)}, W),
    ("qwen2.5vl_merger", {"mm.2.bias": (W,)}, W),
    ("qwen2.5o", {"mm.2.bias": (W,)}, W),
    ("qwen3vl_merger", {"mm.2.bias": (W,)}, W),
    ("qwen3vl_merger", {"mm.2.bias": (W,), "v.deepstack.0.fc1.weight": (O, O), "v.deepstack.1.fc1.weight": (O, O)}, 3 * W),
    ("exaone4_5", {"mm.2.bias": (W,)}, W),
    ("youtuvl", {"mm.2.bias": (W,)}, W),
    ("ling3vl", {"mm.2.bias": (W,)}, W),
    ("mimovl", {"mm.2.weight": (O, W)}, W),
    ("step3vl", {"mm.model.fc.weight": (O, W)}, W),
    ("gemma3", {"mm.input_projection.weight": (W, O)}, W),
    ("gemma3nv", {"mm.input_projection.weight": (W, O)}, W),
    ("gemma4v", {"mm.input_projection.weight": (O, W)}, W),
    ("gemma4uv", {"mm.input_projection.weight": (O, W)}, W),
    ("idefics3", {"mm.model.fc.weight": (O, W)}, W),
    ("llama4", {"mm.model.fc.weight": (O, W)}, W),
    ("hunyuanvl", {"mm.model.fc.weight": (O, W)}, W),
    ("deepseekocr", {"mm.model.fc.weight": (O, W)}, W),
    ("deepseekocr2", {"mm.model.fc.weight": (O, W)}, W),
    ("internvl", {"mm.model.mlp.3.weight": (O, W)}, W),
    ("nemotron_v2_vl", {"mm.model.mlp.3.weight": (O, W)}, W),
    ("cogvlm", {"mm.down.weight": (O, W)}, W),
    ("glm4v", {"mm.down.weight": (O, W)}, W),
    ("glm5v", {"mm.down.weight": (O, W)}, W),
    ("minimax_m3", {"mm.merger.fc2.bias": (W,)}, W),
    ("janus_pro", {"mm.1.bias": (W,)}, W),
    ("phi4", {"mm.2.weight": (O, W)}, W),
    ("pixtral", {"mm.2.weight": (O, W)}, W),
    ("lightonocr", {"mm.2.weight": (O, W)}, W),
    ("dots_ocr", {"mm.2.weight": (O, W)}, W),
    ("dots3note_v", {"mm.2.weight": (O, W)}, W),
    ("muse-glimmer", {"mm.2.weight": (O, W)}, W),
    ("lfm2", {"mm.2.weight": (O, W)}, W),
    ("kimivl", {"mm.2.weight": (O, W)}, W),
    ("kimik25", {"mm.2.weight": (O, W)}, W),
    ("paddleocr", {"mm.2.weight": (O, W)}, W),
    ("yasa2", {"mm.2.weight": (O, W)}, W),
    ("deepseek4v", {"mm.2.weight": (O, W)}, W),
]


def write_projector(path, ptype, tensors, **keys) -> str:
    w = gguf.GGUFWriter(str(path), "clip")
    w.add_bool("clip.has_vision_encoder", True)
    w.add_string("clip.projector_type", ptype)
    w.add_uint32("clip.vision.projection_dim", CLIP_PROJECTION_DIM)  # never the answer below
    w.add_uint32("clip.vision.block_count", 2)
    for k, v in keys.items():
        if isinstance(v, list):
            w.add_array(k, v)
        else:
            w.add_uint32(k, v)
    for name, ne in tensors.items():
        w.add_tensor(name, ggml_zeros(*ne))
    finish(w)
    return str(path)


@pytest.mark.parametrize("ptype,tensors,width", PROJECTORS, ids=[f"{p[0]}-{i}" for i, p in enumerate(PROJECTORS)])
def test_width_of_every_projector_type(tmp_path, ptype, tensors, width):
    assert inspect_mmproj(write_projector(tmp_path / "p.gguf", ptype, tensors))["n_embd"] == width


def test_width_special_cases(tmp_path):
    # Yi-style llava: mm.3 present, the width is mm.3.bias's (whatever mm.2 holds)
    yi = {"mm.0.weight": (O, O), "mm.2.weight": (O, 99), "mm.3.weight": (O, O), "mm.3.bias": (W,)}
    assert inspect_mmproj(write_projector(tmp_path / "yi.gguf", "mlp", yi))["n_embd"] == W
    # granite4_vision: one projector block per feature layer, each projection_dim wide (llama.cpp
    # takes the key here); qwen3vl's deepstack layers count only below block_count
    granite = write_projector(tmp_path / "g.gguf", "granite4_vision", {}, **{"clip.vision.feature_layer": [3, 7, 11]})
    assert inspect_mmproj(granite)["n_embd"] == 3 * CLIP_PROJECTION_DIM
    deep = {"mm.2.bias": (W,), "v.deepstack.1.fc1.weight": (O, O), "v.deepstack.2.fc1.weight": (O, O)}
    assert inspect_mmproj(write_projector(tmp_path / "q3.gguf", "qwen3vl_merger", deep))["n_embd"] == 2 * W
    # the vision projector type of a file with audio and vision
    w = gguf.GGUFWriter(str(tmp_path / "omni.gguf"), "clip")
    w.add_bool("clip.has_vision_encoder", True)
    w.add_string("clip.vision.projector_type", "qwen2.5vl_merger")
    w.add_string("clip.audio.projector_type", "qwen2a")
    w.add_tensor("mm.2.bias", ggml_zeros(W))
    w.add_tensor("mm.a.fc.weight", ggml_zeros(O, 2 * W))
    finish(w)
    assert inspect_mmproj(str(tmp_path / "omni.gguf")) == {"projector_type": "qwen2.5vl_merger", "n_embd": W, "image_size": None}


@pytest.mark.parametrize(
    "ptype,tensors,match",
    [
        ("mlp", {"mm.0.weight": (O, O)}, "'mlp' projector needs the tensor 'mm.2.weight'"),
        ("gemma3", {"mm.input_projection": (W,)}, "needs the tensor 'mm.input_projection.weight'"),
        ("mlp", {"mm.2.weight": (W,)}, "too few dimensions"),
        ("ultravox", {"mm.a.mlp.2.weight": (O, W)}, "audio projector"),
        ("no-such-projector", {"mm.2.weight": (O, W)}, "projector type llama.cpp does not know"),
        (None, {"mm.2.weight": (O, W)}, "has no projector type"),
    ],
)
def test_projector_errors(tmp_path, ptype, tensors, match):
    w = gguf.GGUFWriter(str(tmp_path / "p.gguf"), "clip")
    w.add_bool("clip.has_vision_encoder", True)
    if ptype:
        w.add_string("clip.projector_type", ptype)
    for name, ne in tensors.items():
        w.add_tensor(name, ggml_zeros(*ne))
    finish(w)
    with pytest.raises(VisionModelError, match=match):
        inspect_mmproj(str(tmp_path / "p.gguf"))


# ---------------------------------------------------------------------------------------------
# the CLIP tower's keys against its tensors: each refused case stops llama.cpp's process with a
# GGML_ASSERT at the first image (it loads the file); the accepted ones run in llama.cpp too


@pytest.mark.parametrize(
    "keys,match",
    [
        ({"clip.vision.embedding_length": 64}, r"embedding_length is 64 but tensor 'v.patch_embd.weight' has 48"),
        ({"clip.vision.attention.head_count": 5}, "does not split into clip.vision.attention.head_count 5 heads"),
        ({"clip.vision.image_size": 448}, r"needs 1025 positions but 'v.position_embd.weight' has 577"),
        ({"clip.vision.patch_size": 12}, "do not fit the 14x14 patch convolution"),
        ({"clip.vision.attention.head_dim": 8}, r"head size is 32 but tensor 'v.blk.0.attn_q.weight' has 48"),
        ({"clip.vision.feature_layer": [1, 2]}, r"embedding_length x 2 feature layers is 96 but tensor 'mm.0.weight' has 48"),
    ],
)
def test_tower_keys_that_contradict_the_tensors(files, tmp_path, keys, match):
    path = rewrite_gguf(files["hf"], tmp_path / "bad.gguf", keys=keys)
    with pytest.raises(VisionModelError, match=match):
        cmx.Model(files["text"], mmproj=path, n_ctx=1024)


@pytest.mark.parametrize("keys", [{"clip.vision.patch_size": 16}, {"clip.vision.image_size": 224}])
def test_tower_keys_llama_cpp_runs(files, tmp_path, keys):
    """Odd but harmless to llama.cpp (fewer patches than the position table holds): accepted, and
    the image encodes as in llama-cpp-python."""
    path = rewrite_gguf(files["hf"], tmp_path / "odd.gguf", keys=keys)
    vlm = cmx.Model(files["text"], mmproj=path, n_ctx=1024, n_threads=2)
    ours = vlm.vision.encode_image(load_image(files["image"]))
    with lt.MtmdEncoder(path, files["text"]) as enc:
        theirs = enc.encode(lt.test_image())
    assert ours.shape == theirs.shape and ours.shape[0] < 576
    assert np.array_equal(ours, theirs)


# ---------------------------------------------------------------------------------------------
# the text model: block_count against the blocks stored


def test_block_count_against_the_stored_blocks(tmp_path):
    cfg = tiny_models.TinyConfig(n_layer=1)
    extra = {"blk.1.attn_norm.weight": np.ones(cfg.n_embd, np.float32)}  # a second block the header omits
    path = tiny_models.write_tiny_gguf(str(tmp_path / "extra-block.gguf"), cfg, "f32", overrides=extra)
    with pytest.raises(cmx.ModelLoadError, match=r"llama.block_count is 1 but the file has tensor 'blk.1.attn_norm.weight'"):
        cmx.Model(path)
    with pytest.raises(ValueError):  # llama.cpp refuses it too ("wrong number of tensors")
        llama_cpp.Llama(path, verbose=False)
    ok = tiny_models.write_tiny_gguf(str(tmp_path / "ok.gguf"), cfg, "f32")
    assert cmx.Model(ok).info["n_layer"] == 1

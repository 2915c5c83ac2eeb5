"""Tiny random VLM pairs of each family cmx runs, written with gguf-py as llama.cpp's converters
write them (no network, seconds on CPU), for the per-family tests (tests/test_families.py).

Families (``FAMILIES``):

* ``llava15``: LLaVA-1.5 (``llava_tiny``: CLIP ViT, 2-layer GELU projector, projector type
  ``mlp``), 576 image tokens in one chunk.
* ``smolvlm``: SmolVLM / Idefics3. ``convert_hf_to_gguf.py DIR --mmproj`` writes the mmproj
  (``conversion/smolvlm.py``: projector type ``idefics3``, ``clip.vision.projector.scale_factor``,
  ``clip.vision.preproc_image_size`` = the processor's ``size.longest_edge``, ``clip.use_gelu``;
  SigLIP tower ``v.*`` with ``v.post_ln``, projector ``mm.model.fc.weight``);
  ``convert_hf_to_gguf.py DIR`` the llama text model. mtmd splits an image larger than a tile into
  rows x cols tiles plus a global image, each tile its own image chunk, with text tokens around and
  between them (``<fake_token_around_image><row_1_col_1>`` ... ``\\n`` ... ``\\n\\n
  <fake_token_around_image><global-img>`` (global) ``<fake_token_around_image>``): the text model's
  vocabulary holds those special tokens, as SmolVLM's does.
* ``llava16``: LLaVA-1.6 (anyres). llama.cpp's ``convert_hf_to_gguf.py`` has no LLaVA-1.6 class; its
  documented path (docs/multimodal/llava.md) is ``llava_surgery_v2.py`` then
  ``convert_image_encoder_to_gguf.py -m vit --llava-projector vit/llava.projector
  --clip-model-is-vision`` with a ViT ``config.json`` carrying ``image_grid_pinpoints``,
  ``image_aspect_ratio`` "anyres", ``mm_patch_merge_type`` "spatial_unpad" and the crop/split
  resolutions: the same ``mlp`` projector as LLaVA-1.5 plus those keys and the
  ``model.image_newline`` tensor. mtmd (``mtmd_image_preprocessor_llava_uhd``) splits an image
  larger than the tower's input into the slices of the best pinpoint resolution plus an overview,
  each its own image chunk, slices first and the overview last, with no text between them; the
  pinned clip.cpp reads ``v.image_newline`` (not the file's ``model.image_newline``) and its llava
  graph does not use it, so no row-end embedding is added.
* ``gemma3``: Gemma 3. ``convert_hf_to_gguf.py DIR`` writes the ``gemma3`` text model (Gemma3Model:
  every RMS norm weight stored plus one, sliding window and local RoPE base, linear RoPE scaling
  of the global layers, tied output) and ``--mmproj`` the SigLIP tower with the ``gemma3``
  projector (Gemma3VisionModel: ``mm.input_projection.weight`` in f16, ``mm.soft_emb_norm``).
  mtmd resizes each image to the tower's input and pools it into one chunk between the text
  tokens ``<start_of_image>`` and ``<end_of_image>``, and llama.cpp decodes the chunk with
  non-causal attention (``mtmd_decode_use_non_causal``).

Each ``export_*_pair(out)`` returns ``(text path, mmproj path, [image paths])``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

import llava_tiny as lt

# ---------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------


def _f32(t) -> np.ndarray:
    import torch

    return t.detach().to(torch.float32).numpy()


def _siglip_tower_tensors(vm) -> list:
    """A SigLIP tower's (SmolVLM's, Gemma 3's) tensors under clip.cpp's names, in the checkpoint's
    (sorted) order of HF names: patch and position embeddings, every block, the post-layernorm."""
    emb = vm.embeddings
    tensors = [("v.patch_embd.bias", emb.patch_embedding.bias), ("v.patch_embd.weight", emb.patch_embedding.weight),
               ("v.position_embd.weight", emb.position_embedding.weight)]
    for il, layer in enumerate(vm.encoder.layers):  # the checkpoint's (sorted) order of HF names
        p, att = f"v.blk.{il}.", layer.self_attn
        tensors += [
            (p + "ln1.bias", layer.layer_norm1.bias), (p + "ln1.weight", layer.layer_norm1.weight),
            (p + "ln2.bias", layer.layer_norm2.bias), (p + "ln2.weight", layer.layer_norm2.weight),
            (p + "ffn_up.bias", layer.mlp.fc1.bias), (p + "ffn_up.weight", layer.mlp.fc1.weight),
            (p + "ffn_down.bias", layer.mlp.fc2.bias), (p + "ffn_down.weight", layer.mlp.fc2.weight),
            (p + "attn_k.bias", att.k_proj.bias), (p + "attn_k.weight", att.k_proj.weight),
            (p + "attn_out.bias", att.out_proj.bias), (p + "attn_out.weight", att.out_proj.weight),
            (p + "attn_q.bias", att.q_proj.bias), (p + "attn_q.weight", att.q_proj.weight),
            (p + "attn_v.bias", att.v_proj.bias), (p + "attn_v.weight", att.v_proj.weight),
        ]
    tensors += [("v.post_ln.bias", vm.post_layernorm.bias), ("v.post_ln.weight", vm.post_layernorm.weight)]
    return tensors


def test_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth random RGB image of any size (llava_tiny.test_image, cropped from a larger one)."""
    return lt.test_image(size=max(width, height), seed=seed)[:height, :width].copy()


def _save_images(out: Path, sizes: list[tuple[int, int]]) -> list[str]:
    from PIL import Image

    paths = []
    for seed, (w, h) in enumerate(sizes):
        paths.append(str(Path(out) / f"image{seed}.png"))
        Image.fromarray(test_image(w, h, seed)).save(paths[-1])
    return paths


def _text_config(vocab_size: int, hidden: int = 64) -> dict:
    return dict(model_type="llama", vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=False)


# ---------------------------------------------------------------------------------------------
# SmolVLM / Idefics3
# ---------------------------------------------------------------------------------------------

# SmolVLM-256M-Instruct's chat template and llava-hf/llava-v1.6-mistral-7b-hf's, as data
from test_chat_templates import LLAVA16_MISTRAL as LLAVA16_TEMPLATE, SMOLVLM as SMOLVLM_TEMPLATE  # noqa: E402

# the special tokens SmolVLM's tokenizer adds to SmolLM2's (mtmd looks up the first three by text)
SMOLVLM_SPECIAL = ["<fake_token_around_image>", "<global-img>", "<image>", "<end_of_utterance>"] + [
    f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]

# the tiny SmolVLM: 64 px tiles of 8 px patches (64 patches, 16 tokens after the 2x2 pixel shuffle),
# images resized to a longest edge of 128 px: up to 2 x 2 tiles and the global image (80 tokens)
SMOLVLM_TILE, SMOLVLM_PATCH, SMOLVLM_LONGEST_EDGE, SMOLVLM_SCALE = 64, 8, 128, 2


def smolvlm_tokenizer():
    tok = lt.load_smollm2_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": SMOLVLM_SPECIAL})
    tok.chat_template = SMOLVLM_TEMPLATE
    return tok


def build_tiny_idefics3(vocab_size: int, *, seed: int = 0, vision_hidden: int = 64, text_hidden: int = 64):
    """A random tiny ``Idefics3ForConditionalGeneration`` (SmolVLM's class) in float32, eval mode."""
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    cfg = Idefics3Config(
        vision_config=dict(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_hidden_layers=2,
                           num_attention_heads=4, image_size=SMOLVLM_TILE, patch_size=SMOLVLM_PATCH, layer_norm_eps=1e-6),
        text_config={**_text_config(vocab_size, text_hidden), "architectures": ["VLlama3ForCausalLM"]},
        scale_factor=SMOLVLM_SCALE,
    )
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(cfg).eval().to(torch.float32)
    lt.randomize(model, seed)
    return model


def export_idefics3_mmproj(model, path, *, longest_edge: int = SMOLVLM_LONGEST_EDGE, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                           name: str = "tiny-smolvlm") -> str:
    """The mmproj ``convert_hf_to_gguf.py DIR --mmproj --outtype f32`` writes for this model (its
    SmolVLMModel / MmprojModel classes, llama.cpp of llama-cpp-python 0.3.36): the same keys,
    value types and values in the same order (general.name aside), the same tensors, names, types
    and shapes in the same order (tests/data/families/idefics3_mmproj_converter.json holds what the
    converter wrote for this tiny model; test_families.py compares).

    ``longest_edge`` is the image processor's ``size.longest_edge`` (clip.vision.preproc_image_size);
    the tile size is the vision tower's ``image_size``."""
    import gguf

    inner = model.model
    v = model.config.vision_config
    text_hidden = model.config.text_config.hidden_size
    w = gguf.GGUFWriter(str(path), "clip")
    w.add_type("mmproj")
    w.add_name(name)
    w.add_file_type(0)
    w.add_bool("clip.has_vision_encoder", True)
    w.add_uint32("clip.vision.projection_dim", text_hidden)
    w.add_uint32("clip.vision.image_size", v.image_size)
    w.add_uint32("clip.vision.patch_size", v.patch_size)
    w.add_uint32("clip.vision.embedding_length", v.hidden_size)
    w.add_uint32("clip.vision.feed_forward_length", v.intermediate_size)
    w.add_uint32("clip.vision.block_count", v.num_hidden_layers)
    w.add_uint32("clip.vision.attention.head_count", v.num_attention_heads)
    w.add_array("clip.vision.image_mean", list(mean))
    w.add_array("clip.vision.image_std", list(std))
    w.add_string("clip.projector_type", "idefics3")
    w.add_float32("clip.vision.attention.layer_norm_epsilon", v.layer_norm_eps)
    w.add_uint32("clip.vision.projector.scale_factor", model.config.scale_factor)
    w.add_bool("clip.use_gelu", True)
    w.add_uint32("clip.vision.preproc_image_size", longest_edge)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    tensors = [("mm.model.fc.weight", inner.connector.modality_projection.proj.weight), *_siglip_tower_tensors(inner.vision_model)]
    return lt.write_gguf(w, path, [(tname, _f32(t)) for tname, t in tensors])


def export_text(model_text, lm_head, text_config: dict, tokenizer, path, outtype: str = "f32") -> str:
    from cmx.convert.llava import export_text_model

    state = {**model_text.state_dict(), "lm_head.weight": lm_head.weight}
    return str(export_text_model(text_config, state, tokenizer, path, outtype=outtype))


# image sizes (mtmd resizes each to a longest edge of 128 px): 2 x 2 tiles, 1 row x 2 columns, 2 rows x 1 column; each + global
SMOLVLM_IMAGES = [(160, 120), (128, 64), (40, 120)]


def export_smolvlm_pair(out, text_type: str = "f32"):
    tok = smolvlm_tokenizer()
    model = build_tiny_idefics3(len(tok))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = export_text(model.model.text_model, model.lm_head, model.config.text_config.to_dict(), tok,
                       out / "tiny-smolvlm.gguf", text_type)
    mmproj = export_idefics3_mmproj(model, out / "mmproj-tiny-smolvlm.gguf")
    return text, mmproj, _save_images(out, SMOLVLM_IMAGES)


# ---------------------------------------------------------------------------------------------
# LLaVA-1.6
# ---------------------------------------------------------------------------------------------

# the tiny LLaVA-1.6: a 112 px CLIP (8 x 8 patches of 14 px: 64 tokens per slice) and llava-v1.6's
# pinpoints scaled from 336 to 112 px; config_vit.json's other anyres settings as llava-v1.6 has them
LLAVA16_SIZE = 112
LLAVA16_PINPOINTS = [[112, 224], [224, 112], [224, 224], [336, 112], [112, 336]]
# 2 x 2 slices + overview; 1 x 2 slices + overview; no larger than the tower's input: overview only
LLAVA16_IMAGES = [(200, 180), (220, 100), (100, 90)]


def export_llava16_mmproj(model, path, *, pinpoints=LLAVA16_PINPOINTS, name: str = "tiny-llava-v1.6") -> str:
    """The mmproj ``convert_image_encoder_to_gguf.py -m vit --llava-projector vit/llava.projector
    --output-dir vit --clip-model-is-vision --use-f32`` writes for LLaVA-1.6 (docs/multimodal/llava.md):
    llava_tiny.export_legacy_mmproj's file (LLaVA-1.5's) plus, after clip.vision.block_count, the
    anyres keys of the ViT config (``image_grid_pinpoints`` flattened, ``image_crop_resolution``,
    ``image_aspect_ratio``, ``image_split_resolution``, ``mm_patch_merge_type``,
    ``mm_projector_type``), and the projector's ``model.image_newline`` (f32) after ``mm.2.*``
    (llava_surgery_v2.py saves it after the projector; the converter keeps its name).
    tests/data/families/llava16_mmproj_converter.json holds what the converter wrote."""
    import torch

    extra_keys = [
        ("image_grid_pinpoints", [p for pair in pinpoints for p in pair]),
        ("image_crop_resolution", 224), ("image_aspect_ratio", "anyres"), ("image_split_resolution", 224),
        ("mm_patch_merge_type", "spatial_unpad"), ("mm_projector_type", "mlp2x_gelu"),
    ]
    g = torch.Generator().manual_seed(7)
    newline = (0.5 * torch.randn(model.config.text_config.hidden_size, generator=g)).numpy().astype(np.float32)
    return lt.export_legacy_mmproj(model, path, use_f32=True, name=name, extra_keys=extra_keys,
                                   extra_tensors=[("model.image_newline", newline)])


def export_llava16_pair(out, text_type: str = "f32"):
    tok = lt.load_smollm2_tokenizer()
    tok.chat_template = LLAVA16_TEMPLATE
    model = lt.build_tiny_llava(vocab_size=len(tok), image_size=LLAVA16_SIZE)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    inner = getattr(model, "model", model)
    text = export_text(inner.language_model, model.lm_head, model.config.text_config.to_dict(), tok,
                       out / "tiny-llava16.gguf", text_type)
    mmproj = export_llava16_mmproj(model, out / "mmproj-tiny-llava16.gguf")
    return text, mmproj, _save_images(out, LLAVA16_IMAGES)


# ---------------------------------------------------------------------------------------------
# Qwen2.5-VL
# ---------------------------------------------------------------------------------------------

from test_chat_templates import QWEN2_VL as QWEN2_VL_TEMPLATE  # noqa: E402

# the special tokens Qwen2-VL's tokenizer has besides ChatML's (mtmd writes the first two around an image)
QWEN_VL_SPECIAL = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# the tiny Qwen2.5-VL: 14 px patches merged 2 x 2 (a token per 28 x 28 px); 4 vision blocks, window
# attention in blocks 0 and 2 (full attention in 1 and 3: n_wa_pattern 2) over 112 px windows; M-RoPE
# sections [2, 3, 3] of the 8 rotary pairs of a 16-wide head
QWEN_VL_PATCH, QWEN_VL_MERGE, QWEN_VL_SECTIONS = 14, 2, [2, 3, 3]
# images (mtmd resizes each to multiples of 28 px): 8 x 6, 5 x 7 and 4 x 4 token grids
QWEN_VL_IMAGES = [(224, 168), (140, 196), (112, 112)]
QWEN_VL_MEAN, QWEN_VL_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def qwen_vl_tokenizer():
    tok = lt.load_smollm2_tokenizer()  # a byte-level BPE with ChatML's <|im_start|> / <|im_end|>
    tok.add_special_tokens({"additional_special_tokens": QWEN_VL_SPECIAL})
    tok.chat_template = QWEN2_VL_TEMPLATE
    return tok


def build_tiny_qwen25vl(tok, *, seed: int = 0, text_hidden: int = 64):
    """A random tiny ``Qwen2_5_VLForConditionalGeneration`` in float32, eval mode."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_VL_SPECIAL}
    cfg = Qwen2_5_VLConfig(
        vision_config=dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=QWEN_VL_PATCH,
                           temporal_patch_size=2, spatial_merge_size=QWEN_VL_MERGE, out_hidden_size=text_hidden,
                           window_size=112, fullatt_block_indexes=[1, 3], in_channels=3),
        text_config=dict(vocab_size=len(tok), hidden_size=text_hidden, intermediate_size=2 * text_hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": QWEN_VL_SECTIONS}),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval().to(torch.float32)
    lt.randomize(model, seed)
    return model


def export_qwen2vl_text(model, tok, path, *, name: str = "tiny-qwen2.5-vl") -> str:
    """The text model ``convert_hf_to_gguf.py DIR --outtype f32`` writes for a Qwen2-VL / Qwen2.5-VL
    checkpoint (its Qwen2VLModel class, llama.cpp of llama-cpp-python 0.3.36): architecture
    ``qwen2vl``, the keys in the converter's order (``qwen2vl.rope.dimension_sections``: the
    config's ``mrope_section`` padded with zeros to 4; no ``rope.dimension_count`` or
    ``attention.key_length``), the tokenizer as its gpt2 vocabulary path writes it, and the
    tensors in the checkpoint's order (q/k/v with biases). tests/data/families/qwen2vl_text_converter.json
    holds what the converter wrote for this tiny model."""
    import gguf

    from cmx.convert.llava import _tokenizer_json

    c = model.config.text_config
    rope = c.rope_parameters
    w = gguf.GGUFWriter(str(path), "qwen2vl")
    w.add_type("model")
    w.add_name(name)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_sections((list(rope["mrope_section"]) + [0, 0, 0, 0])[:4])
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_file_type(0)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    # the vocabulary as the converter's _set_vocab_gpt2 writes it
    vocab, added = tok.get_vocab(), {a["id"]: a for a in _tokenizer_json(tok).get("added_tokens", [])}
    tokens = [f"[PAD{i}]" for i in range(c.vocab_size)]
    types = [gguf.TokenType.UNUSED] * c.vocab_size
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = (gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED) if i in added else gguf.TokenType.NORMAL
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([int(t) for t in types])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in _tokenizer_json(tok)["model"]["merges"]])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_unk_token_id(tok.unk_token_id)
    w.add_pad_token_id(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    w.add_chat_template(tok.chat_template)
    lm = model.model.language_model
    tensors = [("output.weight", model.lm_head.weight), ("token_embd.weight", lm.embed_tokens.weight)]
    for il, layer in enumerate(lm.layers):  # the checkpoint's (sorted) order of HF names
        p, att, mlp = f"blk.{il}.", layer.self_attn, layer.mlp
        tensors += [
            (p + "attn_norm.weight", layer.input_layernorm.weight), (p + "ffn_down.weight", mlp.down_proj.weight),
            (p + "ffn_gate.weight", mlp.gate_proj.weight), (p + "ffn_up.weight", mlp.up_proj.weight),
            (p + "ffn_norm.weight", layer.post_attention_layernorm.weight),
            (p + "attn_k.bias", att.k_proj.bias), (p + "attn_k.weight", att.k_proj.weight),
            (p + "attn_output.weight", att.o_proj.weight), (p + "attn_q.bias", att.q_proj.bias),
            (p + "attn_q.weight", att.q_proj.weight), (p + "attn_v.bias", att.v_proj.bias), (p + "attn_v.weight", att.v_proj.weight),
        ]
    tensors.append(("output_norm.weight", lm.norm.weight))
    return lt.write_gguf(w, path, [(tname, _f32(t)) for tname, t in tensors])


def export_qwen25vl_mmproj(model, path, *, name: str = "tiny-qwen2.5-vl") -> str:
    """The mmproj ``convert_hf_to_gguf.py DIR --mmproj --outtype f32`` writes for Qwen2.5-VL (its
    Qwen2VLVisionModel class): projector type ``qwen2.5vl_merger``, ``clip.use_silu``,
    ``clip.vision.n_wa_pattern`` (fullatt_block_indexes[0] + 1), ``clip.vision.image_size`` 560 (the
    converter's default: the config has none), the processor's mean/std; the fused qkv split into
    attn_q/k/v, the Conv3D patch embedding split into its two time slices (``v.patch_embd.weight``
    and ``.weight.1``), the merger as ``v.post_ln`` (RMS norm) and ``mm.0`` / ``mm.2``.
    tests/data/families/qwen25vl_mmproj_converter.json holds what the converter wrote."""
    import gguf

    v = model.config.vision_config
    vis = model.model.visual
    w = gguf.GGUFWriter(str(path), "clip")
    w.add_type("mmproj")
    w.add_name(name)
    w.add_file_type(0)
    w.add_bool("clip.has_vision_encoder", True)
    w.add_uint32("clip.vision.projection_dim", model.config.text_config.hidden_size)
    w.add_uint32("clip.vision.image_size", 560)
    w.add_uint32("clip.vision.patch_size", v.patch_size)
    w.add_uint32("clip.vision.embedding_length", v.hidden_size)
    w.add_uint32("clip.vision.feed_forward_length", v.intermediate_size)
    w.add_uint32("clip.vision.block_count", v.depth)
    w.add_uint32("clip.vision.attention.head_count", v.num_heads)
    w.add_array("clip.vision.image_mean", list(QWEN_VL_MEAN))
    w.add_array("clip.vision.image_std", list(QWEN_VL_STD))
    w.add_string("clip.projector_type", "qwen2.5vl_merger")
    w.add_bool("clip.use_silu", True)
    w.add_uint32("clip.vision.n_wa_pattern", v.fullatt_block_indexes[0] + 1)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)  # the converter's default: the config has no rms_norm_eps
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    tensors = []
    for il, blk in enumerate(vis.blocks):  # the checkpoint's (sorted) order, qkv split in place
        p, att, mlp = f"v.blk.{il}.", blk.attn, blk.mlp
        qkv_w, qkv_b = att.qkv.weight.chunk(3), att.qkv.bias.chunk(3)
        tensors += [(p + "attn_out.bias", att.proj.bias), (p + "attn_out.weight", att.proj.weight),
                    (p + "attn_q.bias", qkv_b[0]), (p + "attn_k.bias", qkv_b[1]), (p + "attn_v.bias", qkv_b[2]),
                    (p + "attn_q.weight", qkv_w[0]), (p + "attn_k.weight", qkv_w[1]), (p + "attn_v.weight", qkv_w[2]),
                    (p + "ffn_down.bias", mlp.down_proj.bias), (p + "ffn_down.weight", mlp.down_proj.weight),
                    (p + "ffn_gate.bias", mlp.gate_proj.bias), (p + "ffn_gate.weight", mlp.gate_proj.weight),
                    (p + "ffn_up.bias", mlp.up_proj.bias), (p + "ffn_up.weight", mlp.up_proj.weight),
                    (p + "ln1.weight", blk.norm1.weight), (p + "ln2.weight", blk.norm2.weight)]
    merger = vis.merger
    tensors += [("v.post_ln.weight", merger.ln_q.weight), ("mm.0.bias", merger.mlp[0].bias), ("mm.0.weight", merger.mlp[0].weight),
                ("mm.2.bias", merger.mlp[2].bias), ("mm.2.weight", merger.mlp[2].weight)]
    patch = vis.patch_embed.proj.weight  # [out, in, time 2, h, w]
    tensors += [("v.patch_embd.weight", patch[:, :, 0]), ("v.patch_embd.weight.1", patch[:, :, 1])]
    return lt.write_gguf(w, path, [(tname, _f32(t)) for tname, t in tensors])


def build_tiny_qwen2vl(tok, *, seed: int = 0, text_hidden: int = 64):
    """A random tiny ``Qwen2VLForConditionalGeneration`` (Qwen2-VL: LayerNorm and quick-GELU vision
    blocks, no window attention; 3 blocks, the fewest the converter maps) in float32, eval mode."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_VL_SPECIAL}
    cfg = Qwen2VLConfig(
        vision_config=dict(depth=3, embed_dim=32, hidden_size=text_hidden, mlp_ratio=2, num_heads=2, patch_size=QWEN_VL_PATCH,
                           temporal_patch_size=2, spatial_merge_size=QWEN_VL_MERGE, in_channels=3),
        text_config=dict(vocab_size=len(tok), hidden_size=text_hidden, intermediate_size=2 * text_hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": QWEN_VL_SECTIONS}),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(cfg).eval().to(torch.float32)
    lt.randomize(model, seed)
    return model


def export_qwen2vl_mmproj(model, path, *, name: str = "tiny-qwen2-vl") -> str:
    """The mmproj ``convert_hf_to_gguf.py DIR --mmproj --outtype f32`` writes for Qwen2-VL (its
    Qwen2VLVisionModel class): projector type ``qwen2vl_merger``, no ``clip.use_silu`` or
    ``n_wa_pattern``; ``clip.vision.embedding_length`` is the config's ``embed_dim`` and
    ``feed_forward_length`` its ``hidden_size`` (the converter's renaming), the blocks' LayerNorms
    with biases, ``mlp.fc1`` / ``fc2`` as ``ffn_up`` / ``ffn_down``, the merger's LayerNorm as
    ``v.post_ln``. tests/data/families/qwen2vl_mmproj_converter.json holds what the converter wrote."""
    import gguf

    v = model.config.vision_config
    vis = model.model.visual
    w = gguf.GGUFWriter(str(path), "clip")
    w.add_type("mmproj")
    w.add_name(name)
    w.add_file_type(0)
    w.add_bool("clip.has_vision_encoder", True)
    w.add_uint32("clip.vision.projection_dim", model.config.text_config.hidden_size)
    w.add_uint32("clip.vision.image_size", 560)
    w.add_uint32("clip.vision.patch_size", v.patch_size)
    w.add_uint32("clip.vision.embedding_length", v.embed_dim)
    w.add_uint32("clip.vision.feed_forward_length", v.hidden_size)
    w.add_uint32("clip.vision.block_count", v.depth)
    w.add_uint32("clip.vision.attention.head_count", v.num_heads)
    w.add_array("clip.vision.image_mean", list(QWEN_VL_MEAN))
    w.add_array("clip.vision.image_std", list(QWEN_VL_STD))
    w.add_string("clip.projector_type", "qwen2vl_merger")
    w.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    tensors = []
    for il, blk in enumerate(vis.blocks):
        p, att, mlp = f"v.blk.{il}.", blk.attn, blk.mlp
        qkv_w, qkv_b = att.qkv.weight.chunk(3), att.qkv.bias.chunk(3)
        tensors += [(p + "attn_out.bias", att.proj.bias), (p + "attn_out.weight", att.proj.weight),
                    (p + "attn_q.bias", qkv_b[0]), (p + "attn_k.bias", qkv_b[1]), (p + "attn_v.bias", qkv_b[2]),
                    (p + "attn_q.weight", qkv_w[0]), (p + "attn_k.weight", qkv_w[1]), (p + "attn_v.weight", qkv_w[2]),
                    (p + "ffn_up.bias", mlp.fc1.bias), (p + "ffn_up.weight", mlp.fc1.weight),
                    (p + "ffn_down.bias", mlp.fc2.bias), (p + "ffn_down.weight", mlp.fc2.weight),
                    (p + "ln1.bias", blk.norm1.bias), (p + "ln1.weight", blk.norm1.weight),
                    (p + "ln2.bias", blk.norm2.bias), (p + "ln2.weight", blk.norm2.weight)]
    merger = vis.merger
    tensors += [("v.post_ln.bias", merger.ln_q.bias), ("v.post_ln.weight", merger.ln_q.weight),
                ("mm.0.bias", merger.mlp[0].bias), ("mm.0.weight", merger.mlp[0].weight),
                ("mm.2.bias", merger.mlp[2].bias), ("mm.2.weight", merger.mlp[2].weight)]
    patch = vis.patch_embed.proj.weight  # [out, in, time 2, h, w]
    tensors += [("v.patch_embd.weight", patch[:, :, 0]), ("v.patch_embd.weight.1", patch[:, :, 1])]
    return lt.write_gguf(w, path, [(tname, _f32(t)) for tname, t in tensors])


def export_qwen2vl_pair(out, text_type: str = "f32"):
    tok = qwen_vl_tokenizer()
    model = build_tiny_qwen2vl(tok)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = export_qwen2vl_text(model, tok, out / "tiny-qwen2vl.gguf", name="tiny-qwen2-vl")
    mmproj = export_qwen2vl_mmproj(model, out / "mmproj-tiny-qwen2vl.gguf")
    return text, mmproj, _save_images(out, QWEN_VL_IMAGES)


def export_qwen25vl_pair(out, text_type: str = "f32"):
    tok = qwen_vl_tokenizer()
    model = build_tiny_qwen25vl(tok)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = export_qwen2vl_text(model, tok, out / "tiny-qwen25vl.gguf")
    mmproj = export_qwen25vl_mmproj(model, out / "mmproj-tiny-qwen25vl.gguf")
    return text, mmproj, _save_images(out, QWEN_VL_IMAGES)


# ---------------------------------------------------------------------------------------------
# Gemma 3
# ---------------------------------------------------------------------------------------------

from test_chat_templates import GEMMA3 as GEMMA3_TEMPLATE  # noqa: E402  (gemma-3-4b-it's template)

# Gemma 3's special tokens (its tokenizer's spelling), added to SmolLM2's: mtmd wraps each image in
# <start_of_image> ... <end_of_image>; the template writes the turns
GEMMA3_SPECIAL = ["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
# the tiny Gemma 3: 128 px images of 8 px patches (16 x 16), average-pooled 2 x 2 into 64 tokens
# (mtmd resizes every image to 128 x 128: one chunk of 64 tokens); 7 layers, so that layer 5 is
# the global one of the pattern (every 6th) and layer 6 slides again; a 32-token window, shorter
# than an image, so that the test prompts cross it
GEMMA3_IMAGE, GEMMA3_PATCH, GEMMA3_TOKENS, GEMMA3_WINDOW = 128, 8, 64, 32
GEMMA3_IMAGES = [(160, 120), (100, 140), (90, 90)]


@functools.lru_cache(maxsize=1)
def gemma3_tokenizer():
    """SmolLM2's tokenizer with Gemma 3's special tokens and chat template (built once: it is
    only read)."""
    tok = lt.load_smollm2_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": GEMMA3_SPECIAL})
    tok.chat_template = GEMMA3_TEMPLATE
    return tok


def build_tiny_gemma3(tok, *, seed: int = 0, text_hidden: int = 64, vision_hidden: int = 48, n_layer: int = 7,
                      window: int = GEMMA3_WINDOW, head_dim: int = 16, intermediate: int | None = None):
    """A random tiny ``Gemma3ForConditionalGeneration`` in float32, eval mode: GQA (4 heads, 2 KV),
    linear RoPE scaling (factor 8) on the global layers with their own base, as gemma-3-4b has."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    ids = {s: tok.convert_tokens_to_ids(s) for s in GEMMA3_SPECIAL}
    cfg = Gemma3Config(
        text_config=dict(vocab_size=len(tok), hidden_size=text_hidden, intermediate_size=intermediate or 2 * text_hidden,
                         num_hidden_layers=n_layer, num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
                         query_pre_attn_scalar=head_dim, sliding_window=window, max_position_embeddings=4096, rms_norm_eps=1e-6,
                         rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                                          "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
        vision_config=dict(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_hidden_layers=2, num_attention_heads=4,
                           image_size=GEMMA3_IMAGE, patch_size=GEMMA3_PATCH, layer_norm_eps=1e-6, vision_use_head=False),
        mm_tokens_per_image=GEMMA3_TOKENS, image_token_index=ids["<image_soft_token>"], boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"])
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(cfg).eval().to(torch.float32)
    lt.randomize(model, seed)
    with torch.no_grad():  # entries ~ 1/sqrt(n_embd) as Gemma's own: rows of unit variance once scaled by sqrt(n_embd), so
        model.model.language_model.embed_tokens.weight.mul_(text_hidden ** -0.5)  # the tied output does not just echo the input
    return model


def _gemma3_vocab(w, tok) -> None:
    """The tokenizer keys ``convert_hf_to_gguf.py`` writes for a tokenizer.json (BPE) Gemma 3: its
    get_vocab_base (added tokens CONTROL when special, else USER_DEFINED) and SpecialVocab."""
    import json

    import gguf

    tj = json.loads(tok.backend_tokenizer.to_str())
    reverse = {i: t for t, i in tok.get_vocab().items()}
    added, decoder = tok.get_added_vocab(), tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(len(tok)):
        t = reverse.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif t in added:
            tokens.append(t)
            types.append(gguf.TokenType.CONTROL if decoder[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(t)
            types.append(gguf.TokenType.NORMAL)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "smollm")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.token_type", [int(t) for t in types])
    w.add_array("tokenizer.ggml.merges", [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]])
    for key, value in (("bos", tok.bos_token_id), ("eos", tok.eos_token_id), ("unknown", tok.unk_token_id), ("padding", tok.pad_token_id)):
        if value is not None:
            w.add_uint32(f"tokenizer.ggml.{key}_token_id", value)
    w.add_string("tokenizer.chat_template", tok.chat_template)


def _gemma3_writer(path, name, tok, *, n_layer, n_ctx, n_embd, n_ff, n_head, n_head_kv, head_dim, rope_factor, rope_base,
                   rope_base_swa, eps, window, file_type: int = 0):
    """A GGUFWriter holding the keys of a gemma3 text GGUF, in the converter's order."""
    import gguf

    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_type("model")
    w.add_name(name)
    w.add_uint32("gemma3.block_count", n_layer)
    w.add_uint32("gemma3.context_length", n_ctx)
    w.add_uint32("gemma3.embedding_length", n_embd)
    w.add_uint32("gemma3.feed_forward_length", n_ff)
    w.add_uint32("gemma3.attention.head_count", n_head)
    w.add_uint32("gemma3.attention.head_count_kv", n_head_kv)
    w.add_string("gemma3.rope.scaling.type", "linear")
    w.add_float32("gemma3.rope.scaling.factor", rope_factor)
    w.add_float32("gemma3.rope.freq_base", rope_base)
    w.add_float32("gemma3.rope.freq_base_swa", rope_base_swa)
    w.add_float32("gemma3.attention.layer_norm_rms_epsilon", eps)
    w.add_uint32("gemma3.attention.key_length", head_dim)
    w.add_uint32("gemma3.attention.value_length", head_dim)
    w.add_file_type(file_type)
    w.add_uint32("gemma3.attention.sliding_window", window)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _gemma3_vocab(w, tok)
    return w


def write_random_gemma3_text(path, *, n_embd: int, n_ff: int, n_layer: int, n_head: int, n_head_kv: int, head_dim: int,
                             window: int = 512, seed: int = 0, name: str = "random-gemma3", extra_keys=(),
                             skip=()) -> str:
    """A random gemma3 text GGUF in f16 of any size (benchmarks: tools/bench_engine.py), with
    the tiny model's tokenizer and keys; weights drawn one tensor at a time (rows of unit-variance
    outputs, norms around 1, embeddings at Gemma's scale). extra_keys: (name, value) pairs added
    (uint32, float32, or lists of bools); skip: tensor names left out (bad files for the loader's tests)."""
    tok = gemma3_tokenizer()
    w = _gemma3_writer(path, name, tok, n_layer=n_layer, n_ctx=8192, n_embd=n_embd, n_ff=n_ff, n_head=n_head, n_head_kv=n_head_kv,
                       head_dim=head_dim, rope_factor=8.0, rope_base=1000000.0, rope_base_swa=10000.0, eps=1e-6, window=window,
                       file_type=1)
    for key, value in extra_keys:
        if isinstance(value, list):
            w.add_array(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, value)
    rng = np.random.default_rng(seed)

    def matrix(n_out, n_in):
        return (rng.standard_normal((n_out, n_in), dtype=np.float32) / np.sqrt(n_in)).astype(np.float16)

    def norm(n):
        return (1.0 + 0.2 * rng.standard_normal(n, dtype=np.float32)).astype(np.float32)

    q, kv = n_head * head_dim, n_head_kv * head_dim
    w.add_tensor("token_embd.weight", (rng.standard_normal((len(tok), n_embd), dtype=np.float32) / np.sqrt(n_embd)).astype(np.float16))
    for il in range(n_layer):
        p = f"blk.{il}."
        for tname, t in ((p + "attn_norm.weight", norm(n_embd)), (p + "ffn_down.weight", matrix(n_embd, n_ff)),
                         (p + "ffn_gate.weight", matrix(n_ff, n_embd)), (p + "ffn_up.weight", matrix(n_ff, n_embd)),
                         (p + "post_attention_norm.weight", norm(n_embd)), (p + "post_ffw_norm.weight", norm(n_embd)),
                         (p + "ffn_norm.weight", norm(n_embd)), (p + "attn_k_norm.weight", norm(head_dim)),
                         (p + "attn_k.weight", matrix(kv, n_embd)), (p + "attn_output.weight", matrix(n_embd, q)),
                         (p + "attn_q_norm.weight", norm(head_dim)), (p + "attn_q.weight", matrix(q, n_embd)),
                         (p + "attn_v.weight", matrix(kv, n_embd))):
            if tname not in skip:
                w.add_tensor(tname, t)
    return lt.write_gguf(w, path, [("output_norm.weight", norm(n_embd))])


def export_gemma3_text(model, tok, path, name: str = "tiny-gemma3") -> str:
    """The text GGUF ``convert_hf_to_gguf.py DIR --outtype f32`` writes for this model (its
    Gemma3Model class, llama-cpp-python 0.3.36's llama.cpp): the same keys, value types and
    values in the same order (its duplicate keys keep their first place), the same tensors in the
    checkpoint's order. Every RMS norm weight is stored plus one (Gemma3RMSNorm multiplies by
    1 + w); the output is tied (no output.weight). tests/data/families/gemma3.json holds what
    the converter wrote."""
    tc = model.config.text_config
    rope = tc.rope_parameters
    w = _gemma3_writer(path, name, tok, n_layer=tc.num_hidden_layers, n_ctx=tc.max_position_embeddings, n_embd=tc.hidden_size,
                       n_ff=tc.intermediate_size, n_head=tc.num_attention_heads, n_head_kv=tc.num_key_value_heads,
                       head_dim=tc.head_dim, rope_factor=rope["full_attention"]["factor"], rope_base=rope["full_attention"]["rope_theta"],
                       rope_base_swa=rope["sliding_attention"]["rope_theta"], eps=tc.rms_norm_eps, window=tc.sliding_window)

    lm = model.model.language_model
    tensors = [("token_embd.weight", lm.embed_tokens.weight, 0.0)]
    for il, layer in enumerate(lm.layers):  # the checkpoint's (sorted) order of HF names
        p, att = f"blk.{il}.", layer.self_attn
        tensors += [
            (p + "attn_norm.weight", layer.input_layernorm.weight, 1.0), (p + "ffn_down.weight", layer.mlp.down_proj.weight, 0.0),
            (p + "ffn_gate.weight", layer.mlp.gate_proj.weight, 0.0), (p + "ffn_up.weight", layer.mlp.up_proj.weight, 0.0),
            (p + "post_attention_norm.weight", layer.post_attention_layernorm.weight, 1.0),
            (p + "post_ffw_norm.weight", layer.post_feedforward_layernorm.weight, 1.0),
            (p + "ffn_norm.weight", layer.pre_feedforward_layernorm.weight, 1.0),
            (p + "attn_k_norm.weight", att.k_norm.weight, 1.0), (p + "attn_k.weight", att.k_proj.weight, 0.0),
            (p + "attn_output.weight", att.o_proj.weight, 0.0), (p + "attn_q_norm.weight", att.q_norm.weight, 1.0),
            (p + "attn_q.weight", att.q_proj.weight, 0.0), (p + "attn_v.weight", att.v_proj.weight, 0.0),
        ]
    tensors.append(("output_norm.weight", lm.norm.weight, 1.0))
    return lt.write_gguf(w, path, [(tname, _f32(t) + np.float32(shift)) for tname, t, shift in tensors])


def export_gemma3_mmproj(model, path, *, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), name: str = "tiny-gemma3") -> str:
    """The mmproj ``convert_hf_to_gguf.py DIR --mmproj --outtype f32`` writes for this model (its
    Gemma3VisionModel class): SigLIP tower ``v.*``, projector ``mm.input_projection.weight`` (f16
    whatever the outtype, as the converter forces it) and ``mm.soft_emb_norm.weight`` (plus one),
    ``clip.vision.projector.scale_factor`` written because the pooling is not Gemma 3's 4."""
    import gguf

    v = model.config.vision_config
    w = gguf.GGUFWriter(str(path), "clip")
    w.add_type("mmproj")
    w.add_name(name)
    w.add_file_type(0)
    w.add_bool("clip.has_vision_encoder", True)
    w.add_uint32("clip.vision.projection_dim", model.config.text_config.hidden_size)
    w.add_uint32("clip.vision.image_size", v.image_size)
    w.add_uint32("clip.vision.patch_size", v.patch_size)
    w.add_uint32("clip.vision.embedding_length", v.hidden_size)
    w.add_uint32("clip.vision.feed_forward_length", v.intermediate_size)
    w.add_uint32("clip.vision.block_count", v.num_hidden_layers)
    w.add_uint32("clip.vision.attention.head_count", v.num_attention_heads)
    w.add_array("clip.vision.image_mean", list(mean))
    w.add_array("clip.vision.image_std", list(std))
    w.add_string("clip.projector_type", "gemma3")
    w.add_float32("clip.vision.attention.layer_norm_epsilon", v.layer_norm_eps)
    w.add_bool("clip.use_gelu", True)
    n_per_side = int(model.config.mm_tokens_per_image ** 0.5)
    scale = (v.image_size // v.patch_size) // n_per_side
    if scale > 0 and scale != 4:
        w.add_uint32("clip.vision.projector.scale_factor", scale)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    proj, vm = model.model.multi_modal_projector, model.model.vision_tower
    vm = getattr(vm, "vision_model", vm)  # transformers 4 has the extra level
    w.add_tensor("mm.input_projection.weight", _f32(proj.mm_input_projection_weight).astype(np.float16))
    w.add_tensor("mm.soft_emb_norm.weight", _f32(proj.mm_soft_emb_norm.weight) + np.float32(1.0))
    return lt.write_gguf(w, path, [(tname, _f32(t)) for tname, t in _siglip_tower_tensors(vm)])


def export_gemma3_pair(out, text_type: str = "f32"):
    if text_type != "f32":
        raise ValueError("the tiny Gemma 3 is written in f32 (the converter's --outtype f32)")
    tok = gemma3_tokenizer()
    model = build_tiny_gemma3(tok)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = export_gemma3_text(model, tok, out / "tiny-gemma3.gguf")
    mmproj = export_gemma3_mmproj(model, out / "mmproj-tiny-gemma3.gguf")
    return text, mmproj, _save_images(out, GEMMA3_IMAGES)


def export_llava15_pair(out, text_type: str = "f32"):
    return lt.export_tiny_pair(Path(out), text_type=text_type, mmproj_type="f32", n_images=3)


FAMILIES = {"llava15": export_llava15_pair, "smolvlm": export_smolvlm_pair, "llava16": export_llava16_pair,
            "qwen25vl": export_qwen25vl_pair, "qwen2vl": export_qwen2vl_pair, "gemma3": export_gemma3_pair}


def gguf_layout(path, summarize_over: int | None = None) -> dict:
    """What tests/data/families/*_converter.json hold of a GGUF: every key but general.name and
    general.size_label (name, value types, value; floats to 6 significant places) and every tensor
    (name, type, shape), in file order. summarize_over: an array longer than that (a vocabulary)
    is recorded as its length and the sha256 of its JSON."""
    import hashlib
    import json

    import gguf

    r = gguf.GGUFReader(str(path))

    def rounded(v):
        if isinstance(v, list) and summarize_over is not None and len(v) > summarize_over:
            return [len(v), hashlib.sha256(json.dumps(v).encode()).hexdigest()]
        return [rounded(x) for x in v] if isinstance(v, list) else (float(f"{v:.6g}") if isinstance(v, float) else v)

    keys = [[k, [t.name for t in f.types], rounded(f.contents())] for k, f in r.fields.items()
            if not k.startswith("GGUF.") and k not in ("general.name", "general.size_label")]
    return {"keys": keys, "tensors": [[t.name, t.tensor_type.name, [int(s) for s in t.shape]] for t in r.tensors]}


def text_layout(path) -> dict:
    """gguf_layout of a text model, its arrays of more than 64 entries (the tokenizer's tokens,
    types and merges) as ["sha256", length, digest of their JSON]."""
    import hashlib
    import json

    layout = gguf_layout(path)
    for k in layout["keys"]:
        if isinstance(k[2], list) and len(k[2]) > 64:
            k[2] = ["sha256", len(k[2]), hashlib.sha256(json.dumps(k[2]).encode()).hexdigest()]
    return layout


def llama_cpp_reference(text_path, mmproj_path, prompt_text, image_paths, n_gen, n_ctx=4096, with_text=False,
                        with_steps=False):
    """llama-cpp-python evaluating mtmd's chunks the way its MTMD chat handler does (image files
    decoded by mtmd's helper, each chunk at the positions mtmd assigns); returns the logits of
    every row (None for image rows) and its greedy continuation (token ids, stopping at end of
    generation), with `with_text` also the continuation's bytes, and with `with_steps` last the
    (logits, token) of each greedy step, the end-of-generation token included when it is chosen
    (tests/devices.py's assert_greedy_within)."""
    import ctypes

    import llama_cpp
    from llama_cpp import mtmd_cpp as M

    from devices import GPU, N_GPU_LAYERS  # cmx's device, the encoder's too (tests/devices.py)

    ref = llama_cpp.Llama(str(text_path), n_ctx=n_ctx, n_batch=512, logits_all=True, verbose=False, n_threads=2,
                          n_threads_batch=2, n_gpu_layers=N_GPU_LAYERS)
    params = M.mtmd_context_params_default()
    params.use_gpu, params.print_timings, params.warmup, params.n_threads = GPU, False, False, 2
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED  # as the MTMD handler (Llama's default)
    ctx = M.mtmd_init_from_file(str(mmproj_path).encode(), ref.model, params)
    assert ctx
    bitmaps = []
    for path in image_paths:
        data = open(path, "rb").read()
        bitmaps.append(M.mtmd_helper_bitmap_init_from_buf(ctx, (ctypes.c_uint8 * len(data)).from_buffer_copy(data), len(data), False))
    chunks = M.mtmd_input_chunks_init()
    raw = prompt_text.encode()
    inp = M.mtmd_input_text(text=raw, text_len=len(raw), add_special=True, parse_special=True)
    assert M.mtmd_tokenize(ctx, chunks, ctypes.byref(inp), (M.mtmd_bitmap_p_ctypes * len(bitmaps))(*bitmaps), len(bitmaps)) == 0
    logits = []
    for i in range(M.mtmd_input_chunks_size(chunks)):
        chunk = M.mtmd_input_chunks_get(chunks, i)
        if M.mtmd_input_chunk_get_type(chunk) == M.MTMD_INPUT_CHUNK_TYPE_TEXT:
            n = ctypes.c_size_t()
            ptr = M.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
            toks = [ptr[j] for j in range(n.value)]
            start = ref.n_tokens
            ref.eval(toks)
            logits.extend(np.array(ref.scores[start : start + len(toks)]))
        else:
            new_n_past = llama_cpp.llama_pos(0)
            assert M.mtmd_helper_eval_chunk_single(ctx, ref._ctx.ctx, chunk, ref.n_tokens, 0, 512, False,
                                                   ctypes.byref(new_n_past)) == 0
            logits.extend([None] * M.mtmd_input_chunk_get_n_tokens(chunk))
            ref.n_tokens = new_n_past.value  # the next text position (M-RoPE: past max(rows, columns) of the image)
    last = logits[-1]
    out, steps = [], []
    vocab = llama_cpp.llama_model_get_vocab(ref.model)
    for _ in range(n_gen):
        tok = int(np.argmax(last))
        steps.append((last, tok))
        if llama_cpp.llama_vocab_is_eog(vocab, tok):
            break
        out.append(tok)
        ref.eval([tok])
        last = np.array(ref.scores[ref.n_tokens - 1])
    text = ref.detokenize(out) if with_text else None
    M.mtmd_input_chunks_free(chunks)
    for bmp in bitmaps:
        M.mtmd_bitmap_free(bmp)
    M.mtmd_free(ctx)
    ref.close()
    return (logits, out) + ((text,) if with_text else ()) + ((steps,) if with_steps else ())

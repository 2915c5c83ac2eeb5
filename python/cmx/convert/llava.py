"""Hugging Face LLaVA-1.5-layout model -> GGUF (text model + mmproj), for llama.cpp / mtmd and cmx.

Layout supported (what ``LlavaForConditionalGeneration`` holds for LLaVA-1.5):

* language model: llama (``LlamaForCausalLM`` weights), exported as GGUF arch ``llama`` with
  the HF tokenizer;
* vision tower: CLIP ViT (class token, learned absolute position embeddings, pre-LN, no use of
  the post-LN), features taken from ``hidden_states[vision_feature_layer]`` with the CLS token
  dropped (``vision_feature_select_strategy == "default"``);
* projector: ``linear_1 -> GELU -> linear_2``, exported as clip.cpp projector type ``"mlp"``
  (tensors ``mm.0.*`` and ``mm.2.*``).

mmproj conventions chosen here (see clip.cpp / clip-impl.h of llama.cpp):

* only the vision blocks that are actually run are written: ``L`` blocks where ``L`` is the
  non-negative feature layer (``num_hidden_layers + 1 + vision_feature_layer`` for a negative
  one; ``-2`` on a 24-layer CLIP gives 23), with ``clip.vision.block_count = L`` and
  ``clip.vision.feature_layer = [L]``. With that key present clip.cpp runs exactly ``L`` blocks
  and takes their output (without it, its llava graph would run ``block_count - 1`` blocks).
* ``v.post_ln`` is never written (LLaVA does not apply CLIP's post-layernorm to the features).
* ``mlp.fc1`` -> ``ffn_up``, ``mlp.fc2`` -> ``ffn_down`` (clip.cpp swaps up/down back for
  legacy files when ``ffn_down`` has ``ne[0] == n_embd``; when intermediate_size == hidden_size
  that test cannot tell, and the legacy swapped names are written so that the swap restores them).

Run as a script: ``python -m cmx.convert.llava HF_DIR OUT_DIR [--outtype f16|q8_0|f32] [--mmproj-only]``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

import gguf

__all__ = [
    "UnsupportedModelError",
    "export_llava",
    "export_mmproj",
    "export_text_model",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_OUTTYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q5_1": (gguf.GGMLQuantizationType.Q5_1, gguf.LlamaFileType.MOSTLY_Q5_1),
    "q5_0": (gguf.GGMLQuantizationType.Q5_0, gguf.LlamaFileType.MOSTLY_Q5_0),
    "q4_1": (gguf.GGMLQuantizationType.Q4_1, gguf.LlamaFileType.MOSTLY_Q4_1),
    "q4_0": (gguf.GGMLQuantizationType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}

# projector activations that clip.cpp's "mlp" graph (ggml_gelu) reproduces
_GELU_ACTS = {"gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast"}


class UnsupportedModelError(ValueError):
    """The checkpoint is not of the LLaVA-1.5 layout this exporter handles."""


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------


def _cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _to_numpy(t: Any) -> np.ndarray:
    if isinstance(t, np.ndarray):
        return t.astype(np.float32, copy=False)
    import torch

    if isinstance(t, torch.Tensor):
        return t.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
    return np.asarray(t, dtype=np.float32)


def _check_outtype(outtype: str) -> str:
    key = outtype.lower()
    if key not in _OUTTYPES:
        raise ValueError(f"unsupported output type {outtype!r}; choose one of {sorted(_OUTTYPES)}")
    return key


def _add_weight(
    writer: gguf.GGUFWriter,
    name: str,
    data: np.ndarray,
    outtype: str,
    *,
    keep_f32: bool = False,
    conv_f16_ok: bool = False,
) -> None:
    """Add one tensor, converting it the way llama.cpp's converters do.

    1-D tensors (norms, biases) and anything flagged ``keep_f32`` stay f32. 2-D matrices follow
    ``outtype``; quantized types need rows whose length is a multiple of 32 (others fall back to f16).
    ``conv_f16_ok`` lets a 4-D convolution kernel go to f16 (never quantized).
    """
    data = np.ascontiguousarray(data, dtype=np.float32)
    if keep_f32 or outtype == "f32" or data.ndim == 1:
        writer.add_tensor(name, data)
        return
    if data.ndim == 4:
        if conv_f16_ok:
            writer.add_tensor(name, data.astype(np.float16))
        else:
            writer.add_tensor(name, data)
        return
    if data.ndim != 2:
        writer.add_tensor(name, data)
        return
    qtype = _OUTTYPES[outtype][0]
    if outtype not in ("f16", "f32") and data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0:
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        return
    writer.add_tensor(name, data.astype(np.float16))


def _finish(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _strip_prefixes(state: Mapping[str, Any], prefixes: Iterable[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    prefixes = tuple(prefixes)
    for k, v in state.items():
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p):]
                break
        out[k] = v
    return out


# --------------------------------------------------------------------------------------------
# text model (llama)
# --------------------------------------------------------------------------------------------


def _permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF llama stores Q/K rows per head as [first halves | second halves] (rotate_half RoPE);
    llama.cpp's llama graph rotates adjacent pairs. Interleave the two halves of every head."""
    rows = w.shape[0]
    head_dim = rows // n_head
    if head_dim * n_head != rows or head_dim % 2:
        raise UnsupportedModelError(f"cannot split {rows} rows into {n_head} heads of even size")
    rest = w.shape[1:]
    w = w.reshape(n_head, 2, head_dim // 2, *rest)
    w = np.swapaxes(w, 1, 2)
    return np.ascontiguousarray(w.reshape(rows, *rest))


def _check_text_config(cfg: Any) -> None:
    mt = _cfg_get(cfg, "model_type")
    if mt not in ("llama", None):
        raise UnsupportedModelError(f"text model must be llama (got model_type={mt!r})")
    act = _cfg_get(cfg, "hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"llama text model with hidden_act={act!r} is not supported (need silu)")
    if _cfg_get(cfg, "attention_bias", False) or _cfg_get(cfg, "mlp_bias", False):
        raise UnsupportedModelError("llama text models with attention/MLP biases are not supported")
    rs = _cfg_get(cfg, "rope_scaling")
    if rs is None:
        rs = _cfg_get(cfg, "rope_parameters")
    if isinstance(rs, Mapping):
        rtype = rs.get("rope_type", rs.get("type", "default"))
        if rtype not in ("default", "linear", None):
            raise UnsupportedModelError(f"rope scaling {rtype!r} is not supported (default/linear only)")


def _rope_theta(cfg: Any) -> float:
    theta = _cfg_get(cfg, "rope_theta")
    if theta is None:
        rp = _cfg_get(cfg, "rope_parameters")
        if isinstance(rp, Mapping):
            theta = rp.get("rope_theta")
    return float(theta if theta is not None else 10000.0)


def _rope_linear_factor(cfg: Any) -> float | None:
    for key in ("rope_scaling", "rope_parameters"):
        rs = _cfg_get(cfg, key)
        if isinstance(rs, Mapping) and rs.get("rope_type", rs.get("type")) == "linear":
            return float(rs["factor"])
    return None


def _tokenizer_json(tokenizer: Any) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise UnsupportedModelError("need a fast (tokenizers-backed) Hugging Face tokenizer")
    return json.loads(backend.to_str())


def _guess_tokenizer_pre(tokenizer: Any, tj: dict) -> str:
    """llama.cpp pre-tokenizer name for a byte-level BPE tokenizer, from its pre_tokenizer JSON.

    Only a few common layouts are recognised; pass ``tokenizer_pre=`` explicitly otherwise
    (llama.cpp's converter identifies it by hashing the tokenization of a test text)."""
    pre = tj.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"]:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if kinds and kinds[0] == "Split":
        regex = (parts[0].get("pattern") or {}).get("Regex", "")
        if "\\p{N}{1,3}" in regex and "(?i:'s|'t|'re|'ve|'m|'ll|'d)" in regex:
            return "llama-bpe"
    return "default"


def _write_tokenizer(
    writer: gguf.GGUFWriter, tokenizer: Any, vocab_size: int, tokenizer_pre: str | None
) -> None:
    tj = _tokenizer_json(tokenizer)
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise UnsupportedModelError(f"tokenizer model {model.get('type')!r} not supported (BPE only)")

    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise UnsupportedModelError(
            f"tokenizer has ids up to {max(vocab.values())} but the model's vocab_size is {vocab_size}"
        )
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    # A sentencepiece-style BPE (llama.cpp's "llama" tokenizer) falls back to the 256 byte tokens
    # <0x00>..<0xFF>. The flag alone is not enough: some transformers versions set byte_fallback
    # on the byte-level BPE they build from a GGUF (SmolLM2's, under 5.17), whose vocabulary has
    # no such tokens; written as "llama", llama.cpp would then fail on the first newline.
    byte_fallback = bool(model.get("byte_fallback", False)) and all(f"<0x{b:02X}>" in vocab for b in range(256))

    tokens: list[str] = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for tok, idx in vocab.items():
        tokens[idx] = tok
        if idx in added:
            types[idx] = gguf.TokenType.CONTROL if added[idx].get("special") else gguf.TokenType.USER_DEFINED
        elif byte_fallback and len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
            types[idx] = gguf.TokenType.BYTE
        else:
            types[idx] = gguf.TokenType.NORMAL
    unk = getattr(tokenizer, "unk_token_id", None)

    merges = []
    for m in model.get("merges", []):
        merges.append(m if isinstance(m, str) else " ".join(m))

    if byte_fallback:
        # sentencepiece-style BPE (llama / llama-2 tokenizers): llama.cpp's "llama" tokenizer
        # merges by score; the token id order is the merge priority of those vocabularies.
        writer.add_string("tokenizer.ggml.model", "llama")
        writer.add_string("tokenizer.ggml.pre", tokenizer_pre or "default")
        writer.add_array("tokenizer.ggml.tokens", tokens)
        writer.add_array("tokenizer.ggml.scores", [float(-i) for i in range(vocab_size)])
        if unk is not None:
            types[unk] = gguf.TokenType.UNKNOWN
        writer.add_array("tokenizer.ggml.token_type", [int(t) for t in types])
    else:
        writer.add_string("tokenizer.ggml.model", "gpt2")
        writer.add_string("tokenizer.ggml.pre", tokenizer_pre or _guess_tokenizer_pre(tokenizer, tj))
        writer.add_array("tokenizer.ggml.tokens", tokens)
        writer.add_array("tokenizer.ggml.token_type", [int(t) for t in types])
        writer.add_array("tokenizer.ggml.merges", merges)

    for attr, key in (
        ("bos_token_id", "tokenizer.ggml.bos_token_id"),
        ("eos_token_id", "tokenizer.ggml.eos_token_id"),
        ("unk_token_id", "tokenizer.ggml.unknown_token_id"),
        ("pad_token_id", "tokenizer.ggml.padding_token_id"),
    ):
        val = getattr(tokenizer, attr, None)
        if isinstance(val, int) and 0 <= val < vocab_size:
            writer.add_uint32(key, val)

    # does the HF tokenizer add BOS/EOS by itself?
    try:
        ids = tokenizer("a").input_ids
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        writer.add_bool("tokenizer.ggml.add_bos_token", bool(ids) and bos is not None and ids[0] == bos)
        writer.add_bool("tokenizer.ggml.add_eos_token", bool(ids) and eos is not None and ids[-1] == eos)
    except Exception:  # pragma: no cover - best effort
        pass

    tmpl = getattr(tokenizer, "chat_template", None)
    if isinstance(tmpl, Mapping):
        tmpl = tmpl.get("default") or next(iter(tmpl.values()), None)
    if isinstance(tmpl, str) and tmpl:
        writer.add_string("tokenizer.chat_template", tmpl)


def export_text_model(
    text_config: Any,
    state: Mapping[str, Any],
    tokenizer: Any,
    out_path: str | os.PathLike,
    *,
    outtype: str = "f16",
    name: str | None = None,
    tokenizer_pre: str | None = None,
) -> Path:
    """Write a llama text-model GGUF.

    ``state`` holds the llama weights with HF names relative to the causal LM, i.e.
    ``embed_tokens.weight``, ``layers.N....``, ``norm.weight`` and (unless tied)
    ``lm_head.weight``; the prefixes ``model.``, ``language_model.``, ``model.language_model.``
    and ``language_model.model.`` are stripped.
    """
    outtype = _check_outtype(outtype)
    _check_text_config(text_config)
    st = _strip_prefixes(
        state,
        ("model.language_model.", "language_model.model.", "language_model.", "model."),
    )

    n_embd = int(_cfg_get(text_config, "hidden_size"))
    n_layer = int(_cfg_get(text_config, "num_hidden_layers"))
    n_head = int(_cfg_get(text_config, "num_attention_heads"))
    n_head_kv = int(_cfg_get(text_config, "num_key_value_heads", None) or n_head)
    head_dim = int(_cfg_get(text_config, "head_dim", None) or n_embd // n_head)
    n_ff = int(_cfg_get(text_config, "intermediate_size"))
    vocab_size = int(_cfg_get(text_config, "vocab_size"))
    eps = float(_cfg_get(text_config, "rms_norm_eps", 1e-6))
    n_ctx = int(_cfg_get(text_config, "max_position_embeddings", 4096))
    tied = bool(_cfg_get(text_config, "tie_word_embeddings", False))

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(out_path), "llama")
    w.add_string("general.name", name or "llava-text")
    w.add_uint32("general.file_type", int(_OUTTYPES[outtype][1]))
    w.add_uint32("llama.context_length", n_ctx)
    w.add_uint32("llama.embedding_length", n_embd)
    w.add_uint32("llama.block_count", n_layer)
    w.add_uint32("llama.feed_forward_length", n_ff)
    w.add_uint32("llama.attention.head_count", n_head)
    w.add_uint32("llama.attention.head_count_kv", n_head_kv)
    w.add_uint32("llama.attention.key_length", head_dim)
    w.add_uint32("llama.attention.value_length", head_dim)
    w.add_uint32("llama.rope.dimension_count", head_dim)
    w.add_float32("llama.rope.freq_base", _rope_theta(text_config))
    factor = _rope_linear_factor(text_config)
    if factor is not None:
        w.add_string("llama.rope.scaling.type", "linear")
        w.add_float32("llama.rope.scaling.factor", factor)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", eps)
    w.add_uint32("llama.vocab_size", vocab_size)

    _write_tokenizer(w, tokenizer, vocab_size, tokenizer_pre)

    def get(key: str) -> np.ndarray:
        if key not in st:
            raise KeyError(f"text model weight {key!r} missing")
        return _to_numpy(st[key])

    emb = get("embed_tokens.weight")
    if emb.shape != (vocab_size, n_embd):
        raise UnsupportedModelError(f"embed_tokens has shape {emb.shape}, expected {(vocab_size, n_embd)}")
    _add_weight(w, "token_embd.weight", emb, outtype)
    _add_weight(w, "output_norm.weight", get("norm.weight"), outtype)
    if not tied and "lm_head.weight" in st:
        _add_weight(w, "output.weight", get("lm_head.weight"), outtype)
    for i in range(n_layer):
        p = f"layers.{i}."
        _add_weight(w, f"blk.{i}.attn_norm.weight", get(p + "input_layernorm.weight"), outtype)
        _add_weight(w, f"blk.{i}.attn_q.weight", _permute_rotary(get(p + "self_attn.q_proj.weight"), n_head), outtype)
        _add_weight(w, f"blk.{i}.attn_k.weight", _permute_rotary(get(p + "self_attn.k_proj.weight"), n_head_kv), outtype)
        _add_weight(w, f"blk.{i}.attn_v.weight", get(p + "self_attn.v_proj.weight"), outtype)
        _add_weight(w, f"blk.{i}.attn_output.weight", get(p + "self_attn.o_proj.weight"), outtype)
        _add_weight(w, f"blk.{i}.ffn_norm.weight", get(p + "post_attention_layernorm.weight"), outtype)
        _add_weight(w, f"blk.{i}.ffn_gate.weight", get(p + "mlp.gate_proj.weight"), outtype)
        _add_weight(w, f"blk.{i}.ffn_up.weight", get(p + "mlp.up_proj.weight"), outtype)
        _add_weight(w, f"blk.{i}.ffn_down.weight", get(p + "mlp.down_proj.weight"), outtype)
    _finish(w)
    return out_path


# --------------------------------------------------------------------------------------------
# mmproj (CLIP vision tower + LLaVA MLP projector)
# --------------------------------------------------------------------------------------------


def _feature_layer_count(feature_layer: Any, n_layers: int) -> int:
    if isinstance(feature_layer, (list, tuple)):
        if len(feature_layer) != 1:
            raise UnsupportedModelError(
                f"multiple vision feature layers {list(feature_layer)} are not supported (LLaVA-1.5 uses one)"
            )
        feature_layer = feature_layer[0]
    fl = int(feature_layer)
    n = n_layers + 1 + fl if fl < 0 else fl
    if not 1 <= n <= n_layers:
        raise UnsupportedModelError(f"vision_feature_layer={fl} out of range for {n_layers} CLIP layers")
    return n


def export_mmproj(
    vision_config: Any,
    vision_state: Mapping[str, Any],
    projector_state: Mapping[str, Any],
    out_path: str | os.PathLike,
    *,
    vision_feature_layer: int | list[int] = -2,
    vision_feature_select_strategy: str = "default",
    projector_hidden_act: str = "gelu",
    image_mean: Iterable[float] = OPENAI_CLIP_MEAN,
    image_std: Iterable[float] = OPENAI_CLIP_STD,
    outtype: str = "f16",
    ffn_outtype: str | None = None,
    name: str | None = None,
) -> Path:
    """Write an mmproj GGUF (clip.cpp projector type ``mlp``).

    ``ffn_outtype`` (default: ``outtype``) is the type of the ViT's MLP matrices, the largest
    part of the tower: a smaller type there keeps a shipped file small.

    ``vision_config``: a ``CLIPVisionConfig`` (or dict with its fields).
    ``vision_state``: the CLIP vision tower's state dict (``vision_model.embeddings...``; the
    prefixes ``model.vision_tower.``, ``vision_tower.``, ``vision_model.`` are stripped).
    ``projector_state``: ``linear_1.{weight,bias}``, ``linear_2.{weight,bias}`` (the prefix
    ``multi_modal_projector.`` / ``model.multi_modal_projector.`` is stripped).
    A missing projector bias is written as zeros (clip.cpp always adds one).
    """
    outtype = _check_outtype(outtype)
    ffn_outtype = _check_outtype(ffn_outtype or outtype)
    mt = _cfg_get(vision_config, "model_type", "clip_vision_model")
    if mt not in ("clip_vision_model", "clip"):
        raise UnsupportedModelError(f"vision tower must be CLIP (got model_type={mt!r})")
    if vision_feature_select_strategy != "default":
        raise UnsupportedModelError(
            f"vision_feature_select_strategy={vision_feature_select_strategy!r} not supported "
            "(clip.cpp's llava graph drops the CLS token, i.e. 'default')"
        )
    if projector_hidden_act not in _GELU_ACTS:
        raise UnsupportedModelError(
            f"projector activation {projector_hidden_act!r} not supported (mlp2x_gelu projector only)"
        )
    vact = _cfg_get(vision_config, "hidden_act", "quick_gelu")
    if vact not in ("quick_gelu", "gelu"):
        raise UnsupportedModelError(f"CLIP hidden_act={vact!r} not supported (quick_gelu or gelu)")

    vs = _strip_prefixes(vision_state, ("model.vision_tower.", "vision_tower."))
    vs = _strip_prefixes(vs, ("vision_model.",))
    ps = _strip_prefixes(projector_state, ("model.multi_modal_projector.", "multi_modal_projector."))
    extra = sorted(k for k in ps if not k.startswith(("linear_1.", "linear_2.")))
    if extra or "linear_1.weight" not in ps or "linear_2.weight" not in ps:
        raise UnsupportedModelError(
            f"projector must be linear_1 -> GELU -> linear_2 (mlp2x_gelu); got keys {sorted(ps)}"
        )

    n_embd = int(_cfg_get(vision_config, "hidden_size"))
    n_ff = int(_cfg_get(vision_config, "intermediate_size"))
    n_head = int(_cfg_get(vision_config, "num_attention_heads"))
    n_layers_total = int(_cfg_get(vision_config, "num_hidden_layers"))
    image_size = int(_cfg_get(vision_config, "image_size"))
    patch_size = int(_cfg_get(vision_config, "patch_size"))
    eps = float(_cfg_get(vision_config, "layer_norm_eps", 1e-5))
    if image_size % patch_size:
        raise UnsupportedModelError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    n_run = _feature_layer_count(vision_feature_layer, n_layers_total)

    def get(st: Mapping[str, Any], key: str) -> np.ndarray:
        if key not in st:
            raise KeyError(f"weight {key!r} missing")
        return _to_numpy(st[key])

    w1 = get(ps, "linear_1.weight")
    w2 = get(ps, "linear_2.weight")
    if w1.shape[1] != n_embd:
        raise UnsupportedModelError(
            f"projector input {w1.shape[1]} != CLIP hidden size {n_embd} (stacked feature layers?)"
        )
    b1 = get(ps, "linear_1.bias") if "linear_1.bias" in ps else np.zeros(w1.shape[0], np.float32)
    b2 = get(ps, "linear_2.bias") if "linear_2.bias" in ps else np.zeros(w2.shape[0], np.float32)
    n_text = int(w2.shape[0])

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(out_path), "clip")
    w.add_string("general.type", "mmproj")
    w.add_string("general.name", name or "llava-mmproj")
    w.add_string("general.description", "LLaVA-1.5 image encoder (CLIP ViT + MLP projector), cmx.convert")
    w.add_uint32("general.file_type", int(_OUTTYPES[outtype][1]))
    w.add_bool("clip.has_vision_encoder", True)
    w.add_bool("clip.has_llava_projector", True)
    w.add_string("clip.projector_type", "mlp")
    w.add_bool("clip.use_gelu", vact == "gelu")  # false -> clip.cpp uses quick_gelu
    w.add_uint32("clip.vision.image_size", image_size)
    w.add_uint32("clip.vision.patch_size", patch_size)
    w.add_uint32("clip.vision.embedding_length", n_embd)
    w.add_uint32("clip.vision.feed_forward_length", n_ff)
    w.add_uint32("clip.vision.projection_dim", n_text)
    w.add_uint32("clip.vision.attention.head_count", n_head)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", eps)
    w.add_uint32("clip.vision.block_count", n_run)
    w.add_array("clip.vision.feature_layer", [int(n_run)])
    w.add_array("clip.vision.image_mean", [float(x) for x in image_mean])
    w.add_array("clip.vision.image_std", [float(x) for x in image_std])

    # embeddings
    _add_weight(w, "v.patch_embd.weight", get(vs, "embeddings.patch_embedding.weight"), outtype, conv_f16_ok=True)
    if "embeddings.patch_embedding.bias" in vs:
        _add_weight(w, "v.patch_embd.bias", get(vs, "embeddings.patch_embedding.bias"), outtype)
    _add_weight(w, "v.class_embd", get(vs, "embeddings.class_embedding"), outtype, keep_f32=True)
    pos = get(vs, "embeddings.position_embedding.weight")
    n_pos = (image_size // patch_size) ** 2 + 1
    if pos.shape[0] != n_pos:
        raise UnsupportedModelError(f"position embeddings have {pos.shape[0]} rows, expected {n_pos}")
    _add_weight(w, "v.position_embd.weight", pos, outtype, keep_f32=True)
    pre = "pre_layrnorm" if "pre_layrnorm.weight" in vs else "pre_layernorm"
    _add_weight(w, "v.pre_ln.weight", get(vs, f"{pre}.weight"), outtype)
    _add_weight(w, "v.pre_ln.bias", get(vs, f"{pre}.bias"), outtype)

    swap_ffn_names = n_ff == n_embd  # see module docstring
    up_name, down_name = ("ffn_down", "ffn_up") if swap_ffn_names else ("ffn_up", "ffn_down")
    for i in range(n_run):
        p = f"encoder.layers.{i}."
        o = f"v.blk.{i}."
        for hf, gg in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"), ("out_proj", "attn_out")):
            _add_weight(w, o + gg + ".weight", get(vs, p + f"self_attn.{hf}.weight"), outtype)
            _add_weight(w, o + gg + ".bias", get(vs, p + f"self_attn.{hf}.bias"), outtype)
        _add_weight(w, o + "ln1.weight", get(vs, p + "layer_norm1.weight"), outtype)
        _add_weight(w, o + "ln1.bias", get(vs, p + "layer_norm1.bias"), outtype)
        _add_weight(w, o + "ln2.weight", get(vs, p + "layer_norm2.weight"), outtype)
        _add_weight(w, o + "ln2.bias", get(vs, p + "layer_norm2.bias"), outtype)
        _add_weight(w, o + up_name + ".weight", get(vs, p + "mlp.fc1.weight"), ffn_outtype)
        _add_weight(w, o + up_name + ".bias", get(vs, p + "mlp.fc1.bias"), outtype)
        _add_weight(w, o + down_name + ".weight", get(vs, p + "mlp.fc2.weight"), ffn_outtype)
        _add_weight(w, o + down_name + ".bias", get(vs, p + "mlp.fc2.bias"), outtype)

    # projector
    _add_weight(w, "mm.0.weight", w1, outtype)
    _add_weight(w, "mm.0.bias", b1, outtype)
    _add_weight(w, "mm.2.weight", w2, outtype)
    _add_weight(w, "mm.2.bias", b2, outtype)
    _finish(w)
    return out_path


# --------------------------------------------------------------------------------------------
# whole model
# --------------------------------------------------------------------------------------------


def _read_image_norm(model_dir: Path | None, image_processor: Any) -> tuple[list[float], list[float]]:
    if image_processor is not None:
        ip = getattr(image_processor, "image_processor", image_processor)
        mean, std = getattr(ip, "image_mean", None), getattr(ip, "image_std", None)
        if mean is not None and std is not None:
            return list(mean), list(std)
    if model_dir is not None:
        for fname in ("preprocessor_config.json", "processor_config.json"):
            f = model_dir / fname
            if f.is_file():
                cfg = json.loads(f.read_text())
                cfg = {**cfg, **cfg.get("image_processor", {})}
                if "image_mean" in cfg and "image_std" in cfg:
                    return list(cfg["image_mean"]), list(cfg["image_std"])
    return list(OPENAI_CLIP_MEAN), list(OPENAI_CLIP_STD)


def _llava_modules(model: Any) -> tuple[Any, Any, Any, Any]:
    """(language model with embed_tokens/layers/norm, lm_head, vision tower, projector)."""
    inner = getattr(model, "model", None)
    lm = getattr(inner, "language_model", None) if inner is not None else None
    vt = getattr(inner, "vision_tower", None) if inner is not None else None
    proj = getattr(inner, "multi_modal_projector", None) if inner is not None else None
    if lm is None:  # older transformers: model.language_model is a LlamaForCausalLM
        lm = getattr(model, "language_model", None)
        vt = getattr(model, "vision_tower", None)
        proj = getattr(model, "multi_modal_projector", None)
    head = getattr(model, "lm_head", None)
    if lm is not None and hasattr(lm, "model") and hasattr(lm, "lm_head"):
        head = lm.lm_head
        lm = lm.model
    if lm is None or vt is None or proj is None:
        raise UnsupportedModelError("not a LlavaForConditionalGeneration-like model")
    return lm, head, vt, proj


def export_llava(
    model_or_dir: Any,
    out_dir: str | os.PathLike,
    *,
    text: bool = True,
    mmproj: bool = True,
    text_type: str = "f16",
    mmproj_type: str = "f16",
    name: str | None = None,
    tokenizer: Any = None,
    image_processor: Any = None,
    tokenizer_pre: str | None = None,
) -> dict[str, Path]:
    """Export a LLaVA-1.5-layout model to ``out_dir``.

    ``model_or_dir`` is a ``LlavaForConditionalGeneration`` or a directory written by
    ``save_pretrained`` (its tokenizer and preprocessor config are read from there too).
    Returns ``{"text": path, "mmproj": path}`` for the files written.
    """
    text_type = _check_outtype(text_type)
    mmproj_type = _check_outtype(mmproj_type)
    model_dir: Path | None = None
    model = model_or_dir
    if isinstance(model_or_dir, (str, os.PathLike)):
        model_dir = Path(model_or_dir)
        cfg_file = model_dir / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{cfg_file} not found")
        arch = json.loads(cfg_file.read_text()).get("architectures") or []
        if arch and arch[0] != "LlavaForConditionalGeneration":
            raise UnsupportedModelError(f"expected LlavaForConditionalGeneration, got {arch[0]}")
        import torch
        from transformers import LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch.float32)
        if text and tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(model_dir))

    cfg = model.config
    if _cfg_get(cfg, "model_type") not in ("llava", None):
        raise UnsupportedModelError(f"expected a llava config, got model_type={_cfg_get(cfg, 'model_type')!r}")
    text_cfg = _cfg_get(cfg, "text_config")
    vision_cfg = _cfg_get(cfg, "vision_config")
    lm, head, vt, proj = _llava_modules(model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = name or (model_dir.name if model_dir is not None else "llava")
    written: dict[str, Path] = {}

    if mmproj:
        act = _cfg_get(cfg, "projector_hidden_act", "gelu")
        mean, std = _read_image_norm(model_dir, image_processor)
        written["mmproj"] = export_mmproj(
            vision_cfg,
            vt.state_dict(),
            proj.state_dict(),
            out_dir / f"mmproj-{stem}-{mmproj_type}.gguf",
            vision_feature_layer=_cfg_get(cfg, "vision_feature_layer", -2),
            vision_feature_select_strategy=_cfg_get(cfg, "vision_feature_select_strategy", "default"),
            projector_hidden_act=act,
            image_mean=mean,
            image_std=std,
            outtype=mmproj_type,
            name=f"{stem}-mmproj",
        )
    if text:
        if tokenizer is None:
            raise ValueError("exporting the text model needs the tokenizer (tokenizer=...)")
        state = dict(lm.state_dict())
        tied = bool(_cfg_get(text_cfg, "tie_word_embeddings", False) or _cfg_get(cfg, "tie_word_embeddings", False))
        if head is not None and not tied:
            state["lm_head.weight"] = head.weight
        written["text"] = export_text_model(
            text_cfg,
            state,
            tokenizer,
            out_dir / f"{stem}-{text_type}.gguf",
            outtype=text_type,
            name=stem,
            tokenizer_pre=tokenizer_pre,
        )
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m cmx.convert.llava",
        description="Convert a Hugging Face LLaVA-1.5-layout model to GGUF (text model + mmproj).",
    )
    ap.add_argument("hf_dir", help="directory written by save_pretrained (config.json, weights, tokenizer)")
    ap.add_argument("out_dir", help="output directory")
    ap.add_argument("--outtype", default="f16", choices=sorted(_OUTTYPES), help="type of 2-D weights")
    ap.add_argument("--mmproj-only", action="store_true", help="write only the mmproj GGUF")
    ap.add_argument("--text-only", action="store_true", help="write only the text-model GGUF")
    ap.add_argument("--name", default=None, help="base name of the output files")
    ap.add_argument("--tokenizer-pre", default=None, help="llama.cpp pre-tokenizer name (default: guessed)")
    args = ap.parse_args(argv)
    if args.mmproj_only and args.text_only:
        ap.error("--mmproj-only and --text-only exclude each other")
    try:
        paths = export_llava(
            args.hf_dir,
            args.out_dir,
            text=not args.mmproj_only,
            mmproj=not args.text_only,
            text_type=args.outtype,
            mmproj_type=args.outtype,
            name=args.name,
            tokenizer_pre=args.tokenizer_pre,
        )
    except UnsupportedModelError as e:
        print(f"error: {e}")
        return 2
    for kind, p in paths.items():
        print(f"{kind}: {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

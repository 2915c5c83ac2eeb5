"""LoRA adapter (peft layout, Hugging Face llama names) -> LoRA GGUF as llama.cpp loads it.

The file is what llama.cpp's ``convert_lora_to_gguf.py`` writes for a llama adapter (facts read
from llama.cpp's converter and ``src/llama-adapter.cpp``; the code here is our own):

* keys: ``general.architecture`` (the base model's, checked against it at load),
  ``general.type = "adapter"``, ``adapter.type = "lora"``, ``adapter.lora.alpha`` (float32),
  ``general.name``, ``general.quantization_version``. No hyperparameters of the base model.
* tensors: ``blk.N.<base tensor>.weight.lora_a`` and ``.lora_b`` for each adapted matrix, e.g.
  ``blk.3.attn_q.weight.lora_a``. In ggml order ``lora_a`` has ne = [n_in, r] and ``lora_b``
  ne = [r, n_out]: in numpy terms exactly peft's ``lora_A.weight`` (r, n_in) and
  ``lora_B.weight`` (n_out, r). llama.cpp checks ``a.ne[0] == W.ne[0]``, ``b.ne[1] == W.ne[1]``
  and ``a.ne[1] == b.ne[0]``.
* llama.cpp applies ``W x + scale * B (A x)`` with ``scale = user_scale * alpha / r`` (r read
  from ``lora_b``'s ne[0]; alpha 0 means scale = user_scale), i.e. peft's ``alpha / r``.
* the llama converter permutes the rows of Q and K (``attn_q``/``attn_k``) so that RoPE rotates
  adjacent pairs; since ``W' = P W`` the adapter's update must be ``P B A``: the rows of ``lora_b``
  of q and k are permuted the same way (q with n_head, k with n_head_kv); ``lora_a`` is unchanged.
* types: f32, f16, bf16, or q8_0, where a matrix whose rows are not a multiple of 32 (``lora_b``,
  whose rows are r long) falls back to f16 as llama.cpp's converter does.

Only adapters on the decoder's linear layers are written (attention q/k/v/o, FFN gate/up/down);
embedding and lm_head adapters are refused.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import gguf
import numpy as np

from .llava import UnsupportedModelError, _cfg_get, _permute_rotary, _to_numpy

# HF module (under model.layers.N.) -> GGUF base tensor name (under blk.N.)
_MODULES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}

_TYPES = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "bf16": gguf.GGMLQuantizationType.BF16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
}

_KEY = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(.+)\.lora_([AB])(?:\.[A-Za-z0-9_]+)?\.weight$")


def lora_pairs(state: Mapping[str, Any]) -> dict[tuple[int, str], dict[str, np.ndarray]]:
    """{(layer, HF module): {"A": (r, n_in), "B": (n_out, r)}} from peft-style names
    (``base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight``, with or without the
    prefixes, with or without an adapter name such as ``.default``)."""
    out: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for k, v in state.items():
        m = _KEY.match(k)
        if m is None:
            if "lora_embedding" in k or "embed_tokens" in k or "lm_head" in k:
                raise UnsupportedModelError(f"adapter on embeddings / lm_head is not supported: {k}")
            raise UnsupportedModelError(f"unexpected adapter tensor {k!r} (not a lora_A / lora_B weight)")
        layer, module, ab = int(m.group(1)), m.group(2), m.group(3)
        if module not in _MODULES:
            raise UnsupportedModelError(f"LoRA on {module!r} is not supported (only {sorted(_MODULES)})")
        out.setdefault((layer, module), {})[ab] = np.ascontiguousarray(_to_numpy(v), dtype=np.float32)
    for key, ab in out.items():
        if set(ab) != {"A", "B"}:
            raise UnsupportedModelError(f"layer {key[0]} {key[1]}: lora_A and lora_B must both be present")
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise UnsupportedModelError(f"layer {key[0]} {key[1]}: A {a.shape} and B {b.shape} do not form B @ A")
    if not out:
        raise UnsupportedModelError("no LoRA tensors found")
    return out


def _add(writer: gguf.GGUFWriter, name: str, data: np.ndarray, outtype: str) -> None:
    qtype = _TYPES[outtype]
    if qtype == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, data.astype(np.float32))
    elif qtype == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(name, data.astype(np.float16))
    elif data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0:
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    else:  # rows too short for the block size: f16, as llama.cpp's converter falls back
        writer.add_tensor(name, data.astype(np.float16))


def export_lora(
    text_config: Any,
    lora_state: Mapping[str, Any],
    out_path: str | os.PathLike,
    *,
    alpha: float,
    outtype: str = "f16",
    name: str | None = None,
) -> Path:
    """Write a LoRA GGUF for a llama base model.

    ``text_config``: the base model's config (``LlamaConfig`` or dict): architecture, layer count,
    ``num_attention_heads`` and ``num_key_value_heads`` (for the Q/K row permutation), sizes.
    ``lora_state``: peft-style tensors (see ``lora_pairs``), float. ``alpha``: peft's
    ``lora_alpha`` (llama.cpp scales by alpha / r). ``outtype``: f32, f16, bf16 or q8_0.
    """
    if outtype not in _TYPES:
        raise ValueError(f"outtype must be one of {sorted(_TYPES)}")
    mt = _cfg_get(text_config, "model_type", "llama")
    if mt != "llama":
        raise UnsupportedModelError(f"base model must be llama (got model_type={mt!r})")
    n_layer = int(_cfg_get(text_config, "num_hidden_layers"))
    n_embd = int(_cfg_get(text_config, "hidden_size"))
    n_head = int(_cfg_get(text_config, "num_attention_heads"))
    n_head_kv = int(_cfg_get(text_config, "num_key_value_heads", None) or n_head)
    head_dim = int(_cfg_get(text_config, "head_dim", None) or n_embd // n_head)
    n_ff = int(_cfg_get(text_config, "intermediate_size"))
    dims = {  # HF module -> (n_out, n_in) of the base weight
        "self_attn.q_proj": (n_head * head_dim, n_embd),
        "self_attn.k_proj": (n_head_kv * head_dim, n_embd),
        "self_attn.v_proj": (n_head_kv * head_dim, n_embd),
        "self_attn.o_proj": (n_embd, n_head * head_dim),
        "mlp.gate_proj": (n_ff, n_embd),
        "mlp.up_proj": (n_ff, n_embd),
        "mlp.down_proj": (n_embd, n_ff),
    }

    pairs = lora_pairs(lora_state)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(out_path), "llama")
    w.add_string("general.type", "adapter")
    w.add_string("general.name", name or "lora")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(alpha))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for (layer, module), ab in sorted(pairs.items()):
        if not 0 <= layer < n_layer:
            raise UnsupportedModelError(f"LoRA for layer {layer}, base model has {n_layer}")
        a, b = ab["A"], ab["B"]
        n_out, n_in = dims[module]
        if a.shape[1] != n_in or b.shape[0] != n_out:
            raise UnsupportedModelError(
                f"layer {layer} {module}: A {a.shape} / B {b.shape} do not fit a ({n_out}, {n_in}) weight")
        if module == "self_attn.q_proj":
            b = _permute_rotary(b, n_head)
        elif module == "self_attn.k_proj":
            b = _permute_rotary(b, n_head_kv)
        base = f"blk.{layer}.{_MODULES[module]}.weight"
        _add(w, base + ".lora_a", a, outtype)
        _add(w, base + ".lora_b", b, outtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out_path


def export_peft_dir(adapter_dir: str | os.PathLike, base_config: Any, out_path: str | os.PathLike,
                    *, outtype: str = "f16", name: str | None = None) -> Path:
    """A peft adapter folder (adapter_config.json + adapter_model.safetensors) -> LoRA GGUF."""
    from safetensors.numpy import load_file

    d = Path(adapter_dir)
    cfg = json.loads((d / "adapter_config.json").read_text())
    if cfg.get("use_rslora") or cfg.get("use_dora"):
        raise UnsupportedModelError("rsLoRA / DoRA adapters are not supported (llama.cpp scales by alpha / r)")
    state = load_file(str(d / "adapter_model.safetensors"))
    return export_lora(base_config, state, out_path, alpha=float(cfg["lora_alpha"]), outtype=outtype, name=name)

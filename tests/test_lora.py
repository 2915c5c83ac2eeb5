"""LoRA adapters in the engine, against llama-cpp-python's Llama(lora_path=...) on tiny models:
logits and greedy continuations, adapters on attention and on the FFN, CoreMatching with an
adapter, and adapters that do not fit."""

import gguf
import numpy as np
import pytest

import cmx
import llama_cpp
import tiny_models
from devices import N_GPU_LAYERS
from test_engine_parity import MAX_ABS_DIFF, PROMPT, reference_greedy

RANK = 4


def write_lora(path, cfg, modules, *, alpha=8.0, arch="llama", seed=1, shape_of=None):
    """A random adapter in llama.cpp's layout: lora_a ne [n_in, r] (numpy [r, n_in]), lora_b ne
    [r, n_out] (numpy [n_out, r])."""
    rng = np.random.default_rng(seed)
    E, F, D = cfg.n_embd, cfg.n_ff, cfg.head_dim
    Q, KV = D * cfg.n_head, D * cfg.n_head_kv
    shapes = shape_of or {"attn_q": (E, Q), "attn_k": (E, KV), "attn_v": (E, KV), "attn_output": (Q, E),
                          "ffn_gate": (E, F), "ffn_up": (E, F), "ffn_down": (F, E)}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", alpha)
    for il in range(cfg.n_layer):
        for name in modules:
            n_in, n_out = shapes[name]
            w.add_tensor(f"blk.{il}.{name}.weight.lora_a", (rng.standard_normal((RANK, n_in)) / np.sqrt(n_in)).astype(np.float32))
            w.add_tensor(f"blk.{il}.{name}.weight.lora_b", (rng.standard_normal((n_out, RANK)) * 0.5).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


ATTENTION = ("attn_q", "attn_k", "attn_v", "attn_output")
FFN = ("ffn_gate", "ffn_up", "ffn_down")


@pytest.mark.parametrize("modules,scale", [(ATTENTION, 1.0), (ATTENTION + FFN, 0.7)])
def test_lora_matches_llama_cpp(tiny_model_path, tmp_path, modules, scale):
    path = tiny_model_path("llama", "f32")
    lora = write_lora(tmp_path / "adapter.gguf", tiny_models.ARCH_CONFIGS["llama"], modules)
    m = cmx.Model(path, n_ctx=512, n_threads=2, lora=lora, lora_scale=scale)
    plain = cmx.Model(path, n_ctx=512, n_threads=2)
    tokens = m.tokenize(PROMPT)[:64]
    ours = m.logits(tokens)
    ref = llama_cpp.Llama(path, n_ctx=512, logits_all=True, verbose=False, n_threads=2, n_threads_batch=2,
                          lora_path=lora, lora_scale=scale, n_gpu_layers=N_GPU_LAYERS)
    ref.eval(tokens)
    theirs = np.array(ref.scores[: len(tokens)], dtype=np.float32)
    assert np.abs(ours - theirs).max() < MAX_ABS_DIFF["f32"]
    assert np.abs(ours - plain.logits(tokens)).max() > 1e-2  # the adapter does something
    assert list(m.generate(tokens, max_tokens=24)) == reference_greedy(ref, tokens, 24)
    assert m.info["lora"] == lora


def test_corematching_with_an_attention_adapter(tiny_model_path, tmp_path):
    path = tiny_model_path("llama", "f32")
    cfg = tiny_models.ARCH_CONFIGS["llama"]
    lora = write_lora(tmp_path / "attn.gguf", cfg, ATTENTION)
    m = cmx.Model(path, n_ctx=512, n_threads=2, lora=lora)
    image = np.random.default_rng(0).standard_normal((12, m.info["n_embd"])).astype(np.float32)
    sp = cmx.Sparsity(budget=4, dense_layers=())
    toks = list(m.generate([1, 2, image, 3, 4, 5], max_tokens=4, sparsity=sp))
    assert len(m.last_stats["kept_image_tokens"][0]) == 4
    assert m.last_stats["core_neurons"][0] < m.info["n_ff"]
    del toks
    ffn = write_lora(tmp_path / "ffn.gguf", cfg, FFN)
    m2 = cmx.Model(path, n_ctx=512, n_threads=2, lora=ffn)
    with pytest.raises(ValueError, match="LoRA adapter on the FFN"):
        list(m2.generate([1, 2, 3], max_tokens=2, sparsity=cmx.Sparsity()))
    assert len(list(m2.generate([1, 2, 3], max_tokens=2, sparsity=cmx.Sparsity(neurons=False)))) <= 2


def test_adapters_that_do_not_fit(tiny_model_path, tmp_path):
    path = tiny_model_path("llama", "f32")
    cfg = tiny_models.ARCH_CONFIGS["llama"]
    E = cfg.n_embd
    wrong = write_lora(tmp_path / "wrong.gguf", cfg, ("attn_q",), shape_of={"attn_q": (E + 8, E)})
    with pytest.raises(cmx.ModelLoadError, match="does not fit"):
        cmx.Model(path, n_ctx=256, lora=wrong)
    other_arch = write_lora(tmp_path / "qwen.gguf", cfg, ("attn_q",), arch="qwen2")
    with pytest.raises(cmx.ModelLoadError, match="qwen2"):
        cmx.Model(path, n_ctx=256, lora=other_arch)
    with pytest.raises(cmx.ModelLoadError, match="not a LoRA adapter"):
        cmx.Model(path, n_ctx=256, lora=path)  # a model, not an adapter
    with pytest.raises(FileNotFoundError):
        cmx.Model(path, n_ctx=256, lora=str(tmp_path / "missing.gguf"))
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + b"\x00" * 20)
    with pytest.raises(cmx.ModelLoadError):
        cmx.Model(path, n_ctx=256, lora=str(garbage))

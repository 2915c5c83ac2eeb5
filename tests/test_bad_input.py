"""Bad input raises a Python exception naming the problem; the process survives (we are still
here to run the next assertion)."""

import numpy as np
import pytest

import cmx
import tiny_models
from cmx import ModelLoadError


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        cmx.Model(tmp_path / "nope.gguf")


def test_not_a_gguf_file(tmp_path):
    p = tmp_path / "notes.gguf"
    p.write_text("this is a text file, not a model\n" * 10)
    with pytest.raises(ModelLoadError, match="not a valid GGUF"):
        cmx.Model(p)


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_gguf(tiny_model_path, tmp_path, keep):
    data = open(tiny_model_path("llama", "f32"), "rb").read()
    p = tmp_path / "truncated.gguf"
    p.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ModelLoadError, match="truncated"):
        cmx.Model(p)


def test_truncated_header(tiny_model_path, tmp_path):
    data = open(tiny_model_path("llama", "f32"), "rb").read()
    p = tmp_path / "header.gguf"
    p.write_bytes(data[:2000])  # inside the tokenizer metadata
    with pytest.raises(ModelLoadError, match="not a valid GGUF"):
        cmx.Model(p)


def test_unsupported_architecture(tmp_path):
    cfg = tiny_models.TinyConfig(arch="gpt2")
    p = tiny_models.write_tiny_gguf(str(tmp_path / "gpt2.gguf"), cfg, "f32")
    with pytest.raises(ModelLoadError, match="unsupported architecture 'gpt2'"):
        cmx.Model(p)


def test_tensor_with_wrong_shape(tmp_path):
    cfg = tiny_models.TinyConfig()
    bad = np.zeros((cfg.n_embd + 8, cfg.n_embd), np.float32)  # attn_q must be [n_embd, n_embd]
    p = tiny_models.write_tiny_gguf(str(tmp_path / "shape.gguf"), cfg, "f32", overrides={"blk.1.attn_q.weight": bad})
    with pytest.raises(ModelLoadError, match=r"'blk.1.attn_q.weight' has shape \[64, 72\], expected \[64, 64\]"):
        cmx.Model(p)


def test_prompt_longer_than_n_ctx(tiny_model_path):
    m = cmx.Model(tiny_model_path("llama", "f32"), n_ctx=64)
    tokens = m.tokenize("word " * 100)
    assert len(tokens) > 64
    with pytest.raises(ValueError, match="prompt too long"):
        m.logits(tokens)
    with pytest.raises(ValueError, match="prompt too long"):
        next(m.generate(tokens))
    assert m.logits(tokens[:64]).shape[0] == 64  # still usable


@pytest.mark.parametrize("n_ctx", [0, -5])
def test_n_ctx_not_positive(tiny_model_path, n_ctx):
    with pytest.raises(ValueError, match="n_ctx must be a positive integer"):
        cmx.Model(tiny_model_path("llama", "f32"), n_ctx=n_ctx)


def test_engine_level_checks(tiny_model_path):
    """The same checks hold below the Python wrapper: nothing reaches a GGML_ASSERT."""
    from cmx._core import Engine

    with pytest.raises(ValueError, match="n_ctx must be > 0"):
        Engine(tiny_model_path("llama", "f32"), n_ctx=0)
    e = Engine(tiny_model_path("llama", "f32"), n_ctx=32)
    i32 = lambda xs: np.array(xs, np.int32)  # noqa: E731
    with pytest.raises(ValueError, match="out of range"):
        e.decode(i32([10**7]), i32([0]), i32([0]))
    with pytest.raises(ValueError, match="one entry per row"):
        e.decode(i32([1, 2]), i32([0]), i32([0]))
    with pytest.raises(ValueError, match="embedding rows"):
        e.decode(i32([-1]), i32([0]), i32([0]))
    with pytest.raises(ValueError, match="shape"):
        e.decode(i32([-1]), i32([0]), i32([0]), embd=np.zeros((1, 3), np.float32))
    with pytest.raises(ValueError, match="prompt too long"):
        e.decode(i32(range(40)), i32(range(40)), i32([39]))
    with pytest.raises(ValueError, match="keep_rows"):
        e.decode(i32([1, 2, 3]), i32([0, 1, 2]), i32([0]), prune_after_layer=0, keep_rows=[2, 1])


def test_bad_generation_options(tiny_model_path):
    m = cmx.Model(tiny_model_path("llama", "f32"), n_ctx=64)
    tokens = m.tokenize("hello")
    for kwargs in ({"temperature": -1.0}, {"top_p": 0.0}, {"top_k": -1}, {"max_tokens": -2}):
        with pytest.raises(ValueError):
            next(m.generate(tokens, **kwargs))
    with pytest.raises(ValueError, match="non-empty"):
        m.logits([])

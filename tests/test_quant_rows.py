"""The row codecs of the compact core-neuron copies (cpp/quant_rows.cpp) against ggml's reference
quantizers, as gguf-py implements them in numpy: the same bytes for Q4_0 and Q8_0, the same values
back. (On an AVX2 CPU these are cmx's vector kernels; elsewhere ggml's own functions.)"""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import quants

from cmx import _core

TYPES = {"q4_0": Q.Q4_0, "q8_0": Q.Q8_0}


def awkward_row(rng, scale, n_blocks=2048):
    x = (rng.standard_normal(32 * n_blocks) * scale).astype(np.float32)
    x[:32] = 0  # d = 0
    x[32:64] = rng.integers(-3, 4, 32)  # many values of the largest magnitude, both signs
    x[64], x[70] = 5.0, -5.0  # +a first: d from +a
    x[96], x[100] = -7.0, 7.0  # -a first: d from -a
    x[128:160] = -1e-30  # subnormal scale
    return x


@pytest.mark.parametrize("scale", [1e-6, 1.0, 3.0, 1e4])
def test_quantize_row_q4_0_writes_ggml_reference_bytes(scale):
    x = awkward_row(np.random.default_rng(int(scale * 7) % 1000), scale)
    ours = np.frombuffer(_core.quantize_row("q4_0", x), np.uint8)
    ref = quants.quantize(x.reshape(1, -1), Q.Q4_0).reshape(-1)
    assert ours.shape == ref.shape
    assert int((ours != ref).sum()) == 0


@pytest.mark.parametrize("scale", [1e-6, 1.0, 3.0, 1e4])
def test_quantize_row_q8_0_is_ggml_cpu_quantizer(scale):
    """Q8_0 goes through ggml's CPU quantizer (the one llama.cpp quantizes activations with): the
    reference's scales, and quants that differ only where x / d lies on .5 (round half to even
    against the reference's roundf), by one step."""
    x = awkward_row(np.random.default_rng(int(scale * 7) % 1000), scale)
    ours = np.frombuffer(_core.quantize_row("q8_0", x), np.uint8).reshape(-1, 34)
    ref = quants.quantize(x.reshape(1, -1), Q.Q8_0).reshape(-1, 34)
    assert np.array_equal(ours[:, :2], ref[:, :2])  # f16 scales
    q_ours, q_ref = ours[:, 2:].view(np.int8).astype(int), ref[:, 2:].view(np.int8).astype(int)
    assert np.abs(q_ours - q_ref).max() <= 1
    assert (q_ours != q_ref).mean() < 1e-4


@pytest.mark.parametrize("name", sorted(TYPES))
def test_dequantize_row_gives_ggml_reference_values(name):
    x = awkward_row(np.random.default_rng(3), 2.0)
    row = quants.quantize(x.reshape(1, -1), TYPES[name]).reshape(-1)
    ours = _core.dequantize_row(name, row.tobytes(), x.size)
    ref = quants.dequantize(row.reshape(1, -1), TYPES[name]).reshape(-1).astype(np.float32)
    assert np.array_equal(ours, ref)
    assert np.abs(ours - x).max() < 0.2 * np.abs(x).max()  # and it is the row, roughly


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="multiple of 32"):
        _core.quantize_row("q4_0", np.zeros(33, np.float32))
    with pytest.raises(ValueError, match="unknown ggml type"):
        _core.quantize_row("q9_9", np.zeros(32, np.float32))
    with pytest.raises(ValueError, match="size"):
        _core.dequantize_row("q8_0", b"\0" * 10, 32)

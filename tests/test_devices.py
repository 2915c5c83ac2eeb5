"""tests/devices.py's comparisons, both ways: exact with a bound of 0 (the CPU's), and what they
accept and refuse with a GPU's bound, on synthetic logits."""

import numpy as np
import pytest

import cmx
import cmx.model
from devices import assert_argmax_within, assert_greedy_within, recorded_samples

TOL = 0.02


def logits_with_top(top: int, lead: float, second: int, n_vocab: int = 10) -> np.ndarray:
    """A row whose top token `top` leads token `second` by `lead`, every other token far below."""
    row = np.full(n_vocab, -5.0, np.float32)
    row[top], row[second] = 1.0, 1.0 - lead
    return row


def test_argmax_exact_with_a_bound_of_zero():
    a = np.stack([logits_with_top(1, 0.5, 2), logits_with_top(3, 0.5, 4)])
    assert_argmax_within(a, a.copy(), 0)
    near = a.copy()
    near[1, 4] += 0.5 + 1e-6  # row 1's top token moves by the smallest step: refused
    with pytest.raises(AssertionError, match="rows \\[1\\]"):
        assert_argmax_within(near, a, 0)


def test_argmax_within_a_bound_accepts_a_near_tie_only():
    ref = np.stack([logits_with_top(1, 0.5, 2), logits_with_top(3, 0.03, 4)])
    ours = ref.copy()
    ours[1, 3] -= 0.016  # within TOL of ref, and token 4 now leads: ref's lead 0.03 <= 2 TOL
    ours[1, 4] += 0.016
    assert ours[1].argmax() == 4
    assert_argmax_within(ours, ref, TOL)
    assert_argmax_within(ours[1], ref[1], TOL)  # one row
    far = ref.copy()
    far[0, 2] += 0.6  # row 0: token 2 where ref's top leads it by 0.5 > 2 TOL
    with pytest.raises(AssertionError, match="rows \\[0\\].*leads by \\[0.5"):
        assert_argmax_within(far, ref, TOL)
    with pytest.raises(AssertionError):
        assert_argmax_within(ours[:1], ref, TOL)  # shapes differ


def test_greedy_exact_with_a_bound_of_zero():
    steps = [logits_with_top(t, 0.5, 0) for t in (5, 6, 7)]
    assert_greedy_within([5, 6, 7], [5, 6, 7], steps, 0)
    steps[1][8] = 1.0  # a tie: still refused at 0
    with pytest.raises(AssertionError, match="step 1"):
        assert_greedy_within([5, 8, 7], [5, 6, 7], steps, 0)
    with pytest.raises(AssertionError):
        assert_greedy_within([5, 6], [5, 6, 7], steps, 0)  # one stopped earlier


def test_greedy_within_a_bound_checks_the_first_difference_only():
    steps = [logits_with_top(5, 0.5, 0), logits_with_top(6, 0.03, 8), logits_with_top(7, 0.5, 0)]
    # step 1 is a near tie (6 leads 8 by 0.03 <= 2 TOL): accepted, whatever follows
    assert_greedy_within([5, 8, 1, 2], [5, 6, 7], steps, TOL)
    # the first difference where the reference's token leads by 0.5: refused
    with pytest.raises(AssertionError, match="step 0: token 0 against 5, which leads by 0.5"):
        assert_greedy_within([0, 6, 7], [5, 6, 7], steps, TOL)
    with pytest.raises(AssertionError, match="step 2"):
        assert_greedy_within([5, 6, 0], [5, 6, 7], steps, TOL)
    # equal as far as both go, but one went on: refused (the other's last token was its choice)
    with pytest.raises(AssertionError):
        assert_greedy_within([5, 6], [5, 6, 7], steps, TOL)
    assert_greedy_within([5, 6, 7], [5, 6, 7], steps, TOL)


def test_recorded_samples_sees_every_choice(tiny_model_path):
    m = cmx.Model(tiny_model_path("llama", "f32"), n_ctx=64, n_threads=2)
    with recorded_samples() as steps:
        tokens = list(m.generate([1, 2, 3], max_tokens=5))
    assert 0 < len(steps) <= 5 and [t for _, t in steps][: len(tokens)] == tokens
    assert len(steps) == len(tokens) or m._vocab.is_eog(steps[-1][1])  # an end of generation is recorded
    for logits, token in steps:
        assert logits.shape == (m.info["n_vocab"],) and token == int(np.argmax(logits))
    assert cmx.model.sample.__name__ == "sample"  # put back

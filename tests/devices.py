"""The device of the tests' llama-cpp-python references: the one cmx runs on.

cmx.Model (and cmx._core.Engine) put every layer on the GPU of the ggml that llama-cpp-python
installed when it has one (Metal, CUDA...), else on the CPU, and the image encoder (mtmd) with it
(cmx.Model's device="auto"). A reference compared with cmx runs on the same device, so that a
comparison means the same on every backend: llama-cpp-python with every layer offloaded
(n_gpu_layers=-1) and mtmd with use_gpu=True when there is a GPU; everything on the CPU otherwise.
(n_gpu_layers=0 is no CPU reference on a GPU build: ggml's scheduler still sends the matrix
products of large batches to the GPU.)

On the CPU the tests keep their bounds and exact comparisons; on a GPU each bound is the measured
GPU value with about 2x room (`bound`, the measurement cited beside each use), and an exact
comparison becomes what that bound makes sound (`assert_argmax_within`, `assert_greedy_within`).
"""

import contextlib

import llama_cpp
import numpy as np

GPU = bool(llama_cpp.llama_supports_gpu_offload())
N_GPU_LAYERS = -1 if GPU else 0  # llama_cpp.Llama(n_gpu_layers=...) of a reference


def bound(cpu: float, gpu: float) -> float:
    """A comparison's bound on this device.

    On the CPU, ggml computes a row the same way whatever batch it is in, so two graphs that batch
    the same rows differently (cmx and llama.cpp, or cmx pruned and dense) agree to float rounding.
    A GPU backend picks its matrix-product kernels by batch shape, and they round differently: on
    an H200 (CUDA), f32 tiny models, max |logit diff| 0.0090-0.0100 between cmx and llama-cpp-python
    on image prompts and 0.0005-0.0015 between two batchings in cmx (logits of magnitude ~1-3;
    tools/runs/gpu_check/session9/). `gpu` is each such measurement with about 2x headroom."""
    return gpu if GPU else cpu


# ---------------------------------------------------------------------------------------------
# Exact comparisons made sound under a bound. Each takes `tol`, the bound of the logits it rests
# on: 0 on the CPU (`bound(0, gpu)`), where they stay exact comparisons; on a GPU they accept
# exactly what logits within `tol` of each other can change.


def assert_argmax_within(ours: np.ndarray, ref: np.ndarray, tol: float) -> None:
    """The top token of each row of two logit arrays ([n_rows, n_vocab], or one row [n_vocab]).

    tol 0: the same in every row. Otherwise, where |ours - ref| <= tol everywhere, ours can only
    pick another token than ref where that token comes within 2 tol of ref's top one: so where the
    two differ, ref's lead of its top token over ours's must be <= 2 tol (a near tie)."""
    ours, ref = np.atleast_2d(ours), np.atleast_2d(ref)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    a, b = ours.argmax(1), ref.argmax(1)
    differ = np.flatnonzero(a != b)
    if tol == 0:
        assert differ.size == 0, f"rows {differ.tolist()}: top tokens {a[differ].tolist()} against {b[differ].tolist()}"
        return
    lead = ref[differ, b[differ]] - ref[differ, a[differ]]
    far = lead > 2 * tol
    assert not far.any(), (f"rows {differ[far].tolist()}: top tokens {a[differ][far].tolist()} against "
                           f"{b[differ][far].tolist()}, which leads by {lead[far].tolist()} > 2 x {tol}")


def assert_greedy_within(ours, ref, ref_logits, tol: float) -> None:
    """Two greedy token sequences, each with the end-of-generation token it chose when it chose
    one (`recorded_samples`); ref_logits[i] are the logits ref chose ref[i] from.

    tol 0: equal. Otherwise equal up to their first difference, where the two had the same history
    and, their logits within tol, can only have chosen differently at a near tie: ref's lead of its
    token over ours's there must be <= 2 tol. Past it they continue different texts."""
    ours, ref = [int(t) for t in ours], [int(t) for t in ref]
    for i, (o, r) in enumerate(zip(ours, ref)):
        if o == r:
            continue
        assert tol > 0, f"step {i}: token {o} against {r} (tokens {ours} against {ref})"
        lead = float(ref_logits[i][r] - ref_logits[i][o])
        assert lead <= 2 * tol, f"step {i}: token {o} against {r}, which leads by {lead} > 2 x {tol} (tokens {ours} against {ref})"
        return
    assert len(ours) == len(ref), f"tokens {ours} against {ref}"


@contextlib.contextmanager
def recorded_samples():
    """What cmx's decoding loop (chat, generate) samples while in the block: a list that receives
    (logits, token) at each step, the end-of-generation token included when it is chosen."""
    import cmx.model

    steps: list = []
    sample = cmx.model.sample

    def recording(logits, *args, **kwargs):
        token = sample(logits, *args, **kwargs)
        steps.append((np.array(logits, np.float32), int(token)))
        return token

    cmx.model.sample = recording
    try:
        yield steps
    finally:
        cmx.model.sample = sample

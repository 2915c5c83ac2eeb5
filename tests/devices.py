"""The device of the tests' llama-cpp-python references: the one cmx runs on.

cmx.Model (and cmx._core.Engine) put every layer on the GPU of the ggml that llama-cpp-python
installed when it has one (Metal, CUDA...), else on the CPU, and the image encoder (mtmd) with it
(cmx.Model's device="auto"). A reference compared with cmx runs on the same device, so that a
comparison means the same on every backend: llama-cpp-python with every layer offloaded
(n_gpu_layers=-1) and mtmd with use_gpu=True when there is a GPU; everything on the CPU otherwise.
(n_gpu_layers=0 is no CPU reference on a GPU build: ggml's scheduler still sends the matrix
products of large batches to the GPU.)
"""

import llama_cpp

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

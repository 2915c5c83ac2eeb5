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

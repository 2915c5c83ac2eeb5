"""Loads llama.cpp's shared libraries before cmx._core.

cmx._core links ggml by soname and finds it next to llama_cpp (rpath). Importing llama_cpp first
makes the dynamic loader reuse the ggml llama_cpp already loaded, so a process holds one ggml
whatever the import order of the user's code.
"""

import llama_cpp  # noqa: F401
import llama_cpp.llama_cpp  # noqa: F401  (the ctypes module that dlopens libllama/libggml)

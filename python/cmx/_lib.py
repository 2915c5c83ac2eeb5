"""Loads llama.cpp's shared libraries before cmx._core, and routes their logs.

cmx._core links ggml by soname and finds it next to llama_cpp (rpath). Importing llama_cpp first
makes the dynamic loader reuse the ggml llama_cpp already loaded, so a process holds one ggml
whatever the import order of the user's code.

llama.cpp and mtmd log a lot to stderr; their messages go to the Python logger "cmx.llama"
instead, which shows errors only unless CMX_VERBOSE=1 is set (or the logger's level is lowered).
"""

import ctypes
import logging
import os
import sys

import llama_cpp
import llama_cpp.llama_cpp  # noqa: F401  (the ctypes module that dlopens libllama/libggml)
from llama_cpp import mtmd_cpp

logger = logging.getLogger("cmx.llama")
logger.setLevel(logging.DEBUG if os.environ.get("CMX_VERBOSE") else logging.ERROR)

_LEVELS = {0: logging.CRITICAL, 1: logging.INFO, 2: logging.WARNING, 3: logging.ERROR, 4: logging.DEBUG}
_last_level = logging.INFO


@llama_cpp.llama_log_callback
def _log_callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    global _last_level
    lvl = _last_level if level == 5 else _LEVELS.get(level, logging.INFO)  # 5: continuation
    _last_level = lvl
    if logger.isEnabledFor(lvl):
        sys.stderr.write(text.decode("utf-8", errors="replace"))


def route_logs() -> None:
    """(Re)install the callback: llama_cpp.Llama() installs its own on every construction."""
    llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
    mtmd_cpp.mtmd_helper_log_set(_log_callback, ctypes.c_void_p(0))


route_logs()

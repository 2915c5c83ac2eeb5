"""Loads llama.cpp's shared libraries before cmx._core, and routes their logs.

cmx._core links ggml by soname and finds it next to llama_cpp (rpath). Importing llama_cpp first
makes the dynamic loader reuse the ggml llama_cpp already loaded, so a process holds one ggml
whatever the import order of the user's code.

llama.cpp and mtmd log a lot to stderr; their messages go to the Python logger "cmx.llama"
instead, which is silent unless CMX_VERBOSE=1 is set (or the logger's level is lowered): every
failure cmx cares about reaches the caller as a Python exception with its own message.
"""

import ctypes
import logging
import os
import sys

import llama_cpp
import llama_cpp.llama_cpp  # noqa: F401  (the ctypes module that dlopens libllama/libggml)
from llama_cpp import mtmd_cpp

logger = logging.getLogger("cmx.llama")
logger.setLevel(logging.DEBUG if os.environ.get("CMX_VERBOSE") else logging.CRITICAL + 1)

_LEVELS = {0: logging.CRITICAL, 1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}  # enum ggml_log_level
_last_level = logging.INFO
_c_callback = None  # cmx._core's C callback, as a ctypes function pointer (kept alive here)


@llama_cpp.llama_log_callback
def _log_callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    global _last_level
    lvl = _last_level if level == 5 else _LEVELS.get(level, logging.INFO)  # 5: continuation
    _last_level = lvl
    if logger.isEnabledFor(lvl):
        sys.stderr.write(text.decode("utf-8", errors="replace"))


def route_logs() -> None:
    """(Re)install the log callback of llama.cpp and mtmd. Once cmx._core is loaded it is the C
    one that also filters ggml's own logs (cmx._core.set_ggml_log_level), so no Python runs while
    they log: a Ctrl-C arriving in a ctypes callback would be lost. Before that, the Python one.
    (ggml's own logs are routed from C++ only: loading libggml-base through ctypes here could map
    a second copy of it, as the wheel ships the soname links as separate files.)"""
    global _c_callback
    core = sys.modules.get("cmx._core")
    if core is not None and _c_callback is None:
        _c_callback = ctypes.cast(ctypes.c_void_p(core.log_callback_address()), llama_cpp.llama_log_callback)
    cb = _c_callback if core is not None else _log_callback
    llama_cpp.llama_log_set(cb, ctypes.c_void_p(0))
    mtmd_cpp.mtmd_helper_log_set(cb, ctypes.c_void_p(0))


def ggml_log_level() -> int:
    """The lowest ggml_log_level to print, from the logger's level (5: nothing)."""
    for level, lvl in sorted(_LEVELS.items(), key=lambda kv: kv[1]):
        if level and logger.isEnabledFor(lvl):
            return level
    return 5


def llama_load_error(path: str) -> str:
    """Why llama.cpp refuses a model file, in its own words: llama-cpp-python reports only
    "Failed to load model from file", so a vocabulary-only load is repeated with a log callback
    that keeps llama.cpp's error lines (only on that failure path)."""
    lines: list[str] = []
    state = {"error": False}

    @llama_cpp.llama_log_callback
    def keep(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        if level != 5:  # 5: continuation of the previous message
            state["error"] = level == 4  # GGML_LOG_LEVEL_ERROR
        if state["error"]:
            lines.append(text.decode("utf-8", errors="replace"))

    llama_cpp.llama_log_set(keep, ctypes.c_void_p(0))
    try:
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        model = llama_cpp.llama_model_load_from_file(os.fsencode(path), params)
        if model:
            llama_cpp.llama_model_free(model)
    finally:
        route_logs()
    # the first error names the cause; the rest are "failed to load model" from the callers
    first = next((line.strip() for line in "".join(lines).splitlines() if line.strip()), "")
    return first.split("error loading model: ", 1)[-1] or "no reason logged"


route_logs()

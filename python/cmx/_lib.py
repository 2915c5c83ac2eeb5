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
import warnings

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


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def private_cxx_runtime() -> str | None:
    """The file that libllama takes the C++ runtime from when that is not the shared libstdc++:
    a build whose compiler linked libstdc++ statically into llama.cpp's libraries and exported it
    (seen on the H200 machine, whose CUDA build put a copy in each of them). A process then holds
    several runtimes, and which one a library binds to depends on the order the libraries were
    loaded in: there, libllama's tokenizer crashed and mtmd's failed (error 2) in some processes
    and not in others. None on a sound build (and off Linux, where this is not checked)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        addr = ctypes.cast(llama_cpp.llama_cpp._lib.__cxa_allocate_exception, ctypes.c_void_p).value  # dlsym: libllama, then its dependencies
        info = _DlInfo()
        if not addr or not ctypes.CDLL(None).dladdr(ctypes.c_void_p(addr), ctypes.byref(info)) or not info.dli_fname:
            return None
    except (AttributeError, OSError):
        return None
    path = os.fsdecode(info.dli_fname)
    return None if os.path.basename(path).startswith("libstdc++") else path


_private = private_cxx_runtime()
if _private:
    warnings.warn(
        f"llama-cpp-python's libraries carry a C++ runtime of their own ({_private} exports one): "
        "they and the rest of this process may mix runtimes, and llama.cpp's tokenizers then fail or crash "
        "depending on import order. Rebuild llama-cpp-python with "
        'CMAKE_ARGS="... -DCMAKE_SHARED_LINKER_FLAGS=-Wl,--exclude-libs,ALL" (tools/gpu_check.sh does) '
        "or with a compiler that links libstdc++ as a shared library.",
        RuntimeWarning, stacklevel=2)


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

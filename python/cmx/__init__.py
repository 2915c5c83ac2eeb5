"""cmx: fast vision-language models on laptop CPUs (CoreMatching on a ggml decoder)."""

__version__ = "0.1.0"

_ENGINE_NAMES = ("Model", "ModelLoadError", "ModelBusyError", "ImageError", "VisionModelError")
_PURE_NAMES = {"ProfileError": "coreprofile"}

from .kept import draw_kept  # noqa: E402  (pure Python)
from .sparsity import Sparsity  # noqa: E402  (pure Python)


# The engine (cmx.Model) needs the compiled extension; it is imported lazily so that pure-Python
# parts (scene generator, exporter) import without it.
def __getattr__(name):
    if name == "ChatTemplateError":  # a model file's chat template that cannot be used
        from .chat import ChatTemplateError

        return ChatTemplateError
    if name in _PURE_NAMES:  # pure Python, imported on first use
        import importlib

        return getattr(importlib.import_module(f".{_PURE_NAMES[name]}", __name__), name)
    if name in _ENGINE_NAMES:
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module 'cmx' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_ENGINE_NAMES) + list(_PURE_NAMES) + ["ChatTemplateError"])

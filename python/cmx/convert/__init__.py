"""Exporters from Hugging Face checkpoints to GGUF (pure Python: torch, transformers, gguf-py).

Nothing here imports the compiled cmx engine. Names are loaded lazily so that
``python -m cmx.convert.llava`` runs the module once (no runpy double-import warning).
"""

__all__ = ["UnsupportedModelError", "export_llava", "export_lora", "export_mmproj", "export_text_model"]
_LORA = {"export_lora"}


def __getattr__(name):
    if name in _LORA:
        from . import lora

        return getattr(lora, name)
    if name in __all__:
        from . import llava

        return getattr(llava, name)
    raise AttributeError(f"module 'cmx.convert' has no attribute {name!r}")

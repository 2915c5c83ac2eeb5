"""cmx: fast vision-language models on laptop CPUs (CoreMatching on a ggml decoder)."""

__version__ = "0.1.0"

# The engine (cmx.Model) needs the compiled extension; it is imported lazily so that pure-Python
# parts (scene generator, exporter) import without it.
def __getattr__(name):
    if name == "Model":
        from .model import Model

        return Model
    raise AttributeError(f"module 'cmx' has no attribute {name!r}")

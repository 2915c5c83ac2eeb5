import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests import their helpers (tiny_models, ...)

import tiny_models  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    path = tiny_models.smollm2_path()
    assert os.path.exists(path), path
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_models")


@pytest.fixture(scope="session")
def tiny_model_path(tiny_dir):
    """Factory: path of a random-weight GGUF for (arch, ftype), written once per session."""
    cache = {}

    def make(arch: str = "llama", ftype: str = "f32") -> str:
        if (arch, ftype) not in cache:
            cfg = tiny_models.ARCH_CONFIGS[arch]
            path = str(tiny_dir / f"{arch}-{ftype}.gguf")
            if ftype in tiny_models.LLAMA_CPP_FTYPES:
                tiny_models.quantize_with_llama_cpp(make(arch, "f32"), path, ftype)
            else:
                tiny_models.write_tiny_gguf(path, cfg, ftype)
            cache[arch, ftype] = path
        return cache[arch, ftype]

    return make

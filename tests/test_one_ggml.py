"""A process using cmx and llama_cpp holds exactly one ggml, whichever is imported first."""

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import os, sys
    first = sys.argv[2]
    if first == "cmx_core":
        import cmx._core        # the extension alone, before llama_cpp
    import llama_cpp
    import cmx
    m = cmx.Model(sys.argv[1], n_ctx=64)
    ref = llama_cpp.Llama(sys.argv[1], n_ctx=64, verbose=False)
    ref.eval(m.tokenize("hello world"))
    libs = {}
    for line in open("/proc/self/maps"):
        parts = line.split()
        if len(parts) >= 6 and "libggml" in os.path.basename(parts[5]):
            path = parts[5]
            libs.setdefault(os.path.basename(os.path.realpath(path)), set()).add(os.stat(path).st_ino)
    print(sorted((k, len(v)) for k, v in libs.items()))
    """
)


@pytest.mark.parametrize("first", ["cmx_core", "llama_cpp"])
def test_single_ggml_copy(tiny_model_path, first):
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, tiny_model_path("llama", "f32"), first],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    libs = dict(eval(out.stdout.strip().splitlines()[-1]))
    base = [k for k in libs if k.startswith("libggml-base.so")]
    assert len(base) == 1, libs  # one libggml-base file mapped ...
    assert all(n == 1 for n in libs.values()), libs  # ... and each ggml library from one inode


def test_one_cxx_runtime():
    """libllama takes the C++ runtime from the shared libstdc++. A llama-cpp-python build whose
    compiler linked libstdc++ statically into each library and exported it (the H200 machine's CUDA
    build) leaves several runtimes in a process, and which one a library binds to then depends on
    import order: there llama.cpp's tokenizers crashed or failed ("mtmd could not tokenize the
    prompt (error 2)") in some processes only. cmx warns about such a build when it loads."""
    from cmx import _lib

    assert _lib.private_cxx_runtime() is None

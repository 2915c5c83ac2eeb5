"""Export the trained demo vision side (tools/train_vlm.py output) to the packaged mmproj.

    python tools/export_demo.py artifacts/vlm [--out python/cmx/data/cmx-demo-mmproj.gguf]

The file must stay under 16 MB (it ships in the wheel): 2-D weights are Q8_0 except the ViT's MLP
matrices, the largest part of the tower, which are Q5_1. The layout is exported as trained
(Hugging Face LLaVA); see docs/decisions.md for how llama.cpp's mtmd runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from safetensors.torch import load_file
from transformers import CLIPVisionConfig

from cmx.convert.llava import export_mmproj
from cmx.defaults import DEMO_MMPROJ_FILE

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", help="folder with config.json and mmproj.safetensors from tools/train_vlm.py")
    ap.add_argument("--out", default=os.path.join(HERE, "..", "python", "cmx", "data", DEMO_MMPROJ_FILE))
    ap.add_argument("--outtype", default="q8_0")
    ap.add_argument("--ffn-outtype", default="q5_1")
    args = ap.parse_args(argv)

    cfg = json.load(open(os.path.join(args.run_dir, "config.json")))
    state = load_file(os.path.join(args.run_dir, cfg.get("weights", "mmproj.safetensors")))
    known = CLIPVisionConfig().to_dict()
    vision_config = CLIPVisionConfig(**{k: v for k, v in cfg["vision_config"].items() if k in known})
    vision = {k: v.float() for k, v in state.items() if k.startswith("vision_tower.")}
    projector = {k: v.float() for k, v in state.items() if k.startswith("multi_modal_projector.")}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    path = export_mmproj(
        vision_config, vision, projector, args.out,
        vision_feature_layer=cfg["vision_feature_layer"], image_mean=cfg["image_mean"], image_std=cfg["image_std"],
        outtype=args.outtype, ffn_outtype=args.ffn_outtype, name="cmx-demo-vision (SmolLM2-135M-Instruct)",
    )
    size = os.path.getsize(path)
    print(f"{path}: {size / 1e6:.1f} MB")
    return 0 if size <= 16_000_000 else 1


if __name__ == "__main__":
    sys.exit(main())

"""Export a trained demo model (tools/train_vlm.py run folder) to the packaged files:
the mmproj GGUF (vision tower + projector) and, when the run trained one, the LoRA GGUF for
SmolLM2 (llama.cpp's adapter format, cmx.convert.lora).

    python tools/export_demo.py tools/runs/vlm_lora_run2 \\
        [--out python/cmx/data/cmx-demo-mmproj.gguf] [--lora-out python/cmx/data/cmx-demo-lora.gguf]

The run folder holds config.json and the weights (checkpoint.safetensors, or its .partNN pieces,
or mmproj.safetensors for runs of issue 4). Both files ship in the wheel and must stay under
16 MB together: by default 2-D weights of the tower are Q8_0 except its MLP matrices (Q4_1, the
largest part of the tower), and the adapter is Q8_0 (its lora_b matrices, rows of length r = 16,
stay F16 as llama.cpp's converter leaves them). The layout is exported as trained (Hugging Face
LLaVA); see docs/decisions.md for how llama.cpp's mtmd runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "python"))

from transformers import CLIPVisionConfig  # noqa: E402

from cmx.convert.llava import export_mmproj  # noqa: E402
from cmx.convert.lora import export_lora  # noqa: E402

DATA = HERE.parent / "python" / "cmx" / "data"
MAX_BYTES = 16_000_000


def load_run(run_dir: str):
    """(tensors, config) of a run folder; pieces .partNN are concatenated in memory."""
    from safetensors.torch import load, load_file

    d = Path(run_dir)
    cfg = json.loads((d / "config.json").read_text())
    p = d / cfg.get("weights", "mmproj.safetensors")
    if p.exists():
        return load_file(str(p)), cfg
    parts = sorted(d.glob(p.name + ".part*"))
    if not parts:
        raise SystemExit(f"no weights in {d} ({p.name} or {p.name}.partNN)")
    return load(b"".join(q.read_bytes() for q in parts)), cfg


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", help="folder with config.json and the weights from tools/train_vlm.py")
    ap.add_argument("--out", default=str(DATA / "cmx-demo-mmproj.gguf"))
    ap.add_argument("--lora-out", default=str(DATA / "cmx-demo-lora.gguf"))
    ap.add_argument("--outtype", default="q8_0", help="2-D weights of the tower and projector")
    ap.add_argument("--ffn-outtype", default="q4_1", help="the tower's MLP matrices")
    ap.add_argument("--lora-outtype", default="q8_0", choices=["f32", "f16", "bf16", "q8_0"])
    args = ap.parse_args(argv)

    state, cfg = load_run(args.run_dir)
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
    total = os.path.getsize(path)
    print(f"{path}: {total / 1e6:.2f} MB")

    lora = {k: v.float() for k, v in state.items() if ".lora_" in k}
    if lora:
        if not cfg.get("lora"):
            raise SystemExit("the checkpoint holds LoRA tensors but config.json has no 'lora' entry")
        text_config = dict(cfg["llava_config"]["text_config"])
        text_config.setdefault("model_type", "llama")
        lpath = export_lora(text_config, lora, args.lora_out, alpha=float(cfg["lora"]["lora_alpha"]),
                            outtype=args.lora_outtype, name="cmx-demo-lora (SmolLM2-135M-Instruct)")
        size = os.path.getsize(lpath)
        total += size
        print(f"{lpath}: {size / 1e6:.2f} MB (rank {cfg['lora']['r']}, alpha {cfg['lora']['lora_alpha']}, "
              f"{len(lora) // 2} matrices)")
    print(f"together: {total / 1e6:.2f} MB (limit {MAX_BYTES / 1e6:.0f} MB)")
    return 0 if total <= MAX_BYTES else 1


if __name__ == "__main__":
    sys.exit(main())

"""Runs llama.cpp's own converters on the tiny models of tests/vlm_families.py and checks what they
write against our gguf-py writers; writes tests/data/families/*_mmproj_converter.json (what
tests/test_families.py compares with, offline).

    python tools/families_converter_check.py --llama-cpp /path/to/llama.cpp [--write-data] [--out DIR]

--llama-cpp: a llama.cpp checkout (the one llama-cpp-python 0.3.36 vendors:
vendor/llama.cpp of its sdist), run with its own gguf-py, and its converters' requirements
(torch, transformers, sentencepiece). What it does:

* SmolVLM / Idefics3: saves the tiny ``Idefics3ForConditionalGeneration`` (a SmolVLM tokenizer:
  SmolLM2's with SmolVLM's special tokens) with its processor config, runs
  ``convert_hf_to_gguf.py DIR --mmproj --outtype f32`` and ``convert_hf_to_gguf.py DIR --outtype
  f32``, compares the mmproj with ``vlm_families.export_idefics3_mmproj`` (layout and every tensor's
  data) and runs the converter's own pair in cmx against llama-cpp-python (logits of every text
  row, greedy answer, the shared runner's checks).
* LLaVA-1.6: saves the tiny CLIP tower with LLaVA-1.6's anyres config keys and a
  ``llava.projector`` as ``llava_surgery_v2.py`` saves it, runs
  ``tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py -m DIR --llava-projector
  DIR/llava.projector --clip-model-is-vision --use-f32`` (under transformers 5, whose
  CLIPVisionModel lost its ``vision_model`` level, through a small wrapper giving it back), compares
  with ``vlm_families.export_llava16_mmproj``.
* Qwen2.5-VL: saves the tiny ``Qwen2_5_VLForConditionalGeneration`` (SmolLM2's tokenizer with
  Qwen2-VL's vision tokens and chat template) with a Qwen2-VL processor config, runs
  ``convert_hf_to_gguf.py DIR --mmproj --outtype f32`` and ``convert_hf_to_gguf.py DIR --outtype
  f32``, compares the mmproj with ``vlm_families.export_qwen25vl_mmproj`` and the text model with
  ``vlm_families.export_qwen2vl_text`` (layout and data; the text model's record holds its long
  tokenizer arrays as length and SHA-256), and runs the converter's pair through the runner.
* Qwen2-VL: the same with a tiny ``Qwen2VLForConditionalGeneration`` and
  ``vlm_families.export_qwen2vl_mmproj`` (its text model's layout checked, not recorded: it is
  Qwen2.5-VL's).
* Gemma 3: saves the tiny ``Gemma3ForConditionalGeneration`` (the tower's tensors under the
  released checkpoints' ``vision_tower.vision_model.*`` names, which transformers 5 no longer
  writes) with a Gemma 3 tokenizer (SmolLM2's with Gemma 3's special tokens and chat template)
  and its preprocessor config, runs ``convert_hf_to_gguf.py DIR --mmproj --outtype f32`` and
  ``convert_hf_to_gguf.py DIR --outtype f32``, compares both files with
  ``vlm_families.export_gemma3_mmproj`` / ``export_gemma3_text`` (layout and every tensor's data;
  writes tests/data/families/gemma3.json: both layouts, the vocabulary arrays as length and hash)
  and runs the converter's pair through the shared runner's checks.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import llava_tiny as lt  # noqa: E402
import vlm_families as vf  # noqa: E402

# the legacy converter under transformers 5: CLIPVisionModel.from_pretrained gives the model a
# .vision_model level again and the old "vision_model." state-dict prefix
LEGACY_SHIM = """
import runpy, sys, transformers
orig = transformers.CLIPVisionModel.from_pretrained
class Wrap:
    def __init__(self, m): self.vision_model = m
    def state_dict(self): return {"vision_model." + k: v for k, v in self.vision_model.state_dict().items()}
transformers.CLIPVisionModel.from_pretrained = classmethod(lambda cls, *a, **k: Wrap(orig(*a, **k)))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run(cmd: list[str], llama_cpp: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(llama_cpp / "gguf-py")}
    r = subprocess.run(cmd, cwd=llama_cpp, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")


def tensor_diff(a: Path, b: Path) -> float:
    import gguf

    ra, rb = gguf.GGUFReader(str(a)), gguf.GGUFReader(str(b))
    tb = {t.name: t for t in rb.tensors}
    return max(float(np.abs(np.asarray(t.data, np.float64) - np.asarray(tb[t.name].data, np.float64)).max()) for t in ra.tensors)


def compare(name: str, converter_file: Path, ours_file: Path, data: Path | None, kind: str = "mmproj", layout=None) -> bool:
    layout = layout or vf.gguf_layout
    want, got = layout(converter_file), layout(ours_file)
    same = json.loads(json.dumps(want)) == json.loads(json.dumps(got))
    diff = tensor_diff(converter_file, ours_file)
    print(f"{name}: layout (keys, types, values; tensor names, types, shapes; order) equal: {same}; "
          f"max |tensor data diff| {diff}")
    if data is not None:
        path = data / f"{name}_{kind}_converter.json"
        path.write_text(json.dumps(want, separators=(",", ":")) + "\n")
        print(f"  wrote {path.relative_to(ROOT)}")
    return same and diff == 0.0


def smolvlm(llama_cpp: Path, out: Path, data: Path | None) -> bool:
    import torch  # noqa: F401

    tok = vf.smolvlm_tokenizer()
    model = vf.build_tiny_idefics3(len(tok))
    hf = out / "hf_smolvlm"
    model.save_pretrained(hf)
    tok.save_pretrained(hf)
    (hf / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Idefics3ImageProcessor", "do_image_splitting": True,
        "size": {"longest_edge": vf.SMOLVLM_LONGEST_EDGE}, "max_image_size": {"longest_edge": vf.SMOLVLM_TILE},
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    conv_mmproj, conv_text = out / "converter-mmproj-smolvlm.gguf", out / "converter-smolvlm.gguf"
    run([sys.executable, "convert_hf_to_gguf.py", str(hf), "--mmproj", "--outtype", "f32", "--outfile", str(conv_mmproj)], llama_cpp)
    run([sys.executable, "convert_hf_to_gguf.py", str(hf), "--outtype", "f32", "--outfile", str(conv_text)], llama_cpp)
    ours = out / "ours-mmproj-smolvlm.gguf"
    vf.export_idefics3_mmproj(model, ours)
    ok = compare("idefics3", conv_mmproj, ours, data)
    ok &= parity("converter's SmolVLM pair", conv_text, conv_mmproj, out)
    return ok


def gemma3(llama_cpp: Path, out: Path, data: Path | None) -> bool:
    from safetensors.torch import load_file, save_file

    tok = vf.gemma3_tokenizer()
    model = vf.build_tiny_gemma3(tok)
    hf = out / "hf_gemma3"
    model.save_pretrained(hf)
    tok.save_pretrained(hf)
    state = load_file(str(hf / "model.safetensors"))
    state = {("vision_tower.vision_model." + k[len("vision_tower."):] if k.startswith("vision_tower.") else k): v for k, v in state.items()}
    save_file(state, str(hf / "model.safetensors"), metadata={"format": "pt"})
    (hf / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Gemma3ImageProcessor", "image_seq_length": vf.GEMMA3_TOKENS,
        "size": {"height": vf.GEMMA3_IMAGE, "width": vf.GEMMA3_IMAGE}, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    conv_mmproj, conv_text = out / "converter-mmproj-gemma3.gguf", out / "converter-gemma3.gguf"
    run([sys.executable, "convert_hf_to_gguf.py", str(hf), "--mmproj", "--outtype", "f32", "--outfile", str(conv_mmproj)], llama_cpp)
    run([sys.executable, "convert_hf_to_gguf.py", str(hf), "--outtype", "f32", "--outfile", str(conv_text)], llama_cpp)
    ours_mmproj, ours_text = out / "ours-mmproj-gemma3.gguf", out / "ours-gemma3.gguf"
    vf.export_gemma3_mmproj(model, ours_mmproj)
    vf.export_gemma3_text(model, tok, ours_text)
    ok = True
    layouts = {}
    for what, conv, ours in (("mmproj", conv_mmproj, ours_mmproj), ("text", conv_text, ours_text)):
        want, got = vf.gguf_layout(conv, summarize_over=64), vf.gguf_layout(ours, summarize_over=64)
        same = json.loads(json.dumps(want)) == json.loads(json.dumps(got))
        diff = tensor_diff(conv, ours)
        print(f"gemma3 {what}: layout (keys, types, values; tensor names, types, shapes; order) equal: {same}; "
              f"max |tensor data diff| {diff}")
        ok &= same and diff == 0.0
        layouts[what] = want
    if data is not None:
        path = data / "gemma3.json"
        path.write_text(json.dumps(layouts, separators=(",", ":")) + "\n")
        print(f"  wrote {path.relative_to(ROOT)}")
    ok &= parity("converter's Gemma 3 pair", conv_text, conv_mmproj, out, vf.GEMMA3_IMAGES)
    return ok


def parity(name: str, text: Path, mmproj: Path, out: Path, image_sizes=vf.SMOLVLM_IMAGES) -> bool:
    """The shared runner's checks (tests/test_families.py) on a pair."""
    import cmx
    from cmx.images import load_image
    from cmx.vision import mrope_positions, prompt_segments

    images = vf._save_images(out, image_sizes)
    m = cmx.Model(str(text), mmproj=str(mmproj), n_ctx=4096, n_threads=2)
    messages = [{"role": "user", "content": [*({"type": "image_url", "image_url": {"url": p}} for p in images[:2]),
                                             {"type": "text", "text": "Compare the two pictures."}]}]
    prompt_text, _ = m._template.prompt(messages, m.vision.marker)
    ref_logits, ref_answer = vf.llama_cpp_reference(str(text), str(mmproj), prompt_text, images[:2], n_gen=24)
    prompt = m.vision.tokenize(prompt_text, [load_image(p) for p in images[:2]])
    rope_pos = mrope_positions(prompt_segments(prompt.chunks))[0] if m._mrope else None
    rows, embd = [], []
    for c in prompt.chunks:
        if hasattr(c, "tokens"):
            rows += c.tokens
        else:
            rows += [-1] * c.n_tokens
            embd.append(m.vision.encode(c))
    prompt.close()
    ours = m._eval(np.array(rows, np.int32), np.concatenate(embd), 0, all_logits=True, rope_pos=rope_pos)
    text_rows = [i for i, r in enumerate(rows) if r >= 0]
    a, b = ours[text_rows], np.stack([ref_logits[i] for i in text_rows])
    diff = float(np.abs(a - b).max())
    same_answer = m.chat(messages, max_tokens=24) == m.detokenize(ref_answer)
    print(f"{name}: {len(rows)} rows ({len(rows) - len(text_rows)} image rows), argmax agree "
          f"{(a.argmax(1) == b.argmax(1)).mean():.3f}, max |logit diff| {diff:.3g}, greedy answers equal: {same_answer}")
    return diff < 1e-4 and same_answer


def llava16(llama_cpp: Path, out: Path, data: Path | None) -> bool:
    import torch

    tok = lt.load_smollm2_tokenizer()
    model = lt.build_tiny_llava(vocab_size=len(tok), image_size=vf.LLAVA16_SIZE)
    vit = out / "vit16"
    inner = getattr(model, "model", model)
    inner.vision_tower.save_pretrained(vit)
    cfg = json.loads((vit / "config.json").read_text())
    cfg.update(image_grid_pinpoints=vf.LLAVA16_PINPOINTS, image_crop_resolution=224, image_aspect_ratio="anyres",
               image_split_resolution=224, mm_patch_merge_type="spatial_unpad", mm_projector_type="mlp2x_gelu")
    (vit / "config.json").write_text(json.dumps(cfg, indent=1))
    proj = inner.multi_modal_projector
    ours = out / "ours-mmproj-llava16.gguf"
    vf.export_llava16_mmproj(model, ours)
    import gguf

    newline = next(t for t in gguf.GGUFReader(str(ours)).tensors if t.name == "model.image_newline")
    torch.save({"model.mm_projector.0.weight": proj.linear_1.weight.detach(), "model.mm_projector.0.bias": proj.linear_1.bias.detach(),
                "model.mm_projector.2.weight": proj.linear_2.weight.detach(), "model.mm_projector.2.bias": proj.linear_2.bias.detach(),
                "model.image_newline": torch.from_numpy(np.array(newline.data, np.float32))}, vit / "llava.projector")
    shim = out / "legacy_shim.py"
    shim.write_text(LEGACY_SHIM)
    run([sys.executable, str(shim), "tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py", "-m", str(vit),
         "--llava-projector", str(vit / "llava.projector"), "--output-dir", str(out / "vit16out"), "--clip-model-is-vision",
         "--use-f32"], llama_cpp)
    return compare("llava16", out / "vit16out" / "mmproj-model-f32.gguf", ours, data)


def qwen25vl(llama_cpp: Path, out: Path, data: Path | None) -> bool:
    tok = vf.qwen_vl_tokenizer()
    model = vf.build_tiny_qwen25vl(tok)
    hf = out / "hf_qwen25vl"
    model.save_pretrained(hf)
    tok.save_pretrained(hf)
    (hf / "preprocessor_config.json").write_text(json.dumps({  # Qwen2.5-VL's, with its own mean/std
        "image_processor_type": "Qwen2VLImageProcessor", "min_pixels": 3136, "max_pixels": 12845056,
        "patch_size": vf.QWEN_VL_PATCH, "temporal_patch_size": 2, "merge_size": vf.QWEN_VL_MERGE,
        "image_mean": list(vf.QWEN_VL_MEAN), "image_std": list(vf.QWEN_VL_STD)}))
    conv_mmproj, conv_text = out / "converter-mmproj-qwen25vl.gguf", out / "converter-qwen25vl.gguf"
    run([sys.executable, "convert_hf_to_gguf.py", str(hf), "--mmproj", "--outtype", "f32", "--outfile", str(conv_mmproj)], llama_cpp)
    run([sys.executable, "convert_hf_to_gguf.py", str(hf), "--outtype", "f32", "--outfile", str(conv_text)], llama_cpp)
    ours_mmproj, ours_text = out / "ours-mmproj-qwen25vl.gguf", out / "ours-qwen25vl.gguf"
    vf.export_qwen25vl_mmproj(model, ours_mmproj)
    vf.export_qwen2vl_text(model, tok, ours_text)
    ok = compare("qwen25vl", conv_mmproj, ours_mmproj, data)
    ok &= compare("qwen2vl", conv_text, ours_text, data, kind="text", layout=vf.text_layout)
    ok &= parity("converter's Qwen2.5-VL pair", conv_text, conv_mmproj, out, vf.QWEN_VL_IMAGES)
    return ok


def qwen2vl(llama_cpp: Path, out: Path, data: Path | None) -> bool:
    tok = vf.qwen_vl_tokenizer()
    model = vf.build_tiny_qwen2vl(tok)
    hf = out / "hf_qwen2vl"
    model.save_pretrained(hf)
    tok.save_pretrained(hf)
    (hf / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Qwen2VLImageProcessor", "min_pixels": 3136, "max_pixels": 12845056,
        "patch_size": vf.QWEN_VL_PATCH, "temporal_patch_size": 2, "merge_size": vf.QWEN_VL_MERGE,
        "image_mean": list(vf.QWEN_VL_MEAN), "image_std": list(vf.QWEN_VL_STD)}))
    conv_mmproj, conv_text = out / "converter-mmproj-qwen2vl.gguf", out / "converter-qwen2vl.gguf"
    run([sys.executable, "convert_hf_to_gguf.py", str(hf), "--mmproj", "--outtype", "f32", "--outfile", str(conv_mmproj)], llama_cpp)
    run([sys.executable, "convert_hf_to_gguf.py", str(hf), "--outtype", "f32", "--outfile", str(conv_text)], llama_cpp)
    ours_mmproj, ours_text = out / "ours-mmproj-qwen2vl.gguf", out / "ours-qwen2vl.gguf"
    vf.export_qwen2vl_mmproj(model, ours_mmproj)
    vf.export_qwen2vl_text(model, tok, ours_text, name="tiny-qwen2-vl")
    ok = compare("qwen2vl", conv_mmproj, ours_mmproj, data)
    ok &= compare("qwen2vl (Qwen2-VL's text model)", conv_text, ours_text, None, kind="text", layout=vf.text_layout)
    ok &= parity("converter's Qwen2-VL pair", conv_text, conv_mmproj, out, vf.QWEN_VL_IMAGES)
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp checkout (llama-cpp-python 0.3.36's vendor/llama.cpp)")
    ap.add_argument("--write-data", action="store_true", help="write tests/data/families/*_mmproj_converter.json")
    ap.add_argument("--out", type=Path, default=None, help="work directory (default: a temporary one)")
    a = ap.parse_args(argv)
    data = ROOT / "tests" / "data" / "families" if a.write_data else None
    with tempfile.TemporaryDirectory() as tmp:
        out = a.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        ok = smolvlm(a.llama_cpp.resolve(), out, data)
        ok &= llava16(a.llama_cpp.resolve(), out, data)
        ok &= qwen25vl(a.llama_cpp.resolve(), out, data)
        ok &= qwen2vl(a.llama_cpp.resolve(), out, data)
        ok &= gemma3(a.llama_cpp.resolve(), out, data)
    print("all equal" if ok else "DIFFERENCES")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

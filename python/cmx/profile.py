"""cmx-profile: learn a model's core-neuron tables once, offline, and store them in its GGUF.

    cmx-profile --gguf text.gguf [--mmproj mmproj.gguf] [--lora adapter.gguf] [--hf model_dir] -o out.gguf
                [--scenes N | --images DIR --questions FILE | --prompts FILE] [--rho R] [--beta B]

The model runs in PyTorch (transformers): from `--hf model_dir` when the original checkpoint is
at hand, else the GGUF itself, dequantized by transformers' GGUF loader (llama and qwen2). A LoRA
adapter in llama.cpp's format (`--lora`) is merged into the weights first, so the tables describe
the model cmx will run. Image prompts get their embeddings from the mmproj through cmx's own
image path (llama.cpp's mtmd), exactly the rows the engine is fed.

Every layer's FFN activation a = act(gate) * up (the input of down_proj) is hooked; per layer the
tool computes with cmx.reference's definitions (docs/corematching.md): the core frequency of each
neuron, the neurons sorted by it, and the threshold tau that reproduces rho. Measured on the
calibration set (rules in docs/decisions.md, "Offline profiles"): the pruning layer K, the
kept-fraction bounds, and the prompt length below which the stored table beats the prompt's own
estimate. The output is a new GGUF (coreprofile.write_profiled_gguf).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from . import reference
from .coreprofile import CoreProfile, ProfileError, write_profiled_gguf

DEFAULT_SCENES = 48  # calibration prompts of the default set (measured cost: docs/decisions.md)
HELD_OUT = 8  # extra prompts, never used for the tables: threshold accuracy and the short-prompt rule
K_CANDIDATES = (1, 2, 3, 4)
FLOOR_GRID = (0.0, 0.125, 0.25, 0.375, 0.5)
AGREEMENT_TARGET = 0.95  # share of prompts whose first answer token must stay the dense one
K_PROMPTS = 32  # calibration prompts that measure K and the bounds
WINDOWS = (2, 4, 8, 16, 32, 64, 128)  # prompt lengths tried by the short-prompt rule
ANSWER_TOKENS = 24  # answer tokens whose core neurons a short prompt should predict
TAU_ROWS_PER_PROMPT = 48  # token rows per prompt kept for fitting tau


class CliError(Exception):
    """A bad command line or input: printed as one line, exit status 2."""


# ---------------------------------------------------------------------------------------------
# The model in PyTorch


def _unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of the llama converter's Q/K row permutation (adjacent pairs -> rotate-half halves)."""
    rows = w.shape[0]
    head_dim = rows // n_head
    w = w.reshape(n_head, head_dim // 2, 2, *w.shape[1:])
    return np.ascontiguousarray(np.swapaxes(w, 1, 2).reshape(rows, *w.shape[3:]))


_LORA_MODULES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                 "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                 "ffn_down": "mlp.down_proj"}


def merge_lora(model, lora_path: str, scale: float = 1.0) -> int:
    """Adds a llama.cpp LoRA adapter (W += scale * alpha / r * B A) to a transformers model;
    returns how many matrices it changed. The GGUF's lora_b rows of q and k are in llama.cpp's
    rotary order (llama arch): they are brought back to Hugging Face's first."""
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(lora_path, "r")
    alpha_field = reader.fields.get("adapter.lora.alpha")
    alpha = float(alpha_field.contents()) if alpha_field is not None else 0.0
    tensors = {t.name: t for t in reader.tensors}
    cfg = model.config
    layers = model.model.layers
    n = 0
    for name, t in tensors.items():
        if not name.endswith(".weight.lora_a"):
            continue
        base = name[: -len(".weight.lora_a")]
        parts = base.split(".")
        if len(parts) != 3 or parts[0] != "blk" or parts[2] not in _LORA_MODULES or base + ".weight.lora_b" not in tensors:
            raise CliError(f"{lora_path}: unsupported adapter tensor {name}")
        il = int(parts[1])
        if il >= len(layers):
            raise CliError(f"{lora_path}: adapter for layer {il}, the model has {len(layers)}")

        def matrix(tt):
            shape = [int(x) for x in reversed(tt.shape)]
            return dequantize(tt.data, tt.tensor_type).astype(np.float32).reshape(shape)

        a, b = matrix(t), matrix(tensors[base + ".weight.lora_b"])  # (r, n_in), (n_out, r)
        r = a.shape[0]
        if cfg.model_type == "llama" and parts[2] in ("attn_q", "attn_k"):
            b = _unpermute_rotary(b, cfg.num_attention_heads if parts[2] == "attn_q" else cfg.num_key_value_heads)
        module = functools.reduce(getattr, _LORA_MODULES[parts[2]].split("."), layers[il])
        delta = (scale * (alpha / r if alpha else 1.0)) * (b @ a)
        if tuple(delta.shape) != tuple(module.weight.shape):
            raise CliError(f"{lora_path}: {base} has shape {delta.shape}, the model's is {tuple(module.weight.shape)}")
        with torch.no_grad():
            module.weight += torch.from_numpy(delta).to(module.weight.dtype)
        n += 1
    if n == 0:
        raise CliError(f"{lora_path} holds no LoRA tensors")
    return n


def load_model(gguf_path: str | None = None, hf_dir: str | None = None, lora: str | None = None):
    """A float32 transformers causal LM (eval mode): from hf_dir, else the GGUF dequantized."""
    import torch
    import transformers

    if hf_dir:
        if not os.path.isdir(hf_dir):
            raise CliError(f"--hf {hf_dir}: not a directory")
        model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="sdpa")
    else:
        import gguf
        from transformers.initialization import no_init_weights
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
        from unittest import mock

        folder, name = os.path.split(os.path.abspath(gguf_path))
        try:
            cfg = transformers.AutoConfig.from_pretrained(folder, gguf_file=name)
        except (ValueError, KeyError) as e:
            raise CliError(f"transformers cannot load {name} ({e}); pass the original checkpoint with --hf DIR") from e
        if cfg.model_type not in ("llama", "qwen2"):
            raise CliError(f"{name}: architecture {cfg.model_type!r}: cmx profiles llama and qwen2 models")
        cfg._attn_implementation = "sdpa"
        with no_init_weights():
            model = transformers.AutoModelForCausalLM.from_config(cfg)
        # gguf's tensor-name map is rebuilt per submodule without the cache (~15 s on SmolLM2)
        with mock.patch.object(gguf, "get_tensor_name_map", functools.lru_cache(gguf.get_tensor_name_map)):
            tensors = load_gguf_checkpoint(os.path.join(folder, name), return_tensors=True, model_to_load=model)["tensors"]
        missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
        if unexpected or set(missing) - {"lm_head.weight"}:
            raise CliError(f"{name}: tensors transformers did not place: missing {missing}, unexpected {unexpected}")
        model.tie_weights()
    if model.config.model_type not in ("llama", "qwen2"):
        raise CliError(f"architecture {model.config.model_type!r}: cmx profiles llama and qwen2 models")
    model = model.float().eval()
    if lora:
        merge_lora(model, lora)
    return model


# ---------------------------------------------------------------------------------------------
# Calibration prompts


@dataclass
class Prompt:
    """One calibration prompt as the engine sees it: rows (token id, or -1 for an image row), the
    image rows' embeddings, each image's (first row, n_rows), and the anchor row."""

    rows: np.ndarray
    image_embd: np.ndarray | None
    image_spans: list = field(default_factory=list)
    anchor_row: int = -1


class PromptBuilder:
    """Chat prompts through cmx's own template, tokenizer and image path (a dense cmx.Model)."""

    def __init__(self, gguf_path: str, mmproj: str | None):
        from .model import Model

        self.model = Model(gguf_path, mmproj=mmproj, n_ctx=4096)

    def build(self, question: str, image=None) -> Prompt:
        from .chat import load_images
        from .vision import ImageChunk

        m = self.model
        content = question if image is None else [{"type": "image", "image": image}, {"type": "text", "text": question}]
        messages = [{"role": "user", "content": content}]
        text, sources = m._template.prompt(messages, m.vision.marker if m.vision else None)
        anchor_offset = m._anchor_offset(messages)
        if not sources:
            rows = np.asarray(m.tokenize(text, add_special=True), np.int64)
            return Prompt(rows, None, [], len(rows) - anchor_offset)
        prompt = m.vision.tokenize(text, load_images(sources))
        try:
            rows, embd, spans = [], [], []
            for chunk in prompt.chunks:
                if isinstance(chunk, ImageChunk):
                    spans.append((len(rows), chunk.n_tokens))
                    rows.extend([-1] * chunk.n_tokens)
                    embd.append(m.vision.encode(chunk))
                else:
                    rows.extend(chunk.tokens)
        finally:
            prompt.close()
        return Prompt(np.asarray(rows, np.int64), np.concatenate(embd).astype(np.float32), spans, len(rows) - anchor_offset)


def scene_questions(n: int, start: int = 0) -> list:
    """(PIL image, question) of n synthetic scenes of the validation split (the split the runtime's
    defaults were chosen on; the demo model trained on the training split and the benchmark asks
    the test split), question types in turn."""
    from . import scenes

    return [(scene.image, q) for scene, q, _, _ in
            (scenes.make_example_full(seed) for seed in scenes.split_seeds("val", n, start))]


def folder_questions(images_dir: str, questions_file: str) -> list:
    """Every image of the folder (sorted by name), image i asked question i modulo the questions."""
    from PIL import Image

    if not os.path.isdir(images_dir):
        raise CliError(f"--images {images_dir}: not a directory")
    questions = _lines(questions_file, "--questions")
    names = sorted(n for n in os.listdir(images_dir) if n.lower().endswith((".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")))
    if not names:
        raise CliError(f"--images {images_dir}: no images (png, jpg, webp, gif, bmp)")
    out = []
    for i, name in enumerate(names):
        with Image.open(os.path.join(images_dir, name)) as im:
            out.append((im.convert("RGB"), questions[i % len(questions)]))
    return out


def _lines(path: str, option: str) -> list[str]:
    if not os.path.isfile(path):
        raise CliError(f"{option} {path}: no such file")
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    if not lines:
        raise CliError(f"{option} {path}: empty")
    return lines


# ---------------------------------------------------------------------------------------------
# Running a prompt


class ActivationRecorder:
    """Forward pre-hooks on every mlp.down_proj: layer il's FFN activations of the last forward,
    float32 [rows, n_ff] (the same hook point as cmx.reference)."""

    def __init__(self, model):
        self.acts: list = [None] * len(model.model.layers)
        self._handles = [layer.mlp.down_proj.register_forward_pre_hook(self._hook(il))
                         for il, layer in enumerate(model.model.layers)]

    def _hook(self, il):
        def hook(module, args):
            self.acts[il] = args[0][0].detach().float().cpu().numpy().copy()

        return hook

    def close(self):
        for h in self._handles:
            h.remove()


def prompt_embeddings(model, p: Prompt):
    """inputs_embeds [1, T, n_embd]: token rows from the model's embedding table, image rows as given."""
    import torch

    device = model.get_input_embeddings().weight.device
    ids = torch.as_tensor(np.where(p.rows >= 0, p.rows, 0), device=device)
    with torch.no_grad():
        x = model.get_input_embeddings()(ids).float()
    if p.image_embd is not None:
        x[torch.as_tensor(p.rows < 0, device=device)] = torch.from_numpy(p.image_embd).to(device)
    return x[None]


def dense_forward(model, recorder: ActivationRecorder, p: Prompt) -> np.ndarray:
    """Last-row logits of the dense model; the recorder then holds every layer's activations."""
    import torch

    with torch.no_grad():
        out = model(inputs_embeds=prompt_embeddings(model, p), use_cache=False, logits_to_keep=1)
    return out.logits[0, -1].float().cpu().numpy()


# ---------------------------------------------------------------------------------------------
# Statistics


def fit_tau(values: np.ndarray, n_strong: int) -> float:
    """The threshold at which exactly n_strong of `values` are strictly greater: halfway between
    the n_strong-th and the (n_strong+1)-th largest."""
    v = np.asarray(values, np.float64).reshape(-1)
    if n_strong <= 0:
        return float(v.max()) + 1.0
    if n_strong >= v.size:
        return float(v.min()) - 1.0
    top = -np.partition(-v, [n_strong - 1, n_strong])[[n_strong - 1, n_strong]]
    return float((top[0] + top[1]) / 2)


def threshold_core_neurons(acts, tau: float, rho: float, beta: float, block: int = 1) -> np.ndarray:
    """C^beta in threshold mode, as the engine computes it: a token's core neurons are those with
    a > tau, at most floor(rho * n_ff) of them (the largest, equal values lower index first: the
    engine's slots per token); then the same count rounding and tie order as
    reference.core_neurons. No per-token sort unless a token overflows its slots."""
    a = np.asarray(acts)
    strong = a > tau
    kmax = math.floor(rho * a.shape[1])
    over = strong.sum(axis=1) > kmax
    if over.any():
        strong[over] = reference.token_core_mask(a[over], kmax)
    f = strong.sum(axis=0, dtype=np.int64)
    by_frequency = np.argsort(-f, kind="stable")
    return np.sort(by_frequency[: reference.core_count(a.shape[1], beta, block)]).astype(np.int32)


def _overlap(a, b) -> float:
    return len(np.intersect1d(a, b)) / max(1, len(b))


class Accumulator:
    """What the calibration pass keeps per layer: each neuron's C_rho count, and for fitting tau
    a sample of token rows (their largest activations) with the C_rho size k of their prompt."""

    def __init__(self, n_layer: int, n_ff: int, rho: float):
        self.n_layer, self.n_ff, self.rho = n_layer, n_ff, rho
        self.count = np.zeros((n_layer, n_ff), np.int64)  # tokens whose C_rho holds the neuron
        self.tau_values: list = [[] for _ in range(n_layer)]  # sampled rows' largest activations
        self.tau_strong = np.zeros(n_layer, np.int64)  # sum over the sampled rows of their prompt's k
        self.n_tokens = 0
        # a token's strong neurons lie among its largest activations: keep 2x the most C_rho holds
        self.keep_top = min(n_ff, 2 * max(1, math.floor(rho * n_ff)))

    def add(self, acts: list, rng: np.random.Generator) -> None:
        T = acts[0].shape[0]
        sample = np.sort(rng.choice(T, size=min(T, TAU_ROWS_PER_PROMPT), replace=False))
        for il, a in enumerate(acts):
            k = reference.token_core_count(a, self.rho)
            self.count[il] += reference.token_core_mask(a, k).sum(axis=0)
            rows = a[sample]
            self.tau_values[il].append(-np.partition(-rows, self.keep_top - 1, axis=1)[:, : self.keep_top].astype(np.float32))
            self.tau_strong[il] += k * len(sample)
        self.n_tokens += T

    def tables(self):
        frequency = (self.count / max(1, self.n_tokens)).astype(np.float32)
        order = np.stack([np.argsort(-c, kind="stable") for c in self.count]).astype(np.int32)
        tau = np.array([fit_tau(np.concatenate(v), int(s)) for v, s in zip(self.tau_values, self.tau_strong)], np.float32)
        return frequency, order, tau


def measure_thresholds(acts: list, tau: np.ndarray, rho: float, beta: float, layers) -> dict:
    """Held-out prompt: per layer, strong neurons per token under tau against C_rho's k, and the
    C^beta of threshold mode against the sorting one (share of the sorted set kept)."""
    ratio, agree = [], []
    for il in layers:
        a = acts[il]
        k = reference.token_core_count(a, rho)
        ratio.append(float((a > tau[il]).sum(axis=1).mean() / max(k, 1)))
        agree.append(_overlap(threshold_core_neurons(a, float(tau[il]), rho, beta), reference.core_neurons(a, rho, beta)))
    return {"count_ratio": ratio, "core_agreement": agree}


def measure_short_prompt(model, recorder: ActivationRecorder, p: Prompt, order: np.ndarray, rho: float, beta: float,
                         layers) -> dict:
    """A text-only prompt's core neurons against the stored table's, as predictors of what its
    answer's decode steps use: the model answers greedily (ANSWER_TOKENS tokens), the target is the
    C^beta of the answer tokens' activations, and the prompt estimate is taken from its last n rows
    for each n of WINDOWS (and from all of it). Overlap shares, mean over layers: {n: (own, table)}."""
    import torch

    ids = torch.as_tensor(p.rows, device=model.get_input_embeddings().weight.device)[None]
    with torch.no_grad():
        full = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=ANSWER_TOKENS, do_sample=False,
                              min_new_tokens=ANSWER_TOKENS, pad_token_id=0)
        model(full, use_cache=False, logits_to_keep=1)
    T = len(p.rows)
    n_core = reference.core_count(order.shape[1], beta)
    out = {}
    for n in [w for w in WINDOWS if w <= T]:
        own, table = [], []
        for il in layers:
            a = recorder.acts[il]
            target = reference.core_neurons(a[T:], rho, beta)
            own.append(_overlap(reference.core_neurons(a[T - n : T], rho, beta), target))
            table.append(_overlap(order[il, :n_core], target))
        out[n] = (float(np.mean(own)), float(np.mean(table)))
    return out


def short_prompt_cutoff(windows: dict) -> tuple[int, dict]:
    """The prompt length from which a prompt's own core neurons predict its answer's at least as
    well as the table, on average over the held-out prompts (each n measured on the prompts at
    least n long): the smallest n with own >= table after which own stays ahead. Prompts shorter
    than it use the table; 0: the prompt always wins; past every measured n: twice the longest."""
    means = {n: (float(np.mean([o for o, _ in v])), float(np.mean([t for _, t in v]))) for n, v in sorted(windows.items()) if v}
    cutoff = 0
    for n, (own, table) in means.items():
        if own < table:
            cutoff = None
        elif cutoff is None:
            cutoff = n
    if cutoff is None:
        cutoff = 2 * max(means)
    return cutoff, means


def choose_prune_layer(model, prompts: list, dense_logits: list, n_layer: int, progress) -> tuple[int, float, float, dict]:
    """K, min_keep and max_keep by the rules of docs/decisions.md: K = the candidate whose elbow
    selection (no floor) keeps the dense first answer token most often (ties: the earlier layer);
    min_keep = the smallest floor of FLOOR_GRID reaching AGREEMENT_TARGET at that K (else the
    largest); max_keep = the largest kept fraction the calibration prompts reached with it,
    rounded up to 1/8."""

    def run(K: int, floor: float):
        ref = reference.CoreMatchingReference(model, prune_layer=K, tokens=True, neurons=False, min_keep=floor)
        same, fractions = 0, []
        for p, dense in zip(prompts, dense_logits):
            r = ref.prefill(prompt_embeddings(model, p)[0], p.image_spans, p.anchor_row)
            same += int(np.argmax(r.logits) == np.argmax(dense))
            fractions += [len(k) / n for k, (_, n) in zip(r.kept, p.image_spans)]
            progress(1)
        return same / len(prompts), fractions

    candidates = [K for K in K_CANDIDATES if K <= n_layer - 2]
    by_k = {K: run(K, 0.0) for K in candidates}
    K = max(candidates, key=lambda k: (by_k[k][0], -k))
    by_floor = {0.0: by_k[K]}
    for floor in FLOOR_GRID[1:]:
        if max(v[0] for v in by_floor.values()) >= AGREEMENT_TARGET:
            break
        by_floor[floor] = run(K, floor)
    reached = [f for f in by_floor if by_floor[f][0] >= AGREEMENT_TARGET]
    min_keep = min(reached) if reached else max(by_floor)
    max_keep = min(1.0, max(min_keep, math.ceil(max(by_floor[min_keep][1]) * 8) / 8))
    measures = {"agreement_by_K": {str(k): round(v[0], 4) for k, v in by_k.items()},
                "median_kept_fraction_by_K": {str(k): round(float(np.median(v[1])), 4) for k, v in by_k.items()},
                "agreement_by_floor": {str(f): round(v[0], 4) for f, v in by_floor.items()}}
    return K, min_keep, max_keep, measures


# ---------------------------------------------------------------------------------------------
# The whole run


class _Progress:
    def __init__(self, total: int, desc: str, quiet: bool):
        self.bar = None
        self.total, self.n, self.desc, self.quiet = total, 0, desc, quiet
        if quiet:
            return
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="prompt", file=sys.stderr)
        except ImportError:
            pass

    def __call__(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif not self.quiet and (self.n == self.total or self.n % max(1, self.total // 10) == 0):
            print(f"{self.desc}: {self.n}/{self.total}", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.total = self.n  # the floor search may stop early: the bar ends full
            self.bar.refresh()
            self.bar.close()


@dataclass
class ProfileRun:
    profile: CoreProfile
    summary: dict


def profile_model(model, prompts: list, held_out: list, *, rho: float = 0.2, beta: float = 0.4, kind: str = "scenes",
                  source: str = "", lora: str = "", k_prompts: int = K_PROMPTS, seed: int = 0, quiet: bool = False) -> ProfileRun:
    """The tables of a transformers model over calibration prompts (a list of Prompt). held_out:
    (Prompt, the same question as a text-only Prompt) pairs, never used for the tables, that
    measure the thresholds and the short-prompt rule. Deterministic for a given seed."""
    reference._check_fraction("rho", rho)
    reference._check_fraction("beta", beta)
    if not prompts:
        raise CliError("no calibration prompts")
    t0 = time.perf_counter()
    n_layer = len(model.model.layers)
    n_ff = model.config.intermediate_size
    rng = np.random.default_rng(seed)
    acc = Accumulator(n_layer, n_ff, rho)
    with_images = all(p.image_spans for p in prompts)
    n_k = min(k_prompts, len(prompts)) if with_images else 0
    k_runs = n_k * (len([K for K in K_CANDIDATES if K <= n_layer - 2]) + len(FLOOR_GRID) - 1)
    progress = _Progress(len(prompts) + len(held_out) + k_runs, "cmx-profile", quiet)
    recorder = ActivationRecorder(model)
    dense_logits = []
    try:
        for i, p in enumerate(prompts):
            logits = dense_forward(model, recorder, p)
            if i < n_k:
                dense_logits.append(logits)
            acc.add(recorder.acts, rng)
            progress(1)
        frequency, order, tau = acc.tables()
        sparse_layers = range(1, n_layer - 1)  # the runtime's default sparse layers
        checks, windows = [], {}
        for p, text_p in held_out:
            dense_forward(model, recorder, p)
            checks.append(measure_thresholds(recorder.acts, tau, rho, beta, sparse_layers))
            for n, v in measure_short_prompt(model, recorder, text_p, order, rho, beta, sparse_layers).items():
                windows.setdefault(n, []).append(v)
            progress(1)
    finally:
        recorder.close()
    cutoff, window_means = short_prompt_cutoff(windows) if windows else (0, {})
    t_tables = time.perf_counter() - t0
    if with_images:  # cmx.reference runs on the CPU
        K, min_keep, max_keep, k_measures = choose_prune_layer(model.cpu(), prompts[:n_k], dense_logits, n_layer, progress)
    else:  # nothing to prune in text-only calibration: the runtime's defaults, marked as such
        K, min_keep, max_keep = min(2, n_layer - 2), 0.25, 1.0
        k_measures = {"note": "text-only calibration: K and the bounds are the runtime defaults, not measured"}
    progress.close()

    ratio = np.array([c["count_ratio"] for c in checks]) if checks else np.zeros((0, 0))
    agree = np.array([c["core_agreement"] for c in checks]) if checks else np.zeros((0, 0))
    measures = {
        "threshold_count_ratio_mean": round(float(ratio.mean()), 4) if ratio.size else None,
        "threshold_count_ratio_range": [round(float(ratio.mean(0).min()), 4), round(float(ratio.mean(0).max()), 4)] if ratio.size else None,
        "threshold_core_agreement_mean": round(float(agree.mean()), 4) if agree.size else None,
        "threshold_core_agreement_min_layer": round(float(agree.mean(0).min()), 4) if agree.size else None,
        "held_out_prompts": len(held_out),
        "short_prompt_windows": {str(n): [round(o, 4), round(t, 4)] for n, (o, t) in window_means.items()},
        **k_measures,
    }
    profile = CoreProfile(
        n_layer=n_layer, n_ff=n_ff, rho=float(rho), beta=float(beta), frequency=frequency, neuron_order=order, tau=tau,
        prune_layer=int(K), min_keep=float(min_keep), max_keep=float(max_keep), short_prompt_tokens=int(cutoff),
        source=source, lora=lora, calibration_kind=kind, calibration_prompts=len(prompts), calibration_tokens=acc.n_tokens,
        measures=json.dumps(measures, sort_keys=True),
    ).check()
    summary = {"seconds": round(time.perf_counter() - t0, 1), "seconds_tables": round(t_tables, 1),
               "tokens": acc.n_tokens, "prompts": len(prompts), **measures}
    return ProfileRun(profile, summary)


def _print_summary(run: ProfileRun, out: str, load_s: float, prompt_s: float) -> None:
    p, s = run.profile, run.summary
    print(f"profiled {p.n_layer} layers x {p.n_ff} neurons on {s['prompts']} {p.calibration_kind} prompts "
          f"({s['tokens']} tokens); rho {p.rho}, beta {p.beta}")
    print(f"time: prompts and image embeddings {prompt_s:.1f} s, model load {load_s:.1f} s, tables and their held-out "
          f"checks {s['seconds_tables']:.1f} s, with the K and bounds search {s['seconds']:.1f} s")
    if s.get("threshold_count_ratio_mean") is not None:
        lo, hi = s["threshold_count_ratio_range"]
        print(f"thresholds on {s['held_out_prompts']} held-out prompts: strong neurons per token / C_rho's k = "
              f"{s['threshold_count_ratio_mean']:.3f} (layers {lo:.3f}..{hi:.3f}); core neurons shared with the "
              f"sorting method {s['threshold_core_agreement_mean']:.1%} (worst layer {s['threshold_core_agreement_min_layer']:.1%})")
    print(f"tau per layer: {np.array2string(p.tau, precision=3, max_line_width=100)}")
    if "agreement_by_K" in s:
        print(f"first answer token as dense, elbow without floor, by K: {s['agreement_by_K']}; by floor at K={p.prune_layer}: "
              f"{s['agreement_by_floor']}")
    print(f"short prompts (own core neurons vs the table's, as predictors of the answer's; by prompt length): "
          f"{s['short_prompt_windows']}")
    print(f"recommended: prune_layer K={p.prune_layer}, min_keep={p.min_keep}, max_keep={p.max_keep}; "
          f"prompts under {p.short_prompt_tokens} tokens use the stored core neurons")
    print(f"wrote {out}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="cmx-profile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", required=True, help="the text model GGUF (the file the profile is added to)")
    ap.add_argument("--mmproj", help="its mmproj GGUF (image prompts)")
    ap.add_argument("--lora", help="a LoRA adapter GGUF the model runs with (merged for profiling)")
    ap.add_argument("--hf", metavar="DIR", help="the original Hugging Face checkpoint of the same model (else the GGUF is dequantized)")
    ap.add_argument("-o", "--output", required=True, help="the profiled GGUF to write (never the input)")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--scenes", type=int, default=None, help=f"calibrate on N synthetic scenes (default {DEFAULT_SCENES}; needs --mmproj)")
    src.add_argument("--images", metavar="DIR", help="calibrate on the images of DIR (with --questions)")
    src.add_argument("--prompts", metavar="FILE", help="calibrate on text prompts, one per line")
    ap.add_argument("--questions", metavar="FILE", help="questions for --images, one per line, used in turn")
    ap.add_argument("--held-out", type=int, default=HELD_OUT, help=f"extra prompts measuring the thresholds (default {HELD_OUT})")
    ap.add_argument("--k-prompts", type=int, default=K_PROMPTS,
                    help=f"calibration prompts measuring K and the bounds (default {K_PROMPTS})")
    ap.add_argument("--rho", type=float, default=0.2)
    ap.add_argument("--beta", type=float, default=0.4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-t", "--threads", type=int, default=None, help="torch threads")
    ap.add_argument("--device", default="auto", help="torch device for the tables' pass: auto (a GPU when there is one), "
                    "cpu, cuda, ... (K and the bounds are measured on the CPU)")
    ap.add_argument("-q", "--quiet", action="store_true")
    ap.add_argument("--summary-json", metavar="FILE", help="also write the summary as JSON")
    args = ap.parse_args(argv)
    try:
        run_cli(args)
    except (CliError, ProfileError, FileNotFoundError) as e:
        print(f"cmx-profile: error: {e}", file=sys.stderr)
        return 2
    return 0


def run_cli(args) -> ProfileRun:
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError as e:
        raise CliError(f"cmx-profile runs the model in PyTorch: pip install 'cmx[profile]' ({e})") from e

    for opt in ("gguf", "mmproj", "lora"):
        path = getattr(args, opt)
        if path is not None and not os.path.isfile(path):
            raise CliError(f"--{opt} {path}: no such file")
    out = args.output
    if os.path.abspath(out) == os.path.abspath(args.gguf) or (os.path.exists(out) and os.path.samefile(out, args.gguf)):
        raise CliError(f"-o {out} is the input model: cmx-profile writes a new file and never overwrites its input")
    if not (0 < args.rho <= 1 and 0 < args.beta <= 1):
        raise CliError("--rho and --beta must be in (0, 1]")
    if args.images and not args.questions:
        raise CliError("--images needs --questions FILE")
    if (args.images or args.prompts is None) and not args.mmproj:
        raise CliError("image calibration (the default scenes, or --images) needs --mmproj; text only: --prompts FILE")
    if args.device != "auto":
        try:
            torch.device(args.device)
        except RuntimeError as e:
            raise CliError(f"--device {args.device}: {e}") from e
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

    t0 = time.perf_counter()
    builder = PromptBuilder(args.gguf, args.mmproj if not args.prompts else None)
    n_held = max(0, args.held_out)
    if args.prompts:
        kind, lines = "prompts", _lines(args.prompts, "--prompts")
        items = [(None, q) for q in lines]
        calib, held = (items[:-n_held], items[-n_held:]) if 0 < n_held < len(items) else (items, [])
    elif args.images:
        kind, items = "images", folder_questions(args.images, args.questions)
        calib, held = (items[:-n_held], items[-n_held:]) if 0 < n_held < len(items) else (items, [])
    else:
        kind = "scenes"
        n = DEFAULT_SCENES if args.scenes is None else args.scenes
        if n <= 0:
            raise CliError("--scenes must be positive")
        calib, held = scene_questions(n), scene_questions(n_held, start=n)
    prompts = [builder.build(q, image) for image, q in calib]
    held_prompts = [(builder.build(q, image), builder.build(q)) for image, q in held]
    prompt_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    model = load_model(args.gguf, args.hf, args.lora)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        model = model.to(device)
    except (RuntimeError, AssertionError) as e:
        raise CliError(f"--device {device}: {e}") from e
    if model.config.num_hidden_layers != builder.model.info["n_layer"] or model.config.intermediate_size != builder.model.info["n_ff"]:
        raise CliError("the --hf checkpoint's layers / n_ff differ from the GGUF's: not the same model")
    load_s = time.perf_counter() - t0
    run = profile_model(model, prompts, held_prompts, rho=args.rho, beta=args.beta, kind=kind,
                        source=os.path.basename(args.hf.rstrip("/")) if args.hf else os.path.basename(args.gguf),
                        lora=os.path.basename(args.lora) if args.lora else "", k_prompts=args.k_prompts, seed=args.seed,
                        quiet=args.quiet)
    write_profiled_gguf(args.gguf, out, run.profile)
    run.summary.update(load_seconds=round(load_s, 1), prompt_seconds=round(prompt_s, 1))
    if not args.quiet:
        _print_summary(run, out, load_s, prompt_s)
    if args.summary_json:
        with open(args.summary_json, "w") as f:
            json.dump(run.summary, f, indent=1)
    return run


if __name__ == "__main__":
    sys.exit(main())

"""The user API: cmx.Model, a text or vision-language model on the cmx engine."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Sequence

import numpy as np

from . import _lib  # noqa: F401  (loads llama.cpp's ggml first: one copy per process)
from ._core import Engine, ModelLoadError, set_ggml_log_level
from .coreprofile import ProfileError, read_profile
from .chat import ChatTemplate, EmbeddingCache, common_prefix, load_images, stream_text
from .defaults import default_lora, default_mmproj, default_text_model
from .images import ImageError
from .sampling import check_sampling_params, sample
from . import selection
from .sparsity import Sparsity
from .vision import ImageChunk, VisionEncoder, VisionModelError, mrope_positions, prompt_segments
from .vocab import Vocab

__all__ = ["Model", "ModelLoadError", "ImageError", "VisionModelError", "Sparsity", "ProfileError"]

_MODEL_DEFAULT = object()  # a call's sparsity= when not given: the Model's own setting


def _mrope_grid(rope_pos: np.ndarray | None, segments: list) -> tuple[int, int] | None:
    """An M-RoPE image's token grid (rows, columns), read from its tokens' row and column position
    components (token i sits at row i // columns, column i % columns); None for other models and
    for an image in several chunks."""
    if rope_pos is None or len(segments) != 1:
        return None
    first, count = segments[0]
    rows, cols = rope_pos[first : first + count, 1], rope_pos[first : first + count, 2]
    return int(rows.max() - rows.min()) + 1, int(cols.max() - cols.min()) + 1


def _check_sparsity(sparsity) -> Sparsity | None:
    if sparsity is not None and not isinstance(sparsity, Sparsity):
        raise ValueError(f"sparsity must be a cmx.Sparsity or None (dense), got {type(sparsity).__name__}")
    return sparsity

set_ggml_log_level(_lib.ggml_log_level())
_lib.route_logs()  # llama.cpp's and mtmd's logs through the same C filter


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class ModelBusyError(RuntimeError):
    """A cmx.Model serves one call at a time: another thread's call, or its unfinished stream,
    holds it. Use one Model per thread (they share nothing), or finish / close the stream."""


class _CallGuard:
    """Which thread is using the Model. The engine releases the GIL while it computes, so two
    threads in one Model would interleave their batches in one KV cache; the second one gets a
    ModelBusyError instead. Re-entrant for the owning thread (a new call after an abandoned stream
    works as before)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._holds = 0

    def acquire(self) -> None:
        me = threading.get_ident()
        with self._lock:
            if self._owner is not None and self._owner != me:
                raise ModelBusyError("this cmx.Model is in use by another thread (one call or stream at a time: "
                                     "use one Model per thread, or wait for the other call)")
            self._owner = me
            self._holds += 1

    def release(self) -> None:
        with self._lock:
            self._holds -= 1
            if self._holds == 0:
                self._owner = None


class _GuardedStream:
    """An iterator holding the Model's guard until it is exhausted, fails, is closed or dropped."""

    def __init__(self, it: Iterator, guard: _CallGuard):
        self._it, self._guard, self._held = it, guard, True

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self._it)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._held:
            self._held = False
            close = getattr(self._it, "close", None)
            if close is not None:
                close()
            self._guard.release()

    def __del__(self):
        self.close()


class Model:
    """A llama / qwen2 / qwen2vl / gemma3 GGUF model on the cmx decoder graph, with an optional mmproj for images.

    With no path, the embedded default model: SmolLM2-135M-Instruct and the cmx demo projector.

    >>> m = cmx.Model()
    >>> m.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "scene.png"}},
    ...                                      {"type": "text", "text": "What colour is the star?"}]}])

    lora: a LoRA adapter GGUF (llama.cpp's format) applied with lora_scale; the default model
    brings its own.
    sparsity: CoreMatching settings for every call (a cmx.Sparsity), or None for the dense engine
    (bit-identical to llama.cpp); chat and generate take a per-call sparsity= too. After each call
    `last_stats` says what happened (kept image tokens, core neurons, timings).
    image_min_tokens, image_max_tokens: bounds on the tokens of one image for projectors with
    dynamic resolution (Qwen2-VL / Qwen2.5-VL: mtmd resizes each image to a token grid within them;
    None: the projector's defaults, 8 and 4096); fixed-size projectors ignore them.
    device: "auto" runs the model and the image encoder on the GPU of the ggml that llama-cpp-python
    installed when it has one (Metal, CUDA...), else on the CPU; "cpu" on the CPU; "gpu" on the GPU
    (ModelLoadError without one). `info["device"]` names the one in use.
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        mmproj: str | os.PathLike | None = None,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        n_batch: int = 512,
        sparsity: Sparsity | None = None,
        lora: str | os.PathLike | None = None,
        lora_scale: float = 1.0,
        device: str = "auto",
        image_min_tokens: int | None = None,
        image_max_tokens: int | None = None,
    ):
        if path is None:
            path = default_text_model()
            mmproj = default_mmproj() if mmproj is None else mmproj
            lora = default_lora() if lora is None else lora
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"model file not found: {path}")
        _positive_int("n_ctx", n_ctx)
        _positive_int("n_batch", n_batch)
        if n_threads is not None:
            _positive_int("n_threads", n_threads)
        for name, value in (("image_min_tokens", image_min_tokens), ("image_max_tokens", image_max_tokens)):
            if value is not None:
                _positive_int(name, value)
        if image_min_tokens is not None and image_max_tokens is not None and image_min_tokens > image_max_tokens:
            raise ValueError(f"image_min_tokens ({image_min_tokens}) exceeds image_max_tokens ({image_max_tokens})")
        if device not in ("auto", "cpu", "gpu"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'gpu', got {device!r}")
        self.sparsity = _check_sparsity(sparsity)
        self.path = path
        if lora is not None and not os.path.exists(lora):
            raise FileNotFoundError(f"LoRA adapter not found: {os.fspath(lora)}")
        if isinstance(lora_scale, bool) or not isinstance(lora_scale, (int, float)):
            raise ValueError(f"lora_scale must be a number, got {lora_scale!r}")
        self.lora = os.fspath(lora) if lora is not None else None
        self._engine = Engine(path, n_ctx=n_ctx, n_batch=min(n_batch, n_ctx), n_threads=n_threads or 0,
                              use_gpu=device != "cpu", lora=self.lora or "", lora_scale=float(lora_scale))
        on_gpu = self._engine.info["device"] != "CPU"
        if device == "gpu" and not on_gpu:
            raise ModelLoadError("device='gpu' but the ggml that llama-cpp-python installed has no GPU backend")
        # a cmx-profile profile in the file: checked against the weights before any call uses it
        self.profile = read_profile(path, self._engine.info["n_layer"], self._engine.info["n_ff"])
        self._vocab = Vocab(path)
        if self._vocab.n_vocab != self._engine.info["n_vocab"]:
            raise ModelLoadError(
                f"tokenizer has {self._vocab.n_vocab} tokens but the weights have {self._engine.info['n_vocab']}"
            )
        self.mmproj = os.fspath(mmproj) if mmproj is not None else None
        # M-RoPE (qwen2vl): every row has 4 position components, and an image moves the text
        # position on by max(rows, columns) of its grid, not its token count (vision.mrope_positions)
        self._mrope = self._engine.info["rope_sections"] is not None
        self._vision = (
            VisionEncoder(self.mmproj, self._vocab, self.info["n_embd"], self._engine.n_threads, use_gpu=on_gpu,
                          text_mrope=self._mrope, image_min_tokens=image_min_tokens, image_max_tokens=image_max_tokens)
            if self.mmproj else None
        )
        self._template = ChatTemplate(
            self._vocab.chat_template, self._vocab.detokenize([self._vocab.bos]), self._vocab.detokenize([self._vocab.eos])
        )
        self._cached: list = []  # what the KV cache holds: token ids and (image digest, row) pairs
        self._exact = 0  # how many of them a dense-FFN evaluation cached (tokens decoded sparsely are not)
        self._next_pos = 0  # M-RoPE: the text position of the next token (differs from len(_cached) after images)
        self._image_embd = EmbeddingCache()
        self.last_stats: dict = {}
        self._guard = _CallGuard()
        if self.sparsity is not None:
            self.sparsity.resolved(self.info["n_layer"], self.profile)  # fail now, not at the first call

    # ---- metadata
    @property
    def info(self) -> dict:
        """The model's hyperparameters, and under "profile" what its cmx-profile tables hold (None
        without them)."""
        info = dict(self._engine.info)
        p = self.profile
        info["profile"] = None if p is None else {
            "version": p.version, "rho": round(p.rho, 6), "beta": round(p.beta, 6), "prune_layer": p.prune_layer, "min_keep": p.min_keep,
            "max_keep": p.max_keep, "short_prompt_tokens": p.short_prompt_tokens, "source": p.source, "lora": p.lora,
            "calibration": f"{p.calibration_prompts} {p.calibration_kind} prompts, {p.calibration_tokens} tokens",
            "date": p.date, "tau": [round(float(t), 4) for t in p.tau],
        }
        return info

    @property
    def n_ctx(self) -> int:
        return self._engine.n_ctx

    @property
    def n_threads(self) -> int:
        return self._engine.n_threads

    @n_threads.setter
    def n_threads(self, n: int) -> None:
        self._engine.n_threads = _positive_int("n_threads", n)

    @property
    def vision(self) -> VisionEncoder | None:
        return self._vision

    @property
    def image_spans(self) -> list[tuple[int, int]]:
        """(first position, number of tokens) of each run of image tokens in the KV cache, in order:
        one per image, or where text stands between an image's chunks (SmolVLM's tiles), one per
        chunk. CoreMatching prunes the runs of one image together."""
        spans, prev = [], None
        for pos, item in enumerate(self._cached):
            if isinstance(item, tuple):
                if prev is not None and item[0] == prev[0] and item[1] == prev[1] + 1:
                    spans[-1][1] += 1
                else:
                    spans.append([pos, 1])
                prev = item
            else:
                prev = None
        return [tuple(s) for s in spans]

    # ---- text
    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        return self._vocab.tokenize(text, add_special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self._vocab.detokenize(tokens)

    # ---- evaluation
    def reset(self) -> None:
        """Forget the conversation (empties the KV cache; decoding goes dense until a prefill)."""
        self._guard.acquire()
        try:
            self._engine.clear()
            self._engine.set_ffn_neurons([])
            self._cached = []
            self._exact = 0
            self._next_pos = 0
        finally:
            self._guard.release()

    def _resolve_sparsity(self, sparsity) -> Sparsity | None:
        return self.sparsity if sparsity is _MODEL_DEFAULT else _check_sparsity(sparsity)

    def _prefill(self, rows: np.ndarray, embd, start: int, images: list, anchor_row: int, sparsity: Sparsity | None,
                 rope_pos: np.ndarray | None = None) -> np.ndarray:
        """Evaluates rows (token ids, -1 for embedding rows) at positions start.. on top of the
        cache with CoreMatching or dense, records last_stats, and returns the last row's logits.
        rope_pos: M-RoPE models, each row's position components [n, 4] (None: text rows at start..).
        images: per image, its (first row, n_rows) segments among the rows: one, or one per image
        chunk where text stands between its chunks (SmolVLM's tiles). CoreMatching prunes each
        image as one unit, its text rows untouched."""
        n = len(rows)
        sp = sparsity.to_core(self._engine.info["n_layer"], self.profile) if sparsity is not None else None
        t0 = time.perf_counter()
        counts = [sum(c for _, c in segs) for segs in images]
        # the engine's image: (first row, n_rows, ...) or, split by text, (its rows, n_rows, ...)
        where = [segs[0][0] if len(segs) == 1 else [f + j for f, c in segs for j in range(c)] for segs in images]
        # kept tokens chosen here instead of by the engine's scores (and pooling's groups)
        spans = [(w, count, []) for w, count in zip(where, counts)]
        t_select = time.perf_counter()
        if sparsity is not None and sparsity.tokens and sparsity.select in selection.MADE_IN_PYTHON:
            for i, (segs, count) in enumerate(zip(images, counts)):
                e0 = int((rows[: segs[0][0]] < 0).sum())  # the image's first row among the embedding rows
                keep, groups = selection.choose(sparsity.select, embd[e0 : e0 + count], sparsity.budget, sparsity.seed + i,
                                                grid=_mrope_grid(rope_pos, segs))
                spans[i] = (where[i], count, keep) if groups is None else (where[i], count, keep, groups)
        select_ms = (time.perf_counter() - t_select) * 1e3  # selections made here; the engine adds its own
        r = self._engine.prefill(rows, np.arange(start, start + n, dtype=np.int32), np.array([n - 1], np.int32), embd,
                                 images=spans, anchor_row=anchor_row, sparsity=sp, rope_pos=rope_pos)
        self.last_stats.update(
            prefill_ms=(time.perf_counter() - t0) * 1e3,
            n_prompt=n,
            image_tokens=counts,
            kept_image_tokens=[list(k) for k in r["kept"]] or [list(range(count)) for count in counts],
            core_neurons=list(r["core_neurons"]) or [self.info["n_ff"]] * self.info["n_layer"],
            select_ms=select_ms + r["select_ms"], stats_ms=r["stats_ms"], compact_ms=r["compact_ms"],
            profile_tables=sparsity is not None and sparsity.uses_tables(self.profile), table_layers=r["table_layers"],
        )
        return r["logits"][-1]

    def _check_tokens(self, tokens: Sequence[int]) -> np.ndarray:
        arr = np.asarray(list(tokens), dtype=np.int64)
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError("tokens must be a non-empty sequence of token ids")
        if arr.min() < 0 or arr.max() >= self.info["n_vocab"]:
            raise ValueError(f"token ids must lie in [0, {self.info['n_vocab']})")
        if arr.size > self.n_ctx:
            raise ValueError(f"prompt too long: {arr.size} tokens exceed n_ctx={self.n_ctx}")
        return arr.astype(np.int32)

    def _eval(self, tokens: np.ndarray, embd: np.ndarray | None, start: int, all_logits: bool = False,
              rope_pos: np.ndarray | None = None) -> np.ndarray:
        """Evaluates rows (token ids, -1 for embedding rows) at positions start.. on top of the
        cache, one n_batch graph at a time; logits of every row or of the last one. rope_pos:
        M-RoPE models, each row's position components [n, 4] (None: text rows at start..)."""
        step = self._engine.n_batch
        out, e = [], 0
        for b in range(0, len(tokens), step):
            chunk = tokens[b : b + step]
            n_embd_rows = int((chunk < 0).sum())
            rows_embd = embd[e : e + n_embd_rows] if n_embd_rows else None
            e += n_embd_rows
            pos = np.arange(start + b, start + b + len(chunk), dtype=np.int32)
            last = b + step >= len(tokens)
            rows = np.arange(len(chunk), dtype=np.int32) if all_logits else np.array([len(chunk) - 1] if last else [], np.int32)
            out.append(self._engine.decode(chunk, pos, rows, embd=rows_embd,
                                           rope_pos=None if rope_pos is None else rope_pos[b : b + step]))
        return np.concatenate(out, axis=0)

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits of every position of a fresh sequence: float32, shape (len(tokens), n_vocab)."""
        arr = self._check_tokens(tokens)
        self._guard.acquire()
        try:
            self.reset()
            logits = self._eval(arr, None, 0, all_logits=True)
            self._cached = arr.tolist()
            self._exact = len(self._cached)
            self._next_pos = len(self._cached)
            return logits
        finally:
            self._guard.release()

    def generate(
        self,
        prompt: Sequence,
        max_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int = 40,
        top_p: float = 0.95,
        seed: int | None = None,
        sparsity=_MODEL_DEFAULT,
    ) -> Iterator[int]:
        """Token ids continuing a fresh sequence; stops at an end-of-generation token (not yielded),
        at max_tokens, or at n_ctx. Greedy when temperature is 0.

        prompt: token ids, and 2-D float arrays [n, n_embd] of image embeddings where images stand
        (each array is one image for CoreMatching). M-RoPE models (qwen2vl) need each image's token
        grid: an image is then (array, (nx, ny)), its n = nx * ny tokens row by row. The anchor
        score's token is the last one."""
        rows, embd, images, segments = self._prompt_rows(prompt)
        self._check_generation(max_tokens, temperature, top_k, top_p)
        sparsity = self._resolve_sparsity(sparsity)
        self._guard.acquire()  # held by the returned stream until it ends
        try:
            self.reset()
            self.last_stats = {"encode_ms": 0.0}
            rope_pos, next_pos = mrope_positions(segments) if self._mrope else (None, len(rows))
            logits = self._prefill(rows, embd, 0, [[im] for im in images], len(rows) - 1, sparsity, rope_pos)
            self._cached = [int(t) if t >= 0 else ("embd", i) for i, t in enumerate(rows)]
            self._exact = len(self._cached)
            self._next_pos = next_pos
        except BaseException:
            self._guard.release()
            raise
        return _GuardedStream(self._decode_loop(logits, max_tokens, temperature, top_k, top_p, seed), self._guard)

    def _prompt_rows(self, prompt) -> tuple[np.ndarray, np.ndarray | None, list, list]:
        """rows (token ids, -1 for embedding rows), the embeddings, each image's (first row, n),
        and the prompt's mrope_positions segments."""
        if isinstance(prompt, np.ndarray) and prompt.ndim == 1:
            prompt = prompt.tolist()
        if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence) or len(prompt) == 0:
            raise ValueError("the prompt must be a non-empty sequence of token ids and image embedding arrays")
        rows, parts, images, segments = [], [], [], []
        for item in prompt:
            grid = None
            if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], np.ndarray):
                item, grid = item
                if (not isinstance(grid, (tuple, list)) or len(grid) != 2
                        or not all(isinstance(g, (int, np.integer)) and not isinstance(g, bool) and g > 0 for g in grid)):
                    raise ValueError(f"an image's grid must be (nx, ny), two positive integers, got {grid!r}")
            if isinstance(item, np.ndarray) and item.ndim == 2:
                if item.shape[1] != self.info["n_embd"] or item.shape[0] == 0:
                    raise ValueError(f"image embeddings must have shape (n, n_embd={self.info['n_embd']}), got {item.shape}")
                if grid is not None and grid[0] * grid[1] != item.shape[0]:
                    raise ValueError(f"an image's grid {tuple(grid)} holds {grid[0] * grid[1]} tokens, its embeddings {item.shape[0]}")
                if grid is None and self._mrope:
                    raise ValueError("this model places image tokens on a 2-D grid (M-RoPE): give each image as "
                                     "(embeddings, (nx, ny))")
                images.append((len(rows), item.shape[0]))
                rows.extend([-1] * item.shape[0])
                parts.append(np.asarray(item, np.float32))
                segments.append(tuple(grid) if grid is not None else (item.shape[0], 1))
            else:
                rows.append(item)
                if segments and isinstance(segments[-1], int):
                    segments[-1] += 1
                else:
                    segments.append(1)
        token_rows = [t for t in rows if t != -1] or [0]
        self._check_tokens(token_rows)
        if len(rows) > self.n_ctx:
            raise ValueError(f"prompt too long: {len(rows)} tokens exceed n_ctx={self.n_ctx}")
        return np.asarray(rows, np.int32), (np.concatenate(parts) if parts else None), images, segments

    @staticmethod
    def _check_generation(max_tokens, temperature, top_k, top_p) -> None:
        check_sampling_params(temperature, top_k, top_p)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
            raise ValueError(f"max_tokens must be a non-negative integer, got {max_tokens!r}")

    def _decode_loop(self, logits, max_tokens, temperature, top_k, top_p, seed) -> Iterator[int]:
        rng = np.random.default_rng(seed)
        zero = np.zeros(1, np.int32)
        sparse = any(self._engine.ffn_neurons())  # tokens decoded with core neurons are not exact
        stats = self.last_stats
        stats.update(n_decoded=0, n_eval=0, decode_ms=0.0)
        for _ in range(max_tokens):
            token = sample(logits, temperature, top_k, top_p, rng)
            if self._vocab.is_eog(token):
                return
            yield token
            stats["n_decoded"] += 1
            n_past = len(self._cached)
            if n_past >= self.n_ctx:
                return
            t0 = time.perf_counter()
            p = self._next_pos
            rope_pos = np.array([[p, p, p, 0]], np.int32) if self._mrope else None
            logits = self._engine.decode(np.array([token], np.int32), np.array([n_past], np.int32), zero, rope_pos=rope_pos)[0]
            self._next_pos += 1
            stats["decode_ms"] += (time.perf_counter() - t0) * 1e3
            stats["n_eval"] += 1
            self._cached.append(token)
            if not sparse and self._exact == n_past:
                self._exact += 1

    # ---- chat
    def chat(
        self,
        messages: Sequence[dict],
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int = 40,
        top_p: float = 0.95,
        seed: int | None = None,
        stream: bool = False,
        sparsity=_MODEL_DEFAULT,
    ):
        """Answers the conversation `messages` (OpenAI / llama-cpp-python shape) with the model's
        chat template. Returns the answer text, or with stream=True an iterator of text pieces.

        The KV cache is kept between calls: when the next call's messages extend this one's, only
        the new part is evaluated and images already in the cache are not encoded again (nor
        pruned again: an image keeps the tokens CoreMatching chose when it entered the cache)."""
        self._check_generation(max_tokens, temperature, top_k, top_p)
        sparsity = self._resolve_sparsity(sparsity)
        self._guard.acquire()
        try:
            logits = self._prefill_chat(messages, sparsity)
        except BaseException:
            self._guard.release()
            raise
        tokens = self._decode_loop(logits, max_tokens, temperature, top_k, top_p, seed)
        pieces = _GuardedStream(stream_text(tokens, self._vocab.detokenize), self._guard)
        if stream:
            return pieces
        try:
            return "".join(pieces)
        finally:
            pieces.close()

    def _anchor_offset(self, messages: Sequence[dict]) -> int:
        """Tokens from the start of the answer turn's header to the end of the prompt (the anchor
        score's token is the header's first), from the template's own generation prompt."""
        marker = self._vision.marker if self._vision else None
        with_header, _ = self._template.prompt(messages, marker, add_generation_prompt=True)
        without, _ = self._template.prompt(messages, marker, add_generation_prompt=False)
        if with_header.startswith(without) and len(with_header) > len(without):
            return max(1, len(self._vocab.tokenize(with_header[len(without):], add_special=False)))
        return 1

    def _prefill_chat(self, messages, sparsity: Sparsity | None) -> np.ndarray:
        text, sources = self._template.prompt(messages, self._vision.marker if self._vision else None)
        images = load_images(sources)
        self.last_stats = {"encode_ms": 0.0}
        if self._vision:
            prompt = self._vision.tokenize(text, images)
            chunks = prompt.chunks
        else:
            prompt, chunks = None, None
        try:
            if chunks is None:
                items = self._vocab.tokenize(text, add_special=True)
                spans = []
            else:
                # an image's rows are (digest, row among all of its chunks' rows): one item however
                # mtmd splits it (LLaVA-1.6's slices, SmolVLM's tiles)
                items, spans = [], []  # spans: (first item, ImageChunk)
                for c in chunks:
                    if isinstance(c, ImageChunk):
                        spans.append((len(items), c))
                        items.extend((c.image.digest, c.offset + k) for k in range(c.n_tokens))
                    else:
                        items.extend(c.tokens)
            if len(items) >= self.n_ctx:
                raise ValueError(f"prompt too long: {len(items)} tokens (images included) leave no room in n_ctx={self.n_ctx}")

            keep = common_prefix(self._cached[: self._exact], items)
            keep = min(keep, len(items) - 1)  # the last item is evaluated again for its logits
            self._engine.truncate(keep)
            self._cached = self._cached[:keep]
            self._exact = keep

            rows = np.array([t if isinstance(t, int) else -1 for t in items[keep:]], np.int32)
            embd_parts, new_images = [], []
            by_image: dict[int, list] = {}  # the prompt's images in order, each its (first item, chunk)s
            for first, chunk in spans:
                by_image.setdefault(chunk.index, []).append((first, chunk))
            for parts in by_image.values():
                if parts[-1][0] + parts[-1][1].n_tokens <= keep:
                    continue  # already cached
                digest = parts[0][1].image.digest
                embd = self._image_embd.get(digest)
                if embd is None:
                    t0 = time.perf_counter()
                    embd = self._vision.encode_parts([c for _, c in parts])
                    self.last_stats["encode_ms"] += (time.perf_counter() - t0) * 1e3
                    self._image_embd.put(digest, embd)
                for first, chunk in parts:
                    lo, hi = max(first, keep), first + chunk.n_tokens
                    if lo < hi:
                        embd_parts.append(embd[chunk.offset + lo - first : chunk.offset + hi - first])
                if parts[0][0] >= keep:  # a whole new image: CoreMatching prunes it (all its chunks as one)
                    new_images.append([(first - keep, chunk.n_tokens) for first, chunk in parts])
            embd = np.concatenate(embd_parts).astype(np.float32) if embd_parts else None
            anchor_row = max(0, len(items) - self._anchor_offset(messages) - keep)
            rope_pos, next_pos = None, len(items)
            if self._mrope and chunks is not None:  # the whole prompt's positions; the cached prefix has its own already
                rope_pos, next_pos = mrope_positions(prompt_segments(chunks))
                rope_pos = rope_pos[keep:]
            try:
                logits = self._prefill(rows, embd, keep, new_images, anchor_row, sparsity, rope_pos)
            except BaseException:
                self.reset()  # the cache may hold part of the prompt: start clean next time
                raise
            self._cached = list(items)
            self._exact = len(items)
            self._next_pos = next_pos
            return logits
        finally:
            if prompt is not None:
                prompt.close()

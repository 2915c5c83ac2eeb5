"""The user API: cmx.Model, a text or vision-language model on the cmx engine."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np

from . import _lib  # noqa: F401  (loads llama.cpp's ggml first: one copy per process)
from ._core import Engine, ModelLoadError, set_ggml_log_level
from .chat import ChatTemplate, EmbeddingCache, common_prefix, flatten_messages, load_images, stream_text
from .defaults import default_mmproj, default_text_model
from .images import ImageError
from .sampling import check_sampling_params, sample
from .vision import ImageChunk, VisionEncoder, VisionModelError
from .vocab import Vocab

__all__ = ["Model", "ModelLoadError", "ImageError", "VisionModelError"]

set_ggml_log_level(_lib.ggml_log_level())


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class Model:
    """A llama / qwen2 GGUF model on the cmx decoder graph, with an optional mmproj for images.

    With no path, the embedded default model: SmolLM2-135M-Instruct and the cmx demo projector.

    >>> m = cmx.Model()
    >>> m.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "scene.png"}},
    ...                                      {"type": "text", "text": "What colour is the star?"}]}])
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        mmproj: str | os.PathLike | None = None,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        n_batch: int = 512,
    ):
        if path is None:
            path = default_text_model()
            mmproj = default_mmproj() if mmproj is None else mmproj
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"model file not found: {path}")
        _positive_int("n_ctx", n_ctx)
        _positive_int("n_batch", n_batch)
        if n_threads is not None:
            _positive_int("n_threads", n_threads)
        self.path = path
        self._engine = Engine(path, n_ctx=n_ctx, n_batch=min(n_batch, n_ctx), n_threads=n_threads or 0)
        self._vocab = Vocab(path)
        if self._vocab.n_vocab != self._engine.info["n_vocab"]:
            raise ModelLoadError(
                f"tokenizer has {self._vocab.n_vocab} tokens but the weights have {self._engine.info['n_vocab']}"
            )
        self.mmproj = os.fspath(mmproj) if mmproj is not None else None
        self._vision = (
            VisionEncoder(self.mmproj, self._vocab, self.info["n_embd"], self._engine.n_threads) if self.mmproj else None
        )
        self._template = ChatTemplate(
            self._vocab.chat_template, self._vocab.detokenize([self._vocab.bos]), self._vocab.detokenize([self._vocab.eos])
        )
        self._cached: list = []  # what the KV cache holds: token ids and (image digest, row) pairs
        self._image_embd = EmbeddingCache()

    # ---- metadata
    @property
    def info(self) -> dict:
        return self._engine.info

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
        """(first position, number of tokens) of each image in the KV cache, in order: the image
        token ranges CoreMatching prunes."""
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
        """Forget the conversation (empties the KV cache)."""
        self._engine.clear()
        self._cached = []

    def _check_tokens(self, tokens: Sequence[int]) -> np.ndarray:
        arr = np.asarray(list(tokens), dtype=np.int64)
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError("tokens must be a non-empty sequence of token ids")
        if arr.min() < 0 or arr.max() >= self.info["n_vocab"]:
            raise ValueError(f"token ids must lie in [0, {self.info['n_vocab']})")
        if arr.size > self.n_ctx:
            raise ValueError(f"prompt too long: {arr.size} tokens exceed n_ctx={self.n_ctx}")
        return arr.astype(np.int32)

    def _eval(self, tokens: np.ndarray, embd: np.ndarray | None, start: int, all_logits: bool = False) -> np.ndarray:
        """Evaluates rows (token ids, -1 for embedding rows) at positions start.. on top of the
        cache, one n_batch graph at a time; logits of every row or of the last one."""
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
            out.append(self._engine.decode(chunk, pos, rows, embd=rows_embd))
        return np.concatenate(out, axis=0)

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits of every position of a fresh sequence: float32, shape (len(tokens), n_vocab)."""
        arr = self._check_tokens(tokens)
        self.reset()
        logits = self._eval(arr, None, 0, all_logits=True)
        self._cached = arr.tolist()
        return logits

    def generate(
        self,
        tokens: Sequence[int],
        max_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int = 40,
        top_p: float = 0.95,
        seed: int | None = None,
    ) -> Iterator[int]:
        """Token ids continuing a fresh sequence; stops at an end-of-generation token (not yielded),
        at max_tokens, or at n_ctx. Greedy when temperature is 0."""
        arr = self._check_tokens(tokens)
        self._check_generation(max_tokens, temperature, top_k, top_p)
        self.reset()
        logits = self._eval(arr, None, 0)[-1]
        self._cached = arr.tolist()
        return self._decode_loop(logits, max_tokens, temperature, top_k, top_p, seed)

    @staticmethod
    def _check_generation(max_tokens, temperature, top_k, top_p) -> None:
        check_sampling_params(temperature, top_k, top_p)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
            raise ValueError(f"max_tokens must be a non-negative integer, got {max_tokens!r}")

    def _decode_loop(self, logits, max_tokens, temperature, top_k, top_p, seed) -> Iterator[int]:
        rng = np.random.default_rng(seed)
        zero = np.zeros(1, np.int32)
        for _ in range(max_tokens):
            token = sample(logits, temperature, top_k, top_p, rng)
            if self._vocab.is_eog(token):
                return
            yield token
            n_past = len(self._cached)
            if n_past >= self.n_ctx:
                return
            logits = self._engine.decode(np.array([token], np.int32), np.array([n_past], np.int32), zero)[0]
            self._cached.append(token)

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
    ):
        """Answers the conversation `messages` (OpenAI / llama-cpp-python shape) with the model's
        chat template. Returns the answer text, or with stream=True an iterator of text pieces.

        The KV cache is kept between calls: when the next call's messages extend this one's, only
        the new part is evaluated and images already in the cache are not encoded again."""
        self._check_generation(max_tokens, temperature, top_k, top_p)
        logits = self._prefill_chat(messages)
        tokens = self._decode_loop(logits, max_tokens, temperature, top_k, top_p, seed)
        pieces = stream_text(tokens, self._vocab.detokenize)
        return pieces if stream else "".join(pieces)

    def _prefill_chat(self, messages) -> np.ndarray:
        flat, sources = flatten_messages(messages, self._vision.marker if self._vision else None)
        images = load_images(sources)
        text = self._template.render(flat)
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
                items, spans = [], []  # spans: (first item, ImageChunk)
                for c in chunks:
                    if isinstance(c, ImageChunk):
                        spans.append((len(items), c))
                        items.extend((c.image.digest, k) for k in range(c.n_tokens))
                    else:
                        items.extend(c.tokens)
            if len(items) >= self.n_ctx:
                raise ValueError(f"prompt too long: {len(items)} tokens (images included) leave no room in n_ctx={self.n_ctx}")

            keep = common_prefix(self._cached, items)
            keep = min(keep, len(items) - 1)  # the last item is evaluated again for its logits
            self._engine.truncate(keep)
            self._cached = self._cached[:keep]

            rows = np.array([t if isinstance(t, int) else -1 for t in items[keep:]], np.int32)
            embd_parts = []
            for first, chunk in spans:
                lo, hi = max(first, keep), first + chunk.n_tokens
                if lo >= hi:
                    continue  # already cached
                embd = self._image_embd.get(chunk.image.digest)
                if embd is None:
                    embd = self._vision.encode(chunk)
                    self._image_embd.put(chunk.image.digest, embd)
                embd_parts.append(embd[lo - first : hi - first])
            embd = np.concatenate(embd_parts).astype(np.float32) if embd_parts else None
            try:
                logits = self._eval(rows, embd, keep)[-1]
            except BaseException:
                self.reset()  # the cache may hold part of the prompt: start clean next time
                raise
            self._cached = list(items)
            return logits
        finally:
            if prompt is not None:
                prompt.close()

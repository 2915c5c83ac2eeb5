"""The user API: cmx.Model, a text (and later vision) model on the cmx engine."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np

from . import _lib  # noqa: F401  (loads llama.cpp's ggml first: one copy per process)
from ._core import Engine, ModelLoadError
from .sampling import check_sampling_params, sample
from .vocab import Vocab

__all__ = ["Model", "ModelLoadError"]


class Model:
    """A llama / qwen2 GGUF model on the cmx decoder graph.

    >>> m = cmx.Model("SmolLM2-135M-Instruct.Q4_1.gguf")
    >>> tokens = m.tokenize("The capital of France is")
    >>> print(m.detokenize(list(m.generate(tokens, max_tokens=8))))
    """

    def __init__(self, path: str | os.PathLike, n_ctx: int = 4096, n_threads: int | None = None, n_batch: int = 512):
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"model file not found: {path}")
        for name, value in (("n_ctx", n_ctx), ("n_batch", n_batch)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if n_threads is not None and (not isinstance(n_threads, int) or n_threads <= 0):
            raise ValueError(f"n_threads must be a positive integer or None, got {n_threads!r}")
        self.path = path
        self._engine = Engine(path, n_ctx=n_ctx, n_batch=min(n_batch, n_ctx), n_threads=n_threads or 0)
        self._vocab = Vocab(path)
        if self._vocab.n_vocab != self._engine.info["n_vocab"]:
            raise ModelLoadError(
                f"tokenizer has {self._vocab.n_vocab} tokens but the weights have {self._engine.info['n_vocab']}"
            )

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
        if not isinstance(n, int) or n <= 0:
            raise ValueError(f"n_threads must be a positive integer, got {n!r}")
        self._engine.n_threads = n

    # ---- text
    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        return self._vocab.tokenize(text, add_special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self._vocab.detokenize(tokens)

    # ---- evaluation
    def _check_tokens(self, tokens: Sequence[int]) -> np.ndarray:
        arr = np.asarray(list(tokens), dtype=np.int64)
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError("tokens must be a non-empty sequence of token ids")
        if arr.min() < 0 or arr.max() >= self.info["n_vocab"]:
            raise ValueError(f"token ids must lie in [0, {self.info['n_vocab']})")
        if arr.size > self.n_ctx:
            raise ValueError(f"prompt too long: {arr.size} tokens exceed n_ctx={self.n_ctx}")
        return arr.astype(np.int32)

    def _prefill(self, tokens: np.ndarray, start: int = 0, all_logits: bool = False) -> np.ndarray:
        """Evaluates tokens at positions start.. in n_batch chunks; logits of every row or the last."""
        step = self._engine.n_batch
        out = []
        for b in range(0, len(tokens), step):
            chunk = tokens[b : b + step]
            pos = np.arange(start + b, start + b + len(chunk), dtype=np.int32)
            last = b + step >= len(tokens)
            rows = np.arange(len(chunk), dtype=np.int32) if all_logits else np.array([len(chunk) - 1] if last else [], np.int32)
            out.append(self._engine.decode(chunk, pos, rows))
        return np.concatenate(out, axis=0)

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits of every position of a fresh sequence: float32, shape (len(tokens), n_vocab)."""
        arr = self._check_tokens(tokens)
        self._engine.clear()
        return self._prefill(arr, all_logits=True)

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
        check_sampling_params(temperature, top_k, top_p)
        if not isinstance(max_tokens, int) or max_tokens < 0:
            raise ValueError(f"max_tokens must be a non-negative integer, got {max_tokens!r}")
        return self._generate(arr, max_tokens, temperature, top_k, top_p, seed)

    def _generate(self, arr, max_tokens, temperature, top_k, top_p, seed) -> Iterator[int]:
        rng = np.random.default_rng(seed)
        self._engine.clear()
        logits = self._prefill(arr)[-1]
        n_past = len(arr)
        zero = np.zeros(1, np.int32)
        for _ in range(max_tokens):
            token = sample(logits, temperature, top_k, top_p, rng)
            if self._vocab.is_eog(token):
                return
            yield token
            if n_past >= self.n_ctx:
                return
            logits = self._engine.decode(np.array([token], np.int32), np.array([n_past], np.int32), zero)[0]
            n_past += 1

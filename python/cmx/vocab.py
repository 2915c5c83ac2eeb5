"""Tokenizer and chat template, taken from the GGUF through llama-cpp-python (a vocab-only load)."""

from __future__ import annotations

import jinja2
import llama_cpp

from . import _lib
from ._core import ModelLoadError
from .chat import ChatTemplateError


class Vocab:
    """The model file's vocabulary. Owns a vocab-only llama.cpp model (no weights are read)."""

    def __init__(self, path: str):
        try:
            self._llama = llama_cpp.Llama(path, vocab_only=True, verbose=False)
        except jinja2.TemplateError as e:  # llama-cpp-python compiles the file's chat templates
            raise ChatTemplateError(f"{path}: the chat template is not valid Jinja: {e}") from None
        except UnicodeDecodeError as e:  # llama-cpp-python decodes metadata and special tokens strictly
            raise ModelLoadError(f"{path}: a metadata value or special token is not valid UTF-8 ({e})") from None
        except ValueError as e:
            if "Failed to load model" not in str(e):
                raise
            raise ModelLoadError(f"llama.cpp cannot read the vocabulary of {path}: {_lib.llama_load_error(path)}") from None
        _lib.route_logs()
        self._vocab = llama_cpp.llama_model_get_vocab(self._llama.model)
        self.n_vocab = self._llama.n_vocab()
        self.bos = self._llama.token_bos()
        self.eos = self._llama.token_eos()
        self.metadata = dict(self._llama.metadata)

    @property
    def llama_model(self):
        """The llama.cpp model pointer (vocab only), for mtmd."""
        return self._llama.model

    @property
    def chat_template(self) -> str | None:
        return self.metadata.get("tokenizer.chat_template")

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        """Text to token ids; special tokens written in the text (e.g. <|im_start|>) are parsed."""
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        return self._llama.tokenize(text.encode("utf-8"), add_bos=add_special, special=True)

    def detokenize_bytes(self, tokens) -> bytes:
        return self._llama.detokenize(list(tokens))

    def detokenize(self, tokens) -> str:
        return self.detokenize_bytes(tokens).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        """End of generation: EOS, EOT, <|im_end|> and the like, as the vocab marks them."""
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

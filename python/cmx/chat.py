"""Chat: OpenAI-style messages -> the model's own chat template -> cached, incremental prefill.

A Conversation remembers what its KV cache holds, item by item (a token id, or row k of an
image identified by its content hash). A new turn re-renders the whole message list, keeps the
longest common prefix in the cache, and evaluates only the rest; an image already in the cache is
never encoded again (embeddings are also kept by hash for images that must be re-fed).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence

import jinja2
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .images import RGBImage, load_image

# Used when a GGUF has no template: ChatML, what SmolLM2/Qwen2 use.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _image_source(part: dict):
    kind = part.get("type")
    if kind == "image_url":
        url = part.get("image_url")
        return url.get("url") if isinstance(url, dict) else url
    if kind == "image":
        return part.get("image") if "image" in part else part.get("url") or part.get("path")
    return None


def flatten_messages(messages: Sequence[dict], marker: str | None) -> tuple[list[dict], list]:
    """Messages with list content become plain strings (templates expect strings); each image part
    becomes the media marker on its own line. Returns the messages and image sources in order."""
    if isinstance(messages, dict) or not isinstance(messages, Sequence) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    flat, images = [], []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content'")
        content = msg["content"]
        if isinstance(content, str):
            text = content
        elif isinstance(content, list):
            pieces = []
            for part in content:
                if isinstance(part, str):
                    pieces.append(part)
                elif isinstance(part, dict) and part.get("type") == "text":
                    pieces.append(str(part.get("text", "")))
                elif isinstance(part, dict) and _image_source(part) is not None:
                    if marker is None:
                        raise ValueError("this model has no vision projector (pass mmproj=...) but a message holds an image")
                    images.append(_image_source(part))
                    pieces.append(marker)
                else:
                    raise ValueError(f"message {i}: unsupported content part {part!r:.80}")
            text = "\n".join(pieces)
        elif content is None:
            text = ""
        else:
            raise ValueError(f"message {i}: content must be a string or a list of parts")
        flat.append({"role": str(msg["role"]), "content": text})
    return flat, images


class ChatTemplateError(ValueError):
    """The model's chat template (tokenizer.chat_template) does not compile, or failed to render."""


class ChatTemplate:
    def __init__(self, source: str | None, bos: str, eos: str):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        try:
            self._template = env.from_string(source or CHATML)
        except jinja2.TemplateError as e:  # a file's template is data: its errors are the file's
            raise ChatTemplateError(f"the model's chat template is not valid Jinja: {e}") from None
        self._bos, self._eos = bos, eos

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        def raise_exception(message):
            raise ChatTemplateError(f"chat template: {message}")

        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self._bos, eos_token=self._eos, raise_exception=raise_exception,
            )
        except jinja2.TemplateError as e:  # undefined names, sandbox refusals, ...
            raise ChatTemplateError(f"the model's chat template failed: {type(e).__name__}: {e}") from None


class EmbeddingCache:
    """Image embeddings by content hash (a few recent images)."""

    def __init__(self, capacity: int = 8):
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()
        self.capacity = capacity

    def get(self, digest: str):
        if digest in self._items:
            self._items.move_to_end(digest)
            return self._items[digest]
        return None

    def put(self, digest: str, embd: np.ndarray) -> None:
        self._items[digest] = embd
        self._items.move_to_end(digest)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)


def load_images(sources: list) -> list[RGBImage]:
    return [s if isinstance(s, RGBImage) else load_image(s) for s in sources]


def common_prefix(a: Sequence, b: Sequence) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def stream_text(token_iter: Iterator[int], detokenize) -> Iterator[str]:
    """Text pieces as tokens arrive; a piece is held back while it ends inside a UTF-8 sequence."""
    tokens: list[int] = []
    sent = ""
    for tok in token_iter:
        tokens.append(tok)
        text = detokenize(tokens)
        if text.endswith("\ufffd"):
            continue
        if len(text) > len(sent):
            yield text[len(sent):]
        sent = text
    text = detokenize(tokens)
    if len(text) > len(sent):
        yield text[len(sent):]

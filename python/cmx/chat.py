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
import jinja2.ext
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


def _parse_messages(messages: Sequence[dict], has_vision: bool) -> list[tuple[str, str | None | list]]:
    """Checked messages as (role, content): content is a string, None, or a list of ("text", str) and
    ("image", source) parts in order."""
    if isinstance(messages, dict) or not isinstance(messages, Sequence) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content'")
        content = msg["content"]
        if isinstance(content, list):
            parts = []
            for part in content:
                if isinstance(part, str):
                    parts.append(("text", part))
                elif isinstance(part, dict) and part.get("type") == "text":
                    parts.append(("text", str(part.get("text", ""))))
                elif isinstance(part, dict) and _image_source(part) is not None:
                    if not has_vision:
                        raise ValueError("this model has no vision projector (pass mmproj=...) but a message holds an image")
                    parts.append(("image", _image_source(part)))
                else:
                    raise ValueError(f"message {i}: unsupported content part {part!r:.80}")
            content = parts
        elif content is not None and not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a string or a list of parts")
        out.append((str(msg["role"]), content))
    return out


def flatten_messages(messages: Sequence[dict], marker: str | None) -> tuple[list[dict], list]:
    """Messages with list content become plain strings (for templates that expect strings); each
    image part becomes the media marker on its own line. Returns the messages and image sources in
    order."""
    flat, images = [], []
    for role, content in _parse_messages(messages, marker is not None):
        if isinstance(content, list):
            pieces = []
            for kind, value in content:
                if kind == "image":
                    images.append(value)
                    pieces.append(marker)
                else:
                    pieces.append(value)
            content = "\n".join(pieces)
        flat.append({"role": role, "content": content or ""})
    return flat, images


class ChatTemplateError(ValueError):
    """The model's chat template (tokenizer.chat_template) does not compile, or failed to render."""


class _GenerationTag(jinja2.ext.Extension):
    """Hugging Face's `{% generation %}...{% endgeneration %}` (marks the assistant's tokens for
    training): renders its body unchanged, as transformers and llama-cpp-python do."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)  # the tag's name
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


_PROBE_TEXT = "cmx probe 7"  # a text part's words in the probe conversations
_KEEP = "\U000f0000"  # stands in for a placeholder written in the user's own text while the marker goes in


class ChatTemplate:
    """A model file's chat template, and how messages with images reach it.

    Templates written for list content (Hugging Face processors' templates: SmolVLM, Qwen2-VL,
    Gemma 3, llava-hf) get it: every message's content is a list of {"type": "text", "text": ...}
    and {"type": "image"} parts, and whatever the template writes for an image part (its
    `placeholder`: "<image>", "<start_of_image>", "<|vision_start|><|image_pad|><|vision_end|>", ...)
    becomes mtmd's media marker, so the prompt is the one the family was trained on. Other
    templates (SmolLM2's, ChatML, most text models') get strings: flatten_messages. Which kind a
    template is, and its placeholder, is found once by rendering probe conversations (_probe)."""

    def __init__(self, source: str | None, bos: str, eos: str):
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag]
        )
        try:
            self._template = env.from_string(source or CHATML)
        except jinja2.TemplateError as e:  # a file's template is data: its errors are the file's
            raise ChatTemplateError(f"the model's chat template is not valid Jinja: {e}") from None
        self._bos, self._eos = bos, eos
        self.placeholder: str | None = self._probe()  # None: the template gets flattened strings

    @property
    def takes_list_content(self) -> bool:
        return self.placeholder is not None

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The template applied to `messages` as they are."""
        def raise_exception(message):
            raise ChatTemplateError(f"chat template: {message}")

        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self._bos, eos_token=self._eos, raise_exception=raise_exception,
            )
        except jinja2.TemplateError as e:  # undefined names, sandbox refusals, ...
            raise ChatTemplateError(f"the model's chat template failed: {type(e).__name__}: {e}") from None

    def prompt(self, messages: Sequence[dict], marker: str | None, add_generation_prompt: bool = True) -> tuple[str, list]:
        """The prompt text for OpenAI-style `messages`, with one `marker` (mtmd's media marker)
        per image, and the image sources in order. `marker` None: the model takes no images."""
        if self.placeholder is None:
            flat, sources = flatten_messages(messages, marker)
            return self.render(flat, add_generation_prompt), sources
        ph = self.placeholder
        listed, sources = [], []
        for role, content in _parse_messages(messages, marker is not None):
            if not isinstance(content, list):  # a string is one text part (some templates read only lists)
                content = [("text", content or "")]
            parts = []
            for kind, value in content:
                if kind == "image":
                    sources.append(value)
                    parts.append({"type": "image"})
                else:  # the user's own text keeps a placeholder it spells out, as text
                    parts.append({"type": "text", "text": value.replace(ph, _KEEP)})
            listed.append({"role": role, "content": parts})
        text = self.render(listed, add_generation_prompt)
        if text.count(ph) != len(sources):
            raise ValueError(
                f"the chat template wrote {text.count(ph)} image placeholders {ph!r} for {len(sources)} images "
                "(it leaves out the images of some messages, e.g. an assistant's: put images in user messages)"
            )
        if sources:
            text = text.replace(ph, marker)
        return text.replace(_KEEP, ph), sources

    def _probe(self) -> str | None:
        """What the template writes for an image part, or None where list content does not work:
        one user message with 0, 1 and 2 image parts before a text part. The template takes list
        content when all three render, the text appears once in each and no part is printed raw
        (a template concatenating or printing `message['content']` fails or shows "'type'"), and
        the second image adds one more copy of a string the first added (the placeholder, without
        surrounding whitespace: llava-hf's "<image>\\n" gives "<image>", its newline stays text)."""
        def render(n_images: int) -> str:
            content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": _PROBE_TEXT}]
            return self.render([{"role": "user", "content": content}], add_generation_prompt=True)

        try:
            p0, p1, p2 = render(0), render(1), render(2)
        except Exception:  # noqa: BLE001 - a template that fails on lists (str + list, ...) gets strings
            return None
        if any(p.count(_PROBE_TEXT) != 1 for p in (p0, p1, p2)) or any(q in p2 for q in ("'type'", '"type"')):
            return None
        extra = len(p2) - len(p1)
        pre = next((i for i, (a, b) in enumerate(zip(p1, p2)) if a != b), len(p1))
        if extra <= 0 or p2[pre + extra:] != p1[pre:]:
            return None  # images ignored, or the second image changed more than it added
        added = p2[pre : pre + extra]
        for i in range(len(added)):  # the added copy may straddle two placeholders: try its rotations
            ph = (added[i:] + added[:i]).strip()
            if ph and _PROBE_TEXT not in ph and (p0.count(ph), p1.count(ph), p2.count(ph)) == (0, 1, 2):
                return ph
        return None


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

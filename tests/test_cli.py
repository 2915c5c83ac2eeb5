"""cmx-chat: one-shot and REPL modes, errors as one clean line, Ctrl-C stopping an answer."""

import subprocess
import sys
from types import SimpleNamespace

import pytest
from PIL import Image

import llava_tiny as lt


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from cmx.convert.llava import export_llava

    tok = lt.load_smollm2_tokenizer()
    out = tmp_path_factory.mktemp("cli")
    paths = export_llava(lt.build_tiny_llava(vocab_size=len(tok)), out, tokenizer=tok, text_type="f16", mmproj_type="f16")
    Image.fromarray(lt.test_image()).save(out / "scene.png")
    (out / "notes.txt").write_text("hello")
    return SimpleNamespace(text=str(paths["text"]), mmproj=str(paths["mmproj"]), image=str(out / "scene.png"),
                           not_image=str(out / "notes.txt"), dir=out)


def cmx_chat(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "cmx.cli", *args], input=stdin, capture_output=True, text=True, timeout=180)


def test_one_shot(files):
    r = cmx_chat(files.image, "-m", files.text, "--mmproj", files.mmproj, "-p", "What is this?", "-n", "6", "-t", "2")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip()) > 0
    assert r.stderr == ""  # llama.cpp's logs stay quiet


def test_repl(files):
    script = "What is this?\n/image {img}\nAnd this one?\n/clear\n/bogus\nHi\n/quit\n".format(img=files.image)
    r = cmx_chat(files.image, "-m", files.text, "--mmproj", files.mmproj, "-n", "4", "-t", "2", stdin=script)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("> ") >= 5  # a prompt per line read
    assert "[new conversation]" in r.stderr and "unknown command /bogus" in r.stderr
    assert "attached to your next question" in r.stderr


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda f: ["/no/such.png", "-m", f.text, "--mmproj", f.mmproj, "-p", "x"], "image not found"),
        (lambda f: [f.not_image, "-m", f.text, "--mmproj", f.mmproj, "-p", "x"], "not an image"),
        (lambda f: [f.image, "-m", f.text, "--mmproj", f.text, "-p", "x"], "not an mmproj"),
        (lambda f: [f.image, "-m", str(f.dir / "missing.gguf"), "--mmproj", f.mmproj, "-p", "x"], "model file not found"),
        (lambda f: [f.image, "-m", f.not_image, "--mmproj", f.mmproj, "-p", "x"], "not a valid GGUF"),
    ],
)
def test_errors_are_one_line(files, make_args, message):
    r = cmx_chat(*make_args(files))
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cmx-chat: error:") and message in lines[0], r.stderr


def test_invalid_options(files):
    for bad in (["-n", "-1"], ["-c", "0"], ["--temp", "-1"], ["--top-p", "2"], ["-t", "0"]):
        r = cmx_chat(files.image, "-m", files.text, "--mmproj", files.mmproj, "-p", "x", *bad)
        assert r.returncode == 2 and "error:" in r.stderr


def test_ctrl_c_stops_an_answer(capsys):
    from cmx.cli import Session

    class Model:
        def chat(self, messages, **kw):
            yield "Hello"
            raise KeyboardInterrupt

    args = SimpleNamespace(n_predict=8, temp=0.0, top_k=40, top_p=0.95, seed=None, timings=False)
    s = Session(Model(), args)
    assert s.ask("hi", None) == "Hello"
    assert "[stopped]" in capsys.readouterr().out
    assert s.messages[-1] == {"role": "assistant", "content": "Hello"}  # the conversation goes on


def test_failed_question_leaves_the_conversation(capsys):
    """A question the model refuses (prompt too long) is not kept: the next one is asked alone."""
    from cmx.cli import Session

    class Model:
        def chat(self, messages, **kw):
            if len(messages) > 2:
                raise ValueError("prompt too long")
            yield "ok"

    args = SimpleNamespace(n_predict=8, temp=0.0, top_k=40, top_p=0.95, seed=None, timings=False)
    s = Session(Model(), args)
    assert s.ask("first", None) == "ok"
    before = list(s.messages)
    with pytest.raises(ValueError):
        s.ask("second", None)
    assert s.messages == before
    assert capsys.readouterr().out == "ok\n"  # no empty answer line for the refused question


def test_image_token_bounds_are_checked(files):
    r = cmx_chat(files.image, "-m", files.text, "--mmproj", files.mmproj, "-p", "Hi", "--image-max-tokens", "0")
    assert r.returncode != 0 and "image_max_tokens must be a positive integer" in r.stderr
    r = cmx_chat(files.image, "-m", files.text, "--mmproj", files.mmproj, "-p", "Hi", "-n", "2", "-t", "2",
                 "--image-min-tokens", "4", "--image-max-tokens", "64")  # a fixed-size projector: no effect
    assert r.returncode == 0, r.stderr

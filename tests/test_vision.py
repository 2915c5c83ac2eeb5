"""The vision path: images through mtmd into our graph, chat with the model's template, cache
reuse across turns, on a tiny random LLaVA exported by cmx.convert (its parity with
llama-cpp-python: tests/test_families.py)."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

import cmx
import llava_tiny as lt
from cmx.images import ImageError, load_image

QUESTION = "What is in the picture?"


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    from cmx.convert.llava import export_llava

    tok = lt.load_smollm2_tokenizer()
    model = lt.build_tiny_llava(vocab_size=len(tok))
    out = tmp_path_factory.mktemp("tiny_llava")
    paths = export_llava(model, out, tokenizer=tok, text_type="f32", mmproj_type="f32")
    image = lt.test_image()
    Image.fromarray(image).save(out / "image.png")
    return model, str(paths["text"]), str(paths["mmproj"]), str(out / "image.png"), image


@pytest.fixture()
def vlm(tiny_llava):
    _, text, mmproj, _, _ = tiny_llava
    return cmx.Model(text, mmproj=mmproj, n_ctx=2048, n_threads=2)


def user_turn(image_path, question=QUESTION):
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_path}},
                                        {"type": "text", "text": question}]}


def test_image_embeddings_equal_mtmd_and_match_pytorch(tiny_llava, vlm):
    model, text, mmproj, image_path, image = tiny_llava
    ours = vlm.vision.encode_image(load_image(image_path))
    with lt.MtmdEncoder(mmproj, text) as enc:
        theirs = enc.encode(image)
    assert ours.shape == (576, model.config.text_config.hidden_size)
    assert np.array_equal(ours, theirs)
    # PyTorch vision tower + projector, in the token layout this llama.cpp computes (vision.py)
    assert lt.row_cosines(ours, lt.hf_image_features_cls_last(model, image)).min() >= 0.999


# The chat against llama-cpp-python (logits of every text row, greedy answer) is the shared runner of
# tests/test_families.py, one case per family (this LLaVA-1.5 pair is its "llava15" case).


def test_second_turn_reuses_the_cache(tiny_llava, vlm):
    _, _, _, image_path, _ = tiny_llava
    messages = [user_turn(image_path)]
    first = vlm.chat(messages, max_tokens=8)
    assert vlm.vision.n_encodes == 1
    cached_after_first = list(vlm._cached)
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "Tell me more."}]
    pieces = list(vlm.chat(messages, max_tokens=8, stream=True))
    assert vlm.vision.n_encodes == 1  # the image was not encoded again
    n_image_rows = sum(isinstance(t, tuple) for t in cached_after_first)
    assert n_image_rows == 576
    ((start, n),) = vlm.image_spans  # the engine knows where the image tokens are
    assert n == 576 and all(isinstance(t, tuple) for t in vlm._cached[start : start + n])
    # the second prompt extends the first: the whole first prompt (image included) stayed cached
    assert vlm._cached[: len(cached_after_first) - 8] == cached_after_first[: len(cached_after_first) - 8]
    # a new conversation with the same image reuses its embeddings too
    vlm.chat([user_turn(image_path, "Again?")], max_tokens=2)
    assert vlm.vision.n_encodes == 1


def test_streaming_equals_plain_answer(tiny_llava, vlm):
    _, _, _, image_path, _ = tiny_llava
    messages = [user_turn(image_path)]
    plain = vlm.chat(messages, max_tokens=12)
    streamed = list(vlm.chat(messages, max_tokens=12, stream=True))
    assert "".join(streamed) == plain and len(streamed) >= 1


def test_image_part_forms(tiny_llava, vlm, tmp_path):
    _, _, _, image_path, image = tiny_llava
    data_url = "data:image/png;base64," + base64.b64encode(open(image_path, "rb").read()).decode()
    forms = [
        {"type": "image_url", "image_url": {"url": image_path}},
        {"type": "image_url", "image_url": "file://" + image_path},
        {"type": "image_url", "image_url": {"url": data_url}},
        {"type": "image", "image": Image.fromarray(image)},
    ]
    answers = {vlm.chat([{"role": "user", "content": [f, {"type": "text", "text": QUESTION}]}], max_tokens=6) for f in forms}
    assert len(answers) == 1
    assert vlm.vision.n_encodes == 1  # the same pixels: one encode


def encode_as(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_image_decoding(tmp_path):
    rgb = Image.fromarray(lt.test_image(64))
    for fmt in ("PNG", "JPEG", "WEBP", "GIF", "BMP"):
        img = load_image(encode_as(rgb, fmt))
        assert img.pixels.shape == (64, 64, 3) and img.pixels.dtype == np.uint8
    # transparency onto white, palette and greyscale to RGB
    rgba = Image.new("RGBA", (8, 4), (255, 0, 0, 0))
    assert (load_image(encode_as(rgba, "PNG")).pixels == 255).all()
    assert load_image(encode_as(rgb.convert("P"), "PNG")).pixels.shape == (64, 64, 3)
    grey = load_image(encode_as(Image.new("L", (5, 7), 100), "PNG")).pixels
    assert grey.shape == (7, 5, 3) and (grey == 100).all()
    # EXIF orientation 6 (rotate 90 degrees clockwise to display): 8x4 stored -> 4x8 shown
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = load_image(encode_as(Image.new("RGB", (8, 4), (0, 0, 255)), "JPEG", exif=exif.tobytes()))
    assert rotated.pixels.shape == (8, 4, 3)
    # animated GIF: first frame
    frames = [Image.new("RGB", (6, 6), c) for c in ((255, 0, 0), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    first = load_image(buf.getvalue()).pixels
    assert first[0, 0, 0] > 200 and first[0, 0, 1] < 50


def test_bad_images(tmp_path, vlm, monkeypatch):
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "missing.png")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ImageError, match="not an image"):
        load_image(text)
    with pytest.raises(ImageError, match="offline"):
        load_image("https://example.com/cat.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageError, match="decompression bomb|exceeds limit"):
        load_image(encode_as(Image.new("RGB", (64, 64)), "PNG"))
    monkeypatch.undo()
    with pytest.raises(ImageError):
        vlm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(text)}}]}])


def test_image_limits_are_refused_with_bounded_memory(tmp_path):
    import struct
    import subprocess
    import sys
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    # a PNG whose header claims 20,000 x 20,000 pixels: refused before any pixel is decoded
    huge = tmp_path / "huge.png"
    huge.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))
    with pytest.raises(ImageError, match="decompression bomb|exceeds limit"):
        load_image(huge)
    # a 1 GB file that is not an image (sparse on disk): refused from its first bytes, in a fresh
    # process so that its peak memory is its own
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        f.truncate(1 << 30)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork and exec
    code = ("import sys\nfrom cmx.images import ImageError, load_image\n"
            "try:\n    load_image(sys.argv[1])\nexcept ImageError as e:\n    print('refused:', e)\n"
            "print([int(l.split()[1]) // 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
    r = subprocess.run([sys.executable, "-c", code, str(big)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("refused:") and "not an image" in lines[0]
    assert int(lines[-1]) < 300  # MiB: the file is never read whole


def test_wrong_or_bad_mmproj(tiny_llava, smollm2_path, tmp_path):
    _, text, mmproj, image_path, _ = tiny_llava
    with pytest.raises(cmx.VisionModelError, match="projects to 64 dimensions but the text model has n_embd=576"):
        cmx.Model(smollm2_path, mmproj=mmproj)
    with pytest.raises(cmx.VisionModelError, match="not an mmproj"):
        cmx.Model(text, mmproj=text)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(cmx.VisionModelError, match="not a valid GGUF"):
        cmx.Model(text, mmproj=garbage)
    with pytest.raises(FileNotFoundError):
        cmx.Model(text, mmproj=tmp_path / "none.gguf")
    text_only = cmx.Model(text, n_ctx=256)
    with pytest.raises(ValueError, match="no vision projector"):
        text_only.chat([user_turn(image_path)])


def test_prompt_longer_than_context(tiny_llava):
    _, text, mmproj, image_path, _ = tiny_llava
    m = cmx.Model(text, mmproj=mmproj, n_ctx=512)  # 576 image tokens do not fit
    with pytest.raises(ValueError, match="prompt too long"):
        m.chat([user_turn(image_path)])

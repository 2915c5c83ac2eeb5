// Loading: GGUF metadata -> HParams, tensor validation, weights placed in backend buffers.
//
// On a device that can wrap host memory (CPU, Metal) the weights stay in the file mapping and
// are never copied; only tensors that the CPU backend wants repacked (e.g. Q4_0 on AVX2, the
// "extra" buffer types llama.cpp uses too) are copied into a buffer of that type.
#include "model.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <thread>
#include <unordered_map>

#include "ggml-alloc.h"
#include "ggml-cpu.h"

namespace cmx {

const char *arch_name(Arch arch) {
    return arch == Arch::qwen2vl ? "qwen2vl" : arch == Arch::qwen2 ? "qwen2" : arch == Arch::gemma3 ? "gemma3" : "llama";
}

std::string printable_utf8(const std::string &text) {
    std::string out;
    out.reserve(text.size());
    auto escape = [&out](unsigned char c) {
        char hex[8];
        std::snprintf(hex, sizeof hex, "\\x%02x", c);
        out += hex;
    };
    const size_t n = text.size();
    for (size_t i = 0; i < n;) {
        const unsigned char c = (unsigned char)text[i];
        if (c < 0x80) {
            if (c < 0x20 && c != '\n' && c != '\t') escape(c);
            else if (c == 0x7f) escape(c);
            else out += (char)c;
            ++i;
            continue;
        }
        // the length of a well-formed sequence starting here (0: not one), per RFC 3629
        size_t len = c >= 0xc2 && c <= 0xdf ? 2 : c >= 0xe0 && c <= 0xef ? 3 : c >= 0xf0 && c <= 0xf4 ? 4 : 0;
        bool ok = len && i + len <= n;
        for (size_t k = 1; ok && k < len; ++k) ok = ((unsigned char)text[i + k] & 0xc0) == 0x80;
        if (ok && len >= 3) {  // no overlong forms, no surrogates, nothing past U+10FFFF
            const unsigned char c1 = (unsigned char)text[i + 1];
            ok = !(c == 0xe0 && c1 < 0xa0) && !(c == 0xed && c1 >= 0xa0) && !(c == 0xf0 && c1 < 0x90) && !(c == 0xf4 && c1 >= 0x90);
        }
        if (ok) {
            out.append(text, i, len);
            i += len;
        } else {
            escape(c);
            ++i;
        }
    }
    return out;
}

namespace {

std::string fmt_shape(const int64_t *ne, int n) {
    std::string s = "[";
    for (int i = 0; i < n; ++i) s += (i ? ", " : "") + std::to_string(ne[i]);
    return s + "]";
}

// Typed metadata access with the key's own type checked (a wrong type is a load_error, not an
// assert inside gguf).
class Meta {
   public:
    explicit Meta(const gguf_context *ctx, std::string arch) : ctx_(ctx), arch_(std::move(arch)) {}

    std::string key(const char *suffix) const { return arch_ + "." + suffix; }

    bool has(const std::string &k) const { return gguf_find_key(ctx_, k.c_str()) >= 0; }

    std::string str(const std::string &k, const std::string &dflt) const {
        int64_t id = gguf_find_key(ctx_, k.c_str());
        if (id < 0) return dflt;
        if (gguf_get_kv_type(ctx_, id) != GGUF_TYPE_STRING) throw load_error("metadata key '" + k + "' is not a string");
        return gguf_get_val_str(ctx_, id);
    }

    double num(const std::string &k, double dflt, bool required = false) const {
        int64_t id = gguf_find_key(ctx_, k.c_str());
        if (id < 0) {
            if (required) throw load_error("missing metadata key '" + k + "'");
            return dflt;
        }
        switch (gguf_get_kv_type(ctx_, id)) {
            case GGUF_TYPE_UINT8: return gguf_get_val_u8(ctx_, id);
            case GGUF_TYPE_INT8: return gguf_get_val_i8(ctx_, id);
            case GGUF_TYPE_UINT16: return gguf_get_val_u16(ctx_, id);
            case GGUF_TYPE_INT16: return gguf_get_val_i16(ctx_, id);
            case GGUF_TYPE_UINT32: return gguf_get_val_u32(ctx_, id);
            case GGUF_TYPE_INT32: return gguf_get_val_i32(ctx_, id);
            case GGUF_TYPE_UINT64: return (double)gguf_get_val_u64(ctx_, id);
            case GGUF_TYPE_INT64: return (double)gguf_get_val_i64(ctx_, id);
            case GGUF_TYPE_FLOAT32: return gguf_get_val_f32(ctx_, id);
            case GGUF_TYPE_FLOAT64: return gguf_get_val_f64(ctx_, id);
            case GGUF_TYPE_ARRAY:
                // per-layer arrays (e.g. head_count_kv): uniform values only
                if (gguf_get_arr_n(ctx_, id) > 0 && (gguf_get_arr_type(ctx_, id) == GGUF_TYPE_INT32 ||
                                                     gguf_get_arr_type(ctx_, id) == GGUF_TYPE_UINT32)) {
                    const int32_t *v = (const int32_t *)gguf_get_arr_data(ctx_, id);
                    for (size_t i = 1; i < gguf_get_arr_n(ctx_, id); ++i)
                        if (v[i] != v[0]) throw load_error("metadata key '" + k + "' varies per layer (unsupported)");
                    return v[0];
                }
                [[fallthrough]];
            default: throw load_error("metadata key '" + k + "' is not a number");
        }
    }

    // an integer array's values, or one integer as a single value; empty when the key is absent
    std::vector<int64_t> ints(const std::string &k) const {
        int64_t id = gguf_find_key(ctx_, k.c_str());
        if (id < 0) return {};
        if (gguf_get_kv_type(ctx_, id) != GGUF_TYPE_ARRAY) return {(int64_t)num(k, 0)};
        const enum gguf_type t = gguf_get_arr_type(ctx_, id);
        if (t != GGUF_TYPE_INT32 && t != GGUF_TYPE_UINT32) throw load_error("metadata key '" + k + "' is not an array of 32-bit integers");
        const size_t n = gguf_get_arr_n(ctx_, id);
        std::vector<int64_t> out(n);
        for (size_t i = 0; i < n; ++i)
            out[i] = t == GGUF_TYPE_INT32 ? ((const int32_t *)gguf_get_arr_data(ctx_, id))[i] : ((const uint32_t *)gguf_get_arr_data(ctx_, id))[i];
        return out;
    }

    // A per-layer flag array (bool or integer elements); empty when the key is absent or not an array.
    std::vector<uint8_t> flags(const std::string &k) const {
        int64_t id = gguf_find_key(ctx_, k.c_str());
        if (id < 0 || gguf_get_kv_type(ctx_, id) != GGUF_TYPE_ARRAY) return {};
        const size_t n = gguf_get_arr_n(ctx_, id);
        const gguf_type t = gguf_get_arr_type(ctx_, id);
        std::vector<uint8_t> out(n);
        const void *data = n ? gguf_get_arr_data(ctx_, id) : nullptr;
        for (size_t i = 0; i < n; ++i) {
            if (t == GGUF_TYPE_BOOL) out[i] = ((const uint8_t *)data)[i] != 0;
            else if (t == GGUF_TYPE_INT32 || t == GGUF_TYPE_UINT32) out[i] = ((const int32_t *)data)[i] != 0;
            else throw load_error("metadata key '" + k + "' is not an array of bool, int32 or uint32 flags");
        }
        return out;
    }

    int count(const std::string &k) const {
        int64_t id = gguf_find_key(ctx_, k.c_str());
        if (id < 0 || gguf_get_kv_type(ctx_, id) != GGUF_TYPE_ARRAY) return 0;
        return (int)gguf_get_arr_n(ctx_, id);
    }

   private:
    const gguf_context *ctx_;
    std::string arch_;
};

// rope.dimension_sections: required, 4 integers as llama.cpp reads them (an array of exactly 4, or
// one number for all); ggml's M-RoPE takes each pair's section modulo their sum, so it must be > 0.
void read_rope_sections(const Meta &m, HParams &hp) {
    const std::string k = m.key("rope.dimension_sections");
    std::vector<int64_t> v = m.ints(k);
    if (v.empty()) throw load_error("missing metadata key '" + k + "' (M-RoPE needs its sections)");
    if (v.size() == 1) v.assign(GGML_MROPE_SECTIONS, v[0]);
    if (v.size() != GGML_MROPE_SECTIONS)
        throw load_error("metadata key '" + k + "' has " + std::to_string(v.size()) + " entries, expected 4");
    int64_t sum = 0;
    for (size_t i = 0; i < v.size(); ++i) {
        if (v[i] < 0 || v[i] > hp.n_rot) throw load_error("metadata key '" + k + "' has an entry out of [0, rope dimensions]");
        hp.rope_sections[i] = (int)v[i];
        sum += v[i];
    }
    if (sum <= 0 || sum > hp.n_rot / 2)
        throw load_error("metadata key '" + k + "' sums to " + std::to_string(sum) + ", expected 1.." + std::to_string(hp.n_rot / 2) +
                         " (rotary dimension pairs)");
}

// Gemma 3's keys, read as the pinned llama.cpp reads them (src/models/gemma3.cpp, llama-hparams).
void read_gemma3_hparams(const Meta &m, HParams &hp) {
    hp.ffn_act = FfnAct::gelu;
    hp.embd_scale = std::sqrt((float)hp.n_embd);
    hp.image_attn_bidirectional = true;
    hp.final_logit_softcap = (float)m.num(m.key("final_logit_softcapping"), 0.0);
    // llama.cpp's rule (after gemma_pytorch): the 27B model (62 layers) scales by 1/sqrt(n_embd / n_head)
    hp.attn_scale = 1.0f / std::sqrt((float)(hp.n_layer == 62 ? hp.n_embd / hp.n_head : hp.head_dim));
    const double n_swa = m.num(m.key("attention.sliding_window"), 0.0);
    if (n_swa < 0 || n_swa > (double)INT32_MAX) throw load_error("attention.sliding_window is " + std::to_string(n_swa));
    hp.n_swa = (int)n_swa;
    if (hp.n_swa == 0) return;  // every layer global
    hp.rope_freq_base_swa = (float)m.num(m.key("rope.freq_base_swa"), 10000.0);
    const std::string pattern_key = m.key("attention.sliding_window_pattern");
    hp.swa_layers = m.flags(pattern_key);
    if (!hp.swa_layers.empty()) {  // one flag per layer; as llama.cpp, layers past the array's end are global
        if (hp.swa_layers.size() > 512)  // LLAMA_MAX_LAYERS
            throw load_error(pattern_key + " has " + std::to_string(hp.swa_layers.size()) + " entries (at most 512)");
        hp.swa_layers.resize(hp.n_layer, 0);
        return;
    }
    // a period n: layers n-1, 2n-1, ... global, the others sliding-window (n = 0: all sliding)
    const double period = m.num(pattern_key, 6.0);
    if (period < 0 || period > (double)INT32_MAX) throw load_error(pattern_key + " is " + std::to_string(period));
    const int n = (int)period;
    hp.swa_layers.resize(hp.n_layer);
    for (int il = 0; il < hp.n_layer; ++il) hp.swa_layers[il] = n == 0 || il % n < n - 1;
}

HParams read_hparams(const gguf_context *gguf) {
    HParams hp;
    Meta general(gguf, "general");
    hp.arch_name = general.str("general.architecture", "");
    if (hp.arch_name.empty()) throw load_error("GGUF has no general.architecture key");
    if (hp.arch_name == "llama") {
        hp.arch = Arch::llama;
        hp.rope_mode = GGML_ROPE_TYPE_NORMAL;
    } else if (hp.arch_name == "qwen2") {
        hp.arch = Arch::qwen2;
        hp.rope_mode = GGML_ROPE_TYPE_NEOX;
    } else if (hp.arch_name == "qwen2vl") {  // Qwen2-VL / Qwen2.5-VL's text model: qwen2 with M-RoPE
        hp.arch = Arch::qwen2vl;
        hp.rope_mode = GGML_ROPE_TYPE_MROPE;
    } else if (hp.arch_name == "gemma3") {
        hp.arch = Arch::gemma3;
        hp.rope_mode = GGML_ROPE_TYPE_NEOX;
    } else {
        throw load_error("unsupported architecture '" + hp.arch_name + "' (cmx supports: llama, qwen2, qwen2vl, gemma3)");
    }
    hp.name = printable_utf8(general.str("general.name", ""));  // shown in Model.info: a Python str
    hp.file_type = (uint32_t)general.num("general.file_type", 0);

    Meta m(gguf, hp.arch_name);
    hp.n_ctx_train = (int)m.num(m.key("context_length"), 4096);
    hp.n_embd = (int)m.num(m.key("embedding_length"), 0, true);
    hp.n_ff = (int)m.num(m.key("feed_forward_length"), 0, true);
    hp.n_layer = (int)m.num(m.key("block_count"), 0, true);
    hp.n_head = (int)m.num(m.key("attention.head_count"), 0, true);
    hp.n_head_kv = (int)m.num(m.key("attention.head_count_kv"), hp.n_head);
    hp.norm_eps = (float)m.num(m.key("attention.layer_norm_rms_epsilon"), 0, true);
    if (!(std::isfinite(hp.norm_eps) && hp.norm_eps >= 0.0f))  // ggml's rms_norm asserts eps >= 0
        throw load_error("attention.layer_norm_rms_epsilon is " + std::to_string(hp.norm_eps) + " (a finite eps >= 0 expected)");
    if (hp.n_embd <= 0 || hp.n_ff <= 0 || hp.n_layer <= 0 || hp.n_head <= 0 || hp.n_head_kv <= 0)
        throw load_error("invalid hyperparameters (embedding/feed_forward length, block or head count <= 0)");
    if (hp.n_head % hp.n_head_kv != 0)
        throw load_error("head_count (" + std::to_string(hp.n_head) + ") is not a multiple of head_count_kv (" +
                         std::to_string(hp.n_head_kv) + ")");
    hp.head_dim = (int)m.num(m.key("attention.key_length"), hp.n_embd / hp.n_head);
    if ((int)m.num(m.key("attention.value_length"), hp.head_dim) != hp.head_dim)
        throw load_error("attention.value_length differs from key_length (unsupported)");
    hp.n_rot = (int)m.num(m.key("rope.dimension_count"), hp.head_dim);
    if (hp.n_rot != hp.head_dim) throw load_error("rope.dimension_count != head dimension (unsupported)");

    hp.rope_freq_base = (float)m.num(m.key("rope.freq_base"), 10000.0);
    std::string scaling = m.str(m.key("rope.scaling.type"), "linear");
    double factor = m.num(m.key("rope.scaling.factor"), m.num(m.key("rope.scale_linear"), 0.0));
    if (scaling == "none") {
        hp.rope_scaling = RopeScaling::none;
        factor = 0.0;
    } else if (scaling == "linear") {
        hp.rope_scaling = RopeScaling::linear;
    } else if (scaling == "yarn") {
        hp.rope_scaling = RopeScaling::yarn;
    } else {
        throw load_error("unsupported rope.scaling.type '" + scaling + "'");
    }
    hp.rope_freq_scale = factor == 0.0 ? 1.0f : (float)(1.0 / factor);
    hp.n_ctx_orig = (int)m.num(m.key("rope.scaling.original_context_length"), hp.n_ctx_train);
    if (hp.rope_scaling == RopeScaling::yarn) {
        // llama.cpp: ext_factor 1; the mscale attention factor cancels out for these models
        hp.yarn_ext_factor = (float)m.num(m.key("rope.scaling.yarn_ext_factor"), 1.0);
        hp.yarn_beta_fast = (float)m.num(m.key("rope.scaling.yarn_beta_fast"), 32.0);
        hp.yarn_beta_slow = (float)m.num(m.key("rope.scaling.yarn_beta_slow"), 1.0);
    }
    hp.yarn_attn_factor = (float)m.num(m.key("rope.scaling.attn_factor"), 1.0);
    if (hp.mrope()) read_rope_sections(m, hp);
    // The pinned llama.cpp's qwen2vl loader never reads attention.layer_norm_rms_epsilon (its
    // qwen2vl hparams hook reads only the M-RoPE sections; f_norm_rms_eps stays 0): its RMS norms
    // run with eps 0. The dense engine follows it, so logits stay llama.cpp's (docs/decisions.md).
    if (hp.arch == Arch::qwen2vl) hp.norm_eps = 0.0f;

    hp.n_vocab = (int)m.num(m.key("vocab_size"), general.count("tokenizer.ggml.tokens"));
    if (hp.arch == Arch::gemma3) read_gemma3_hparams(m, hp);
    return hp;
}

// cmx.Model reads the tokenizer with llama.cpp's vocabulary loader, which stops the process
// (GGML_ASSERT) when two entries of tokenizer.ggml.tokens are the same string as it reads them (up
// to the first NUL byte, an empty one standing for "[EMPTY_<id>]"), and whose vocabulary of type
// "none" asserts in the first call llama-cpp-python makes. Refused here first (the engine is
// loaded before the tokenizer). Other tokenizer defects llama.cpp reports as errors.
void check_tokenizer(const gguf_context *gguf) {
    const int64_t model_id = gguf_find_key(gguf, "tokenizer.ggml.model");
    if (model_id >= 0 && gguf_get_kv_type(gguf, model_id) == GGUF_TYPE_STRING) {
        const std::string kind = gguf_get_val_str(gguf, model_id);
        if (kind == "none" || kind == "no_vocab")
            throw load_error("the file has no vocabulary (tokenizer.ggml.model is '" + kind + "'): cmx needs the model's tokenizer");
    }
    const int64_t id = gguf_find_key(gguf, "tokenizer.ggml.tokens");
    if (id < 0 || gguf_get_kv_type(gguf, id) != GGUF_TYPE_ARRAY || gguf_get_arr_type(gguf, id) != GGUF_TYPE_STRING) return;
    const size_t n = gguf_get_arr_n(gguf, id);
    std::unordered_map<std::string, size_t> seen;
    seen.reserve(n);
    for (size_t i = 0; i < n; ++i) {
        std::string word = gguf_get_arr_str(gguf, id, i);  // as llama.cpp reads it: up to a NUL
        if (word.empty()) word = "[EMPTY_" + std::to_string(i) + "]";
        auto [it, fresh] = seen.emplace(std::move(word), i);
        if (!fresh)
            throw load_error("tokenizer.ggml.tokens holds token " + std::to_string(it->second) + " ('" +
                             it->first.substr(0, 60) + "') again as token " + std::to_string(i));
    }
}

struct TensorCheck {
    const gguf_context *gguf;
    ggml_context *ctx;
    size_t data_offset;
    size_t file_size;

    // Returns the tensor after checking its shape and that its bytes lie inside the file.
    ggml_tensor *get(const std::string &name, std::vector<int64_t> shape, bool required = true) const {
        int64_t id = gguf_find_tensor(gguf, name.c_str());
        if (id < 0) {
            if (required) throw load_error("missing tensor '" + name + "'");
            return nullptr;
        }
        ggml_tensor *t = ggml_get_tensor(ctx, name.c_str());
        if (!t) throw load_error("tensor '" + name + "' has no descriptor");
        int n = ggml_n_dims(t);
        bool ok = n <= (int)shape.size();
        for (size_t i = 0; ok && i < GGML_MAX_DIMS; ++i) ok = t->ne[i] == (i < shape.size() ? shape[i] : 1);
        if (!ok)
            throw load_error("tensor '" + name + "' has shape " + fmt_shape(t->ne, n) + ", expected " +
                             fmt_shape(shape.data(), (int)shape.size()));
        // the type the graph can compute with (ggml aborts on the others, mid-evaluation): norms
        // and biases are added to / multiplied with f32 activations (ggml's binary ops take f32
        // only there); matrices need the CPU backend's dot product (every backend falls back to
        // it) and a conversion to f32 (token rows, core-neuron gathering)
        const ggml_type ty = t->type;
        if (shape.size() == 1 ? ty != GGML_TYPE_F32
                              : !ggml_get_type_traits_cpu(ty)->vec_dot || (ty != GGML_TYPE_F32 && !ggml_get_type_traits(ty)->to_float))
            throw load_error("tensor '" + name + "' has type " + ggml_type_name(ty) + ", which cmx cannot compute with" +
                             (shape.size() == 1 ? " (a vector must be f32)" : ""));
        size_t end = data_offset + gguf_get_tensor_offset(gguf, id) + ggml_nbytes(t);
        if (end > file_size)
            throw load_error("file is truncated: tensor '" + name + "' ends at byte " + std::to_string(end) +
                             " but the file has " + std::to_string(file_size) + " bytes");
        return t;
    }
};

// The CPU backend's extra buffer types (weight repacking). A weight goes there when the device
// says its matmul is supported from that buffer type, the same test llama.cpp applies.
bool matmul_supported_from(ggml_backend_dev_t dev, ggml_backend_buffer_type_t buft, const ggml_tensor *w) {
    ggml_init_params ip = {ggml_tensor_overhead() * 4, nullptr, true};
    ggml_context *ctx = ggml_init(ip);
    ggml_tensor *wc = ggml_new_tensor(ctx, w->type, GGML_MAX_DIMS, w->ne);
    ggml_tensor *x = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, w->ne[0], 512);
    ggml_tensor *op = ggml_mul_mat(ctx, wc, x);
    ggml_backend_buffer_t dummy = ggml_backend_buft_alloc_buffer(buft, 0);
    wc->buffer = dummy;
    bool ok = ggml_backend_dev_supports_op(dev, op);
    ggml_backend_buffer_free(dummy);
    ggml_free(ctx);
    return ok;
}

std::vector<ggml_backend_buffer_type_t> cpu_extra_bufts(ggml_backend_dev_t cpu_dev) {
    std::vector<ggml_backend_buffer_type_t> out;
    ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(cpu_dev);
    auto get_extra = (ggml_backend_dev_get_extra_bufts_t)ggml_backend_reg_get_proc_address(reg, "ggml_backend_dev_get_extra_bufts");
    if (!get_extra) return out;
    for (ggml_backend_buffer_type_t *p = get_extra(cpu_dev); p && *p; ++p) {
        // ggml's AMX matmul crashes on some AMX machines (llama.cpp issue #20824; every load
        // crashed on the Sapphire Rapids machines here): weights stay out of its buffer type.
        if (std::string(ggml_backend_buft_name(*p)) == "AMX") continue;
        out.push_back(*p);
    }
    return out;
}

}  // namespace

Model::~Model() {
    for (auto b : weight_buffers) ggml_backend_buffer_free(b);
    if (backend && backend != backend_cpu) ggml_backend_free(backend);
    if (backend_cpu) ggml_backend_free(backend_cpu);
    if (ctx_meta) ggml_free(ctx_meta);
    if (gguf) gguf_free(gguf);
    if (mapping) munmap(mapping, mapping_size);
}

void Model::set_n_threads(int n) {
    if (n <= 0) n = (int)std::max(1u, std::thread::hardware_concurrency());
    n_threads = n;
    for (ggml_backend_t b : {backend, backend_cpu}) {
        if (!b) continue;
        ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(ggml_backend_get_device(b));
        auto fn = (ggml_backend_set_n_threads_t)ggml_backend_reg_get_proc_address(reg, "ggml_backend_set_n_threads");
        if (fn) fn(b, n);
    }
}

const uint8_t *Model::file_bytes(const ggml_tensor *t) const {
    int64_t id = gguf_find_tensor(gguf, ggml_get_name(t));
    if (id < 0) throw std::invalid_argument(std::string("no tensor '") + ggml_get_name(t) + "' in the file");
    return (const uint8_t *)mapping + data_offset + gguf_get_tensor_offset(gguf, id);
}

ggml_backend_buffer_type_t Model::matrix_buffer_type(const ggml_tensor *like) const {
    for (auto buft : extra_bufts)
        if (matmul_supported_from(device, buft, like)) return buft;
    return ggml_backend_dev_buffer_type(device);
}

LoraAdapter::~LoraAdapter() {
    if (buffer) ggml_backend_buffer_free(buffer);
    if (ctx) ggml_free(ctx);
    if (gguf) gguf_free(gguf);
}

namespace {

// Loads a LoRA GGUF for `model`, checking that every tensor names a matrix of this model with a
// fitting shape (an adapter of another model is refused here, not by a ggml assert).
std::unique_ptr<LoraAdapter> load_lora(const Model &model, const std::string &path, float user_scale) {
    auto lora = std::make_unique<LoraAdapter>();
    lora->path = path;
    lora->user_scale = user_scale;
    struct stat st;
    if (stat(path.c_str(), &st) != 0) throw load_error("LoRA adapter not found: " + path);
    const size_t file_size = (size_t)st.st_size;
    gguf_init_params gp = {/*no_alloc=*/true, &lora->ctx};
    lora->gguf = gguf_init_from_file(path.c_str(), gp);
    if (!lora->gguf) throw load_error("not a valid GGUF file: " + path);
    Meta meta(lora->gguf, "general");
    if (meta.str("general.type", "") != "adapter" || meta.str("adapter.type", "") != "lora")
        throw load_error(path + " is not a LoRA adapter (general.type must be 'adapter', adapter.type 'lora')");
    const std::string arch = meta.str("general.architecture", model.hp.arch_name);
    if (arch != model.hp.arch_name)
        throw load_error("the LoRA adapter " + path + " is for a '" + arch + "' model, not '" + model.hp.arch_name + "'");
    lora->alpha = (float)meta.num("adapter.lora.alpha", 0.0);
    lora->layers.resize(model.hp.n_layer);

    const size_t data_offset = gguf_get_data_offset(lora->gguf);
    const int64_t n_tensors = gguf_get_n_tensors(lora->gguf);
    for (int64_t id = 0; id < n_tensors; ++id) {
        const std::string name = gguf_get_tensor_name(lora->gguf, id);
        int il = -1, consumed = 0;
        char base[64] = {0};
        if (std::sscanf(name.c_str(), "blk.%d.%63[a-z_].weight.lora_%n", &il, base, &consumed) != 2 || consumed == 0 ||
            (name.substr(consumed) != "a" && name.substr(consumed) != "b"))
            throw load_error("LoRA tensor '" + name + "' is not blk.N.<matrix>.weight.lora_a/b");
        if (il < 0 || il >= model.hp.n_layer)
            throw load_error("LoRA tensor '" + name + "' is for layer " + std::to_string(il) + " but the model has " +
                             std::to_string(model.hp.n_layer));
        const cmx::Layer &w = model.layers[il];
        LoraLayer &ll = lora->layers[il];
        const std::string b = base;
        std::pair<LoraMatrix *, ggml_tensor *> target =
            b == "attn_q" ? std::pair{&ll.wq, w.wq} : b == "attn_k" ? std::pair{&ll.wk, w.wk} : b == "attn_v" ? std::pair{&ll.wv, w.wv} :
            b == "attn_output" ? std::pair{&ll.wo, w.wo} : b == "ffn_gate" ? std::pair{&ll.ffn_gate, w.ffn_gate} :
            b == "ffn_up" ? std::pair{&ll.ffn_up, w.ffn_up} : b == "ffn_down" ? std::pair{&ll.ffn_down, w.ffn_down} :
            std::pair<LoraMatrix *, ggml_tensor *>{nullptr, nullptr};
        if (!target.first) throw load_error("LoRA tensor '" + name + "': cmx applies adapters to attention and FFN matrices only");
        ggml_tensor *t = ggml_get_tensor(lora->ctx, name.c_str());
        if (!t || ggml_n_dims(t) > 2) throw load_error("LoRA tensor '" + name + "' is not a matrix");
        const ggml_type ty = t->type;
        if (ty != GGML_TYPE_F32 && ty != GGML_TYPE_F16 && ty != GGML_TYPE_BF16 && ty != GGML_TYPE_Q8_0)
            throw load_error("LoRA tensor '" + name + "' has type " + ggml_type_name(ty) + " (f32, f16, bf16 or q8_0 expected)");
        if (data_offset + gguf_get_tensor_offset(lora->gguf, id) + ggml_nbytes(t) > file_size)
            throw load_error("LoRA file is truncated: " + path);
        (name.back() == 'a' ? target.first->a : target.first->b) = t;
        if (b.rfind("ffn_", 0) == 0) lora->adapts_ffn = true;
    }
    bool any = false;
    for (int il = 0; il < model.hp.n_layer; ++il) {
        LoraLayer &ll = lora->layers[il];
        const cmx::Layer &w = model.layers[il];
        for (auto [m, wt] : {std::pair{&ll.wq, w.wq}, {&ll.wk, w.wk}, {&ll.wv, w.wv}, {&ll.wo, w.wo},
                             {&ll.ffn_gate, w.ffn_gate}, {&ll.ffn_up, w.ffn_up}, {&ll.ffn_down, w.ffn_down}}) {
            if (!m->a && !m->b) continue;
            if (!m->a || !m->b) throw load_error("LoRA adapter " + path + ": layer " + std::to_string(il) + " has lora_a without lora_b or the reverse");
            if (m->a->ne[0] != wt->ne[0] || m->b->ne[1] != wt->ne[1] || m->a->ne[1] != m->b->ne[0])
                throw load_error("LoRA adapter " + path + " does not fit this model: " + ggml_get_name(m->a) + " is [" +
                                 std::to_string(m->a->ne[0]) + ", " + std::to_string(m->a->ne[1]) + "] for a [" +
                                 std::to_string(wt->ne[0]) + ", " + std::to_string(wt->ne[1]) + "] matrix");
            const float rank = (float)m->b->ne[0];
            m->scale = lora->alpha != 0.0f ? user_scale * lora->alpha / rank : user_scale;
            any = true;
        }
    }
    if (!any) throw load_error("LoRA adapter " + path + " holds no tensors");

    lora->buffer = ggml_backend_alloc_ctx_tensors(lora->ctx, model.backend);
    if (!lora->buffer) throw load_error("out of memory allocating the LoRA adapter");
    FILE *f = std::fopen(path.c_str(), "rb");
    if (!f) throw load_error("cannot open " + path);
    std::vector<uint8_t> bytes;
    for (int64_t id = 0; id < n_tensors; ++id) {
        ggml_tensor *t = ggml_get_tensor(lora->ctx, gguf_get_tensor_name(lora->gguf, id));
        bytes.resize(ggml_nbytes(t));
        if (std::fseek(f, (long)(data_offset + gguf_get_tensor_offset(lora->gguf, id)), SEEK_SET) != 0 ||
            std::fread(bytes.data(), 1, bytes.size(), f) != bytes.size()) {
            std::fclose(f);
            throw load_error("cannot read the LoRA adapter " + path);
        }
        ggml_backend_tensor_set(t, bytes.data(), 0, bytes.size());
    }
    std::fclose(f);
    return lora;
}

}  // namespace

size_t Model::weight_bytes() const {
    size_t n = 0;
    for (auto b : weight_buffers) n += ggml_backend_buffer_get_size(b);
    return n;
}

std::unique_ptr<Model> load_model(const std::string &path, const LoadParams &params) {
    auto model = std::make_unique<Model>();
    model->path = path;

    struct stat st;
    if (stat(path.c_str(), &st) != 0) throw load_error("model file not found: " + path);
    if (!S_ISREG(st.st_mode)) throw load_error("not a regular file: " + path);
    const size_t file_size = (size_t)st.st_size;

    // gguf validates the header, keys and tensor infos; it returns null (no abort) on garbage.
    gguf_init_params gp = {/*no_alloc=*/true, &model->ctx_meta};
    model->gguf = gguf_init_from_file(path.c_str(), gp);
    if (!model->gguf) throw load_error("not a valid GGUF file (bad magic, truncated header or corrupt metadata): " + path);

    model->hp = read_hparams(model->gguf);
    HParams &hp = model->hp;
    check_tokenizer(model->gguf);
    // a block has 9 tensors at least: a block_count the file cannot hold is refused before
    // anything is sized by it (2^31 blocks: a bad_alloc)
    if ((int64_t)hp.n_layer * 9 > gguf_get_n_tensors(model->gguf))
        throw load_error(hp.arch_name + ".block_count is " + std::to_string(hp.n_layer) + " but the file holds " +
                         std::to_string(gguf_get_n_tensors(model->gguf)) + " tensors");

    TensorCheck tc{model->gguf, model->ctx_meta, gguf_get_data_offset(model->gguf), file_size};
    const int64_t E = hp.n_embd, F = hp.n_ff, Q = hp.n_embd_q(), KV = hp.n_embd_kv();
    if (hp.n_vocab <= 0) {
        ggml_tensor *te = ggml_get_tensor(model->ctx_meta, "token_embd.weight");
        if (!te) throw load_error("missing tensor 'token_embd.weight'");
        hp.n_vocab = (int)te->ne[1];
    }
    const int64_t V = hp.n_vocab;
    model->tok_embd = tc.get("token_embd.weight", {E, V});
    model->output_norm = tc.get("output_norm.weight", {E});
    model->output = tc.get("output.weight", {E, V}, false);
    model->tied_output = model->output == nullptr;
    if (model->tied_output) model->output = model->tok_embd;
    model->rope_freqs = tc.get("rope_freqs.weight", {hp.n_rot / 2}, false);

    // block_count against the blocks the file holds: with fewer blocks declared than stored, the
    // extra ones would be ignored without a word (llama.cpp refuses such a file: "wrong number of
    // tensors"); with more, the first missing tensor is reported below.
    for (int64_t i = 0; i < gguf_get_n_tensors(model->gguf); ++i) {
        const char *name = gguf_get_tensor_name(model->gguf, i);
        if (strncmp(name, "blk.", 4) != 0) continue;
        char *end = nullptr;
        long il = strtol(name + 4, &end, 10);
        if (end == name + 4 || *end != '.') continue;
        if (il >= hp.n_layer)
            throw load_error(hp.arch_name + ".block_count is " + std::to_string(hp.n_layer) + " but the file has tensor '" +
                             name + "' of block " + std::to_string(il));
    }

    const bool qkv_bias = hp.arch == Arch::qwen2 || hp.arch == Arch::qwen2vl, gemma3 = hp.arch == Arch::gemma3;
    const int64_t D = hp.head_dim;
    model->layers.resize(hp.n_layer);
    for (int il = 0; il < hp.n_layer; ++il) {
        Layer &l = model->layers[il];
        auto name = [il](const char *what) { return "blk." + std::to_string(il) + "." + what; };
        l.attn_norm = tc.get(name("attn_norm.weight"), {E});
        l.wq = tc.get(name("attn_q.weight"), {E, Q});
        l.wk = tc.get(name("attn_k.weight"), {E, KV});
        l.wv = tc.get(name("attn_v.weight"), {E, KV});
        l.wo = tc.get(name("attn_output.weight"), {Q, E});
        l.bq = tc.get(name("attn_q.bias"), {Q}, qkv_bias);
        l.bk = tc.get(name("attn_k.bias"), {KV}, qkv_bias);
        l.bv = tc.get(name("attn_v.bias"), {KV}, qkv_bias);
        l.bo = tc.get(name("attn_output.bias"), {E}, false);
        l.ffn_norm = tc.get(name("ffn_norm.weight"), {E});
        l.ffn_gate = tc.get(name("ffn_gate.weight"), {E, F});
        l.ffn_up = tc.get(name("ffn_up.weight"), {E, F});
        l.ffn_down = tc.get(name("ffn_down.weight"), {F, E});
        l.attn_q_norm = tc.get(name("attn_q_norm.weight"), {D}, gemma3);
        l.attn_k_norm = tc.get(name("attn_k_norm.weight"), {D}, gemma3);
        l.attn_post_norm = tc.get(name("post_attention_norm.weight"), {E}, gemma3);
        l.ffn_post_norm = tc.get(name("post_ffw_norm.weight"), {E}, gemma3);
    }

    // Backends: the registry decides (Metal on a Mac, CPU here); the CPU backend is always there
    // for ops the device does not run.
    model->device = params.use_gpu ? ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_GPU) : nullptr;
    if (!model->device) model->device = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    if (!model->device) throw load_error("no ggml backend device available");
    model->device_name = ggml_backend_dev_name(model->device);
    ggml_backend_dev_t cpu_dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    model->backend_cpu = ggml_backend_dev_init(cpu_dev, nullptr);
    model->backend = model->device == cpu_dev ? model->backend_cpu : ggml_backend_dev_init(model->device, nullptr);
    if (!model->backend || !model->backend_cpu) throw load_error("failed to initialise the ggml backend");
    model->set_n_threads(params.n_threads);

    // The tensors the graph uses (tok_embd appears once even when tied).
    std::vector<ggml_tensor *> used = {model->tok_embd, model->output_norm};
    if (!model->tied_output) used.push_back(model->output);
    if (model->rope_freqs) used.push_back(model->rope_freqs);
    for (const Layer &l : model->layers)
        for (ggml_tensor *t : {l.attn_norm, l.wq, l.wk, l.wv, l.wo, l.bq, l.bk, l.bv, l.bo, l.ffn_norm, l.ffn_gate, l.ffn_up, l.ffn_down,
                               l.attn_q_norm, l.attn_k_norm, l.attn_post_norm, l.ffn_post_norm})
            if (t) used.push_back(t);

    // Map the file read-only; pages are loaded on first use and shared with the page cache.
    int fd = open(path.c_str(), O_RDONLY);
    if (fd < 0) throw load_error("cannot open " + path + ": " + strerror(errno));
    void *addr = mmap(nullptr, file_size, PROT_READ, MAP_SHARED, fd, 0);
    close(fd);
    if (addr == MAP_FAILED) throw load_error("cannot map " + path + ": " + strerror(errno));
    model->mapping = addr;
    model->mapping_size = file_size;
    model->data_offset = tc.data_offset;
    auto file_ptr = [&](ggml_tensor *t) { return (void *)model->file_bytes(t); };

    // Decide each tensor's home: a repacking buffer type (CPU only), the mapping, or a copy.
    ggml_backend_dev_props props;
    ggml_backend_dev_get_props(model->device, &props);
    if (model->device == cpu_dev) model->extra_bufts = cpu_extra_bufts(cpu_dev);
    const auto &extra = model->extra_bufts;
    std::vector<std::pair<ggml_backend_buffer_type_t, std::vector<ggml_tensor *>>> copied;
    std::vector<ggml_tensor *> mapped;
    for (ggml_tensor *t : used) {
        ggml_backend_buffer_type_t home = nullptr;
        bool matrix = ggml_n_dims(t) == 2 && t != model->tok_embd;
        for (auto buft : extra)
            if (matrix && matmul_supported_from(model->device, buft, t)) { home = buft; break; }
        if (!home && !props.caps.buffer_from_host_ptr) home = ggml_backend_dev_buffer_type(model->device);
        if (!home) { mapped.push_back(t); continue; }
        auto it = std::find_if(copied.begin(), copied.end(), [&](auto &p) { return p.first == home; });
        if (it == copied.end()) copied.push_back({home, {t}});
        else it->second.push_back(t);
    }

    if (!mapped.empty()) {
        size_t max_tensor = 0;
        for (ggml_tensor *t : mapped) max_tensor = std::max(max_tensor, ggml_nbytes(t));
        ggml_backend_buffer_t buf = ggml_backend_dev_buffer_from_host_ptr(model->device, addr, file_size, max_tensor);
        if (!buf) throw load_error("the backend could not wrap the mapped model file");
        ggml_backend_buffer_set_usage(buf, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
        model->weight_buffers.push_back(buf);
        for (ggml_tensor *t : mapped)
            if (ggml_backend_tensor_alloc(buf, t, file_ptr(t)) != GGML_STATUS_SUCCESS)
                throw load_error(std::string("cannot place tensor '") + ggml_get_name(t) + "' in the mapped buffer");
    }
    for (auto &[buft, tensors] : copied) {
        size_t align = ggml_backend_buft_get_alignment(buft), total = 0;
        for (ggml_tensor *t : tensors) total += GGML_PAD(ggml_backend_buft_get_alloc_size(buft, t), align);
        ggml_backend_buffer_t buf = ggml_backend_buft_alloc_buffer(buft, total);
        if (!buf) throw load_error("out of memory allocating " + std::to_string(total) + " bytes of weights");
        ggml_backend_buffer_set_usage(buf, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
        model->weight_buffers.push_back(buf);
        ggml_tallocr talloc = ggml_tallocr_new(buf);
        for (ggml_tensor *t : tensors) {
            if (ggml_tallocr_alloc(&talloc, t) != GGML_STATUS_SUCCESS)
                throw load_error(std::string("cannot allocate tensor '") + ggml_get_name(t) + "'");
            ggml_backend_tensor_set(t, file_ptr(t), 0, ggml_nbytes(t));  // repacks when the type asks
        }
    }
    if (!params.lora_path.empty()) model->lora = load_lora(*model, params.lora_path, params.lora_scale);
    return model;
}

}  // namespace cmx

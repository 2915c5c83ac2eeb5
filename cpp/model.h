// cmx engine: model structures (hyperparameters, weights) and the GGUF loader.
//
// Ownership: a Model owns its gguf context, the ggml context holding the weight tensor
// descriptors, the file mapping and the backend buffers the weights live in. It is immutable
// after load_model() returns, so several Engines could share one.
#pragma once

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "ggml.h"
#include "ggml-backend.h"
#include "gguf.h"

namespace cmx {

// `text` with every byte that is not part of valid UTF-8, and every control character, written
// as \xNN: messages quote names and values from the file, and Python decodes them as UTF-8 (an
// invalid byte would turn the error into a UnicodeDecodeError).
std::string printable_utf8(const std::string &text);

// Raised for anything wrong with a model file: missing, not GGUF, truncated, unsupported
// architecture, a tensor with the wrong shape or type. Python sees cmx.ModelLoadError.
struct load_error : std::runtime_error {
    explicit load_error(const std::string &message) : std::runtime_error(printable_utf8(message)) {}
};

enum class Arch { llama, qwen2, qwen2vl, gemma3 };

// The FFN's gated activation: act(gate) * up.
enum class FfnAct { silu, gelu };

enum class RopeScaling { none, linear, yarn };

struct HParams {
    Arch arch = Arch::llama;
    std::string arch_name;  // as in general.architecture
    std::string name;       // general.name, for messages
    uint32_t file_type = 0; // general.file_type (llama_ftype), 0 when absent

    int n_vocab = 0;
    int n_ctx_train = 0;
    int n_embd = 0;
    int n_ff = 0;
    int n_layer = 0;
    int n_head = 0;
    int n_head_kv = 0;
    int head_dim = 0;  // attention.key_length, default n_embd / n_head
    int n_rot = 0;     // rope.dimension_count, default head_dim

    float norm_eps = 1e-5f;
    float rope_freq_base = 10000.0f;
    float rope_freq_scale = 1.0f;  // 1 / rope.scaling.factor
    RopeScaling rope_scaling = RopeScaling::none;
    int n_ctx_orig = 0;            // rope.scaling.original_context_length (YaRN)
    float yarn_ext_factor = 0.0f;
    float yarn_attn_factor = 1.0f;
    float yarn_beta_fast = 32.0f;
    float yarn_beta_slow = 1.0f;
    int rope_mode = GGML_ROPE_TYPE_NORMAL;  // llama: adjacent pairs (the converter permutes Q/K); qwen2, gemma3: NEOX; qwen2vl: MROPE
    // M-RoPE (qwen2vl): how many rotary dimension pairs each position component turns (temporal,
    // row, column, unused), rope.dimension_sections
    int rope_sections[GGML_MROPE_SECTIONS] = {0, 0, 0, 0};

    bool mrope() const { return rope_mode == GGML_ROPE_TYPE_MROPE; }
    int n_pos_per_row() const { return mrope() ? GGML_MROPE_SECTIONS : 1; }  // position components per token

    // Gemma 3 (the defaults are llama's): sliding-window layers with their own RoPE base (no
    // scaling there), the query scaled before the attention, token embeddings scaled by
    // sqrt(n_embd), an optional tanh soft cap on the logits; image rows attend to every row of
    // their image (llama.cpp decodes image chunks non-causally for this family).
    FfnAct ffn_act = FfnAct::silu;
    int n_swa = 0;                       // attention.sliding_window; 0: no sliding-window layers
    std::vector<uint8_t> swa_layers;     // per layer: 1 where attention looks back n_swa positions only
    float rope_freq_base_swa = 10000.0f; // rope.freq_base_swa
    float attn_scale = 0.0f;             // applied to q; 0: 1/sqrt(head_dim) in the softmax (llama)
    float embd_scale = 1.0f;             // token embeddings (not image rows) are multiplied by it
    float final_logit_softcap = 0.0f;    // 0: none
    bool image_attn_bidirectional = false;

    bool is_swa(int il) const { return n_swa > 0 && il < (int)swa_layers.size() && swa_layers[il]; }
    float layer_rope_base(int il) const { return is_swa(il) ? rope_freq_base_swa : rope_freq_base; }
    float layer_rope_scale(int il) const { return is_swa(il) ? 1.0f : rope_freq_scale; }

    int n_embd_q() const { return head_dim * n_head; }
    int n_embd_kv() const { return head_dim * n_head_kv; }
};

// One decoder block. Biases are null when the file has none (llama has none, qwen2 and qwen2vl have q/k/v).
struct Layer {
    ggml_tensor *attn_norm = nullptr;
    ggml_tensor *wq = nullptr, *wk = nullptr, *wv = nullptr, *wo = nullptr;
    ggml_tensor *bq = nullptr, *bk = nullptr, *bv = nullptr, *bo = nullptr;
    ggml_tensor *ffn_norm = nullptr;
    ggml_tensor *ffn_gate = nullptr, *ffn_up = nullptr, *ffn_down = nullptr;  // neuron i = row i of gate/up, column i of down
    // gemma3: RMS norms of q and k per head, and of the attention and FFN outputs before their residuals
    ggml_tensor *attn_q_norm = nullptr, *attn_k_norm = nullptr;  // [head_dim]
    ggml_tensor *attn_post_norm = nullptr, *ffn_post_norm = nullptr;  // [n_embd]
};

// A LoRA adapter (llama.cpp's format): W x + scale * B (A x) for each adapted matrix, with
// scale = user scale * alpha / rank (alpha 0: the user scale). a: [n_in, r], b: [r, n_out].
struct LoraMatrix {
    ggml_tensor *a = nullptr, *b = nullptr;
    float scale = 0.0f;
    explicit operator bool() const { return a != nullptr; }
};

struct LoraLayer {
    LoraMatrix wq, wk, wv, wo, ffn_gate, ffn_up, ffn_down;
};

struct LoraAdapter {
    std::string path;
    float alpha = 0.0f, user_scale = 1.0f;
    bool adapts_ffn = false;
    std::vector<LoraLayer> layers;
    gguf_context *gguf = nullptr;
    ggml_context *ctx = nullptr;
    ggml_backend_buffer_t buffer = nullptr;

    LoraAdapter() = default;
    LoraAdapter(const LoraAdapter &) = delete;
    LoraAdapter &operator=(const LoraAdapter &) = delete;
    ~LoraAdapter();
};

struct Model {
    HParams hp;
    std::string path;

    ggml_tensor *tok_embd = nullptr;     // [n_embd, n_vocab]
    ggml_tensor *output_norm = nullptr;  // [n_embd]
    ggml_tensor *output = nullptr;       // [n_embd, n_vocab]; == tok_embd when tied
    ggml_tensor *rope_freqs = nullptr;   // [n_rot/2] or null (llama3-style frequency factors)
    bool tied_output = false;
    std::vector<Layer> layers;
    std::unique_ptr<LoraAdapter> lora;  // null without an adapter

    // backend the graph runs on (GPU/Metal when the registry has one, else CPU), and the CPU
    // backend for ops the device lacks; both are handed to the scheduler.
    ggml_backend_t backend = nullptr;
    ggml_backend_t backend_cpu = nullptr;
    ggml_backend_dev_t device = nullptr;
    std::string device_name;

    gguf_context *gguf = nullptr;
    ggml_context *ctx_meta = nullptr;  // tensor descriptors created by gguf (no data)
    std::vector<ggml_backend_buffer_t> weight_buffers;
    void *mapping = nullptr;
    size_t mapping_size = 0;
    int n_threads = 1;

    Model() = default;
    Model(const Model &) = delete;
    Model &operator=(const Model &) = delete;
    ~Model();

    void set_n_threads(int n);
    size_t weight_bytes() const;

    // The tensor's bytes as stored in the file (the graph's copy may be repacked).
    const uint8_t *file_bytes(const ggml_tensor *t) const;
    // Where a new matrix shaped like `like` should live so matmuls read it as fast as the file's
    // weights (a repacking buffer type on the CPU when the backend offers one).
    ggml_backend_buffer_type_t matrix_buffer_type(const ggml_tensor *like) const;

    size_t data_offset = 0;                                     // of the tensor data in the file
    std::vector<ggml_backend_buffer_type_t> extra_bufts;        // the CPU backend's repacking types
};

struct LoadParams {
    int n_threads = 0;     // 0: all hardware threads
    bool use_gpu = true;   // take a GPU/Metal device from the registry when there is one
    std::string lora_path; // a LoRA adapter GGUF to apply, or empty
    float lora_scale = 1.0f;
};

// Reads hyperparameters and weights; throws load_error with a message naming the problem.
std::unique_ptr<Model> load_model(const std::string &path, const LoadParams &params);

const char *arch_name(Arch arch);

}  // namespace cmx

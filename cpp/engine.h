// cmx engine: the decoder graph over a Model, its KV cache, and evaluation.
//
// The layer loop is built for CoreMatching: every layer has its own KV cache length and stores
// the explicit position of each cached token, so the loop may continue with fewer tokens after
// any layer (Prune) and later layers and their caches never see the dropped tokens. The FFN
// builder takes an optional neuron index set (FfnNeurons), the hook for core neurons.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "model.h"

namespace cmx {

// Per-layer KV cache. k: [n_embd_kv, n_ctx] (token j is row j); v is stored transposed,
// [n_ctx, n_embd_kv], so attention reads it with one matmul (llama.cpp's non-flash layout).
// pos[j] is the RoPE position of cached token j; size() of pos is the layer's length.
struct LayerCache {
    ggml_tensor *k = nullptr;
    ggml_tensor *v = nullptr;
    std::vector<int32_t> pos;
};

struct KVCache {
    int n_ctx = 0;
    ggml_context *ctx = nullptr;
    ggml_backend_buffer_t buffer = nullptr;
    std::vector<LayerCache> layers;

    KVCache(const Model &model, int n_ctx);
    ~KVCache();
    KVCache(const KVCache &) = delete;
    KVCache &operator=(const KVCache &) = delete;

    void clear();
    // Forget cached tokens from index n on, in every layer whose cache is longer.
    void truncate(int n);
    int max_len() const;
};

// One evaluation: rows in sequence order, each either a token id or a row of float embeddings.
struct Batch {
    std::vector<int32_t> tokens;     // per row: token id, or -1 where the row comes from `embd`
    const float *embd = nullptr;     // [n_embd_rows, n_embd] row-major, for the -1 rows in order
    int n_embd_rows = 0;
    std::vector<int32_t> pos;        // per row: RoPE position (explicit; need not be contiguous)
    std::vector<int32_t> out_rows;   // rows whose logits are returned (after pruning: kept rows)
};

// Token pruning hook: layers <= after_layer see all rows of the batch, later layers only
// keep_rows (ascending batch row indices). after_layer < 0 disables it.
struct Prune {
    int after_layer = -1;
    std::vector<int32_t> keep_rows;
};

// Neuron index set for one layer's FFN (the core-neuron hook); empty means dense.
struct FfnNeurons {
    std::vector<int32_t> rows;  // ascending neuron indices in [0, n_ff)
};

struct EngineParams {
    int n_ctx = 4096;
    int n_batch = 512;  // rows per graph evaluation during prefill
};

class Engine {
   public:
    Engine(std::shared_ptr<Model> model, const EngineParams &params);
    ~Engine();
    Engine(const Engine &) = delete;
    Engine &operator=(const Engine &) = delete;

    // Evaluates the batch on top of the cache (split into n_batch-row graphs) and returns the
    // logits of out_rows, [out_rows.size(), n_vocab] row-major. Throws std::invalid_argument for
    // bad input, before anything reaches ggml.
    std::vector<float> decode(const Batch &batch, const Prune &prune = {});

    // Core-neuron sets per layer (empty vector or empty set: dense). Applied to later decodes.
    void set_ffn_neurons(std::vector<FfnNeurons> per_layer);

    const Model &model() const { return *model_; }
    KVCache &cache() { return *cache_; }
    int n_ctx() const { return params_.n_ctx; }
    int n_batch() const { return params_.n_batch; }

   private:
    struct Graph;  // a built, allocated graph kept for reuse (graph.h)

    std::vector<float> decode_ubatch(const Batch &batch, size_t begin, size_t end, int embd_begin, const Prune &prune);
    void validate(const Batch &batch, const Prune &prune) const;
    std::vector<int64_t> graph_key(const Batch &batch, size_t begin, size_t end, const Prune &prune) const;

    std::shared_ptr<Model> model_;
    EngineParams params_;
    std::unique_ptr<KVCache> cache_;
    std::vector<FfnNeurons> ffn_neurons_;
    int64_t ffn_neurons_version_ = 0;
    ggml_backend_sched_t sched_ = nullptr;
    std::unique_ptr<Graph> graph_;
};

}  // namespace cmx

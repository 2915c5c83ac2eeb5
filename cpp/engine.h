// cmx engine: the decoder graph over a Model, its KV cache, and evaluation.
//
// The layer loop is built for CoreMatching: every layer has its own KV cache length and stores
// the explicit position of each cached token, so a prefill can run layers 0..K over every row,
// choose the kept rows, and run the later layers over those only (their caches never see the
// dropped tokens). Decode steps read the compact core-neuron FFN weights when set (sparsity.h).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "model.h"
#include "sparsity.h"

namespace cmx {

// What a graph does with a layer's FFN activations (bit flags per layer): neuron statistics
// (computed in the graph), or the activations themselves (token scores at the pruning layer).
// kActTextStats: the layer's statistics op skips the rows Batch::image_rows marks (their
// statistics would be forgotten: NeuronTokens::text).
enum ActUse : uint8_t { kActStats = 1, kActCapture = 2, kActTextStats = 4 };

// Per-layer KV cache. k: [n_embd_kv, n_ctx] (token j is row j); v is stored transposed,
// [n_ctx, n_embd_kv], so attention reads it with one matmul (llama.cpp's non-flash layout).
// pos[j] is the sequence position of cached token j (its RoPE position, but for M-RoPE models);
// size() of pos is the layer's length. M-RoPE models also keep each token's 4 position components
// in rope_pos ([len][4]: what its k row was rotated with). stats holds, row for row, what
// CoreMatching needs of each cached token's FFN activations.
struct LayerCache {
    ggml_tensor *k = nullptr;
    ggml_tensor *v = nullptr;
    std::vector<int32_t> pos;
    std::vector<int32_t> rope_pos;
    NeuronStats stats;
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
    // Forget the cached tokens at positions >= n, in every layer (positions grow along a cache).
    void truncate(int n);
    int max_len() const;
};

// One evaluation: rows in sequence order, each either a token id or a row of float embeddings.
struct Batch {
    std::vector<int32_t> tokens;     // per row: token id, or -1 where the row comes from `embd`
    const float *embd = nullptr;     // [n_embd_rows, n_embd] row-major, for the -1 rows in order
    int n_embd_rows = 0;
    std::vector<int32_t> pos;        // per row: sequence position (explicit; need not be contiguous); RoPE's but for M-RoPE
    // M-RoPE models (qwen2vl): per row its 4 position components (temporal, row, column, unused),
    // [n_rows][4]; an image token's come from its grid, a text token's are (p, p, p, 0). Empty:
    // every row is a text token at its sequence position.
    std::vector<int32_t> rope_pos;
    std::vector<int32_t> out_rows;   // rows whose logits are returned (after pruning: kept rows)
    std::vector<uint8_t> image_rows; // per row: 1 for an image's row (empty: none); read by kActTextStats
    // per row: 0, or an image's number (> 0): rows with the same number attend to each other both
    // ways (the model's image_attn_bidirectional; empty: all causal). Graphs are split so that an
    // image shorter than n_batch stays in one, as llama.cpp decodes an image chunk in one ubatch.
    std::vector<int32_t> attn_group;
};

// Token pruning: layers <= after_layer see all rows of the batch, later layers only keep_rows
// (ascending batch row indices). after_layer < 0 disables it.
struct Prune {
    int after_layer = -1;
    std::vector<int32_t> keep_rows;
};

// An image's rows in a prefill batch. `keep` (indices into the image, ascending) forces its kept
// tokens; empty: the scores of SparsityParams select them. `merge` (with keep; one group of image
// indices per kept token, holding it) makes kept token i carry the mean of its group's hidden
// states after layer K, at its own position: pooling at the place where the others prune.
// `rows`, when set, lists the image's n_rows batch rows (ascending, first_row the first): an image
// split by text rows (SmolVLM's tiles), pruned as one; else rows first_row .. first_row + n_rows - 1.
struct ImageSpan {
    int32_t first_row = 0;
    int32_t n_rows = 0;
    std::vector<int32_t> keep;
    std::vector<std::vector<int32_t>> merge;
    std::vector<int32_t> rows;
    int32_t row(int32_t j) const { return rows.empty() ? first_row + j : rows[(size_t)j]; }  // batch row of token j
    int32_t end_row() const { return rows.empty() ? first_row + n_rows : rows.back() + 1; }
};

struct PrefillResult {
    std::vector<float> logits;                // [out_rows.size(), n_vocab]
    std::vector<std::vector<int32_t>> kept;   // per image: kept indices into the image
    std::vector<int32_t> core_neurons;        // per layer: core neurons its decode FFN reads (n_ff: dense)
    double select_ms = 0.0;                   // scoring and choosing tokens
    double stats_ms = 0.0;                    // per-token neuron statistics (the graph op and the copy into the cache)
    double compact_ms = 0.0;                  // building the compact FFN weights
    int table_layers = 0;                     // layers whose core neurons came from the stored table
};

// Debug description of a built graph, for checks of which backend can run each node
// (tests/test_metal_ops.py holds it against the pinned Metal backend's supports_op).
struct TensorDesc {
    std::string name;
    ggml_type type = GGML_TYPE_F32;
    int64_t ne[4] = {0, 0, 0, 0};
    bool contiguous = false, contiguous_1 = false, contiguous_rows = false, transposed = false;  // ggml's predicates
};
struct NodeDesc {
    ggml_op op = GGML_OP_NONE;
    std::string kind;                          // ggml_op_desc: the UNARY / GLU kind, else the op's name
    std::vector<int32_t> params;               // op_params as int32 words (ROPE: [2] is the mode, [11..14] M-RoPE's sections)
    TensorDesc dst;
    std::vector<std::optional<TensorDesc>> src;  // src[0..last set one]; nullopt where a slot is empty
};
struct GraphDesc {
    bool decode = false;  // built by Engine::decode (reads compact FFN weights when set), else by prefill
    int layer_begin = 0, layer_end = 0;
    int64_t n_rows = 0;
    std::vector<NodeDesc> nodes;
    std::vector<size_t> unaligned;  // nodes computed into memory that does not start on a 64-byte boundary
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
    // logits of out_rows, [out_rows.size(), n_vocab] row-major (with pruning, out_rows index the
    // kept rows). FFNs read only the core neurons set by set_ffn_neurons / prefill, if any.
    // Throws std::invalid_argument for bad input, before anything reaches ggml.
    std::vector<float> decode(const Batch &batch, const Prune &prune = {});

    // A prompt's prefill (dense FFNs). With sparsity: CoreMatching selects each image's core
    // tokens after layer sp->prune_layer (anchor_row: the anchor score's token) and, when
    // sp->neurons, sets the core neurons of later decodes; without, decodes go dense.
    PrefillResult prefill(const Batch &batch, const std::vector<ImageSpan> &images, int anchor_row,
                          const SparsityParams *sp);

    // Core-neuron sets per layer (empty set, or all of n_ff: dense), applied to later decodes.
    void set_ffn_neurons(const std::vector<std::vector<int32_t>> &per_layer);
    std::vector<std::vector<int32_t>> ffn_neurons() const;

    // Debug: while on, every graph built is described into recorded_graphs() (a reused graph is not
    // built again, so not recorded again). Turning it on forgets earlier records. Off: costs nothing.
    void record_graphs(bool on);
    const std::vector<GraphDesc> &recorded_graphs() const { return recorded_; }

    const Model &model() const { return *model_; }
    KVCache &cache() { return *cache_; }
    int n_ctx() const { return params_.n_ctx; }
    int n_batch() const { return params_.n_batch; }

   private:
    struct Graph;  // a built, allocated graph kept for reuse (engine.cpp)

    struct StageOut {
        std::vector<float> logits;    // of out_rows, from the last graph
        std::vector<float> hidden;    // [n_rows][n_embd], when the stage ends before the last layer
        std::vector<float> captured;  // [n_rows][n_ff], activations of the layer flagged kActCapture
        std::vector<float> last_attention;  // [n_head][n_kv]: the attn_layer's weights of the last row
        int64_t last_attention_n_kv = 0;
    };
    // Rows that go on after the pruning layer (ascending batch rows); merged[i], when given and
    // non-empty, lists the batch rows whose mean hidden state kept row i carries.
    struct KeepChoice {
        std::vector<int32_t> rows;
        std::vector<std::vector<int32_t>> merged;
    };

    // Layers [layer_begin, layer_end) over every row of the batch, in n_batch-row graphs;
    // attn_layer >= 0: also the attention weights of the batch's last row in that layer.
    void run_stage(const Batch &batch, int layer_begin, int layer_end, const std::vector<uint8_t> &act_use,
                   double rho, bool use_compact, StageOut &out, double *stats_ms, int attn_layer = -1);
    // The whole forward: one stage, or with pruning layers 0..after_layer over every row, then
    // choose_keep from that stage's output, then the later layers over the kept rows only.
    // out_rows index the batch (out_in_kept: the kept rows).
    using ChooseKeep = std::function<KeepChoice(const StageOut &)>;
    std::vector<float> forward(const Batch &batch, int after_layer, const ChooseKeep &choose_keep, bool out_in_kept,
                               const std::vector<uint8_t> &act_use, double rho, bool use_compact, double *stats_ms,
                               int attn_layer = -1);
    void validate(const Batch &batch) const;
    // The batch with attn_group set for a model whose image rows attend bidirectionally: each
    // image span one group, embedding rows outside them one group per run; else the batch as is.
    const Batch &with_image_groups(const Batch &batch, const std::vector<ImageSpan> &images, Batch &storage) const;
    // Rows [begin, end) of each graph of a stage: n_batch rows, cut earlier before an image that
    // would straddle the cut (an attn_group run fitting in n_batch stays whole).
    std::vector<std::pair<size_t, size_t>> graph_ranges(const Batch &batch) const;
    // The stored-profile parts of SparsityParams (thresholds, neuron_order), checked.
    void validate_profile_params(const SparsityParams &sp) const;
    // Per layer, what the graph's statistics ops compute: kmax slots for rho, and the running
    // prefill's tau (stat_thresholds_; NaN: sort mode).
    std::vector<StatsOp> stats_ops(double rho) const;
    // A sparse layer's C^beta after a prefill: from its statistics, or the stored table when the
    // layer holds fewer than sp.short_prompt_tokens tokens with statistics.
    std::vector<int32_t> layer_core_neurons(const SparsityParams &sp, int il, PrefillResult &res) const;
    // The image rows this prefill added to layer il (which held every row of the batch) stop
    // counting towards its core neurons.
    void forget_image_stats(const Batch &batch, const std::vector<ImageSpan> &images, int il);
    void validate_sparsity(const Batch &batch, const std::vector<ImageSpan> &images, int anchor_row, const SparsityParams &sp) const;
    std::vector<int64_t> graph_key(const Batch &batch, size_t begin, size_t end, int layer_begin, int layer_end,
                                   const std::vector<uint8_t> &act_use, const std::vector<StatsOp> &ops, bool use_compact,
                                   int attn_layer) const;

    std::shared_ptr<Model> model_;
    EngineParams params_;
    std::unique_ptr<KVCache> cache_;
    CompactFfn compact_;
    ggml_backend_sched_t sched_ = nullptr;
    std::unique_ptr<Graph> graph_;
    std::vector<uint8_t> graph_mem_;  // the graph's tensor and node metadata, reused by every graph
    std::vector<float> stat_thresholds_;  // the running prefill's per-layer tau (empty: sort)
    bool recording_ = false;
    std::vector<GraphDesc> recorded_;
};

}  // namespace cmx

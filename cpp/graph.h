// The decoder graph: shared builders (norm, attention, FFN) and the layer loop.
#pragma once

#include <vector>

#include "engine.h"
#include "sparsity.h"

namespace cmx {

// Inputs the caller fills after the scheduler has allocated the graph.
struct GraphInputs {
    ggml_tensor *tokens = nullptr;      // I32 [n_token_rows]
    ggml_tensor *embd = nullptr;        // F32 [n_embd, n_embd_rows]
    ggml_tensor *row_order = nullptr;   // I32 [n_rows]: mixed batches interleave tokens and embeddings
    ggml_tensor *pos = nullptr;         // I32 [n_rows], M-RoPE: [4 * n_rows] (component-major)
    ggml_tensor *out_rows = nullptr;    // I32 [n_out]
    ggml_tensor *stats_rows = nullptr;  // I32 [n_rows]: 1 where kActTextStats layers take statistics
    struct Mask {
        ggml_tensor *t;  // F32 [n_kv, n_q]; n_kv = n_past + n_q rounded up (padding masked)
        int layer;       // a layer whose cache length (n_past) defines it
        bool swa;        // for sliding-window layers: rows further back than the window are masked too
    };
    std::vector<Mask> masks;
    struct Slots {
        ggml_tensor *k;  // I64 [n_q]: cache rows the new k rows go to
        ggml_tensor *v;  // I64 [n_q * n_embd_kv]: flat indices into the transposed v cache
        int layer;       // a layer whose cache length defines them
    };
    std::vector<Slots> slots;
};

// Outputs besides the logits.
struct GraphOutputs {
    ggml_tensor *logits = nullptr;  // F32 [n_vocab, n_out], when the graph ends at the last layer
    ggml_tensor *hidden = nullptr;  // F32 [n_embd, n_rows], when it ends before the last layer
    std::vector<std::pair<int, ggml_tensor *>> acts;   // (layer, F32 [n_ff, n_rows]): FFN activations (kActCapture)
    std::vector<std::pair<int, ggml_tensor *>> stats;  // (layer, I32 [1 + kmax, n_rows]): token_stats rows (kActStats)
    ggml_tensor *last_attention = nullptr;  // F32 [n_kv, n_head]: attn_layer's softmax row of the last row
};

struct GraphSpec {
    const Batch *batch;
    size_t begin, end;                 // batch rows of this graph
    int layer_begin = 0, layer_end = 0;  // layers run; rows enter layer_begin as tokens or embeddings
    const std::vector<uint8_t> *act_use = nullptr;       // per layer: ActUse bits (kActStats, kActCapture)
    std::vector<StatsOp> *stats_ops = nullptr;           // per layer, for kActStats layers; outlives the graph's runs
    const CompactFfn *compact = nullptr;                 // core-neuron FFN weights (decode)
    int attn_layer = -1;                                 // output this layer's attention of the last row
};

// Builds the forward graph over layers [layer_begin, layer_end) into ctx; fills `in`.
GraphOutputs build_forward(ggml_context *ctx, ggml_cgraph *gf, const Model &model, KVCache &cache,
                           const GraphSpec &spec, GraphInputs &in);

}  // namespace cmx

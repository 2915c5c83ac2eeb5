// The decoder graph: shared builders (norm, attention, FFN) and the layer loop.
#pragma once

#include <vector>

#include "engine.h"

namespace cmx {

// Inputs the caller fills after the scheduler has allocated the graph.
struct GraphInputs {
    ggml_tensor *tokens = nullptr;      // I32 [n_token_rows]
    ggml_tensor *embd = nullptr;        // F32 [n_embd, n_embd_rows]
    ggml_tensor *row_order = nullptr;   // I32 [n_rows]: mixed batches interleave tokens and embeddings
    ggml_tensor *pos = nullptr;         // I32 [n_rows]
    ggml_tensor *pos_kept = nullptr;    // I32 [n_kept] (after pruning)
    ggml_tensor *keep_rows = nullptr;   // I32 [n_kept]
    ggml_tensor *out_rows = nullptr;    // I32 [n_out]
    struct Mask {
        ggml_tensor *t;  // F32 [n_kv, n_q]; n_kv = n_past + n_q rounded up (padding masked)
        int layer;       // a layer whose cache length (n_past) defines it
        bool pruned;     // queries are the kept rows
    };
    std::vector<Mask> masks;
    struct Slots {
        ggml_tensor *k;  // I64 [n_q]: cache rows the new k rows go to
        ggml_tensor *v;  // I64 [n_q * n_embd_kv]: flat indices into the transposed v cache
        int layer;       // a layer whose cache length defines them
    };
    std::vector<Slots> slots;
    struct Neurons {
        ggml_tensor *rows;   // I32 [k]
        ggml_tensor *zeros;  // F32 [n_q, n_ff], scatter target for the down projection
        int layer;
    };
    std::vector<Neurons> neurons;
};

struct GraphSpec {
    const Batch *batch;
    size_t begin, end;       // batch rows of this graph
    const Prune *prune;      // keep_rows relative to `begin` (only for a single-graph batch)
    const std::vector<FfnNeurons> *ffn_neurons;
};

// Builds the forward graph into ctx; fills `in` and returns the logits tensor [n_vocab, n_out].
ggml_tensor *build_forward(ggml_context *ctx, ggml_cgraph *gf, const Model &model, KVCache &cache,
                           const GraphSpec &spec, GraphInputs &in);

}  // namespace cmx

// The decoder graph. A block is attention then FFN, each pre-normed with a residual; the layer
// loop is where token pruning happens and build_ffn is where core neurons go.
#include "graph.h"

#include <algorithm>
#include <cmath>

namespace cmx {

namespace {

constexpr int64_t kKVPad = 256;

struct Builder {
    ggml_context *ctx;
    ggml_cgraph *gf;
    const Model &model;
    const HParams &hp;
    KVCache &cache;
    GraphInputs &in;

    ggml_tensor *rms_norm(ggml_tensor *x, ggml_tensor *weight) {
        return ggml_mul(ctx, ggml_rms_norm(ctx, x, hp.norm_eps), weight);  // [n_embd, n_q]
    }

    ggml_tensor *linear(ggml_tensor *w, ggml_tensor *b, ggml_tensor *x) {
        ggml_tensor *y = ggml_mul_mat(ctx, w, x);
        return b ? ggml_add(ctx, y, b) : y;
    }

    ggml_tensor *rope(ggml_tensor *x, ggml_tensor *pos) {
        return ggml_rope_ext(ctx, x, pos, model.rope_freqs, hp.n_rot, hp.rope_mode, hp.n_ctx_orig, hp.rope_freq_base,
                             hp.rope_freq_scale, hp.yarn_ext_factor, hp.yarn_attn_factor, hp.yarn_beta_fast,
                             hp.yarn_beta_slow);
    }

    // Self-attention of n_q new rows over the layer's cache (n_past cached rows + the new ones).
    ggml_tensor *attention(int il, ggml_tensor *x, ggml_tensor *pos, ggml_tensor *mask) {
        const Layer &l = model.layers[il];
        LayerCache &lc = cache.layers[il];
        const int64_t n_q = x->ne[1], D = hp.head_dim, n_kv = mask->ne[0];
        const size_t es = ggml_element_size(lc.k);

        ggml_tensor *q = ggml_reshape_3d(ctx, linear(l.wq, l.bq, x), D, hp.n_head, n_q);     // [D, n_head, n_q]
        ggml_tensor *k = ggml_reshape_3d(ctx, linear(l.wk, l.bk, x), D, hp.n_head_kv, n_q);  // [D, n_head_kv, n_q]
        ggml_tensor *v = linear(l.wv, l.bv, x);                                                  // [n_embd_kv, n_q]
        q = rope(q, pos);
        k = rope(k, pos);

        // Append the new rows to this layer's cache: k by rows, v (transposed) element by element.
        // The slots are graph inputs, so one decode graph serves every position (graph reuse).
        auto [k_slots, v_slots] = slots_for(il, n_q);
        ggml_tensor *k_rows = ggml_reshape_2d(ctx, k, hp.n_embd_kv(), n_q);                                   // [n_embd_kv, n_q]
        ggml_tensor *v_elems = ggml_reshape_2d(ctx, v, 1, hp.n_embd_kv() * n_q);                               // [1, n_embd_kv*n_q]
        ggml_tensor *v_cache = ggml_reshape_2d(ctx, lc.v, 1, ggml_nelements(lc.v));                           // [1, n_ctx*n_embd_kv]
        ggml_build_forward_expand(gf, ggml_set_rows(ctx, lc.k, k_rows, k_slots));
        ggml_build_forward_expand(gf, ggml_set_rows(ctx, v_cache, v_elems, v_slots));

        ggml_tensor *K = ggml_view_3d(ctx, lc.k, D, n_kv, hp.n_head_kv, lc.k->nb[1], es * D, 0);      // [D, n_kv, n_head_kv]
        ggml_tensor *V = ggml_view_3d(ctx, lc.v, n_kv, D, hp.n_head_kv, lc.v->nb[1], lc.v->nb[1] * D, 0);  // [n_kv, D, n_head_kv]
        q = ggml_permute(ctx, q, 0, 2, 1, 3);                                                        // [D, n_q, n_head]

        ggml_tensor *kq = ggml_mul_mat(ctx, K, q);  // [n_kv, n_q, n_head]
        ggml_prec_set_acc(kq, GGML_PREC_F32);
        kq = ggml_soft_max_ext(ctx, kq, mask, 1.0f / std::sqrt((float)D), 0.0f);
        ggml_tensor *kqv = ggml_mul_mat(ctx, V, kq);                 // [D, n_q, n_head]
        kqv = ggml_cont(ctx, ggml_permute(ctx, kqv, 0, 2, 1, 3));    // [D, n_head, n_q]
        kqv = ggml_reshape_2d(ctx, kqv, hp.n_embd_q(), n_q);        // [n_embd_q, n_q]
        return linear(l.wo, l.bo, kqv);                              // [n_embd, n_q]
    }

    // SwiGLU FFN. With a neuron set only those rows of gate/up are read; their activations are
    // scattered back to n_ff so the down projection is unchanged (the compacted down matrix for
    // decoding is the sparsity module's job).
    ggml_tensor *ffn(int il, ggml_tensor *x, const FfnNeurons *neurons) {
        const Layer &l = model.layers[il];
        if (!neurons || neurons->rows.empty()) {
            ggml_tensor *a = ggml_swiglu_split(ctx, ggml_mul_mat(ctx, l.ffn_gate, x), ggml_mul_mat(ctx, l.ffn_up, x));  // [n_ff, n_q]
            return ggml_mul_mat(ctx, l.ffn_down, a);  // [n_embd, n_q]
        }
        const int64_t k = (int64_t)neurons->rows.size(), n_q = x->ne[1];
        ggml_tensor *rows = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, k);
        ggml_tensor *zeros = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n_q, hp.n_ff);
        ggml_set_input(rows);
        ggml_set_input(zeros);
        in.neurons.push_back({rows, zeros, il});
        ggml_tensor *gate = ggml_get_rows(ctx, l.ffn_gate, rows);  // [n_embd, k]
        ggml_tensor *up = ggml_get_rows(ctx, l.ffn_up, rows);      // [n_embd, k]
        ggml_tensor *a = ggml_swiglu_split(ctx, ggml_mul_mat(ctx, gate, x), ggml_mul_mat(ctx, up, x));  // [k, n_q]
        ggml_tensor *a_full = ggml_set_rows(ctx, zeros, ggml_cont(ctx, ggml_transpose(ctx, a)), rows);    // [n_q, n_ff]
        a_full = ggml_cont(ctx, ggml_transpose(ctx, a_full));                                              // [n_ff, n_q]
        return ggml_mul_mat(ctx, l.ffn_down, a_full);
    }

    // Cache slots written by this graph; layers with equal cache lengths share them.
    std::pair<ggml_tensor *, ggml_tensor *> slots_for(int il, int64_t n_q) {
        for (auto &sl : in.slots)
            if (cache.layers[sl.layer].pos.size() == cache.layers[il].pos.size() && sl.k->ne[0] == n_q) return {sl.k, sl.v};
        ggml_tensor *k = ggml_new_tensor_1d(ctx, GGML_TYPE_I64, n_q);
        ggml_tensor *v = ggml_new_tensor_1d(ctx, GGML_TYPE_I64, n_q * hp.n_embd_kv());
        ggml_set_input(k);
        ggml_set_input(v);
        in.slots.push_back({k, v, il});
        return {k, v};
    }

    // Attention spans the cache padded to kKVPad entries (masked), as llama.cpp does: the same
    // reduction lengths give the same rounding, hence logits equal to llama.cpp's.
    ggml_tensor *new_mask(int il, int64_t n_q, bool pruned) {
        const int64_t n_past = (int64_t)cache.layers[il].pos.size();
        const int64_t n_kv = std::min<int64_t>(cache.n_ctx, GGML_PAD(n_past + n_q, kKVPad));
        ggml_tensor *m = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n_kv, n_q);  // [n_kv, n_q]
        ggml_set_input(m);
        in.masks.push_back({m, il, pruned});
        return m;
    }

    // Causal in sequence order, so a mask depends only on the cache length and the queries:
    // layers with equal lengths (all of them, unless pruning made two groups) share one.
    ggml_tensor *mask_for(int il, int64_t n_q, bool pruned) {
        for (auto &m : in.masks)
            if (m.pruned == pruned && cache.layers[m.layer].pos.size() == cache.layers[il].pos.size()) return m.t;
        return new_mask(il, n_q, pruned);
    }
};

ggml_tensor *input_tensor(ggml_context *ctx, ggml_type type, int64_t n0, int64_t n1, const char *name) {
    ggml_tensor *t = n1 ? ggml_new_tensor_2d(ctx, type, n0, n1) : ggml_new_tensor_1d(ctx, type, n0);
    ggml_set_name(t, name);
    ggml_set_input(t);
    return t;
}

}  // namespace

ggml_tensor *build_forward(ggml_context *ctx, ggml_cgraph *gf, const Model &model, KVCache &cache,
                           const GraphSpec &spec, GraphInputs &in) {
    const HParams &hp = model.hp;
    Builder b{ctx, gf, model, hp, cache, in};
    const Batch &batch = *spec.batch;
    const int64_t n_rows = (int64_t)(spec.end - spec.begin);

    int64_t n_token_rows = 0;
    for (size_t i = spec.begin; i < spec.end; ++i) n_token_rows += batch.tokens[i] >= 0;
    const int64_t n_embd_rows = n_rows - n_token_rows;

    // Input rows: token embeddings, float embeddings, or both put back in sequence order.
    ggml_tensor *x = nullptr;
    if (n_token_rows) {
        in.tokens = input_tensor(ctx, GGML_TYPE_I32, n_token_rows, 0, "inp_tokens");
        x = ggml_get_rows(ctx, model.tok_embd, in.tokens);  // [n_embd, n_token_rows]
    }
    if (n_embd_rows) {
        in.embd = input_tensor(ctx, GGML_TYPE_F32, hp.n_embd, n_embd_rows, "inp_embd");
        x = x ? ggml_concat(ctx, x, in.embd, 1) : in.embd;  // [n_embd, n_rows]
    }
    if (n_token_rows && n_embd_rows) {
        in.row_order = input_tensor(ctx, GGML_TYPE_I32, n_rows, 0, "inp_row_order");
        x = ggml_get_rows(ctx, x, in.row_order);  // [n_embd, n_rows] in sequence order
    }
    in.pos = input_tensor(ctx, GGML_TYPE_I32, n_rows, 0, "inp_pos");
    ggml_tensor *pos = in.pos;

    const Prune *prune = spec.prune && spec.prune->after_layer >= 0 ? spec.prune : nullptr;
    const int64_t n_out = (int64_t)batch.out_rows.size();
    if (n_out) in.out_rows = input_tensor(ctx, GGML_TYPE_I32, n_out, 0, "inp_out_rows");

    bool pruned = false;
    for (int il = 0; il < hp.n_layer; ++il) {
        if (prune && il == prune->after_layer + 1) {
            // CoreMatching: later layers (and their caches) see only the kept rows.
            in.keep_rows = input_tensor(ctx, GGML_TYPE_I32, (int64_t)prune->keep_rows.size(), 0, "inp_keep_rows");
            in.pos_kept = input_tensor(ctx, GGML_TYPE_I32, (int64_t)prune->keep_rows.size(), 0, "inp_pos_kept");
            x = ggml_get_rows(ctx, x, in.keep_rows);  // [n_embd, n_kept]
            pos = in.pos_kept;
            pruned = true;
        }
        const int64_t n_q = x->ne[1];
        const FfnNeurons *neurons = spec.ffn_neurons && il < (int)spec.ffn_neurons->size() ? &(*spec.ffn_neurons)[il] : nullptr;

        ggml_tensor *h = ggml_add(ctx, x, b.attention(il, b.rms_norm(x, model.layers[il].attn_norm), pos, b.mask_for(il, n_q, pruned)));
        if (il == hp.n_layer - 1 && in.out_rows) h = ggml_get_rows(ctx, h, in.out_rows);  // only rows whose logits are wanted
        x = ggml_add(ctx, h, b.ffn(il, b.rms_norm(h, model.layers[il].ffn_norm), neurons));
    }
    if (!in.out_rows) return nullptr;

    ggml_tensor *logits = ggml_mul_mat(ctx, model.output, b.rms_norm(x, model.output_norm));  // [n_vocab, n_out]
    ggml_set_name(logits, "logits");
    ggml_set_output(logits);
    ggml_build_forward_expand(gf, logits);
    return logits;
}

}  // namespace cmx

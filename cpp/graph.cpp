// The decoder graph. A block is attention then FFN, each pre-normed with a residual; the layer
// loop is where token pruning happens and build_ffn is where core neurons go.
#include "graph.h"

#include <algorithm>
#include <chrono>
#include <cmath>

namespace cmx {

namespace {

constexpr int64_t kKVPad = 256;

// A graph input whose memory is a whole number of cache lines. The compute buffer is allocated
// in 32-byte steps from a cache-line-aligned base, so one odd-sized input (4 bytes of output
// row ids) shifts every tensor allocated after it off the 64-byte grid: AVX-512 loads then
// straddle cache lines, which cost cmx ~5-8% of a prefill on a 2-core EPYC against llama.cpp.
// The input is a padded 1-D tensor; the graph reads a view of the first ne0 * ne1 elements.
ggml_tensor *new_input(ggml_context *ctx, ggml_type type, int64_t ne0, int64_t ne1 = 1) {
    constexpr size_t kLine = 64;
    const size_t elem = ggml_type_size(type);  // inputs are plain (non-block) types
    const int64_t n = ne0 * ne1, n_padded = (int64_t)(GGML_PAD(n * elem, kLine) / elem);
    ggml_tensor *t = ggml_new_tensor_1d(ctx, type, n_padded);
    ggml_set_input(t);
    return ne1 == 1 ? ggml_view_1d(ctx, t, ne0, 0) : ggml_view_2d(ctx, t, ne0, ne1, ne0 * elem, 0);
}

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

    // W x (+ the adapter's scale * B (A x), in llama.cpp's order) (+ bias)
    ggml_tensor *linear(ggml_tensor *w, ggml_tensor *b, ggml_tensor *x, const LoraMatrix *lora = nullptr) {
        ggml_tensor *y = ggml_mul_mat(ctx, w, x);
        if (lora && *lora) y = ggml_add(ctx, y, ggml_scale(ctx, ggml_mul_mat(ctx, lora->b, ggml_mul_mat(ctx, lora->a, x)), lora->scale));
        return b ? ggml_add(ctx, y, b) : y;
    }

    const LoraLayer *lora(int il) const { return model.lora ? &model.lora->layers[il] : nullptr; }

    // pos: I32 [n_q], or for M-RoPE [4 * n_q] (each component's n_q positions in turn).
    // Sliding-window layers (gemma3) have their own base and no scaling.
    ggml_tensor *rope(int il, ggml_tensor *x, ggml_tensor *pos) {
        if (hp.mrope()) {
            int sections[GGML_MROPE_SECTIONS];
            std::copy_n(hp.rope_sections, GGML_MROPE_SECTIONS, sections);
            return ggml_rope_multi(ctx, x, pos, model.rope_freqs, hp.n_rot, sections, hp.rope_mode, hp.n_ctx_orig, hp.layer_rope_base(il),
                                   hp.layer_rope_scale(il), hp.yarn_ext_factor, hp.yarn_attn_factor, hp.yarn_beta_fast, hp.yarn_beta_slow);
        }
        return ggml_rope_ext(ctx, x, pos, model.rope_freqs, hp.n_rot, hp.rope_mode, hp.n_ctx_orig, hp.layer_rope_base(il),
                             hp.layer_rope_scale(il), hp.yarn_ext_factor, hp.yarn_attn_factor, hp.yarn_beta_fast,
                             hp.yarn_beta_slow);
    }

    // Self-attention of n_q new rows over the layer's cache (n_past cached rows + the new ones).
    // `last_attn` (optional) receives the attention weights of the last new row (FastV's score).
    ggml_tensor *attention(int il, ggml_tensor *x, ggml_tensor *pos, ggml_tensor *mask, ggml_tensor **last_attn = nullptr) {
        const Layer &l = model.layers[il];
        LayerCache &lc = cache.layers[il];
        const int64_t n_q = x->ne[1], D = hp.head_dim, n_kv = mask->ne[0];
        const size_t es = ggml_element_size(lc.k);

        const LoraLayer *ad = lora(il);
        ggml_tensor *q = ggml_reshape_3d(ctx, linear(l.wq, l.bq, x, ad ? &ad->wq : nullptr), D, hp.n_head, n_q);     // [D, n_head, n_q]
        ggml_tensor *k = ggml_reshape_3d(ctx, linear(l.wk, l.bk, x, ad ? &ad->wk : nullptr), D, hp.n_head_kv, n_q);  // [D, n_head_kv, n_q]
        ggml_tensor *v = linear(l.wv, l.bv, x, ad ? &ad->wv : nullptr);                                                  // [n_embd_kv, n_q]
        if (l.attn_q_norm) q = rms_norm(q, l.attn_q_norm);  // per head (gemma3)
        if (l.attn_k_norm) k = rms_norm(k, l.attn_k_norm);
        q = rope(il, q, pos);
        k = rope(il, k, pos);
        // gemma3 scales q itself (its rule for the scale), the softmax then by 1
        float kq_scale = 1.0f / std::sqrt((float)D);
        if (hp.attn_scale != 0.0f) {
            q = ggml_scale(ctx, q, hp.attn_scale);
            kq_scale = 1.0f;
        }

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
        kq = ggml_soft_max_ext(ctx, kq, mask, kq_scale, 0.0f);
        if (last_attn)  // the last query's row of every head, copied out before kq is reused
            *last_attn = ggml_cont(ctx, ggml_view_2d(ctx, kq, n_kv, hp.n_head, kq->nb[2], (n_q - 1) * kq->nb[1]));  // [n_kv, n_head]
        ggml_tensor *kqv = ggml_mul_mat(ctx, V, kq);                 // [D, n_q, n_head]
        kqv = ggml_cont(ctx, ggml_permute(ctx, kqv, 0, 2, 1, 3));    // [D, n_head, n_q]
        kqv = ggml_reshape_2d(ctx, kqv, hp.n_embd_q(), n_q);        // [n_embd_q, n_q]
        return linear(l.wo, l.bo, kqv, ad ? &ad->wo : nullptr);      // [n_embd, n_q]
    }

    // act(gate) * up: SwiGLU, or GELU(tanh)-gated (gemma3)
    ggml_tensor *gated(ggml_tensor *gate, ggml_tensor *up) {
        return hp.ffn_act == FfnAct::gelu ? ggml_geglu_split(ctx, gate, up) : ggml_swiglu_split(ctx, gate, up);
    }

    // Gated FFN, the hook for core neurons: with a compact layer (decode under CoreMatching) it
    // reads only the core neurons' gate/up rows and down columns. `act` receives the activations.
    ggml_tensor *ffn(int il, ggml_tensor *x, const CompactFfn::Layer *core, ggml_tensor **act) {
        const Layer &l = model.layers[il];
        if (core) {  // compact weights (an adapter on the FFN is refused with core neurons)
            ggml_tensor *a = gated(ggml_mul_mat(ctx, core->gate, x), ggml_mul_mat(ctx, core->up, x));  // [k, n_q]
            if (act) *act = a;
            return ggml_mul_mat(ctx, core->down, a);  // [n_embd, n_q]
        }
        const LoraLayer *ad = lora(il);
        ggml_tensor *a = gated(linear(l.ffn_gate, nullptr, x, ad ? &ad->ffn_gate : nullptr),
                               linear(l.ffn_up, nullptr, x, ad ? &ad->ffn_up : nullptr));  // [n_ff, n_q]
        if (act) *act = a;
        return linear(l.ffn_down, nullptr, a, ad ? &ad->ffn_down : nullptr);  // [n_embd, n_q]
    }

    // Cache slots written by this graph; layers with equal cache lengths share them.
    std::pair<ggml_tensor *, ggml_tensor *> slots_for(int il, int64_t n_q) {
        for (auto &sl : in.slots)
            if (cache.layers[sl.layer].pos.size() == cache.layers[il].pos.size() && sl.k->ne[0] == n_q) return {sl.k, sl.v};
        ggml_tensor *k = new_input(ctx, GGML_TYPE_I64, n_q);
        ggml_tensor *v = new_input(ctx, GGML_TYPE_I64, n_q * hp.n_embd_kv());
        in.slots.push_back({k, v, il});
        return {k, v};
    }

    // Attention spans the cache padded to kKVPad entries (masked), as llama.cpp does: the same
    // reduction lengths give the same rounding, hence logits equal to llama.cpp's.
    ggml_tensor *new_mask(int il, int64_t n_q, bool swa) {
        const int64_t n_past = (int64_t)cache.layers[il].pos.size();
        const int64_t n_kv = std::min<int64_t>(cache.n_ctx, GGML_PAD(n_past + n_q, kKVPad));
        ggml_tensor *m = new_input(ctx, GGML_TYPE_F32, n_kv, n_q);  // [n_kv, n_q]
        in.masks.push_back({m, il, swa});
        return m;
    }

    // Causal in sequence order, so a mask depends only on the cache length, the queries and
    // whether the layer slides its window: layers with equal lengths (all of them, unless pruning
    // made two groups) and the same kind share one.
    ggml_tensor *mask_for(int il, int64_t n_q) {
        const bool swa = hp.is_swa(il);
        for (auto &m : in.masks)
            if (cache.layers[m.layer].pos.size() == cache.layers[il].pos.size() && m.swa == swa) return m.t;
        return new_mask(il, n_q, swa);
    }
};

// ggml custom op: token_stats of each activation row, rows split over the op's threads.
void stats_rows(ggml_tensor *dst, int ith, int nth, void *userdata) {
    StatsOp &op = *(StatsOp *)userdata;
    const auto t0 = std::chrono::steady_clock::now();
    const ggml_tensor *act = dst->src[0];     // F32 [n_ff, n_rows]
    const ggml_tensor *wanted = dst->src[1];  // I32 [n_rows] or null: every row
    const int64_t n_rows = act->ne[1];
    for (int64_t r = ith; r < n_rows; r += nth) {
        int32_t *out = (int32_t *)((char *)dst->data + r * dst->nb[1]);
        if (wanted && !((const int32_t *)wanted->data)[r]) {
            out[0] = -1;  // no statistics for this row
            continue;
        }
        token_stats((const float *)((const char *)act->data + r * act->nb[1]), op.n_ff, op.kmax, op.tau, out);
    }
    if (ith == 0) op.ms += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

ggml_tensor *input_tensor(ggml_context *ctx, ggml_type type, int64_t n0, int64_t n1, const char *name) {
    ggml_tensor *t = new_input(ctx, type, n0, n1 ? n1 : 1);
    ggml_set_name(t, name);
    return t;
}

}  // namespace

GraphOutputs build_forward(ggml_context *ctx, ggml_cgraph *gf, const Model &model, KVCache &cache,
                           const GraphSpec &spec, GraphInputs &in) {
    const HParams &hp = model.hp;
    Builder b{ctx, gf, model, hp, cache, in};
    const Batch &batch = *spec.batch;
    const int64_t n_rows = (int64_t)(spec.end - spec.begin);
    GraphOutputs out;

    int64_t n_token_rows = 0;
    for (size_t i = spec.begin; i < spec.end; ++i) n_token_rows += batch.tokens[i] >= 0;
    const int64_t n_embd_rows = n_rows - n_token_rows;

    // Input rows: token embeddings, float embeddings (or hidden states entering a later layer),
    // or both put back in sequence order.
    ggml_tensor *x = nullptr;
    if (n_token_rows) {
        in.tokens = input_tensor(ctx, GGML_TYPE_I32, n_token_rows, 0, "inp_tokens");
        x = ggml_get_rows(ctx, model.tok_embd, in.tokens);  // [n_embd, n_token_rows]
        if (hp.embd_scale != 1.0f) x = ggml_scale(ctx, x, hp.embd_scale);  // token rows only, not image embeddings
    }
    if (n_embd_rows) {
        in.embd = input_tensor(ctx, GGML_TYPE_F32, hp.n_embd, n_embd_rows, "inp_embd");
        x = x ? ggml_concat(ctx, x, in.embd, 1) : in.embd;  // [n_embd, n_rows]
    }
    if (n_token_rows && n_embd_rows) {
        in.row_order = input_tensor(ctx, GGML_TYPE_I32, n_rows, 0, "inp_row_order");
        x = ggml_get_rows(ctx, x, in.row_order);  // [n_embd, n_rows] in sequence order
    }
    in.pos = input_tensor(ctx, GGML_TYPE_I32, n_rows * hp.n_pos_per_row(), 0, "inp_pos");

    const bool to_logits = spec.layer_end == hp.n_layer;
    const int64_t n_out = to_logits ? (int64_t)batch.out_rows.size() : 0;
    if (n_out) in.out_rows = input_tensor(ctx, GGML_TYPE_I32, n_out, 0, "inp_out_rows");

    for (int il = spec.layer_begin; il < spec.layer_end; ++il) {
        const uint8_t use = spec.act_use ? (*spec.act_use)[il] : 0;
        const bool capture = use & kActCapture, stats = use & kActStats, collect = capture || stats;
        const CompactFfn::Layer *core = spec.compact ? spec.compact->layer(il) : nullptr;
        ggml_tensor *act = nullptr;

        const Layer &l = model.layers[il];
        ggml_tensor *last_attn = nullptr;
        ggml_tensor *attn = b.attention(il, b.rms_norm(x, l.attn_norm), in.pos, b.mask_for(il, x->ne[1]),
                                        il == spec.attn_layer ? &last_attn : nullptr);  // [n_embd, n_rows]
        if (l.attn_post_norm) attn = b.rms_norm(attn, l.attn_post_norm);
        ggml_tensor *h = ggml_add(ctx, x, attn);
        if (last_attn) {
            out.last_attention = last_attn;
            ggml_set_name(last_attn, "last_attention");
            ggml_set_output(last_attn);
            ggml_build_forward_expand(gf, last_attn);
        }
        // the last layer's FFN runs only on rows whose logits are wanted (unless its activations are)
        const bool narrow = il == hp.n_layer - 1 && in.out_rows && !collect;
        if (narrow) h = ggml_get_rows(ctx, h, in.out_rows);
        ggml_tensor *f = b.ffn(il, b.rms_norm(h, l.ffn_norm), core, collect ? &act : nullptr);  // [n_embd, n_rows]
        if (l.ffn_post_norm) f = b.rms_norm(f, l.ffn_post_norm);
        x = ggml_add(ctx, h, f);
        if (il == hp.n_layer - 1 && in.out_rows && !narrow) x = ggml_get_rows(ctx, x, in.out_rows);
        if (capture) {
            ggml_set_output(act);
            ggml_build_forward_expand(gf, act);
            out.acts.push_back({il, act});
        }
        if (stats) {
            StatsOp *op = &(*spec.stats_ops)[il];
            ggml_tensor *args[2] = {ggml_is_contiguous(act) ? act : ggml_cont(ctx, act), nullptr};
            if ((use & kActTextStats) && !batch.image_rows.empty()) {
                if (!in.stats_rows) in.stats_rows = input_tensor(ctx, GGML_TYPE_I32, n_rows, 0, "inp_stats_rows");
                args[1] = in.stats_rows;
            }
            // rows padded to whole cache lines (16 words), as the inputs are (new_input)
            ggml_tensor *st = ggml_custom_4d(ctx, GGML_TYPE_I32, GGML_PAD(1 + op->kmax, 16), act->ne[1], 1, 1, args, args[1] ? 2 : 1,
                                             stats_rows, GGML_N_TASKS_MAX, op);  // [>= 1 + kmax, n_rows]
            ggml_format_name(st, "neuron_stats_l%d", il);
            ggml_set_output(st);
            ggml_build_forward_expand(gf, st);
            out.stats.push_back({il, st});
        }
    }
    if (!to_logits) {
        out.hidden = x;  // [n_embd, n_rows]
        ggml_set_name(out.hidden, "hidden_out");
        ggml_set_output(out.hidden);
        ggml_build_forward_expand(gf, out.hidden);
        return out;
    }
    if (!in.out_rows) return out;

    out.logits = ggml_mul_mat(ctx, model.output, b.rms_norm(x, model.output_norm));  // [n_vocab, n_out]
    if (hp.final_logit_softcap != 0.0f)  // cap * tanh(logits / cap)
        out.logits = ggml_scale(ctx, ggml_tanh(ctx, ggml_scale(ctx, out.logits, 1.0f / hp.final_logit_softcap)), hp.final_logit_softcap);
    ggml_set_name(out.logits, "logits");
    ggml_set_output(out.logits);
    ggml_build_forward_expand(gf, out.logits);
    return out;
}

}  // namespace cmx

// Evaluation: KV cache storage, input validation, batch splitting, graph execution.
#include "engine.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <chrono>
#include <limits>
#include <numeric>

#include "ggml-alloc.h"
#include "graph.h"

namespace cmx {

// ---------------------------------------------------------------- KV cache

// Room is rounded up to 256 entries, the attention padding (graph.cpp); the usable length is
// still the engine's n_ctx.
KVCache::KVCache(const Model &model, int n_ctx_) : n_ctx((int)GGML_PAD(n_ctx_, 256)) {
    const HParams &hp = model.hp;
    ggml_init_params ip = {ggml_tensor_overhead() * 2 * (size_t)hp.n_layer + 1024, nullptr, true};
    ctx = ggml_init(ip);
    layers.resize(hp.n_layer);
    for (int il = 0; il < hp.n_layer; ++il) {
        // F16, as llama.cpp's default cache type
        layers[il].k = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, hp.n_embd_kv(), n_ctx);  // [n_embd_kv, n_ctx]
        layers[il].v = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, n_ctx, hp.n_embd_kv());  // [n_ctx, n_embd_kv]
        ggml_format_name(layers[il].k, "cache_k_l%d", il);
        ggml_format_name(layers[il].v, "cache_v_l%d", il);
        layers[il].stats.reserve_rows(n_ctx);  // no slots yet: their size waits for rho
    }
    buffer = ggml_backend_alloc_ctx_tensors(ctx, model.backend);
    if (!buffer) {
        ggml_free(ctx);
        throw std::runtime_error("out of memory allocating the KV cache (n_ctx=" + std::to_string(n_ctx) + ")");
    }
    ggml_backend_buffer_clear(buffer, 0);
}

KVCache::~KVCache() {
    if (buffer) ggml_backend_buffer_free(buffer);
    if (ctx) ggml_free(ctx);
}

void KVCache::clear() {
    for (auto &l : layers) {
        l.pos.clear();
        l.rope_pos.clear();
        l.stats.truncate(0);
    }
}

void KVCache::truncate(int n) {
    for (auto &l : layers) {
        // positions grow along each layer's cache; a pruned layer holds fewer of them
        size_t keep = std::lower_bound(l.pos.begin(), l.pos.end(), n) - l.pos.begin();
        l.pos.resize(keep);
        if (!l.rope_pos.empty()) l.rope_pos.resize(keep * GGML_MROPE_SECTIONS);
        l.stats.truncate(keep);
    }
}

int KVCache::max_len() const {
    size_t n = 0;
    for (auto &l : layers) n = std::max(n, l.pos.size());
    return (int)n;
}

// ---------------------------------------------------------------- Engine

namespace {
constexpr size_t kGraphNodes = 8192;
}

// The last graph built. Its shape depends only on the key (row counts, per-layer attention
// spans, hooks), not on positions or cache slots, which are inputs; so successive one-token
// decodes reuse it without rebuilding or reallocating, as llama.cpp does.
struct Engine::Graph {
    std::vector<int64_t> key;
    ggml_context *ctx = nullptr;  // its tensors and graph live in Engine::graph_mem_
    ggml_cgraph *gf = nullptr;
    GraphInputs in;
    GraphOutputs out;
    std::vector<StatsOp> stats_ops;  // per layer, read by the graph's statistics ops

    ~Graph() {
        if (ctx) ggml_free(ctx);
    }
};

Engine::Engine(std::shared_ptr<Model> model, const EngineParams &params) : model_(std::move(model)), params_(params) {
    if (params_.n_ctx <= 0) throw std::invalid_argument("n_ctx must be > 0, got " + std::to_string(params_.n_ctx));
    if (params_.n_batch <= 0) throw std::invalid_argument("n_batch must be > 0, got " + std::to_string(params_.n_batch));
    cache_ = std::make_unique<KVCache>(*model_, params_.n_ctx);
    std::vector<ggml_backend_t> backends = {model_->backend};
    if (model_->backend != model_->backend_cpu) backends.push_back(model_->backend_cpu);
    sched_ = ggml_backend_sched_new(backends.data(), nullptr, (int)backends.size(), kGraphNodes, false, true);
}

Engine::~Engine() {
    graph_.reset();
    if (sched_) ggml_backend_sched_free(sched_);
}

void Engine::set_ffn_neurons(const std::vector<std::vector<int32_t>> &per_layer) {
    graph_.reset();  // the kept graph may point at the old compact weights
    compact_.build(*model_, per_layer, model_->n_threads);
}

std::vector<std::vector<int32_t>> Engine::ffn_neurons() const {
    std::vector<std::vector<int32_t>> out(model_->hp.n_layer);
    for (int il = 0; il < model_->hp.n_layer; ++il)
        if (const CompactFfn::Layer *c = compact_.layer(il)) out[il] = c->neurons;
    return out;
}

void Engine::validate(const Batch &batch) const {
    const HParams &hp = model_->hp;
    const size_t n = batch.tokens.size();
    if (n == 0) throw std::invalid_argument("empty batch");
    if (batch.pos.size() != n) throw std::invalid_argument("pos must have one entry per row");
    int n_embd_rows = 0;
    for (int32_t t : batch.tokens) {
        if (t < -1 || t >= hp.n_vocab)
            throw std::invalid_argument("token id " + std::to_string(t) + " out of range [0, " + std::to_string(hp.n_vocab) + ")");
        n_embd_rows += t == -1;
    }
    if (n_embd_rows != batch.n_embd_rows || (n_embd_rows && !batch.embd))
        throw std::invalid_argument("the batch has " + std::to_string(n_embd_rows) + " embedding rows but " +
                                    std::to_string(batch.n_embd_rows) + " were given");
    for (int32_t r : batch.out_rows)
        if (r < 0 || (size_t)r >= n) throw std::invalid_argument("out_rows index out of range");
    if (!batch.rope_pos.empty() && !hp.mrope())
        throw std::invalid_argument("rope_pos (M-RoPE position components) given for a '" + hp.arch_name + "' model, which has one position per token");
    if (!batch.rope_pos.empty() && batch.rope_pos.size() != n * GGML_MROPE_SECTIONS)
        throw std::invalid_argument("rope_pos must have 4 entries (temporal, row, column, unused) per row");
    const int n_after = cache_->max_len() + (int)n;
    if (n_after > params_.n_ctx)
        throw std::invalid_argument("prompt too long: " + std::to_string(n_after) + " tokens (with " +
                                    std::to_string(cache_->max_len()) + " cached) exceed n_ctx=" + std::to_string(params_.n_ctx));
}

namespace {
void check_keep_rows(const std::vector<int32_t> &rows, size_t n, const char *what) {
    if (rows.empty()) throw std::invalid_argument(std::string(what) + " is empty");
    for (size_t i = 0; i < rows.size(); ++i)
        if (rows[i] < 0 || (size_t)rows[i] >= n || (i && rows[i] <= rows[i - 1]))
            throw std::invalid_argument(std::string(what) + " must be ascending indices in [0, " + std::to_string(n) + ")");
}
// Row r's M-RoPE position components (temporal, row, column, unused): given, or a text token's
// (p, p, p, 0) as llama.cpp sets them for token batches.
void mrope_pos_of(const Batch &batch, size_t r, int32_t out[GGML_MROPE_SECTIONS]) {
    if (!batch.rope_pos.empty()) {
        std::copy_n(batch.rope_pos.data() + r * GGML_MROPE_SECTIONS, GGML_MROPE_SECTIONS, out);
        return;
    }
    out[0] = out[1] = out[2] = batch.pos[r];
    out[3] = 0;
}
// Inputs the scheduler left without memory are unused by the graph: nothing to set.
void set_input(ggml_tensor *t, const void *data) {
    if (t && t->buffer) ggml_backend_tensor_set(t, data, 0, ggml_nbytes(t));
}
double ms_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}
TensorDesc describe_tensor(const ggml_tensor *t) {
    TensorDesc d;
    d.name = ggml_get_name(t);
    d.type = t->type;
    std::copy_n(t->ne, 4, d.ne);
    d.contiguous = ggml_is_contiguous(t);
    d.contiguous_1 = ggml_is_contiguous_1(t);
    d.contiguous_rows = ggml_is_contiguous_rows(t);
    d.transposed = ggml_is_transposed(t);
    return d;
}
GraphDesc describe_graph(ggml_cgraph *gf) {
    GraphDesc g;
    for (int i = 0; i < ggml_graph_n_nodes(gf); ++i) {
        const ggml_tensor *t = ggml_graph_node(gf, i);
        NodeDesc n;
        n.op = t->op;
        n.kind = ggml_op_desc(t);
        n.params.assign((const int32_t *)t->op_params, (const int32_t *)t->op_params + GGML_MAX_OP_PARAMS / sizeof(int32_t));
        n.dst = describe_tensor(t);
        int n_src = 0;
        for (int j = 0; j < GGML_MAX_SRC; ++j)
            if (t->src[j]) n_src = j + 1;
        for (int j = 0; j < n_src; ++j)
            n.src.push_back(t->src[j] ? std::optional<TensorDesc>(describe_tensor(t->src[j])) : std::nullopt);
        g.nodes.push_back(std::move(n));
        // a tensor of the compute buffer off the cache-line grid (new_input in graph.cpp says why)
        const bool compute_buffer = t->buffer && ggml_backend_buffer_get_usage(t->buffer) == GGML_BACKEND_BUFFER_USAGE_COMPUTE;
        if (!t->view_src && compute_buffer && (uintptr_t)t->data % 64 != 0) g.unaligned.push_back(g.nodes.size() - 1);
    }
    return g;
}
}  // namespace

void Engine::record_graphs(bool on) {
    recording_ = on;
    if (on) recorded_.clear();
}

const Batch &Engine::with_image_groups(const Batch &batch, const std::vector<ImageSpan> &images, Batch &storage) const {
    if (!model_->hp.image_attn_bidirectional || !batch.attn_group.empty()) return batch;
    const size_t n = batch.tokens.size();
    storage = batch;
    storage.attn_group.assign(n, 0);
    int32_t group = 0;
    for (const ImageSpan &im : images) {
        ++group;
        for (int32_t j = 0; j < im.n_rows; ++j) storage.attn_group[im.row(j)] = group;
    }
    for (size_t r = 0; r < n; ++r)  // embedding rows of no span: each run one image
        if (batch.tokens[r] < 0 && !storage.attn_group[r])
            storage.attn_group[r] = r > 0 && batch.tokens[r - 1] < 0 && storage.attn_group[r - 1] == group ? group : ++group;
    return storage;
}

std::vector<std::pair<size_t, size_t>> Engine::graph_ranges(const Batch &batch) const {
    const size_t n = batch.tokens.size(), step = (size_t)params_.n_batch;
    const auto &g = batch.attn_group;
    std::vector<std::pair<size_t, size_t>> ranges;
    for (size_t begin = 0; begin < n;) {
        size_t end = std::min(n, begin + step);
        if (!g.empty() && end < n && g[end - 1] > 0 && g[end] == g[end - 1]) {
            size_t first = end - 1;  // where the straddling image starts (or begin: longer than n_batch)
            while (first > begin && g[first - 1] == g[end - 1]) --first;
            if (first > begin) end = first;
        }
        ranges.push_back({begin, end});
        begin = end;
    }
    return ranges;
}

std::vector<float> Engine::decode(const Batch &batch_in, const Prune &prune) {
    validate(batch_in);
    Batch grouped;
    const Batch &batch = with_image_groups(batch_in, {}, grouped);
    const HParams &hp = model_->hp;
    const std::vector<uint8_t> no_acts(hp.n_layer, 0);
    if (prune.after_layer < 0) return forward(batch, -1, nullptr, false, no_acts, 0.0, true, nullptr);
    if (prune.after_layer >= hp.n_layer) throw std::invalid_argument("prune.after_layer beyond the last layer");
    check_keep_rows(prune.keep_rows, batch.tokens.size(), "prune.keep_rows");
    for (int32_t r : batch.out_rows)
        if (r >= (int32_t)prune.keep_rows.size()) throw std::invalid_argument("out_rows index beyond the kept rows");
    return forward(batch, prune.after_layer, [&](const StageOut &) { return KeepChoice{prune.keep_rows, {}}; }, true, no_acts, 0.0,
                   true, nullptr);
}

void Engine::validate_sparsity(const Batch &batch, const std::vector<ImageSpan> &images, int anchor_row, const SparsityParams &sp) const {
    const HParams &hp = model_->hp;
    const int64_t n = (int64_t)batch.tokens.size();
    if (!(sp.rho > 0.0 && sp.rho <= 1.0)) throw std::invalid_argument("rho must be in (0, 1]");
    if (!(sp.beta > 0.0 && sp.beta <= 1.0)) throw std::invalid_argument("beta must be in (0, 1]");
    if (!(sp.min_keep >= 0.0 && sp.max_keep <= 1.0 && sp.min_keep <= sp.max_keep))
        throw std::invalid_argument("need 0 <= min_keep <= max_keep <= 1");
    if (sp.budget < 0) throw std::invalid_argument("budget must be >= 0 (0: the elbow decides)");
    if (sp.prune_layer < 0 || sp.prune_layer >= hp.n_layer - 1)
        throw std::invalid_argument("prune_layer must be in [0, " + std::to_string(hp.n_layer - 2) + "] (a layer must follow it)");
    for (int l : sp.dense_layers)
        if (l < 0 || l >= hp.n_layer) throw std::invalid_argument("dense layer " + std::to_string(l) + " out of range");
    validate_profile_params(sp);
    if (sp.neurons && model_->lora && model_->lora->adapts_ffn)
        throw std::invalid_argument("core neurons cannot be used with a LoRA adapter on the FFN: use neurons=False");
    int64_t end = 0;
    for (const ImageSpan &im : images) {
        if (!im.rows.empty()) {  // an image split by text: its rows, ascending, starting at first_row
            if ((int64_t)im.rows.size() != im.n_rows || im.rows[0] != im.first_row)
                throw std::invalid_argument("an image's rows must number n_rows and start at first_row");
            for (size_t j = 1; j < im.rows.size(); ++j)
                if (im.rows[j] <= im.rows[j - 1]) throw std::invalid_argument("an image's rows must be ascending");
        }
        if (im.n_rows <= 0 || im.first_row < end || im.end_row() > n)
            throw std::invalid_argument("image spans must be non-empty, ascending, disjoint and inside the batch");
        end = im.end_row();
        if (!im.keep.empty()) check_keep_rows(im.keep, (size_t)im.n_rows, "an image's forced kept tokens");
        if (!im.merge.empty()) {
            if (im.merge.size() != im.keep.size()) throw std::invalid_argument("an image's merge groups need one group per forced kept token");
            for (size_t i = 0; i < im.merge.size(); ++i) {
                const auto &g = im.merge[i];
                if (std::find(g.begin(), g.end(), im.keep[i]) == g.end())
                    throw std::invalid_argument("each merge group must hold its kept token");
                for (int32_t j : g)
                    if (j < 0 || j >= im.n_rows) throw std::invalid_argument("merge group index out of the image");
            }
        }
        for (int32_t r : batch.out_rows)
            if (r >= im.first_row && r < end && (im.rows.empty() || std::binary_search(im.rows.begin(), im.rows.end(), r)))
                throw std::invalid_argument("logits of image rows cannot be requested when pruning");
    }
    if (!images.empty() && (anchor_row < 0 || anchor_row >= n)) throw std::invalid_argument("anchor_row out of range");
}

PrefillResult Engine::prefill(const Batch &batch_in, const std::vector<ImageSpan> &images, int anchor_row, const SparsityParams *sp) {
    validate(batch_in);
    const HParams &hp = model_->hp;
    PrefillResult res;
    stat_thresholds_.clear();
    if (sp) validate_sparsity(batch_in, images, anchor_row, *sp);  // the image spans, before they group rows
    Batch grouped;
    const Batch &batch = with_image_groups(batch_in, sp ? images : std::vector<ImageSpan>{}, grouped);
    if (!sp) {  // the dense engine: also forgets earlier core neurons
        compact_.release();
        res.logits = forward(batch, -1, nullptr, false, std::vector<uint8_t>(hp.n_layer, 0), 0.0, false, nullptr);
        return res;
    }
    stat_thresholds_ = sp->thresholds;  // read by stats_ops during this prefill
    const int K = sp->prune_layer;
    const bool prune = sp->tokens && !images.empty();
    const bool scored = std::any_of(images.begin(), images.end(), [](const ImageSpan &im) { return im.keep.empty(); });
    std::vector<uint8_t> dense(hp.n_layer, 0), act_use(hp.n_layer, 0);
    for (int l : sp->dense_layers) dense[l] = 1;
    const bool text_stats = sp->neurons && sp->neuron_tokens == NeuronTokens::text && !images.empty();
    for (int il = 0; il < hp.n_layer; ++il) {
        if (sp->neurons && !dense[il]) act_use[il] |= kActStats | (text_stats ? kActTextStats : 0);
        if (prune && scored && il == K && sp->score != TokenScore::fastv)
            act_use[il] |= kActCapture | (sp->score == TokenScore::paper ? kActStats : 0);
        if (prune && scored && il == K && sp->score == TokenScore::paper)
            act_use[il] &= ~kActTextStats;  // the paper score matches against every row's core neurons
    }
    Batch marked;  // the batch with its image rows marked, for the statistics ops to skip
    if (text_stats) {
        marked = batch;
        marked.image_rows.assign(batch.tokens.size(), 0);
        for (const ImageSpan &im : images)
            for (int32_t j = 0; j < im.n_rows; ++j) marked.image_rows[im.row(j)] = 1;
    }
    const Batch &run = text_stats ? marked : batch;
    const int64_t n_ff = hp.n_ff;
    auto block_of = [&](int il) { return ggml_blck_size(model_->layers[il].ffn_down->type); };

    // Score of image token j (batch row `row`) at layer K. CoreMatching: how many of the reference
    // neuron set it activates (the anchor token's activated neurons, or for the paper score the
    // core neurons of every token layer K holds). FastV: the attention the batch's last row pays
    // it, averaged over heads; layer K's cache held `base` rows before this batch.
    const bool fastv = sp->score == TokenScore::fastv;
    ChooseKeep choose = [&](const StageOut &a) {
        auto t0 = std::chrono::steady_clock::now();
        std::vector<uint8_t> ref;  // the neuron set image tokens are matched against
        if (!scored) {
        } else if (sp->score == TokenScore::paper) {
            ref.assign(n_ff, 0);
            for (int32_t i : core_neurons(cache_->layers[K].stats, n_ff, sp->beta, block_of(K))) ref[i] = 1;
        } else if (sp->score == TokenScore::anchor) {
            const float *anchor = a.captured.data() + (size_t)anchor_row * n_ff;
            ref.resize(n_ff);
            for (int64_t i = 0; i < n_ff; ++i) ref[i] = anchor[i] > 0.0f;
        }
        const int64_t base = (int64_t)cache_->layers[K].pos.size() - (int64_t)batch.tokens.size();
        auto score = [&](int64_t row) {
            if (!fastv) return (double)count_active_in(a.captured.data() + (size_t)row * n_ff, ref);
            const int64_t n_kv = a.last_attention_n_kv, n_head = (int64_t)a.last_attention.size() / n_kv;
            double s = 0.0;
            for (int64_t h = 0; h < n_head; ++h) s += a.last_attention[(size_t)(h * n_kv + base + row)];
            return s / (double)n_head;
        };
        KeepChoice choice;
        std::vector<int32_t> kept_of_row(batch.tokens.size(), -1);  // batch row -> its image's kept index
        std::vector<uint8_t> keep_row(batch.tokens.size(), 1);
        std::vector<const ImageSpan *> image_of_row(batch.tokens.size(), nullptr);
        for (const ImageSpan &im : images) {
            std::vector<int32_t> kept = im.keep;
            if (kept.empty()) {
                std::vector<double> scores(im.n_rows);
                for (int32_t j = 0; j < im.n_rows; ++j) scores[j] = score(im.row(j));
                kept = select_tokens(scores, sp->budget, sp->min_keep, sp->max_keep);
            }
            for (int32_t j = 0; j < im.n_rows; ++j) keep_row[im.row(j)] = 0;  // not the text rows between its chunks
            for (size_t i = 0; i < kept.size(); ++i) {
                keep_row[im.row(kept[i])] = 1;
                kept_of_row[im.row(kept[i])] = (int32_t)i;
                image_of_row[im.row(kept[i])] = &im;
            }
            res.kept.push_back(std::move(kept));
        }
        for (size_t r = 0; r < keep_row.size(); ++r) {
            if (!keep_row[r]) continue;
            choice.rows.push_back((int32_t)r);
            std::vector<int32_t> group;  // batch rows averaged into this kept row (pooling)
            if (const ImageSpan *im = image_of_row[r]; im && !im->merge.empty())
                for (int32_t j : im->merge[kept_of_row[r]]) group.push_back(im->row(j));
            choice.merged.push_back(std::move(group));
        }
        res.select_ms += ms_since(t0);
        return choice;
    };
    res.logits = forward(run, prune ? K : -1, prune ? choose : ChooseKeep(), false, act_use, sp->rho, false, &res.stats_ms,
                         prune && scored && fastv ? K : -1);
    for (const ImageSpan &im : images)
        if (!prune) {  // no pruning: every token stays
            std::vector<int32_t> all(im.n_rows);
            std::iota(all.begin(), all.end(), 0);
            res.kept.push_back(std::move(all));
        }

    // Under the text rule the graph took no statistics of image rows, except at layer K for the
    // paper score, which needed them all: they stop counting now.
    if (text_stats && (act_use[K] & kActStats) && !(act_use[K] & kActTextStats)) forget_image_stats(batch, images, K);

    // Core neurons of every sparse layer, from the tokens that layer holds.
    auto t0 = std::chrono::steady_clock::now();
    std::vector<std::vector<int32_t>> sets(hp.n_layer);
    if (sp->neurons)
        for (int il = 0; il < hp.n_layer; ++il)
            if (!dense[il]) sets[il] = layer_core_neurons(*sp, il, res);
    graph_.reset();
    compact_.build(*model_, sets, model_->n_threads);
    res.compact_ms = ms_since(t0);
    for (int il = 0; il < hp.n_layer; ++il) {
        const CompactFfn::Layer *c = compact_.layer(il);
        res.core_neurons.push_back(c ? (int32_t)c->neurons.size() : (int32_t)n_ff);
    }
    return res;
}

std::vector<float> Engine::forward(const Batch &batch, int after_layer, const ChooseKeep &choose_keep, bool out_in_kept,
                                   const std::vector<uint8_t> &act_use, double rho, bool use_compact, double *stats_ms,
                                   int attn_layer) {
    const HParams &hp = model_->hp;
    StageOut out;
    if (after_layer < 0) {
        run_stage(batch, 0, hp.n_layer, act_use, rho, use_compact, out, stats_ms);
        return out.logits;
    }
    Batch first = batch;
    first.out_rows.clear();
    run_stage(first, 0, after_layer + 1, act_use, rho, use_compact, out, stats_ms, attn_layer);
    const KeepChoice choice = choose_keep(out);
    const std::vector<int32_t> &keep = choice.rows;

    // The kept rows enter layer after_layer + 1 as hidden states (a merged row: its group's
    // mean), at their original positions.
    Batch rest;
    std::vector<float> hidden(keep.size() * (size_t)hp.n_embd);
    for (size_t i = 0; i < keep.size(); ++i) {
        float *dst = hidden.data() + i * hp.n_embd;
        const std::vector<int32_t> *group = i < choice.merged.size() && !choice.merged[i].empty() ? &choice.merged[i] : nullptr;
        if (!group) {
            std::copy_n(out.hidden.data() + (size_t)keep[i] * hp.n_embd, hp.n_embd, dst);
        } else {
            std::vector<double> sum(hp.n_embd, 0.0);
            for (int32_t r : *group) {
                const float *src = out.hidden.data() + (size_t)r * hp.n_embd;
                for (int64_t d = 0; d < hp.n_embd; ++d) sum[d] += src[d];
            }
            for (int64_t d = 0; d < hp.n_embd; ++d) dst[d] = (float)(sum[d] / (double)group->size());
        }
        rest.pos.push_back(batch.pos[keep[i]]);
        if (hp.mrope()) {  // a kept token keeps every position component it had
            int32_t p[GGML_MROPE_SECTIONS];
            mrope_pos_of(batch, keep[i], p);
            rest.rope_pos.insert(rest.rope_pos.end(), p, p + GGML_MROPE_SECTIONS);
        }
    }
    rest.tokens.assign(keep.size(), -1);
    if (!batch.image_rows.empty())
        for (int32_t r : keep) rest.image_rows.push_back(batch.image_rows[r]);
    if (!batch.attn_group.empty())  // an image's kept rows still attend to each other both ways
        for (int32_t r : keep) rest.attn_group.push_back(batch.attn_group[r]);
    rest.embd = hidden.data();
    rest.n_embd_rows = (int)keep.size();
    for (int32_t r : batch.out_rows) {
        if (out_in_kept) {
            rest.out_rows.push_back(r);
            continue;
        }
        auto it = std::lower_bound(keep.begin(), keep.end(), r);
        if (it == keep.end() || *it != r) throw std::invalid_argument("a row whose logits are requested was pruned");
        rest.out_rows.push_back((int32_t)(it - keep.begin()));
    }
    StageOut last;
    run_stage(rest, after_layer + 1, hp.n_layer, act_use, rho, use_compact, last, stats_ms);
    return last.logits;
}

std::vector<int64_t> Engine::graph_key(const Batch &batch, size_t begin, size_t end, int layer_begin, int layer_end,
                                       const std::vector<uint8_t> &act_use, const std::vector<StatsOp> &ops, bool use_compact,
                                       int attn_layer) const {
    int64_t n_rows = (int64_t)(end - begin), n_token_rows = 0;
    for (size_t i = begin; i < end; ++i) n_token_rows += batch.tokens[i] >= 0;
    const bool last = end == batch.tokens.size();
    std::vector<int64_t> key = {n_rows, n_token_rows, last ? (int64_t)batch.out_rows.size() : 0, layer_begin, layer_end,
                                use_compact ? compact_.version() : -1, attn_layer, !batch.image_rows.empty()};
    const auto &layers = cache_->layers;
    for (int il = layer_begin; il < layer_end; ++il) {
        size_t group = layer_begin;  // first layer with the same cache length: masks and slots are shared
        while (layers[group].pos.size() != layers[il].pos.size()) ++group;
        key.push_back(std::min<int64_t>(cache_->n_ctx, GGML_PAD((int64_t)layers[il].pos.size() + n_rows, 256)));
        key.push_back((int64_t)group);
        key.push_back(act_use[il]);
        if (act_use[il] & kActStats) {  // the statistics op's slots and threshold
            int32_t tau_bits;
            std::memcpy(&tau_bits, &ops[il].tau, sizeof tau_bits);
            key.push_back(ops[il].kmax);
            key.push_back(tau_bits);
        }
    }
    return key;
}

void Engine::run_stage(const Batch &batch, int layer_begin, int layer_end, const std::vector<uint8_t> &act_use, double rho,
                       bool use_compact, StageOut &so, double *stats_ms, int attn_layer) {
    const HParams &hp = model_->hp;
    const size_t n = batch.tokens.size();
    const std::vector<std::pair<size_t, size_t>> ranges = graph_ranges(batch);
    // Logits are read from the graph holding the requested rows, the last one when split.
    for (int32_t r : batch.out_rows)
        if ((size_t)r < ranges.back().first)
            throw std::invalid_argument("logits of a split batch can only be read from its last n_batch rows; call decode per chunk");
    const bool to_logits = layer_end == hp.n_layer;
    if (!to_logits) so.hidden.resize(n * (size_t)hp.n_embd);
    int capture_layer = -1;
    for (int il = layer_begin; il < layer_end; ++il)
        if (act_use[il] & kActCapture) capture_layer = il;
    if (capture_layer >= 0) so.captured.resize(n * (size_t)hp.n_ff);

    int embd_begin = 0;
    std::vector<int32_t> stats_rows;
    const std::vector<StatsOp> ops = stats_ops(rho);
    for (const auto &[begin, end] : ranges) {
        const int64_t n_rows = (int64_t)(end - begin);
        const bool last = end == n;

        std::vector<int32_t> out_rows;  // relative to this graph's rows
        if (last)
            for (int32_t r : batch.out_rows) out_rows.push_back(r - (int32_t)begin);
        std::vector<int64_t> key = graph_key(batch, begin, end, layer_begin, layer_end, act_use, ops, use_compact, attn_layer);
        if (!graph_ || graph_->key != key) {
            graph_.reset();  // before its memory is reused
            auto g = std::make_unique<Graph>();
            g->key = std::move(key);
            // one buffer for every graph (only one lives at a time): a fresh 3 MB per graph cost
            // ~2 ms of page faults, on every first decode step after a prompt
            if (graph_mem_.empty()) graph_mem_.resize(ggml_tensor_overhead() * kGraphNodes + ggml_graph_overhead_custom(kGraphNodes, false));
            ggml_init_params ip = {graph_mem_.size(), graph_mem_.data(), true};
            g->ctx = ggml_init(ip);
            g->gf = ggml_new_graph_custom(g->ctx, kGraphNodes, false);
            Batch shape;  // what the builder reads: row kinds and the number of outputs
            shape.tokens = batch.tokens;
            shape.out_rows = out_rows;
            shape.image_rows = batch.image_rows;
            g->stats_ops = ops;
            GraphSpec spec{&shape, begin, end, layer_begin, layer_end, &act_use, &g->stats_ops, use_compact ? &compact_ : nullptr, attn_layer};
            g->out = build_forward(g->ctx, g->gf, *model_, *cache_, spec, g->in);
            ggml_backend_sched_reset(sched_);
            if (!ggml_backend_sched_alloc_graph(sched_, g->gf)) throw std::runtime_error("failed to allocate the compute graph");
            if (recording_) {
                GraphDesc d = describe_graph(g->gf);
                d.decode = use_compact;  // decode() evaluates with the compact FFN weights, prefill() without
                d.layer_begin = layer_begin;
                d.layer_end = layer_end;
                d.n_rows = n_rows;
                recorded_.push_back(std::move(d));
            }
            graph_ = std::move(g);
        }
        const GraphInputs &in = graph_->in;

        // ---- inputs
        std::vector<int32_t> token_ids, order(n_rows);
        {
            int32_t n_tok = 0;
            for (int64_t i = 0; i < n_rows; ++i) n_tok += batch.tokens[begin + i] >= 0;
            int32_t t = 0, e = n_tok;  // embeddings follow the token rows in the concat
            for (int64_t i = 0; i < n_rows; ++i) {
                int32_t id = batch.tokens[begin + i];
                if (id >= 0) token_ids.push_back(id);
                order[i] = id >= 0 ? t++ : e++;
            }
        }
        set_input(in.tokens, token_ids.data());
        set_input(in.embd, batch.embd + (size_t)embd_begin * hp.n_embd);
        set_input(in.row_order, order.data());
        const int32_t *pos = batch.pos.data() + begin;
        std::vector<int32_t> mrope_rows;  // M-RoPE: the rows' components, [n_rows][4]
        if (hp.mrope()) {
            mrope_rows.resize((size_t)n_rows * GGML_MROPE_SECTIONS);
            for (int64_t i = 0; i < n_rows; ++i) mrope_pos_of(batch, begin + i, mrope_rows.data() + i * GGML_MROPE_SECTIONS);
            std::vector<int32_t> sections((size_t)n_rows * GGML_MROPE_SECTIONS);  // ggml_rope_multi reads component-major
            for (int64_t i = 0; i < n_rows; ++i)
                for (int c = 0; c < GGML_MROPE_SECTIONS; ++c) sections[c * n_rows + i] = mrope_rows[i * GGML_MROPE_SECTIONS + c];
            set_input(in.pos, sections.data());
        } else {
            set_input(in.pos, pos);
        }
        set_input(in.out_rows, out_rows.data());
        if (in.stats_rows) {  // statistics for the text rows only
            std::vector<int32_t> wanted(n_rows);
            for (int64_t i = 0; i < n_rows; ++i) wanted[i] = !batch.image_rows[begin + i];
            set_input(in.stats_rows, wanted.data());
        }
        for (auto &m : in.masks) {
            // causal in sequence order: query i (the i-th new row) sees the cache and new rows <= i,
            // and, in an image whose rows attend both ways, the later rows of its image in this
            // graph; a sliding-window layer masks what lies n_swa or more positions back.
            // For M-RoPE llama.cpp masks by temporal position, then (row, column) where those tie;
            // with mtmd's positions (an image's tokens share one temporal position and run row by
            // row; the text after it starts past max(rows, columns)) that is the same set of keys.
            const std::vector<int32_t> &cached = cache_->layers[m.layer].pos;
            const int64_t n_kv = m.t->ne[0], n_q = m.t->ne[1], n_past = (int64_t)cached.size();
            const int32_t *group = batch.attn_group.empty() ? nullptr : batch.attn_group.data() + begin;
            std::vector<float> mask((size_t)n_kv * n_q, -INFINITY);
            for (int64_t i = 0; i < n_q; ++i) {
                float *row = mask.data() + i * n_kv;
                std::fill_n(row, n_past + i + 1, 0.0f);
                if (group && group[i] > 0)
                    for (int64_t k = i + 1; k < n_q; ++k)
                        if (group[k] == group[i]) row[n_past + k] = 0.0f;
                if (m.swa)
                    for (int64_t j = 0; j < n_past + n_q; ++j)
                        if ((int64_t)pos[i] - (j < n_past ? cached[j] : pos[j - n_past]) >= hp.n_swa) row[j] = -INFINITY;
            }
            set_input(m.t, mask.data());
        }
        for (auto &sl : in.slots) {
            const int64_t n_q = sl.k->ne[0], n_past = (int64_t)cache_->layers[sl.layer].pos.size(), D = hp.n_embd_kv();
            std::vector<int64_t> k(n_q), v(n_q * D);
            for (int64_t i = 0; i < n_q; ++i) {
                k[i] = n_past + i;
                for (int64_t j = 0; j < D; ++j) v[i * D + j] = j * cache_->n_ctx + n_past + i;  // v is [n_ctx, n_embd_kv]
            }
            set_input(sl.k, k.data());
            set_input(sl.v, v.data());
        }

        if (ggml_backend_sched_graph_compute(sched_, graph_->gf) != GGML_STATUS_SUCCESS) {
            graph_.reset();
            throw std::runtime_error("graph computation failed");
        }

        // ---- outputs, and the caches now hold the new rows
        const GraphOutputs &go = graph_->out;
        if (go.logits) {
            so.logits.resize(ggml_nelements(go.logits));
            ggml_backend_tensor_get(go.logits, so.logits.data(), 0, ggml_nbytes(go.logits));
        }
        if (go.hidden) ggml_backend_tensor_get(go.hidden, so.hidden.data() + begin * hp.n_embd, 0, ggml_nbytes(go.hidden));
        if (go.last_attention && last) {  // the last graph holds the batch's last row
            so.last_attention.resize(ggml_nelements(go.last_attention));
            so.last_attention_n_kv = go.last_attention->ne[0];
            ggml_backend_tensor_get(go.last_attention, so.last_attention.data(), 0, ggml_nbytes(go.last_attention));
        }
        for (int il = layer_begin; il < layer_end; ++il) {
            LayerCache &lc = cache_->layers[il];
            lc.pos.insert(lc.pos.end(), pos, pos + n_rows);
            lc.rope_pos.insert(lc.rope_pos.end(), mrope_rows.begin(), mrope_rows.end());
            for (auto &[l, t] : go.acts)
                if (l == il)  // [n_rows][n_ff]
                    ggml_backend_tensor_get(t, so.captured.data() + begin * hp.n_ff, 0, ggml_nbytes(t));
            ggml_tensor *st = nullptr;
            for (auto &[l, t] : go.stats)
                if (l == il) st = t;
            if (!st) {
                lc.stats.append_none(n_rows);
                continue;
            }
            auto t0 = std::chrono::steady_clock::now();
            StatsOp &op = graph_->stats_ops[il];
            if (stats_ms) *stats_ms += op.ms;  // the op's own time in the graph
            op.ms = 0.0;
            stats_rows.resize(ggml_nelements(st));  // [n_rows][st->ne[0] >= 1 + kmax]
            ggml_backend_tensor_get(st, stats_rows.data(), 0, ggml_nbytes(st));
            lc.stats.configure(rho, op.tau, hp.n_ff);
            lc.stats.append_rows(stats_rows.data(), n_rows, (size_t)st->ne[0]);
            if (stats_ms) *stats_ms += ms_since(t0);
        }
        for (int64_t i = 0; i < n_rows; ++i) embd_begin += batch.tokens[begin + i] == -1;
    }
}

// ---------------------------------------------------------------- stored profile (cmx.coreprofile)

void Engine::validate_profile_params(const SparsityParams &sp) const {
    const HParams &hp = model_->hp;
    if (!sp.thresholds.empty() && (int)sp.thresholds.size() != hp.n_layer)
        throw std::invalid_argument("thresholds need one value per layer (" + std::to_string(hp.n_layer) + ")");
    if (sp.short_prompt_tokens < 0) throw std::invalid_argument("short_prompt_tokens must be >= 0");
    if (sp.neuron_order.empty()) {
        if (sp.short_prompt_tokens > 0) throw std::invalid_argument("short_prompt_tokens needs neuron_order");
        return;
    }
    if ((int)sp.neuron_order.size() != hp.n_layer)
        throw std::invalid_argument("neuron_order needs one list per layer (" + std::to_string(hp.n_layer) + ")");
    std::vector<uint8_t> seen(hp.n_ff);
    for (const auto &order : sp.neuron_order) {
        if ((int64_t)order.size() != hp.n_ff) throw std::invalid_argument("each layer's neuron_order must list n_ff neurons");
        std::fill(seen.begin(), seen.end(), 0);
        for (int32_t i : order) {
            if (i < 0 || i >= hp.n_ff || seen[i]) throw std::invalid_argument("neuron_order must be a permutation of [0, n_ff)");
            seen[i] = 1;
        }
    }
}

std::vector<StatsOp> Engine::stats_ops(double rho) const {
    const HParams &hp = model_->hp;
    std::vector<StatsOp> ops(hp.n_layer);
    for (int il = 0; il < hp.n_layer; ++il) {
        ops[il].n_ff = hp.n_ff;
        ops[il].kmax = (int)std::floor(rho * (double)hp.n_ff);
        ops[il].tau = il < (int)stat_thresholds_.size() ? stat_thresholds_[il] : std::numeric_limits<float>::quiet_NaN();
    }
    return ops;
}

void Engine::forget_image_stats(const Batch &batch, const std::vector<ImageSpan> &images, int il) {
    LayerCache &lc = cache_->layers[il];
    const size_t base = lc.stats.size() - batch.tokens.size();  // the batch's rows are the layer's last ones
    for (const ImageSpan &im : images)
        for (int32_t j = 0; j < im.n_rows; ++j) lc.stats.forget(base + im.row(j));
}

std::vector<int32_t> Engine::layer_core_neurons(const SparsityParams &sp, int il, PrefillResult &res) const {
    const NeuronStats &stats = cache_->layers[il].stats;
    const int64_t block = ggml_blck_size(model_->layers[il].ffn_down->type);
    // too few tokens for a stable estimate: the calibration set's core neurons instead
    if (!sp.neuron_order.empty() && stats.n_with_stats() < sp.short_prompt_tokens) {
        ++res.table_layers;
        return table_core_neurons(sp.neuron_order[il], model_->hp.n_ff, sp.beta, block);
    }
    return core_neurons(stats, model_->hp.n_ff, sp.beta, block);
}

}  // namespace cmx

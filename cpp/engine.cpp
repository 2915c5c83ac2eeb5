// Evaluation: KV cache storage, input validation, batch splitting, graph execution.
#include "engine.h"

#include <algorithm>
#include <cmath>
#include <limits>

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
    for (auto &l : layers) l.pos.clear();
}

void KVCache::truncate(int n) {
    for (auto &l : layers)
        if ((int)l.pos.size() > n) l.pos.resize(std::max(0, n));
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
    std::vector<uint8_t> mem;
    ggml_context *ctx = nullptr;
    ggml_cgraph *gf = nullptr;
    GraphInputs in;
    ggml_tensor *logits = nullptr;

    Graph() : mem(ggml_tensor_overhead() * kGraphNodes + ggml_graph_overhead_custom(kGraphNodes, false)) {}
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

void Engine::set_ffn_neurons(std::vector<FfnNeurons> per_layer) {
    const HParams &hp = model_->hp;
    if ((int)per_layer.size() > hp.n_layer) throw std::invalid_argument("more neuron sets than layers");
    for (auto &set : per_layer)
        for (size_t i = 0; i < set.rows.size(); ++i)
            if (set.rows[i] < 0 || set.rows[i] >= hp.n_ff || (i && set.rows[i] <= set.rows[i - 1]))
                throw std::invalid_argument("neuron indices must be ascending and in [0, n_ff)");
    ffn_neurons_ = std::move(per_layer);
    ++ffn_neurons_version_;
}

void Engine::validate(const Batch &batch, const Prune &prune) const {
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
    const int n_after = cache_->max_len() + (int)n;
    if (n_after > params_.n_ctx)
        throw std::invalid_argument("prompt too long: " + std::to_string(n_after) + " tokens (with " +
                                    std::to_string(cache_->max_len()) + " cached) exceed n_ctx=" + std::to_string(params_.n_ctx));
    if (prune.after_layer >= 0) {
        if (prune.after_layer >= hp.n_layer) throw std::invalid_argument("prune.after_layer beyond the last layer");
        if (n > (size_t)params_.n_batch) throw std::invalid_argument("pruning needs the batch to fit in one n_batch graph");
        if (prune.keep_rows.empty()) throw std::invalid_argument("prune.keep_rows is empty");
        for (size_t i = 0; i < prune.keep_rows.size(); ++i)
            if (prune.keep_rows[i] < 0 || (size_t)prune.keep_rows[i] >= n || (i && prune.keep_rows[i] <= prune.keep_rows[i - 1]))
                throw std::invalid_argument("prune.keep_rows must be ascending batch rows");
        for (int32_t r : batch.out_rows)
            if (r >= (int32_t)prune.keep_rows.size()) throw std::invalid_argument("out_rows index beyond the kept rows");
    }
}

std::vector<float> Engine::decode(const Batch &batch, const Prune &prune) {
    validate(batch, prune);
    const size_t n = batch.tokens.size(), step = (size_t)params_.n_batch;
    // Logits are only wanted from the graph holding the requested rows; we ask for them from
    // the last graph, so out_rows must lie there when the batch is split.
    for (int32_t r : batch.out_rows)
        if (n > step && (size_t)r < (n - 1) / step * step)
            throw std::invalid_argument("logits of a split batch can only be read from its last n_batch rows; call decode per chunk");
    std::vector<float> logits;
    int embd_begin = 0;
    for (size_t begin = 0; begin < n; begin += step) {
        size_t end = std::min(n, begin + step);
        logits = decode_ubatch(batch, begin, end, embd_begin, prune);
        for (size_t i = begin; i < end; ++i) embd_begin += batch.tokens[i] == -1;
    }
    return logits;
}

std::vector<int64_t> Engine::graph_key(const Batch &batch, size_t begin, size_t end, const Prune &prune) const {
    int64_t n_rows = (int64_t)(end - begin), n_token_rows = 0;
    for (size_t i = begin; i < end; ++i) n_token_rows += batch.tokens[i] >= 0;
    const bool last = end == batch.tokens.size();
    const int64_t n_kept = prune.after_layer >= 0 ? (int64_t)prune.keep_rows.size() : n_rows;
    std::vector<int64_t> key = {n_rows, n_token_rows, last ? (int64_t)batch.out_rows.size() : 0,
                                prune.after_layer, n_kept, ffn_neurons_version_};
    const auto &layers = cache_->layers;
    for (size_t il = 0; il < layers.size(); ++il) {
        const int64_t n_q = prune.after_layer >= 0 && (int)il > prune.after_layer ? n_kept : n_rows;
        size_t group = 0;  // first layer with the same cache length: masks and slots are shared
        while (layers[group].pos.size() != layers[il].pos.size()) ++group;
        key.push_back(std::min<int64_t>(cache_->n_ctx, GGML_PAD((int64_t)layers[il].pos.size() + n_q, 256)));
        key.push_back((int64_t)group);
    }
    return key;
}

std::vector<float> Engine::decode_ubatch(const Batch &batch, size_t begin, size_t end, int embd_begin, const Prune &prune) {
    const HParams &hp = model_->hp;
    const bool last = end == batch.tokens.size();
    std::vector<int32_t> out_rows;  // relative to this graph's rows
    if (last)
        for (int32_t r : batch.out_rows) out_rows.push_back(prune.after_layer >= 0 ? r : r - (int32_t)begin);

    std::vector<int64_t> key = graph_key(batch, begin, end, prune);
    if (!graph_ || graph_->key != key) {
        graph_.reset();
        auto g = std::make_unique<Graph>();
        g->key = std::move(key);
        ggml_init_params ip = {g->mem.size(), g->mem.data(), true};
        g->ctx = ggml_init(ip);
        g->gf = ggml_new_graph_custom(g->ctx, kGraphNodes, false);
        Batch shape;  // what the builder reads: row kinds and the number of outputs
        shape.tokens = batch.tokens;
        shape.out_rows = out_rows;
        GraphSpec spec{&shape, begin, end, &prune, &ffn_neurons_};
        g->logits = build_forward(g->ctx, g->gf, *model_, *cache_, spec, g->in);
        ggml_backend_sched_reset(sched_);
        if (!ggml_backend_sched_alloc_graph(sched_, g->gf)) throw std::runtime_error("failed to allocate the compute graph");
        graph_ = std::move(g);
    }
    const GraphInputs &in = graph_->in;

    // ---- inputs
    const int64_t n_rows = (int64_t)(end - begin);
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
    if (in.tokens) ggml_backend_tensor_set(in.tokens, token_ids.data(), 0, ggml_nbytes(in.tokens));
    if (in.embd) ggml_backend_tensor_set(in.embd, batch.embd + (size_t)embd_begin * hp.n_embd, 0, ggml_nbytes(in.embd));
    if (in.row_order) ggml_backend_tensor_set(in.row_order, order.data(), 0, ggml_nbytes(in.row_order));
    const int32_t *pos = batch.pos.data() + begin;
    ggml_backend_tensor_set(in.pos, pos, 0, n_rows * sizeof(int32_t));
    std::vector<int32_t> kept_pos;
    if (in.keep_rows) {
        for (int32_t r : prune.keep_rows) kept_pos.push_back(pos[r]);
        ggml_backend_tensor_set(in.keep_rows, prune.keep_rows.data(), 0, ggml_nbytes(in.keep_rows));
        ggml_backend_tensor_set(in.pos_kept, kept_pos.data(), 0, ggml_nbytes(in.pos_kept));
    }
    if (in.out_rows) ggml_backend_tensor_set(in.out_rows, out_rows.data(), 0, ggml_nbytes(in.out_rows));
    for (auto &m : in.masks) {
        // causal in sequence order: query i (the i-th new row) sees the cache and new rows <= i
        const int64_t n_kv = m.t->ne[0], n_q = m.t->ne[1], n_past = (int64_t)cache_->layers[m.layer].pos.size();
        std::vector<float> mask((size_t)n_kv * n_q, -INFINITY);
        for (int64_t i = 0; i < n_q; ++i) std::fill_n(mask.begin() + i * n_kv, n_past + i + 1, 0.0f);
        ggml_backend_tensor_set(m.t, mask.data(), 0, ggml_nbytes(m.t));
    }
    for (auto &sl : in.slots) {
        const int64_t n_q = sl.k->ne[0], n_past = (int64_t)cache_->layers[sl.layer].pos.size(), D = hp.n_embd_kv();
        std::vector<int64_t> k(n_q), v(n_q * D);
        for (int64_t i = 0; i < n_q; ++i) {
            k[i] = n_past + i;
            for (int64_t j = 0; j < D; ++j) v[i * D + j] = j * cache_->n_ctx + n_past + i;  // v is [n_ctx, n_embd_kv]
        }
        ggml_backend_tensor_set(sl.k, k.data(), 0, ggml_nbytes(sl.k));
        ggml_backend_tensor_set(sl.v, v.data(), 0, ggml_nbytes(sl.v));
    }
    for (auto &nr : in.neurons) {
        const auto &rows = ffn_neurons_[nr.layer].rows;
        ggml_backend_tensor_set(nr.rows, rows.data(), 0, ggml_nbytes(nr.rows));
        std::vector<float> zeros(ggml_nelements(nr.zeros), 0.0f);
        ggml_backend_tensor_set(nr.zeros, zeros.data(), 0, ggml_nbytes(nr.zeros));
    }

    if (ggml_backend_sched_graph_compute(sched_, graph_->gf) != GGML_STATUS_SUCCESS) {
        graph_.reset();
        throw std::runtime_error("graph computation failed");
    }

    // ---- outputs, and the caches now hold the new rows
    std::vector<float> out;
    if (graph_->logits) {
        out.resize(ggml_nelements(graph_->logits));
        ggml_backend_tensor_get(graph_->logits, out.data(), 0, ggml_nbytes(graph_->logits));
    }
    const bool pruning = prune.after_layer >= 0;
    for (int il = 0; il < hp.n_layer; ++il) {
        auto &p = cache_->layers[il].pos;
        if (pruning && il > prune.after_layer) p.insert(p.end(), kept_pos.begin(), kept_pos.end());
        else p.insert(p.end(), pos, pos + n_rows);
    }
    return out;
}

}  // namespace cmx

// CoreMatching's host-side parts (definitions: docs/corematching.md).
#include "sparsity.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <string>
#include <thread>

#include "ggml-alloc.h"
#include "quant_rows.h"

namespace cmx {

namespace {

// Runs fn(i) for i in [0, n) on up to n_threads threads.
template <class Fn>
void parallel_for(int64_t n, int n_threads, Fn fn) {
    n_threads = (int)std::max<int64_t>(1, std::min<int64_t>(n_threads, n));
    if (n_threads == 1) {
        for (int64_t i = 0; i < n; ++i) fn(i);
        return;
    }
    std::atomic<int64_t> next{0};
    std::vector<std::thread> pool;
    for (int t = 0; t < n_threads; ++t)
        pool.emplace_back([&] {
            for (int64_t i; (i = next.fetch_add(1)) < n;) fn(i);
        });
    for (auto &th : pool) th.join();
}

int64_t core_count(int64_t n_ff, double beta, int64_t block) {
    const int64_t n = (int64_t)std::floor(beta * (double)n_ff);
    return std::min<int64_t>(n_ff, (n + block - 1) / block * block);
}

// The n_core neurons of largest count (ties: lower index first), ascending.
std::vector<int32_t> most_frequent(const std::vector<int64_t> &freq, int64_t n_core) {
    std::vector<int32_t> idx(freq.size());
    std::iota(idx.begin(), idx.end(), 0);
    std::stable_sort(idx.begin(), idx.end(), [&](int32_t x, int32_t y) { return freq[x] > freq[y]; });
    idx.resize(n_core);
    std::sort(idx.begin(), idx.end());
    return idx;
}
}  // namespace

// ---------------------------------------------------------------- statistics

void NeuronStats::truncate(size_t n) {
    if (n < n_active.size()) n_active.resize(n);
}

void NeuronStats::append_none(size_t n) {
    n_active.insert(n_active.end(), n, -1);  // no slots written: their rows are never read
}

void NeuronStats::reserve_rows(size_t rows) {
    n_active.reserve(rows);
    if (rows <= capacity) return;
    capacity = rows;
    if (kmax > 0) top.resize(capacity * (size_t)kmax);
}

void NeuronStats::set_kmax(int new_kmax) {
    if (new_kmax == kmax && top.size() == capacity * (size_t)kmax) return;
    kmax = new_kmax;
    // written through once now (zeros), as the KV cache is, so pages are not first touched
    // turn by turn
    std::vector<uint16_t>(capacity * (size_t)kmax, 0).swap(top);
    n_active.assign(n_active.size(), -1);  // slots of another size: what they held is gone
}

uint16_t *NeuronStats::prepare_rows(size_t base, int64_t n_tokens) {
    if (base + (size_t)n_tokens > capacity) reserve_rows(std::max(base + (size_t)n_tokens, 2 * capacity));
    n_active.resize(base + (size_t)n_tokens);
    return top.data() + base * (size_t)kmax;
}

void token_stats(const float *a, int64_t n_ff, int kmax, float tau, int32_t *out) {
    // Scratch per thread, reused row after row: no allocation per token (the graph's threads run
    // this for every row of every layer).
    thread_local std::vector<int32_t> strong;
    int32_t active = 0;
    if (!std::isnan(tau)) {  // threshold mode: no sort, unless more neurons pass than the slots hold
        strong.clear();
        strong.reserve(n_ff);
        for (int64_t i = 0; i < n_ff; ++i) {
            active += a[i] > 0.0f;
            if (a[i] > tau) strong.push_back((int32_t)i);  // NaN compares false: never strong
        }
        if ((int64_t)strong.size() > kmax)  // rare: keep the largest
            std::nth_element(strong.begin(), strong.begin() + kmax, strong.end(),
                             [&](int32_t x, int32_t y) { return a[x] > a[y] || (a[x] == a[y] && x < y); });
        const int n = (int)std::min<size_t>(strong.size(), (size_t)kmax);
        out[0] = active;
        for (int i = 0; i < kmax; ++i) out[1 + i] = i < n ? strong[i] : NeuronStats::kNoNeuron;
        return;
    }
    // Sort mode: each neuron as one 64-bit key, value bits above (mapped so that unsigned order
    // is float order) and the inverted index below, so that larger values come first and ties
    // go to the lower index: plain integer comparisons, no indirection.
    thread_local std::vector<uint64_t> keys;
    keys.resize(n_ff);
    for (int64_t i = 0; i < n_ff; ++i) {
        float x = a[i];
        active += x > 0.0f;
        if (std::isnan(x)) x = -std::numeric_limits<float>::infinity();  // keeps the order strict
        uint32_t bits;
        std::memcpy(&bits, &x, sizeof bits);
        bits = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);  // order-preserving
        if (x == 0.0f) bits = 0x80000000u;                           // -0 and +0 tie, as floats do
        keys[i] = (uint64_t)bits << 32 | (uint32_t)(0xFFFFFFFFu - (uint32_t)i);
    }
    // the kmax largest, strongest first: the count k <= kmax is known only once the prompt is
    // done, and is then the first k of every token
    std::nth_element(keys.begin(), keys.begin() + kmax, keys.end(), std::greater<uint64_t>());
    std::sort(keys.begin(), keys.begin() + kmax, std::greater<uint64_t>());
    out[0] = active;
    for (int i = 0; i < kmax; ++i) out[1 + i] = (int32_t)(0xFFFFFFFFu - (uint32_t)keys[i]);
}

void NeuronStats::configure(double rho_, float tau_, int64_t n_ff) {
    if (n_ff >= kNoNeuron) throw std::invalid_argument("core neurons need n_ff < 65535");
    set_mode(rho_, tau_);
    set_kmax((int)std::floor(rho * (double)n_ff));
}

void NeuronStats::append_rows(const int32_t *rows, int64_t n_tokens, size_t stride) {
    const size_t base = n_active.size();
    uint16_t *slots = prepare_rows(base, n_tokens);
    for (int64_t j = 0; j < n_tokens; ++j) {
        const int32_t *row = rows + j * stride;
        n_active[base + j] = row[0];
        if (row[0] < 0) continue;  // a row the op skipped: no statistics
        for (int i = 0; i < kmax; ++i) slots[j * (size_t)kmax + i] = (uint16_t)row[1 + i];
    }
}

void NeuronStats::append(const float *acts, int64_t n_ff, int64_t n_tokens, double rho_, int n_threads) {
    configure(rho_, std::numeric_limits<float>::quiet_NaN(), n_ff);
    append_computed(acts, n_ff, n_tokens, n_threads);
}

void NeuronStats::append_computed(const float *acts, int64_t n_ff, int64_t n_tokens, int n_threads) {
    const size_t stride = 1 + (size_t)kmax;
    std::vector<int32_t> rows(n_tokens * stride);
    parallel_for(n_tokens, n_threads, [&](int64_t j) { token_stats(acts + j * n_ff, n_ff, kmax, tau, rows.data() + j * stride); });
    append_rows(rows.data(), n_tokens, stride);
}

std::vector<int32_t> core_neurons(const NeuronStats &stats, int64_t n_ff, double beta, int64_t block) {
    if (stats.threshold_mode()) return core_neurons_above(stats, n_ff, beta, block);
    int64_t n_tokens = 0;
    double total_active = 0.0;
    for (int32_t n : stats.n_active)
        if (n >= 0) {
            ++n_tokens;
            total_active += n;
        }
    if (n_tokens == 0) return {};
    // one count k for every token: rho times the mean activated count (CoreInfer)
    const int64_t k = std::min<int64_t>(stats.kmax, (int64_t)std::floor(stats.rho * total_active / (double)n_tokens));
    std::vector<int64_t> freq(n_ff, 0);
    for (size_t t = 0; t < stats.n_active.size(); ++t) {
        if (stats.n_active[t] < 0) continue;
        const uint16_t *idx = stats.top.data() + t * (size_t)stats.kmax;  // strongest first
        for (int64_t i = 0; i < k; ++i) ++freq[idx[i]];
    }
    return most_frequent(freq, core_count(n_ff, beta, block));
}

// ---------------------------------------------------------------- profile: thresholds and tables

void NeuronStats::set_mode(double rho_, float tau_) {
    const bool same_tau = (std::isnan(tau) && std::isnan(tau_)) || tau == tau_;
    if (rho_ == rho && same_tau) return;
    rho = rho_;
    tau = tau_;
    n_active.assign(n_active.size(), -1);  // statistics of another rho or mode: forgotten
}

void NeuronStats::append_above(const float *acts, int64_t n_ff, int64_t n_tokens, int n_threads) {
    configure(rho, tau, n_ff);
    append_computed(acts, n_ff, n_tokens, n_threads);
}

int64_t NeuronStats::n_with_stats() const {
    int64_t n = 0;
    for (int32_t a : n_active) n += a >= 0;
    return n;
}

std::vector<int32_t> core_neurons_above(const NeuronStats &stats, int64_t n_ff, double beta, int64_t block) {
    if (stats.n_with_stats() == 0) return {};
    std::vector<int64_t> freq(n_ff, 0);
    for (size_t t = 0; t < stats.n_active.size(); ++t) {
        if (stats.n_active[t] < 0) continue;
        const uint16_t *idx = stats.top.data() + t * (size_t)stats.kmax;
        for (int i = 0; i < stats.kmax && idx[i] != NeuronStats::kNoNeuron; ++i) ++freq[idx[i]];
    }
    return most_frequent(freq, core_count(n_ff, beta, block));
}

std::vector<int32_t> table_core_neurons(const std::vector<int32_t> &order, int64_t n_ff, double beta, int64_t block) {
    if ((int64_t)order.size() != n_ff) throw std::invalid_argument("a neuron order must list n_ff neurons");
    std::vector<int32_t> set(order.begin(), order.begin() + core_count(n_ff, beta, block));
    std::sort(set.begin(), set.end());
    return set;
}

// ---------------------------------------------------------------- core tokens

int64_t elbow_count(const std::vector<double> &s) {
    const int64_t M = (int64_t)s.size();
    if (M == 0) return 0;
    // distance of (j, s_j) from the line through the first and last points, up to a constant
    const double rise = s[M - 1] - s[0], run = (double)(M - 1);
    int64_t best = 0;
    double best_d = -1.0;
    for (int64_t j = 0; j < M; ++j) {
        double d = std::fabs(rise * (double)j - run * (s[j] - s[0]));
        if (d > best_d) best_d = d, best = j;
    }
    int64_t n = 0;
    while (n < M && s[n] > s[best]) ++n;
    return n;
}

std::vector<int32_t> select_tokens(const std::vector<double> &scores, int budget, double min_keep, double max_keep) {
    const int64_t M = (int64_t)scores.size();
    if (M == 0) return {};
    std::vector<int32_t> order(M);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int32_t x, int32_t y) { return scores[x] > scores[y]; });
    int64_t n;
    if (budget > 0) {
        n = std::min<int64_t>(budget, M);
    } else {
        std::vector<double> sorted(M);
        for (int64_t i = 0; i < M; ++i) sorted[i] = scores[order[i]];
        n = elbow_count(sorted);
        n = std::max<int64_t>(n, (int64_t)std::ceil(min_keep * (double)M));
        n = std::min<int64_t>(n, (int64_t)std::floor(max_keep * (double)M));
        n = std::min<int64_t>(std::max<int64_t>(n, 1), M);
    }
    std::vector<int32_t> kept(order.begin(), order.begin() + n);
    std::sort(kept.begin(), kept.end());
    return kept;
}

int64_t count_active_in(const float *acts, const std::vector<uint8_t> &mask) {
    int64_t n = 0;
    for (size_t i = 0; i < mask.size(); ++i) n += mask[i] && acts[i] > 0.0f;
    return n;
}

// ---------------------------------------------------------------- compact FFN weights

void CompactFfn::clear() {
    if (ctx_) ggml_free(ctx_);
    ctx_ = nullptr;
    layers_.clear();
    ++version_;
}

void CompactFfn::release() {
    clear();
    for (auto b : buffers_) ggml_backend_buffer_free(b);
    buffers_.clear();
}

size_t CompactFfn::bytes() const {
    size_t n = 0;
    for (auto b : buffers_) n += ggml_backend_buffer_get_size(b);
    return n;
}

void CompactFfn::build(const Model &model, const std::vector<std::vector<int32_t>> &neurons, int n_threads) {
    const HParams &hp = model.hp;
    if ((int)neurons.size() > hp.n_layer) throw std::invalid_argument("more neuron sets than layers");
    for (size_t il = 0; il < neurons.size(); ++il) {
        const auto &set = neurons[il];
        for (size_t i = 0; i < set.size(); ++i)
            if (set[i] < 0 || set[i] >= hp.n_ff || (i && set[i] <= set[i - 1]))
                throw std::invalid_argument("neuron indices must be ascending and in [0, n_ff)");
        const ggml_tensor *down = model.layers[il].ffn_down;
        if (!set.empty() && (int64_t)set.size() < hp.n_ff && (int64_t)set.size() % ggml_blck_size(down->type) != 0)
            throw std::invalid_argument("layer " + std::to_string(il) + ": the neuron count must be a multiple of " +
                                        std::to_string(ggml_blck_size(down->type)) + ", the block of its ffn_down type " +
                                        ggml_type_name(down->type));
        if (ggml_quantize_requires_imatrix(down->type))
            throw std::invalid_argument(std::string("core neurons are not supported for ffn_down of type ") + ggml_type_name(down->type));
    }
    bool any_sparse = false;
    for (const auto &set : neurons) any_sparse |= !set.empty() && (int64_t)set.size() < hp.n_ff;
    if (any_sparse && model.lora && model.lora->adapts_ffn)
        throw std::invalid_argument("core neurons cannot be used with a LoRA adapter on the FFN (its update spans every neuron)");
    clear();
    layers_.resize(neurons.size());
    std::vector<int> sparse;
    for (size_t il = 0; il < neurons.size(); ++il)
        if (!neurons[il].empty() && (int64_t)neurons[il].size() < hp.n_ff) sparse.push_back((int)il);
    if (sparse.empty()) return;  // dense decode; the buffers wait for the next answer's copies

    ggml_init_params ip = {ggml_tensor_overhead() * 3 * sparse.size() + 1024, nullptr, true};
    ctx_ = ggml_init(ip);
    std::vector<std::pair<ggml_backend_buffer_type_t, std::vector<ggml_tensor *>>> by_type;
    auto place = [&](ggml_tensor *t) {
        ggml_backend_buffer_type_t buft = model.matrix_buffer_type(t);
        auto it = std::find_if(by_type.begin(), by_type.end(), [&](auto &p) { return p.first == buft; });
        if (it == by_type.end()) by_type.push_back({buft, {t}});
        else it->second.push_back(t);
    };
    for (int il : sparse) {
        const cmx::Layer &w = model.layers[il];
        Layer &c = layers_[il];
        const int64_t k = (int64_t)neurons[il].size();
        c.neurons = neurons[il];
        c.gate = ggml_new_tensor_2d(ctx_, w.ffn_gate->type, hp.n_embd, k);  // [n_embd, k]
        c.up = ggml_new_tensor_2d(ctx_, w.ffn_up->type, hp.n_embd, k);      // [n_embd, k]
        c.down = ggml_new_tensor_2d(ctx_, w.ffn_down->type, k, hp.n_embd);  // [k, n_embd]
        ggml_format_name(c.gate, "core_gate_l%d", il);
        ggml_format_name(c.up, "core_up_l%d", il);
        ggml_format_name(c.down, "core_down_l%d", il);
        place(c.gate);
        place(c.up);
        place(c.down);
    }
    std::vector<ggml_backend_buffer_t> previous;  // the last build's buffers: reused where they fit
    previous.swap(buffers_);
    auto fail = [&](const std::string &why) {  // frees this build's buffers and the unused ones
        buffers_.insert(buffers_.end(), previous.begin(), previous.end());
        release();
        throw std::runtime_error(why);
    };
    for (auto &[buft, tensors] : by_type) {
        size_t align = ggml_backend_buft_get_alignment(buft), total = 0;
        for (ggml_tensor *t : tensors) total += GGML_PAD(ggml_backend_buft_get_alloc_size(buft, t), align);
        auto fits = std::find_if(previous.begin(), previous.end(), [&](ggml_backend_buffer_t b) {
            return ggml_backend_buffer_get_type(b) == buft && ggml_backend_buffer_get_size(b) >= total &&
                   ggml_backend_buffer_get_size(b) <= 2 * total;  // do not pin much more than this build needs
        });
        ggml_backend_buffer_t buf = nullptr;
        if (fits != previous.end()) {
            buf = *fits;
            previous.erase(fits);
        } else {
            buf = ggml_backend_buft_alloc_buffer(buft, total);
        }
        if (!buf) fail("out of memory allocating " + std::to_string(total) + " bytes of core-neuron weights");
        ggml_backend_buffer_set_usage(buf, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
        buffers_.push_back(buf);
        ggml_tallocr talloc = ggml_tallocr_new(buf);
        for (ggml_tensor *t : tensors)
            if (ggml_tallocr_alloc(&talloc, t) != GGML_STATUS_SUCCESS) fail("cannot allocate core-neuron weights");
    }
    for (auto b : previous) ggml_backend_buffer_free(b);  // what this build could not use

    // Fill them: a layer per task (the source bytes are the file's, never a repacked copy).
    parallel_for((int64_t)sparse.size(), n_threads, [&](int64_t si) {
        const int il = sparse[si];
        const cmx::Layer &w = model.layers[il];
        const Layer &c = layers_[il];
        const auto &rows = c.neurons;
        const int64_t k = (int64_t)rows.size();
        // scratch kept by each thread across layers and answers: no fresh pages per layer
        thread_local std::vector<uint8_t> bytes;
        thread_local std::vector<float> full, gathered;
        for (auto [dst, src] : {std::pair{c.gate, w.ffn_gate}, std::pair{c.up, w.ffn_up}}) {
            const size_t row = ggml_row_size(src->type, hp.n_embd);  // neuron i = row i, contiguous
            const uint8_t *base = model.file_bytes(src);
            bytes.resize(row * k);
            for (int64_t i = 0; i < k; ++i) std::copy_n(base + row * rows[i], row, bytes.data() + row * i);
            ggml_backend_tensor_set(dst, bytes.data(), 0, row * k);
        }
        // down: neuron i is element i of each of the n_embd rows; row by row, dequantized,
        // gathered and quantized again while it is in cache
        const ggml_type type = w.ffn_down->type;
        const size_t src_row = ggml_row_size(type, hp.n_ff), dst_row = ggml_row_size(type, k);
        const uint8_t *base = model.file_bytes(w.ffn_down);
        full.resize(hp.n_ff);
        gathered.resize(k);
        bytes.resize(dst_row * hp.n_embd);
        for (int64_t e = 0; e < hp.n_embd; ++e) {
            dequantize_row(type, base + src_row * e, full.data(), hp.n_ff);
            for (int64_t i = 0; i < k; ++i) gathered[i] = full[rows[i]];
            quantize_row(type, gathered.data(), bytes.data() + dst_row * e, k);
        }
        ggml_backend_tensor_set(c.down, bytes.data(), 0, dst_row * hp.n_embd);
    });
}

}  // namespace cmx

// CoreMatching's host-side parts: per-token neuron statistics, core neurons, core-token scores and
// the elbow, and the compact FFN weights that decode steps read. The exact definitions are in
// docs/corematching.md; cmx.reference implements the same in PyTorch.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "model.h"

namespace cmx {

// How image tokens are scored at layer K: CoreMatching's `anchor` (neurons shared with the anchor
// token) or `paper` (neurons shared with the prompt's core neurons), or FastV's `fastv` (the
// attention the batch's last row pays them at layer K, averaged over heads).
enum class TokenScore { anchor, paper, fastv };

// Which prompt tokens' statistics make a layer's core neurons for the decode: every token the
// layer holds, or its text tokens alone (image rows then count for nothing: the answer is text).
enum class NeuronTokens { all, text };

struct SparsityParams {
    bool tokens = true;    // prune image tokens after prune_layer
    bool neurons = true;   // decode FFNs read only core neurons
    double rho = 0.2;      // token-wise core neurons: this share of the mean activated count
    double beta = 0.4;     // sentence-wise core neurons: this share of n_ff (rounded up to a block)
    int prune_layer = 2;   // K: layers <= K see every token
    TokenScore score = TokenScore::anchor;
    int budget = 0;        // > 0: keep this many tokens per image instead of the elbow's count
    double min_keep = 0.0, max_keep = 1.0;  // bounds on the elbow's kept fraction
    std::vector<int> dense_layers;          // layers whose decode FFN stays dense
    NeuronTokens neuron_tokens = NeuronTokens::text;  // cmx.Sparsity's default (docs/decisions.md)
    // From a profile stored in the model file (cmx.coreprofile), each empty when not used:
    std::vector<float> thresholds;                  // per layer: token-wise core neurons are a > tau (NaN: sort)
    std::vector<std::vector<int32_t>> neuron_order; // per layer: every neuron, by calibration frequency
    int short_prompt_tokens = 0;  // a layer holding fewer tokens with statistics takes its C^beta from neuron_order
};

// One layer's per-token neuron statistics, row for row with its KV cache (LayerCache::pos).
// Slots for the cache's capacity are allocated and written once, when the first statistics
// arrive (as the KV cache is at creation): memory stays flat over a conversation.
struct NeuronStats {
    static constexpr uint16_t kNoNeuron = 0xFFFF;  // an unused slot (threshold mode)
    double rho = 0.0;
    int kmax = 0;                   // slots per token: floor(rho * n_ff)
    size_t capacity = 0;            // rows the slots are allocated for; grows only past it
    std::vector<uint16_t> top;      // [capacity * kmax]: each token's kmax largest activations' neurons, largest first
    std::vector<int32_t> n_active;  // per token |Gamma(x)|; -1: no statistics (a token generated sparsely)

    size_t size() const { return n_active.size(); }
    void reserve_rows(size_t rows);  // the KV cache's capacity, before the first append
    void truncate(size_t n);
    void forget(size_t row) { n_active[row] = -1; }  // the row no longer counts towards core neurons
    void append_none(size_t n);
    // Statistics of n_tokens tokens from their activations, token-major [n_tokens][n_ff].
    // A different rho than the stored one invalidates the stored tokens.
    void append(const float *acts, int64_t n_ff, int64_t n_tokens, double rho, int n_threads);
    // Sets rho and tau (NaN: sort mode) for the next append_rows; a change forgets what is stored.
    void configure(double rho, float tau, int64_t n_ff);
    // Statistics already computed by token_stats (the graph's op): n_tokens rows of `stride`
    // (>= 1 + kmax) words, each [n_active, kmax slots, padding]; a row whose first value is -1 has none.
    void append_rows(const int32_t *rows, int64_t n_tokens, size_t stride);

    // Threshold mode (a profile's tau): a token's core neurons are those with a > tau, stored in
    // its kmax slots (at most kmax: the largest when more pass; unused slots hold kNoNeuron), no sort.
    float tau = std::numeric_limits<float>::quiet_NaN();  // NaN: per-token top-k (append)
    bool threshold_mode() const { return !std::isnan(tau); }
    // Switches rho / mode before an append; statistics of another rho or mode are forgotten.
    void set_mode(double rho, float tau);
    void append_above(const float *acts, int64_t n_ff, int64_t n_tokens, int n_threads);
    int64_t n_with_stats() const;

   private:
    void append_computed(const float *acts, int64_t n_ff, int64_t n_tokens, int n_threads);
    void set_kmax(int kmax);                               // (re)allocates the slots, forgetting them on a change
    uint16_t *prepare_rows(size_t base, int64_t n_tokens);  // rows base.. of the slots, now in use
};

// One token's statistics from its n_ff activations (NeuronStats::append and the graph's statistics
// op compute them the same way): out[0] = |Gamma(x)|, out[1..kmax] its slots, strongest first; in
// threshold mode (tau not NaN) the neurons above tau, then kNoNeuron.
void token_stats(const float *a, int64_t n_ff, int kmax, float tau, int32_t *out);

// A layer's token_stats computed in the graph, row by row, so that only
// 1 + kmax integers per row leave it instead of n_ff activations.
struct StatsOp {
    int64_t n_ff = 0;
    int kmax = 0;
    float tau = 0.0f;  // NaN: sort mode
    double ms = 0.0;   // time its first thread spent in it (the rows are split evenly), summed over runs
};

// C^beta of threshold-mode statistics: the n_core neurons most often above tau (ties: lower index).
std::vector<int32_t> core_neurons_above(const NeuronStats &stats, int64_t n_ff, double beta, int64_t block);

// A layer's C^beta from a stored frequency order: its first n_core neurons, ascending.
std::vector<int32_t> table_core_neurons(const std::vector<int32_t> &order, int64_t n_ff, double beta, int64_t block);

// The layer's core neurons C^beta over every token that has statistics, ascending. Empty when no
// token has statistics.
std::vector<int32_t> core_neurons(const NeuronStats &stats, int64_t n_ff, double beta, int64_t block);

// Number of tokens the elbow keeps, from scores sorted in descending order.
int64_t elbow_count(const std::vector<double> &sorted_desc);

// Kept indices (ascending) of one image's token scores: a fixed budget, or the elbow clamped to
// [ceil(min_keep*M), floor(max_keep*M)] and to at least 1.
std::vector<int32_t> select_tokens(const std::vector<double> &scores, int budget, double min_keep, double max_keep);

// |Gamma(x) ∩ S| for a token's activations and a neuron set S given as a mask.
int64_t count_active_in(const float *acts, const std::vector<uint8_t> &mask);

// Gate/up rows and down columns of the core neurons of each sparse layer, in the file's types:
// gate/up rows are copied byte for byte; the down matrix is gathered and re-quantized along the
// neuron axis (its quantization blocks run along that axis). Owns its backend buffer.
class CompactFfn {
   public:
    struct Layer {
        ggml_tensor *gate = nullptr, *up = nullptr, *down = nullptr;  // [n_embd, k], [n_embd, k], [k, n_embd]
        std::vector<int32_t> neurons;
    };

    CompactFfn() = default;
    ~CompactFfn() { release(); }
    CompactFfn(const CompactFfn &) = delete;
    CompactFfn &operator=(const CompactFfn &) = delete;

    // neurons[il] empty or all of n_ff: layer il stays dense. The last build's buffers are reused
    // where they fit, also after a build with no sparse layer (Model.reset() makes one): the next
    // answer writes its copies into pages already mapped. release() returns the memory.
    void build(const Model &model, const std::vector<std::vector<int32_t>> &neurons, int n_threads);
    // Forget the copies, keeping their memory for the next build: the next answer's copies are
    // written into pages already mapped (fresh pages cost the kernel's zeroing, ~40% of a build).
    void clear();
    // Forget the copies and free their memory.
    void release();
    const Layer *layer(int il) const { return il < (int)layers_.size() && layers_[il].gate ? &layers_[il] : nullptr; }
    bool empty() const { return ctx_ == nullptr; }
    int64_t version() const { return version_; }
    size_t bytes() const;

   private:
    std::vector<Layer> layers_;
    ggml_context *ctx_ = nullptr;
    std::vector<ggml_backend_buffer_t> buffers_;
    int64_t version_ = 0;
};

}  // namespace cmx

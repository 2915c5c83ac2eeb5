// Python bindings: cmx._core. Thin: validation and ownership stay in C++; the user API lives in
// python/cmx/model.py.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdio>
#include <cstdlib>
#include <optional>
#include <tuple>

#include "engine.h"
#include "quant_rows.h"

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace py = pybind11;
using namespace cmx;

namespace {

const char *ggml_type_name_of(const ggml_tensor *t) { return ggml_type_name(t->type); }

py::dict model_info(const Model &m) {
    const HParams &hp = m.hp;
    py::dict d;
    d["arch"] = hp.arch_name;
    d["name"] = hp.name;
    d["n_layer"] = hp.n_layer;
    d["n_embd"] = hp.n_embd;
    d["n_ff"] = hp.n_ff;
    d["n_vocab"] = hp.n_vocab;
    d["n_head"] = hp.n_head;
    d["n_head_kv"] = hp.n_head_kv;
    d["head_dim"] = hp.head_dim;
    d["n_ctx_train"] = hp.n_ctx_train;
    d["rope_freq_base"] = hp.rope_freq_base;
    d["rope_freq_scale"] = hp.rope_freq_scale;
    d["rope_sections"] = hp.mrope() ? py::cast(std::vector<int>(hp.rope_sections, hp.rope_sections + GGML_MROPE_SECTIONS)) : py::none();
    d["norm_eps"] = hp.norm_eps;
    d["sliding_window"] = hp.n_swa;  // 0: every layer attends to the whole cache
    py::list swa;  // the sliding-window layers (gemma3)
    for (int il = 0; il < hp.n_layer; ++il)
        if (hp.is_swa(il)) swa.append(il);
    d["sliding_window_layers"] = swa;
    d["file_type"] = hp.file_type;
    d["tied_output"] = m.tied_output;
    d["ffn_type"] = ggml_type_name_of(m.layers[0].ffn_gate);
    d["token_embd_type"] = ggml_type_name_of(m.tok_embd);
    d["device"] = m.device_name;
    d["weight_bytes"] = m.weight_bytes();
    d["lora"] = m.lora ? py::cast(m.lora->path) : py::none();
    return d;
}

// ggml's own log messages (gguf parsing, backends) at or above this ggml_log_level reach stderr.
int g_min_log_level = GGML_LOG_LEVEL_ERROR;
int g_last_log_level = GGML_LOG_LEVEL_INFO;

void ggml_log_to_stderr(ggml_log_level level, const char *text, void *) {
    int effective = level == GGML_LOG_LEVEL_CONT ? g_last_log_level : (int)level;
    g_last_log_level = effective;
    // ggml_log_level orders DEBUG(1) < INFO(2) < WARN(3) < ERROR(4)
    if (effective >= g_min_log_level && effective != GGML_LOG_LEVEL_NONE) fputs(text, stderr);
}

// M-RoPE position components: an int array [n_rows, 4] (temporal, row, column, unused), or None.
void set_rope_pos(Batch &b, py::object rope_pos) {
    if (rope_pos.is_none()) return;
    auto a = rope_pos.cast<py::array_t<int32_t, py::array::c_style | py::array::forcecast>>();
    if (a.ndim() != 2 || a.shape(1) != GGML_MROPE_SECTIONS || (size_t)a.shape(0) != b.tokens.size())
        throw std::invalid_argument("rope_pos must have shape (n_rows, 4)");
    b.rope_pos.assign(a.data(), a.data() + a.size());
}

// Points the batch at float embeddings (kept alive by `holder`), checking their shape.
void set_embeddings(const Engine &e, Batch &b, py::object embd, py::array_t<float, py::array::c_style | py::array::forcecast> &holder) {
    if (embd.is_none()) return;
    holder = embd.cast<py::array_t<float, py::array::c_style | py::array::forcecast>>();
    if (holder.ndim() != 2 || holder.shape(1) != e.model().hp.n_embd)
        throw std::invalid_argument("embeddings must have shape (n, n_embd=" + std::to_string(e.model().hp.n_embd) + ")");
    b.embd = holder.data();
    b.n_embd_rows = (int)holder.shape(0);
}

py::dict tensor_desc(const TensorDesc &t) {
    py::dict d;
    d["name"] = t.name;
    d["type"] = ggml_type_name(t.type);
    d["ne"] = py::make_tuple(t.ne[0], t.ne[1], t.ne[2], t.ne[3]);
    d["contiguous"] = t.contiguous;
    d["contiguous_1"] = t.contiguous_1;
    d["contiguous_rows"] = t.contiguous_rows;
    d["transposed"] = t.transposed;
    return d;
}

py::list graph_descs(const std::vector<GraphDesc> &graphs) {
    py::list out;
    for (const GraphDesc &g : graphs) {
        py::list nodes;
        for (const NodeDesc &n : g.nodes) {
            py::dict d = tensor_desc(n.dst);
            d["op"] = ggml_op_name(n.op);
            d["kind"] = n.kind;
            d["params"] = n.params;
            py::list src;
            for (const auto &s : n.src) src.append(s ? py::object(tensor_desc(*s)) : py::object(py::none()));
            d["src"] = src;
            nodes.append(d);
        }
        py::dict gd;
        gd["call"] = g.decode ? "decode" : "prefill";
        gd["layers"] = py::make_tuple(g.layer_begin, g.layer_end);
        gd["n_rows"] = g.n_rows;
        gd["nodes"] = nodes;
        gd["unaligned"] = g.unaligned;
        out.append(gd);
    }
    return out;
}

// glibc raises its mmap threshold to the size of each large block freed (up to 32 MB), after which
// the engine's, mtmd's and numpy's per-prompt buffers of a few MB come from the heap, whose freed
// holes it keeps: RSS then climbs in steps over a long chat. A fixed threshold keeps every buffer
// of 1 MiB or more in its own mapping, returned to the system when freed. Not lower: each decode
// step allocates and frees a logits row (n_vocab floats, 128-600 KB), which as a mapping of its
// own costs two system calls and a page fault per 4 KB on every token. A user's
// MALLOC_MMAP_THRESHOLD_ wins.
void fix_malloc_mmap_threshold() {
#if defined(__GLIBC__)
    if (!std::getenv("MALLOC_MMAP_THRESHOLD_")) mallopt(M_MMAP_THRESHOLD, 1024 * 1024);
#endif
}
}  // namespace

PYBIND11_MODULE(_core, mod) {
    mod.doc() = "cmx engine: a ggml decoder graph for llama/qwen2 GGUF models";
    fix_malloc_mmap_threshold();
    static py::exception<load_error> model_load_error(mod, "ModelLoadError", PyExc_ValueError);
    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const load_error &e) {
            py::set_error(model_load_error, e.what());
        }
    });

    mod.def("set_ggml_log_level", [](int level) {
        g_min_log_level = level;
        ggml_log_set(ggml_log_to_stderr, nullptr);
    }, py::arg("level"), "Print ggml's log messages at or above this ggml_log_level (1 debug .. 4 error, 5: none).");
    // llama.cpp and mtmd take the same callback type: routing them here too keeps Python out of
    // their logging (a Ctrl-C that lands in a ctypes callback is dropped by ctypes)
    mod.def("log_callback_address", []() { return reinterpret_cast<uintptr_t>(&ggml_log_to_stderr); },
            "Address of the C log callback set_ggml_log_level filters (for llama_log_set / mtmd_helper_log_set).");

    py::enum_<TokenScore>(mod, "TokenScore")
        .value("anchor", TokenScore::anchor)
        .value("paper", TokenScore::paper)
        .value("fastv", TokenScore::fastv);
    py::enum_<NeuronTokens>(mod, "NeuronTokens")
        .value("all", NeuronTokens::all)
        .value("text", NeuronTokens::text);
    py::class_<SparsityParams>(mod, "SparsityParams", "CoreMatching settings (see cmx.Sparsity, which validates them)")
        .def(py::init<>())
        .def_readwrite("tokens", &SparsityParams::tokens)
        .def_readwrite("neurons", &SparsityParams::neurons)
        .def_readwrite("rho", &SparsityParams::rho)
        .def_readwrite("beta", &SparsityParams::beta)
        .def_readwrite("prune_layer", &SparsityParams::prune_layer)
        .def_readwrite("score", &SparsityParams::score)
        .def_readwrite("budget", &SparsityParams::budget)
        .def_readwrite("min_keep", &SparsityParams::min_keep)
        .def_readwrite("max_keep", &SparsityParams::max_keep)
        .def_readwrite("dense_layers", &SparsityParams::dense_layers)
        .def_readwrite("neuron_tokens", &SparsityParams::neuron_tokens)
        .def_readwrite("thresholds", &SparsityParams::thresholds)
        .def_readwrite("neuron_order", &SparsityParams::neuron_order)
        .def_readwrite("short_prompt_tokens", &SparsityParams::short_prompt_tokens);

    // The selection rules on their own, for tests against cmx.reference.
    mod.def("select_tokens", &select_tokens, py::arg("scores"), py::arg("budget") = 0, py::arg("min_keep") = 0.0,
            py::arg("max_keep") = 1.0, "Kept indices (ascending) of one image's scores: a budget, or the clamped elbow.");
    // The compact copies' row codecs, for tests against ggml's reference (gguf-py's numpy copy).
    auto type_named = [](const std::string &name, int64_t n) {
        for (int t = 0; t < GGML_TYPE_COUNT; ++t) {
            const char *tn = ggml_type_name((ggml_type)t);
            if (tn && name == tn && ggml_get_type_traits((ggml_type)t)->blck_size > 0) {
                if (n % ggml_blck_size((ggml_type)t) != 0)
                    throw std::invalid_argument("a row of " + name + " holds a multiple of " + std::to_string(ggml_blck_size((ggml_type)t)) + " values");
                return (ggml_type)t;
            }
        }
        throw std::invalid_argument("unknown ggml type " + name);
    };
    mod.def(
        "quantize_row",
        [type_named](const std::string &type, py::array_t<float, py::array::c_style | py::array::forcecast> x) {
            const ggml_type t = type_named(type, x.size());
            std::string out(ggml_row_size(t, x.size()), '\0');
            quantize_row(t, x.data(), out.data(), x.size());
            return py::bytes(out);
        },
        py::arg("type"), py::arg("values"), "A row of ggml type `type` (e.g. 'q4_0') from float32 values.");
    mod.def(
        "dequantize_row",
        [type_named](const std::string &type, const py::bytes &row, int64_t n) {
            const ggml_type t = type_named(type, n);
            const std::string_view bytes(row);
            if (n < 0 || bytes.size() != ggml_row_size(t, n)) throw std::invalid_argument("the row's size does not match n");
            py::array_t<float> out(n);
            dequantize_row(t, bytes.data(), out.mutable_data(), n);
            return out;
        },
        py::arg("type"), py::arg("row"), py::arg("n"), "The n float32 values of a row of ggml type `type`.");
    mod.def("elbow_count", &elbow_count, py::arg("sorted_desc"), "Tokens the elbow keeps, from scores sorted descending.");
    mod.def(
        "core_neurons",
        [](py::array_t<float, py::array::c_style | py::array::forcecast> acts, double rho, double beta, int64_t block) {
            if (acts.ndim() != 2 || acts.shape(0) == 0) throw std::invalid_argument("acts must be [n_tokens, n_ff]");
            if (!(rho > 0 && rho <= 1) || !(beta > 0 && beta <= 1) || block <= 0) throw std::invalid_argument("need rho, beta in (0, 1] and block > 0");
            NeuronStats st;
            st.append(acts.data(), acts.shape(1), acts.shape(0), rho, 1);
            return core_neurons(st, acts.shape(1), beta, block);
        },
        py::arg("acts"), py::arg("rho"), py::arg("beta"), py::arg("block") = 1,
        "Core neurons (ascending) of tokens' FFN activations [n_tokens, n_ff].");
    mod.def(
        "core_neurons_above",
        [](py::array_t<float, py::array::c_style | py::array::forcecast> acts, double rho, float tau, double beta, int64_t block) {
            if (acts.ndim() != 2 || acts.shape(0) == 0) throw std::invalid_argument("acts must be [n_tokens, n_ff]");
            if (!(rho > 0 && rho <= 1) || !(beta > 0 && beta <= 1) || block <= 0 || std::isnan(tau))
                throw std::invalid_argument("need rho, beta in (0, 1], block > 0 and a tau");
            NeuronStats st;
            st.set_mode(rho, tau);
            st.append_above(acts.data(), acts.shape(1), acts.shape(0), 1);
            return core_neurons(st, acts.shape(1), beta, block);
        },
        py::arg("acts"), py::arg("rho"), py::arg("tau"), py::arg("beta"), py::arg("block") = 1,
        "Core neurons (ascending) in threshold mode: each token's neurons with a > tau (at most floor(rho*n_ff)).");

    py::class_<Engine>(mod, "Engine")
        .def(py::init([](const std::string &path, int n_ctx, int n_batch, int n_threads, bool use_gpu, const std::string &lora,
                         float lora_scale) {
                 if (n_ctx <= 0) throw std::invalid_argument("n_ctx must be > 0, got " + std::to_string(n_ctx));
                 if (n_batch <= 0) throw std::invalid_argument("n_batch must be > 0, got " + std::to_string(n_batch));
                 if (n_threads < 0) throw std::invalid_argument("n_threads must be >= 0 (0: all cores)");
                 LoadParams lp;
                 lp.n_threads = n_threads;
                 lp.use_gpu = use_gpu;
                 lp.lora_path = lora;
                 lp.lora_scale = lora_scale;
                 std::shared_ptr<Model> model;
                 {
                     py::gil_scoped_release nogil;
                     model = load_model(path, lp);
                 }
                 return std::make_unique<Engine>(model, EngineParams{n_ctx, n_batch});
             }),
             py::arg("path"), py::arg("n_ctx") = 4096, py::arg("n_batch") = 512, py::arg("n_threads") = 0,
             py::arg("use_gpu") = true, py::arg("lora") = "", py::arg("lora_scale") = 1.0f)
        .def_property_readonly("info", [](const Engine &e) { return model_info(e.model()); })
        .def_property_readonly("n_ctx", &Engine::n_ctx)
        .def_property_readonly("n_batch", &Engine::n_batch)
        .def_property("n_threads", [](const Engine &e) { return e.model().n_threads; },
                      [](Engine &e, int n) { const_cast<Model &>(e.model()).set_n_threads(n); })
        .def(
            "decode",
            [](Engine &e, py::array_t<int32_t, py::array::c_style | py::array::forcecast> tokens,
               py::array_t<int32_t, py::array::c_style | py::array::forcecast> pos,
               py::array_t<int32_t, py::array::c_style | py::array::forcecast> out_rows, py::object embd,
               int prune_after_layer, py::object keep_rows, py::object rope_pos) {
                Batch b;
                b.tokens.assign(tokens.data(), tokens.data() + tokens.size());
                b.pos.assign(pos.data(), pos.data() + pos.size());
                set_rope_pos(b, rope_pos);
                b.out_rows.assign(out_rows.data(), out_rows.data() + out_rows.size());
                py::array_t<float, py::array::c_style | py::array::forcecast> embd_arr;
                set_embeddings(e, b, embd, embd_arr);
                Prune prune;
                prune.after_layer = prune_after_layer;
                if (!keep_rows.is_none()) prune.keep_rows = keep_rows.cast<std::vector<int32_t>>();
                std::vector<float> logits;
                {
                    py::gil_scoped_release nogil;
                    logits = e.decode(b, prune);
                }
                const py::ssize_t n_vocab = e.model().hp.n_vocab;
                py::array_t<float> out({(py::ssize_t)b.out_rows.size(), n_vocab});
                std::copy(logits.begin(), logits.end(), out.mutable_data());
                return out;
            },
            py::arg("tokens"), py::arg("pos"), py::arg("out_rows"), py::arg("embd") = py::none(),
            py::arg("prune_after_layer") = -1, py::arg("keep_rows") = py::none(), py::arg("rope_pos") = py::none(),
            "Evaluate rows (token ids, -1 for rows from `embd`) at explicit positions on top of the cache (M-RoPE "
            "models: rope_pos [n, 4] gives each row's position components); returns float32 logits [len(out_rows), n_vocab].")
        .def(
            "prefill",
            [](Engine &e, py::array_t<int32_t, py::array::c_style | py::array::forcecast> tokens,
               py::array_t<int32_t, py::array::c_style | py::array::forcecast> pos,
               py::array_t<int32_t, py::array::c_style | py::array::forcecast> out_rows, py::object embd,
               const std::vector<py::tuple> &images, int anchor_row,
               std::optional<SparsityParams> sparsity, py::object rope_pos) {
                Batch b;
                b.tokens.assign(tokens.data(), tokens.data() + tokens.size());
                b.pos.assign(pos.data(), pos.data() + pos.size());
                set_rope_pos(b, rope_pos);
                b.out_rows.assign(out_rows.data(), out_rows.data() + out_rows.size());
                py::array_t<float, py::array::c_style | py::array::forcecast> embd_arr;
                set_embeddings(e, b, embd, embd_arr);
                std::vector<ImageSpan> spans;
                for (const py::tuple &im : images) {  // (first_row or its rows, n_rows, keep[, merge])
                    if (im.size() != 3 && im.size() != 4)
                        throw std::invalid_argument("an image is (first_row, n_rows, keep) or (first_row, n_rows, keep, merge)");
                    ImageSpan s{0, im[1].cast<int32_t>(), im[2].cast<std::vector<int32_t>>(), {}, {}};
                    if (py::isinstance<py::int_>(im[0])) {
                        s.first_row = im[0].cast<int32_t>();
                    } else {  // an image split by text rows: its rows
                        s.rows = im[0].cast<std::vector<int32_t>>();
                        if (s.rows.empty()) throw std::invalid_argument("an image's rows must not be empty");
                        s.first_row = s.rows[0];
                    }
                    if (im.size() == 4) s.merge = im[3].cast<std::vector<std::vector<int32_t>>>();
                    spans.push_back(std::move(s));
                }
                PrefillResult r;
                {
                    py::gil_scoped_release nogil;
                    r = e.prefill(b, spans, anchor_row, sparsity ? &*sparsity : nullptr);
                }
                py::array_t<float> logits({(py::ssize_t)b.out_rows.size(), (py::ssize_t)e.model().hp.n_vocab});
                std::copy(r.logits.begin(), r.logits.end(), logits.mutable_data());
                py::dict d;
                d["logits"] = logits;
                d["kept"] = r.kept;
                d["core_neurons"] = r.core_neurons;
                d["select_ms"] = r.select_ms;
                d["stats_ms"] = r.stats_ms;
                d["compact_ms"] = r.compact_ms;
                d["table_layers"] = r.table_layers;
                return d;
            },
            py::arg("tokens"), py::arg("pos"), py::arg("out_rows"), py::arg("embd") = py::none(),
            py::arg("images") = std::vector<py::tuple>{}, py::arg("anchor_row") = -1,
            py::arg("sparsity") = py::none(), py::arg("rope_pos") = py::none(),
            "Prefill a prompt (dense FFNs); with sparsity, CoreMatching prunes each image (first_row, n_rows, forced_keep"
            "[, merge groups]) "
            "after sparsity.prune_layer and sets the core neurons of later decodes. Returns a dict: logits, kept, "
            "core_neurons, select_ms, stats_ms, compact_ms.")
        .def("set_ffn_neurons", &Engine::set_ffn_neurons, py::arg("per_layer"),
             "Neuron index sets per layer (empty, or all of n_ff: dense) for later decodes.")
        .def("ffn_neurons", &Engine::ffn_neurons, "The core neurons each layer's decode FFN reads (empty: dense).")
        .def("record_graphs", &Engine::record_graphs, py::arg("on"),
             "Debug: while on, describe every graph the engine builds (turning it on forgets earlier records).")
        .def("recorded_graphs", [](const Engine &e) { return graph_descs(e.recorded_graphs()); },
             "Graphs built while recording: dicts of call ('prefill'/'decode'), layers, n_rows, unaligned (indices of the "
             "nodes computed into memory that does not start on a 64-byte boundary) and nodes (each node: op, kind, name, type, ne, "
             "contiguity flags, and src: the same per source, None where empty).")
        .def("clear", [](Engine &e) { e.cache().clear(); }, "Forget every cached token.")
        .def("truncate", [](Engine &e, int n) { e.cache().truncate(n); }, py::arg("n"),
             "Forget cached tokens at positions >= n in every layer.")
        .def("cache_len", [](Engine &e, int layer) {
                 if (layer < 0 || layer >= e.model().hp.n_layer) throw std::out_of_range("layer out of range");
                 return e.cache().layers[layer].pos.size();
             }, py::arg("layer"))
        .def("cache_positions", [](Engine &e, int layer) {
                 if (layer < 0 || layer >= e.model().hp.n_layer) throw std::out_of_range("layer out of range");
                 return e.cache().layers[layer].pos;
             }, py::arg("layer"))
        .def("cache_rope_positions", [](Engine &e, int layer) {
                 if (layer < 0 || layer >= e.model().hp.n_layer) throw std::out_of_range("layer out of range");
                 const std::vector<int32_t> &rp = e.cache().layers[layer].rope_pos;
                 py::array_t<int32_t> out({(py::ssize_t)(rp.size() / GGML_MROPE_SECTIONS), (py::ssize_t)GGML_MROPE_SECTIONS});
                 std::copy(rp.begin(), rp.end(), out.mutable_data());
                 return out;
             }, py::arg("layer"),
             "M-RoPE models: the position components (temporal, row, column, unused) of each token the layer caches, [n, 4].");
}

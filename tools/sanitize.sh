#!/usr/bin/env bash
# Builds cmx._core with AddressSanitizer + UndefinedBehaviorSanitizer (CMake option CMX_SANITIZE)
# and runs the test suite against it; fails on a test failure or on any sanitizer report.
#
#   tools/sanitize.sh                              # the whole suite (pytest -q tests; ~20-25 min on 2 cores)
#   tools/sanitize.sh tests/test_vision.py -x      # arguments replace "tests" in the pytest call
#
# The build goes to build/sanitize (CMX_SANITIZE_BUILD=DIR to change it). The installed cmx is
# not touched: an overlay (a copy of python/cmx plus the sanitized _core) is put first on
# PYTHONPATH, so the tests and the subprocesses they start import it instead.
# Result and suppressions: docs/decisions.md, "Sanitizers"; tools/sanitize.supp.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BUILD=${CMX_SANITIZE_BUILD:-$ROOT/build/sanitize}
SANITIZERS=${CMX_SANITIZE:-address,undefined}
# the interpreter itself, not a pyenv shim: the shim's helper processes would run preloaded too
PY=$("${PYTHON:-python}" -c "import sys; print(sys.executable)")

# --- build -----------------------------------------------------------------------------------
# RelWithDebInfo: -O2 -g, and pybind11 leaves the symbols in (it strips Release modules), so the
# reports have function names and lines.
cmake -S . -B "$BUILD/cmake" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMX_SANITIZE="$SANITIZERS" -DPython_EXECUTABLE="$(command -v "$PY")" \
  -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" >/dev/null
nice -n 10 ninja -C "$BUILD/cmake" _core

# --- overlay ---------------------------------------------------------------------------------
# _core finds ggml through its rpath $ORIGIN/../llama_cpp/lib: the overlay links that folder to
# the installed llama_cpp's (a folder without __init__.py, so `import llama_cpp` still finds the
# installed package; the same files, so the process still maps one ggml: tests/test_one_ggml.py).
OVERLAY=$BUILD/overlay
rm -rf "$OVERLAY"
mkdir -p "$OVERLAY/llama_cpp"
cp -r python/cmx "$OVERLAY/cmx"
find "$OVERLAY/cmx" -name __pycache__ -prune -exec rm -rf {} +
cp "$BUILD"/cmake/_core*.so "$OVERLAY/cmx/"
LLAMA_LIB=$("$PY" -c "import llama_cpp, os; print(os.path.join(os.path.dirname(llama_cpp.__file__), 'lib'))")
ln -s "$LLAMA_LIB" "$OVERLAY/llama_cpp/lib"

# --- runtime ---------------------------------------------------------------------------------
# Python is not instrumented, so the sanitizer runtimes must be the first libraries loaded.
CXX=$(sed -n 's/^CMAKE_CXX_COMPILER:[A-Z]*=//p' "$BUILD/cmake/CMakeCache.txt")
if "$CXX" --version | grep -q clang; then   # clang's ASan runtime includes UBSan's
  case ",$SANITIZERS," in *,address,*) RTS=libclang_rt.asan-x86_64.so ;; *) RTS=libclang_rt.ubsan_standalone-x86_64.so ;; esac
else                                        # GCC: one runtime each
  RTS=""
  case ",$SANITIZERS," in *,address,*) RTS="$RTS libasan.so" ;; esac
  case ",$SANITIZERS," in *,undefined,*) RTS="$RTS libubsan.so" ;; esac
fi
PRELOAD=""
for rt in $RTS; do
  lib=$("$CXX" -print-file-name=$rt)
  [ -e "$lib" ] || { echo "sanitize: $CXX has no $rt" >&2; exit 2; }
  PRELOAD="$PRELOAD:$(readlink -f "$lib")"
done
LOGS=$BUILD/logs
rm -rf "$LOGS"
mkdir -p "$LOGS"

export LD_PRELOAD="${PRELOAD#:}${LD_PRELOAD:+:$LD_PRELOAD}"
export PYTHONPATH="$OVERLAY${PYTHONPATH:+:$PYTHONPATH}"
# ASan:
#   log_path              a file per process that reports (subprocesses too), checked below; an
#                         ASan error also ends its process (halt_on_error=1, the default)
#   detect_leaks=0        CPython does not free its heap at exit (module init, interned objects,
#                         numpy/torch state) and LeakSanitizer cannot tell those from ours: every
#                         stack passes through libpython. An exploratory run with leaks on found
#                         none from cmx's code outside pybind11's module init (docs/decisions.md)
#   detect_stack_use_after_return=1, check_initialization_order=1, strict_init_order=1
#                         checks that are off by default; cmx's code passes them
# UBSan:
#   print_stacktrace=1    the report names the call path
#   halt_on_error=0       keep going, so that one run lists every report (each one is a file in
#                         the logs and fails this script)
#   suppressions          tools/sanitize.supp
export ASAN_OPTIONS="log_path=$LOGS/asan:detect_leaks=0:detect_stack_use_after_return=1:check_initialization_order=1:strict_init_order=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="log_path=$LOGS/ubsan:print_stacktrace=1:halt_on_error=0:suppressions=$ROOT/tools/sanitize.supp${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"

# the overlay's _core is the one imported (and it loads under the preloaded runtime)
core=$("$PY" -c "import cmx._core as c; print(c.__file__)")
[ "$core" = "$(ls "$OVERLAY"/cmx/_core*.so)" ] || { echo "sanitize: imported $core, not the overlay's" >&2; exit 2; }
echo "sanitize: _core with -fsanitize=$SANITIZERS, LD_PRELOAD=$LD_PRELOAD"
set +e
[ $# -gt 0 ] || set -- tests
nice -n 10 "$PY" -m pytest -q -p no:cacheprovider "$@"
rc=$?
set -e

reports=$(find "$LOGS" -type f | sort)
if [ -n "$reports" ]; then
  echo "sanitize: $(echo "$reports" | wc -l) sanitizer report file(s):"
  for f in $reports; do echo "== $f"; cat "$f"; done
  [ $rc -ne 0 ] || rc=1
else
  echo "sanitize: 0 sanitizer reports"
fi
exit $rc

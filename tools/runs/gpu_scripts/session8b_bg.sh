# Session 8b: the background job started by session8b_call1.sh (from ~/snap, setsid). Builds
# llama-cpp-python with CUDA and cmx against it (tools/gpu_check.sh --build-only), records what the
# llama.cpp libraries export, waits for the GGUF (~/lmcache/gguf.ok, made by call 3), then runs the
# whole suite as session 8's step 5 did (--jobs 8 --timeout 380). Results in ~/res and ~/gcout.
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
R=~/res; mkdir -p $R /tmp/gpu_check_tmp
t0=$(date +%s)
PYTHON=python3 bash tools/gpu_check.sh --sdist ~/llama_cpp_python-0.3.36.tar.gz --site /tmp/site --out ~/gc --build-only > $R/build.txt 2>&1; rc=$?
echo "build rc $rc after $(( $(date +%s) - t0 )) s" >> $R/build.txt
{ for l in /tmp/site/llama_cpp/lib/*.so*; do
    echo "$(basename $l): $(nm -D --defined-only $l 2>/dev/null | grep -cE ' (__cxa_allocate_exception|__cxa_throw|_ZTVN10__cxxabiv[0-9a-z_]*|_ZNSt6locale[0-9A-Za-z_]*)$') exported C++ runtime symbols (cxa/cxxabiv/locale), needs libstdc++.so: $(readelf -d $l | grep -c 'libstdc++')"
  done; grep -E "CUDA Toolkit|CUDA host compiler|exclude-libs" ~/gc/build.log | head -5; } >> $R/build.txt 2>&1
if [ $rc != 0 ]; then
  if [ -d /tmp/site/llama_cpp ] && [ ! -d /tmp/site/cmx ]; then
    # the export check refused the build: install cmx all the same so the suite still runs (recorded)
    echo "FALLBACK: cmx installed despite build rc $rc" >> $R/build.txt
    python3 -m pip install -q --no-build-isolation --no-deps --no-cache-dir --upgrade --target /tmp/site . > ~/gc/cmx_build.log 2>&1 \
      || { tail -30 ~/gc/cmx_build.log >> $R/build.txt; touch $R/done; exit 1; }
  else
    tail -40 ~/gc/build.log ~/gc/cmx_build.log >> $R/build.txt 2>&1; touch $R/done; exit 1
  fi
fi
while [ ! -f ~/lmcache/gguf.ok ]; do sleep 2; done
t1=$(date +%s)
bash tools/gpu_check.sh --installed --site /tmp/site --out ~/gcout --jobs 8 --timeout 380 > $R/gpu_check.txt 2>&1
echo "gpu_check rc $? in $(( $(date +%s) - t1 )) s" >> $R/gpu_check.txt
touch $R/done

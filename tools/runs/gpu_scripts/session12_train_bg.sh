# Session 12, call 3: run 6 = run 3's model fine-tuned with CoreMatching's cut in half of the steps
# (--cm-train 0.5), started in the background; later calls wait for it (session12_wait.sh).
# usage: bash tools/runs/gpu_scripts/session12_train_bg.sh NAME BUDGET_S [extra train_vlm args]
NAME=$1; BUDGET=$2; shift 2
cp .carry/ck/checkpoint.safetensors.part* tools/runs/vlm_lora_run3/ || exit 1
G=~/lmcache/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p /root/runs
PYTHONPATH=$PWD/python:/tmp/site PYTHONUNBUFFERED=1 setsid nohup python3 tools/train_vlm.py --lm-gguf $G \
  --time-budget $BUDGET --steps 20000 --val-n 700 --out-dir /root/runs/$NAME --shard-bytes 15000000 \
  --save-dtype float16 --save-every 120 --log-every 20 --compile --batch-size 128 \
  --resume tools/runs/vlm_lora_run3 "$@" > /root/runs/$NAME.log 2>&1 < /dev/null &
sleep 75; grep -v "sample:" /root/runs/$NAME.log | grep -v "Converting\|Loading weights" | tail -15

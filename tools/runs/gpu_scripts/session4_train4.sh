# Run 4 (issue 8, session 4): resume run 3 with the new aux heads (object centre column/row per patch),
# turns after one of each type on position questions. Usage: bash .carry/ckpt3/train4.sh NAME RESUME_DIR [BUDGET_S]
set -x
NAME=${1:-lora4}; RESUME=${2:-tools/runs/vlm_lora_run3}; BUDGET=${3:-460}
G=~/lmcache/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f $G ] || { echo "no gguf"; exit 1; }
if [ "$RESUME" = tools/runs/vlm_lora_run3 ]; then cp .carry/ckpt3/checkpoint.safetensors.part* tools/runs/vlm_lora_run3/; fi
python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/ckpt3/gguf-0.19.0-py3-none-any.whl || exit 1
export PYTHONPATH=$PWD/python:/tmp/site PYTHONUNBUFFERED=1
mkdir -p /root/runs
python3 tools/train_vlm.py --lm-gguf $G --time-budget $BUDGET --steps 20000 --val-n 700 --out-dir /root/runs/$NAME \
  --shard-bytes 15000000 --save-dtype float16 --save-every 60 --log-every 40 --compile --batch-size 128 \
  --resume $RESUME --lr 3e-4 --lora-lr 4e-4 --warmup 30 --questions-per-image 12 --focus-types position \
  2>&1 | grep --line-buffered -v "sample:" > $OUT/train.log
[ -f /root/runs/$NAME/record.json ] || { tail -30 $OUT/train.log; exit 1; }
mkdir -p $OUT/$NAME && cp /root/runs/$NAME/* $OUT/$NAME/
tail -25 $OUT/train.log; ls -la $OUT/$NAME

G=~/lmcache/SmolLM2-135M-Instruct.Q4_1.gguf
cp .carry/ckpt2/checkpoint.safetensors.part* tools/runs/vlm_lora_run2/
export PYTHONPATH=$PWD/python:/tmp/site PYTHONUNBUFFERED=1
mkdir -p /root/runs
python3 tools/train_vlm.py --lm-gguf $G --time-budget 430 --steps 20000 --val-n 700 --out-dir /root/runs/lora3 \
  --shard-bytes 15000000 --save-dtype float16 --save-every 60 --log-every 40 --compile --batch-size 128 \
  --resume tools/runs/vlm_lora_run2 --lr 3e-4 --lora-lr 3e-4 --warmup 30 --questions-per-image 12 --focus-types position \
  2>&1 | grep --line-buffered -v "sample:" > $OUT/train.log
mkdir -p $OUT/lora3 && cp /root/runs/lora3/* $OUT/lora3/
tail -30 $OUT/train.log; ls -la $OUT/lora3

# usage: bash .carry/bench/train.sh NAME TIME_BUDGET "extra args"
NAME=$1; TB=$2; EXTRA=$3
G=~/lmcache/SmolLM2-135M-Instruct.Q4_1.gguf
if [ -f .carry/lm2/part2 ] && [ ! -f $G ]; then cat ~/lmcache/part1 .carry/lm2/part2 > $G; fi
md5sum $G
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .carry/whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/python PYTHONUNBUFFERED=1
mkdir -p /root/runs
python3 tools/train_vlm.py --lm-gguf $G --time-budget $TB --steps 20000 --val-n 700 --out-dir /root/runs/$NAME \
  --shard-bytes 15000000 --save-dtype float16 --save-every 60 --log-every 20 $EXTRA 2>&1 | grep --line-buffered -v "sample:" | tee $OUT/$NAME.log
mkdir -p $OUT/$NAME && cp /root/runs/$NAME/* $OUT/$NAME/
ls -la $OUT/$NAME

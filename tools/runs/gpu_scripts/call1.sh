set -x
mkdir -p ~/lmcache && cp .carry/lm1/part1 ~/lmcache/part1 &
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .carry/whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/python PYTHONUNBUFFERED=1
gunzip -kf .carry/lmrand/tokenizer.json.gz
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
python3 -c "import peft, transformers, torch; print('peft', peft.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
nproc
B="--lm-random .carry/lmrand --batch-size 128 --val-n 0 --log-every 10 --save-every 0"
timeout 110 python3 .carry/bench/train_vlm_old.py $B --steps 50 --out-dir /tmp/o_old 2>&1 | grep -v sample | tee $OUT/bench_old.log
timeout 110 python3 tools/train_vlm.py $B --steps 50 --out-dir /tmp/o_eager 2>&1 | grep -v sample | tee $OUT/bench_new_eager.log
timeout 170 python3 tools/train_vlm.py $B --steps 70 --compile --out-dir /tmp/o_comp 2>&1 | grep -v sample | tee $OUT/bench_new_compile.log
timeout 120 python3 tools/train_vlm.py --lm-random .carry/lmrand --batch-size 256 --val-n 0 --log-every 10 --save-every 0 --steps 40 --compile --out-dir /tmp/o_comp256 2>&1 | grep -v sample | tee $OUT/bench_new_compile256.log
wait
ls -la ~/lmcache

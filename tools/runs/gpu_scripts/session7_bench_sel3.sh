# Issue 10's harder variants on the device's cores (after setup_sweep.sh), resuming the committed
# records; crowded and small alternate so both grow. Usage: bash .carry/dev3/bench_sel3.sh SECONDS
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
mkdir -p ~/bs
for f in tools/runs/bench_selection/acc_*.jsonl; do
  b=$(basename $f); [ -f ~/bs/$b ] || cp $f ~/bs/$b
done
end=$(( $(date +%s) + ${1:-480} ))
W=$(nproc)
for spec in "crowded 60" "small 60" "crowded 100" "small 100" "crowded 140" "small 140"; do
  set -- $spec
  left=$(( end - $(date +%s) )); [ $left -le 15 ] && break
  timeout $left python3 tools/bench_selection.py accuracy --n $2 --variant $1 --workers $W --threads 1 --out ~/bs/acc_$1.jsonl 2>&1 | tail -2
done
pkill -f bench_selection; sleep 1
cp ~/bs/*.jsonl $OUT/ 2>/dev/null
wc -l ~/bs/*.jsonl

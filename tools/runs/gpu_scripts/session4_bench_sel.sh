# Issue 10's accuracy benchmark on the device's 16 cores (after setup_sweep.sh). Usage: bash bench_sel.sh SECONDS
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
mkdir -p ~/bs
end=$(( $(date +%s) + ${1:-480} ))
for spec in "standard 500" "crowded 140" "small 140"; do
  set -- $spec
  left=$(( end - $(date +%s) )); [ $left -le 15 ] && break
  timeout $left python3 tools/bench_selection.py accuracy --n $2 --variant $1 --workers 16 --threads 1 --out ~/bs/acc_$1.jsonl 2>&1 | tail -3
done
pkill -f bench_selection; sleep 1
cp ~/bs/*.jsonl $OUT/ 2>/dev/null
wc -l ~/bs/*.jsonl; nproc

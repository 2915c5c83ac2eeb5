# Session 10, last call: waits for the suite, copies the records to $OUT, then the dense engines'
# speed on the GPU with nothing else running.
bash ~/tree10/tools/runs/gpu_scripts/session10_wait.sh suite ${1:-400} 40
mkdir -p $OUT/gpu_check && cp ~/gpuchk/summary.txt ~/gpuchk/*.log ~/res/agree.* ~/suite.log ~/agree.log ~/build.log $OUT/gpu_check/ 2>/dev/null
grep -q "suite_bg rc" ~/suite.log && (cd /tmp && PYTHONPATH=/tmp/site timeout 150 python3 ~/tree10/tools/bench_engine.py --reps 5) > $OUT/gpu_check/bench_engine.txt 2>&1
tail -8 $OUT/gpu_check/bench_engine.txt; ls $OUT/gpu_check | head -50

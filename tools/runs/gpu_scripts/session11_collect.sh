# Session 11, last call: waits for the suite and the agreement runs, copies the records to $OUT
# (trimmed logs), then the dense engines' speed on the GPU as shipped and with the precision settings.
bash ~/tree11/tools/runs/gpu_scripts/session11_wait.sh suite ${1:-300} 5
bash ~/tree11/tools/runs/gpu_scripts/session11_wait.sh agree ${2:-200} 5
mkdir -p $OUT/g && cp ~/gpuchk/summary.txt ~/res/agree_*.md ~/suite.log ~/agree.log $OUT/g/ 2>/dev/null
for f in ~/gpuchk/test_*.log; do grep -q "failed\|error\|Error" $f && tail -c 20000 $f > $OUT/g/$(basename $f); done
tar -czf $OUT/g/agree_json.tgz -C ~/res . 2>/dev/null
(cd /tmp && export PYTHONPATH=/tmp/site && timeout 100 python3 ~/tree11/tools/bench_engine.py --reps 5 > $OUT/g/bench_engine.txt 2>&1;
 NVIDIA_TF32_OVERRIDE=0 CMX_F32_ACC=1 timeout 100 python3 ~/tree11/tools/bench_engine.py --reps 5 > $OUT/g/bench_engine_f32.txt 2>&1)
tail -4 $OUT/g/bench_engine.txt $OUT/g/bench_engine_f32.txt; ls $OUT/g | head -50; cat $OUT/g/summary.txt

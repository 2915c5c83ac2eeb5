# Session 8: everything that needs the installed CUDA build, started by call 3 (from ~/snap,
# PYTHONPATH=/tmp/site), results in ~/res. The whole suite on the GPU (tools/gpu_check.sh, one
# pytest process a file) beside the diagnostics (session8_diag.sh) and the demo benchmark's
# questions answered by cmx on the CPU (--device cpu, 8 workers x 1 thread: dense and CoreMatching's
# defaults, "anchor") and on the GPU (dense and anchor in two runs, so that a crash of one leaves
# the other); the runs compared; last, the dense engines' speed on the GPU (tools/bench_engine.py,
# nothing else running).
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
mkdir -p ~/res ~/gcout; R=~/res; N=${N:-200}
S="python3 tools/sweep_corematching.py --n $N --split test"
(bash tools/runs/gpu_scripts/session8_diag.sh > $R/diag.log 2>&1; echo "diag done at $SECONDS s") &
(timeout 420 $S --configs dense anchor --device cpu --workers 8 --threads 1 --chunk 5 --out $R/sweep_cpu.json > ~/gcout/sweep_cpu.txt 2>&1) &
(timeout 420 $S --configs dense --device gpu --workers 1 --threads 2 --chunk 20 --out $R/sweep_gpu_dense.json > ~/gcout/sweep_gpu_dense.txt 2>&1) &
(timeout 420 $S --configs anchor --device gpu --workers 1 --threads 2 --chunk 20 --out $R/sweep_gpu_anchor.json > ~/gcout/sweep_gpu_anchor.txt 2>&1) &
bash tools/gpu_check.sh --installed --site /tmp/site --out ~/gcout --jobs 5 --timeout 330 > $R/gpu_check.txt 2>&1; echo "suite done at $SECONDS s"
wait; echo "sweeps and diag done at $SECONDS s"
for f in cpu gpu_dense gpu_anchor; do [ -f $R/sweep_$f.json ] || cp $R/sweep_$f.json.partial $R/sweep_$f.json 2>/dev/null; done
for g in dense anchor; do (cd /tmp && python3 ~/snap/tools/compare_sweeps.py $R/sweep_cpu.json $R/sweep_gpu_$g.json); done > $R/compare.txt 2>&1
(cd /tmp && timeout 200 python3 ~/snap/tools/bench_engine.py --reps 5) > $R/bench_engine.txt 2>&1
tail -30 $R/gpu_check.txt; head -12 $R/compare.txt; grep -A3 "^| engine" $R/bench_engine.txt; tail -2 ~/gcout/sweep_*.txt
cp $R/*.json ~/gcout/ 2>/dev/null; touch $R/done; echo "phase b done at $SECONDS s"

# Session 8b: waits for session8b_bg.sh (~/res/done) until $1 s into this script, then copies the
# records to $OUT: build.txt (build time, exported C++ runtime symbols), gpu_check.txt (the step-3
# check and the per-file summary), suite_summary.txt, failures.txt (pytest's FAILED/ERROR lines),
# logs.tar.gz (every test file's log). Call 3 runs it; a call 4 (no carry) when the suite outlasts it.
D=${1:-560}
while [ ! -f ~/res/done ] && [ $SECONDS -lt $D ]; do sleep 3; done
[ -f ~/res/done ] && echo "DONE at $SECONDS s" || echo "NOT DONE at $SECONDS s"
cat ~/res/build.txt; tail -35 ~/res/gpu_check.txt 2>/dev/null
cp ~/res/build.txt ~/res/gpu_check.txt ~/res/gguf_md5.txt $OUT/ 2>/dev/null
sort ~/gcout/summary.txt > $OUT/suite_summary.txt 2>/dev/null
grep -h -E "^(FAILED|ERROR) " ~/gcout/*.log > $OUT/failures.txt 2>/dev/null
tar czf $OUT/logs.tar.gz -C ~/gcout . 2>/dev/null; ls -la $OUT

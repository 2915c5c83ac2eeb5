# usage: bash tools/runs/gpu_scripts/session12_wait.sh NAME SECONDS: wait until the run's record says done
# (or SECONDS pass), then copy its log, record and checkpoint to $OUT.
NAME=$1; T=$2; t0=$(date +%s)
while [ $(( $(date +%s) - t0 )) -lt $T ]; do
  grep -q "saved to /root/runs/$NAME" /root/runs/$NAME.log 2>/dev/null && break
  grep -q "Traceback" /root/runs/$NAME.log 2>/dev/null && break
  sleep 5
done
grep -v "sample:" /root/runs/$NAME.log | grep -v "Converting\|Loading weights" | tail -40
mkdir -p $OUT/$NAME && cp /root/runs/$NAME.log $OUT/ && cp /root/runs/$NAME/* $OUT/$NAME/ 2>/dev/null; ls -la $OUT/$NAME

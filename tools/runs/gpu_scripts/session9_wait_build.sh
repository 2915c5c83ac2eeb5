for i in $(seq 1 ${1:-240}); do grep -q "build_bg rc" ~/build.log && break; sleep 1; done
tail -n 12 ~/build.log
if grep -q "build_bg rc=0" ~/build.log; then (setsid nohup bash tools/runs/gpu_scripts/session9_suite_bg.sh > /dev/null 2>&1 < /dev/null &); echo "suite started"; fi

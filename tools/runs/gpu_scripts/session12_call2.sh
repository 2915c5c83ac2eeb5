# Session 12, call 2: the GGUF's second half, joined and checked; gguf (and accelerate where missing) to /tmp/site.
G=~/lmcache/SmolLM2-135M-Instruct.Q4_1.gguf
cat ~/lmcache/gpart00 .carry/g2/gpart01 > $G && md5sum $G
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry/w/gguf-*.whl
python3 -c "import accelerate" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry/w/accelerate-*.whl
PYTHONPATH=/tmp/site python3 -c "import gguf, accelerate; print('ok', accelerate.__version__)"

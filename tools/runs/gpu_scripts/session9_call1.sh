# Session 9, call 1: the GGUF's part 1, the wheels, a look at the machine's compilers (issue 14).
set -x
mkdir -p ~/lmcache && cp .carry/g1/gpart00 ~/lmcache/ || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .carry/s9/*.whl || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv; nproc; python3 --version
which -a gcc g++ c++ cc clang++ nvcc; g++ --version | head -1; nvcc --version | tail -2
echo "CC=${CC:-} CXX=${CXX:-} CUDAHOSTCXX=${CUDAHOSTCXX:-}"
for c in $(which -a g++ c++ 2>/dev/null); do echo "$c: $(readlink -f $c) so=$($c -print-file-name=libstdc++.so) a=$($c -print-file-name=libstdc++.a)"; done
ls -la /usr/lib/gcc/x86_64-linux-gnu/*/ 2>/dev/null | grep -i "libstdc" | head
echo 'int main(){}' > /tmp/t.cpp && g++ /tmp/t.cpp -o /tmp/t -v 2>&1 | grep -E "collect2|COLLECT_GCC_OPTIONS|specs" | tail -3; ldd /tmp/t
gcc -dumpspecs 2>/dev/null | grep -A2 -i "static-libstdc\|^\*link:" | head -10
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)"

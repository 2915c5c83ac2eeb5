# Issue 14: the CUDA build again, with the system GCC instead of the machine's CC/CXX/CUDAHOSTCXX
# (/opt/gcc, whose C++ runtime went statically into every llama.cpp library), in the background.
cd ~/tree5 || exit 1
export CC=/usr/bin/gcc CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++ CMAKE_BUILD_PARALLEL_LEVEL=6
nice -n 10 bash tools/gpu_check.sh --sdist ~/llama_cpp_python-0.3.36.tar.gz --build-only --site /tmp/site --out ~/gpuchk
echo "build_bg rc=$?"
for l in /tmp/site/llama_cpp/lib/lib*.so; do echo "$l: $(nm -D --defined-only $l | grep -c -E ' (__cxa_|_ZNSt6locale)') runtime symbols; $(readelf -d $l | grep -c 'libstdc++')x libstdc++.so"; done

# The CUDA build of llama-cpp-python with the system GCC, cmx installed against it (gpu_check.sh).
cd ~/tree11 || exit 1
export CC=/usr/bin/gcc CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++ CMAKE_BUILD_PARALLEL_LEVEL=16
bash tools/gpu_check.sh --sdist ~/llama_cpp_python-0.3.36.tar.gz --build-only --site /tmp/site --out ~/gpuchk
echo "build_bg rc=$?"

# The whole suite on CUDA (one pytest process a file), cmx and the references on the GPU.
cd ~/tree11 || exit 1
export CC=/usr/bin/gcc CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++
bash tools/gpu_check.sh --installed --site /tmp/site --out ~/gpuchk --jobs 5 --timeout 600 -- --tb=short -rf
echo "suite_bg rc=$?"

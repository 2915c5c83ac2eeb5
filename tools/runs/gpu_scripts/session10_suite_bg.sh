# The whole suite on CUDA (one pytest process a file), cmx and the references on the GPU.
cd ~/tree10 || exit 1
export CC=/usr/bin/gcc CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++
bash tools/gpu_check.sh --installed --site /tmp/site --out ~/gpuchk --jobs 6 --timeout 420
echo "suite_bg rc=$?"

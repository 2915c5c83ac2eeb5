set -x
cp .carry/g3/gpart02 ~/lmcache/ && cd ~/lmcache && cat gpart00 gpart01 gpart02 > SmolLM2-135M-Instruct.Q4_1.gguf && rm gpart0* && md5sum SmolLM2-135M-Instruct.Q4_1.gguf

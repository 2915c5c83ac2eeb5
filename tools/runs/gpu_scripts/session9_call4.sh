# Session 9, call 4: run 3's checkpoint into place, two runs side by side (one per GPU):
#  lora5a: + LoRA (rank 16) on the FFN matrices too, new modules from zero;
#  lora5b: attention LoRA only, half the images with 2-3 objects (scenes variant "pair").
set -x
cp .carry/ckpt3/checkpoint.safetensors.part* tools/runs/vlm_lora_run3/ || exit 1
md5sum ~/lmcache/SmolLM2-135M-Instruct.Q4_1.gguf
NG=$(nvidia-smi -L | wc -l); W=$(( $(nproc) / 2 - 2 ))
cp -a . ~/tree5 && cd ~/tree5
if [ "$NG" -ge 2 ]; then G2=1; else G2=0; W=6; fi
setsid nohup bash tools/runs/gpu_scripts/session9_train.sh lora5a 0 560 --workers $W --lora-targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj > ~/a.out 2>&1 < /dev/null &
setsid nohup bash tools/runs/gpu_scripts/session9_train.sh lora5b $G2 560 --workers $W --pair-scenes 0.5 > ~/b.out 2>&1 < /dev/null &
cp .carry/cuda_src/llama_cpp_python-0.3.36.tar.gz ~/ && (setsid nohup bash tools/runs/gpu_scripts/session9_build_bg.sh > ~/build.log 2>&1 < /dev/null &)
sleep 100; tail -5 /root/runs/lora5a.log /root/runs/lora5b.log; nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv

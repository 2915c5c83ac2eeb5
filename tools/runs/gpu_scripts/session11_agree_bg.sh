# The demo questions on the CPU and on the GPU (tools/device_agreement.py), three ways, one after
# another: as shipped; without TF32 in cuBLAS's F32 products (NVIDIA_TF32_OVERRIDE=0: mtmd's
# encoder attention); and that plus F32 accumulation in every product of cmx's graph (CMX_F32_ACC=1).
cd ~/tree11 || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
mkdir -p ~/res && cd /tmp
run() {  # name, env...
  name=$1; shift
  env "$@" python3 ~/tree11/tools/device_agreement.py --n 200 --a cpu --b gpu --workers 4 --threads 2 --chunk 5 \
    --out ~/res/agree_$name.json --summary ~/res/agree_$name.md
  echo "agree $name rc=$?"
}
run default X=1
run tf32off NVIDIA_TF32_OVERRIDE=0
run tf32off_f32acc NVIDIA_TF32_OVERRIDE=0 CMX_F32_ACC=1
echo "agree_bg rc=0"

# Session 11, run by hand after session11_agree_bg.sh's first run (its other two were stopped to
# save device time): the agreement run with full precision on the GPU, 5 workers. The tree then had
# the CMX_F32_ACC switch in cpp/graph.cpp (see tools/runs/gpu_check/session11/README.md).
cd /tmp; export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
NVIDIA_TF32_OVERRIDE=0 CMX_F32_ACC=1 python3 ~/tree11/tools/device_agreement.py --n 200 --a cpu --b gpu --workers 5 --threads 2 --chunk 5 --out ~/res/agree_tf32off_f32acc.json --summary ~/res/agree_tf32off_f32acc.md
echo "agree_bg rc=$?"

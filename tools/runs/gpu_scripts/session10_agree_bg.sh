# The demo questions on the CPU and on the GPU, question by question (tools/device_agreement.py).
cd ~/tree10 || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
mkdir -p ~/res && cd /tmp && python3 ~/tree10/tools/device_agreement.py --n 200 --a cpu --b gpu --workers 4 --threads 2 --chunk 5 \
  --out ~/res/agree.json --summary ~/res/agree.md
echo "agree_bg rc=$?"

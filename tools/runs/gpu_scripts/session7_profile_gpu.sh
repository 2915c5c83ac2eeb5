# Issue 9: cmx-profile's tables pass on the device's GPU (after setup_sweep.sh); the tables come back
# as $OUT/profile_gpu.npz for comparison with the CPU run. Usage: bash .carry/dev3/profile_gpu.sh
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)" || exit 1
G=~/lmcache/SmolLM2-135M-Instruct.Q4_1.gguf; D=python/cmx/data
time python3 -m cmx.profile --gguf $G --mmproj $D/cmx-demo-mmproj.gguf --lora $D/cmx-demo-lora.gguf \
  -o /tmp/prof-gpu.gguf --device cuda --summary-json $OUT/summary_gpu.json 2>&1 | tail -25
python3 - <<'PY'
import os, numpy as np
from cmx.coreprofile import read_profile
p = read_profile("/tmp/prof-gpu.gguf")
np.savez(os.environ["OUT"] + "/profile_gpu.npz", frequency=p.frequency, neuron_order=p.neuron_order, tau=p.tau)
print("saved", p.n_layer, p.n_ff, p.prune_layer, p.min_keep, p.max_keep, p.short_prompt_tokens)
PY

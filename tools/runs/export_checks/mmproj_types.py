import sys, time, numpy as np
sys.path.insert(0, 'tests'); sys.path.insert(0, 'python')
import llava_tiny as lt
from cmx import scenes
imgs = [np.asarray(scenes.make_example_full(s, None)[0].image) for s in scenes.split_seeds('val', 4)]
text = str(lt.smollm2_gguf_path())
def enc(p):
    e = lt.MtmdEncoder(p, text, n_threads=2)
    return [e.encode(im) for im in imgs]
ref = enc('/tmp/exp/mm_f32_f32.gguf')
for v in ['mm_q8_0_q4_1', 'mm_q5_1_q5_1', 'mm_q8_0_q5_1']:
    t = time.time(); out = enc(f'/tmp/exp/{v}.gguf')
    rel = [float(np.linalg.norm(o - r) / np.linalg.norm(r)) for o, r in zip(out, ref)]
    print(v, 'rel err per image', np.round(rel, 4), 'mean', round(float(np.mean(rel)), 4), f'{time.time()-t:.0f}s', flush=True)

import sys, time, numpy as np, llama_cpp
sys.path.insert(0, 'tests'); import llava_tiny as lt
text = str(lt.smollm2_gguf_path())
ids = list(range(1000, 1600))
for th in (1, 2):
    for lora in (None, 'python/cmx/data/cmx-demo-lora.gguf'):
        llm = llama_cpp.Llama(text, n_ctx=1024, n_batch=512, verbose=False, n_threads=th, n_threads_batch=th, lora_path=lora)
        t = time.time(); llm.eval(ids); dt = time.time() - t
        print(f'threads {th} lora {lora is not None}: 600-token prefill {dt:.2f}s', flush=True); llm.close()

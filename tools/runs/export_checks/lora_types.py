import sys, numpy as np, llama_cpp
sys.path.insert(0, 'tests'); import llava_tiny as lt
text = str(lt.smollm2_gguf_path())
def lg(lora):
    llm = llama_cpp.Llama(text, n_ctx=256, logits_all=True, verbose=False, n_threads=2, lora_path=lora)
    ids = llm.tokenize(b"<|im_start|>user\nHow many red circles are there in the picture? Is the star left of the square?<|im_end|>\n<|im_start|>assistant\n", special=True)
    llm.eval(ids); out = np.array(llm.scores[:len(ids)]); llm.close(); return out
r = lg('/tmp/exp/lora_f32.gguf'); b = lg(None)
for v in ['f16', 'q8_0']:
    o = lg(f'/tmp/exp/lora_{v}.gguf')
    print(v, 'max|d| vs f32 LoRA', float(np.abs(o - r).max()), 'argmax agree', float((o.argmax(1) == r.argmax(1)).mean()))
print('no LoRA vs f32 LoRA', float(np.abs(b - r).max()))

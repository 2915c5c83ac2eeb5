import json, sys, os
sys.path.insert(0, '/work/main/python')
from cmx import scenes
a = json.load(open('/work/main/tools/runs/eval_demo_lora.json'))
p2 = '/tmp/evlog/eval_300_600.json'
if os.path.exists(p2):
    b = json.load(open(p2)); rows2 = b['rows']; secs2 = b['summary']['seconds']['llama_cpp']; part = False
else:
    b = json.load(open(p2 + '.partial')); rows2 = b['rows'][:len(b['rows'])]; secs2 = b['seconds']; part = True
    rows2 = [r for r in rows2 if 'llama_cpp' in r]
rows = a['rows'] + rows2
old = json.load(open('/work/main/tools/runs/eval_demo.json'))['rows'][:len(rows)]
assert [r['question'] for r in old] == [r['question'] for r in rows]
maj = a['majority']
types = list(scenes.QUESTION_TYPES)
def acc(preds, sel):
    return sum(scenes.answer_matches(preds[i], rows[i]['answer']) for i in sel) / len(sel)
new_p = [r['llama_cpp'] for r in rows]; old_p = [r['llama_cpp'] for r in old]; base_p = [maj[r['qtype']] for r in rows]
print(f"{len(rows)} test questions (partial second half: {part})")
print("| question type | n | majority baseline | issue 4 (frozen LM) | with the adapter |\n|---|---|---|---|---|")
by = {}
for t in types + [None]:
    sel = [i for i, r in enumerate(rows) if t is None or r['qtype'] == t]
    by[t or 'overall'] = {'n': len(sel), 'majority': acc(base_p, sel), 'issue4': acc(old_p, sel), 'lora': acc(new_p, sel)}
    print(f"| {t or '**overall**'} | {len(sel)} | {acc(base_p, sel):.1%} | {acc(old_p, sel):.1%} | {acc(new_p, sel):.1%} |")
out = {"summary": {"n": len(rows), "split": "test", "model": a['summary']['model'], "mmproj": a['summary']['mmproj'],
                   "lora": a['summary']['lora'], "by_type": by, "overall": {"llama_cpp": by['overall']['lora']},
                   "majority_baseline": by['overall']['majority'],
                   "seconds": {"llama_cpp": a['summary']['seconds']['llama_cpp'] + secs2},
                   "parts": ["tools/runs/eval_demo_lora.json (--n 300)", f"--start 300 --n 300 ({len(rows2)} answered)"]},
       "majority": maj, "rows": rows}
json.dump(out, open('/work/main/tools/runs/eval_demo_lora_600.json', 'w'), indent=1)

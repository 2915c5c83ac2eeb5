"""Does the accuracy lost by pruning come from the selection or from the pruning itself?
Oracle selections from the scene's drawing, on the demo VLM's validation questions (session 11;
docs/decisions.md, "What pruning itself costs on the demo model").

    python tools/runs/sweeps/oracle_selection.py 150 oracle_val150.json dense,anchor,oracle_fill,objects_only,objects_merge,anchor_merge
    python tools/runs/sweeps/oracle_selection.py 150 oracle_val150_mp.json anchor_mp,default,default_mp,oracle_fill_mp

Settings (all at 144 kept image tokens but objects_only, all cut after layer K = 2):
  dense; anchor (CoreMatching's score, tokens only); default (cmx.Sparsity()'s defaults);
  oracle_fill: every patch holding part of an object, then random other patches up to 144;
  objects_only: the object patches alone; objects_merge / anchor_merge: the object patches / the
  anchor score's tokens plus one row averaging every other image token (select="pool"'s groups);
  *_mp: with the left-out tokens merged into one row attended with their count's weight. The _mp
  settings need the engine change in merge_pruned.diff (tried, not adopted).
The oracle selections ride on select="random"'s Python hook (cmx.selection.choose, replaced here)."""
import json, os, sys, time
import numpy as np
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # tools/
import cmx
from cmx import scenes, selection
from sweep_corematching import object_patches

STATE = {}  # this question's object patches, the mode, and (after 'anchor' ran) the anchor score's kept tokens

def choose(method, embeddings, k, seed):
    mode = STATE["mode"]
    n = len(embeddings)
    obj = STATE["objects"]
    rng = np.random.default_rng(seed)
    if mode == "oracle_fill":      # every object patch + random background up to k
        keep = set(np.flatnonzero(obj).tolist())
        rest = np.flatnonzero(~obj)
        need = max(0, k - len(keep))
        keep |= set(rng.choice(rest, size=min(need, len(rest)), replace=False).tolist())
        return sorted(keep), None
    if mode == "objects_only":
        return np.flatnonzero(obj).tolist() or [0], None
    if mode in ("objects_merge", "anchor_merge"):  # kept set + one token averaging all the rest
        keep = np.flatnonzero(obj).tolist() if mode == "objects_merge" else list(STATE["anchor_kept"])
        rest = sorted(set(range(n)) - set(keep))
        if not rest:
            return keep, None
        rep = rest[len(rest) // 2]
        groups = {i: [i] for i in keep}
        groups[rep] = rest
        reps = sorted(groups)
        return reps, [groups[r] for r in reps]
    raise ValueError(mode)

selection.choose = choose

def main(n, out):
    m = cmx.Model(n_ctx=2048, n_threads=2)
    configs = CONFIGS
    res = []
    for i, seed in enumerate(scenes.split_seeds("val", n)):
        scene, question, answer, qtype = scenes.make_example_full(seed, scenes.QUESTION_TYPES[i % len(scenes.QUESTION_TYPES)], "standard")
        obj = object_patches(scene)
        STATE["objects"] = obj
        msg = [{"role": "user", "content": [{"type": "image", "image": scene.image}, {"type": "text", "text": question}]}]
        per = {}
        for c in configs:
            if c == "dense":
                sp = None
            elif c == "anchor":
                sp = cmx.Sparsity(neurons=False)
            elif c == "anchor_mp":
                sp = cmx.Sparsity(neurons=False, merge_pruned=True)
            elif c == "default":
                sp = cmx.Sparsity()
            elif c == "default_mp":
                sp = cmx.Sparsity(merge_pruned=True)
            elif c == "oracle_fill_mp":
                STATE["mode"] = "oracle_fill"
                sp = cmx.Sparsity(neurons=False, select="random", budget=144, seed=i, merge_pruned=True)
            else:
                STATE["mode"] = c
                sp = cmx.Sparsity(neurons=False, select="random", budget=144, seed=i)
            m.reset()
            text = m.chat(msg, max_tokens=8, sparsity=sp)
            kept = m.last_stats["kept_image_tokens"]
            if c == "anchor":
                STATE["anchor_kept"] = kept[0]
            per[c] = dict(correct=scenes.normalize_answer(text) == scenes.normalize_answer(answer), kept=len(kept[0]) if kept else 576,
                          answer=text)
        res.append(dict(i=i, qtype=qtype, n_obj=int(obj.sum()), per=per))
        tot = {c: sum(r["per"][c]["correct"] for r in res) for c in configs}
        print(f"[{len(res)}/{n}] {time.strftime('%H:%M:%S')} " + " ".join(f"{c}:{tot[c]}" for c in configs), flush=True)
        json.dump(res, open(out, "w"))

CONFIGS = sys.argv[3].split(",")
main(int(sys.argv[1]), sys.argv[2])

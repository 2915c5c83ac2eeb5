"""Synthetic VQA evaluation of a VLM (text GGUF + mmproj) through cmx and stock llama-cpp-python.

Held-out questions come from the test split of cmx.scenes (seeds never used in training), the
question types in turn. Accuracy is exact match after cmx.scenes.normalize_answer. The majority
baseline answers every question of a type with that type's most common answer in the training
split. Both engines decode greedily; their agreement is the share of questions where their
normalised answers are equal.

    python tools/eval_vqa.py [--n 1000] [--engines cmx,llama_cpp] [--threads 2] [--out results.json]
    python tools/eval_vqa.py --engines llama_cpp --lora python/cmx/data/cmx-demo-lora.gguf

Without --model/--mmproj it evaluates the embedded default model. --lora applies a LoRA GGUF to
the text model (llama-cpp-python's lora_path, scale 1); cmx cannot apply adapters yet.
--split val scores the validation split instead (for choices made before the test).
"""

from __future__ import annotations

import argparse
import base64
import collections
import io
import json
import os
import sys
import time

import numpy as np

from cmx import scenes


def examples(split: str, n: int):
    """n (image, question, answer, qtype), question types in turn."""
    out = []
    for i, seed in enumerate(scenes.split_seeds(split, n)):
        scene, q, a, qt = scenes.make_example_full(seed, scenes.QUESTION_TYPES[i % len(scenes.QUESTION_TYPES)])
        out.append((scene.image, q, a, qt))
    return out


def majority_answers(n_per_type: int = 400) -> dict[str, str]:
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for _, _, a, qt in examples("train", n_per_type * len(scenes.QUESTION_TYPES)):
        counts[qt][scenes.normalize_answer(a)] += 1
    return {qt: c.most_common(1)[0][0] for qt, c in counts.items()}


def message(image, question: str, image_part: dict) -> list[dict]:
    return [{"role": "user", "content": [image_part, {"type": "text", "text": question}]}]


class CmxEngine:
    name = "cmx"

    def __init__(self, text, mmproj, threads, lora=None):
        import cmx

        if lora:
            raise SystemExit("--lora: the cmx engine cannot apply LoRA adapters yet (use --engines llama_cpp)")
        self.m = cmx.Model(text, mmproj=mmproj, n_ctx=2048, n_threads=threads)

    def answer(self, image, question, max_tokens):
        return self.m.chat(message(image, question, {"type": "image", "image": image}), max_tokens=max_tokens)


class LlamaCppEngine:
    """Stock llama-cpp-python: Llama + its MTMD chat handler. The only change is that message
    content lists reach the template as strings (the model's template, like most, concatenates
    content as text), which is how cmx renders them too."""

    name = "llama_cpp"

    def __init__(self, text, mmproj, threads, lora=None):
        import llama_cpp
        from llama_cpp.llama_chat_format import MTMDChatHandler

        from cmx.chat import flatten_messages

        class FlatContentMTMDChatHandler(MTMDChatHandler):
            def _get_template_messages(self, messages, media_marker):
                return flatten_messages(messages, media_marker)[0]

        self.llm = llama_cpp.Llama(text, chat_handler=FlatContentMTMDChatHandler(clip_model_path=mmproj, verbose=False, use_gpu=False),
                                   n_ctx=2048, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False,
                                   lora_path=lora)

    def answer(self, image, question, max_tokens):
        buf = io.BytesIO()
        image.save(buf, "PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        out = self.llm.create_chat_completion(
            messages=message(image, question, {"type": "image_url", "image_url": {"url": url}}),
            max_tokens=max_tokens, temperature=0.0, top_k=1, repeat_penalty=1.0, seed=0)
        return out["choices"][0]["message"]["content"] or ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="text GGUF (default: the embedded default model)")
    ap.add_argument("--mmproj", help="mmproj GGUF (default: the embedded demo projector)")
    ap.add_argument("--lora", help="LoRA GGUF applied to the text model (llama_cpp engine only)")
    ap.add_argument("--split", default="test", choices=["test", "val"], help="held-out split (default test)")
    ap.add_argument("--n", type=int, default=1000, help="test questions (default 1000)")
    ap.add_argument("--start", type=int, default=0, help="skip the first START questions (to continue a run in parts)")
    ap.add_argument("--engines", default="cmx,llama_cpp")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--out", help="write per-question results and the summary as JSON")
    ap.add_argument("--answers-from", help="a previous --out JSON (same questions): take the answers of engines not in --engines from it")
    args = ap.parse_args(argv)

    from cmx.defaults import default_mmproj, default_text_model

    text = args.model or default_text_model()
    mmproj = args.mmproj or default_mmproj()
    if mmproj is None:
        sys.exit("no mmproj given and no demo projector installed")
    engines = {"cmx": CmxEngine, "llama_cpp": LlamaCppEngine}
    chosen = [engines[e](text, mmproj, args.threads, args.lora) for e in args.engines.split(",")]

    data = examples(args.split, args.start + args.n)[args.start:]
    majority = majority_answers()
    results = {e.name: [] for e in chosen}
    timing = {}
    names = [e.name for e in chosen]
    if args.answers_from:
        prev = json.load(open(args.answers_from))
        if [r["question"] for r in prev["rows"]] != [q for _, q, _, _ in data]:
            sys.exit(f"{args.answers_from} holds other questions")
        for name in engines:
            if name not in results and name in prev["rows"][0]:
                results[name] = [r[name] for r in prev["rows"]]
                timing[name] = prev["summary"]["seconds"].get(name)
                names.append(name)
    for e in chosen:
        t0 = time.perf_counter()
        for k, (image, q, a, qt) in enumerate(data):
            results[e.name].append(e.answer(image, q, args.max_tokens))
            if (k + 1) % 100 == 0:
                print(f"[{e.name}] {k + 1}/{len(data)}  {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
            if args.out and (k + 1) % 25 == 0:  # partial answers, so that a stopped run still leaves them
                part = [{"question": q2, "answer": a2, "qtype": t2, e.name: p2}
                        for (_, q2, a2, t2), p2 in zip(data, results[e.name])]
                json.dump({"partial": True, "engine": e.name, "seconds": time.perf_counter() - t0, "rows": part},
                          open(args.out + ".partial", "w"), indent=1)
        timing[e.name] = time.perf_counter() - t0

    qtypes = list(scenes.QUESTION_TYPES)
    def acc(preds, types=None):
        sel = [i for i, ex in enumerate(data) if types is None or ex[3] in types]
        return float(np.mean([scenes.answer_matches(preds[i], data[i][2]) for i in sel])) if sel else float("nan")
    base = [majority[ex[3]] for ex in data]

    lora_txt = f" + LoRA {os.path.basename(args.lora)}" if args.lora else ""
    print(f"\n{len(data)} {args.split} questions, model {os.path.basename(text)} + {os.path.basename(mmproj)}{lora_txt}\n")
    header = "| question type | n | majority baseline | " + " | ".join(names) + " |"
    print(header)
    print("|" + "---|" * (3 + len(names)))
    for qt in qtypes + [None]:
        n = sum(ex[3] == qt for ex in data) if qt else len(data)
        row = [qt or "**overall**", str(n), f"{acc(base, [qt] if qt else None):.1%}"]
        row += [f"{acc(results[n], [qt] if qt else None):.1%}" for n in names]
        print("| " + " | ".join(row) + " |")
    summary = {"n": len(data), "split": args.split, "model": os.path.basename(text), "mmproj": os.path.basename(mmproj),
               "lora": os.path.basename(args.lora) if args.lora else None,
               "by_type": {n: {qt: acc(results[n], [qt]) for qt in qtypes} for n in names},
               "overall": {n: acc(results[n]) for n in names},
               "majority_baseline": acc(base), "seconds": timing}
    if "cmx" in results and "llama_cpp" in results:
        same = np.mean([scenes.normalize_answer(x) == scenes.normalize_answer(y) for x, y in zip(results["cmx"], results["llama_cpp"])])
        summary["same_answer_cmx_vs_llama_cpp"] = float(same)
        print(f"\ncmx and llama-cpp-python give the same answer on {same:.1%} of questions")
    if args.out:
        rows = [{"question": q, "answer": a, "qtype": qt, **{e: results[e][i] for e in results}} for i, (_, q, a, qt) in enumerate(data)]
        json.dump({"summary": summary, "majority": majority, "rows": rows}, open(args.out, "w"), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Soak test of cmx-chat: hundreds of chat turns over many images, RSS sampled after every turn.

    python tools/soak.py [--mode dense|corematching|both] [--turns 300] [--images 30] [--seed 0]
                         [--probe-every 25] [--no-warmup-fill] [-n 8] [-c 4096] [-t THREADS]
                         [--out soak.json] [--plot soak.png]
    python tools/soak.py --from-json soak.json [--out soak.json] [--plot soak.png]   # summarize a saved run

It drives the real REPL of cmx-chat (cmx.cli.repl on a cli.Session built as cmx-chat's main()
builds it, default model) from a scripted terminal in place of stdin/stdout, so /clear, /image
and the multi-turn history are handled by the CLI's own code. The images are cmx.scenes scenes
(standard, crowded and small variants in turn) written as PNG files and attached by path, as a
user would. A seeded schedule mixes four kinds of turn:

    ask    a follow-up question in the current conversation (the history grows)
    image  /image PATH, then a question: another image joins the conversation
    new    /clear, /image PATH, then a question: a new conversation about another image
    clear  /clear, then a question about the start-up image (what /clear goes back to)

and every --probe-every turns (from turn 0) a probe: /clear and the same question about the
start-up image, whose answer must be identical every time. When cmx reports that a prompt no
longer fits in n_ctx ("prompt too long"), the turn is asked again after /clear (counted as an
overflow). Decoding is greedy, at most -n tokens per answer.

The engine's compute buffers grow to the largest batch and context seen and are kept for reuse
(the KV cache and CoreMatching's per-token neuron statistics are allocated for the whole n_ctx up
front), so the first 20 turns fill one conversation to the brim (6 images, then follow-ups) before
the random turns begin; --no-warmup-fill starts the random turns at once. Each turn also records the context length,
glibc's malloc'd bytes and Python's allocated blocks, to tell where any growth comes from.

Targets (issue 11, item 3), checked per mode and given by the exit code (0: all met): after the
first 20 turns RSS grows by less than 10 MB (maximum and so final RSS against RSS after turn 20;
MB = 10^6 bytes) and all probe answers are identical. --mode both runs each mode in its own
child process, so that each figure is one mode's alone.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np

MODES = ("dense", "corematching")
VARIANTS = ("standard", "crowded", "small")
TURN_KINDS = ("ask", "image", "new", "clear")
TURN_WEIGHTS = (0.45, 0.25, 0.15, 0.15)
WARMUP_TURNS = 20  # RSS growth is measured from the end of this turn on
GROWTH_LIMIT_MB = 10.0
HOME = 0  # the start-up image: cmx-chat's IMAGE argument, what /clear returns to


def rss_bytes() -> int:
    """Resident set size of this process (VmRSS)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


@dataclass
class SoakImage:
    path: str
    seed: int
    variant: str
    questions: list[str]


def write_images(directory: str, n_images: int) -> list[SoakImage]:
    """n_images scenes of the test split as PNG files, with a few questions about each."""
    from cmx import scenes

    images = []
    for i, seed in enumerate(scenes.split_seeds("test", n_images)):
        variant = VARIANTS[i % len(VARIANTS)]
        scene = scenes.make_scene(seed, variant)
        path = os.path.join(directory, f"scene_{i:02d}_{variant}.png")
        scene.image.save(path)
        questions = []
        for qtype in scenes.QUESTION_TYPES:
            q = scenes.make_question(scene, seed, qtype)[0]
            if q not in questions:  # a type with no question falls through to another one
                questions.append(q)
        images.append(SoakImage(path, seed, variant, questions))
    return images


@dataclass
class Turn:
    kind: str  # "probe" or one of TURN_KINDS
    image: int  # the image the question is about
    question: str
    commands: list[str] = field(default_factory=list)  # REPL commands typed before the question


def make_schedule(images: list[SoakImage], n_turns: int, seed: int, probe_every: int, warmup_fill: bool = True,
                  fill_images: int = 5) -> list[Turn]:
    """The same turns for a given seed, whatever the answers (overflows are handled as they come).

    warmup_fill: the turns before WARMUP_TURNS (probes aside) fill the conversation that the probe
    of turn 0 began to the brim: fill_images more images (576 rows each: with the probe's, 6 images
    take ~3,600 of n_ctx 4,096), then follow-up questions, so that the longest context of the run,
    whose size sets RSS (module docstring), is reached before RSS growth is measured."""
    rng = np.random.default_rng([seed, 0x50A4])
    probe_question = images[HOME].questions[0]
    fill = [i for i in range(len(images)) if i != HOME][:fill_images] if warmup_fill else []
    current = HOME
    turns = []
    for t in range(n_turns):
        if t % probe_every == 0:
            turns.append(Turn("probe", HOME, probe_question, ["/clear"]))
            current = HOME
            continue
        if fill and t < WARMUP_TURNS:
            if current != fill[-1]:  # the next image of the fill, in the same conversation
                current = fill[fill.index(current) + 1] if current in fill else fill[0]
                kind, commands = "image", [f"/image {images[current].path}"]
            else:
                kind, commands = "ask", []
        else:
            kind = TURN_KINDS[int(rng.choice(len(TURN_KINDS), p=TURN_WEIGHTS))]
            if kind in ("image", "new"):
                others = [i for i in range(len(images)) if i != current] or [current]
                current = int(rng.choice(others))
                commands = (["/clear"] if kind == "new" else []) + [f"/image {images[current].path}"]
            elif kind == "clear":
                current, commands = HOME, ["/clear"]
            else:
                commands = []
        pool = images[current].questions
        turns.append(Turn(kind, current, pool[int(rng.integers(len(pool)))], commands))
    return turns


class ScriptedTerminal:
    """stdin for cmx-chat's REPL: each readline() returns the next line a script generator yields;
    what the REPL wrote to stdout / stderr since the previous line is the reply to that line."""

    def __init__(self):
        self.out, self.err = io.StringIO(), io.StringIO()
        self.reply_out = self.reply_err = ""
        self.script = None

    def readline(self) -> str:
        self.reply_out, self.reply_err = self.out.getvalue(), self.err.getvalue()
        self.out.seek(0), self.out.truncate()
        self.err.seek(0), self.err.truncate()
        try:
            return next(self.script) + "\n"
        except StopIteration:
            return ""  # end of input: the REPL exits

    def answer(self) -> str:
        """The answer to the last question: stdout up to the newline before the next "> " prompt."""
        text = self.reply_out
        if text.endswith("> "):
            text = text[:-2]
        return text[:-1] if text.endswith("\n") else text


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mallinfo2():
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return fn


_MALLINFO2 = _mallinfo2()


def malloc_bytes() -> tuple[int, int] | tuple[None, None]:
    """glibc's malloc, all arenas (mallinfo2): bytes handed out and not taken back, and bytes it
    holds from the system (heaps + mmapped chunks). RSS growing with neither means pages of
    existing allocations touched for the first time; with the second alone, freed memory that
    the allocator keeps (fragmentation, another thread's arena). (None, None) off glibc."""
    if _MALLINFO2 is None:
        return None, None
    info = _MALLINFO2()
    return info.uordblks + info.hblkhd, info.arena + info.hblkhd


def start_chat(argv: list[str]):
    """cmx-chat's main() up to its REPL: the same parser, checks, model and Session."""
    import cmx
    from cmx import cli
    from cmx.images import load_image

    parser = cli.build_parser()
    args = parser.parse_args(argv)
    cli.check_args(parser, args)
    model = cmx.Model(args.model, mmproj=args.mmproj, n_ctx=args.ctx_size, n_threads=args.threads,
                      sparsity=cli.sparsity_from_args(parser, args), lora=args.lora, lora_scale=args.lora_scale)
    return cli.Session(model, args), load_image(args.image)


def run_mode(mode: str, images: list[SoakImage], schedule: list[Turn], n_predict: int = 8, ctx_size: int = 4096,
             threads: int | None = None, progress=None) -> dict:
    """Runs the schedule through cmx-chat's REPL in this process; per-turn records and a summary."""
    from cmx import cli

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    argv = [images[HOME].path, "-n", str(n_predict), "-c", str(ctx_size)]
    argv += ["--dense"] if mode == "dense" else []
    argv += ["-t", str(threads)] if threads else []
    term = ScriptedTerminal()
    records: list[dict] = []
    session, home_image = start_chat(argv)
    rss_loaded = rss_bytes()
    load_start = os.getloadavg()  # the machine is shared: turns/s depends on what else runs

    def ask(turn: Turn):
        """Types the turn's commands and question; yields the lines, returns (answer, overflowed)."""
        for line in turn.commands:
            yield line
            if "error" in term.reply_err:
                raise RuntimeError(f"cmx-chat rejected {line!r}: {term.reply_err.strip()}")
        yield turn.question
        if "prompt too long" not in term.reply_err:
            return term.answer(), False
        # The conversation no longer fits in n_ctx: a new one with this turn's image.
        yield "/clear"
        if turn.image != HOME:
            yield f"/image {images[turn.image].path}"
        yield turn.question
        return term.answer(), True

    def script():
        for t, turn in enumerate(schedule):
            t0 = time.perf_counter()
            answer, overflowed = yield from ask(turn)
            seconds = time.perf_counter() - t0
            malloc_used, malloc_system = malloc_bytes()
            if "error" in term.reply_err:
                raise RuntimeError(f"turn {t}: {term.reply_err.strip()}")
            records.append(dict(
                turn=t, kind=turn.kind, image=turn.image, question=turn.question, answer=answer, overflow=overflowed,
                seconds=round(seconds, 4), rss_bytes=rss_bytes(),
                # diagnostics: what the KV cache holds (images at full length), malloc, Python objects, kept tokens
                n_cached=len(getattr(session.model, "_cached", ())), malloc_bytes=malloc_used, malloc_system_bytes=malloc_system,
                python_blocks=sys.getallocatedblocks(),
                kept_tokens=[len(k) for k in session.model.last_stats.get("kept_image_tokens", [])]))
            if progress:
                progress(mode, records[-1])
        yield "/quit"

    term.script = script()
    saved_stdin = sys.stdin
    sys.stdin = term
    try:
        with contextlib.redirect_stdout(term.out), contextlib.redirect_stderr(term.err):
            rc = cli.repl(session, home_image)
    finally:
        sys.stdin = saved_stdin
    if rc != 0 or len(records) != len(schedule):
        raise RuntimeError(f"cmx-chat exited with {rc} after {len(records)} turns: {term.err.getvalue().strip()}")
    return {"argv": argv, "rss_after_load_bytes": rss_loaded, "load_average_start": load_start,
            "load_average_end": os.getloadavg(), "turns": records,
            "summary": summarize(records)}


def summarize(records: list[dict]) -> dict:
    mb = 1e6
    rss = [r["rss_bytes"] for r in records]
    probes = [r["answer"] for r in records if r["kind"] == "probe"]
    seconds = sum(r["seconds"] for r in records)
    s = dict(turns=len(records), seconds=round(seconds, 2), turns_per_s=round(len(records) / seconds, 3),
             overflows=sum(r["overflow"] for r in records),
             kinds={k: sum(r["kind"] == k for r in records) for k in ("probe",) + TURN_KINDS},
             probe_answers=probes, probes_identical=len(set(probes)) == 1 and len(probes) > 0,
             rss_first_mb=round(rss[0] / mb, 2), rss_final_mb=round(rss[-1] / mb, 2),
             rss_max_mb=round(max(rss) / mb, 2), max_context=max(r["n_cached"] for r in records))
    if len(rss) > WARMUP_TURNS:
        base = rss[WARMUP_TURNS - 1]  # after the first 20 turns
        later = rss[WARMUP_TURNS - 1:]
        s.update(rss_turn20_mb=round(base / mb, 2), rss_max_after_turn20_mb=round(max(later) / mb, 2),
                 growth_final_mb=round((rss[-1] - base) / mb, 2), growth_max_mb=round((max(later) - base) / mb, 2),
                 max_context_first20=max(r["n_cached"] for r in records[:WARMUP_TURNS]),
                 max_context_after20=max(r["n_cached"] for r in records[WARMUP_TURNS:]))
        s["rss_ok"] = s["growth_max_mb"] < GROWTH_LIMIT_MB  # the max bounds the final value too
    else:
        s["rss_ok"] = None  # too short a run to judge
    # A leak grows with the turns; a high-water mark (a longer context, more kept tokens than
    # before) is a step. The second half's growth and the drift between probes (the same state:
    # a new conversation, the same question), both over the run's second half, tell them apart.
    half = len(rss) // 2
    s["growth_last_half_mb"] = round((rss[-1] - rss[half]) / mb, 3)
    probe_turns = [r for r in records[half:] if r["kind"] == "probe"]
    if len(probe_turns) >= 2 and probe_turns[0]["malloc_bytes"] is not None:
        span = probe_turns[-1]["turn"] - probe_turns[0]["turn"]
        s["probe_drift_per_turn"] = {
            "malloc_bytes": round((probe_turns[-1]["malloc_bytes"] - probe_turns[0]["malloc_bytes"]) / span, 1),
            "python_blocks": round((probe_turns[-1]["python_blocks"] - probe_turns[0]["python_blocks"]) / span, 2)}
    s["passed"] = bool(s["probes_identical"] and s["rss_ok"] is not False)
    return s


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_ctx) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for mode, run in result["modes"].items():
        rss = [r["rss_bytes"] / 1e6 for r in run["turns"]]
        turns = range(1, len(rss) + 1)
        (line,) = ax.plot(turns, rss, label=mode, lw=1.2)
        if len(rss) > WARMUP_TURNS:
            base = rss[WARMUP_TURNS - 1]
            ax.hlines([base, base + GROWTH_LIMIT_MB], WARMUP_TURNS, len(rss), colors=line.get_color(), lw=0.8,
                      linestyles=[":", "--"])
        ax_ctx.plot(turns, [r["n_cached"] for r in run["turns"]], lw=0.8, color=line.get_color())
    for a in (ax, ax_ctx):
        a.axvline(WARMUP_TURNS, color="grey", lw=0.8, ls=":")
    ax.set_ylabel("RSS (MB)")
    ax.set_title("cmx-chat soak: RSS after each turn (dotted: after turn 20, dashed: +10 MB limit)", fontsize=10)
    ax.legend()
    ax_ctx.set_ylabel("context")
    ax_ctx.set_xlabel("turn")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def print_summary(result: dict) -> None:
    for mode, run in result["modes"].items():
        s = run["summary"]
        print(f"{mode}: {s['turns']} turns in {s['seconds']:.1f} s ({s['turns_per_s']:.2f} turns/s), "
              f"{s['overflows']} overflows; RSS MB: turn 20 {s.get('rss_turn20_mb')}, final {s['rss_final_mb']}, "
              f"max {s['rss_max_mb']}; growth after turn 20: final {s.get('growth_final_mb')}, max {s.get('growth_max_mb')} "
              f"(limit {GROWTH_LIMIT_MB}); probe answers {'identical' if s['probes_identical'] else 'DIFFER'} "
              f"({len(s['probe_answers'])}x {sorted(set(s['probe_answers']))}); growth over the last half "
              f"{s['growth_last_half_mb']} MB, drift per turn between its probes {s.get('probe_drift_per_turn')}; "
              f"{'PASS' if s['passed'] else 'FAIL'}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=MODES + ("both",), default="both")
    p.add_argument("--turns", type=int, default=300)
    p.add_argument("--images", type=int, default=30)
    p.add_argument("--seed", type=int, default=0, help="seed of the schedule")
    p.add_argument("--probe-every", type=int, default=25, help="turns between probes (the repeated question)")
    p.add_argument("--no-warmup-fill", action="store_true",
                   help="random turns from the start instead of filling the context during the first 20 turns")
    p.add_argument("-n", "--n-predict", type=int, default=8, help="maximum tokens per answer")
    p.add_argument("-c", "--ctx-size", type=int, default=4096)
    p.add_argument("-t", "--threads", type=int, default=None)
    p.add_argument("--out", help="JSON record: per-turn answers and RSS, summary per mode")
    p.add_argument("--plot", help="PNG of RSS per turn")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--from-json", metavar="RECORD", help="summarize (and --plot) a saved --out record instead of running")
    a = p.parse_args(argv)
    if a.from_json:
        with open(a.from_json) as f:
            result = json.load(f)
        for run in result["modes"].values():
            run["summary"] = summarize(run["turns"])
        return finish(result, a.out, a.plot)
    if a.turns < 1 or a.images < 1 or a.probe_every < 1:
        p.error("--turns, --images and --probe-every must be >= 1")

    config = {k: v for k, v in vars(a).items() if k not in ("out", "plot", "quiet")}
    result = {"tool": "tools/soak.py", "config": config, "targets": {
        "growth_after_turn20_mb_below": GROWTH_LIMIT_MB, "probe_answers": "identical"}, "modes": {}}
    if a.mode == "both":
        # Each mode in its own process: RSS figures not shared between the two.
        for mode in MODES:
            with tempfile.TemporaryDirectory() as tmp:
                child_out = os.path.join(tmp, "soak.json")
                args = [sys.executable, os.path.abspath(__file__), "--mode", mode, "--out", child_out]
                for k in ("turns", "images", "seed", "probe_every", "n_predict", "ctx_size", "threads"):
                    if getattr(a, k) is not None:
                        args += [f"--{k.replace('_', '-')}", str(getattr(a, k))]
                args += ["--quiet"] if a.quiet else []
                args += ["--no-warmup-fill"] if a.no_warmup_fill else []
                subprocess.run(args)  # its exit code is in its summary
                with open(child_out) as f:
                    result["modes"][mode] = json.load(f)["modes"][mode]
    else:
        def progress(mode, r):
            if not a.quiet and (r["turn"] % 10 == 9 or r["kind"] == "probe"):
                print(f"[{mode}] turn {r['turn'] + 1}: {r['kind']:5} RSS {r['rss_bytes'] / 1e6:7.1f} MB "
                      f"{r['seconds']:5.2f} s ctx {r['n_cached']:4d}  {r['question']!r} -> {r['answer']!r}", file=sys.__stderr__, flush=True)

        with tempfile.TemporaryDirectory() as tmp:
            images = write_images(tmp, a.images)
            schedule = make_schedule(images, a.turns, a.seed, a.probe_every, warmup_fill=not a.no_warmup_fill)
            run = run_mode(a.mode, images, schedule, a.n_predict, a.ctx_size, a.threads, progress)
        run["images"] = [dict(asdict(im), path=os.path.basename(im.path)) for im in images]
        result["modes"][a.mode] = run

    return finish(result, a.out, a.plot)


def finish(result: dict, out: str | None, plot_path: str | None) -> int:
    """Writes the record and the plot, prints the summary; the exit code: 0 when every mode passed."""
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
    if plot_path:
        plot(result, plot_path)
    print_summary(result)
    return 0 if all(run["summary"]["passed"] for run in result["modes"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

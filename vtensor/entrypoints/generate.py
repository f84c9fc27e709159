"""`vtensor generate "prompt" ...`: stream completions of one or more prompts to stdout.

With a chat template (instruct models, the default SmolLM2) prompts are sent as a user turn
unless --raw is given. A stats line goes to stderr: tokens, tokens/s, time to first token.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from vtensor.cli import UsageError, cli_message
from vtensor.engine.cli_args import from_cli_args
from vtensor.entrypoints.common import (
    add_engine_arguments,
    interrupt_between_steps,
    load_engine,
    sampling_params,
    usage_errors,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="*", help="prompt(s); '-' or none: read one from stdin")
    p.add_argument("--raw", action="store_true", help="no chat template: plain completion")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt on stdout")
    add_engine_arguments(p)


def read_prompts(args: argparse.Namespace) -> list[str]:
    """The prompts given, or one from stdin ('-' or none given). Empty ones are an error
    (with or without --raw): an empty user turn is not a question."""
    prompts = [p for p in args.prompt if p != "-"]
    if not prompts:
        if sys.stdin.isatty():
            print("vtensor generate: reading the prompt from stdin (end with Ctrl-D; or pass "
                  "it as an argument)", file=sys.stderr, flush=True)  # fmt: skip
        prompts = [sys.stdin.read()]
    if any(not p.strip() for p in prompts):
        raise UsageError("the prompt is empty")
    return prompts


def run(args: argparse.Namespace) -> int:
    from vtensor.engine import LLM
    from vtensor.model import apply_chat_template

    prompts = read_prompts(args)
    try:
        params = sampling_params(args)
        ea = from_cli_args(args)
        llm, load_s = load_engine("generate", args.model, lambda: LLM(**_kwargs(ea)))
    except usage_errors() as e:
        print(f"vtensor generate: {cli_message(e)}", file=sys.stderr)
        return 2
    tok = llm.tokenizer
    use_chat = not args.raw and tok is not None and getattr(tok, "chat_template", None)
    rc = 0
    with interrupt_between_steps() as interrupted:
        for prompt in prompts:
            msgs = [{"role": "user", "content": prompt}]
            ids = apply_chat_template(tok, msgs) if use_chat else prompt
            rc = _complete(llm, args, prompt, ids, params, load_s, interrupted) or rc
    llm.close()
    return rc


def _complete(
    llm: Any, args: argparse.Namespace, prompt: str, ids: str | list[int], params: Any,
    load_s: float, interrupted: Callable[[], bool],
) -> int:  # fmt: skip
    """Stream one prompt's completion; 2 for a rejected prompt. After Ctrl-C: aborts the
    request, then raises KeyboardInterrupt."""
    t1 = time.perf_counter()
    first = None
    last = None
    stream = llm.generate_stream([ids], params)
    try:
        for out in stream:
            if first is None and out.outputs[0].new_token_ids:
                first = time.perf_counter() - t1
            if not args.json:
                sys.stdout.write(out.outputs[0].new_text)
                sys.stdout.flush()
            last = out
            if interrupted():
                break
    except ValueError as e:
        print(f"vtensor generate: {cli_message(e)}", file=sys.stderr)
        return 2
    finally:
        stream.close()  # aborts the request if it is still running
    if interrupted():
        raise KeyboardInterrupt
    dt = time.perf_counter() - t1
    comp = last.outputs[0]
    n = len(comp.token_ids)
    if args.json:
        print(json.dumps({"prompt": prompt, "text": comp.text, "token_ids": comp.token_ids,
                          "finish_reason": comp.finish_reason,
                          "num_cached_tokens": last.num_cached_tokens}))  # fmt: skip
    else:
        sys.stdout.write("\n")
    print(f"[{n} tokens in {dt:.2f} s, {n / dt:.1f} tok/s, first token "
          f"{(first or 0) * 1e3:.0f} ms, finish={comp.finish_reason}, device="
          f"{llm.llm_engine.device}, load {load_s:.1f} s]", file=sys.stderr)  # fmt: skip
    return 0


def _kwargs(ea) -> dict:
    import dataclasses

    d = {f.name: getattr(ea, f.name) for f in dataclasses.fields(ea)}
    return d

"""`vtensor chat`: an interactive multi-turn REPL that keeps the conversation's KV.

Each turn's prompt is the previous turn's exact tokens (prompt + generated reply) followed by
the newly templated user turn, so the KV cache finds the finished turn's parked slot and only
the new turn is prefilled. `/stats` shows cached vs prefilled tokens and KV telemetry,
`/reset` starts over, `/exit` (or EOF) quits.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vtensor.cli import cli_message
from vtensor.engine.cli_args import from_cli_args
from vtensor.entrypoints.common import (
    add_engine_arguments,
    interrupt_between_steps,
    load_engine,
    sampling_params,
    usage_errors,
)


@dataclass(slots=True)
class TurnStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0

    @property
    def prefilled_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens


@dataclass
class ChatSession:
    engine: Any  # LLMEngine
    params: Any  # SamplingParams
    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)
    history_ids: list[int] = field(default_factory=list)  # exact tokens of the finished turns
    last: TurnStats = field(default_factory=TurnStats)
    turns: int = 0

    def reset(self) -> None:
        self.messages, self.history_ids = [], []

    def _prompt_ids(self, user: str) -> list[int]:
        from vtensor.model import apply_chat_template

        tok = self.engine.tokenizer
        msgs = list(self.messages) + [{"role": "user", "content": user}]
        if self.system and not any(m["role"] == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": self.system})
        full = apply_chat_template(tok, msgs)
        if not self.history_ids:
            return full
        # Continue from the exact tokens of the previous turns when the template's text
        # extends them (it does for ChatML); otherwise fall back to the re-templated ids
        # (the prefix cache still shares their common full pages).
        text = tok.decode(full, skip_special_tokens=False)
        prev = tok.decode(self.history_ids, skip_special_tokens=False)
        if not text.startswith(prev):
            return full
        rest = text[len(prev) :]
        return self.history_ids + list(tok(rest, add_special_tokens=False)["input_ids"])

    def turn(self, user: str, out=None, stop: Callable[[], bool] | None = None) -> str:
        """Run one turn; streams the reply to `out` (a file) if given, returns its text.
        `stop()` true (Ctrl-C, checked between steps): the reply ends there (abort) and the
        conversation keeps what was said."""
        ids = self._prompt_ids(user)
        self.turns += 1
        rid = f"chat-{self.turns}"
        self.engine.add_request(rid, ids, self.params)
        final = None
        while self.engine.has_unfinished_requests():
            if stop is not None and final is None and stop():
                self.engine.abort_request(rid)  # its output (finished) comes from the next step
            for o in self.engine.step():
                if o.request_id != rid:
                    continue
                if out is not None and o.outputs[0].new_text:
                    out.write(o.outputs[0].new_text)
                    out.flush()
                if o.finished:
                    final = o
        comp = final.outputs[0]
        self.last = TurnStats(len(ids), final.num_cached_tokens, len(comp.token_ids))
        self.messages += [{"role": "user", "content": user},
                          {"role": "assistant", "content": comp.text}]  # fmt: skip
        self.history_ids = ids + comp.token_ids
        return comp.text

    def stats_line(self) -> str:
        kv = self.engine.kv_cache.snapshot()
        s = self.last
        return (
            f"turn {self.turns}: prompt {s.prompt_tokens} tokens, cached {s.cached_tokens}, "
            f"prefilled {s.prefilled_tokens}, generated {s.output_tokens} | kv: pages in use "
            f"{kv.get('pages_in_use')}, parked slots {kv.get('slots_parked', 0)}, affinity hits "
            f"{kv.get('affinity_hits', 0)}, prefix hit rate {kv.get('prefix_hit_rate', 0):.2f}, "
            f"MiB mapped {kv.get('bytes_mapped', 0) / 2**20:.1f}"
        )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--system", default=None, help="system prompt")
    add_engine_arguments(p)


def run(args: argparse.Namespace) -> int:
    from vtensor.engine import LLMEngine

    try:
        params = sampling_params(args)
        ea = from_cli_args(args)
        engine, _ = load_engine("chat", args.model, lambda: LLMEngine(ea))
    except usage_errors() as e:
        print(f"vtensor chat: {cli_message(e)}", file=sys.stderr)
        return 2
    if engine.tokenizer is None or not getattr(engine.tokenizer, "chat_template", None):
        print("vtensor chat: this model has no chat template", file=sys.stderr)
        return 2
    session = ChatSession(engine, params, system=args.system)
    interactive = sys.stdin.isatty()
    print("vtensor chat: /stats, /reset, /exit", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", flush=True, file=sys.stderr)
        line = sys.stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/stats":
            print(session.stats_line())
            continue
        if line == "/reset":
            session.reset()
            continue
        try:
            with interrupt_between_steps() as interrupted:
                session.turn(line, out=sys.stdout, stop=interrupted)
        except ValueError as e:  # e.g. the conversation outgrew max_model_len
            print(f"\n[error: {cli_message(e)}; /reset to start over]", file=sys.stderr)
            continue
        print()
        if interrupted():
            print("[reply stopped (Ctrl-C); Ctrl-C at the prompt quits]", file=sys.stderr)
    engine.close()
    return 0

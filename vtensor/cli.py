"""The `vtensor` command: a thin dispatcher.

Each subcommand lives in the module that owns it and exposes two functions,
`add_arguments(parser)` and `run(args) -> int | None`; they are imported lazily so that
`vtensor info` does not pay for importing transformers.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("vtensor.vmm.info", "backend, device, page granularity and page pool state"),
    "generate": ("vtensor.entrypoints.generate", "generate text for one or more prompts"),
    "chat": ("vtensor.entrypoints.chat", "interactive multi-turn chat that keeps its KV"),
    "serve": ("vtensor.server.cli", "OpenAI-compatible HTTP server"),
    "bench": ("vtensor.bench.cli", "benchmarks (vmm, kv, kernels, throughput, e2e, all)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="vtensor")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_)
        p.set_defaults(_module=module)
        if argv and argv[0] == name:
            importlib.import_module(module).add_arguments(p)
    args = parser.parse_args(argv)
    rc = importlib.import_module(args._module).run(args)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())

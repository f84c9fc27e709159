"""The `vtensor` command: a thin dispatcher.

Each subcommand lives in the module that owns it and exposes two functions,
`add_arguments(parser)` and `run(args) -> int | None`; they are imported lazily so that
`vtensor info` does not pay for importing transformers.

Errors are one line on stderr (`vtensor CMD: message`), never a traceback: exit 2 for a bad
argument or input, 1 for a failure, 130 for Ctrl-C. `VTENSOR_DEBUG=1` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# subcommand -> (module, help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("vtensor.vmm.info", "backend, device, page granularity and page pool state"),
    "generate": ("vtensor.entrypoints.generate", "generate text for one or more prompts"),
    "chat": ("vtensor.entrypoints.chat", "interactive multi-turn chat that keeps its KV"),
    "serve": ("vtensor.server.cli", "OpenAI-compatible HTTP server"),
    "bench": ("vtensor.bench.cli", "benchmarks (vmm, kv, kernels, throughput, e2e, all)"),
}


class UsageError(Exception):
    """A bad argument or input found after parsing: one line, exit status 2."""


def cli_message(e: BaseException) -> str:
    """An exception as one line for a terminal: library wording mapped to the CLI's options."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    for lib, opt in (("load_format='dummy'", "--load-format dummy"),
                     ("load_format=", "--load-format "), ("max_model_len=", "--max-model-len "),
                     ("kv_memory", "--kv-memory"), ("max_num_seqs", "--max-num-seqs"),
                     ("max_num_batched_tokens", "--max-num-batched-tokens"),
                     ("mixed_graph_tokens", "--mixed-graph-tokens")):  # fmt: skip
        msg = msg.replace(lib, opt)
    return msg


def check_cuda_request(args: argparse.Namespace) -> None:
    """`--device cuda` / `--backend cuda` on a machine without a usable GPU: say so plainly
    before torch does (its words are "Torch not compiled with CUDA enabled" or worse)."""
    want = [str(getattr(args, k, "") or "") for k in ("device", "backend")]
    if not any(w.startswith("cuda") for w in want):
        return
    import torch

    if not torch.cuda.is_available():
        raise UsageError("CUDA was requested but no CUDA device is available to torch "
                         f"(torch {torch.__version__}); use --device cpu or auto")  # fmt: skip


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    # allow_abbrev=False: `--max-tok 3` is an error, not silently `--max-tokens 3`
    parser = argparse.ArgumentParser(prog="vtensor", allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_, allow_abbrev=False)
        p.set_defaults(_module=module)
        if argv and argv[0] == name:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    debug = os.environ.get("VTENSOR_DEBUG", "") not in ("", "0")
    try:
        check_cuda_request(args)
        rc = importlib.import_module(args._module).run(args)
    except KeyboardInterrupt:
        sys.stdout.flush()
        print(f"\nvtensor {args.command}: interrupted", file=sys.stderr)
        return 130
    except UsageError as e:
        print(f"vtensor {args.command}: {cli_message(e)}", file=sys.stderr)
        return 2
    except Exception as e:
        if debug:
            raise
        print(f"vtensor {args.command}: error: {cli_message(e)} (VTENSOR_DEBUG=1 shows the "
              "traceback)", file=sys.stderr)  # fmt: skip
        return 1
    return int(rc or 0)


if __name__ == "__main__":  # python -m vtensor.cli: run the importable module's main, so that
    from vtensor.cli import main as _main  # UsageError raised by subcommands is the same class

    sys.exit(_main())

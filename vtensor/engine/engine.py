"""LLMEngine: requests in, RequestOutputs out, one `step()` at a time (not thread-safe: AsyncLLM
drives it from one thread).

    add_request -> Scheduler.waiting -> schedule() -> ModelRunner.execute() -> Sampler
                -> append token, detokenize, stop checks -> RequestOutput deltas
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

import torch

from vtensor.engine.args import EngineArgs, is_path, parse_memory
from vtensor.engine.config import EngineConfig
from vtensor.engine.errors import ErrorKind, RequestError, is_device_error
from vtensor.engine.inflight import PLACEHOLDER, InFlight, TokenFill
from vtensor.engine.outputs import RequestOutput, make_output
from vtensor.engine.runner import ModelRunner
from vtensor.engine.sampler import Sampler, SamplerOutput
from vtensor.engine.sampling_params import SamplingParams
from vtensor.engine.scheduler import ScheduledBatch, Scheduler
from vtensor.engine.sequence import Sequence, Status, new_sequence
from vtensor.engine.warmup import warm_up
from vtensor.kv import KVManager

log = logging.getLogger(__name__)

# Model steps that may fail in a row (each failing its requests) before the engine gives up.
_MAX_FAILURES_IN_A_ROW = 3


__all__ = ["EngineArgs", "LLMEngine", "parse_memory"]


class LLMEngine:
    def __init__(
        self, args: EngineArgs | None = None, *, preloaded: tuple | None = None, **kwargs: Any
    ) -> None:
        """preloaded: (model, model_config, tokenizer) to share one loaded model between
        engines (tests, benchmarks comparing kv modes); otherwise loaded from args."""
        from vtensor.kv import KVSpec
        from vtensor.model import (
            ModelNotFoundError,
            eos_token_ids,
            load_model,
            load_tokenizer,
            resolve_device,
        )  # fmt: skip

        args = args if args is not None else EngineArgs(**kwargs)
        self.args = args
        self.device = dev = resolve_device(args.device)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)  # graph capture and the KV backend use the current device
        t0 = time.perf_counter()
        if preloaded is not None:
            self.model, self.model_config, self.tokenizer = preloaded
        else:
            self.model, self.model_config = load_model(
                args.model, dtype=args.dtype, device=dev, load_format=args.load_format,
                config_overrides=args.config_overrides, seed=args.seed,
            )  # fmt: skip
            self.tokenizer = None
        self.load_s = time.perf_counter() - t0
        cfg = self.model_config
        if preloaded is None and (args.tokenizer is not None or is_path(args.model)):
            try:
                self.tokenizer = load_tokenizer(args.tokenizer or args.model)
            except ModelNotFoundError as e:  # weights without tokenizer files: ids only
                if args.tokenizer is not None:
                    raise
                log.warning("no tokenizer for %s (%s): token-id prompts only", args.model, e)
        eos = list(cfg.eos_token_ids)
        self.eos_token_ids = set(eos_token_ids(self.tokenizer, eos) if self.tokenizer else eos)
        self.config = config = EngineConfig.resolve(args, cfg, dev)
        log.info("engine config: %s", config.describe())
        self.max_model_len = config.max_model_len
        self.max_num_seqs = config.max_num_seqs
        attention = config.attention(cfg, self.model.dtype)  # fails before any KV is built
        spec = KVSpec(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, self.model.dtype)
        self.kv_cache: KVManager = config.kv_manager(spec)
        self.scheduler = Scheduler(
            self.kv_cache, max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            preemption_mode=config.preemption_mode,
        )  # fmt: skip
        self.runner = ModelRunner(
            self.model, self.kv_cache, attention, device=dev, max_num_seqs=config.max_num_seqs,
            max_model_len=config.max_model_len,
            max_num_batched_tokens=config.max_num_batched_tokens,
            use_cuda_graphs=config.use_cuda_graphs,
            mixed_graph_tokens=config.mixed_graph_tokens,
        )  # fmt: skip
        self.sampler = Sampler(sorted(self.eos_token_ids))
        self.requests: dict[str, Sequence] = {}
        self._pending: list[Sequence] = []  # aborted / failed: reported by the next step()
        self._failures_in_a_row = 0
        # host seconds per phase of step(): wait_s (in process_s) = blocked on the GPU for ids;
        # kv_wait_s (maps the step needs) + forward_s (launching the model) are in launch_s
        phases = ("schedule_s", "launch_s", "kv_wait_s", "forward_s", "process_s", "wait_s")
        self.timing = dict.fromkeys(phases, 0.0)
        self._inflight: InFlight | None = None  # launched, its sampled ids not yet processed
        # Overlap the CPU's work with the GPU's (inflight.py); swap preemption copies pages on
        # the host while the GPU may still write them: it keeps the plain loop
        self.async_scheduling = args.async_scheduling and args.preemption_mode != "swap"
        self._arrivals = 0
        self.counters = dict.fromkeys(("steps", "prefill_steps", "decode_steps",
            "prompt_tokens_computed", "generation_tokens", "requests_finished"), 0)  # fmt: skip
        if self.device.type == "cuda":  # no one-time work (JIT, allocator growth) on a request
            warm_up(self)

    # ------------------------------------------------------------------ requests

    def make_sequence(
        self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None
    ) -> Sequence:
        """Tokenize and validate a request (no engine state touched: safe from any thread)."""
        return new_sequence(request_id, prompt, params, tokenizer=self.tokenizer,
                            max_model_len=self.max_model_len,
                            vocab_size=self.model_config.vocab_size)  # fmt: skip

    def add_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None
    ) -> None:
        self.add_sequence(self.make_sequence(request_id, prompt, params))

    def add_sequence(self, seq: Sequence) -> None:
        if seq.request_id in self.requests:
            raise ValueError(f"request id {seq.request_id!r} is already running")
        self._arrivals += 1
        seq.arrival = self._arrivals
        self.requests[seq.request_id] = seq
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> None:
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return
        self.scheduler.abort(seq)
        seq.drop_pending()
        seq.finish_reason = "abort"
        seq.t_finish = time.monotonic()
        self._pending.append(seq)

    def has_unfinished_requests(self) -> bool:
        return bool(
            self.requests or self._pending or self.scheduler.failed or self._inflight is not None
        )

    def reset_prefix_cache(self, trim: bool = False) -> int:
        """Forget cached prefixes and parked conversations (vLLM's reset_prefix_cache; the
        benchmarks call it between workloads); `trim`: also give the free pages back to the
        driver. Returns the pages freed."""
        n = self.kv_cache.reset_prefix_cache()
        if trim:
            self.kv_cache.trim()
        return n

    def on_idle(self) -> int:
        """Called while nothing runs: free KV pages idle for kv_idle_trim_s go back to the
        driver (virtual KV only; a paged pool is preallocated). Returns pages trimmed."""
        return self.kv_cache.maybe_trim()

    # ------------------------------------------------------------------ step

    @torch.inference_mode()
    def step(self, finished_only: bool = False) -> list[RequestOutput]:
        """Schedule and launch one batch, then process the previous one (overlapped: see
        inflight.py; with async_scheduling off, the batch just launched). Returns a
        RequestOutput per request that got a token (only the finished ones with
        `finished_only`: offline callers skip building the rest).

        A failure tied to the requests of a step ends those requests with a RequestError and
        the engine goes on; only a device error (or repeated failures) propagates."""
        t0 = time.perf_counter()
        batch = self.scheduler.schedule()
        self.kv_cache.apply(batch.plan)  # the mapper starts now, ahead of the inputs and GPU
        t1 = time.perf_counter()
        done = self._pending + self.scheduler.failed
        self._pending, self.scheduler.failed = [], []
        outputs = []
        for seq in done:
            seq.drop_pending()
            self.requests.pop(seq.request_id, None)
            outputs.append(make_output(seq))
        launched = self._launch(batch, outputs, finished_only) if batch else None
        t2 = time.perf_counter()
        prev, self._inflight = self._inflight, None
        if prev is not None:
            self._process(prev, outputs, finished_only)
        if launched is not None:
            if self.async_scheduling:
                self._inflight = launched
            else:
                self._process(launched, outputs, finished_only)
        self.scheduler.remove_finished()
        tm = self.timing
        tm["schedule_s"] += t1 - t0
        tm["launch_s"] += t2 - t1
        tm["process_s"] += time.perf_counter() - t2  # includes wait_s
        if self.args.debug and not self.requests and self._inflight is None:
            self.kv_cache.check_integrity()
        return outputs

    def _launch(
        self, batch: ScheduledBatch, outputs: list[RequestOutput], finished_only: bool
    ) -> InFlight | None:
        """Run the model on `batch` and sample; the ids stay on the device (and travel to the
        host behind an event). Each sampled request gets a PLACEHOLDER token."""
        self.counters["steps"] += 1
        self.counters["prefill_steps" if batch.is_prefill else "decode_steps"] += 1
        try:
            t0 = time.perf_counter()
            self.kv_cache.wait_ready()
            t1 = time.perf_counter()
            logits, rows = self.runner.execute(batch, self._token_fill(batch))
            self.timing["kv_wait_s"] += t1 - t0
            self.timing["forward_s"] += time.perf_counter() - t1
        except Exception as e:
            self._batch_failed(batch.seqs, e, outputs)
            return None
        self._failures_in_a_row = 0
        for seq, n in zip(batch.seqs, batch.num_new, strict=True):
            seq.num_computed += n
            if batch.is_prefill and n > 1:
                self.counters["prompt_tokens_computed"] += n
                if self.args.enable_prefix_cache:  # publish full pages for concurrent requests
                    self.kv_cache.cache_prefix(seq.slot, seq.token_ids[: seq.num_computed])
        if not rows:
            return None
        seqs = [batch.seqs[r] for r in rows]
        if self._inflight is not None and any(s.params.has_penalties for s in seqs):
            # penalties count output ids on the host: the previous step's must be known
            prev, self._inflight = self._inflight, None
            self._process(prev, outputs, finished_only)
            keep = [j for j, s in enumerate(seqs) if s.status != Status.FINISHED]
            if len(keep) < len(seqs):
                logits, seqs = logits[keep], [seqs[j] for j in keep]
            if not seqs:
                return None
        try:
            out = self.sampler(logits, seqs)
        except Exception:  # find the request(s) it failed on; sample the others alone
            log.exception("sampling a batch of %d failed; retrying row by row", len(seqs))
            prev, self._inflight = self._inflight, None
            if prev is not None:  # keep each request's tokens in order
                self._process(prev, outputs, finished_only)
            for group, group_out in self._sample_rows(logits, seqs, outputs):
                self._process(self._pend(group, group_out), outputs, finished_only)
            return None
        return self._pend(seqs, out)

    def _pend(self, seqs: list[Sequence], out: SamplerOutput) -> InFlight:
        index = []
        for j, seq in enumerate(seqs):
            seq.token_ids.append(PLACEHOLDER)
            seq.num_pending += 1
            seq.sample_row = j
            index.append(seq.num_tokens - 1)
            if seq.length_reached(seq.num_tokens, self.max_model_len):
                # stops on length whatever the token: never schedule it again (its slot is
                # released once the token is known: the prefix cache wants real ids)
                self.scheduler.hold(seq)
        return InFlight.launch(seqs, index, out)

    def _token_fill(self, batch: ScheduledBatch) -> TokenFill | None:
        """Decode inputs that are the in-flight step's samples: gathered on the device."""
        if self._inflight is None:
            return None
        seqs, rows = [], []
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new, strict=True)):
            if seq.token_ids[seq.num_computed + n - 1] == PLACEHOLDER:  # only the last can be
                seqs.append(i)
                rows.append(seq.sample_row)
        return TokenFill(self._inflight.out.token_ids, seqs, rows) if seqs else None

    def _sample_rows(
        self, logits: torch.Tensor, seqs: list[Sequence], outputs: list[RequestOutput]
    ) -> list[tuple[list[Sequence], SamplerOutput]]:
        groups = []
        for j, seq in enumerate(seqs):
            try:
                groups.append(([seq], self.sampler(logits[j : j + 1], [seq])))
            except Exception as e:
                if is_device_error(e):
                    raise
                log.exception("sampling failed for request %s", seq.request_id)
                msg = "sampling failed for this request's parameters"
                self._fail_request(seq, RequestError(ErrorKind.INTERNAL, msg), outputs)
        return groups

    def _process(
        self, step: InFlight, outputs: list[RequestOutput], finished_only: bool
    ) -> None:
        """Fill in a launched step's tokens (the step's one host sync), stop checks,
        detokenization, outputs."""
        t0 = time.perf_counter()
        vals = step.wait()
        self.timing["wait_s"] += time.perf_counter() - t0
        ids = vals[0]
        lps = vals[1] if len(vals) > 1 else None
        tops, top_ids = (vals[2], vals[3]) if len(vals) > 3 else (None, None)
        now = time.monotonic()
        for j, (seq, idx) in enumerate(zip(step.seqs, step.index, strict=True)):
            if idx >= seq.num_tokens or seq.token_ids[idx] != PLACEHOLDER:
                continue  # the request ended (abort, stop, error) before this token
            tok = ids[j]
            try:
                seq.token_ids[idx] = tok
                seq.num_pending -= 1
                if seq.logprobs is not None and lps is not None:
                    entry = {}
                    if tops is not None:
                        k = seq.params.logprobs
                        entry = dict(zip(top_ids[j][:k], tops[j][:k], strict=True))
                    entry[tok] = lps[j]
                    seq.logprobs.append(entry)
                    seq.cumulative_logprob += lps[j]
                self._append(seq, idx, tok, now)
                if not finished_only or seq.finish_reason is not None:
                    outputs.append(make_output(seq))
            except Exception:
                log.exception("processing the output of request %s failed", seq.request_id)
                msg = "the engine failed while processing this request's output"
                self._fail_request(seq, RequestError(ErrorKind.INTERNAL, msg), outputs)

    def _batch_failed(
        self, seqs: list[Sequence], e: Exception, outputs: list[RequestOutput]
    ) -> None:
        """The model step failed: its requests end with an error, the engine goes on, unless
        the device is broken or steps keep failing (then the caller's loop sees the error)."""
        self._failures_in_a_row += 1
        if is_device_error(e) or self._failures_in_a_row > _MAX_FAILURES_IN_A_ROW:
            raise e
        log.exception("a step of %d requests failed; failing them", len(seqs))
        err = RequestError(ErrorKind.INTERNAL, "the engine failed while computing this request")
        for seq in list(seqs):
            self._fail_request(seq, err, outputs)
        self.scheduler.remove_finished()

    def _fail_request(
        self, seq: Sequence, error: RequestError, outputs: list[RequestOutput]
    ) -> None:
        if seq.request_id not in self.requests:
            return  # already ended
        self.scheduler.abort(seq)  # frees its KV, drops it from any queue
        seq.drop_pending()
        seq.finish_reason, seq.error, seq.t_finish = "error", error, time.monotonic()
        self.requests.pop(seq.request_id, None)
        outputs.append(make_output(seq))

    def _append(self, seq: Sequence, idx: int, tok: int, now: float) -> None:
        """Token `tok` landed at token_ids[idx]: stop checks (as if nothing came after it)."""
        self.counters["generation_tokens"] += 1
        if seq.t_first_token is None:
            seq.t_first_token = now
        p = seq.params
        n_out = idx + 1 - len(seq.prompt_token_ids)
        stop_str = seq.detok.add(tok)
        reason, stop_reason = None, None
        if stop_str is not None:
            reason, stop_reason = "stop", stop_str
        elif n_out > p.min_tokens and not p.ignore_eos and tok in self.eos_token_ids:
            reason = "stop"
        elif n_out > p.min_tokens and tok in p.stop_token_ids:
            reason, stop_reason = "stop", tok
        elif seq.length_reached(idx + 1, self.max_model_len):
            reason = "length"
        if reason is None:
            return
        seq.drop_pending()  # a token of the next step, if any, is dropped
        seq.finish_reason, seq.stop_reason, seq.t_finish = reason, stop_reason, now
        if seq.status in (Status.WAITING, Status.SWAPPED):  # preempted meanwhile
            self.scheduler.abort(seq)  # leaves its queue
        elif seq.slot is not None:  # running, or held since its length stop was launched
            self.scheduler.finish(seq)  # parks its KV for the conversation's next turn
        self.requests.pop(seq.request_id, None)
        self.counters["requests_finished"] += 1

    def stats(self, include_kv: bool = True) -> dict:
        s = self.scheduler
        out = {
            "running": len(s.running), "waiting": len(s.waiting), "swapped": len(s.swapped),
            "num_preemptions": s.num_preemptions, **self.counters,
            "host_s": dict(self.timing), "cuda_graphs": sorted(self.runner.graphs),
            "prefill_steps_graphed": self.runner.mixed.replays if self.runner.mixed else 0,
        }  # fmt: skip
        if include_kv:
            out["kv"] = self.kv_cache.snapshot()
        return out

    def close(self) -> None:
        for rid in list(self.requests):
            self.abort_request(rid)
        self._pending, self._inflight = [], None
        self.runner.close()
        self.kv_cache.close()
        if gc.get_freeze_count():
            # the warm-up froze the heap; give it back to the GC so that this engine's cycles
            # (and the memory they hold) can go once the caller drops it
            gc.unfreeze()
            gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

"""LLM: the offline API. `generate` runs the engine's step loop until every prompt is done;
`generate_stream` yields RequestOutputs (deltas) as tokens are produced; `chat` applies the
tokenizer's chat template first."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from vtensor.engine.engine import EngineArgs, LLMEngine
from vtensor.engine.errors import raise_for
from vtensor.engine.outputs import RequestOutput
from vtensor.engine.sampling_params import SamplingParams

Prompt = str | list[int]
Message = dict[str, str]


def _normalize_prompts(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # one prompt given as token ids
    return prompts


class LLM:
    def __init__(
        self,
        model: str | None = None,
        *,
        dtype: str = "auto",
        max_model_len: int | None = None,
        kv_memory: int | float | str | None = None,
        kv: str = "virtual",
        device: str = "auto",
        preloaded: tuple | None = None,
        **kwargs: Any,
    ) -> None:
        args = EngineArgs(model=model, dtype=dtype, max_model_len=max_model_len,
                          kv_memory=kv_memory, kv=kv, device=device, **kwargs)  # fmt: skip
        self.llm_engine = LLMEngine(args, preloaded=preloaded)
        self._next = 0

    @property
    def tokenizer(self) -> Any:
        return self.llm_engine.tokenizer

    def _add(self, prompts: list[Prompt], params: SamplingParams | Sequence[SamplingParams] | None):
        if params is None:
            params = SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        elif len(params) != len(prompts):
            raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
        eng = self.llm_engine
        seqs = [
            eng.make_sequence(f"llm-{self._next + i}", p, sp)  # validate all before adding any
            for i, (p, sp) in enumerate(zip(prompts, params, strict=True))
        ]
        self._next += len(seqs)
        for s in seqs:
            eng.add_sequence(s)
        return [s.request_id for s in seqs]

    def generate_stream(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> Iterator[RequestOutput]:
        """Yield a RequestOutput each time a request makes progress (new_text / new_token_ids
        carry the delta). Closing the iterator early aborts the remaining requests."""
        ids = set(self._add(_normalize_prompts(prompts), sampling_params))
        eng = self.llm_engine
        try:
            while ids:
                for out in eng.step():
                    if out.request_id in ids:
                        if out.finished:
                            ids.discard(out.request_id)
                        yield out
        finally:
            for rid in ids:
                eng.abort_request(rid)
            while eng._pending:  # drop the abort records nobody will read
                eng.step()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        prompts = _normalize_prompts(prompts)
        ids = self._add(prompts, sampling_params)
        index = {rid: i for i, rid in enumerate(ids)}
        results: list[RequestOutput | None] = [None] * len(ids)
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), desc="generate", unit="req")
        eng = self.llm_engine
        try:
            remaining = len(ids)
            while remaining:
                for out in eng.step(finished_only=True):
                    i = index.get(out.request_id)
                    if i is None or not out.finished:
                        continue
                    results[i] = out
                    remaining -= 1
                    if bar is not None:
                        bar.update(1)
        finally:
            if bar is not None:
                bar.close()
            for rid, i in index.items():
                if results[i] is None:
                    eng.abort_request(rid)
        errors = [o for o in results if o is not None and o.error]
        if errors:
            raise_for(errors[0].error)
        return results  # type: ignore[return-value]

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
        **template_kwargs: Any,
    ) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"} dicts) or a list of them."""
        from vtensor.model import apply_chat_template

        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer with a chat template")
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [apply_chat_template(self.tokenizer, c, **template_kwargs) for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def reset_prefix_cache(self) -> int:
        """Forget cached prefixes and parked conversations; returns the pages freed."""
        return self.llm_engine.reset_prefix_cache()

    def close(self) -> None:
        self.llm_engine.close()

    shutdown = close

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

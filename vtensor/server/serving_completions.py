"""`POST /v1/completions`: the logic; the router in api.py only parses and wraps."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing

from vtensor.server.errors import OpenAIError
from vtensor.server.fanout import SubRequest, make_usage
from vtensor.server.protocol import (
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionStreamResponse,
    random_id,
)
from vtensor.server.serving_engine import (
    OpenAIServing,
    finish_reason,
    new_token_ids,
    sse,
    stop_reason,
    text_deltas,
)

# A batch of prompts is a convenience, not a way around --max-waiting: keep it bounded.
MAX_PROMPTS = 256


class OpenAIServingCompletion(OpenAIServing):
    async def create_completion(
        self, req: CompletionRequest
    ) -> CompletionResponse | AsyncIterator[str]:
        """Validate everything before the first byte goes out: a bad request gets a JSON error
        with its status, never a 200 stream that dies."""
        self.check_model(req.model)
        if req.suffix:
            raise OpenAIError("`suffix` is not supported.", param="suffix")
        if req.echo and req.logprobs is not None:
            raise OpenAIError("`echo` together with `logprobs` is not supported.", param="echo")
        items = self._prompt_items(req.prompt)
        self.check_capacity(len(items) * req.n)  # before paying for tokenization
        # Tokenizing a long prompt takes seconds: off the event loop (health, streams go on).
        prompts = await asyncio.to_thread(self._prompts, items)
        max_tokens = [
            self.resolve_max_tokens(len(p), req.max_tokens, "max_tokens") for p in prompts
        ]
        subs = self.make_subrequests(prompts, req, max_tokens=max_tokens, logprobs=req.logprobs)
        echo = [self._prompt_text(req.prompt, i) if req.echo else "" for i in range(len(prompts))]
        it, first = await self.start(subs)
        if req.stream:
            return self.stream_errors("cmpl", self._stream(req, subs, echo, it, first))
        return await self._full(req, subs, echo, it)

    @staticmethod
    def _prompt_items(prompt: str | list) -> list:
        if isinstance(prompt, str):
            items: list = [prompt]
        elif prompt and isinstance(prompt[0], int):
            items = [prompt]
        else:
            items = list(prompt)
        if not items:
            raise OpenAIError("The prompt is empty.", param="prompt")
        if len(items) > MAX_PROMPTS:
            raise OpenAIError(f"At most {MAX_PROMPTS} prompts per request.", param="prompt")
        return items

    def _prompts(self, items: list) -> list[list[int]]:
        out = []
        for item in items:
            ids = self.encode(item, add_special_tokens=True) if isinstance(item, str) else item
            self.check_token_ids(ids, "prompt")
            out.append(ids)
        return out

    def _prompt_text(self, prompt: str | list, i: int) -> str:
        """Prompt i as the client wrote it (for echo): its string, or its ids decoded."""
        if isinstance(prompt, str):
            return prompt
        if prompt and isinstance(prompt[0], int):
            return self.tokenizer.decode(prompt)
        item = prompt[i]
        return item if isinstance(item, str) else self.tokenizer.decode(item)

    def _logprobs(
        self, sub: SubRequest, start: int, end: int, k: int, offset: int
    ) -> CompletionLogProbs:
        res = CompletionLogProbs()
        for tid, lp, tops in self.token_logprobs(sub.last, start, end):
            tok = self.decode_token(tid)
            res.tokens.append(tok)
            res.token_logprobs.append(lp)
            res.top_logprobs.append({self.decode_token(t): v for t, v in tops[:k]} if k else None)
            res.text_offset.append(offset)
            offset += len(tok)
        return res

    async def _full(
        self,
        req: CompletionRequest,
        subs: list[SubRequest],
        echo: list[str],
        it: AsyncIterator[SubRequest],
    ) -> CompletionResponse:
        async with aclosing(it):
            async for _ in it:
                pass
        choices = []
        for s in subs:
            out = s.last
            pre = echo[s.index // req.n]
            lps = None
            if req.logprobs is not None:
                lps = self._logprobs(s, 0, s.num_tokens, req.logprobs, len(pre))
            ids = req.return_token_ids
            choices.append(
                CompletionResponseChoice(
                    index=s.index,
                    text=pre + out.outputs[0].text,
                    logprobs=lps,
                    finish_reason=finish_reason(out),
                    stop_reason=stop_reason(out),
                    token_ids=list(out.outputs[0].token_ids) if ids else None,
                    prompt_token_ids=list(s.prompt_ids) if ids else None,
                )
            )
        return CompletionResponse(
            id=random_id("cmpl"),
            model=self.served_model_name,
            choices=choices,
            usage=make_usage(subs, req.n),
        )

    async def _stream(
        self,
        req: CompletionRequest,
        subs: list[SubRequest],
        echo: list[str],
        it: AsyncIterator[SubRequest],
        first: SubRequest | None,
    ) -> AsyncIterator[str]:
        rid = random_id("cmpl")
        sent_tok = [0] * len(subs)  # tokens whose logprobs were streamed
        sent_ids = [0] * len(subs)  # tokens whose ids were streamed (return_token_ids)
        offset = [len(echo[s.index // req.n]) for s in subs]
        async with aclosing(it):
            for s in subs:  # echo goes first, in its own chunk per choice
                if echo[s.index // req.n]:
                    yield sse(self._chunk(rid, s.index, echo[s.index // req.n]))
            async for s, delta, fr in text_deltas(first, it, len(subs)):
                i, lps = s.index, None
                if req.logprobs is not None:
                    lps = self._logprobs(s, sent_tok[i], s.num_tokens, req.logprobs, offset[i])
                    offset[i] += sum(len(t) for t in lps.tokens)
                    sent_tok[i] = s.num_tokens
                sr = stop_reason(s.last) if fr else None
                ids = new_token_ids(s, sent_ids) if req.return_token_ids else None
                yield sse(self._chunk(rid, i, delta, lps, fr, sr, ids))
        if req.stream_options and req.stream_options.include_usage:
            usage = make_usage(subs, req.n)
            yield sse(
                CompletionStreamResponse(
                    id=rid, model=self.served_model_name, choices=[], usage=usage
                )
            )

    def _chunk(
        self, rid, index, text, lps=None, fr=None, sr=None, ids=None
    ) -> CompletionStreamResponse:
        return CompletionStreamResponse(
            id=rid,
            model=self.served_model_name,
            choices=[
                CompletionResponseChoice(
                    index=index, text=text, logprobs=lps, finish_reason=fr, stop_reason=sr,
                    token_ids=ids,
                )
            ],
        )

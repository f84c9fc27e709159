"""`POST /v1/chat/completions`: chat template, then the same generation path as completions.

Multi-turn KV reuse needs nothing special here: the template renders turn k+1's prompt as turn
k's prompt + the assistant reply + the new message, so the engine's prefix cache / parked slot
matches it and `usage.prompt_tokens_details.cached_tokens` reports what was not recomputed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing

from vtensor.server.errors import OpenAIError
from vtensor.server.fanout import SubRequest, make_usage
from vtensor.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
    ChatCompletionTokenLogprob,
    ChatLogProbs,
    ChatResponseMessage,
    DeltaMessage,
    TopLogprob,
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

# Used only when the tokenizer carries no chat template (e.g. a base model): ChatML.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class OpenAIServingChat(OpenAIServing):
    async def create_chat_completion(
        self, req: ChatCompletionRequest
    ) -> ChatCompletionResponse | AsyncIterator[str]:
        self.check_model(req.model)
        if req.top_logprobs and not req.logprobs:
            raise OpenAIError(
                "`top_logprobs` requires `logprobs` to be true.", param="top_logprobs"
            )
        self.check_capacity(req.n)  # before paying for the template and tokenization
        # Tokenizing a long conversation takes seconds: off the event loop.
        ids = await asyncio.to_thread(self.render, req)
        self.check_token_ids(ids, "messages")
        asked = (
            req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        )
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = self.resolve_max_tokens(len(ids), asked, param)
        # The engine reports the chosen token's logprob plus `top_logprobs` alternatives.
        k = (req.top_logprobs or 0) if req.logprobs else None
        subs = self.make_subrequests([ids], req, max_tokens=[max_tokens], logprobs=k)
        it, first = await self.start(subs)
        if req.stream:
            return self.stream_errors("chatcmpl", self._stream(req, subs, it, first))
        return await self._full(req, subs, it)

    def render(self, req: ChatCompletionRequest) -> list[int]:
        # "developer" is OpenAI's new name for "system"; templates know only the latter.
        msgs = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in req.messages
        ]
        template = None if self.tokenizer.chat_template else CHATML
        try:
            text = self.tokenizer.apply_chat_template(
                msgs, chat_template=template, tokenize=False, add_generation_prompt=True
            )
        except Exception as e:  # jinja raise_exception(), e.g. roles out of order
            msg = getattr(e, "message", None) or str(e)
            raise OpenAIError(f"Cannot apply the chat template: {msg}", param="messages") from e
        return self.encode(text)

    def _logprobs(self, sub: SubRequest, start: int, end: int, k: int) -> ChatLogProbs:
        content = []
        for tid, lp, tops in self.token_logprobs(sub.last, start, end):
            tok = self.decode_token(tid)
            content.append(
                ChatCompletionTokenLogprob(
                    token=tok,
                    logprob=lp,
                    bytes=list(tok.encode()),
                    top_logprobs=[
                        TopLogprob(
                            token=(s := self.decode_token(t)), logprob=v, bytes=list(s.encode())
                        )
                        for t, v in tops[:k]
                    ],
                )
            )
        return ChatLogProbs(content=content)

    async def _full(
        self, req: ChatCompletionRequest, subs: list[SubRequest], it: AsyncIterator[SubRequest]
    ) -> ChatCompletionResponse:
        async with aclosing(it):
            async for _ in it:
                pass
        choices = []
        for s in subs:
            out = s.last
            lps = (
                self._logprobs(s, 0, s.num_tokens, req.top_logprobs or 0) if req.logprobs else None
            )
            choices.append(
                ChatCompletionResponseChoice(
                    index=s.index,
                    message=ChatResponseMessage(content=out.outputs[0].text),
                    logprobs=lps,
                    finish_reason=finish_reason(out),
                    stop_reason=stop_reason(out),
                    token_ids=list(out.outputs[0].token_ids) if req.return_token_ids else None,
                )
            )
        return ChatCompletionResponse(
            id=random_id("chatcmpl"),
            model=self.served_model_name,
            choices=choices,
            usage=make_usage(subs, req.n),
            prompt_token_ids=list(subs[0].prompt_ids) if req.return_token_ids else None,
        )

    async def _stream(
        self,
        req: ChatCompletionRequest,
        subs: list[SubRequest],
        it: AsyncIterator[SubRequest],
        first: SubRequest | None,
    ) -> AsyncIterator[str]:
        rid = random_id("chatcmpl")
        sent_tok = [0] * len(subs)  # tokens whose logprobs were streamed
        sent_ids = [0] * len(subs)  # tokens whose ids were streamed (return_token_ids)
        async with aclosing(it):
            for s in subs:  # OpenAI opens every choice with an empty assistant delta
                yield sse(self._chunk(rid, s.index, DeltaMessage(role="assistant", content="")))
            async for s, delta, fr in text_deltas(first, it, len(subs)):
                i, lps = s.index, None
                if req.logprobs:
                    lps = self._logprobs(s, sent_tok[i], s.num_tokens, req.top_logprobs or 0)
                    sent_tok[i] = s.num_tokens
                sr = stop_reason(s.last) if fr else None
                ids = new_token_ids(s, sent_ids) if req.return_token_ids else None
                yield sse(self._chunk(rid, i, DeltaMessage(content=delta), lps, fr, sr, ids))
        if req.stream_options and req.stream_options.include_usage:
            usage = make_usage(subs, req.n)
            yield sse(
                ChatCompletionStreamResponse(
                    id=rid, model=self.served_model_name, choices=[], usage=usage
                )
            )

    def _chunk(
        self, rid, index, delta, lps=None, fr=None, sr=None, ids=None
    ) -> ChatCompletionStreamResponse:
        return ChatCompletionStreamResponse(
            id=rid,
            model=self.served_model_name,
            choices=[
                ChatCompletionResponseStreamChoice(
                    index=index, delta=delta, logprobs=lps, finish_reason=fr, stop_reason=sr,
                    token_ids=ids,
                )
            ],
        )

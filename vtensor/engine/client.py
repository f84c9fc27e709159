"""EngineClient: everything the server needs from an engine, and nothing else.

`AsyncLLM` implements it; so do the tests' stand-ins (proxies that fail or hold requests). The
server is typed against this Protocol only and reads each member directly: an engine that
lacks one is refused when the app is built (`check_engine_client`), never probed for
alternatives at request time. It lives with the engine because the server depends on the
engine, never the reverse.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from vtensor.engine.outputs import RequestOutput
from vtensor.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@runtime_checkable
class EngineClient(Protocol):
    @property
    def tokenizer(self) -> PreTrainedTokenizerBase | None:
        """The model's tokenizer (None: the model came without one, token-id prompts only)."""
        ...

    @property
    def max_model_len(self) -> int:
        """Longest prompt + output, in tokens, the engine accepts."""
        ...

    @property
    def vocab_size(self) -> int:
        """Token ids are in [0, vocab_size)."""
        ...

    @property
    def kv_token_capacity(self) -> int:
        """Most tokens one request's KV can hold with the engine to itself (<= max_model_len);
        a request longer than this can never run (KVManager.token_capacity)."""
        ...

    @property
    def dead(self) -> BaseException | None:
        """The error that stopped the engine (a device error: restart), None while it runs."""
        ...

    def generate(
        self, prompt: str | list[int], params: SamplingParams | None, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """One request's outputs until it finishes. Raises EngineDeadError, RequestFailedError
        (the engine failed this request alone), ValueError / TypeError (invalid input).
        Closing the iterator early aborts the request."""
        ...

    async def abort(self, request_id: str) -> None:
        """Stop the request and free its KV now (no-op when it already finished)."""
        ...

    def stats(self) -> dict:
        """running / waiting counts and the KV snapshot under "kv" (for /metrics)."""
        ...


def check_engine_client(engine: object) -> EngineClient:
    """engine, once it has every EngineClient member; else a TypeError naming the missing
    ones (isinstance on a runtime_checkable Protocol checks names, not signatures)."""
    if isinstance(engine, EngineClient):
        return engine
    members = sorted(name for name in vars(EngineClient) if not name.startswith("_"))
    missing = [name for name in members if not hasattr(engine, name)]
    raise TypeError(
        f"{type(engine).__name__} is not an EngineClient: it lacks {', '.join(missing)}"
    )

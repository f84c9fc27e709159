"""Overlapped scheduling: the GPU runs step N while the CPU schedules and launches N+1.

    step():  schedule N+1 -> launch N+1 (inputs; its decode tokens are N's samples, gathered on
             the device) -> wait for N's sampled ids (pinned copy + event) -> stops, detok,
             outputs of N

A sampled token is known on the host one step late, so a request carries a PLACEHOLDER at the
end of `token_ids` until its step is processed (at most two: N and N+1). The scheduler never
needs the value: a decode computes "the last token", whose id the runner takes from the previous
step's device tensor (`TokenFill`). A request that will stop on length is finished at launch (no
wasted step); one that stops on EOS or a stop string is found when its step is processed, and
the one extra token it was scheduled for is dropped. Its KV pages are released while the GPU may
still write them: releases unmap behind CUDA events, and slots are reused in stream order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtensor.engine.sampler import SamplerOutput
from vtensor.engine.sequence import Sequence
from vtensor.engine.transfer import to_device

PLACEHOLDER = -1  # a sampled token whose id is still on its way to the host


@dataclass(slots=True)
class TokenFill:
    """Input tokens to take from the previous step's sampled ids, on the device: the last
    input token of batch row seqs[i] is src[src_rows[i]]."""

    src: torch.Tensor  # [m] int64, the previous step's sampled ids (device)
    seqs: list[int]  # batch indices (the runner knows where their last token sits)
    src_rows: list[int]

    def apply(self, input_ids: torch.Tensor, dst: list[int]) -> None:
        """input_ids: the step's flattened ids on the device (any int dtype; written in place);
        dst[i]: the position of seqs[i]'s last token there."""
        if not dst:
            return
        dev = input_ids.device
        rows = to_device(self.src_rows, torch.long, dev)
        input_ids[to_device(dst, torch.long, dev)] = self.src.index_select(0, rows).to(
            input_ids.dtype
        )


@dataclass(slots=True)
class InFlight:
    """One launched step: its sampled ids travel to pinned host memory behind an event."""

    seqs: list[Sequence]  # the sampled requests, row order
    index: list[int]  # where each one's PLACEHOLDER sits in its token_ids
    out: SamplerOutput  # device tensors (kept alive: the next step gathers from token_ids)
    host: list[torch.Tensor]  # pinned copies: ids, then logprobs / top logprobs / top ids
    event: torch.cuda.Event | None

    @classmethod
    def launch(cls, seqs: list[Sequence], index: list[int], out: SamplerOutput) -> InFlight:
        tensors = [out.token_ids]
        if out.logprobs is not None:
            tensors.append(out.logprobs)
            if out.top_ids is not None:
                tensors += [out.top_logprobs, out.top_ids]
        cuda = out.token_ids.is_cuda
        host, event = tensors, None
        if cuda:
            host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
            for h, t in zip(host, tensors, strict=True):
                h.copy_(t, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        return cls(seqs, index, out, host, event)

    def wait(self) -> list[list]:
        """Block until the ids are on the host; returns them (and logprobs) as lists."""
        if self.event is not None:
            self.event.synchronize()
        return [h.tolist() for h in self.host]

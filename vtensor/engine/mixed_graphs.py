"""CUDA graphs for small prefill steps (prompt chunks with decodes mixed in), one per padded
token count T.

Why: online, every arriving request costs one such step for everyone decoding, and run eagerly
it is host-bound: ~20-50 ms of Python and kernel launches for a 150-token prompt with 16
decodes, on a GPU done in a few (H200, bench/results/2026-11-30f/mixed_host).

How: everything a step's kernels read becomes data of a fixed shape for T, so one graph per T
serves every such step. D = S = min(T, max_num_seqs) rows: decode rows first (the real d, then
rows with seq_len 0, which the decode kernel skips), then S prompt sequences (the real ones,
then empty ones: cu_seqlens repeats, no query tiles); token rows past the real ones are pad
rows aimed at the pad slot. The Triton backend already sizes its grids from these static
bounds (the prefill tile list is built on the device; the decode grid from max_seq_len).
Logits stay outside the graph (their row count varies).

On by default for steps of <= 2048 tokens (EngineArgs.mixed_graph_tokens), with backends whose
kernels take static shapes (AttentionBackend.static_shapes: our Triton kernels).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from vtensor.engine.shapes import padded_size, step_sizes
from vtensor.model import AttentionMetadata

log = logging.getLogger(__name__)

_SEGMENTS = ("ids", "pos", "store_a", "store_b", "prefix", "cu", "lens", "index")


def layout(t: int, rows: int, width: int) -> tuple[dict[str, tuple[int, int]], int]:
    """Offsets and sizes of one step's int32 inputs for T = t token rows and `rows` decode /
    sequence rows each (D = S = rows), each 16-byte aligned as separate tensors would be."""
    sizes = {"ids": t, "pos": t, "store_a": t, "store_b": t, "prefix": 2 * rows,
             "cu": 2 * rows + 1, "lens": rows, "index": 2 * rows * width}  # fmt: skip
    segs, off = {}, 0
    for name in _SEGMENTS:
        segs[name] = (off, sizes[name])
        off += sizes[name]
        off += -off % 4
    return segs, off


def carve(buf: torch.Tensor, t: int, rows: int, width: int) -> dict[str, torch.Tensor]:
    """`buf`'s views for T's layout: one per input, the index [2 * rows, width]."""
    segs, _ = layout(t, rows, width)
    views = {name: buf[a : a + k] for name, (a, k) in segs.items()}
    views["index"] = views["index"].view(2 * rows, width)
    return views


class MixedGraphs:
    """The static inputs, metadata and graphs of small prefill steps; `run` is the runner's
    prefill step for any step of <= max_tokens rows."""

    def __init__(
        self,
        run_model: Callable[[AttentionMetadata, torch.Tensor, torch.Tensor], torch.Tensor],
        kv_views: list,
        pad_store: tuple[int, int],
        pad_index: torch.Tensor,
        *,
        max_tokens: int,
        max_num_seqs: int,
        max_model_len: int,
        hidden_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self._run_model = run_model
        self.kv_views = kv_views
        self.pad_store = pad_store
        self.pad_index = pad_index.to(torch.int32).reshape(-1)
        self.width = self.pad_index.numel()
        self.sizes = step_sizes(max_tokens)
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.device = device
        big = self.sizes[-1]
        _, n = layout(big, self._rows(big), self.width)
        self._static = torch.zeros(n, dtype=torch.int32, device=device)
        self._hidden = torch.zeros(big, hidden_size, dtype=dtype, device=device)
        self.graphs: dict[int, Any] = {}
        self.capture_s = 0.0
        self.steps = 0  # prefill steps run in static shapes (replayed or eager)
        self.replays = 0  # of which replayed from a graph

    def _rows(self, t: int) -> int:
        return min(t, self.max_num_seqs)

    def covers(self, n_tokens: int) -> bool:
        return n_tokens <= self.sizes[-1]

    def host_inputs(
        self, t: int, ids: list[int], pos: list[int], store_a: list[int], store_b: list[int],
        starts: list[int], cu: list[int], dec_lens: list[int], index: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        """The step's inputs (decode rows first, as the runner orders them) in T's layout."""
        rows, w = self._rows(t), self.width
        _, size = layout(t, rows, w)
        flat = torch.zeros(size, dtype=torch.int32, pin_memory=self.device.type == "cuda")
        v = carve(flat, t, rows, w)
        n, d, b = len(ids), len(dec_lens), len(starts)
        p = b - d
        v["ids"][:n] = torch.tensor(ids, dtype=torch.int32)
        v["pos"][:n] = torch.tensor(pos, dtype=torch.int32)
        sa, sb = v["store_a"], v["store_b"]
        sa[:n], sa[n:] = torch.tensor(store_a, dtype=torch.int32), self.pad_store[0]
        sb[:n], sb[n:] = torch.tensor(store_b, dtype=torch.int32), self.pad_store[1]
        pre = v["prefix"]
        pre[:d] = torch.tensor(starts[:d], dtype=torch.int32)
        pre[rows : rows + p] = torch.tensor(starts[d:], dtype=torch.int32)
        c = v["cu"]  # decode rows [0, D), then S sequences; empty ones repeat the offset
        c[: d + 1] = torch.arange(d + 1, dtype=torch.int32)
        c[d + 1 : rows + 1] = d
        c[rows : rows + p + 1] = torch.tensor(cu[d:], dtype=torch.int32)
        c[rows + p + 1 :] = cu[-1]
        v["lens"][:d] = torch.tensor(dec_lens, dtype=torch.int32)
        idx = v["index"]
        idx[:] = self.pad_index
        index = torch.as_tensor(index, dtype=torch.int32).reshape(b, w)
        idx[:d] = index[:d]
        idx[rows : rows + p] = index[d:]
        return flat

    def _meta(self, t: int) -> tuple[AttentionMetadata, torch.Tensor, torch.Tensor]:
        rows = self._rows(t)
        v = carve(self._static, t, rows, self.width)
        meta = AttentionMetadata(
            is_prefill=True, kv_views=self.kv_views, store_a=v["store_a"],
            store_b=v["store_b"], kv_index=v["index"], prefix_lens=v["prefix"],
            cu_seqlens_q=v["cu"], max_seqlen_q=t, max_seqlen_k=self.max_model_len,
            seq_lens=v["lens"], max_seq_len=self.max_model_len, num_decodes=rows,
        )  # fmt: skip
        return meta, v["ids"], v["pos"]

    def size_for(self, n_tokens: int) -> int:
        """T: the padded token count (and graph) of a step of n_tokens rows."""
        return padded_size(self.sizes, n_tokens)

    def run(self, t: int, flat: torch.Tensor, fill: Callable[[torch.Tensor], None] | None
            ) -> torch.Tensor:  # fmt: skip
        """hidden [T, H] of the step whose inputs `host_inputs` laid out for T; `fill` writes
        the in-flight step's sampled ids into the ids rows on the device."""
        self.steps += 1
        self._static[: flat.numel()].copy_(flat, non_blocking=True)
        meta, ids, pos = self._meta(t)
        if fill is not None:
            fill(ids)
        g = self.graphs.get(t)
        if g is not None:
            g.replay()
            self.replays += 1
        else:  # not captured (the CPU tests): the same static-shape step, eagerly
            self._hidden[:t] = self._run_model(meta, ids, pos)
        return self._hidden[:t]

    def capture(self) -> None:
        """One graph per size, largest first (the others reuse its memory pool)."""
        t0 = time.perf_counter()
        pool = None
        for t in reversed(self.sizes):
            empty = self.host_inputs(t, [], [], [], [], [], [0], [],
                                     torch.zeros(0, self.width, dtype=torch.int32))  # fmt: skip
            self._static[: empty.numel()].copy_(empty)
            meta, ids, pos = self._meta(t)
            self._hidden[:t] = self._run_model(meta, ids, pos)  # warm-up outside the capture
            torch.cuda.synchronize(self.device)
            # fresh metadata: what the backend derives from it (the prefill tile list) must be
            # computed inside the graph, from each replay's inputs, not kept from the warm-up
            meta, ids, pos = self._meta(t)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool, capture_error_mode="thread_local"):
                self._hidden[:t] = self._run_model(meta, ids, pos)
            pool = g.pool()
            self.graphs[t] = g
        torch.cuda.synchronize(self.device)
        self.capture_s = time.perf_counter() - t0
        log.info("captured %d prefill-step CUDA graphs (<= %d tokens) in %.1f s",
                 len(self.graphs), self.sizes[-1], self.capture_s)  # fmt: skip

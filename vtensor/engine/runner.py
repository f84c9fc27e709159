"""ModelRunner: scheduled batch -> input tensors + AttentionContext -> model -> logits.

Tokens of the whole batch are flattened (no padding). Prefill steps (any request computing
more than its one new token, e.g. prompt chunks mixed with decodes) run the prefill kernels;
pure decode steps run the decode kernels, on CUDA through a CUDA graph captured per batch-size
bucket. Graphs stay valid while KV pages come and go because the KV base address never moves
(virtual) or the block pool is static (paged); padded rows of a bucket write to a private pad
slot so they can never touch a live request's KV. Inputs travel as one pinned host buffer and
one non-blocking copy: the decode path has no host sync (the engine's one sync per step is the
transfer of the sampled ids).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from vtensor.engine.scheduler import ScheduledBatch
from vtensor.model import AttentionContext, set_context

log = logging.getLogger(__name__)

# decode input rows of the static buffer: one int32 [6, max_bs] copy per step
_IDS, _POS, _STORE_SLOT, _STORE_POS, _SLOT, _SEQ_LEN = range(6)


def graph_buckets(max_bs: int) -> list[int]:
    """Batch sizes with a captured decode graph: 1, 2, 4, 8, then every 16, then max_bs."""
    sizes = {1, 2, 4, 8, *range(16, max_bs + 1, 16), max_bs}
    return sorted(b for b in sizes if b <= max_bs)


class ModelRunner:
    def __init__(
        self,
        model: Any,
        kv_cache: Any,
        *,
        paged: bool,
        device: torch.device,
        max_num_seqs: int,
        max_model_len: int,
        backend: str = "auto",
        use_cuda_graphs: bool = True,
    ) -> None:
        self.model = model
        self.kv = kv_cache
        self.paged = paged
        self.device = device
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.backend = backend
        self.block_size = getattr(kv_cache, "block_size", 0)
        self.is_cuda = device.type == "cuda"
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, int]] = {}
        self.pad_slot: int | None = None
        self.capture_s = 0.0
        # Workaround: vtensor.ops.reference.decode_attention_torch gathers k_cache[slot, :n]
        # with n = the batch's longest sequence, which reads unmapped pages of shorter
        # sequences (SIGSEGV on the host backend). Its prefill path gathers exactly each
        # request's tokens, and a decode is a prefill of one token, so the CPU path uses it.
        self.decode_as_prefill = not paged and device.type == "cpu" and backend in ("torch", "auto")
        if self.is_cuda and use_cuda_graphs:
            try:
                self._capture()
            except Exception as e:  # a kernel that cannot be captured: run decode eagerly
                log.warning("CUDA graph capture failed (%s: %s); decode runs eagerly",
                            type(e).__name__, e)  # fmt: skip
                self.graphs = {}

    # ------------------------------------------------------------------ helpers

    def _to_dev(self, x: list[int] | torch.Tensor, dtype=torch.int32) -> torch.Tensor:
        t = x if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=dtype)
        if not self.is_cuda:
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    def _store_slots_paged(self, slot: int, start: int, n: int) -> list[int]:
        blocks, bs = self.kv.blocks(slot), self.block_size
        return [blocks[p // bs] * bs + p % bs for p in range(start, start + n)]

    # ------------------------------------------------------------------ execute

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[int]]:
        """Run one step. Returns (logits [m, V] fp32, batch indices of those m rows): the
        requests whose last token was computed this step (decodes and finished prefills)."""
        if not batch.is_prefill and not self.decode_as_prefill:
            return self._decode(batch), list(range(len(batch)))
        return self._prefill(batch)

    def _prefill(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[int]]:
        ids: list[int] = []
        pos: list[int] = []
        store: list[int] = []
        cu = [0]
        sample_rows: list[int] = []
        logits_idx: list[int] = []
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new, strict=True)):
            c = seq.num_computed
            ids += seq.token_ids[c : c + n]
            pos += range(c, c + n)
            if self.paged:
                store += self._store_slots_paged(seq.slot, c, n)
            else:
                store += [seq.slot] * n
            cu.append(cu[-1] + n)
            if c + n == seq.num_tokens:
                sample_rows.append(i)
                logits_idx.append(cu[-1] - 1)
        slots = [s.slot for s in batch.seqs]
        max_k = max(s.num_computed + n for s, n in zip(batch.seqs, batch.num_new, strict=True))
        pos_t = self._to_dev(pos)
        ctx = AttentionContext(
            is_prefill=True,
            kv_views=self.kv.kv_views,
            store_slots=self._to_dev(store),
            store_positions=None if self.paged else pos_t,
            slot_ids=None if self.paged else self._to_dev(slots),
            block_table=self.kv.block_table(slots) if self.paged else None,
            prefix_lens=self._to_dev([s.num_computed for s in batch.seqs]),
            cu_seqlens_q=self._to_dev(cu),
            max_seqlen_q=max(batch.num_new),
            max_seqlen_k=max_k,
            paged=self.paged,
            backend=self.backend,
        )
        input_ids = self._to_dev(ids)
        with set_context(ctx):
            hidden = self.model(input_ids, pos_t)
        if not logits_idx:
            return hidden.new_empty((0, 0), dtype=torch.float32), []
        rows = self._to_dev(logits_idx, torch.long)
        return self.model.compute_logits(hidden.index_select(0, rows)), sample_rows

    def _decode_inputs(self, batch: ScheduledBatch, width: int) -> torch.Tensor:
        """int32 [6, width] host tensor: real rows, then pad rows aimed at the pad slot."""
        b = len(batch)
        buf = torch.empty((6, width), dtype=torch.int32, pin_memory=self.is_cuda)
        ids, pos, store, slots, lens = [], [], [], [], []
        for seq in batch.seqs:
            c = seq.num_computed
            ids.append(seq.token_ids[c])
            pos.append(c)
            store.append(self._store_slots_paged(seq.slot, c, 1)[0] if self.paged else seq.slot)
            slots.append(seq.slot)
            lens.append(c + 1)
        buf[_IDS, :b] = torch.tensor(ids, dtype=torch.int32)
        buf[_POS, :b] = torch.tensor(pos, dtype=torch.int32)
        buf[_STORE_SLOT, :b] = torch.tensor(store, dtype=torch.int32)
        buf[_STORE_POS, :b] = buf[_POS, :b]
        buf[_SLOT, :b] = torch.tensor(slots, dtype=torch.int32)
        buf[_SEQ_LEN, :b] = torch.tensor(lens, dtype=torch.int32)
        if width > b:
            buf[:, b:] = self._pad_col[:, None]
        return buf

    def _decode(self, batch: ScheduledBatch) -> torch.Tensor:
        b = len(batch)
        bucket = next((k for k in self._bucket_list if k >= b), None) if self.graphs else None
        if bucket is None:
            return self._decode_eager(batch)
        graph, _ = self.graphs[bucket]
        buf = self._decode_inputs(batch, bucket)
        self._static[:, :bucket].copy_(buf, non_blocking=True)
        if self.paged:
            slots = [s.slot for s in batch.seqs] + [self.pad_slot] * (bucket - b)
            self._static_bt[:bucket].copy_(self.kv.block_table(slots), non_blocking=True)
        graph.replay()
        return self.model.compute_logits(self._static_hidden[:b])

    def _decode_eager(self, batch: ScheduledBatch) -> torch.Tensor:
        b = len(batch)
        buf = self._decode_inputs(batch, b)
        d = buf.to(self.device, non_blocking=True) if self.is_cuda else buf
        slots = [s.slot for s in batch.seqs]
        ctx = self._decode_ctx(d, self.kv.block_table(slots) if self.paged else None)
        with set_context(ctx):
            hidden = self.model(d[_IDS], d[_POS])
        return self.model.compute_logits(hidden)

    def _decode_ctx(self, d: torch.Tensor, block_table: torch.Tensor | None) -> AttentionContext:
        return AttentionContext(
            is_prefill=False,
            kv_views=self.kv.kv_views,
            store_slots=d[_STORE_SLOT],
            store_positions=None if self.paged else d[_STORE_POS],
            slot_ids=None if self.paged else d[_SLOT],
            block_table=block_table,
            seq_lens=d[_SEQ_LEN],
            max_seq_len=self.max_model_len,  # static: graphs captured once stay valid
            paged=self.paged,
            backend=self.backend,
        )

    # ------------------------------------------------------------------ CUDA graphs

    def _capture(self) -> None:
        import time

        t0 = time.perf_counter()
        # A private slot with one token of KV: padded rows write and read only there.
        alloc = self.kv.acquire("__vtensor_pad__", [0])
        if alloc is None or not self.kv.ensure(alloc.slot, 1):
            raise RuntimeError("no KV room for the CUDA-graph pad slot")
        self.kv.wait_ready()
        self.pad_slot = alloc.slot
        pad_store = self._store_slots_paged(alloc.slot, 0, 1)[0] if self.paged else alloc.slot
        self._pad_col = torch.tensor([0, 0, pad_store, 0, alloc.slot, 1], dtype=torch.int32)
        max_bs = self.max_num_seqs
        self._bucket_list = graph_buckets(max_bs)
        dev = self.device
        self._static = self._pad_col[:, None].repeat(1, max_bs).to(dev)
        hidden_size = self.model.config.hidden_size
        self._static_hidden = torch.zeros(max_bs, hidden_size, dtype=self.model.dtype, device=dev)
        self._static_bt = None
        if self.paged:
            self._static_bt = self.kv.block_table([alloc.slot] * max_bs).clone()
        pool = None
        with torch.inference_mode():
            for bs in reversed(self._bucket_list):  # largest first: the others reuse its pool
                d = self._static[:, :bs]
                ctx = self._decode_ctx(d, self._static_bt[:bs] if self.paged else None)
                with set_context(ctx):  # warm-up (autotuning, lazy init) outside the capture
                    self._static_hidden[:bs] = self.model(d[_IDS], d[_POS])
                torch.cuda.synchronize(dev)
                g = torch.cuda.CUDAGraph()
                # thread_local: the KV mapper thread's driver calls must not void the capture
                with (
                    torch.cuda.graph(g, pool=pool, capture_error_mode="thread_local"),
                    set_context(ctx),
                ):
                    self._static_hidden[:bs] = self.model(d[_IDS], d[_POS])
                pool = g.pool()
                self.graphs[bs] = (g, bs)
        torch.cuda.synchronize(dev)
        self.capture_s = time.perf_counter() - t0
        log.info("captured %d decode CUDA graphs in %.1f s", len(self.graphs), self.capture_s)

    def close(self) -> None:
        self.graphs = {}
        if self.pad_slot is not None:
            self.kv.free(self.pad_slot)
            self.pad_slot = None

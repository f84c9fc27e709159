"""ModelRunner: scheduled batch -> input tensors + attention metadata -> model -> logits.

Tokens of the whole batch are flattened. On CUDA a step's token rows and logits rows are padded
up to one of a fixed set of sizes (`engine/shapes.py`: cuBLAS waits for the GPU at every GEMM
shape it has not seen); pad rows aim at a private pad slot and attention ignores them. Prefill
steps (any request computing more than its one new token, e.g. prompt chunks mixed with
decodes) and pure decode steps differ only in the metadata they build; on CUDA a decode step
replays a CUDA graph captured per batch-size bucket. Graphs stay valid while KV pages come and
go because the KV base address never moves (virtual) or the block pool is static (paged);
padded rows of a bucket write to the pad slot so they can never touch a live request's KV. The
runner never looks at the layout: the KV manager gives the integers (`store_targets`,
`kv_index`), the attention backend (chosen once) reads them. Decode inputs travel as one
pinned host buffer and one non-blocking copy: no host sync (the engine's one sync per step is
the sampled ids).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from vtensor.engine.mixed_graphs import MixedGraphs
from vtensor.engine.scheduler import ScheduledBatch
from vtensor.engine.shapes import padded_size, step_sizes, warm_gemms
from vtensor.engine.transfer import to_device
from vtensor.kv import KVManager
from vtensor.model import AttentionContext, AttentionMetadata, CausalLM, set_context
from vtensor.ops import AttentionBackend

if TYPE_CHECKING:
    from vtensor.engine.inflight import TokenFill

log = logging.getLogger(__name__)

# decode inputs, one int32 buffer per step: rows [_ROWS, width], then kv_index [width, w]
_IDS, _POS, _STORE_A, _STORE_B, _SEQ_LEN = range(5)
_ROWS = 5


def graph_buckets(max_bs: int) -> list[int]:
    """Batch sizes with a captured decode graph (vLLM's sizes): 1, 2, 4, every 8 to 256, then
    every 16, and max_bs (83 graphs for 1024). A batch runs in the next size up: padding rows
    cost GEMM time once batches are compute-bound, so the steps stay fine (<= 6% padding)."""
    sizes = {1, 2, 4, *range(8, 257, 8), *range(272, max_bs + 1, 16), max_bs}
    return sorted(b for b in sizes if b <= max_bs)


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        kv: KVManager,
        backend: AttentionBackend,
        *,
        device: torch.device,
        max_num_seqs: int,
        max_model_len: int,
        max_num_batched_tokens: int | None = None,
        use_cuda_graphs: bool = True,
        mixed_graph_tokens: int = 0,
    ) -> None:
        self.model = model
        self.kv = kv
        self.backend = backend
        self.device = device
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.is_cuda = device.type == "cuda"
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pad_slot: int | None = None
        self.capture_s = 0.0
        # batch sizes with a decode graph; also the padded logits sizes (shapes.py)
        self.buckets = graph_buckets(max_num_seqs)
        # padded sizes of a step's token rows / logits rows (None: exact sizes)
        self.token_sizes: list[int] | None = None
        self.logit_sizes: list[int] | None = None
        if self.is_cuda:  # (the CPU has no such cost: exact shapes)
            try:
                self.pad_step_shapes(max_num_batched_tokens or max_model_len)
            except RuntimeError as e:
                log.warning("step shapes not padded: %s", e)
        self.mixed: MixedGraphs | None = None  # static-shape prefill steps (mixed_graphs.py)
        if self.is_cuda and use_cuda_graphs:
            try:
                self._capture()
            except Exception as e:  # a kernel that cannot be captured: run decode eagerly
                log.warning("CUDA graph capture failed (%s: %s); decode runs eagerly",
                            type(e).__name__, e)  # fmt: skip
                self.graphs = {}
            if mixed_graph_tokens and self.graphs and backend.static_shapes:
                try:
                    self.static_prefill(mixed_graph_tokens).capture()
                except Exception as e:  # noqa: BLE001 - prefill steps then run eagerly
                    log.warning("prefill-step graph capture failed (%s: %s); eager instead",
                                type(e).__name__, e)  # fmt: skip
                    self.mixed = None

    def static_prefill(self, max_tokens: int) -> MixedGraphs:
        """Run prefill steps of <= max_tokens rows in static shapes (mixed_graphs.py): replayed
        from graphs once captured, else eagerly (what the CPU tests compare)."""
        self._acquire_pad_slot()
        cfg = self.model.config
        self.mixed = MixedGraphs(
            self._run, self.kv.kv_views, self._pad_store, self._pad_index,
            max_tokens=max_tokens, max_num_seqs=self.max_num_seqs,
            max_model_len=self.max_model_len, hidden_size=cfg.hidden_size,
            dtype=self.model.dtype, device=self.device,
        )  # fmt: skip
        return self.mixed

    # ------------------------------------------------------------------ helpers

    def _run(self, meta: AttentionMetadata, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        with set_context(AttentionContext(self.backend, meta)):
            return self.model(ids, pos)

    # ------------------------------------------------------------------ execute

    @torch.inference_mode()
    def execute(
        self, batch: ScheduledBatch, fill: TokenFill | None = None
    ) -> tuple[torch.Tensor, list[int]]:
        """Run one step. Returns (logits [m, V] fp32, batch indices of those m rows): the
        requests whose last token was computed this step (decodes and finished prefills).
        `fill`: input tokens still on the device (the previous step's samples)."""
        if not batch.is_prefill:
            return self._decode(batch, fill), list(range(len(batch)))
        return self._prefill(batch, fill)

    def _prefill(
        self, batch: ScheduledBatch, fill: TokenFill | None
    ) -> tuple[torch.Tensor, list[int]]:
        # one-token rows (decodes mixed in with prompt chunks) first: the backend may run
        # rows [0, num_decodes) as decodes; logits rows keep the batch's order
        order = [i for i, n in enumerate(batch.num_new) if n == 1]
        num_decodes = len(order)
        order += [i for i, n in enumerate(batch.num_new) if n != 1]
        seqs = [batch.seqs[i] for i in order]
        num_new = [batch.num_new[i] for i in order]
        ids: list[int] = []
        pos: list[int] = []
        cu = [0]
        last = [0] * len(batch)  # batch index -> row of its last token
        for i, seq, n in zip(order, seqs, num_new, strict=True):
            c = seq.num_computed
            ids += seq.token_ids[c : c + n]
            pos += range(c, c + n)
            cu.append(cu[-1] + n)
            last[i] = cu[-1] - 1
        sample_rows = [i for i, (s, n) in enumerate(zip(batch.seqs, batch.num_new, strict=True))
                       if s.num_computed + n == s.num_tokens]  # fmt: skip
        slots = [s.slot for s in seqs]
        starts = [s.num_computed for s in seqs]
        store_a, store_b = self.kv.store_targets(slots, starts, num_new)
        dec_lens = [c + 1 for c in starts[:num_decodes]]
        rows = [last[i] for i in sample_rows]
        fill_dst = [last[i] for i in fill.seqs] if fill is not None else []
        if self.mixed is not None and self.mixed.covers(len(ids)):
            t = self.mixed.size_for(len(ids))
            flat = self.mixed.host_inputs(t, ids, pos, store_a, store_b, starts, cu, dec_lens,
                                          self.kv.kv_index(slots))  # fmt: skip
            put = None if fill is None else (lambda ids_t: fill.apply(ids_t, fill_dst))
            hidden = self.mixed.run(t, flat, put)
            rows_t = to_device(self._pad_rows(rows), torch.int32, self.device)
            return self._logits(hidden, rows_t, sample_rows)
        if self.token_sizes is not None:  # pad rows: token 0 at position 0 into the pad slot
            pad = padded_size(self.token_sizes, len(ids)) - len(ids)
            pad_a, pad_b = self._pad_store
            ids, pos = ids + [0] * pad, pos + [0] * pad
            store_a, store_b = store_a + [pad_a] * pad, store_b + [pad_b] * pad
        ids_t, pos_t, a_t, b_t, pre_t, cu_t, lens_t, rows_t, index_t = self._upload(
            [ids, pos, store_a, store_b, starts, cu, dec_lens, self._pad_rows(rows)],
            self.kv.kv_index(slots),
        )
        meta = AttentionMetadata(
            is_prefill=True,
            kv_views=self.kv.kv_views,
            store_a=a_t,
            store_b=b_t,
            kv_index=index_t,
            prefix_lens=pre_t,
            cu_seqlens_q=cu_t,
            max_seqlen_q=max(num_new),
            max_seqlen_k=max(c + n for c, n in zip(starts, num_new, strict=True)),
            seq_lens=lens_t if dec_lens else None,
            # the graphs' static bound: the decode launch variants captured at startup
            max_seq_len=self.max_model_len,
            num_decodes=num_decodes,
        )
        if fill is not None:
            fill.apply(ids_t, fill_dst)
        return self._logits(self._run(meta, ids_t, pos_t), rows_t, sample_rows)

    def _pad_rows(self, rows: list[int]) -> list[int]:
        """Logits rows padded to a logits size (engine/shapes.py) by repeating the first."""
        if self.logit_sizes is None or not rows:
            return rows
        return rows + rows[:1] * (padded_size(self.logit_sizes, len(rows)) - len(rows))

    def _logits(self, hidden: torch.Tensor, rows_t: torch.Tensor, sample_rows: list[int]
                ) -> tuple[torch.Tensor, list[int]]:  # fmt: skip
        """Logits of the sampled rows (`rows_t`: their token rows, padded) in batch order."""
        if not sample_rows:
            return hidden.new_empty((0, 0), dtype=torch.float32), []
        logits = self.model.compute_logits(hidden.index_select(0, rows_t))
        return logits[: len(sample_rows)], sample_rows

    def _upload(
        self, lists: list[list[int]], table: list[list[int]] | torch.Tensor
    ) -> list[torch.Tensor]:
        """int32 lists and one [b, w] table -> device tensors, views of one buffer that travels
        in one pinned non-blocking copy (as the decode inputs do): no sync, one host alloc.
        Each view starts 16-byte aligned, as a tensor of its own would (Triton specializes its
        kernels on pointer alignment: an odd offset would compile another variant)."""
        table_t = torch.as_tensor(table, dtype=torch.int32)
        flat: list[int] = []
        starts = []
        for xs in lists:
            starts.append(len(flat))
            flat += xs
            flat += [0] * (-len(flat) % 4)
        flat_t = torch.cat([torch.tensor(flat, dtype=torch.int32), table_t.reshape(-1)])
        dev = to_device(flat_t, torch.int32, self.device)
        out = [dev[a : a + len(xs)] for a, xs in zip(starts, lists, strict=True)]
        return [*out, dev[len(flat) :].view(table_t.shape)]

    def _split(self, flat: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A decode buffer of `width` rows -> (rows [_ROWS, width], kv_index [width, w])."""
        w = self.kv.kv_index_width
        head = flat[: _ROWS * width].view(_ROWS, width)
        return head, flat[_ROWS * width : (_ROWS + w) * width].view(width, w)

    def _decode_inputs(self, batch: ScheduledBatch, width: int) -> torch.Tensor:
        """int32 host buffer for `width` rows: real rows, then pad rows aimed at the pad slot."""
        b = len(batch)
        flat = torch.empty((_ROWS + self.kv.kv_index_width) * width, dtype=torch.int32,
                           pin_memory=self.is_cuda)  # fmt: skip
        head, index = self._split(flat, width)
        slots = [s.slot for s in batch.seqs]
        pos = [s.num_computed for s in batch.seqs]
        ids = [s.token_ids[c] for s, c in zip(batch.seqs, pos, strict=True)]
        store_a, store_b = self.kv.store_targets(slots, pos, [1] * b)
        lens = [c + 1 for c in pos]
        head[:, :b] = torch.tensor([ids, pos, store_a, store_b, lens], dtype=torch.int32)
        index[:b] = self.kv.kv_index(slots)
        if width > b:
            head[:, b:] = self._pad_head[:, None]
            index[b:] = self._pad_index
        return flat

    def _decode_meta(self, head: torch.Tensor, index: torch.Tensor) -> AttentionMetadata:
        return AttentionMetadata(
            is_prefill=False,
            kv_views=self.kv.kv_views,
            store_a=head[_STORE_A],
            store_b=head[_STORE_B],
            kv_index=index,
            seq_lens=head[_SEQ_LEN],
            max_seq_len=self.max_model_len,  # static: graphs captured once stay valid
        )

    def _decode(self, batch: ScheduledBatch, fill: TokenFill | None) -> torch.Tensor:
        b = len(batch)
        bucket = padded_size(self.buckets, b)
        if bucket not in self.graphs:  # eager, pad rows up to the bucket when padding (shapes.py)
            width = b if self.logit_sizes is None else bucket
            flat = self._decode_inputs(batch, width)
            head, index = self._split(flat.to(self.device, non_blocking=True), width)
            if fill is not None:
                fill.apply(head[_IDS], fill.seqs)  # one row per request
            hidden = self._run(self._decode_meta(head, index), head[_IDS], head[_POS])
            return self.model.compute_logits(hidden)[:b]
        flat = self._decode_inputs(batch, bucket)
        self._static[: flat.numel()].copy_(flat, non_blocking=True)
        if fill is not None:
            fill.apply(self._split(self._static, bucket)[0][_IDS], fill.seqs)
        self.graphs[bucket].replay()
        # the logits GEMM at the bucket's size too: one shape per bucket (engine/shapes.py)
        return self.model.compute_logits(self._static_hidden[:bucket])[:b]

    # ------------------------------------------------------------------ CUDA graphs

    def _acquire_pad_slot(self) -> None:
        """A private slot with one token of KV: pad rows write and read only there."""
        if self.pad_slot is not None:
            return
        alloc = self.kv.acquire("__vtensor_pad__", [0])
        if alloc is None or not self.kv.ensure(alloc.slot, 1):
            raise RuntimeError("no KV room for the pad slot")
        self.kv.apply(self.kv.take_plan())
        self.kv.wait_ready()
        self.pad_slot = s = alloc.slot
        (a,), (b,) = self.kv.store_targets([s], [0], [1])
        self._pad_store = (a, b)
        self._pad_head = torch.tensor([0, 0, a, b, 1], dtype=torch.int32)
        self._pad_index = self.kv.kv_index([s])[0]

    def pad_step_shapes(self, max_tokens: int) -> None:
        """From now on pad each step's token rows to `step_sizes(max_tokens)` and its logits
        rows to the decode buckets (engine/shapes.py)."""
        self._acquire_pad_slot()
        self.token_sizes = step_sizes(max_tokens)
        self.logit_sizes = self.buckets

    def warm_gemms(self) -> int:
        """Run every GEMM shape padded steps can meet (engine/shapes.py); returns the count."""
        if self.token_sizes is None or self.logit_sizes is None:
            return 0
        n = warm_gemms(self.model, self.token_sizes, self.logit_sizes, self.device)
        torch.cuda.empty_cache()  # its inputs and outputs: no reason to keep them reserved
        return n

    def _capture(self) -> None:
        t0 = time.perf_counter()
        self._acquire_pad_slot()
        max_bs = self.max_num_seqs
        dev = self.device
        pad = ScheduledBatch()  # no real rows: every row is a pad row
        self._static = self._decode_inputs(pad, max_bs).to(dev)  # sized for the largest
        hidden_size = self.model.config.hidden_size
        self._static_hidden = torch.zeros(max_bs, hidden_size, dtype=self.model.dtype, device=dev)
        pool = None
        with torch.inference_mode():
            for bs in reversed(self.buckets):  # largest first: the others reuse its pool
                # the same carving as _decode_inputs(batch, bs): replay copies into its prefix
                flat = self._decode_inputs(pad, bs)
                self._static[: flat.numel()].copy_(flat)
                head, index = self._split(self._static, bs)
                meta = self._decode_meta(head, index)
                # warm-up (autotuning, lazy init) outside the capture
                self._static_hidden[:bs] = self._run(meta, head[_IDS], head[_POS])
                torch.cuda.synchronize(dev)
                g = torch.cuda.CUDAGraph()
                # thread_local: the KV mapper thread's driver calls must not void the capture
                with torch.cuda.graph(g, pool=pool, capture_error_mode="thread_local"):
                    self._static_hidden[:bs] = self._run(meta, head[_IDS], head[_POS])
                pool = g.pool()
                self.graphs[bs] = g
        torch.cuda.synchronize(dev)
        self.capture_s = time.perf_counter() - t0
        log.info("captured %d decode CUDA graphs in %.1f s", len(self.graphs), self.capture_s)

    def close(self) -> None:
        self.graphs = {}
        self.mixed = None
        if self.pad_slot is not None:
            self.kv.free(self.pad_slot)
            self.pad_slot = None

"""HFRunner: the baseline without a serving engine, HF transformers `generate` on the same
model (same weights for HF folders and GGUF files; random weights of the same shapes for dummy
presets). Static padded batches, greedy, EOS suppressed so that every request produces exactly
the tokens it asks for (the same work the engine does with ignore_eos)."""

from __future__ import annotations

import os
from typing import Any

import torch


def _hf_model(model: str | None, load_format: str, dtype: torch.dtype, device: torch.device):
    import transformers

    from vtensor.model import PRESETS, default_model_path

    if load_format == "dummy" and model is not None and model.lower() in PRESETS:
        cfg = dict(PRESETS[model.lower()])
        config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        with torch.device(device):
            m = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
        return m
    path = os.path.expanduser(model) if model is not None else default_model_path()
    if path.endswith(".gguf"):
        folder, name = os.path.split(path)
        m = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    else:
        m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return m.to(device)


class HFRunner:
    def __init__(
        self,
        model: str | None = None,
        *,
        dtype: str | torch.dtype = "auto",
        device: str = "auto",
        load_format: str = "auto",
    ) -> None:
        from vtensor.model import resolve_device, resolve_dtype

        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model = _hf_model(model, load_format, self.dtype, self.device).eval()

    @torch.inference_mode()
    def generate(
        self, prompts: list[list[int]], max_tokens: list[int], batch_size: int = 32, bar: Any = None
    ) -> list[list[int]]:
        """Greedy continuations; requests sorted by length into left-padded batches."""
        n = len(prompts)
        out: list[list[int]] = [[] for _ in range(n)]
        order = sorted(range(n), key=lambda i: len(prompts[i]))
        for b in range(0, n, batch_size):
            idx = order[b : b + batch_size]
            width = max(len(prompts[i]) for i in idx)
            ids = torch.zeros(len(idx), width, dtype=torch.long)
            mask = torch.zeros(len(idx), width, dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, width - len(prompts[i]) :] = torch.tensor(prompts[i])
                mask[r, width - len(prompts[i]) :] = 1
            new = max(max_tokens[i] for i in idx)
            gen = self.model.generate(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
            )  # fmt: skip
            rows = gen[:, width:].tolist()
            for r, i in enumerate(idx):
                out[i] = rows[r][: max_tokens[i]]
            if bar is not None:
                bar.update(len(idx))
        return out

    def close(self) -> None:
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

"""The Llama-family causal LM (Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3, SmolLM2).

Tokens of the whole batch are flattened ([n], no padding); per-sequence structure lives in the
AttentionContext. Module names follow HF (`model.layers.N.self_attn...`) so that checkpoint
names map one to one, except the fused qkv_proj / gate_up_proj (see `PACKED`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from vtensor.model.attention import Attention
from vtensor.model.config import ModelConfig
from vtensor.model.layers import RMSNorm, RotaryEmbedding, SwiGLU

# checkpoint projection name -> (fused parameter module, shard index within it)
PACKED: dict[str, tuple[str, int]] = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_idx, rotary)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, residual) -> (mlp output, residual before it). The residual add is fused into
        the next norm (vLLM style); sums stay in the activation dtype and in HF's order
        (residual + x), so bf16 results round as HF's `x = x + f(norm(x))`."""
        if residual is None:  # first layer: x is the embedding, nothing to add yet
            residual = x
            h = self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(positions, h)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, rotary) for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        residual: torch.Tensor | None = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual)
        if residual is None:  # no layers
            return self.norm(x)
        return self.norm(x, residual)[0]  # the last residual add, fused into the final norm


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, freq_factors: torch.Tensor | None = None) -> None:
        super().__init__()
        self.config = config
        self.rotary_emb = RotaryEmbedding(
            config.head_dim,
            config.max_position_embeddings,
            config.rope_theta,
            config.rope_scaling,
            freq_factors,
        )
        self.model = LlamaModel(config, self.rotary_emb)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [n] (all tokens of the batch, flattened) -> hidden [n, h]."""
        return self.model(input_ids, positions)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [m, h] (only the rows that need logits) -> fp32 logits [m, vocab]."""
        return self.lm_head(hidden).float()

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named checkpoint tensors into the (already materialized) parameters,
        converting dtype/device on the fly. Raises if a parameter is left unloaded."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        q, kv = self.config.q_size, self.config.kv_size
        inter = self.config.intermediate_size
        offsets = {
            "qkv_proj": [(0, q), (q, kv), (q + kv, kv)],
            "gate_up_proj": [(0, inter), (inter, inter)],
        }
        for name, tensor in weights:
            if "rotary_emb" in name:
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue  # some tied checkpoints still ship a copy
            parts = name.split(".")
            shard = None
            if len(parts) >= 2 and parts[-2] in PACKED:
                fused, idx = PACKED[parts[-2]]
                shard = offsets[fused][idx]
                parts[-2] = fused
            target = ".".join(parts)
            param = params.get(target)
            if param is None:
                raise KeyError(f"checkpoint tensor {name!r} has no matching parameter")
            dst = param.data if shard is None else param.data.narrow(0, *shard)
            if tuple(dst.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"shape mismatch for {name!r}: checkpoint {tuple(tensor.shape)}, "
                    f"model {tuple(dst.shape)}"
                )
            dst.copy_(tensor)
            loaded.add(name)
        expected = set()
        for pname in params:
            parts = pname.split(".")
            if len(parts) >= 2 and parts[-2] in ("qkv_proj", "gate_up_proj"):
                for ckpt, (fused, _) in PACKED.items():
                    if fused == parts[-2]:
                        expected.add(".".join([*parts[:-2], ckpt, parts[-1]]))
            else:
                expected.add(pname)
        missing = sorted(expected - loaded)
        if missing:
            more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
            raise ValueError(f"checkpoint is missing tensors: {missing[:5]}{more}")

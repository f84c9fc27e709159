"""Model correctness on CPU (fp32): our logits == HF transformers' logits on the same weights,
for a full-prompt prefill and for chunked prefill + decode over a plain KV tensor, with two
sequences per batch in out-of-order slots."""

from __future__ import annotations

import os

import pytest
import torch
from model_utils import chunked_logits

from vtensor.model import (
    ModelConfig,
    ModelNotFoundError,
    UnsupportedModelError,
    apply_chat_template,
    eos_token_ids,
    load_model,
    load_tokenizer,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Many tiny matmuls (decode steps): a second OpenMP thread buys nothing and, when the
    # 2-core CI box is busy, oversubscription made this file 15x slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _hf_logits(hf, seqs):
    with torch.no_grad():
        return [hf(torch.tensor([s])).logits[0].float() for s in seqs]


def _check(model, config, hf, seqs, atol, rtol=1e-4):
    ref = _hf_logits(hf, seqs)
    slots = [2, 0]  # out of order, slot 1 unused
    max_tokens = max(len(s) for s in seqs) + 3
    # (a) whole prompts in one prefill
    full = chunked_logits(model, config, seqs, slots, [[len(s)] for s in seqs], max_tokens)
    # (b) two prefill chunks (second with prefix_lens > 0), then decode the rest
    splits = [[len(s) // 3, len(s) // 3] for s in seqs]
    chunked = chunked_logits(model, config, seqs, slots, splits, max_tokens)
    # (c) the same through the paged baseline (block pools, shuffled block tables)
    paged = chunked_logits(model, config, seqs, slots, splits, max_tokens, paged=True)
    for r, f, c, p in zip(ref, full, chunked, paged, strict=True):
        assert r.abs().max() > 0.1  # logits must carry signal for the comparison to mean much
        torch.testing.assert_close(f, r, atol=atol, rtol=rtol)
        torch.testing.assert_close(c, r, atol=atol, rtol=rtol)
        torch.testing.assert_close(p, r, atol=atol, rtol=rtol)


# ----------------------------------------------------------------- tiny random HF checkpoints


def _tiny(kind: str):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rms_norm_eps=1e-5,
    )  # fmt: skip
    if kind == "llama3":
        return LlamaConfig(
            **common, tie_word_embeddings=False,
            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 16},
        )  # fmt: skip
    if kind == "llama-linear-tied":
        return LlamaConfig(
            **common, tie_word_embeddings=True,
            rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
        )  # fmt: skip
    if kind == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=True)
    if kind == "qwen3":
        return Qwen3Config(**{**common, "head_dim": 32}, tie_word_embeddings=False)
    if kind == "mistral":
        return MistralConfig(**common, sliding_window=None)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["llama3", "llama-linear-tied", "qwen2", "qwen3", "mistral"])
def test_tiny_hf_checkpoint_matches_transformers(kind, tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(_tiny(kind), dtype=torch.float32).eval()
    with torch.no_grad():  # HF init leaves norms at 1 and biases at 0: randomize everything
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model, config = load_model(str(tmp_path), dtype=torch.float32, device="cpu")
    assert config.architecture == _tiny(kind).model_type
    assert config.qkv_bias == (kind == "qwen2")
    assert config.qk_norm == (kind == "qwen3")
    if kind == "qwen3":
        assert config.head_dim == 32 and config.q_size == 128
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 211, (23,), generator=g).tolist(),
            torch.randint(0, 211, (14,), generator=g).tolist()]  # fmt: skip
    _check(model, config, hf, seqs, atol=2e-5)


# ----------------------------------------------------------------- embedded SmolLM2 GGUF


@pytest.fixture(scope="module")
def smol(default_gguf_path):
    from transformers import AutoModelForCausalLM

    folder, name = os.path.split(default_gguf_path)
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    model, config = load_model(None, dtype=torch.float32, device="cpu")
    return model, config, hf


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


def test_default_gguf_matches_transformers(smol, tokenizer):
    model, config, hf = smol
    assert (config.architecture, config.num_layers, config.num_kv_heads) == ("llama", 30, 3)
    assert config.tie_word_embeddings and 2 in config.eos_token_ids
    seqs = [
        tokenizer.encode("The capital of France is Paris. The capital of Germany is"),
        apply_chat_template(tokenizer, [{"role": "user", "content": "Count to five."}]),
    ]
    _check(model, config, hf, seqs, atol=2e-3)


def test_tokenizer_chat_template_round_trip(tokenizer):
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    ids = apply_chat_template(tokenizer, msgs)
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\n")
    assert "<|im_start|>user\nWhat is 2+2?<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end == 2 and ids.count(im_end) == 2
    assert 2 in eos_token_ids(tokenizer, [2])
    assert tokenizer.decode(tokenizer.encode("héllo wörld 123")) == "héllo wörld 123"
    no_prompt = apply_chat_template(tokenizer, msgs, add_generation_prompt=False)
    assert ids[: len(no_prompt)] == no_prompt and len(ids) > len(no_prompt)


# ----------------------------------------------------------------- dummy weights, errors


def test_dummy_preset_and_folder(tmp_path):
    model, config = load_model("smollm2-135m", load_format="dummy", dtype=torch.float32,
                               device="cpu", config_overrides={"num_layers": 2})  # fmt: skip
    assert config.num_layers == 2 and len(model.model.layers) == 2
    w = model.model.layers[1].self_attn.qkv_proj.weight
    assert w.dtype == torch.float32 and 0.015 < w.std().item() < 0.025
    assert torch.equal(model.model.layers[0].input_layernorm.weight, torch.ones(576))
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied survives materialize
    big = ModelConfig.from_preset("llama-3-8b")
    assert (big.num_layers, big.num_kv_heads, big.intermediate_size) == (32, 8, 14336)
    # a folder with only config.json: dummy works, normal loading says what is missing
    _tiny("qwen3").save_pretrained(tmp_path)
    model, config = load_model(str(tmp_path), load_format="dummy", dtype="bfloat16", device="cpu")
    assert config.qk_norm and model.model.embed_tokens.weight.dtype == torch.bfloat16
    with pytest.raises(ModelNotFoundError, match="safetensors"):
        load_model(str(tmp_path), device="cpu")


def test_bad_inputs_raise_typed_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "nope"), device="cpu")
    with pytest.raises(ModelNotFoundError, match="preset"):
        load_model("no-such-preset", load_format="dummy", device="cpu")
    with pytest.raises(ModelNotFoundError, match="dummy"):
        load_model("llama-3-8b", device="cpu")
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "architectures": ["GPT2"]}')
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        load_model(str(tmp_path), load_format="dummy", device="cpu")
    with pytest.raises(ValueError, match="load_format"):
        load_model(None, load_format="pickle", device="cpu")
    with pytest.raises(ValueError, match="dtype"):
        load_model("smollm2-135m", load_format="dummy", dtype="int7", device="cpu")
    bad = dict(
        model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=8,
        num_hidden_layers=1, num_attention_heads=2,
        rope_parameters={"rope_type": "longrope", "rope_theta": 1e4},
    )  # fmt: skip
    with pytest.raises(UnsupportedModelError, match="longrope"):
        ModelConfig.from_hf(bad)


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "default"},
        {"rope_type": "linear", "factor": 4.0},
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 256},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256},
        {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 512,
         "beta_fast": 16, "beta_slow": 2, "attention_factor": 1.3},
    ],
)  # fmt: skip
def test_rope_frequencies_match_transformers(rope):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from vtensor.model.layers import rope_inv_freq

    hf_cfg = LlamaConfig(
        hidden_size=256, num_attention_heads=2, max_position_embeddings=2048,
        rope_parameters={**rope, "rope_theta": 500000.0},
    )  # fmt: skip
    ours = ModelConfig.from_hf(hf_cfg.to_dict())
    inv, scale = rope_inv_freq(ours.head_dim, ours.rope_theta, ours.rope_scaling, 2048)
    if rope["rope_type"] == "default":
        assert ours.rope_scaling is None
        ref = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128))
        ref_scale = 1.0
    else:
        ref, ref_scale = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf_cfg, "cpu")
    torch.testing.assert_close(inv.double(), ref.double(), rtol=1e-6, atol=0)
    assert scale == pytest.approx(ref_scale)


# ----------------------------------------------------------------- GGUF written from HF weights

_HF_TO_GGUF = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}  # fmt: skip


def _llama_cpp_permute(w, n_head):
    # llama.cpp convert_hf_to_gguf.py LlamaModel.permute (the inverse of what the loader undoes)
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _write_gguf(hf, path, arch):
    import math

    import gguf
    import numpy as np

    c = hf.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-test")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    rope = c.rope_parameters
    if rope.get("rope_type") == "llama3":  # llama.cpp stores llama3 scaling as rope_freqs
        factors = []
        old, lo, hi = (
            rope["original_max_position_embeddings"],
            rope["low_freq_factor"],
            rope["high_freq_factor"],
        )
        for i in range(0, head_dim, 2):
            wavelen = 2 * math.pi * rope["rope_theta"] ** (i / head_dim)
            if wavelen < old / hi:
                factors.append(1.0)
            elif wavelen > old / lo:
                factors.append(rope["factor"])
            else:
                smooth = (old / wavelen - lo) / (hi - lo)
                factors.append(1 / ((1 - smooth) / rope["factor"] + smooth))
        w.add_tensor("rope_freqs.weight", np.array(factors, dtype=np.float32))
    for name, t in hf.state_dict().items():
        a = t.float().numpy()
        if name == "model.embed_tokens.weight":
            w.add_tensor("token_embd.weight", a)
        elif name == "model.norm.weight":
            w.add_tensor("output_norm.weight", a)
        elif name == "lm_head.weight":
            if not c.tie_word_embeddings:
                w.add_tensor("output.weight", a)
        else:
            _, _, i, *mod, leaf = name.split(".")
            if arch == "llama" and mod[-1] == "q_proj":
                a = _llama_cpp_permute(a, c.num_attention_heads)
            elif arch == "llama" and mod[-1] == "k_proj":
                a = _llama_cpp_permute(a, c.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{_HF_TO_GGUF['.'.join(mod)]}.{leaf}", a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("kind", ["llama3", "qwen3", "qwen2"])
def test_gguf_from_hf_weights_matches_transformers(kind, tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(2)
    hf = AutoModelForCausalLM.from_config(_tiny(kind), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(
                (1 + 0.2 * torch.randn_like(p)) if "norm" in name else 0.15 * torch.randn_like(p)
            )
    path = tmp_path / "tiny.gguf"
    _write_gguf(hf, path, {"llama3": "llama"}.get(kind, kind))
    model, config = load_model(str(path), dtype=torch.float32, device="cpu")
    assert config.architecture == hf.config.model_type
    assert config.qk_norm == (kind == "qwen3") and config.qkv_bias == (kind == "qwen2")
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 211, (19,), generator=g).tolist(),
            torch.randint(0, 211, (9,), generator=g).tolist()]  # fmt: skip
    _check(model, config, hf, seqs, atol=2e-5)

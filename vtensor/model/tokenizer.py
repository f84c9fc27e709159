"""Tokenizer loading (HF folder or GGUF metadata, via transformers) and chat templating."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from vtensor.model.config import ModelNotFoundError


def load_tokenizer(path: str | None = None) -> Any:
    """A transformers tokenizer for an HF folder, a .gguf file (from its metadata), or the
    embedded default model when path is None."""
    from transformers import AutoTokenizer

    from vtensor.model.loader import _gguf_file, default_model_path

    if path is None:
        path = default_model_path()
    path = os.path.expanduser(str(path))
    if not os.path.exists(path):
        raise ModelNotFoundError(f"tokenizer path {path!r} does not exist")
    is_gguf = path.endswith(".gguf") or (
        os.path.isdir(path)
        and not os.path.isfile(os.path.join(path, "tokenizer.json"))
        and not os.path.isfile(os.path.join(path, "tokenizer_config.json"))
        and any(f.endswith(".gguf") for f in os.listdir(path))
    )
    if is_gguf:
        gguf = _gguf_file(path)
        return AutoTokenizer.from_pretrained(
            os.path.dirname(gguf), gguf_file=os.path.basename(gguf)
        )
    if os.path.isfile(path):
        raise ModelNotFoundError(f"{path!r} is neither a tokenizer folder nor a .gguf file")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"no usable tokenizer in {path!r}: {e}") from e


def apply_chat_template(
    tokenizer: Any,
    messages: Sequence[dict[str, str]],
    *,
    add_generation_prompt: bool = True,
    **kwargs: Any,
) -> list[int]:
    """Token ids of `messages` rendered with the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this tokenizer has no chat template; pass a plain prompt instead")
    text = tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
    )
    # The template already holds any BOS it wants; don't let the tokenizer add a second one.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def eos_token_ids(tokenizer: Any, config_eos: Sequence[int] = ()) -> list[int]:
    """Stop ids: the config's (generation_config included) plus the tokenizer's EOS and the
    chat end-of-turn tokens it knows (<|im_end|>, <|eot_id|>, <|end|>)."""
    ids = list(config_eos)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    for tok in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>"):
        if tok in vocab and tok in tokenizer.all_special_tokens:
            ids.append(vocab[tok])
    return list(dict.fromkeys(ids))

"""Loading the run's tokenizers (and later models) from a ``ModelSpec``, with clear errors."""

from __future__ import annotations

import hashlib
import json

from fusechat.config import ModelSpec, model_path_problem
from fusechat.errors import FusechatError


def load_tokenizer(spec: ModelSpec):
    """The model's fast tokenizer. Fast tokenizers are required: stages need character offsets."""
    from transformers import AutoTokenizer

    problem = model_path_problem(spec.path)
    if problem:
        raise FusechatError(f"model {spec.name!r}: {problem}")
    try:
        tok = AutoTokenizer.from_pretrained(spec.path, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    except Exception as e:  # transformers raises OSError/ValueError/KeyError by case; the user needs which model
        raise FusechatError(f"model {spec.name!r}: cannot load a tokenizer from {spec.path}: {e}") from None
    if not getattr(tok, "is_fast", False):
        raise FusechatError(
            f"model {spec.name!r}: the tokenizer at {spec.path} is not a fast (Rust) tokenizer; "
            "fusechat needs character offsets, which only fast tokenizers give"
        )
    return tok


def tokenizer_hash(tok) -> str:
    """Identity of a tokenizer: vocabulary, merges, normalisation, special tokens and chat template."""
    h = hashlib.sha256()
    h.update(tok.backend_tokenizer.to_str().encode())
    h.update(json.dumps({k: str(v) for k, v in tok.special_tokens_map.items()}, sort_keys=True).encode())
    h.update(str(getattr(tok, "chat_template", None) or "").encode())
    return h.hexdigest()[:16]

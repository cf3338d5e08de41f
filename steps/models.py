"""Resolving and loading base models and tokenizers (safetensors only, no remote code by default)."""

from __future__ import annotations

from pathlib import Path

BUILTIN_PREFIX = "builtin:"


def resolve_base_model(base: str, storage_root: str | Path) -> Path | str:
    """Map the recipe's ``model.base`` to something ``from_pretrained`` loads.

    ``builtin:tiny-llama`` is built offline once per storage root and reused; a local folder
    is returned as a path; anything else is taken as a Hugging Face Hub id.
    """
    if base.startswith(BUILTIN_PREFIX):
        from steps.builtin import ensure_builtin_model

        return ensure_builtin_model(base[len(BUILTIN_PREFIX):], Path(storage_root))
    path = Path(base).expanduser()
    return path if path.exists() else base


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)


def load_model(path: str | Path, trust_remote_code: bool = False, attn_implementation: str = "sdpa",
               dtype=None):
    """Load a causal LM from safetensors weights (pickled ``.bin`` weights are refused)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(path),
        trust_remote_code=trust_remote_code,
        use_safetensors=True,
        attn_implementation=attn_implementation,
        dtype=dtype or torch.float32,
    )

"""Resolving and loading base models and tokenizers (safetensors only, no remote code by default)."""

from __future__ import annotations

from pathlib import Path

BUILTIN_PREFIX = "builtin:"
REGISTRY_PREFIX = "registry:"


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


def resolve_model_ref(spec: str, recipe, dest: str | Path) -> tuple[str, dict | None]:
    """A model reference of a recipe (``dpo.policy``, ``distill.teacher``, ...) -> ``(folder, version)``.

    ``registry:NAME[@VERSION_OR_ALIAS]`` (``@3``, ``@champion``; the latest version without
    ``@``) is downloaded from the recipe's registry into ``dest``, checksums verified, and
    ``version`` is ``{"name", "version", "run", "uri", "metrics"}``: the lineage parent of the
    model a flow trains from it. Anything else resolves as ``model.base`` does (a folder,
    ``builtin:``, a Hub id) and ``version`` is None.

    Raises:
        steps.registry.NotFoundError: the registry has no such model, version or alias.
    """
    from steps.registry import Registry

    if not spec.startswith(REGISTRY_PREFIX):
        return str(resolve_base_model(spec, recipe.storage_root)), None
    name, _, version = spec[len(REGISTRY_PREFIX):].partition("@")
    registry = Registry(recipe.registry_root)
    found = registry.get(name, version or "latest")
    path = registry.download(name, found.version, dest)
    return str(path), {"name": name, "version": found.version, "run": found.manifest.get("run"),
                       "uri": found.uri, "metrics": dict(found.manifest.get("metrics") or {})}


def save_model(model, folder: str | Path, state_dict: dict | None = None) -> None:
    """``model.save_pretrained(folder)`` as safetensors, without importing DeepSpeed for nothing.

    ``save_pretrained`` unwraps the model through accelerate, which imports ``deepspeed`` (~2 s
    of CPU) whenever it is installed, to test ``isinstance(model, DeepSpeedEngine)``. Until
    something has imported deepspeed no model can be an engine, so the probe is skipped then.
    """
    import sys

    import accelerate.utils.other as accelerate_other

    probe = accelerate_other.is_deepspeed_available
    if "deepspeed" not in sys.modules:
        accelerate_other.is_deepspeed_available = lambda: False
    try:
        model.save_pretrained(folder, safe_serialization=True, state_dict=state_dict)
    finally:
        accelerate_other.is_deepspeed_available = probe


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)


def resolve_attn_implementation(name: str, device_type: str) -> str:
    """The attention kernel for ``model.attn_implementation`` on a device type.

    ``auto`` picks what keeps packed documents apart at full speed. On CPU that is ``sdpa``: with
    ``position_ids`` and no attention mask, transformers builds the block-diagonal causal mask
    from the position resets. On GPU, ``flash_attention_2`` when the flash-attn package is
    installed (varlen kernels, with document boundaries taken from ``position_ids``), else
    ``flex_attention`` (a block-sparse kernel from the same document mask); SDPA with such a mask
    would fall back from the flash kernel to a dense masked one. An explicit name is kept.

    >>> resolve_attn_implementation("auto", "cpu"), resolve_attn_implementation("eager", "cuda")
    ('sdpa', 'eager')
    """
    if name != "auto":
        return name
    if device_type != "cuda":
        return "sdpa"
    import importlib.util

    return "flash_attention_2" if importlib.util.find_spec("flash_attn") else "flex_attention"


def load_model(path: str | Path, trust_remote_code: bool = False, attn_implementation: str = "sdpa",
               dtype=None, device_type: str = "cpu"):
    """Load a causal LM from safetensors weights (pickled ``.bin`` weights are refused).

    ``attn_implementation`` may be ``auto`` (see :func:`resolve_attn_implementation`).
    """
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(path),
        trust_remote_code=trust_remote_code,
        use_safetensors=True,
        attn_implementation=resolve_attn_implementation(attn_implementation, device_type),
        dtype=dtype or torch.float32,
    )

"""Resolving and loading base models and tokenizers (safetensors only, no remote code by default)."""

from __future__ import annotations

from pathlib import Path

from steps.registry import NotFoundError

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


class ModelNotFound(NotFoundError):
    """A recipe's ``registry:`` model reference that the registry cannot serve; the message names
    the recipe field, the reference, the registry and what it holds."""


def resolve_model_ref(spec: str, recipe, dest: str | Path, *, field: str = "model",
                      fall_back_to_base: bool = False) -> tuple[str, dict | None]:
    """Which model a flow starts from: the one resolver of every recipe model reference
    (``model.base``, ``dpo.policy``, ``dpo.reference``, ``distill.teacher``, the retrain's
    champion) -> ``(local folder, registry version or None)``.

    - ``registry:NAME[@VERSION_OR_ALIAS]`` (``@3``, ``@champion``; the latest version without
      ``@``) is downloaded from the recipe's registry into ``dest``, checksums verified, and the
      version is ``{"name", "version", "run", "uri", "metrics"}``: the lineage parent of the
      model a flow trains from it.
    - Anything else resolves as ``model.base`` does (``builtin:`` built offline, a folder, a Hub
      id), and the version is None.

    With ``fall_back_to_base``, a reference to a model that has no version at all yet (the first
    run of a pipeline: no SFT model registered before DPO, no champion before the first retrain)
    gives ``model.base`` instead, with a printed note. A pinned version number never falls back.

    Raises:
        ModelNotFound: the registry has no such model, version or alias, e.g.
            ``dpo.policy='registry:sft@3': no version 3 of model 'sft' ...``.
    """
    from steps.registry import Registry

    if not spec.startswith(REGISTRY_PREFIX):
        return str(resolve_base_model(spec, recipe.storage_root)), None
    name, _, version = spec[len(REGISTRY_PREFIX):].partition("@")
    registry = Registry(recipe.registry_root)
    try:
        found = registry.get(name, version or "latest")
    except NotFoundError as error:
        if fall_back_to_base and not version.isdigit() and not _has_versions(registry, name):
            print(f"{field}={spec!r}: no version of {name!r} in {recipe.registry_root} yet; "
                  f"starting from model.base {recipe.model.base}")
            return str(resolve_base_model(recipe.model.base, recipe.storage_root)), None
        raise ModelNotFound(f"{field}={spec!r}: {error}") from None
    path = registry.download(name, found.version, dest)
    return str(path), {"name": name, "version": found.version, "run": found.manifest.get("run"),
                       "uri": found.uri, "metrics": dict(found.manifest.get("metrics") or {})}


def _has_versions(registry, name: str) -> bool:
    try:
        return bool(registry.list(name))
    except NotFoundError:
        return False


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

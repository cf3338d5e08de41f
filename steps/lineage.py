"""Lineage: what produced a run (code version, package versions, recipe, base model)."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from pathlib import Path

from steps.config import Recipe, recipe_to_dict

PACKAGES = ("torch", "transformers", "tokenizers", "metaflow", "datasets", "peft", "deepspeed",
            "pyarrow", "safetensors")


def git_state(code_dir: Path) -> dict:
    """The git commit of ``code_dir`` and whether the tree has uncommitted changes (None outside git)."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=code_dir, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"git_sha": sha, "git_dirty": bool(dirty) if sha else None}


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def collect(recipe: Recipe, pathspec: str, code_dir: Path) -> dict:
    """Everything a registry manifest needs to say where a model came from."""
    return {
        "pathspec": pathspec,
        "recipe": recipe_to_dict(recipe),
        "base_model": recipe.model.base,
        **git_state(code_dir),
        "packages": package_versions(),
        "python": platform.python_version(),
    }

"""Weights files: their sha256, and their state dicts (read without running pickled code)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dicomnode.errors import ModelError, WeightsMismatch, WeightsMissing

_CHUNK = 1 << 20
#: keys under which checkpoints commonly nest the network's state dict
_NESTED = ("model", "state_dict", "network", "model_state_dict")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_weights(path: Path, sha256: str, *, model: str = "") -> None:
    """WeightsMissing or WeightsMismatch unless ``path`` exists with this sha256."""
    owner = f"model {model!r}: " if model else ""
    if not path.is_file():
        raise WeightsMissing(
            f"{owner}weights file {str(path)!r} does not exist (train it with the package's "
            "train.py, or copy it there)"
        )
    actual = sha256_of(path)
    if actual != sha256.lower():
        raise WeightsMismatch(
            f"{owner}weights file {str(path)!r} has sha256 {actual}, but model.toml expects "
            f"{sha256.lower()}; the file is corrupt or from another version"
        )


def save_weights(state: Mapping[str, Any], path: Path, model_toml: Path) -> str:
    """Save a state dict as a package's weights file and put its sha256 into the package's
    ``model.toml`` (its ``[weights]`` table), so the registry's check accepts the new file.
    What each model's ``train.py`` ends with; returns the sha256."""
    import re

    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(dict(state), path)
    digest = sha256_of(path)
    text, replaced = re.subn(
        r'(\[weights\][^\[]*?sha256 = ")[0-9a-fA-F]{64}(")', rf"\g<1>{digest}\g<2>",
        model_toml.read_text(), count=1, flags=re.S,
    )  # fmt: skip
    if not replaced:
        raise ModelError(f"{model_toml} has no [weights] sha256 to update")
    model_toml.write_text(text)
    return digest


def load_state_dict(path: Path) -> dict[str, Any]:
    """A network's state dict from a ``torch.save`` file, on the CPU.

    Accepts a bare state dict or a checkpoint nesting it under ``model``/``state_dict``/
    ``network``; a ``module.`` prefix (from DataParallel) is dropped.
    """
    import torch

    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise WeightsMissing(f"weights file {str(path)!r} does not exist") from exc
    except Exception as exc:
        raise ModelError(
            f"weights file {str(path)!r} is not a torch state dict (read with "
            f"weights_only=True): {exc}"
        ) from exc
    return unwrap_state_dict(loaded, source=str(path))


def unwrap_state_dict(loaded: Any, *, source: str = "checkpoint") -> dict[str, Any]:
    import torch

    state = loaded
    if isinstance(state, Mapping) and not _is_state_dict(state):
        for key in _NESTED:
            if key in state and isinstance(state[key], Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not _is_state_dict(state):
        keys = list(loaded)[:5] if isinstance(loaded, Mapping) else type(loaded).__name__
        raise ModelError(
            f"{source} holds no state dict of tensors (found {keys}); expected a state dict, or "
            f"a checkpoint with one under {', '.join(_NESTED)}"
        )
    out = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if out and all(k.startswith("module.") for k in out):
        out = {k[len("module.") :]: v for k, v in out.items()}
    return out


def _is_state_dict(value: Mapping[Any, Any]) -> bool:
    import torch

    return bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())

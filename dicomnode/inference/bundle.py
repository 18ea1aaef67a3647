"""MONAI bundle directories in the Model Zoo layout.

::

    <bundle>/configs/metadata.json     name, version, network_data_format, ...
    <bundle>/configs/inference.json    (or .yaml) with the network under ``network_def``
    <bundle>/models/model.pt           the network's state dict (or a checkpoint holding it)

:func:`load_bundle` parses the configs with ``monai.bundle.ConfigParser`` (``bundle_root`` set to
the directory, ``imports`` evaluated first, the bundle on ``sys.path`` while parsing, as MONAI's
own runner does), instantiates ``network_def``, loads ``models/model.pt`` into it strictly and
puts it on the device in eval mode. A model package decides what to do with the network (the
lung model swaps its demo network for it); the rest of the bundle's config (patch size,
thresholds) is there through :meth:`Bundle.get`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicomnode.errors import BundleInvalid, ModelError
from dicomnode.inference.device import CPU, Device, parse_device

METADATA = Path("configs/metadata.json")
INFERENCE_CONFIGS = (
    Path("configs/inference.json"),
    Path("configs/inference.yaml"),
    Path("configs/inference.yml"),
)
WEIGHTS = Path("models/model.pt")
NETWORK_KEY = "network_def"


@dataclass(frozen=True)
class BundleLayout:
    """The files of a bundle directory (checked to exist; nothing parsed or imported)."""

    root: Path
    metadata: Path
    inference: Path
    weights: Path


def bundle_layout(path: Path | str) -> BundleLayout:
    """The bundle's files; BundleInvalid naming what is missing. Cheap: no torch, no MONAI."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise BundleInvalid(f"bundle directory {str(root)!r} does not exist")
    metadata = root / METADATA
    inference = next((root / c for c in INFERENCE_CONFIGS if (root / c).is_file()), None)
    weights = root / WEIGHTS
    missing = [
        str(p)
        for p, there in (
            (METADATA, metadata.is_file()),
            (INFERENCE_CONFIGS[0], inference is not None),
            (WEIGHTS, weights.is_file()),
        )
        if not there
    ]
    if missing:
        raise BundleInvalid(
            f"bundle directory {str(root)!r} is not in the Model Zoo layout: missing "
            f"{', '.join(missing)} (expected configs/metadata.json, configs/inference.json, "
            "models/model.pt)"
        )
    assert inference is not None
    return BundleLayout(root, metadata, inference, weights)


@dataclass(frozen=True, eq=False)
class Bundle:
    """A loaded bundle: its metadata, its parsed config, and its network with weights."""

    layout: BundleLayout
    metadata: dict[str, Any]
    parser: Any  # monai.bundle.ConfigParser
    network: Any  # torch.nn.Module, on the device, in eval mode
    device: Device = CPU
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def path(self) -> Path:
        return self.layout.root

    @property
    def name(self) -> str:
        return str(self.metadata.get("name") or self.layout.root.name)

    @property
    def version(self) -> str:
        return str(self.metadata.get("version", ""))

    def get(self, key: str, default: Any = None) -> Any:
        """A config value, parsed (references and expressions resolved), or ``default``."""
        if key not in self._cache:
            if key not in self.parser:
                return default
            self._cache[key] = self.parser.get_parsed_content(key)
        return self._cache[key]


def load_bundle(
    path: Path | str, device: Device | str = CPU, *, network_key: str = NETWORK_KEY
) -> Bundle:
    """Parse the bundle at ``path`` and load its network onto ``device``."""
    import torch
    from monai.bundle import ConfigParser

    from dicomnode.inference.compat import ensure_detection_without_torchvision
    from dicomnode.inference.weights import load_state_dict

    layout = bundle_layout(path)
    device = parse_device(device)
    try:
        metadata = json.loads(layout.metadata.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BundleInvalid(f"bundle {str(layout.metadata)!r} is not valid JSON: {exc}") from exc
    if not isinstance(metadata, dict):
        raise BundleInvalid(f"bundle {str(layout.metadata)!r} is not a JSON object")

    parser = ConfigParser()
    try:
        parser.read_config(str(layout.inference))
        parser.read_meta(str(layout.metadata))
    except Exception as exc:
        raise BundleInvalid(
            f"bundle config {str(layout.inference)!r} cannot be read: {exc}"
        ) from exc
    parser["bundle_root"] = str(layout.root)
    if network_key not in parser:
        raise BundleInvalid(
            f"bundle config {str(layout.inference)!r} has no {network_key!r}: the network "
            "must be defined there (as in the Model Zoo's bundles)"
        )
    # The zoo's detection networks use two torchvision helpers; stand in where it is missing.
    ensure_detection_without_torchvision()
    root = str(layout.root)
    sys.path.insert(0, root)  # bundles may name their own scripts/ package
    try:
        if "imports" in parser:
            parser.get_parsed_content("imports")
        network = parser.get_parsed_content(network_key, instantiate=True)
    except Exception as exc:
        raise BundleInvalid(
            f"bundle {root!r}: {network_key!r} could not be instantiated: {_cause(exc)}"
        ) from exc
    finally:
        if root in sys.path:
            sys.path.remove(root)
    if not isinstance(network, torch.nn.Module):
        raise BundleInvalid(
            f"bundle {root!r}: {network_key!r} made a {type(network).__name__}, not a "
            "torch.nn.Module"
        )
    try:
        state = load_state_dict(layout.weights)
    except ModelError as exc:
        raise BundleInvalid(f"bundle {root!r}: {exc}") from exc
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BundleInvalid(
            f"bundle {root!r}: {WEIGHTS} does not fit {network_key!r} "
            f"({type(network).__name__}): {_first_line(str(exc))}"
        ) from exc
    network = network.to(device.torch).eval()
    return Bundle(layout, metadata, parser, network, device)


def _cause(exc: BaseException) -> str:
    """The innermost error: MONAI wraps each failed reference in another RuntimeError."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return f"{type(exc).__name__}: {_first_line(str(exc))}"


def _first_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return " ".join(lines[:3])[:500] if lines else ""

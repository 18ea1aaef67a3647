"""The model registry: model packages found in the configured folders, and MONAI bundles (that
replace a package's network, or, named for no package, are models of their own).

Discovery reads only ``model.toml`` files (no torch, no model code), so building a registry is
cheap and the receiver can do it at start. A package's code is imported, and its weights
checked against their sha256, when a model is created (:meth:`ModelRegistry.create`), which the
worker does when it loads its models.

Package folders are not Python packages installed with dicomnode: each is imported from its
path as ``dicomnode_models.<name>_<hash of the folder>``, so its modules import each other
relatively (``from .network import build``).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import re
import sys
import types
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from dicomnode.errors import BundleInvalid, ModelPackageInvalid, UnknownModel
from dicomnode.inference.bundle import bundle_layout
from dicomnode.inference.protocol import MODEL_TOML, InferenceModel, ModelSpec

if TYPE_CHECKING:
    from dicomnode.config import BundleSettings, ModelsSettings, Settings

logger = logging.getLogger(__name__)

PACKAGE_ROOT = "dicomnode_models"
#: the source checkout (where ``models/`` is beside the dicomnode package), if this is one
SOURCE_ROOT = Path(__file__).resolve().parents[2]


def resolve_dirs(dirs: Iterable[Path | str]) -> list[Path]:
    """Existing folders for ``dirs``: a relative path is looked up in the current directory,
    then in the source checkout; each folder once."""
    found: list[Path] = []
    for entry in dirs:
        path = Path(entry).expanduser()
        candidates = [path] if path.is_absolute() else [Path.cwd() / path, SOURCE_ROOT / path]
        for candidate in candidates:
            if candidate.is_dir():
                resolved = candidate.resolve()
                if resolved not in found:
                    found.append(resolved)
                break
        else:
            logger.debug("models folder %s does not exist", path)
    return found


def discover(dirs: Iterable[Path | str]) -> dict[str, ModelSpec]:
    """Every ``<dir>/<name>/model.toml`` in ``dirs``, by model name; ModelPackageInvalid for
    an invalid model.toml or two packages of one name."""
    specs: dict[str, ModelSpec] = {}
    for folder in resolve_dirs(dirs):
        for toml in sorted(folder.glob(f"*/{MODEL_TOML}")):
            spec = ModelSpec.from_directory(toml.parent)
            if spec.name in specs:
                raise ModelPackageInvalid(
                    f"two model packages are named {spec.name!r}: "
                    f"{str(specs[spec.name].directory)!r} and {str(spec.directory)!r}"
                )
            specs[spec.name] = spec
    return specs


def unknown_model(names: Sequence[str], available: Sequence[str]) -> UnknownModel:
    """The error for model names that are not there, listing those that are."""
    return UnknownModel(
        f"unknown model(s) {', '.join(map(repr, names))}; available: "
        f"{', '.join(available) or 'none'}"
    )


class ModelRegistry:
    """Model packages by name, and how to make and load them."""

    def __init__(
        self,
        dirs: Sequence[Path | str] = (),
        bundles: Mapping[str, Path | str] | None = None,
        *,
        bundle_settings: Mapping[str, BundleSettings] | None = None,
        seed: int = 0,
        deterministic: bool = True,
        threads: int = 0,
    ) -> None:
        self.packages = discover(dirs)
        self.seed, self.deterministic, self.threads = seed, deterministic, threads
        bundle_settings = bundle_settings or {}
        own = [name for name in (bundles or {}) if name not in self.packages]
        stray = sorted(set(bundle_settings) - set(own))
        if stray:
            raise BundleInvalid(
                f"[models.bundle_settings] names {', '.join(map(repr, stray))}, which is no "
                f"bundle of its own; those are: {', '.join(own) or 'none'} ([models.bundles] "
                "names that are no model package)"
            )
        for name, path in (bundles or {}).items():
            if name not in self.packages:
                # no package of that name: the bundle is a model of its own
                from dicomnode.inference.bundle_model import bundle_spec

                self.packages[name] = bundle_spec(name, path, bundle_settings.get(name))
                continue
            layout = bundle_layout(path)  # fail at start, not at the first job
            spec = self.packages[name]
            self.packages[name] = ModelSpec(spec.info, spec.directory, layout.root)

    @classmethod
    def from_settings(cls, settings: Settings | ModelsSettings) -> ModelRegistry:
        # the node's settings or their [models] section (inference never imports dicomnode.config)
        models: ModelsSettings = settings.models if hasattr(settings, "models") else settings
        return cls(
            models.dirs,
            models.bundles,
            bundle_settings=models.bundle_settings,
            seed=models.seed,
            deterministic=models.deterministic,
            threads=models.threads,
        )

    # -- what is there -------------------------------------------------------------------------

    def names(self) -> list[str]:
        return sorted(self.packages)

    def __contains__(self, name: object) -> bool:
        return name in self.packages

    def spec(self, name: str) -> ModelSpec:
        """The package's spec; UnknownModel for a name that is no package."""
        try:
            return self.packages[name]
        except KeyError:
            raise unknown_model([name], self.names()) from None

    # -- making models -------------------------------------------------------------------------

    def create(self, name: str) -> InferenceModel:
        """A new, not yet loaded instance of the package ``name`` (weights checked first)."""
        spec = self.spec(name)
        if is_bundle_model(spec):
            from dicomnode.inference.bundle_model import BundleModel

            return BundleModel(spec)
        verify_package_weights(spec)
        cls = import_entry(spec)
        try:
            model = cls(spec)
        except Exception as exc:
            raise ModelPackageInvalid(
                f"model {name!r}: {spec.info.entry}({type(spec).__name__}) failed: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(model, InferenceModel):
            raise ModelPackageInvalid(
                f"model {name!r}: {spec.info.entry} makes a {type(model).__name__}, which lacks "
                "spec, load(device) or predict(inputs)"
            )
        return model

    def load(self, name: str, device: str = "cpu") -> InferenceModel:
        """Create ``name`` and load it onto ``device`` with the registry's torch settings, the
        process then settled as a worker's is (the benchmarks measure what a worker runs)."""
        from dicomnode.inference.device import configure_torch, resolve_device, settle_heap

        resolved = resolve_device(device)
        configure_torch(
            resolved, seed=self.seed, deterministic=self.deterministic, threads=self.threads
        )
        model = self.create(name)
        model.load(resolved)
        settle_heap()
        return model


def is_bundle_model(spec: ModelSpec) -> bool:
    """The spec is a MONAI bundle that is a model of its own (no package)."""
    from dicomnode.inference.bundle_model import BUNDLE_ENTRY

    return spec.info.entry == BUNDLE_ENTRY


def verify_package_weights(spec: ModelSpec) -> None:
    """Every weights file of the package exists with the sha256 model.toml names.

    With a bundle configured, the package's network weights are not needed (the bundle's
    replace them) and a missing file is no error; a present one must still match.
    """
    from dicomnode.inference.weights import verify_weights

    for key, weights in spec.info.weights.items():
        path = spec.directory / weights.file
        if spec.bundle is not None and key == _bundle_replaces(spec) and not path.exists():
            continue
        verify_weights(path, weights.sha256, model=spec.name)


def _bundle_replaces(spec: ModelSpec) -> str:
    from dicomnode.inference.protocol import DEFAULT_WEIGHTS

    weights = spec.info.weights
    return next(iter(weights)) if len(weights) == 1 else DEFAULT_WEIGHTS


def import_package(directory: Path, name: str) -> types.ModuleType:
    """The package folder as a module (``dicomnode_models.<name>_<hash>``), so its modules
    import each other relatively; runs its ``__init__.py`` if it has one."""
    directory = directory.resolve()
    if PACKAGE_ROOT not in sys.modules:
        root = types.ModuleType(PACKAGE_ROOT, "Model packages imported from their folders.")
        root.__path__ = []
        sys.modules[PACKAGE_ROOT] = root
    ident = re.sub(r"\W", "_", name)
    tag = hashlib.sha1(str(directory).encode()).hexdigest()[:8]
    qualified = f"{PACKAGE_ROOT}.{ident}_{tag}"
    module = sys.modules.get(qualified)
    if module is not None:
        return module
    init = directory / "__init__.py"
    if init.is_file():
        spec = importlib.util.spec_from_file_location(
            qualified, init, submodule_search_locations=[str(directory)]
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[qualified] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[qualified]
            raise
    else:
        module = types.ModuleType(qualified)
        module.__path__ = [str(directory)]
        module.__package__ = qualified
        sys.modules[qualified] = module
    return module


def import_entry(spec: ModelSpec) -> type:
    """The class named by the package's ``entry`` (``module:Class``)."""
    module_name, _, class_name = spec.info.entry.partition(":")
    where = spec.directory / (module_name.replace(".", "/") + ".py")
    try:
        package = import_package(spec.directory, spec.name)
        module = importlib.import_module(f"{package.__name__}.{module_name}")
    except Exception as exc:
        raise ModelPackageInvalid(
            f"model {spec.name!r}: entry {spec.info.entry!r} could not be imported from "
            f"{str(where)!r}: {type(exc).__name__}: {exc}"
        ) from exc
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise ModelPackageInvalid(
            f"model {spec.name!r}: {str(where)!r} has no class {class_name!r} "
            f"(entry {spec.info.entry!r})"
        )
    return cls

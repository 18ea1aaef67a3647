"""The model protocol: what a model package declares (``model.toml``) and implements.

A model package is a folder ``<models dir>/<name>/`` with::

    model.toml     what it is and accepts (below)
    model.py       the entry point class (any module name; ``entry = "module:Class"``)
    ...            its network and pre/post-processing modules (import them relatively:
                   ``from .network import build``), demo weights, train.py

``model.toml``::

    name = "lung_nodule"
    version = "0.1.0"
    description = "Lung nodules in chest CT"
    entry = "model:LungNoduleModel"
    demo = true                          # the weights are demo weights (trained on phantoms)

    [accepts]
    level = "series"                     # or "study": predict gets {input name: Volume}
    modalities = ["CT"]                  # empty: any
    sop_classes = ["1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1"]  # empty: any
    min_slices = 16
    # body_parts = ["CHEST"]             # Body Part Examined; empty: any
    # study level: input name -> regular expression on "Series Description | Protocol Name |
    # Sequence Name [| contrast]"; a route's completion.required_series overrides it
    # inputs = { T1c = "(?i)t1.*(post|gd|\\+c)", T1 = "(?i)t1", T2 = "(?i)t2", FLAIR = "(?i)flair" }

    [[labels]]
    name = "nodule"
    value = 1                            # its voxel value in label maps (SEG segment number)
    finding_type = { value = "27925004", scheme = "SCT", meaning = "Nodule" }
    finding_site = { value = "39607008", scheme = "SCT", meaning = "Lung structure" }
    category = "lesion"                  # SEG category, "anatomy" or "lesion"; default: by type

    [thresholds]
    probability = 0.5

    [calibration]                        # classification outputs (inference/calibration.py)
    temperature = 1.0                    # probabilities = softmax(logits / temperature)
    indeterminate = [0.0, 0.45]          # a finding's probability in this band: indeterminate
    absent_confidence = 0.9              # "absent" needs at least this probability

    [weights]                            # or several: [weights.detector], [weights.classifier]
    file = "weights/demo.pt"
    sha256 = "<64 hex digits>"

    [inference]                          # the sliding window (Model.infer)
    roi_size = [64, 96, 96]              # in the network input's spatial axis order
    overlap = 0.25
    sw_batch_size = 1
    mode = "gaussian"
    amp = true                           # float16 autocast on a GPU (never on the CPU)

    [params]                             # anything else the package reads (self.params)
    hu_window = [-1024, 300]

The class named by ``entry`` is built as ``Class(spec)`` (a :class:`ModelSpec`), then
``load(device)`` is called once, then ``predict(inputs)`` per job. It satisfies
:class:`InferenceModel`; subclassing :class:`Model` gives the loading (package weights, or the
network of a MONAI bundle named in the config), the sliding window and the findings' header.
``predict`` must be deterministic: the runtime seeds every run, and the same input must give the
same findings.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dicomnode.domain import Code, Finding, Findings
from dicomnode.envelope import Envelope
from dicomnode.errors import ModelError, ModelPackageInvalid
from dicomnode.inference.device import Device, resolve_device

if TYPE_CHECKING:
    from dicomnode.imaging import Volume
    from dicomnode.inference.bundle import Bundle

MODEL_TOML = "model.toml"
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
ENTRY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")
DEFAULT_WEIGHTS = "network"


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CodeSpec(_Strict):
    """A coded concept; SNOMED CT (``SCT``) unless another scheme is named."""

    value: str = Field(min_length=1, max_length=64)  # DICOM SH / UC limits of a coded entry
    scheme: str = Field("SCT", min_length=1, max_length=16)
    meaning: str = Field(min_length=1, max_length=64)

    @property
    def code(self) -> Code:
        return Code(self.value, self.scheme, self.meaning)


class LabelSpec(_Strict):
    """One thing the model finds or segments."""

    name: str = Field(min_length=1)
    value: int = Field(1, ge=1, le=65535)
    finding_type: CodeSpec
    finding_site: CodeSpec | None = None
    description: str = ""
    #: the SEG's segmented property category; None: from the finding type (a lesion unless
    #: the type is a structure the SEG writer knows)
    category: Literal["anatomy", "lesion"] | None = None


class Accepts(_Strict):
    """What the model runs on."""

    level: Literal["series", "study"] = "series"
    modalities: tuple[str, ...] = ()
    sop_classes: tuple[str, ...] = ()
    min_slices: int = Field(1, ge=1)
    inputs: dict[str, str] = {}  # study level: input name -> pattern on the series' text
    body_parts: tuple[str, ...] = ()  # Body Part Examined, upper case; empty: any

    @field_validator("body_parts")
    @classmethod
    def _upper(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(part.strip().upper() for part in value)

    @field_validator("inputs")
    @classmethod
    def _patterns_compile(cls, value: dict[str, str]) -> dict[str, str]:
        for name, pattern in value.items():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(
                    f"input {name!r}: {pattern!r} is not a regular expression: {exc}"
                ) from exc
        return value


class WeightsSpec(_Strict):
    """A weights file in the package folder and its sha256."""

    file: Path
    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$")


class InferenceSpec(_Strict):
    """How the network runs: the sliding window, and mixed precision on a GPU."""

    roi_size: tuple[int, ...] | None = None  # None: the whole input in one pass
    overlap: float = Field(0.25, ge=0, lt=1)
    sw_batch_size: int = Field(1, ge=1)
    mode: Literal["constant", "gaussian"] = "gaussian"
    padding_mode: Literal["constant", "reflect", "replicate", "circular"] = "constant"
    cval: float = 0.0
    amp: bool = True


class CalibrationSpec(_Strict):
    """How sure a classification is: the temperature its probabilities are calibrated with, the
    band in which a finding is reported indeterminate, and the probability absent needs."""

    temperature: float = Field(1.0, gt=0)
    indeterminate: tuple[float, float] | None = None
    absent_confidence: float | None = Field(None, gt=0, le=1)

    @field_validator("indeterminate")
    @classmethod
    def _band(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not 0.0 <= value[0] <= value[1] <= 1.0:
            raise ValueError("indeterminate must be [low, high] with 0 <= low <= high <= 1")
        return value


class ModelInfo(_Strict):
    """The contents of a package's ``model.toml``."""

    name: str
    version: str = Field(min_length=1)
    description: str = ""
    entry: str
    demo: bool = False
    accepts: Accepts = Accepts()
    envelope: Envelope = Envelope()
    labels: tuple[LabelSpec, ...] = ()
    thresholds: dict[str, float] = {}
    calibration: CalibrationSpec = CalibrationSpec()
    weights: dict[str, WeightsSpec] = {}
    inference: InferenceSpec = InferenceSpec()
    params: dict[str, Any] = {}

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not MODEL_NAME.match(value):
            raise ValueError(
                f"model name {value!r} must be 1 to 64 letters, digits, '_', '.', '-', "
                "starting with a letter or digit"
            )
        return value

    @field_validator("entry")
    @classmethod
    def _check_entry(cls, value: str) -> str:
        if not ENTRY.match(value):
            raise ValueError(f"entry {value!r} must be 'module:Class', e.g. 'model:LungModel'")
        return value

    @model_validator(mode="before")
    @classmethod
    def _one_weights_file(cls, values: Any) -> Any:
        # [weights] file/sha256 is shorthand for [weights.network].
        if isinstance(values, dict):
            weights = values.get("weights")
            if isinstance(weights, dict) and "file" in weights:
                values = {**values, "weights": {DEFAULT_WEIGHTS: weights}}
        return values

    @model_validator(mode="after")
    def _labels_distinct(self) -> ModelInfo:
        names = [label.name for label in self.labels]
        values = [label.value for label in self.labels]
        if len(set(names)) != len(names) or len(set(values)) != len(values):
            pairs = list(zip(names, values, strict=True))
            raise ValueError(f"label names and values must be distinct: {pairs}")
        return self


@dataclass(frozen=True)
class ModelSpec:
    """A model package as the registry found it: its metadata, folder, and bundle (if any)."""

    info: ModelInfo
    directory: Path
    #: a MONAI bundle directory named for this model in the config ([models] bundles)
    bundle: Path | None = None
    #: a bundle of its own: the labels neither the site coded nor SNOMED CT names (their code
    #: is the node's local one, the label as meaning)
    uncoded_labels: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.info.name

    def weights_path(self, key: str | None = None) -> Path | None:
        """The weights file ``key`` (default: the only one, or ``network``), or None."""
        weights = self.info.weights
        if not weights:
            return None
        if key is None:
            key = next(iter(weights)) if len(weights) == 1 else DEFAULT_WEIGHTS
        if key not in weights:
            raise ModelError(
                f"model {self.name!r} has no weights {key!r} in model.toml "
                f"(it has {', '.join(weights)})"
            )
        return self.directory / weights[key].file

    @classmethod
    def from_directory(cls, directory: Path | str, *, bundle: Path | None = None) -> ModelSpec:
        directory = Path(directory)
        return cls(read_model_toml(directory / MODEL_TOML), directory, bundle)


def read_model_toml(path: Path) -> ModelInfo:
    """Parse and validate a ``model.toml``; ModelPackageInvalid naming the file and the key."""
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelPackageInvalid(f"{str(path)!r} does not exist") from exc
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ModelPackageInvalid(f"{str(path)!r} is not valid TOML: {exc}") from exc
    try:
        return ModelInfo(**values)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            key = ".".join(str(part) for part in error["loc"]) or "model.toml"
            got = error.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            problems.append(f"{key}: {error['msg']}{shown}")
        raise ModelPackageInvalid(f"{str(path)!r} is not valid: " + "; ".join(problems)) from exc


@dataclass(frozen=True)
class Prior:
    """An earlier study of the same patient that a route asked for (``priors``), for a model
    that compares: one series of it as a volume, and when it was acquired. A model without
    :meth:`Model.predict_with_priors` never sees it."""

    volume: Volume
    study_instance_uid: str
    series_instance_uid: str
    study_date: str = ""  # YYYYMMDD; "" when the study does not say
    #: days from the prior to the job's study (None when either date is unknown)
    interval_days: int | None = None


@runtime_checkable
class InferenceModel(Protocol):
    """What every model package's entry class implements (built as ``Class(spec)``)."""

    spec: ModelSpec

    def load(self, device: Device | str) -> None:
        """Build the network and load its weights onto ``device``; called once."""

    def predict(self, inputs: Volume | Mapping[str, Volume]) -> Findings:
        """Find things in the input volume(s); deterministic."""


class Model:
    """A base for model packages: loading, sliding-window inference, and the findings' header.

    Subclasses implement :meth:`create_network` (the package's own network, into which the
    weights file ``[weights.network]`` is loaded) and :meth:`predict`; they may override
    :meth:`build_network` to use a bundle's network differently, and :meth:`setup` to load more
    (a second-stage network from ``self.spec.weights_path("classifier")``).
    """

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.device: Device | None = None
        self.network: Any = None  # torch.nn.Module once loaded
        self.bundle: Bundle | None = None

    @property
    def info(self) -> ModelInfo:
        return self.spec.info

    @property
    def name(self) -> str:
        return self.spec.info.name

    @property
    def params(self) -> dict[str, Any]:
        return self.spec.info.params

    @property
    def demo(self) -> bool:
        """Demo weights are in use (a bundle's network replaces them)."""
        return self.spec.info.demo and self.bundle is None

    @property
    def version(self) -> str:
        """The package's version; with a bundle, the bundle's name and version too."""
        if self.bundle is None:
            return self.spec.info.version
        return f"{self.spec.info.version}+bundle.{self.bundle.name}.{self.bundle.version}"

    # -- loading -----------------------------------------------------------------------------

    def load(self, device: Device | str = "cpu") -> None:
        device = resolve_device(device)
        if self.spec.bundle is not None:
            from dicomnode.inference.bundle import load_bundle

            self.bundle = load_bundle(self.spec.bundle, device)
        network = self.build_network(self.bundle)
        if network is not None:
            network = network.to(device.torch).eval()
        self.network = network
        self.device = device
        self.setup()

    def build_network(self, bundle: Bundle | None) -> Any:
        """The network ``predict`` uses: the bundle's when one is configured, else
        :meth:`create_network` with the package's weights."""
        if bundle is not None:
            return bundle.network
        network = self.create_network()
        path = self.spec.weights_path() if network is not None else None
        if path is not None:
            from dicomnode.inference.weights import load_state_dict

            network.load_state_dict(load_state_dict(path))
        return network

    def create_network(self) -> Any:
        """The package's own network, untrained (None: the model has no single network)."""
        return None

    def setup(self) -> None:
        """Called at the end of :meth:`load`, with ``self.device`` and ``self.network`` set."""

    # -- running -----------------------------------------------------------------------------

    def predict(self, inputs: Volume | Mapping[str, Volume]) -> Findings:
        raise NotImplementedError(f"{type(self).__name__}.predict")

    def predict_with_priors(
        self, inputs: Volume | Mapping[str, Volume], priors: Sequence[Prior]
    ) -> Findings:
        """:meth:`predict`, given the patient's prior studies too (most recent first; empty
        when the route asks for none or none was found). This one ignores them: a model that
        compares (growth since the prior) overrides it."""
        return self.predict(inputs)

    def infer(self, image: Any, *, network: Any = None, **overrides: Any) -> Any:
        """``network`` (default: the loaded one) over ``image`` with the ``[inference]``
        sliding window of model.toml (keywords override it, e.g. ``roi_size=...``); see
        :func:`dicomnode.inference.sliding.sliding_window` for the shapes."""
        from dicomnode.inference.sliding import sliding_window

        if self.device is None:
            raise ModelError(f"model {self.name!r} used before load()")
        settings = self.spec.info.inference.model_dump() | overrides
        return sliding_window(
            network if network is not None else self.network, image, device=self.device, **settings
        )

    def label(self, name: str) -> LabelSpec:
        for label in self.spec.info.labels:
            if label.name == name:
                return label
        raise ModelError(f"model {self.name!r} has no label {name!r} in model.toml")

    def threshold(self, name: str, default: float | None = None) -> float:
        value = self.spec.info.thresholds.get(name, default)
        if value is None:
            raise ModelError(f"model {self.name!r} has no threshold {name!r} in model.toml")
        return float(value)

    def finding(self, label: str, probability: float, **values: Any) -> Finding:
        """A finding of ``label`` with its codes from model.toml; indeterminate (see
        :mod:`~dicomnode.inference.calibration`) when ``probability`` is in the band of
        ``[calibration] indeterminate``."""
        from dicomnode.inference.calibration import apply_band

        spec = self.label(label)
        site = spec.finding_site.code if spec.finding_site is not None else None
        finding = Finding(
            label=label,
            finding_type=spec.finding_type.code,
            finding_site=site,
            probability=float(probability),
            category=spec.category,
            **values,
        )
        return apply_band(finding, self.spec.info.calibration.indeterminate)

    def calibrated(self, logits: Any) -> Any:
        """Class probabilities from ``logits`` (numpy or torch, classes last):
        ``softmax(logits / [calibration] temperature)``, numpy float64."""
        from dicomnode.inference.calibration import calibrated_softmax

        if hasattr(logits, "detach"):
            logits = logits.detach().float().cpu().numpy()
        return calibrated_softmax(logits, self.spec.info.calibration.temperature)

    def findings(
        self,
        findings: Sequence[Finding] = (),
        *,
        masks: Mapping[str, Any] | None = None,
        reference: str | None = None,
        summary: Mapping[str, Any] | None = None,
    ) -> Findings:
        """The :class:`Findings` of this model (name, version, demo flag filled in)."""
        return Findings(
            model=self.name,
            version=self.version,
            demo=self.demo,
            findings=tuple(findings),
            masks=dict(masks or {}),
            reference=reference,
            summary=dict(summary or {}),
        )

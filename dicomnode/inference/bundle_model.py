"""A MONAI bundle as a model of its own: run as MONAI's bundle runner runs it, on a loaded series.

A name in ``[models] bundles`` that is no model package is a model of its own. Its spec comes
from the bundle's ``configs/metadata.json`` (:func:`bundle_spec`): the version, the input's
modality, and the labels of the output's ``channel_def`` (a segmentation's ``"0"``, the
background, left out; a classification's every class), each coded from pydicom's SNOMED CT
dictionary where a concept is named like the label (``spleen`` -> 78961009 Spleen), else with a
code of the node's own scheme (:data:`LOCAL_SCHEME`) whose meaning is the label (a warning, and
the label in ``spec.uncoded_labels``). What the site says in ``[models.bundle_settings.NAME]``
(codes, categories, a threshold, what the model accepts, its description) wins over all that.
Each label carries its SEG category (:func:`label_category`): the site's, else a lesion when its
name or meaning names one (tumour, lesion, nodule, mass, metastasis, cyst, ...), else anatomy
(a bundle's segmentation is most often of organs).

:class:`BundleModel` runs ``inference.json`` as MONAI's evaluator does: ``preprocessing`` on
``{"image": series}``, ``inferer(image[None], network)``, the batch decollated and
``postprocessing`` on each item. Two things change, as MONAI Deploy's bundle operator changes
them: the file loader (``LoadImage``/``LoadImaged``) is left out of the preprocessing, its place
taken by the series the node loaded, as the MetaTensor such a loader makes (``[x, y, z]``, the
affine in RAS), so ``Orientationd``, ``Spacingd`` and ``Invertd`` work unchanged; and the writers
(``SaveImage``/``SaveImaged``) are left out of the postprocessing. The prediction, on the source
grid (``Invertd`` put it there; a bundle without one is resampled, nearest), is the label map
``labels`` (``[slice, row, column]``) with one finding per label that has voxels: its volume
and centre. A classification (an output of ``probabilities``/``classes``) gives the argmax
class (or, with a threshold, each class that reaches it) as a finding with its probability, and
every class's probability in the summary.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from dicomnode.domain import Finding, Findings
from dicomnode.envelope import Envelope
from dicomnode.errors import BundleInvalid, InputsRejected, ModelError
from dicomnode.inference.bundle import bundle_layout
from dicomnode.inference.findings import LABEL_MAP, MapLabel, label_map_findings
from dicomnode.inference.protocol import (
    Accepts,
    CodeSpec,
    LabelSpec,
    Model,
    ModelInfo,
    ModelSpec,
)

if TYPE_CHECKING:
    from dicomnode.config import BundleSettings
    from dicomnode.imaging import Volume
    from dicomnode.inference.device import Device

logger = logging.getLogger(__name__)

#: the ``entry`` of a bundle's spec: the registry makes a :class:`BundleModel` for it
BUNDLE_ENTRY = "dicomnode.inference.bundle_model:BundleModel"
#: the mask the label map goes under
#: the coding scheme of a label that no SNOMED CT concept is named like
LOCAL_SCHEME = "99DICOMNODE"
#: the data keys of MONAI's engines (monai.utils.CommonKeys)
IMAGE_KEY, PRED_KEY = "image", "pred"
#: transforms the node does itself: loading the series, writing the results
LOADERS = frozenset({"LoadImage", "LoadImaged", "LoadImageD", "LoadImageDict"})
WRITERS = frozenset({"SaveImage", "SaveImaged", "SaveImageD", "SaveImageDict"})
#: ``network_data_format.outputs`` types/formats of a classification (no image out)
CLASSIFICATION_KINDS = frozenset({"probabilities", "probability", "classes", "classification"})
#: ``spec.info.params["output"]``: what the bundle gives
SEGMENTATION, CLASSIFICATION = "segmentation", "classification"
#: words in a label's name or its code's meaning that make it a lesion, not anatomy
LESION_WORDS = re.compile(
    r"tumou?r|lesion|nodul|mass|metasta|cyst|neoplasm|cancer|carcinom|malignan|polyp|"
    r"abnormal|oedema|edema|hemorrhag|haemorrhag|infarct|necros|fractur",
    re.IGNORECASE,
)
_MODALITIES = {"CT": "CT", "MR": "MR", "MRI": "MR", "PT": "PT", "PET": "PT", "US": "US"}


def read_metadata(path: Path) -> dict[str, Any]:
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BundleInvalid(f"bundle {str(path)!r} is not valid JSON: {exc}") from exc
    if not isinstance(metadata, dict):
        raise BundleInvalid(f"bundle {str(path)!r} is not a JSON object")
    return metadata


def bundle_output(metadata: Mapping[str, Any], where: str) -> tuple[str, str, dict[int, str]]:
    """The output of ``network_data_format.outputs`` the node reports: its key, what it is
    (:data:`SEGMENTATION`, else :data:`CLASSIFICATION`) and its channels (``channel_def``;
    without one, ``label_<n>``, or ``class_<n>``, for each of ``num_channels``)."""
    outputs = (metadata.get("network_data_format") or {}).get("outputs") or {}
    if not isinstance(outputs, Mapping) or not outputs:
        raise BundleInvalid(
            f"bundle {where!r}: metadata.json has no network_data_format.outputs; a bundle "
            "that is a model of its own must describe its output there"
        )
    kinds, found = {}, []
    for key, output in outputs.items():
        output = output if isinstance(output, Mapping) else {}
        kind = str(output.get("format") or output.get("type") or "")
        kinds[key] = kind
        types = {str(output.get(k) or "").lower() for k in ("format", "type")}
        if types & CLASSIFICATION_KINDS and "segmentation" not in types:
            found.append((1, str(key), CLASSIFICATION, output))
            continue
        if kind.lower() not in ("segmentation", "labels", "image"):
            continue
        if kind.lower() == "image" and "channel_def" not in output and "num_channels" not in output:
            continue
        found.append((0, str(key), SEGMENTATION, output))
    if not found:
        raise BundleInvalid(
            f"bundle {where!r}: no segmentation or classification among its outputs ({kinds}); "
            "expected an output of format 'segmentation' or of type 'probabilities'"
        )
    _, key, what, output = min(found, key=lambda f: f[0])  # a segmentation first
    channel_def = output.get("channel_def")
    if isinstance(channel_def, Mapping) and channel_def:
        try:
            channels = {int(k): str(v) for k, v in channel_def.items()}
        except ValueError as exc:
            raise BundleInvalid(
                f"bundle {where!r}: output {key!r} channel_def keys must be channel "
                f"numbers, not {list(channel_def)}"
            ) from exc
        return key, what, channels
    count = int(output.get("num_channels") or 0)
    if count < 2:
        raise BundleInvalid(
            f"bundle {where!r}: output {key!r} has no channel_def and num_channels "
            f"{count}; expected the labels, e.g. {{'0': 'background', '1': 'spleen'}}"
        )
    if what == CLASSIFICATION:
        return key, what, {n: f"class_{n}" for n in range(count)}
    return key, what, {n: ("background" if n == 0 else f"label_{n}") for n in range(count)}


def segmentation_output(metadata: Mapping[str, Any], where: str) -> tuple[str, dict[int, str]]:
    """The segmentation output of ``network_data_format.outputs``: its key and its channels;
    BundleInvalid for a bundle that has none."""
    key, what, channels = bundle_output(metadata, where)
    if what != SEGMENTATION:
        raise BundleInvalid(f"bundle {where!r}: output {key!r} is a {what}, not a segmentation")
    return key, channels


@cache
def _sct_keywords() -> dict[str, str]:
    """pydicom's SNOMED CT keywords, by their letters in lower case."""
    from pydicom.sr.codedict import codes

    return {k.lower(): k for k in codes.SCT.dir()}


def label_code(label: str) -> tuple[CodeSpec, bool]:
    """The label's code and whether it is a SNOMED CT concept: the concept whose keyword is the
    label's words (``left_kidney`` -> ``LeftKidney``), else :data:`LOCAL_SCHEME`."""
    from pydicom.sr.codedict import codes

    words = re.sub(r"[^a-z0-9]", "", label.lower())
    keyword = _sct_keywords().get(words)
    if keyword is not None:
        code = getattr(codes.SCT, keyword)
        meaning = str(code.meaning)[:64]
        return CodeSpec(value=str(code.value), scheme="SCT", meaning=meaning), True
    value = re.sub(r"[^A-Za-z0-9_.-]", "_", label)[:64]
    return CodeSpec(value=value, scheme=LOCAL_SCHEME, meaning=label[:64]), False


def label_category(label: str, code: CodeSpec) -> Literal["anatomy", "lesion"]:
    """A label's SEG category when the site names none: a lesion when its name or its code's
    meaning names one (tumour, lesion, nodule, mass, metastasis, cyst, ...), else anatomy (an
    organ, a structure: what a bundle most often segments)."""
    return "lesion" if LESION_WORDS.search(f"{label} {code.meaning}") else "anatomy"


def _site_labels(
    name: str, settings: BundleSettings | None, channels: Mapping[int, str]
) -> dict[int, Any]:
    """The site's label codes by channel: a key is a label's name, else its channel number."""
    out: dict[int, Any] = {}
    by_name = {label: value for value, label in channels.items()}
    for key, code in (settings.labels if settings is not None else {}).items():
        channel = by_name.get(key)
        if channel is None and key.strip().isdigit() and int(key) in channels:
            channel = int(key)
        if channel is None:
            listed = ", ".join(f"{v}={label!r}" for v, label in sorted(channels.items()))
            raise BundleInvalid(
                f"[models.bundle_settings.{name}.labels] names {key!r}, which is no label of "
                f"the bundle; expected a label name or channel number of: {listed}"
            )
        out[channel] = code
    return out


def bundle_spec(name: str, path: Path | str, settings: BundleSettings | None = None) -> ModelSpec:
    """The spec of a bundle that is a model of its own; cheap (metadata.json only).
    ``settings`` (``[models.bundle_settings.NAME]``) win over what metadata.json says."""
    try:
        layout = bundle_layout(path)
    except BundleInvalid as exc:
        raise BundleInvalid(
            f"[models] bundles names model {name!r}, which is no model package, so the bundle "
            f"is a model of its own: {exc}"
        ) from exc
    if settings is not None and settings.level != "series":
        raise BundleInvalid(
            f"[models.bundle_settings.{name}] level {settings.level!r} is not supported yet: a "
            "bundle of its own runs on one series (level 'series')"
        )
    metadata = read_metadata(layout.metadata)
    key, what, channels = bundle_output(metadata, str(layout.root))
    site = _site_labels(name, settings, channels)
    labels, uncoded = [], []
    for channel, label in sorted(channels.items()):
        if what == SEGMENTATION and channel == 0:
            if channel in site:
                raise BundleInvalid(
                    f"[models.bundle_settings.{name}.labels] codes channel 0 ({label!r}), the "
                    "background of a segmentation, which is no segment"
                )
            continue  # the background
        given = site.get(channel)
        if given is not None:
            code = CodeSpec(value=given.value, scheme=given.scheme, meaning=given.meaning)
            category = given.category or label_category(label, code)
        else:
            code, coded = label_code(label)
            category = label_category(label, code)
            if not coded:
                uncoded.append(label)
                logger.warning(
                    "bundle %s: label %r is no SNOMED CT concept by name and the site codes it "
                    "not ([models.bundle_settings.%s.labels]); coded %s %s",
                    name,
                    label,
                    name,
                    code.scheme,
                    code.value,
                    extra={"action": "bundle_labels"},
                )
        # a class's value is its channel + 1 (values start at 1); a segment's, its label value
        value = channel if what == SEGMENTATION else channel + 1
        labels.append(LabelSpec(name=label, value=value, finding_type=code, category=category))
    inputs = (metadata.get("network_data_format") or {}).get("inputs") or {}
    image: Any = (inputs.get(IMAGE_KEY) or next(iter(inputs.values()), {})) if inputs else {}
    modality = _MODALITIES.get(str((image or {}).get("modality", "")).upper())
    accepts = Accepts(modalities=(modality,) if modality else ())
    if settings is not None and settings.accepts is not None:
        given_accepts = settings.accepts
        accepts = Accepts(
            modalities=tuple(m.upper() for m in given_accepts.modalities),
            sop_classes=tuple(given_accepts.sop_classes),
            min_slices=given_accepts.min_slices,
            body_parts=tuple(given_accepts.body_parts),
        )
    threshold = settings.threshold if settings is not None else None
    description = settings.description if settings is not None else ""
    try:
        info = ModelInfo(
            name=name,
            version=f"bundle.{metadata.get('name') or layout.root.name}."
            f"{metadata.get('version') or '0'}",
            description=description
            or str(metadata.get("task") or metadata.get("description") or ""),
            entry=BUNDLE_ENTRY,
            demo=False,
            accepts=accepts,
            envelope=settings.envelope if settings and settings.envelope else Envelope(),
            labels=tuple(labels),
            thresholds={} if threshold is None else {"probability": threshold},
            params={"output": what, "output_key": key},
        )
    except ValueError as exc:
        raise BundleInvalid(f"bundle {str(layout.root)!r} as model {name!r}: {exc}") from exc
    return ModelSpec(info, layout.root, layout.root, uncoded_labels=tuple(uncoded))


def ras_affine(volume: Volume) -> Any:
    """The series' affine as MONAI's image loader gives it: ``[x, y, z]`` voxels to RAS mm."""
    import numpy as np

    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ volume.geometry.affine  # LPS -> RAS


def series_image(volume: Volume) -> Any:
    """The series as MONAI's image loader gives it: a MetaTensor ``[x, y, z]`` (column, row,
    slice) with the affine in RAS and no channel axis."""
    import numpy as np
    import torch
    from monai.data import MetaTensor

    if volume.samples != 1:
        raise InputsRejected(
            f"series {volume.series_instance_uid} has {volume.samples} samples per voxel; "
            "a bundle runs on grey-level volumes"
        )
    array = np.ascontiguousarray(volume.array.transpose(2, 1, 0), dtype=np.float32)
    affine = ras_affine(volume)
    meta = {
        "original_affine": affine.copy(),
        "spatial_shape": np.array(array.shape),
        "original_channel_dim": "no_channel",
        "space": "RAS",
        "filename_or_obj": volume.series_instance_uid,
    }
    return MetaTensor(torch.from_numpy(array), affine=torch.from_numpy(affine), meta=meta)


def _without(compose: Any, names: frozenset[str]) -> Any:
    """A copy of the Compose without the transforms named; the others are the same objects
    (so ``Invertd`` over the original inverts what they did)."""
    from monai.transforms import Compose

    if not isinstance(compose, Compose):
        return compose
    out = copy.copy(compose.flatten())
    out.transforms = [t for t in out.transforms if type(t).__name__ not in names]
    return out


def _target_name(item: Any) -> str:
    target = item.get("_target_") if isinstance(item, Mapping) else None
    return str(target).rpartition(".")[2] if isinstance(target, str) else ""


def _drop_from_config(parser: Any, key: str, names: frozenset[str]) -> None:
    """Leave the components named out of the Compose config ``key`` (its ``transforms``
    list, nested Composes included); a Compose made by an expression is filtered once made."""
    if key not in parser:
        return

    def prune(config: Any) -> Any:
        if isinstance(config, list):
            return [prune(c) for c in config if _target_name(c) not in names]
        if isinstance(config, Mapping) and isinstance(config.get("transforms"), list):
            return {**config, "transforms": prune(config["transforms"])}
        return config

    config = parser[key]
    pruned = prune(config)
    if pruned != config:
        parser[key] = pruned


class BundleModel(Model):
    """A MONAI bundle's segmentation or classification, run as its inference.json says, on one
    series."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        self.weights_sha256: str | None = None
        self.preprocessing: Any = None
        self.inferer: Any = None
        self.postprocessing: Any = None

    @property
    def version(self) -> str:
        return self.spec.info.version

    def load(self, device: Device | str = "cpu") -> None:
        from dicomnode.inference.bundle import load_bundle
        from dicomnode.inference.device import resolve_device
        from dicomnode.inference.weights import sha256_of

        device = resolve_device(device)
        assert self.spec.bundle is not None
        bundle = load_bundle(self.spec.bundle, device)
        self.weights_sha256 = sha256_of(bundle.layout.weights)
        parser = bundle.parser
        # the config's own components on this device (the zoo's say cuda:0 when there is one)
        parser["device"] = f"$torch.device({str(device.torch)!r})"
        where = str(bundle.path)
        missing = [k for k in ("preprocessing", "inferer") if k not in parser]
        if missing:
            raise BundleInvalid(
                f"bundle {where!r}: inference config has no {', '.join(missing)} (expected "
                "preprocessing, inferer and postprocessing as in the Model Zoo's bundles)"
            )
        # the loader and the writers out of the config before anything is made: a writer is
        # made with its file format's backend (nibabel for NIfTI), which the node need not have
        for key, names in (("preprocessing", LOADERS), ("postprocessing", WRITERS)):
            _drop_from_config(parser, key, names)
        try:
            preprocessing = bundle.get("preprocessing")
            self.inferer = bundle.get("inferer")
            postprocessing = bundle.get("postprocessing")
        except Exception as exc:
            from dicomnode.inference.bundle import _cause

            raise BundleInvalid(
                f"bundle {where!r}: its pre/postprocessing or inferer could not be made: "
                f"{_cause(exc)}"
            ) from exc
        self.preprocessing = _without(preprocessing, LOADERS)
        self.postprocessing = _without(postprocessing, WRITERS)
        self.bundle, self.network, self.device = bundle, bundle.network, device
        logger.info(
            "model %s: bundle %s %s loaded on %s, weights sha256 %s",
            self.name,
            bundle.name,
            bundle.version,
            device,
            self.weights_sha256,
            extra={"action": "model_load"},
        )

    def predict(self, inputs: Volume | Mapping[str, Volume]) -> Findings:

        if isinstance(inputs, Mapping):
            if len(inputs) != 1:
                raise InputsRejected(
                    f"model {self.name!r} (a bundle) runs on one series, not {sorted(inputs)}"
                )
            (volume,) = inputs.values()
        else:
            volume = inputs
        if self.bundle is None or self.device is None:
            raise ModelError(f"model {self.name!r} used before load()")
        if self.spec.info.params.get("output") == CLASSIFICATION:
            return self.classify(volume)
        labels = self.label_map(volume)
        classes = [
            MapLabel(spec.value, spec.name, spec.finding_type.code, spec.category)
            for spec in self.spec.info.labels
        ]
        findings, voxels = label_map_findings(labels, volume.geometry, classes)
        return self.findings(
            findings,
            masks={LABEL_MAP: labels} if findings else {},
            reference=volume.series_instance_uid,
            summary={
                "bundle": self.bundle.name,
                "bundle_version": self.bundle.version,
                "weights_sha256": self.weights_sha256,
                "voxels": voxels,
            },
        )

    def run(self, volume: Volume) -> tuple[Any, Any]:
        """The bundle on ``volume`` as MONAI's evaluator runs it: a batch of one (its data
        loader's collation), the inferer, the batch decollated, the postprocessing on the item;
        the item's prediction after the postprocessing, and the network's before it."""
        import torch
        from monai.data import decollate_batch, list_data_collate

        from dicomnode.inference.sliding import check_cancelled

        network = self.network

        def run(window: Any, *args: Any, **kwargs: Any) -> Any:
            check_cancelled()  # a cancelled job stops at its next window
            return network(window, *args, **kwargs)

        batch = list_data_collate([self.preprocessing({IMAGE_KEY: series_image(volume)})])
        assert self.device is not None
        image = batch[IMAGE_KEY].to(self.device.torch)
        with torch.no_grad():
            pred = self.inferer(image, run)
        raw = pred[0].detach().cpu() if hasattr(pred, "detach") else None
        item = decollate_batch({**batch, IMAGE_KEY: image, PRED_KEY: pred})[0]
        item = self.postprocessing(item) if self.postprocessing is not None else item
        return item[PRED_KEY], raw

    def label_map(self, volume: Volume) -> Any:
        """The bundle's prediction on ``volume``'s grid: ``[slice, row, column]`` label values."""
        import numpy as np

        out, _ = self.run(volume)
        # the source grid, without a second copy of the series: [x, y, z] and its RAS affine
        shape, affine = tuple(reversed(volume.array.shape[:3])), ras_affine(volume)
        if tuple(out.shape[1:]) != shape or not np.allclose(
            np.asarray(out.affine), affine, atol=1e-3
        ):
            out = self._to_source(out, shape, affine)
        array = out.detach().cpu()
        labels = self.spec.info.labels
        threshold = self.spec.info.thresholds.get("probability")
        if array.shape[0] > 1:  # one channel per label, the background first (not discretised)
            values = array.argmax(0).numpy()  # int64, once (no further full-size int64 copies)
        elif threshold is not None and len(labels) == 1:  # one label's probabilities (sigmoid)
            values = np.where(array[0].float().numpy() >= threshold, labels[0].value, 0)
        else:
            values = np.rint(array[0].numpy()).astype(np.int64)
        top = max((label.value for label in self.spec.info.labels), default=0)
        values[(values < 0) | (values > top)] = 0
        dtype = np.uint8 if top < 256 else np.uint16
        # narrow first, then the [slice, row, column] copy: one small array, not two int64 ones
        return np.ascontiguousarray(values.astype(dtype).transpose(2, 1, 0))

    def class_probabilities(self, volume: Volume) -> Any:
        """The probability of each class (in channel order) the bundle gives ``volume``: its
        postprocessing's output (Activations softmax); a postprocessing that gives logits has
        softmax applied, one that gives the class (AsDiscrete argmax) the softmax of the
        network's output."""
        import numpy as np
        import torch

        count = len(self.spec.info.labels)
        out, raw = self.run(volume)
        values = torch.as_tensor(out).detach().cpu().float().flatten()
        if values.numel() == count:
            if float(values.min()) < -1e-6 or float(values.max()) > 1 + 1e-6:
                values = torch.softmax(values, 0)  # logits: no activation in the postprocessing
        elif values.numel() == 1 and raw is not None and raw.numel() == count:
            values = torch.softmax(raw.float().flatten(), 0)  # argmax'd: the network's scores
        else:
            raise BundleInvalid(
                f"bundle {str(self.spec.bundle)!r}: its classification gives "
                f"{tuple(values.shape)} values; metadata.json names {count} classes"
            )
        return np.asarray(values.numpy(), dtype=np.float64)

    def classify(self, volume: Volume) -> Findings:
        """The argmax class (with a threshold, each class that reaches it) as a finding with its
        probability; every class's probability in the summary."""
        import numpy as np

        probabilities = self.class_probabilities(volume)
        labels = sorted(self.spec.info.labels, key=lambda label: label.value)
        threshold = self.spec.info.thresholds.get("probability")
        top = int(np.argmax(probabilities))
        chosen = (
            [top]
            if threshold is None
            else [n for n, p in enumerate(probabilities) if p >= threshold]
        )
        findings = [
            Finding(
                label=labels[n].name,
                finding_type=labels[n].finding_type.code,
                probability=round(float(probabilities[n]), 4),
                category=labels[n].category,
                attributes={"class_index": labels[n].value - 1},
            )
            for n in chosen
        ]
        assert self.bundle is not None
        return self.findings(
            findings,
            reference=volume.series_instance_uid,
            summary={
                "bundle": self.bundle.name,
                "bundle_version": self.bundle.version,
                "weights_sha256": self.weights_sha256,
                "class": labels[top].name,
                "probability": round(float(probabilities[top]), 4),
                "class_probabilities": {
                    label.name: round(float(p), 4)
                    for label, p in zip(labels, probabilities, strict=True)
                },
            },
        )

    def _to_source(self, out: Any, shape: tuple[int, ...], affine: Any) -> Any:
        """The prediction resampled (nearest) onto the source grid: for a bundle whose
        postprocessing does not invert its spatial preprocessing."""
        import torch
        from monai.data import MetaTensor
        from monai.transforms import SpatialResample

        logger.warning(
            "model %s: the bundle's prediction is not on the series' grid (no Invertd in its "
            "postprocessing?); resampled onto it, nearest",
            self.name,
            extra={"action": "bundle_resample"},
        )
        if not isinstance(out, MetaTensor):
            raise BundleInvalid(
                f"bundle {str(self.spec.bundle)!r}: its prediction has no affine and is "
                f"{tuple(out.shape[1:])}, not the series' {shape}"
            )
        resample = SpatialResample(mode="nearest", dtype=torch.float64)  # type: ignore[arg-type]
        return resample(out.float(), dst_affine=torch.as_tensor(affine), spatial_size=shape)

"""The demo's phantom studies: a chest CT with nodules, a four-sequence brain MRI with a tumor,
and a retinal OCT volume, each written as DICOM with what its findings should be.

``dicomnode demo`` sends them to a node and prints what came back; the end-to-end test and
``benchmarks/e2e.py`` send the same studies through Orthanc.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: study name -> the model its route runs
MODELS = {"chest": "lung_nodule", "brain": "brain_tumor", "retina": "oct_grading"}


@dataclass(frozen=True)
class DemoStudy:
    """One written phantom study and its truth."""

    name: str  # chest, brain, retina
    model: str
    study_instance_uid: str
    files: tuple[Path, ...]
    expected: str  # the truth, in words
    truth: Any = field(repr=False, compare=False)


def chest_study(folder: Path, seed: int = 0) -> DemoStudy:
    """A 300-slice chest CT (512 x 512, 0.7 x 0.7 x 1 mm) with five nodules, 6 to 25 mm."""
    from dicomnode.phantoms.chest import Truth, chest_ct

    phantom = chest_ct((300, 512, 512), (0.7, 0.7, 1.0), nodules=5, seed=7000 + seed,
                       sizes=(6.0, 25.0), ground_glass_fraction=0.2)  # fmt: skip
    files = phantom.write(folder / "chest")
    truth = Truth.load(folder / "chest" / "truth.json")
    sizes = ", ".join(f"{n.diameter_mm:.0f}" for n in truth.nodules)
    return DemoStudy(
        "chest", MODELS["chest"], truth.study_instance_uid, tuple(files),
        f"{len(truth.nodules)} lung nodules ({sizes} mm)", truth,
    )  # fmt: skip


def brain_study(folder: Path, seed: int = 0) -> DemoStudy:
    """T1, T1 post-contrast, T2 and FLAIR of one head with a tumor."""
    from dicomnode.phantoms.brain import brain_phantom

    study = brain_phantom(7100 + seed).write(folder / "brain")
    files = tuple(path for paths in study.paths.values() for path in paths)
    volumes = ", ".join(
        f"{name.replace('_', ' ')} {volume / 1000:.1f} mL"
        for name, volume in study.truth.volumes_mm3.items()
    )
    return DemoStudy(
        "brain", MODELS["brain"], study.truth.study_instance_uid, files,
        f"brain tumor: {volumes}", study.truth,
    )  # fmt: skip


def retina_study(folder: Path, seed: int = 0) -> DemoStudy:
    """A multi-frame OCT volume of an eye with diabetic retinopathy of grade 3."""
    from pydicom import dcmread

    from dicomnode.phantoms.retina import oct_volume

    phantom = oct_volume(3, seed=7200 + seed)
    files = phantom.write(folder / "retina")
    study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    kinds = ", ".join(sorted(phantom.truth.kinds)) or "none"
    return DemoStudy(
        "retina", MODELS["retina"], study_uid, tuple(files),
        f"diabetic retinopathy grade {phantom.truth.grade} (lesions: {kinds})", phantom.truth,
    )  # fmt: skip


BUILDERS = {"chest": chest_study, "brain": brain_study, "retina": retina_study}


def demo_studies(
    folder: Path, names: Iterable[str] = tuple(BUILDERS), seed: int = 0
) -> list[DemoStudy]:
    """Write the named demo studies under ``folder``."""
    names = list(names)
    unknown = sorted(set(names) - set(BUILDERS))
    if unknown:
        raise ValueError(f"unknown demo studies {unknown}; expected some of {sorted(BUILDERS)}")
    return [BUILDERS[name](Path(folder), seed) for name in names]

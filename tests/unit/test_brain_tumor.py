"""The brain tumor model's steps without its weights: one grid for the four sequences, the zoo's
normalisation, and TC/WT/ET turned into sub-regions on the reference series."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("monai")

from dicomnode.errors import InputsRejected
from dicomnode.imaging import patient_grid
from dicomnode.inference import ModelSpec
from dicomnode.inference.registry import import_entry
from dicomnode.phantoms.brain import STUDY, brain_phantom

MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "brain_tumor"
COARSE = tuple(plan.scaled(2.0) for plan in STUDY)


@pytest.fixture(scope="module")
def model() -> Any:
    spec = ModelSpec.from_directory(MODEL_DIR)
    return import_entry(spec)(spec)  # not loaded: the steps below need no network


@pytest.fixture(scope="module")
def volumes() -> dict[str, Any]:
    return brain_phantom(3101).volumes(COARSE)


def test_model_toml_declares_a_study_level_mr_model(model: Any) -> None:
    info = model.info
    assert info.accepts.level == "study" and info.accepts.modalities == ("MR",)
    assert list(info.accepts.inputs) == ["T1c", "T1", "T2", "FLAIR"]
    labels = {label.name: (label.value, label.finding_type.value) for label in info.labels}
    assert labels == {"necrotic_core": (1, "6574001"), "edema": (2, "79654002"),
                      "enhancing_tumor": (3, "108369006")}  # fmt: skip
    assert info.demo and model.reference_input == "FLAIR"
    weights = MODEL_DIR / info.weights["network"].file
    assert weights.is_file() and weights.stat().st_size < 20e6


def test_normalisation_is_monais_nonzero_channel_wise() -> None:
    from monai.transforms import NormalizeIntensity

    module = import_entry(ModelSpec.from_directory(MODEL_DIR)).__module__
    normalise = __import__(module, fromlist=["normalise_nonzero"]).normalise_nonzero
    rng = np.random.default_rng(0)
    array = rng.uniform(10, 500, (4, 9, 8, 7)).astype(np.float32)
    array[:, :3] = 0.0
    array[2] = 0.0  # an empty channel stays empty
    expected = NormalizeIntensity(nonzero=True, channel_wise=True)(array)
    assert np.allclose(normalise(array), np.asarray(expected), atol=1e-5)


def test_the_four_sequences_meet_on_one_grid_cropped_to_the_head(
    model: Any, volumes: dict[str, Any]
) -> None:
    image = model.preprocess(volumes)
    assert image.channels == ("T1c", "T1", "T2", "FLAIR") and image.missing == ()
    assert image.array.shape == (4, *image.grid.shape[::-1])  # [C, x, y, z]
    assert all(n % 8 == 0 for n in image.grid.shape)
    assert image.grid.spacing == pytest.approx((2.0, 2.0, 2.0))
    assert np.allclose(image.grid.direction, np.eye(3))  # L, P, S: the BraTS layout
    union = patient_grid([v.geometry for v in volumes.values()], 2.0)
    assert np.prod(image.grid.shape) < np.prod(union.shape)  # the air round the head is gone
    assert not image.array[:, 0, 0, 0].any()  # the air round the head is zero in every channel
    for channel in image.array:  # non-zero voxels (the head) normalised
        values = channel[channel != 0]
        assert abs(values.mean()) < 1e-3 and values.std() == pytest.approx(1.0, abs=1e-3)
    # the tumor's necrotic centre is bright on T2 at its place on the grid
    centre = brain_phantom(3101).tumor.centre
    k, j, i = image.grid.array_index(centre)
    assert image.array[2, i, j, k] > 1.0


def test_a_missing_sequence_is_a_channel_of_zeros(model: Any, volumes: dict[str, Any]) -> None:
    image = model.preprocess({k: v for k, v in volumes.items() if k != "FLAIR"})
    assert image.missing == ("FLAIR",)
    assert not image.array[3].any() and image.array[0].any()
    assert model._reference_name({k: v for k, v in volumes.items() if k != "FLAIR"}) == "T1c"
    with pytest.raises(InputsRejected, match="T1c, T1, T2, FLAIR"):
        model.preprocess({"DWI": volumes["T1"]})


def test_nested_channels_become_sub_regions_on_the_reference_grid(
    model: Any, volumes: dict[str, Any]
) -> None:
    flair = volumes["FLAIR"].geometry
    grid = patient_grid([flair], 2.0)
    centre = np.array(flair.voxel_to_patient(np.array(flair.shape[::-1]) / 2))
    k, j, i = np.meshgrid(*[np.arange(n) for n in grid.shape], indexing="ij")
    points = grid.voxel_to_patient(np.stack([i, j, k], -1).reshape(-1, 3))
    distance = np.linalg.norm(points - centre, axis=1).reshape(grid.shape)
    # whole tumor 30 mm, core 18 mm, enhancing a shell 10..18 mm
    probabilities = np.stack([distance < 18, distance < 30, (distance < 18) & (distance >= 10)])
    labels, on_reference = model.sub_regions(probabilities.astype(np.float32), grid, flair)
    assert labels.shape == flair.shape and labels.dtype == np.uint8
    assert on_reference.shape == (3, *flair.shape)
    k, j, i = np.meshgrid(*[np.arange(n) for n in flair.shape], indexing="ij")
    points = flair.voxel_to_patient(np.stack([i, j, k], -1).reshape(-1, 3))
    distance = np.linalg.norm(points - centre, axis=1).reshape(flair.shape)
    inner = labels[distance < 8]
    assert (inner == 1).mean() > 0.95  # necrotic core: TC minus ET
    assert (labels[(distance > 12) & (distance < 16)] == 3).mean() > 0.95  # enhancing
    assert (labels[(distance > 20) & (distance < 28)] == 2).mean() > 0.95  # edema: WT minus TC
    assert not labels[distance > 32].any()


def test_each_channel_has_its_own_threshold(model: Any, tmp_path: Path) -> None:
    """The enhancing tumor's threshold (fitted by train.py) applies to ET alone, and a channel
    model.toml gives none for takes ``probability``."""
    nested_labels = sys.modules[type(model).__module__].nested_labels
    distance = np.abs(np.arange(40, dtype=np.float32) - 20)[None, None, :]
    # TC and WT sure out to 10 and 16 voxels; ET 0.6 on a shell 6..10
    probabilities = np.stack(
        [distance < 10, distance < 16, np.where((distance >= 6) & (distance < 10), 0.6, 0.0)]
    ).astype(np.float32)
    assert ((nested_labels(probabilities, (0.5, 0.5, 0.5)) == 3).sum()) == 8
    labels = nested_labels(probabilities, (0.5, 0.5, 0.7))
    assert not (labels == 3).any() and (labels == 1).sum() == 19  # the shell is core then

    tc, wt, et = model.channel_thresholds()
    assert et == model.spec.info.thresholds["enhancing_tumor"]
    assert tc == wt == model.spec.info.thresholds["probability"]
    package = tmp_path / "brain_tumor"
    shutil.copytree(MODEL_DIR, package, ignore=shutil.ignore_patterns("weights"))
    toml = package / "model.toml"
    toml.write_text(re.sub(r"(?m)^enhancing_tumor = .*$", "", toml.read_text()))
    spec = ModelSpec.from_directory(package)
    assert import_entry(spec)(spec).channel_thresholds() == (0.5, 0.5, 0.5)

"""The model registry: packages found in a models folder, model.toml checks, weights' sha256,
unknown names, bundles named in the config, the queue's models; and a light import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dicomnode.config import Settings
from dicomnode.domain import Code, Findings
from dicomnode.errors import (
    BundleInvalid,
    ConfigError,
    ModelError,
    ModelPackageInvalid,
    UnknownModel,
    WeightsMismatch,
    WeightsMissing,
)
from dicomnode.inference import ModelRegistry, ModelSpec, read_model_toml
from dicomnode.pipeline import ModelPipeline, job_models
from dicomnode.queue.worker import JobModel
from dicomnode.testing.bundles import sha256_hex, write_model_package
from dicomnode.testing.models import MODELS, EchoModel

WEIGHTS = b"demo weights, not a network"

#: A package split in modules (relative import) with a weights file, needing no torch.
SPLIT_MODEL = """
from dicomnode.inference import Model

from .helpers import describe


class Split(Model):
    def load(self, device):
        self.device = device
        self.weights = self.spec.weights_path().read_bytes()

    def predict(self, inputs):
        return self.findings(summary={"text": describe(inputs), "weights": len(self.weights)})
"""

SPLIT_TOML = """
name = "split"
version = "2.1.0"
entry = "model:Split"

[weights]
file = "weights/demo.bin"
sha256 = "{sha}"
"""


def volume(array: np.ndarray):  # type: ignore[no-untyped-def]
    imaging = pytest.importorskip("dicomnode.imaging")
    affine = np.diag([0.7, 0.7, 1.25, 1.0])
    frames = tuple(
        imaging.FrameRef(f"1.2.3.{k}", "1.2.840.10008.5.1.4.1.1.2", None, f"{k}.dcm")
        for k in range(array.shape[0])
    )
    return imaging.Volume(
        array.astype(np.float32), imaging.Geometry(affine, array.shape), frames, "CT", "1.2.3"
    )


def split_package(models: Path, sha: str | None = None) -> Path:
    folder = write_model_package(
        models,
        "split",
        source=SPLIT_MODEL,
        toml=SPLIT_TOML.format(sha=sha or sha256_hex(WEIGHTS)),
        files={"weights/demo.bin": WEIGHTS},
    )
    (folder / "helpers.py").write_text("def describe(inputs):\n    return 'described'\n")
    return folder


def test_discovers_a_package_and_runs_it(tmp_path: Path) -> None:
    write_model_package(tmp_path / "models", "stats")
    registry = ModelRegistry([tmp_path / "models"])
    assert registry.names() == ["stats"]  # the test model echo is no package
    spec = registry.spec("stats")
    assert spec.directory == (tmp_path / "models" / "stats").resolve()
    assert spec.info.accepts.modalities == ("CT",) and spec.info.demo
    assert spec.info.labels[0].finding_type.code == Code("123037004", "SCT", "Body structure")

    model = registry.load("stats", "cpu")
    array = np.full((4, 8, 8), -1000.0)
    array[1:3, 2:6, 2:6] = 40.0
    findings = model.predict(volume(array))
    assert isinstance(findings, Findings)
    assert (findings.model, findings.version, findings.demo) == ("stats", "1.0.0", True)
    assert findings.summary["shape"] == [4, 8, 8]
    assert findings.summary["mean_hu"] == pytest.approx(array.mean())
    (body,) = findings.findings
    assert body.volume_mm3 == pytest.approx(32 * 0.7 * 0.7 * 1.25)
    assert body.centre_mm == pytest.approx((3.5 * 0.7, 3.5 * 0.7, 1.5 * 1.25))
    assert int(findings.masks["body"].sum()) == 32


def test_a_package_in_several_modules_with_its_weights(tmp_path: Path) -> None:
    split_package(tmp_path / "models")
    model = ModelRegistry([tmp_path / "models"]).load("split")
    findings = model.predict({})
    assert findings.summary == {"text": "described", "weights": len(WEIGHTS)}
    assert findings.version == "2.1.0" and not findings.demo


def test_wrong_sha256_is_refused_with_both_digests(tmp_path: Path) -> None:
    wrong = "0" * 64
    split_package(tmp_path / "models", sha=wrong)
    registry = ModelRegistry([tmp_path / "models"])  # discovery reads model.toml only
    with pytest.raises(WeightsMismatch) as caught:
        registry.create("split")
    message = str(caught.value)
    assert "'split'" in message and "demo.bin" in message
    assert wrong in message and sha256_hex(WEIGHTS) in message


def test_saved_weights_are_what_model_toml_then_expects(tmp_path: Path) -> None:
    # what each train.py ends with: the weights file written, its sha256 put into model.toml
    torch = pytest.importorskip("torch")
    from dicomnode.inference.weights import save_weights, sha256_of

    folder = split_package(tmp_path / "models", sha="0" * 64)
    toml = folder / "model.toml"
    toml.write_text(toml.read_text() + '\n[params.other]\nsha256 = "' + "1" * 64 + '"\n')
    weights = folder / "weights" / "demo.bin"
    digest = save_weights({"w": torch.ones(3)}, weights, toml)
    assert digest == sha256_of(weights) and torch.load(weights)["w"].tolist() == [1.0] * 3
    assert read_model_toml(toml).weights["network"].sha256 == digest
    assert toml.read_text().count("1" * 64) == 1  # another table's sha256 is left alone
    ModelRegistry([tmp_path / "models"]).create("split")  # its check now passes
    toml.write_text('name = "x"\n')
    with pytest.raises(ModelError, match=r"no \[weights\] sha256"):
        save_weights({}, weights, toml)


def test_missing_weights_are_named(tmp_path: Path) -> None:
    folder = split_package(tmp_path / "models")
    (folder / "weights" / "demo.bin").unlink()
    with pytest.raises(WeightsMissing, match=r"demo\.bin.*does not exist.*train\.py"):
        ModelRegistry([tmp_path / "models"]).create("split")


def test_unknown_model_names_the_available_ones(tmp_path: Path) -> None:
    write_model_package(tmp_path / "models", "stats")
    registry = ModelRegistry([tmp_path / "models"])
    with pytest.raises(UnknownModel, match=r"'lung'.*available: stats") as caught:
        registry.create("lung")
    assert isinstance(caught.value, ConfigError) and caught.value.http_status == 404
    with pytest.raises(UnknownModel, match=r"'nope'.*available: echo, stats"):
        job_models(registry, ["stats", "nope"], builtins=MODELS)


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ('name = "x"\nversion = "1"\nentry = "model"\n', r"entry: .*'module:Class'"),
        ('name = "x y"\nversion = "1"\nentry = "m:C"\n', r"name: .*'x y'"),
        ('name = "x"\nentry = "m:C"\n', r"version: Field required"),
        ('name = "x"\nversion = "1"\nentry = "m:C"\n[accepts]\nlevel = "patient"\n', "level"),
        ('name = "x"\nversion = "1"\nentry = "m:C"\ncolour = 1\n', "colour"),
        ('name = "x"\nversion = "1"\nentry = "m:C"\n[weights]\nfile = "w"\nsha256 = "ab"\n', "sha"),
        ("name = ", "not valid TOML"),
        (  # a code meaning longer than DICOM's 64 characters fails here, not in a SEG later
            'name = "x"\nversion = "1"\nentry = "m:C"\n[[labels]]\nname = "a"\n'
            'finding_type = { value = "1", meaning = "' + "m" * 65 + '" }\n',
            r"labels\.0\.finding_type\.meaning",
        ),
    ],
)
def test_invalid_model_toml_names_file_and_key(tmp_path: Path, toml: str, expected: str) -> None:
    write_model_package(tmp_path / "models", "x", toml=toml)
    with pytest.raises(ModelPackageInvalid, match=expected) as caught:
        ModelRegistry([tmp_path / "models"])
    assert "model.toml" in str(caught.value)


def test_entry_that_does_not_import(tmp_path: Path) -> None:
    write_model_package(tmp_path / "models", "stats", source="import not_a_module_here\n")
    with pytest.raises(ModelPackageInvalid, match=r"model\.py.*ModuleNotFoundError"):
        ModelRegistry([tmp_path / "models"]).create("stats")
    write_model_package(tmp_path / "other", "stats", source="class Other:\n    pass\n")
    with pytest.raises(ModelPackageInvalid, match="no class 'VolumeStats'"):
        ModelRegistry([tmp_path / "other"]).create("stats")


def test_two_packages_of_one_name(tmp_path: Path) -> None:
    write_model_package(tmp_path / "a", "stats")
    write_model_package(tmp_path / "b", "stats")
    with pytest.raises(ModelPackageInvalid, match="two model packages are named 'stats'"):
        ModelRegistry([tmp_path / "a", tmp_path / "b"])


def test_bundle_for_a_model_that_is_not_there(tmp_path: Path) -> None:
    # no package of that name: the bundle is a model of its own, which must be a bundle
    with pytest.raises(BundleInvalid, match=r"bundles names model 'lung', which is no model pa"):
        ModelRegistry([tmp_path], {"lung": tmp_path})


def test_bundle_not_in_the_zoo_layout(tmp_path: Path) -> None:
    write_model_package(tmp_path / "models", "stats")
    bundle = tmp_path / "bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "configs" / "metadata.json").write_text("{}")
    with pytest.raises(BundleInvalid, match=r"missing configs/inference\.json, models/model\.pt"):
        ModelRegistry([tmp_path / "models"], {"stats": bundle})
    with pytest.raises(BundleInvalid, match="does not exist"):
        ModelRegistry([tmp_path / "models"], {"stats": tmp_path / "nowhere"})


def test_job_models_wrap_packages_and_keep_echo(tmp_path: Path) -> None:
    write_model_package(tmp_path / "models", "stats")
    registry = ModelRegistry([tmp_path / "models"])
    models = job_models(registry, builtins=MODELS)
    assert set(models) == {"echo", "stats"}
    assert isinstance(models["echo"], EchoModel)
    assert isinstance(models["stats"], ModelPipeline) and models["stats"].name == "stats"
    assert all(isinstance(model, JobModel) for model in models.values())
    assert set(job_models(registry, ["echo"], builtins=MODELS)) == {"echo"}
    assert set(job_models(registry, [" stats ", "stats"])) == {"stats"}


def test_production_has_no_test_model(tmp_path: Path) -> None:
    write_model_package(tmp_path / "models", "stats")
    registry = ModelRegistry([tmp_path / "models"])
    assert set(job_models(registry)) == {"stats"}
    with pytest.raises(UnknownModel, match=r"'echo'.*available: stats"):
        job_models(registry, ["echo"])
    with pytest.raises(ModelPackageInvalid, match=r"package\(s\) echo take the name of a builtin"):
        write_model_package(tmp_path / "models", "echo")
        job_models(ModelRegistry([tmp_path / "models"]), builtins=MODELS)


def test_settings_name_the_folders_and_bundles(tmp_path: Path) -> None:
    write_model_package(tmp_path / "models", "stats")
    settings = Settings(models={"dirs": [tmp_path / "models"], "seed": 3, "threads": 1})
    registry = ModelRegistry.from_settings(settings)
    assert "stats" in registry and registry.seed == 3 and registry.threads == 1
    assert Settings().models.dirs == (Path("models"),)


def test_relative_folders_are_found_from_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_model_package(tmp_path / "here", "stats")
    monkeypatch.chdir(tmp_path)
    assert "stats" in ModelRegistry([Path("here")])
    assert ModelRegistry([Path("not-there")]).names() == []


def test_spec_reads_weights_paths(tmp_path: Path) -> None:
    folder = split_package(tmp_path / "models")
    spec = ModelSpec.from_directory(folder)
    assert spec.weights_path() == folder / "weights/demo.bin"
    assert spec.weights_path("network") == folder / "weights/demo.bin"
    assert read_model_toml(folder / "model.toml").weights["network"].file == Path(
        "weights/demo.bin"
    )


def test_importing_the_runtime_loads_neither_torch_nor_monai() -> None:
    code = (
        "import sys, dicomnode.inference, dicomnode.app, dicomnode.cli; "
        "print(sorted(m for m in ('torch', 'monai', 'SimpleITK') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_model_that_fails_to_load(tmp_path: Path) -> None:
    """Named models must load; on "every model" a broken one fails its jobs, not the worker."""
    folder = split_package(tmp_path / "models")
    (folder / "weights" / "demo.bin").unlink()
    registry = ModelRegistry([tmp_path / "models"])
    with pytest.raises(WeightsMissing):
        job_models(registry, ["split"])["split"].load("cpu")
    every = job_models(registry, builtins=MODELS)
    every["echo"].load("cpu")
    every["split"].load("cpu")  # logged, not raised
    with pytest.raises(ModelError, match=r"'split' could not be loaded: WeightsMissing"):
        every["split"].run(None)  # type: ignore[arg-type]


def test_models_section_of_the_config_file(tmp_path: Path) -> None:
    from dicomnode.config import load_settings

    write_model_package(tmp_path / "models", "stats")
    bundle = tmp_path / "bundle"
    for part in ("configs/metadata.json", "configs/inference.json", "models/model.pt"):
        (bundle / part).parent.mkdir(parents=True, exist_ok=True)
        (bundle / part).write_text("{}")
    config = tmp_path / "node.toml"
    config.write_text(
        f'[models]\ndirs = ["{tmp_path / "models"}"]\nbundles = {{ stats = "{bundle}" }}\n'
        "seed = 11\n"
    )
    settings = load_settings(config)
    assert settings.models.bundles == {"stats": bundle} and settings.models.seed == 11
    registry = ModelRegistry.from_settings(settings)
    assert registry.spec("stats").bundle == bundle.resolve()

"""Tests of the distilled-set artifact: round trip, atomic writes, refusals, damage, no pickle."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ddsuite.core.engine import distill
from ddsuite.core.errors import ArtifactError
from ddsuite.core.evaluation import EvaluationProtocol
from ddsuite.core.synthetic import (
    ARTIFACT_FORMAT,
    META_FILE,
    TENSORS_FILE,
    is_artifact,
    load_artifact,
    save_artifact,
    update_metrics,
)
from ddsuite.core.synthetic import artifact as artifact_module

pytestmark = pytest.mark.usefixtures("torch_single_thread")

CLASSES, IPC = 10, 2
PROTOCOL = EvaluationProtocol(num_eval=2, epochs=5)


def make_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = CLASSES * IPC
    return {
        "images_syn": torch.randn(n, 1, 8, 8, generator=g),
        "labels_syn": torch.arange(CLASSES).repeat_interleave(IPC),
        "labels_soft": torch.randn(n, CLASSES, generator=g),
        "log_step_size": torch.tensor([-2.0]),
    }


def save(folder: Path, splits, tensors: dict[str, torch.Tensor] | None = None, **kw) -> Path:
    return save_artifact(
        folder, make_tensors() if tensors is None else tensors,
        method=kw.pop("method", "dm"), config=kw.pop("config", {"ipc": IPC, "lr_images": 1.0}),
        seed=kw.pop("seed", 7), dataset=splits.identity.to_dict(),
        input_space=splits.input_space.to_dict(), protocol=PROTOCOL.to_dict(),
        metrics=kw.pop("metrics", {"evaluation": {"convnet": 12.5}}), **kw)


@pytest.fixture
def saved(tmp_path, digits_splits) -> Path:
    return save(tmp_path / "set", digits_splits)


def _rewrite_meta(folder: Path, *, seal: bool = True, **changes) -> None:
    """Edit artifact.json; with `seal`, also record the edited description's digest (a
    consistent forgery, so the checks behind the seal are exercised)."""
    meta = json.loads((folder / META_FILE).read_text())
    meta.update(changes)
    if seal:
        meta["meta_sha256"] = artifact_module._meta_digest(meta)
    (folder / META_FILE).write_text(json.dumps(meta))


def _rewrite_tensors(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Replace the tensors and record their checksum, as a consistent (forged) pair."""
    save_file(tensors, str(folder / TENSORS_FILE))
    digest = hashlib.sha256((folder / TENSORS_FILE).read_bytes()).hexdigest()
    _rewrite_meta(folder, tensors_sha256=digest)


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".tmp"))


# -- round trip ------------------------------------------------------------------------------


def test_round_trip_keeps_tensors_and_provenance(saved, digits_splits):
    assert is_artifact(saved)
    artifact = load_artifact(saved)
    original = make_tensors()
    assert set(artifact.tensors) == set(original)
    for name, tensor in original.items():
        assert torch.equal(artifact.tensors[name], tensor), name
        assert artifact.tensors[name].dtype == tensor.dtype
    meta = artifact.meta
    assert meta["format"] == ARTIFACT_FORMAT
    assert meta["method"] == "dm" and artifact.method == "dm"
    assert meta["config"] == {"ipc": IPC, "lr_images": 1.0}
    assert meta["seed"] == 7
    assert meta["dataset"]["name"] == "digits"
    assert meta["dataset"]["class_map"] == list(range(CLASSES))
    assert meta["dataset"]["fingerprint"] == digits_splits.identity.fingerprint
    assert meta["input_space"] == digits_splits.input_space.to_dict()
    assert EvaluationProtocol.from_dict(meta["protocol"]) == PROTOCOL
    assert {"python", "torch", "safetensors", "ddsuite"} <= set(meta["versions"])
    assert meta["metrics"] == {"evaluation": {"convnet": 12.5}}
    assert (artifact.ipc, artifact.num_classes) == (IPC, CLASSES)
    assert meta["image_shape"] == [1, 8, 8]
    assert meta["labels"] == "soft"
    assert artifact.size_bytes() == sum(t.numel() * t.element_size() for t in original.values())


def test_round_trip_of_a_distilled_run(tmp_path, digits_splits):
    config = {"ipc": 1, "iterations": 2, "batch_real": 8, "model": "convnet(width=16)"}
    result = distill("dm", splits=digits_splits, config=config, seed=3, out_dir=tmp_path / "run",
                     protocol=PROTOCOL)
    artifact = load_artifact(tmp_path / "run")
    assert torch.equal(artifact.images_syn, result.syn.images_syn.detach())
    assert torch.equal(artifact.labels_syn, result.syn.labels_syn)
    meta = artifact.meta
    assert meta["method"] == "dm" and meta["seed"] == 3
    assert meta["config"] == result.config.to_dict()
    assert meta["config"]["iterations"] == 2
    assert EvaluationProtocol.from_dict(meta["protocol"]) == PROTOCOL
    assert meta["dataset"] == digits_splits.identity.to_dict()
    assert "distill_seconds" in meta["metrics"]


def test_update_metrics_merges_and_keeps_the_artifact_valid(saved):
    update_metrics(saved, {"evaluations": [{"convnet": 20.0}]})
    artifact = load_artifact(saved)
    assert artifact.meta["metrics"]["evaluations"] == [{"convnet": 20.0}]
    assert artifact.meta["metrics"]["evaluation"] == {"convnet": 12.5}
    assert _temporaries(saved) == []


# -- atomic writes and refusals --------------------------------------------------------------


def test_save_leaves_only_the_two_files(saved, digits_splits):
    assert sorted(p.name for p in saved.iterdir()) == sorted([META_FILE, TENSORS_FILE])
    save(saved, digits_splits, make_tensors(seed=1))  # overwrite in place
    assert sorted(p.name for p in saved.iterdir()) == sorted([META_FILE, TENSORS_FILE])
    assert torch.equal(load_artifact(saved).images_syn, make_tensors(seed=1)["images_syn"])


def test_failed_write_keeps_the_old_artifact_and_no_temporary(saved, digits_splits,
                                                             monkeypatch):
    def half_write(tensors, path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(artifact_module, "save_file", half_write)
    with pytest.raises(OSError, match="disk full"):
        save(saved, digits_splits, make_tensors(seed=1))
    assert _temporaries(saved) == []
    assert torch.equal(load_artifact(saved).images_syn, make_tensors()["images_syn"])


@pytest.mark.parametrize("name", ["images_syn", "labels_soft", "log_step_size"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_refuses_non_finite_tensors_and_writes_nothing(tmp_path, digits_splits, name, value):
    tensors = make_tensors()
    tensors[name].view(-1)[0] = value
    folder = tmp_path / "bad"
    with pytest.raises(ArtifactError, match=f"{name}.*(NaN|infinity)"):
        save(folder, digits_splits, tensors)
    assert not folder.exists() or list(folder.iterdir()) == []


def test_refuses_uneven_class_split(tmp_path, digits_splits):
    tensors = make_tensors()
    tensors["images_syn"] = tensors["images_syn"][:-1]
    with pytest.raises(ArtifactError, match="evenly"):
        save(tmp_path / "bad", digits_splits, tensors)
    assert not (tmp_path / "bad").exists() or list((tmp_path / "bad").iterdir()) == []


def test_refused_labels_write_nothing(tmp_path, digits_splits):
    tensors = make_tensors()
    tensors["labels_syn"] = tensors["labels_syn"] + CLASSES
    folder = tmp_path / "bad"
    with pytest.raises(ArtifactError, match="labels_syn"):
        save(folder, digits_splits, tensors)
    assert not folder.exists() or list(folder.iterdir()) == []


def test_refused_save_leaves_an_existing_artifact_intact(saved, digits_splits):
    tensors = make_tensors(seed=1)
    tensors["labels_syn"] = tensors["labels_syn"] + CLASSES
    with pytest.raises(ArtifactError):
        save(saved, digits_splits, tensors)
    assert torch.equal(load_artifact(saved).images_syn, make_tensors()["images_syn"])


# -- damage is detected with a clear ArtifactError -------------------------------------------


def _truncate(folder: Path) -> None:
    data = (folder / TENSORS_FILE).read_bytes()
    (folder / TENSORS_FILE).write_bytes(data[: len(data) // 2])


def _edit_tensors(folder: Path) -> None:
    data = bytearray((folder / TENSORS_FILE).read_bytes())
    data[-5] ^= 0xFF  # a pixel's bytes, past the header
    (folder / TENSORS_FILE).write_bytes(bytes(data))


def _replace_tensors(folder: Path) -> None:
    save_file({k: v.clone() for k, v in make_tensors(seed=9).items()}, str(folder / TENSORS_FILE))


DAMAGE = {
    "truncated tensors": (_truncate, r"checksum.*truncated"),
    "edited tensors": (_edit_tensors, r"checksum"),
    "replaced tensors": (_replace_tensors, r"checksum"),
    "deleted tensors": (lambda f: (f / TENSORS_FILE).unlink(), TENSORS_FILE + " is missing"),
    "deleted artifact.json": (lambda f: (f / META_FILE).unlink(), META_FILE + " is missing"),
    "invalid JSON": (lambda f: (f / META_FILE).write_text('{"format": '), "not valid JSON"),
    "JSON list": (lambda f: (f / META_FILE).write_text("[1, 2]"), "JSON object"),
    "wrong format": (lambda f: _rewrite_meta(f, format="other/9"), r"format 'other/9'"),
    "missing fields": (
        lambda f: (f / META_FILE).write_text(json.dumps({"format": ARTIFACT_FORMAT})),
        r"lacks required fields: method"),
    "edited description": (lambda f: _rewrite_meta(f, seal=False, method="other"),
                           r"edited after the artifact was written.*meta_sha256"),
    "edited decode record": (
        lambda f: _rewrite_meta(f, seal=False, decode={"kind": "partition-expand", "factor": 2}),
        r"edited after the artifact was written"),
    "edited protocol": (lambda f: _rewrite_meta(f, seal=False, protocol={"lr": 5.0}),
                        r"edited after the artifact was written"),
    "edited size": (lambda f: _rewrite_meta(f, seal=False, size_bytes=10),
                    r"edited after the artifact was written"),
    "more ipc than tensors": (lambda f: _rewrite_meta(f, ipc=IPC + 1), r"shapes.*do not match"),
    "fewer classes": (lambda f: _rewrite_meta(f, num_classes=5), r"shapes.*do not match"),
    "fewer images": (
        lambda f: _rewrite_tensors(f, {"images_syn": torch.zeros(CLASSES * IPC - 1, 1, 8, 8),
                                       "labels_syn": torch.zeros(CLASSES * IPC - 1,
                                                                 dtype=torch.int64)}),
        r"shapes.*do not match"),
    "flat images": (
        lambda f: _rewrite_tensors(f, {"images_syn": torch.zeros(CLASSES * IPC, 64),
                                       "labels_syn": make_tensors()["labels_syn"]}),
        r"shapes.*do not match"),
    "labels of another length": (
        lambda f: _rewrite_tensors(f, {"images_syn": make_tensors()["images_syn"],
                                       "labels_syn": torch.zeros(3, dtype=torch.int64)}),
        r"shapes.*do not match"),
    "no labels": (
        lambda f: _rewrite_tensors(f, {"images_syn": make_tensors()["images_syn"]}),
        "lacks tensor 'labels_syn'"),
    "not safetensors": (lambda f: _write_garbage(f), "cannot be read as safetensors"),
    "non-finite pixels": (
        lambda f: _rewrite_tensors(f, {"images_syn": make_tensors()["images_syn"] * float("inf"),
                                       "labels_syn": make_tensors()["labels_syn"]}),
        "non-finite"),
    "deleted folder": (shutil.rmtree, "no artifact folder"),
}


def _write_garbage(folder: Path) -> None:
    (folder / TENSORS_FILE).write_bytes(b"\x00" * 64)
    digest = hashlib.sha256((folder / TENSORS_FILE).read_bytes()).hexdigest()
    _rewrite_meta(folder, tensors_sha256=digest)


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_artifact_raises_artifact_error(saved, damage):
    damage_fn, pattern = DAMAGE[damage]
    damage_fn(saved)
    with pytest.raises(ArtifactError, match=pattern) as info:
        load_artifact(saved)
    assert str(saved) in str(info.value) or META_FILE in str(info.value)


@pytest.mark.parametrize("field, value, pattern", [
    ("ipc", "two", "ipc"), ("ipc", None, "ipc"), ("num_classes", None, "num_classes"),
    ("num_classes", [10], "num_classes"), ("tensors_sha256", None, "tensors_sha256|checksum"),
])
def test_meta_fields_of_the_wrong_type_raise_artifact_error(saved, field, value, pattern):
    """A hand-edited artifact.json is reported as such, not as a TypeError from int()."""
    _rewrite_meta(saved, **{field: value})
    with pytest.raises(ArtifactError, match=pattern):
        load_artifact(saved)


def test_labels_outside_the_classes_raise_artifact_error(saved):
    tensors = make_tensors()
    tensors["labels_syn"] = tensors["labels_syn"] + CLASSES
    _rewrite_tensors(saved, tensors)
    with pytest.raises(ArtifactError, match="labels_syn"):
        load_artifact(saved)


def test_loading_never_unpickles(saved, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("an artifact load must not unpickle")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    artifact = load_artifact(saved)
    assert torch.equal(artifact.images_syn, make_tensors()["images_syn"])
    tensors_bytes = (saved / TENSORS_FILE).read_bytes()
    assert not tensors_bytes.startswith(b"\x80") and b"PK\x03\x04" not in tensors_bytes[:4]
    assert load_file(str(saved / TENSORS_FILE)).keys() == make_tensors().keys()


def test_parameterised_set_decodes_for_evaluation_and_reports_its_size(tmp_path, digits_splits):
    """IDM's partitioned set: the artifact records the decoder, evaluation expands it."""
    from ddsuite.core.engine import distill
    from ddsuite.core.synthetic import load_artifact

    result = distill("idm", splits=digits_splits, seed=0, out_dir=tmp_path / "idm",
                     config={"ipc": 1, "iterations": 2, "factor": 2, "pool_size": 2,
                             "model": "convnet(width=8)", "batch_real": 8, "train_steps": 1,
                             "batch_train": 16},
                     checkpoint_every=0)
    assert result.syn.decode == {"kind": "partition-expand", "factor": 2}
    artifact = load_artifact(tmp_path / "idm")
    assert artifact.meta["ipc"] == 1 and artifact.meta["decoded_ipc"] == 4
    images, labels, _ = artifact.decoded()
    assert images.shape == (40, 1, 8, 8)
    assert torch.equal(labels, torch.arange(10).repeat_interleave(4))
    # Each decoded image is one quarter of a stored image, upsampled back to 8x8.
    quarter = torch.nn.functional.interpolate(artifact.images_syn[:1, :, :4, :4], size=(8, 8),
                                              mode="bilinear", align_corners=False)
    assert torch.allclose(images[0], quarter[0])
    _rewrite_meta(tmp_path / "idm", decode={"kind": "partition-expand", "factor": 3})
    with pytest.raises(ArtifactError, match="factor 3 does not divide the image size 8x8"):
        load_artifact(tmp_path / "idm")


def test_edited_label_and_decode_fields_are_refused(tmp_path, digits_splits):
    distill("random", splits=digits_splits, seed=0, out_dir=tmp_path / "set",
            config={"ipc": 1, "features": "pixels"}, checkpoint_every=0)
    meta_path = tmp_path / "set" / "artifact.json"
    original = meta_path.read_text()
    for field, value, message in (("labels", "soft", "no labels_soft"),
                                  ("decoded_ipc", 9, "decoded_ipc 9 does not match")):
        meta_path.write_text(original)
        _rewrite_meta(tmp_path / "set", **{field: value})  # sealed: the checks behind it
        with pytest.raises(ArtifactError, match=message):
            load_artifact(tmp_path / "set")


def test_an_artifact_without_its_seal_loads_with_a_warning(saved, caplog):
    meta = json.loads((saved / META_FILE).read_text())
    del meta["meta_sha256"]
    (saved / META_FILE).write_text(json.dumps(meta))
    with caplog.at_level("WARNING"):
        load_artifact(saved)
    assert "carries no meta_sha256" in caplog.text


def test_appending_metrics_keeps_the_seal(saved):
    update_metrics(saved, {"evaluations": [{"accuracy": 50.0}]})
    assert load_artifact(saved).meta["metrics"]["evaluations"][0]["accuracy"] == 50.0

"""Tests of the dataset registry, real splits, input spaces and identities (ddsuite.core.data)."""

from __future__ import annotations

import json
import logging
import shutil
import tarfile
import time
from pathlib import Path

import pytest
import torch

from ddsuite.core.data import (
    DatasetIdentity,
    InputSpace,
    RawSplits,
    from_tensors,
    list_datasets,
    load_dataset,
    register_dataset,
)
from ddsuite.core.data import registry as registry_module
from ddsuite.core.errors import ConfigError, DuplicateNameError, IPCError, UnknownNameError
from ddsuite.core.registry import Registry

logger = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _rows_in(candidates: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """For each image in `candidates` (n, ...), whether it equals some image in `pool` (m, ...)."""
    a = candidates.reshape(candidates.shape[0], 1, -1)  # (n, 1, D)
    b = pool.reshape(1, pool.shape[0], -1)  # (1, m, D)
    return (a == b).all(dim=2).any(dim=1)  # (n,)


# ---------------------------------------------------------------------- digits


def test_digits_shapes_split_and_labels(digits):
    train, test = digits.train, digits.test
    assert train.num_classes == test.num_classes == 10
    assert train.image_shape == test.image_shape == (1, 8, 8)
    # The documented split: stratified 25% test with random_state=0 of 1,797 images.
    assert (len(train), len(test)) == (1347, 450)
    assert train.images.dtype == torch.float32 and train.labels.dtype == torch.int64
    assert int(train.labels.min()) == 0 and int(train.labels.max()) == 9
    assert int(test.labels.min()) >= 0 and int(test.labels.max()) <= 9
    assert sum(train.class_counts) == len(train)
    assert digits.identity.source == "sklearn.datasets.load_digits"
    assert digits.identity.class_map == list(range(10))


def test_digits_class_index_matches_labels(digits):
    train = digits.train
    assert len(train.class_index) == 10
    for c, index in enumerate(train.class_index):
        assert index.dtype == torch.int64
        assert len(index) == train.class_counts[c]
        assert bool((train.labels[index] == c).all())
    every = torch.cat(train.class_index).sort().values
    assert torch.equal(every, torch.arange(len(train)))


def test_digits_train_is_normalised_per_channel(digits):
    images = digits.train.images.double()  # (N, 1, 8, 8)
    mean = images.mean(dim=(0, 2, 3))
    std = images.std(dim=(0, 2, 3), unbiased=False)
    assert torch.allclose(mean, torch.zeros(1, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(std, torch.ones(1, dtype=torch.float64), atol=1e-4)
    # The test split goes through the train statistics, so it is only near 0 / 1.
    assert abs(float(digits.test.images.mean())) < 0.1


# ---------------------------------------------------------------------- sampling


def test_sample_per_class_shapes_and_membership(digits):
    train = digits.train
    batch = train.sample_per_class(7, generator=torch.Generator().manual_seed(0))
    assert batch.shape == (10, 7, 1, 8, 8)
    for c in range(10):
        assert bool(_rows_in(batch[c], train.images[train.class_index[c]]).all())

    index = train.sample_indices_per_class(7, generator=torch.Generator().manual_seed(1))
    assert index.shape == (10, 7)
    assert bool((train.labels[index] == torch.arange(10).unsqueeze(1)).all())
    for row in index:  # without replacement
        assert len(set(row.tolist())) == 7


def test_sample_per_class_can_take_a_whole_class(digits):
    train = digits.train
    smallest = min(train.class_counts)
    index = train.sample_indices_per_class(smallest, generator=torch.Generator().manual_seed(0))
    c = train.class_counts.index(smallest)
    assert sorted(index[c].tolist()) == sorted(train.class_index[c].tolist())


def test_same_seed_same_sample_and_other_seed_differs(digits):
    train = digits.train
    first = train.sample_per_class(5, generator=torch.Generator().manual_seed(123))
    again = train.sample_per_class(5, generator=torch.Generator().manual_seed(123))
    other = train.sample_per_class(5, generator=torch.Generator().manual_seed(124))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)

    one = train.sample_class(3, 9, generator=torch.Generator().manual_seed(5))
    two = train.sample_class(3, 9, generator=torch.Generator().manual_seed(5))
    assert one.shape == (9, 1, 8, 8) and torch.equal(one, two)
    assert bool(_rows_in(one, train.images[train.class_index[3]]).all())


def test_ipc_errors_name_the_class_and_its_size(digits):
    train = digits.train
    with pytest.raises(IPCError, match="ipc must be >= 1, got 0"):
        train.check_ipc(0)
    with pytest.raises(IPCError, match="ipc must be >= 1, got -2"):
        train.sample_per_class(-2, generator=torch.Generator())

    smallest = min(train.class_counts)
    c = train.class_counts.index(smallest)
    expected = f"ipc {smallest + 1} exceeds class {c} ('{c}') which has {smallest} training images"
    with pytest.raises(IPCError) as caught:
        train.check_ipc(smallest + 1)
    assert expected in str(caught.value)
    with pytest.raises(IPCError, match=f"class {c} .* which has {smallest} training images"):
        train.sample_per_class(smallest + 1, generator=torch.Generator())
    size = train.class_counts[4]
    with pytest.raises(IPCError, match=f"class 4 .* which has {size} training images"):
        train.sample_class(4, size + 1, generator=torch.Generator())
    train.check_ipc(smallest)  # the largest valid ipc passes


# ---------------------------------------------------------------------- registry


def test_unknown_dataset_lists_valid_names():
    names = list_datasets()
    for expected in ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "svhn"):
        assert expected in names
    assert "imagefolder:PATH" in names and "tensors" in names
    with pytest.raises(UnknownNameError) as caught:
        load_dataset("imagenet-1k")
    message = str(caught.value)
    assert "imagenet-1k" in message
    assert "digits" in message and "imagefolder:PATH" in message and "cifar100" in message


def test_tensors_name_points_to_from_tensors():
    with pytest.raises(ConfigError, match="from_tensors"):
        load_dataset("tensors")


def test_register_dataset_adds_a_source_and_refuses_duplicates(monkeypatch):
    fresh: Registry = Registry("dataset")
    for key in registry_module._SOURCES.names():
        fresh.register(key, registry_module._SOURCES.get(key))
    monkeypatch.setattr(registry_module, "_SOURCES", fresh)

    @register_dataset("toy-ones")
    def toy(request):
        images = torch.full((6, 1, 2, 2), 0.5)  # (N, C, H, W)
        images[::2] = 1.0
        labels = torch.tensor([0, 1, 0, 1, 0, 1])
        return RawSplits(images, labels, images, labels, source="toy")

    assert "toy-ones" in list_datasets()
    splits = load_dataset("toy-ones")
    assert splits.identity.source == "toy" and splits.train.class_counts == [3, 3]
    with pytest.raises(DuplicateNameError):
        register_dataset("toy-ones")(toy)
    with pytest.raises(ConfigError, match="takes no ':' argument"):
        load_dataset("toy-ones:extra")


# ---------------------------------------------------------------------- tensors


def _toy_tensors(labels_train, labels_test, *, shape=(1, 4, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    images_train = torch.rand(len(labels_train), *shape, generator=g)  # (N, C, H, W)
    images_test = torch.rand(len(labels_test), *shape, generator=g)  # (M, C, H, W)
    return images_train, torch.tensor(labels_train), images_test, torch.tensor(labels_test)


def test_from_tensors_remaps_labels_and_records_the_map(caplog):
    tensors = _toy_tensors([9, 3, 7, 3, 9, 7, 7], [7, 3, 9])
    with caplog.at_level(logging.INFO, logger="ddsuite.core.data"):
        splits = from_tensors(*tensors, name="toy")
    assert splits.identity.class_map == [3, 7, 9]
    assert splits.identity.class_names == ["3", "7", "9"]
    assert splits.train.labels.tolist() == [2, 0, 1, 0, 2, 1, 1]
    assert splits.test.labels.tolist() == [1, 0, 2]
    assert splits.train.class_counts == [2, 3, 2]
    assert any("remapped" in r.getMessage() for r in caplog.records)
    assert splits.identity.source == "tensors" and splits.identity.name == "toy"


def test_from_tensors_uint8_equals_float(digits):
    images = torch.randint(0, 256, (20, 3, 4, 4), dtype=torch.uint8)  # (N, C, H, W)
    labels = torch.arange(20) % 4
    from_uint8 = from_tensors(images, labels, images, labels)
    from_float = from_tensors(images.float() / 255, labels, images.float() / 255, labels)
    assert torch.allclose(from_uint8.train.images, from_float.train.images, atol=1e-5)
    assert from_uint8.train.image_shape == (3, 4, 4)


def test_test_labels_absent_from_train_are_refused():
    with pytest.raises(ConfigError, match="label\\(s\\) 5 that never occur in the train split"):
        from_tensors(*_toy_tensors([0, 1, 0, 1], [0, 5]))


def test_bad_tensors_report_every_problem():
    images = torch.rand(4, 1, 4, 4) * 2  # out of [0, 1]
    with pytest.raises(ConfigError) as caught:
        from_tensors(images, torch.tensor([0, 1, 0]), images, torch.tensor([0.0, 1, 0, 1]))
    message = str(caught.value)
    assert "must lie in [0, 1]" in message
    assert "train labels must be (N,) with N = 4" in message
    assert "test labels must be integers" in message


def test_constant_channel_cannot_be_normalised():
    images = torch.full((4, 1, 2, 2), 0.5)
    with pytest.raises(ConfigError, match="constant channel"):
        from_tensors(images, torch.tensor([0, 1, 0, 1]), images[:2], torch.tensor([0, 1]))
    splits = from_tensors(
        images, torch.tensor([0, 1, 0, 1]), images[:2], torch.tensor([0, 1]), std=[0.1]
    )
    assert torch.allclose(splits.train.images, torch.zeros(4, 1, 2, 2))


# ---------------------------------------------------------------------- input space


def _correlated_images(n: int = 600, seed: int = 0) -> torch.Tensor:
    """(n, 1, 4, 4) images in [0, 1] whose 16 pixels are strongly correlated."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.rand(16, 16, generator=g)  # (D, D)
    features = torch.randn(n, 16, generator=g) @ mixing  # (n, D)
    features = (features - features.min()) / (features.max() - features.min())
    return features.reshape(n, 1, 4, 4)


def test_zca_whitens_train_features_to_identity_covariance():
    images = _correlated_images()
    labels = torch.arange(len(images)) % 3
    splits = from_tensors(images, labels, images[:30], labels[:30], zca=True, zca_epsilon=1e-8)
    flat = splits.train.images.reshape(len(images), -1).double()  # (N, D)
    raw_cov = torch.cov(images.reshape(len(images), -1).double().T)
    assert (raw_cov - torch.diag(raw_cov.diagonal())).abs().max() > 1e-3  # correlated before
    cov = torch.cov(flat.T)  # (D, D)
    assert torch.allclose(cov, torch.eye(16, dtype=torch.float64), atol=1e-3)

    # A large epsilon shrinks the variance instead: the regulariser is really used.
    damped = from_tensors(images, labels, images[:30], labels[:30], zca=True, zca_epsilon=10.0)
    assert float(damped.train.images.var()) < 0.5
    assert damped.input_space.to_dict()["zca"]["dim"] == 16


def test_input_space_differences_report_zca_and_normalisation_mismatch():
    images = _correlated_images()
    labels = torch.arange(len(images)) % 3
    plain = from_tensors(images, labels, images[:30], labels[:30]).input_space
    whitened = from_tensors(images, labels, images[:30], labels[:30], zca=True).input_space
    other_eps = from_tensors(
        images, labels, images[:30], labels[:30], zca=True, zca_epsilon=0.5
    ).input_space

    assert plain.differences(plain.to_dict()) == []
    assert whitened.differences(whitened.to_dict()) == []
    found = plain.differences(whitened.to_dict())
    assert len(found) == 1 and "ZCA whitening is off here but on" in found[0]
    assert any("ZCA epsilon differs" in d for d in whitened.differences(other_eps.to_dict()))
    assert any("ZCA matrices differ" in d for d in whitened.differences(other_eps))

    shifted = InputSpace([0.5], [0.25])
    found = plain.differences(shifted.to_dict())
    assert any("normalisation mean differs" in d for d in found)
    assert any("normalisation standard deviation differs" in d for d in found)
    rgb = InputSpace([0.5, 0.5, 0.5], [0.2, 0.2, 0.2])
    assert any("channel" in d for d in plain.differences(rgb.to_dict()))


def test_input_space_round_trip_and_display():
    images = _correlated_images(n=200)
    labels = torch.arange(200) % 2
    splits = from_tensors(images, labels, images[:10], labels[:10], zca=True, zca_epsilon=0.1)
    space = splits.input_space
    data = json.loads(json.dumps(space.to_dict()))
    assert set(data) == {"mean", "std", "zca"}
    assert set(data["zca"]) == {"epsilon", "fingerprint", "dim"}

    rebuilt = InputSpace.from_dict(data, zca_tensors=space.zca_tensors())
    assert rebuilt.differences(space) == []
    assert torch.allclose(rebuilt.apply(images[:5]), space.apply(images[:5]), atol=1e-5)
    assert torch.allclose(splits.train.images[:5], space.apply(images[:5]), atol=1e-5)
    assert torch.allclose(space.to_display(splits.train.images), images, atol=1e-4)

    described = InputSpace.from_dict(data)
    with pytest.raises(ConfigError, match="does not hold its matrix"):
        described.apply(images[:2])
    forged = {"zca_matrix": torch.eye(16), "zca_feature_mean": torch.zeros(16)}
    with pytest.raises(ConfigError, match="another input space"):
        InputSpace.from_dict(data, zca_tensors=forged)


def test_apply_keeps_leading_axes_and_gradients():
    space = InputSpace([0.5], [0.25])
    images = torch.rand(3, 2, 1, 4, 4, requires_grad=True)  # (classes, ipc, C, H, W)
    out = space.apply(images)
    assert out.shape == images.shape
    out.sum().backward()
    assert torch.allclose(images.grad, torch.full_like(images, 4.0))


# ---------------------------------------------------------------------- identity


def test_identity_round_trips_through_json_and_tracks_pixels(digits):
    identity = digits.identity
    data = json.loads(json.dumps(identity.to_dict()))
    assert DatasetIdentity.from_dict(data) == identity
    assert len(identity.fingerprint) == 64
    with pytest.raises(ConfigError, match="fingerprint"):
        DatasetIdentity.from_dict({k: v for k, v in data.items() if k != "fingerprint"})

    images_train, labels_train, images_test, labels_test = _toy_tensors([0, 1, 0, 1], [0, 1])
    first = from_tensors(images_train, labels_train, images_test, labels_test).identity
    images_train[0, 0, 0, 0] = 1.0 - images_train[0, 0, 0, 0]
    second = from_tensors(images_train, labels_train, images_test, labels_test).identity
    assert first.fingerprint != second.fingerprint
    assert load_dataset("digits").identity.fingerprint == identity.fingerprint


# ---------------------------------------------------------------------- torchvision


def test_missing_torchvision_set_says_how_to_fix(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_dataset("fashion-mnist", data_root=tmp_path)
    message = str(caught.value)
    assert "--data-root" in message and "download=True" in message
    assert not any(tmp_path.rglob("*.gz"))  # nothing was downloaded


@pytest.mark.shared_data
def test_mnist_from_shared_data(shared_data_root):
    start = time.perf_counter()
    splits = load_dataset("mnist", data_root=shared_data_root)
    logger.info("MNIST loaded in %.2f s", time.perf_counter() - start)
    assert (len(splits.train), len(splits.test)) == (60000, 10000)
    assert splits.train.image_shape == (1, 28, 28)
    assert splits.identity.source == "torchvision.datasets.MNIST"
    assert splits.input_space.to_dict()["mean"] == [0.1307]
    assert sum(splits.train.class_counts) == 60000 and min(splits.train.class_counts) > 5000
    # The published constants normalise MNIST to about zero mean and unit std.
    assert abs(float(splits.train.images.mean())) < 0.01
    assert abs(float(splits.train.images.std()) - 1.0) < 0.01


# ---------------------------------------------------------------------- imagefolder


def _write_tree(root: Path, layout: dict[str, dict[str, int]], *, size=(6, 5)) -> None:
    """Write solid-colour PNGs: layout[split][class] images, class k has red = 40 * k."""
    from PIL import Image

    for split, classes in layout.items():
        for k, (name, count) in enumerate(sorted(classes.items())):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                colour = (40 * k, 10 * i, 200 - 7 * i)
                Image.new("RGB", size, colour).save(folder / f"{i:03d}.png")


def test_imagefolder_tree(tmp_path):
    _write_tree(tmp_path, {"train": {"cat": 3, "dog": 4}, "test": {"cat": 1, "dog": 2}})
    from PIL import Image

    Image.new("L", (6, 5), 90).save(tmp_path / "train" / "dog" / "gray.png")  # converted to RGB

    splits = load_dataset(f"imagefolder:{tmp_path}")
    assert splits.identity.source == f"imagefolder:{tmp_path.resolve()}"
    assert splits.identity.class_names == ["cat", "dog"]
    assert splits.train.image_shape == (3, 5, 6)
    assert splits.train.class_counts == [3, 5] and splits.test.class_counts == [1, 2]
    pixels = splits.input_space.to_display(splits.train.images)  # (N, 3, 5, 6) in [0, 1]
    red = (pixels[:, 0, 0, 0] * 255).round()
    assert red[splits.train.labels == 0].tolist() == [0.0, 0.0, 0.0]
    assert 40.0 in red[splits.train.labels == 1].tolist()
    gray = pixels[:, 0, 0, 0] == pixels[:, 2, 0, 0]  # the grayscale file: R == B
    assert int(gray.sum()) == 1


def test_imagefolder_errors(tmp_path):
    _write_tree(tmp_path / "a", {"train": {"cat": 2, "dog": 2}, "test": {"cat": 1, "owl": 1}})
    with pytest.raises(ConfigError, match="'owl'.* lacks"):
        load_dataset(f"imagefolder:{tmp_path / 'a'}")

    _write_tree(tmp_path / "b", {"train": {"cat": 2, "dog": 2}, "test": {"cat": 1}})
    from PIL import Image

    Image.new("RGB", (9, 9)).save(tmp_path / "b" / "train" / "dog" / "odd.png")
    with pytest.raises(ConfigError, match="share one size: 1 image.*odd.png is 3x9x9"):
        load_dataset(f"imagefolder:{tmp_path / 'b'}")

    _write_tree(tmp_path / "c", {"train": {"cat": 2}})
    with pytest.raises(ConfigError, match="PATH/train/<class>.*test does not exist"):
        load_dataset(f"imagefolder:{tmp_path / 'c'}")
    with pytest.raises(ConfigError, match="needs an argument"):
        load_dataset("imagefolder")


def test_imagefolder_cache_is_used_and_keyed_by_files(tmp_path, caplog):
    tree, cache = tmp_path / "tree", tmp_path / "cache"
    _write_tree(tree, {"train": {"a": 2, "b": 2}, "test": {"a": 1, "b": 1}})
    first = load_dataset(f"imagefolder:{tree}", cache_dir=cache)
    written = list(cache.glob("imagefolder-*.safetensors"))
    assert len(written) == 1
    with caplog.at_level(logging.INFO, logger="ddsuite.core.data"):
        second = load_dataset(f"imagefolder:{tree}", cache_dir=cache)
    assert any("from cache" in r.getMessage() for r in caplog.records)
    assert torch.equal(first.train.images, second.train.images)
    assert first.identity == second.identity

    _write_tree(tree, {"train": {"c": 1}, "test": {"c": 1}})  # a new class: a new key
    third = load_dataset(f"imagefolder:{tree}", cache_dir=cache)
    assert third.train.num_classes == 3
    assert len(list(cache.glob("imagefolder-*.safetensors"))) == 2


@pytest.mark.slow
@pytest.mark.shared_data
def test_cifar10_jpeg_copy(shared_data_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cifar10-jpeg")
    start = time.perf_counter()
    with tarfile.open(shared_data_root / "cifar10-jpeg.tar.gz") as archive:
        archive.extractall(folder, filter="data")
    extracted = time.perf_counter() - start
    root = folder if (folder / "train").is_dir() else next(folder.glob("*/train")).parent
    try:
        start = time.perf_counter()
        splits = load_dataset(f"imagefolder:{root}")
        loaded = time.perf_counter() - start
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # 60,000 files; pytest keeps 3 runs' dirs
    logger.info("CIFAR-10 JPEG copy: extracted in %.1f s, loaded in %.1f s", extracted, loaded)
    assert (len(splits.train), len(splits.test)) == (50000, 10000)
    assert splits.train.image_shape == (3, 32, 32)
    assert splits.identity.class_names[0] == "airplane" and splits.train.num_classes == 10
    assert splits.train.class_counts == [5000] * 10
    # About 5-10 s on 2 idle CPU cores; the bound only catches a per-file slow path.
    assert loaded < 90

"""Any image tree as a dataset: ``imagefolder:PATH``.

PATH must hold ``train/<class>/*`` and ``test/<class>/*``; the files are listed with
torchvision's `ImageFolder` (class index = sorted folder name of the train split, test
classes matched by name). Every image becomes uint8 (C, H, W):

* the channel count follows the first training image: grayscale (L, LA) -> 1 channel,
  anything else -> 3 channels (RGB, alpha dropped); every image is converted to that count;
* all images must share one height and width, else a ConfigError lists some offenders.

Decoding is threaded and batched: files are read and decoded in slices by a thread pool
(torchvision.io's decoders release the GIL; JPEG slices go through one batched
`decode_jpeg` call), writing straight into one preallocated tensor. Formats torchvision.io
cannot decode (BMP, TIFF, ...) fall back to PIL.

Known gap: torchvision 0.29 deprecated its image decoders in favour of TorchCodec, which is
not a dependency of ddsuite. They are still used here because on a small CPU they decode
the CIFAR-10 JPEG copy 3-4x faster than PIL; their DeprecationWarning is silenced only
around these calls, and when a future torchvision drops them every file goes through PIL.

Cache: with ``load_dataset("imagefolder:PATH", cache_dir=DIR)`` the decoded uint8 tensors
are saved to ``DIR/imagefolder-<key>.safetensors`` (never pickle), where ``<key>`` is a
sha256 of the file list (relative paths, class indices, sizes and modification times). A
later load of the same unchanged tree reads that file instead of decoding; any change to
the tree gives a new key. Writes are atomic (temporary file, then rename).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch

from ..errors import ConfigError
from .registry import RawSplits, SourceRequest, register_dataset

__all__ = ["CACHE_FORMAT", "decode_image_files", "read_image_folder"]

logger = logging.getLogger(__name__)

CACHE_FORMAT = "ddsuite-imagefolder-v1"
_SLICE = 1024
_GRAY_PIL_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F"}


@register_dataset("imagefolder:PATH")
def load_imagefolder_raw(request: SourceRequest) -> RawSplits:
    """Read ``PATH/train`` and ``PATH/test`` (PATH = ``request.argument``)."""
    return read_image_folder(Path(request.argument), cache_dir=request.cache_dir)


def read_image_folder(
    root: str | Path,
    *,
    cache_dir: str | Path | None = None,
    workers: int | None = None,
) -> RawSplits:
    """Read an image tree with ``train/<class>/*`` and ``test/<class>/*`` into uint8 tensors.

    Args:
        root: the tree's root folder.
        cache_dir: where to cache the decoded tensors (see the module docstring), or None.
        workers: decoding threads; defaults to the number of CPUs (at most 16).

    Returns:
        Raw splits with uint8 (N, C, H, W) images and the train split's folder names as
        class names.

    Raises:
        ConfigError: for a missing folder, a test class absent from train, or images of
            different sizes.
    """
    root = Path(root).expanduser().resolve()
    source = f"imagefolder:{root}"
    train_files, train_labels, class_names = _scan(root, "train", None)
    test_files, test_labels, _ = _scan(root, "test", class_names)

    key = _file_list_key(root, [(train_files, train_labels), (test_files, test_labels)])
    cache_path = None
    if cache_dir is not None:
        cache_path = Path(cache_dir).expanduser() / f"imagefolder-{key[:32]}.safetensors"
        cached = _read_cache(cache_path, key)
        if cached is not None:
            images_train, images_test = cached
            logger.info("read decoded %s from cache %s", source, cache_path)
            return _raw(images_train, train_labels, images_test, test_labels, source, class_names)

    start = time.perf_counter()
    channels = _channels_of(train_files[0])
    images_train = decode_image_files(train_files, channels=channels, workers=workers)
    height, width = images_train.shape[2:]
    images_test = decode_image_files(
        test_files, channels=channels, size=(height, width), workers=workers,
        reference=train_files[0],
    )
    logger.info(
        "decoded %d images of %s (%d channel(s), %dx%d) in %.1f s",
        len(train_files) + len(test_files), source, channels, height, width,
        time.perf_counter() - start,
    )
    if cache_path is not None:
        _write_cache(cache_path, key, images_train, images_test, root)
    return _raw(images_train, train_labels, images_test, test_labels, source, class_names)


def decode_image_files(
    files: list[Path],
    *,
    channels: int,
    size: tuple[int, int] | None = None,
    workers: int | None = None,
    reference: Path | None = None,
) -> torch.Tensor:
    """Decode image files into one uint8 tensor, in parallel slices.

    Args:
        files: the image files, in output order.
        channels: 1 (grayscale) or 3 (RGB); every image is converted to it.
        size: the required (H, W); None takes the first file's size.
        workers: decoding threads; defaults to the number of CPUs (at most 16).
        reference: the file that fixed `size`, named in the error message.

    Returns:
        (N, channels, H, W) uint8.

    Raises:
        ConfigError: listing files whose size differs from the rest.
    """
    with _quiet_torchvision_io():
        return _decode_files(files, channels, size, workers, reference)


def _decode_files(files, channels, size, workers, reference) -> torch.Tensor:
    """The body of `decode_image_files` (same arguments)."""
    if size is None:
        first = _decode_one(files[0], channels)  # (C, H, W)
        size = tuple(first.shape[1:])
        reference = files[0]
    size = torch.Size(size)
    out = torch.empty((len(files), channels, *size), dtype=torch.uint8)  # (N, C, H, W)

    def decode_slice(start: int) -> list[tuple[Path, tuple[int, ...]]]:
        stop = min(start + _SLICE, len(files))
        decoded = _decode_many(files[start:stop], channels)  # each (C, H, W)
        wrong = [
            (files[start + offset], tuple(image.shape))
            for offset, image in enumerate(decoded)
            if image.shape[1:] != size
        ]
        if not wrong:
            torch.stack(decoded, out=out[start:stop])  # (stop - start, C, H, W)
        return wrong

    workers = workers or min(os.cpu_count() or 1, 16)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        wrong = [w for part in pool.map(decode_slice, range(0, len(files), _SLICE)) for w in part]
    if wrong:
        examples = "; ".join(f"{path} is {_fmt_shape(shape)}" for path, shape in wrong[:5])
        tally = Counter(_fmt_shape(shape) for _, shape in wrong)
        tally[_fmt_shape((channels, *size))] = len(files) - len(wrong)
        sizes = ", ".join(f"{shape}: {count}" for shape, count in tally.most_common())
        raise ConfigError(
            [
                f"all images must share one size: {len(wrong)} image(s) differ from "
                f"{reference} ({_fmt_shape((channels, *size))}), e.g. {examples} (sizes "
                f"found: {sizes}). Resize the tree to one size beforehand"
            ]
        )
    return out


# ---------------------------------------------------------------------- listing


def _scan(
    root: Path, split: str, train_classes: list[str] | None
) -> tuple[list[Path], torch.Tensor, list[str]]:
    """List one split's files with torchvision's ImageFolder; labels index train classes."""
    from torchvision.datasets import ImageFolder

    folder = root / split
    if not folder.is_dir():
        raise ConfigError(
            [
                f"imagefolder:{root} needs {folder}/ with one sub-folder of images per class "
                f"(the layout is PATH/train/<class>/* and PATH/test/<class>/*); {folder} "
                "does not exist"
            ]
        )
    try:
        found = ImageFolder(str(folder))
    except (FileNotFoundError, OSError) as error:
        raise ConfigError([f"cannot list images in {folder}: {error}"]) from error
    files = [Path(path) for path, _ in found.samples]
    if train_classes is None:
        labels = torch.tensor([label for _, label in found.samples], dtype=torch.int64)
        return files, labels, list(found.classes)

    position = {name: index for index, name in enumerate(train_classes)}
    unknown = [name for name in found.classes if name not in position]
    if unknown:
        raise ConfigError(
            [
                f"{folder} has class folder(s) {unknown} that {root / 'train'} lacks; every "
                "test class needs training images"
            ]
        )
    remap = [position[name] for name in found.classes]
    labels = torch.tensor([remap[label] for _, label in found.samples], dtype=torch.int64)
    return files, labels, train_classes


def _file_list_key(root: Path, splits: list[tuple[list[Path], torch.Tensor]]) -> str:
    """sha256 of every file's relative path, label, size and mtime, split by split."""
    digest = hashlib.sha256(CACHE_FORMAT.encode())
    for split, (files, labels) in zip(("train", "test"), splits):
        digest.update(f"|{split}|{len(files)}".encode())
        for path, label in zip(files, labels.tolist()):
            stat = path.stat()
            relative = path.relative_to(root).as_posix()
            digest.update(f"\n{relative}\t{label}\t{stat.st_size}\t{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


# ---------------------------------------------------------------------- decoding


def _channels_of(path: Path) -> int:
    """1 when the first image's PIL mode is grayscale (with or without alpha), else 3.

    Palette images count as colour.
    """
    from PIL import Image

    with Image.open(path) as image:  # reads the header only
        mode = image.mode
    channels = 1 if mode in _GRAY_PIL_MODES else 3
    logger.info(
        "%s is mode %s: every image is read with %d channel(s)", path, mode, channels
    )
    return channels


@contextmanager
def _quiet_torchvision_io():
    """Silence only torchvision.io's decoder deprecation (see the module docstring)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message="The image decoding and encoding capabilities of TorchVision",
            category=DeprecationWarning,
        )
        yield


def _torchvision_io():
    """torchvision.io's decoders, or None once a torchvision release has removed them."""
    try:
        from torchvision.io import ImageReadMode, decode_image, decode_jpeg
    except ImportError:
        return None
    return ImageReadMode, decode_image, decode_jpeg


def _fmt_shape(shape) -> str:
    return "x".join(str(int(s)) for s in shape)


def _decode_many(files: list[Path], channels: int) -> list[torch.Tensor]:
    """Decode a slice of files; JPEGs in one batched call, others one by one."""
    blobs = [path.read_bytes() for path in files]
    data = [torch.frombuffer(bytearray(blob), dtype=torch.uint8) for blob in blobs]  # (bytes,)
    decoded: list[torch.Tensor | None] = [None] * len(files)
    jpeg_at = [i for i, blob in enumerate(blobs) if blob[:2] == b"\xff\xd8"]
    tvio = _torchvision_io()
    if jpeg_at and tvio is not None:
        read_mode, _, decode_jpeg = tvio
        mode = read_mode.GRAY if channels == 1 else read_mode.RGB
        try:
            batch = decode_jpeg([data[i] for i in jpeg_at], mode=mode)
            for i, image in zip(jpeg_at, batch):
                decoded[i] = image
        except RuntimeError:  # a broken or exotic JPEG: decode one by one below
            pass
    for i, image in enumerate(decoded):
        if image is None:
            decoded[i] = _decode_bytes(data[i], files[i], channels)
    return decoded  # type: ignore[return-value]


def _decode_one(path: Path, channels: int) -> torch.Tensor:
    data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)  # (bytes,)
    return _decode_bytes(data, path, channels)


def _decode_bytes(data: torch.Tensor, path: Path, channels: int) -> torch.Tensor:
    """One image as (channels, H, W) uint8; torchvision.io first, PIL for other formats."""
    tvio = _torchvision_io()
    if tvio is not None:
        read_mode, decode_image, _ = tvio
        try:
            image = decode_image(data, mode=read_mode.GRAY if channels == 1 else read_mode.RGB)
            if image.dtype != torch.uint8:  # 16-bit PNG: (C, H, W) uint16
                image = (image.to(torch.float32) * (255.0 / 65535.0)).round_().to(torch.uint8)
            return image  # (C, H, W)
        except (RuntimeError, ValueError):  # a format torchvision.io cannot read: use PIL
            pass
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("L" if channels == 1 else "RGB"))
    except OSError as error:
        raise ConfigError([f"cannot decode image {path}: {error}"]) from error
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()  # (C, H, W)


# ---------------------------------------------------------------------- caching


def _read_cache(path: Path, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached (train, test) uint8 images, or None when absent or unreadable."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            if meta.get("format") != CACHE_FORMAT or meta.get("key") != key:
                logger.warning("ignoring cache %s: it was written for other files", path)
                return None
            return handle.get_tensor("images_train"), handle.get_tensor("images_test")
    except Exception as error:  # a truncated or foreign file: decode again and overwrite
        logger.warning("ignoring unreadable cache %s (%s); decoding again", path, error)
        return None


def _write_cache(
    path: Path, key: str, images_train: torch.Tensor, images_test: torch.Tensor, root: Path
) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    meta = {"format": CACHE_FORMAT, "key": key, "root": str(root)}
    save_file({"images_train": images_train, "images_test": images_test}, str(temporary), meta)
    os.replace(temporary, path)
    logger.info("cached decoded images of %s in %s", root, path)


def _raw(images_train, labels_train, images_test, labels_test, source, class_names) -> RawSplits:
    return RawSplits(
        images_train=images_train,
        labels_train=labels_train,
        images_test=images_test,
        labels_test=labels_test,
        source=source,
        class_names=class_names,
    )

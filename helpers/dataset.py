"""CIFAR-10 as arrays (an ImageFolder copy, torchvision's files, or synthetic images), the
augmentations of a recipe, and reproducible loaders."""

from __future__ import annotations

import hashlib
import os
import random
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .recipes import Recipe

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


class DataError(ValueError):
    """The data folder or one of its files is not what the loader expects."""


@dataclass
class CifarArrays:
    """The decoded dataset: uint8 NHWC RGB images, int64 labels, class names."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: tuple[str, ...]
    source: str  # where it came from, for run metadata


# ----------------------------------------------------------------------------- loading


def check_data_dir(data_dir: str | os.PathLike, download: bool = False) -> Path:
    """The data folder, if it can hold CIFAR-10 (or download is allowed); else a one-line DataError."""
    from .download import CIFAR10_FILENAME, CIFAR10_FOLDER

    root = Path(data_dir).expanduser()
    expected = (f"train/<class>/*.jpg and test/<class>/*.jpg (ImageFolder layout), {CIFAR10_FOLDER}/ "
                f"or {CIFAR10_FILENAME}")
    if root.exists() and not root.is_dir():
        raise DataError(f"data folder {str(root)!r} is a file; pass the folder that holds {expected}")
    if not root.exists() and not download:
        raise DataError(f"data folder {str(root)!r} does not exist and download is off; pass download=True "
                        "(CLI: --download) or point it at an ImageFolder copy (e.g. unpacked with "
                        "../shared/tools/cifar10_jpeg.py)")
    if (root / "train").is_dir() or (root / "test").is_dir():
        missing = [f"{split}/" for split in ("train", "test") if not (root / split).is_dir()]
        if missing:
            raise DataError(f"{str(root)!r} is half an ImageFolder copy: {' and '.join(missing)} missing")
    elif root.is_dir() and not download and not ((root / CIFAR10_FOLDER).is_dir()
                                                 or (root / CIFAR10_FILENAME).is_file()):
        found = sorted(p.name for p in _visible(root))[:10]
        raise DataError(f"{str(root)!r} is not a CIFAR-10 folder: expected {expected}, "
                        f"found {found or 'nothing'}")
    return root


def load_cifar10(data_dir: str | os.PathLike, download: bool = False, urls: list[str] | None = None,
                 progress: bool = True) -> CifarArrays:
    """CIFAR-10 from an ImageFolder copy or torchvision's files, fetched from mirrors if allowed."""
    root = check_data_dir(data_dir, download)
    if (root / "train").is_dir():
        return load_image_folder(root)
    from torchvision.datasets import CIFAR10  # deferred: torchvision is slow to import

    from .download import CIFAR10_FILENAME, download_cifar10, extract_local_archive

    if download:
        download_cifar10(root, urls, progress=progress)  # the archive in root, a cache or mirrors
    elif (root / CIFAR10_FILENAME).is_file():
        extract_local_archive(root)  # no network without download
    try:
        train, test = (CIFAR10(str(root), train=split, download=False) for split in (True, False))
    except RuntimeError as err:  # torchvision's "Dataset not found or corrupted"
        raise DataError(f"torchvision CIFAR10 under {str(root)!r}: {err}; delete the folder and download "
                        "again") from err
    return CifarArrays(train.data, np.asarray(train.targets, np.int64), test.data,
                       np.asarray(test.targets, np.int64), tuple(train.classes), f"torchvision:{root}")


def load_image_folder(root: str | os.PathLike) -> CifarArrays:
    """Read an ImageFolder tree (train/<class>/*, test/<class>/*) into uint8 arrays; a class's index
    is its folder's place in sorted order, as torchvision's ImageFolder has it."""
    root = Path(root)
    (xtr, ytr, classes), (xte, yte, test_classes) = (_read_split(root / s) for s in ("train", "test"))
    if test_classes != classes:
        raise DataError(f"{str(root)!r}: train/ and test/ have different class folders: "
                        f"{list(classes)} vs {list(test_classes)}")
    return CifarArrays(xtr, ytr, xte, yte, classes, f"image-folder:{root}")


def _visible(folder: Path) -> list[Path]:
    """Entries of a folder minus hidden ones (.ipynb_checkpoints, ._x.jpg from a Mac, __MACOSX)."""
    try:
        return [p for p in folder.iterdir() if not p.name.startswith((".", "__MACOSX"))]
    except OSError as err:
        raise DataError(f"cannot list {str(folder)!r}: {err.strerror or err}") from err


def _read_split(folder: Path) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Decode every image of one split (files of other types are left alone)."""
    from PIL import Image, UnidentifiedImageError

    classes = tuple(sorted(p.name for p in _visible(folder) if p.is_dir()))
    if not classes:
        raise DataError(f"{str(folder)!r} holds no class folders; expected {folder.name}/<class>/*")
    images, labels = [], []
    for index, name in enumerate(classes):
        files = sorted(p for p in _visible(folder / name) if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"class folder {str(folder / name)!r} holds no images {IMAGE_SUFFIXES}")
        for path in files:
            try:
                with Image.open(path) as img:
                    array = np.asarray(img.convert("RGB"))
            except (UnidentifiedImageError, OSError) as err:
                raise DataError(f"cannot read image {str(path)!r}: {err}") from err
            if array.shape != (32, 32, 3):
                raise DataError(f"image {str(path)!r} is {array.shape}, expected (32, 32, 3)")
            images.append(array)
            labels.append(index)
    return np.stack(images), np.asarray(labels, np.int64), classes


def make_synthetic_cifar(n_train: int = 500, n_test: int = 200, seed: int = 0) -> CifarArrays:
    """A learnable stand-in for CIFAR-10 (each class a colour and stripe) for offline smoke runs."""
    rng = np.random.default_rng(seed)
    palette = rng.integers(40, 216, size=(10, 3))

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.arange(n) % 10
        rng.shuffle(labels)
        images = palette[labels][:, None, None, :] + rng.normal(0, 25, size=(n, 32, 32, 3))
        for i, label in enumerate(labels):  # a class-specific stripe gives GradCAM something to find
            images[i, 3 * label: 3 * label + 3, :, :] = 255 - palette[label]
        return np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.int64)

    (xtr, ytr), (xte, yte) = split(n_train), split(n_test)
    return CifarArrays(xtr, ytr, xte, yte, CIFAR10_CLASSES, f"synthetic(seed={seed})")


def take_subset(images: np.ndarray, labels: np.ndarray, n: int | None, seed: int = 0):
    """A seeded random subset of n images (all of them when n is None or too large)."""
    if n is None or n >= len(labels):
        return images, labels
    if n <= 0:
        raise ValueError(f"subset size must be positive, got {n}")
    keep = np.sort(np.random.default_rng(seed).permutation(len(labels))[:n])
    return images[keep], labels[keep]


def load_data(data_dir: str | os.PathLike | None, download: bool = False, train_subset: int | None = None,
              test_subset: int | None = None, seed: int = 0, synthetic: bool = False,
              urls: list[str] | None = None, progress: bool = True) -> CifarArrays:
    """Load (or synthesise) the dataset and cut the optional seeded subsets for quick runs."""
    if synthetic:
        data = make_synthetic_cifar(train_subset or 500, test_subset or 200, seed)
    elif data_dir is None:
        raise DataError("no data folder given; pass data_dir (or synthetic=True for a smoke run)")
    else:
        data = load_cifar10(data_dir, download, urls, progress)
    data.train_images, data.train_labels = take_subset(data.train_images, data.train_labels, train_subset,
                                                       seed)
    data.test_images, data.test_labels = take_subset(data.test_images, data.test_labels, test_subset,
                                                     seed + 1)
    return data


def channel_mean_std(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std over every pixel of a uint8 NHWC array, in [0, 1] units."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected NHWC images with 3 channels, got shape {images.shape}")
    total, total_sq = np.zeros(3), np.zeros(3)
    for start in range(0, len(images), 4096):  # chunks keep float64 memory small
        chunk = images[start:start + 4096].reshape(-1, 3).astype(np.float64) / 255.0
        total += chunk.sum(0)
        total_sq += (chunk**2).sum(0)
    count = images.shape[0] * images.shape[1] * images.shape[2]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


# ----------------------------------------------------------------------------- augmentations


def get_transforms(recipe: Recipe, train: bool, mean, std):
    """An albumentations Compose: HWC uint8 RGB -> normalized CHW float tensor."""
    import albumentations as A
    import cv2
    from albumentations.pytorch import ToTensorV2

    # Fills are whole numbers: albumentations truncates a float fill when writing into uint8.
    mean_fill = tuple(int(round(255 * m)) for m in mean)
    steps = []
    aug = recipe.augment
    if train and aug.crop_padding:
        size = 32 + 2 * aug.crop_padding  # torchvision RandomCrop(32, padding=p): zeros, then crop
        steps += [
            A.PadIfNeeded(size, size, border_mode=cv2.BORDER_CONSTANT, fill=0),
            A.RandomCrop(32, 32),
        ]
    if train and aug.hflip_p:
        steps.append(A.HorizontalFlip(p=aug.hflip_p))
    if train and (aug.shift_limit or aug.scale_limit):
        # Whole pixels (translate_px): albumentations 2.0.8 truncates translate_percent to whole
        # pixels, which moved images by at most 1 px instead of 2 (checked on pixels).
        shift = round(aug.shift_limit * 32)
        steps.append(A.Affine(translate_px=(-shift, shift),
                              scale=(1 - aug.scale_limit, 1 + aug.scale_limit),
                              rotate=(-aug.rotate_limit, aug.rotate_limit), p=aug.affine_p,
                              keep_ratio=True,  # one zoom for both axes, as ShiftScaleRotate
                              border_mode=cv2.BORDER_CONSTANT, fill=mean_fill))
    elif train and aug.rotate_limit:
        steps.append(A.Rotate(limit=(-aug.rotate_limit, aug.rotate_limit), p=1.0,
                              border_mode=cv2.BORDER_CONSTANT, fill=mean_fill))
    if train and aug.cutout_size:
        # After the rotation, so the hole stays an axis-aligned square of exactly this size.
        side = aug.cutout_size
        steps.append(A.CoarseDropout(num_holes_range=(1, 1), hole_height_range=(side, side),
                                     hole_width_range=(side, side), fill=mean_fill, p=aug.cutout_p))
    # Borders, corners and holes take the dataset mean, which normalizes to ~0: no signal.
    steps += [A.Normalize(mean=mean, std=std, max_pixel_value=255.0), ToTensorV2()]
    return A.Compose(steps)


def seed_transform(transform, seed: int | np.random.SeedSequence) -> None:
    """Give an albumentations Compose ONE random stream, shared by its transforms, from `seed`.

    Not `Compose.set_random_seed`: that gives every transform its own generator with the same
    seed, so their first draws coincide and, e.g., the flip would follow the crop's offset.
    """
    sequence = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    python_seed = int(sequence.generate_state(1, np.uint64)[0])  # albumentations also uses `random`
    transform.set_random_state(np.random.default_rng(sequence), random.Random(python_seed))


# Each stream comes from SeedSequence(seed, spawn_key=(purpose, epoch[, index])): distinct tuples
# give independent streams, unlike arithmetic on the seed (seed * K + epoch * L + index collides).
_SHUFFLE, _AUGMENT = 1, 2


def augment_stream(seed: int, epoch: int, index: int) -> np.random.SeedSequence:
    """The seed sequence of image `index`'s augmentations in `epoch` of a run seeded `seed`."""
    return np.random.SeedSequence(seed, spawn_key=(_AUGMENT, epoch, index))


def shuffle_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed for the training order of `epoch` of a run seeded `seed`."""
    state = np.random.SeedSequence(seed, spawn_key=(_SHUFFLE, epoch)).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


# ----------------------------------------------------------------------------- datasets and loaders


class CifarDataset(Dataset):
    """Images + labels with a transform reseeded per (seed, epoch, index): the augmented images do
    not depend on the number of workers, and a resumed run sees those an uninterrupted run would."""

    STREAMS = "SeedSequence(seed, spawn_key=(2, epoch, index))"  # in checkpoints: how draws are made

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable, seed: int = 0):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.transform, self.seed = images, labels, transform, seed
        self._fingerprint: str | None = None
        # In shared memory: persistent workers hold their own copy of the dataset, and a plain
        # attribute set in the main process would never reach them.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of this epoch (persistent workers see it too)."""
        self._epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def fingerprint(self) -> str:
        """A hash of the images and labels: which data a checkpoint was trained on, wherever it lies."""
        if self._fingerprint is None:
            digest = hashlib.blake2b(digest_size=8)
            digest.update(np.ascontiguousarray(self.images).data)
            digest.update(np.ascontiguousarray(self.labels).data)
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if hasattr(self.transform, "set_random_state"):
            seed_transform(self.transform, augment_stream(self.seed, int(self._epoch), index))
        return self.transform(image=self.images[index])["image"], int(self.labels[index])


class EpochShuffleSampler(Sampler[int]):
    """A random permutation per epoch from (seed, epoch), so a resumed run keeps the same order."""

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(shuffle_seed(self.seed, self.epoch))
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


def _leave_ctrl_c_to_the_main_process(worker_id: int) -> None:
    """Loader workers ignore SIGINT: Ctrl-C reaches the whole process group, and a worker it killed
    would take the loader down before training could stop cleanly."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def default_num_workers(device: torch.device | str) -> int:
    """All cores but one (up to 16) feeding a GPU; on a CPU, none up to 4 cores, else a few.

    One loader process augments 2,000-5,000 images/s on 2-core CPUs, faster than a 2-core CPU trains
    (S8 ~160, S10 ~260, S9 ~1,260 img/s in bf16 on a Zen 5): there a worker would only take the
    model's cores.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if torch.device(device).type == "cuda":
        return max(2, min(cores - 1, 16))
    return 0 if cores <= 4 else min(4, cores // 4)


def make_loader(dataset: Dataset, batch_size: int, train: bool, device: torch.device | str = "cpu",
                seed: int = 0, num_workers: int | None = None) -> DataLoader:
    """Train: a seeded shuffle per epoch; test: in order. Memory pinned for a GPU, and the workers
    kept alive between epochs."""
    on_cuda = torch.device(device).type == "cuda"
    workers = default_num_workers(device) if num_workers is None else num_workers
    kept = {"persistent_workers": True, "prefetch_factor": 4 if on_cuda else 2} if workers else {}
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                      sampler=EpochShuffleSampler(len(dataset), seed) if train else None,
                      pin_memory=on_cuda, worker_init_fn=_leave_ctrl_c_to_the_main_process,
                      generator=torch.Generator().manual_seed(seed), **kept)


def build_loaders(data: CifarArrays, recipe: Recipe, mean, std, device="cpu", seed: int = 0,
                  batch_size: int | None = None,
                  num_workers: int | None = None) -> tuple[DataLoader, DataLoader]:
    """Train and test loaders for a recipe: augmented + shuffled, and normalized + in order."""
    batch = batch_size or recipe.batch_size
    augmented, normalized = (get_transforms(recipe, train, mean, std) for train in (True, False))
    train_set = CifarDataset(data.train_images, data.train_labels, augmented, seed)
    test_set = CifarDataset(data.test_images, data.test_labels, normalized, seed)
    train = make_loader(train_set, batch, True, device, seed, num_workers)
    # Evaluation has no backward pass, so twice the batch fits in the same memory.
    return train, make_loader(test_set, 2 * batch, False, device, seed, num_workers)


def denormalize(images: torch.Tensor, mean, std) -> np.ndarray:
    """Undo Normalize: CHW float tensors -> NHWC floats in [0, 1] for plotting."""
    images = images.detach().float().cpu()
    if images.ndim == 3:
        images = images[None]
    mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return (images * std_t + mean_t).clamp(0, 1).permute(0, 2, 3, 1).numpy()

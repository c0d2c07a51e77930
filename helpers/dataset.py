"""CIFAR-10 loading (torchvision or an ImageFolder copy), summary statistics, augmentations, loaders."""

from __future__ import annotations

import hashlib
import os
import random
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
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
    skipped: dict[str, int] = field(default_factory=dict)  # files not read, by suffix


# ----------------------------------------------------------------------------- loading


def check_data_dir(data_dir: str | os.PathLike, download: bool = False) -> Path:
    """The data folder, if it can hold CIFAR-10 (or download is allowed); else a one-line DataError."""
    root = Path(data_dir).expanduser()
    if root.exists() and not root.is_dir():
        raise DataError(f"data folder {str(root)!r} is a file; pass the folder that holds "
                        "train/ and test/ (ImageFolder) or cifar-10-batches-py/")
    if not root.exists() and not download:
        raise DataError(
            f"data folder {str(root)!r} does not exist and download is off; pass download=True "
            "(CLI: --download) or point data_dir at an ImageFolder copy with train/ and test/ "
            "(e.g. unpack ../shared/data with its cifar10_jpeg.py)"
        )
    if _is_image_folder(root):
        _check_splits(root)  # half an ImageFolder copy is refused here, before any run folder exists
    elif root.is_dir() and not download and not _holds_cifar10(root):
        from .download import CIFAR10_FILENAME

        found = sorted(p.name for p in _visible(root))[:10]
        raise DataError(
            f"{str(root)!r} is not a CIFAR-10 folder: expected train/<class>/* and test/<class>/* "
            f"(ImageFolder layout), torchvision's cifar-10-batches-py/ or {CIFAR10_FILENAME}, "
            f"found {found or 'nothing'}"
        )
    return root


def _is_image_folder(root: Path) -> bool:
    """Whether root is (at least half of) an ImageFolder copy: train/ or test/ is there."""
    return (root / "train").is_dir() or (root / "test").is_dir()


def _holds_cifar10(root: Path) -> bool:
    """Whether root holds torchvision's folder or archive (their contents are checked on loading)."""
    from .download import CIFAR10_FILENAME, CIFAR10_FOLDER

    return (root / CIFAR10_FOLDER).is_dir() or (root / CIFAR10_FILENAME).is_file()


def _check_splits(root: Path) -> None:
    """A one-line DataError unless root has both train/ and test/ (the ImageFolder layout)."""
    missing = [split for split in ("train", "test") if not (root / split).is_dir()]
    if missing:
        found = sorted(p.name for p in _visible(root))
        raise DataError(
            f"{str(root)!r}: expected folders train/ and test/ (ImageFolder layout), "
            f"found {found}; missing {', '.join(s + '/' for s in missing)}"
        )


def load_cifar10(data_dir: str | os.PathLike, download: bool = False,
                 urls: list[str] | None = None, progress: bool = True) -> CifarArrays:
    """Load CIFAR-10 from an ImageFolder copy or torchvision's files, fetching them if allowed."""
    root = check_data_dir(data_dir, download)  # past it: one of the layouts is there, or download is on
    if _is_image_folder(root):
        return load_image_folder(root)
    return _load_torchvision(root, download, urls, progress)


def _load_torchvision(root: Path, download: bool, urls: list[str] | None,
                      progress: bool) -> CifarArrays:
    """Read torchvision's CIFAR10 (its python pickles) into arrays, fetching them from mirrors first."""
    from torchvision.datasets import CIFAR10  # deferred: torchvision is slow to import

    from .download import CIFAR10_FILENAME, download_cifar10, extract_local_archive

    if download:
        download_cifar10(root, urls, progress=progress)  # the archive in root, a cache or mirrors
    elif (root / CIFAR10_FILENAME).is_file():
        extract_local_archive(root)  # returns at once when extracted; without --download, no network
    try:
        train = CIFAR10(str(root), train=True, download=False)
        test = CIFAR10(str(root), train=False, download=False)
    except RuntimeError as err:  # torchvision's "Dataset not found or corrupted"
        raise DataError(f"torchvision CIFAR10 under {str(root)!r}: {err}; delete the folder "
                        "and download again") from err
    return CifarArrays(
        train.data, np.asarray(train.targets, np.int64), test.data,
        np.asarray(test.targets, np.int64), tuple(train.classes), f"torchvision:{root}",
    )


def load_image_folder(root: str | os.PathLike) -> CifarArrays:
    """Read an ImageFolder tree (train/<class>/*, test/<class>/*) into uint8 arrays."""
    root = Path(root)
    _check_splits(root)
    splits = {split: _read_split(root / split) for split in ("train", "test")}
    classes = splits["train"][2]
    if splits["test"][2] != classes:
        raise DataError(
            f"{str(root)!r}: train/ and test/ have different class folders: "
            f"{list(classes)} vs {list(splits['test'][2])}"
        )
    (xtr, ytr, _, skipped_train), (xte, yte, _, skipped_test) = splits["train"], splits["test"]
    skipped = {k: skipped_train.get(k, 0) + skipped_test.get(k, 0)
               for k in sorted(skipped_train | skipped_test)}
    return CifarArrays(xtr, ytr, xte, yte, classes, f"image-folder:{root}", skipped)


def _visible(folder: Path) -> list[Path]:
    """Entries of a folder minus hidden ones (.ipynb_checkpoints, ._x.jpg from a Mac, __MACOSX)."""
    try:
        return [p for p in folder.iterdir() if not p.name.startswith((".", "__MACOSX"))]
    except OSError as err:
        raise DataError(f"cannot list {str(folder)!r}: {err.strerror or err}") from err


def _read_split(folder: Path) -> tuple[np.ndarray, np.ndarray, tuple[str, ...], dict[str, int]]:
    """Decode every image of one split; class index = position of its folder in sorted order.

    Also returns how many files were skipped, by suffix (not an image type this loader reads).
    """
    from PIL import Image, UnidentifiedImageError

    classes = tuple(sorted(p.name for p in _visible(folder) if p.is_dir()))
    if not classes:
        raise DataError(f"{str(folder)!r} holds no class folders; expected {folder.name}/<class>/*")
    images, labels, skipped = [], [], {}
    for index, name in enumerate(classes):
        entries = sorted(p for p in _visible(folder / name) if p.is_file())
        files = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES]
        for path in entries:
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                skipped[path.suffix.lower() or "(none)"] = skipped.get(path.suffix.lower() or "(none)", 0) + 1
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
    return np.stack(images), np.asarray(labels, np.int64), classes, skipped


def make_synthetic_cifar(n_train: int = 500, n_test: int = 200, seed: int = 0) -> CifarArrays:
    """A learnable stand-in for CIFAR-10 (each class a colour and stripe) for offline smoke runs."""
    rng = np.random.default_rng(seed)
    palette = rng.integers(40, 216, size=(10, 3))

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.arange(n) % 10
        rng.shuffle(labels)
        noise = rng.normal(0, 25, size=(n, 32, 32, 3))
        images = palette[labels][:, None, None, :] + noise
        for i, label in enumerate(labels):  # a class-specific stripe gives GradCAM something to find
            images[i, 3 * label: 3 * label + 3, :, :] = 255 - palette[label]
        return np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.int64)

    xtr, ytr = split(n_train)
    xte, yte = split(n_test)
    return CifarArrays(xtr, ytr, xte, yte, CIFAR10_CLASSES, f"synthetic(seed={seed})")


def take_subset(images: np.ndarray, labels: np.ndarray, n: int | None, seed: int = 0):
    """A seeded random subset of n images (all of them when n is None or too large)."""
    if n is None or n >= len(labels):
        return images, labels
    if n <= 0:
        raise ValueError(f"subset size must be positive, got {n}")
    keep = np.sort(np.random.default_rng(seed).permutation(len(labels))[:n])
    return images[keep], labels[keep]


# ----------------------------------------------------------------------------- summary


def channel_mean_std(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std over every pixel of a uint8 NHWC array, in [0, 1] units."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected NHWC images with 3 channels, got shape {images.shape}")
    total = np.zeros(3)
    total_sq = np.zeros(3)
    for start in range(0, len(images), 4096):  # chunks keep float64 memory small
        chunk = images[start:start + 4096].reshape(-1, 3).astype(np.float64) / 255.0
        total += chunk.sum(0)
        total_sq += (chunk**2).sum(0)
    count = images.shape[0] * images.shape[1] * images.shape[2]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


@dataclass
class DataSummary:
    """What a student should know about the data before training on it."""

    classes: tuple[str, ...]
    train_counts: np.ndarray
    test_counts: np.ndarray
    image_shape: tuple[int, ...]
    dtype: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def table(self):
        """Per-class counts for train and test as a pandas DataFrame (with a total row)."""
        import pandas as pd

        frame = pd.DataFrame(
            {"train": self.train_counts, "test": self.test_counts}, index=list(self.classes)
        )
        frame.loc["total"] = frame.sum()
        return frame


def summarize(data: CifarArrays) -> DataSummary:
    """Counts per class, image shape and dtype, and mean/std computed from the train set."""
    n = len(data.classes)
    mean, std = channel_mean_std(data.train_images)
    return DataSummary(
        classes=data.classes,
        train_counts=np.bincount(data.train_labels, minlength=n),
        test_counts=np.bincount(data.test_labels, minlength=n),
        image_shape=tuple(data.train_images.shape[1:]),
        dtype=str(data.train_images.dtype),
        mean=mean,
        std=std,
    )


# ----------------------------------------------------------------------------- transforms


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
        # Uncovered borders take the dataset mean, which normalizes to ~0 (no signal).
        # translate_px, not translate_percent: albumentations 2.0.8 truncates the percent to whole
        # pixels, so +-6.25% of 32 px moved images by at most 1 px (checked on pixels), not 2.
        shift = round(aug.shift_limit * 32)
        steps.append(A.Affine(translate_px=(-shift, shift),
                              scale=(1 - aug.scale_limit, 1 + aug.scale_limit),
                              rotate=(-aug.rotate_limit, aug.rotate_limit), p=aug.affine_p,
                              keep_ratio=True,  # one zoom for both axes, as ShiftScaleRotate
                              border_mode=cv2.BORDER_CONSTANT, fill=mean_fill))
    elif train and aug.rotate_limit:
        # Corners uncovered by the rotation take the dataset mean, which normalizes to ~0.
        steps.append(A.Rotate(limit=(-aug.rotate_limit, aug.rotate_limit), p=1.0,
                              border_mode=cv2.BORDER_CONSTANT, fill=mean_fill))
    if train and aug.cutout_size:
        # After the rotation, so the hole stays an axis-aligned square of exactly this size.
        side = aug.cutout_size
        steps.append(A.CoarseDropout(num_holes_range=(1, 1), hole_height_range=(side, side),
                                     hole_width_range=(side, side), fill=mean_fill, p=aug.cutout_p))
    steps += [A.Normalize(mean=mean, std=std, max_pixel_value=255.0), ToTensorV2()]
    return A.Compose(steps)


# ----------------------------------------------------------------------------- datasets and loaders


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


class CifarDataset(Dataset):
    """Images + labels with a transform that is reseeded per (seed, epoch, index).

    Per-sample seeds make the augmented images independent of the number of workers and let a
    resumed run see exactly the images an uninterrupted run would have seen.
    """

    STREAMS = "SeedSequence(seed, spawn_key=(2, epoch, index))"  # in checkpoints: how draws are made

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable, seed: int = 0):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.transform, self.seed = images, labels, transform, seed
        self._fingerprint: str | None = None
        # In shared memory: persistent workers hold their own copy of the
        # dataset, and a plain attribute set in the main process would never reach them.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        """The epoch whose augmentation stream __getitem__ draws from."""
        return int(self._epoch)

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
            seed_transform(self.transform, augment_stream(self.seed, self.epoch, index))
        image = self.transform(image=self.images[index])["image"]
        return image, int(self.labels[index])


class EpochShuffleSampler(Sampler[int]):
    """A random permutation per epoch from (seed, epoch), so a resumed run keeps the same order."""

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of this epoch."""
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(shuffle_seed(self.seed, self.epoch))
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


def _leave_ctrl_c_to_the_main_process(worker_id: int) -> None:
    """Loader workers ignore SIGINT: Ctrl-C (or a notebook's stop) reaches the whole process group,
    and a worker it killed would take the loader down before training could save and stop.
    Workers need no seeding: CifarDataset seeds every image's augmentations itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def default_num_workers(device: torch.device | str) -> int:
    """Loader workers: all cores but one on a GPU (up to 16); on a CPU none up to 4 cores, else a few.

    One loader process augments 2,000-5,000 images/s (measured on 2-core CPUs). A GPU trains faster
    than that, so a GPU run wants every spare core. On a 2-core CPU the model is the bottleneck
    (S10 ~48, S8 ~36, S9 ~390 img/s in fp32 on a Zen 3; S10 ~260, S8 ~160, S9 ~1,260 in bf16 on a
    Zen 5): augmenting in the main process costs 1-17% there, and a worker process would take that
    time from the model's two threads anyway.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if torch.device(device).type == "cuda":
        return max(2, min(cores - 1, 16))
    return 0 if cores <= 4 else min(4, cores // 4)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    train: bool,
    device: torch.device | str = "cpu",
    seed: int = 0,
    num_workers: int | None = None,
    fast: bool = True,
) -> DataLoader:
    """Train: per-epoch seeded shuffle; test: fixed order. `fast` adds pinning, prefetching and
    workers that persist between epochs."""
    on_cuda = torch.device(device).type == "cuda"
    workers = default_num_workers(device) if num_workers is None else num_workers
    options = {}
    if fast and workers > 0:  # workers kept between epochs: no restart cost per epoch
        options = {"persistent_workers": True, "prefetch_factor": 4 if on_cuda else 2}
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochShuffleSampler(len(dataset), seed) if train else None,
        shuffle=False,
        num_workers=workers,
        pin_memory=fast and on_cuda,
        worker_init_fn=_leave_ctrl_c_to_the_main_process,
        generator=torch.Generator().manual_seed(seed),
        drop_last=False,
        **options,
    )


def build_loaders(data: CifarArrays, recipe: Recipe, mean, std, device="cpu", seed: int = 0,
                  batch_size: int | None = None, num_workers: int | None = None,
                  fast: bool = True) -> tuple[DataLoader, DataLoader]:
    """Train and test loaders for a recipe: augmented + shuffled, and normalized + in order."""
    batch = batch_size or recipe.batch_size
    train_set = CifarDataset(data.train_images, data.train_labels,
                             get_transforms(recipe, True, mean, std), seed)
    test_set = CifarDataset(data.test_images, data.test_labels,
                            get_transforms(recipe, False, mean, std), seed)
    train = make_loader(train_set, batch, True, device, seed, num_workers, fast)
    # Evaluation has no backward pass, so twice the batch fits in the same memory.
    test = make_loader(test_set, 2 * batch, False, device, seed, num_workers, fast)
    return train, test


def denormalize(images: torch.Tensor, mean, std) -> np.ndarray:
    """Undo Normalize: CHW float tensors -> NHWC floats in [0, 1] for plotting."""
    images = images.detach().float().cpu()
    if images.ndim == 3:
        images = images[None]
    mean_t = torch.tensor(mean).view(1, 3, 1, 1)
    std_t = torch.tensor(std).view(1, 3, 1, 1)
    return (images * std_t + mean_t).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def load_data(data_dir: str | os.PathLike | None, download: bool = False,
              train_subset: int | None = None, test_subset: int | None = None, seed: int = 0,
              synthetic: bool = False, urls: list[str] | None = None,
              progress: bool = True) -> CifarArrays:
    """Load (or synthesise) the dataset and cut the optional seeded subsets for quick runs."""
    if synthetic:
        data = make_synthetic_cifar(train_subset or 500, test_subset or 200, seed)
    elif data_dir is None:
        raise DataError("no data folder given; pass data_dir (or synthetic=True for a smoke run)")
    else:
        data = load_cifar10(data_dir, download, urls, progress)
    data.train_images, data.train_labels = take_subset(
        data.train_images, data.train_labels, train_subset, seed)
    data.test_images, data.test_labels = take_subset(
        data.test_images, data.test_labels, test_subset, seed + 1)
    return data

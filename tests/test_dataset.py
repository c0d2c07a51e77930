"""Data: loading, errors, summary statistics, and the augmentations checked on pixels."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import dataset
from helpers.dataset import (
    CifarDataset,
    DataError,
    build_loaders,
    channel_mean_std,
    get_transforms,
    load_cifar10,
    make_synthetic_cifar,
)
from helpers.recipes import S8, S9, S10, Augment

MEAN = (0.5, 0.25, 0.75)
STD = (0.2, 0.3, 0.4)


def only(recipe, **augment):
    """The recipe with only the named augmentations switched on."""
    fields = {"crop_padding": 0, "hflip_p": 0.0, "rotate_limit": 0.0, "cutout_size": 0}
    fields.update(augment)
    return dataclasses.replace(recipe, augment=Augment(**fields))


def to_pixels(tensor: torch.Tensor, mean=MEAN, std=STD) -> np.ndarray:
    """Invert Normalize + ToTensor: CHW float -> HWC uint8."""
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    return torch.round((tensor * s + m) * 255).permute(1, 2, 0).numpy().astype(np.uint8)


def draws(transform, image, n=200):
    """n seeded draws of a transform on one image, as uint8 HWC (seeded as CifarDataset does)."""
    out = []
    for seed in range(n):
        dataset.seed_transform(transform, seed)
        out.append(to_pixels(transform(image=image)["image"]))
    return out


@pytest.fixture
def random_image():
    return np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------- transforms


def test_test_transform_only_normalizes(random_image):
    out = get_transforms(S10, False, MEAN, STD)(image=random_image)["image"]
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    expected = (random_image / 255.0 - np.array(MEAN)) / np.array(STD)
    np.testing.assert_allclose(out.permute(1, 2, 0).numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("recipe", [S10, S8], ids=["s10", "s8"])
def test_crop_is_torchvision_random_crop_with_padding_4(recipe, random_image):
    assert recipe.augment.crop_padding == 4
    padded = np.pad(random_image, ((4, 4), (4, 4), (0, 0)))  # zero padding, as torchvision
    shifts = set()
    for out in draws(get_transforms(only(recipe, crop_padding=4), True, MEAN, STD), random_image):
        matches = [(dy, dx) for dy in range(9) for dx in range(9)
                   if np.array_equal(out, padded[dy:dy + 32, dx:dx + 32])]
        assert len(matches) == 1, "every output is exactly one 32x32 window of the padded image"
        shifts.add((matches[0][0] - 4, matches[0][1] - 4))
    ys, xs = {s[0] for s in shifts}, {s[1] for s in shifts}
    assert ys == xs == set(range(-4, 5)), "shifts reach 4 pixels both ways and no further"


def test_flip_is_horizontal_with_half_probability(random_image):
    outs = draws(get_transforms(only(S10, hflip_p=0.5), True, MEAN, STD), random_image)
    flipped = [np.array_equal(o, random_image[:, ::-1]) for o in outs]
    assert all(f or np.array_equal(o, random_image) for f, o in zip(flipped, outs))
    assert 0.4 < np.mean(flipped) < 0.6


def hole_mask(out: np.ndarray, mean=MEAN) -> np.ndarray:
    """Pixels equal to the dataset mean in all three channels."""
    return (out == np.round(255 * np.array(mean)).astype(np.uint8)).all(-1)


@pytest.mark.parametrize("recipe, side", [(S10, 8), (S8, 16), (S9, 16)])
def test_cutout_alone_is_exactly_one_square_hole_filled_with_the_mean(recipe, side):
    image = np.full((32, 32, 3), 200, np.uint8)
    outs = draws(get_transforms(only(recipe, cutout_size=recipe.augment.cutout_size, cutout_p=1.0),
                                True, MEAN, STD), image)
    corners = set()
    for out in outs:
        mask = hole_mask(out)
        ys, xs = np.nonzero(mask)
        assert mask.sum() == side * side
        assert ys.max() - ys.min() + 1 == side and xs.max() - xs.min() + 1 == side
        assert (out[~mask] == 200).all(), "nothing outside the hole changes"
        corners.add((ys.min(), xs.min()))
    assert len(corners) > 50, "the hole moves around"


def full_squares(mask: np.ndarray, side: int) -> int:
    """How many side x side windows of the mask are entirely True."""
    return sum(mask[y:y + side, x:x + side].all()
               for y in range(33 - side) for x in range(33 - side))


@pytest.mark.parametrize("recipe", [S10, S8])
def test_full_train_pipeline_cuts_one_hole_of_the_recipe_size_at_the_recipe_rate(recipe, random_image):
    side, p = recipe.augment.cutout_size, recipe.augment.cutout_p
    masks = [hole_mask(out) for out in draws(get_transforms(recipe, True, MEAN, STD), random_image, n=200)]
    holes = [full_squares(mask, side) for mask in masks]
    assert set(holes) <= {0, 1} and all(full_squares(mask, side + 1) == 0 for mask in masks)
    # exactly p of the images when p is 0 or 1, else within 0.1 (about three standard errors at 200)
    assert abs(np.mean(holes) - p) <= (0.1 if 0 < p < 1 else 0)


def test_hole_normalizes_to_about_zero():
    image = np.full((32, 32, 3), 200, np.uint8)
    transform = get_transforms(only(S10, cutout_size=8), True, MEAN, STD)
    dataset.seed_transform(transform, 0)
    out = transform(image=image)["image"]
    fill = (np.round(255 * np.array(MEAN)) / 255 - np.array(MEAN)) / np.array(STD)
    values = out.permute(1, 2, 0).reshape(-1, 3).numpy()
    in_hole = np.isclose(values, fill, atol=1e-5).all(1)
    assert in_hole.sum() == 64 and np.abs(fill).max() < 0.01


def bar_angle(out: np.ndarray) -> float:
    """Orientation (degrees) of a bright bar from the image's second moments, centre disk only."""
    gray = out.astype(float).mean(-1)
    yy, xx = np.mgrid[:32, :32] - 15.5
    weight = gray * (yy**2 + xx**2 < 12**2)
    mu20, mu02, mu11 = (weight * xx**2).sum(), (weight * yy**2).sum(), (weight * xx * yy).sum()
    return math.degrees(0.5 * math.atan2(2 * mu11, mu20 - mu02))


def test_rotation_stays_within_five_degrees_and_uses_the_range():
    image = np.zeros((32, 32, 3), np.uint8)
    image[14:18, :, :] = 255  # a horizontal bar through the centre
    assert abs(bar_angle(image)) < 0.01
    angles = [bar_angle(o) for o in draws(get_transforms(only(S8, rotate_limit=5.0), True,
                                                         MEAN, STD), image, n=300)]
    assert max(abs(a) for a in angles) <= 5.0 + 0.3  # 0.3 deg: moment estimate on a pixel grid
    assert min(angles) < -4 and max(angles) > 4, "both directions, close to the limit"


def test_rotation_corners_take_the_mean():
    image = np.full((32, 32, 3), 200, np.uint8)
    outs = draws(get_transforms(only(S8, rotate_limit=5.0), True, MEAN, STD), image, n=20)
    corners = np.array([hole_mask(o)[[0, 0, 31, 31], [0, 31, 0, 31]] for o in outs])
    assert corners.any(), "uncovered corners are filled with the mean"
    fill = np.round(255 * np.array(MEAN))
    low = np.minimum(fill, 200)
    assert all((o >= low).all() for o in outs), "only mean and image blend: no black corners"
    assert not any(hole_mask(o)[8:24, 8:24].any() for o in outs), "the centre is never filled"


# ----------------------------------------------------------------------------- statistics


def test_channel_mean_std_matches_numpy():
    images = np.random.default_rng(1).integers(0, 256, (50, 32, 32, 3), dtype=np.uint8)
    mean, std = channel_mean_std(images)
    as_float = images.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(mean, as_float.mean(0), rtol=1e-10)
    np.testing.assert_allclose(std, as_float.std(0), rtol=1e-8)


def test_channel_mean_std_of_constant_images():
    mean, std = channel_mean_std(np.full((3, 32, 32, 3), 51, np.uint8))
    assert mean == pytest.approx((0.2, 0.2, 0.2)) and std == pytest.approx((0, 0, 0), abs=1e-7)


# ----------------------------------------------------------------------------- loading


def write_tree(root, classes=("cat", "dog"), per_class=3, seed=0):
    """A tiny ImageFolder tree of PNGs (lossless), returning the written arrays."""
    rng = np.random.default_rng(seed)
    written = {}
    for split in ("train", "test"):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                array = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(array).save(root / split / name / f"{i:04d}.png")
                written[(split, name, i)] = array
    return written


def test_load_image_folder_reads_pixels_labels_and_classes(tmp_path):
    written = write_tree(tmp_path)
    data = load_cifar10(tmp_path)
    assert data.classes == ("cat", "dog")
    assert data.train_images.shape == (6, 32, 32, 3) and data.train_images.dtype == np.uint8
    assert data.train_labels.tolist() == [0, 0, 0, 1, 1, 1]
    np.testing.assert_array_equal(data.test_images[4], written[("test", "dog", 1)])


def test_missing_folder_without_download_names_the_fix(tmp_path):
    with pytest.raises(DataError) as err:
        load_cifar10(tmp_path / "nowhere")
    assert "\n" not in str(err.value) and not (tmp_path / "nowhere").exists()


def test_wrong_layout_says_what_was_expected_and_found(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError) as err:
        load_cifar10(tmp_path)
    assert "'images'" in str(err.value)  # what was found
    (tmp_path / "train" / "cat").mkdir(parents=True)
    with pytest.raises(DataError) as err:  # half an ImageFolder copy
        load_cifar10(tmp_path)
    assert "\n" not in str(err.value)


def test_unreadable_image_is_named(tmp_path):
    write_tree(tmp_path)
    bad = tmp_path / "train" / "dog" / "0001.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError) as err:
        load_cifar10(tmp_path)
    assert str(bad) in str(err.value)


def test_class_folders_must_match(tmp_path):
    write_tree(tmp_path)
    (tmp_path / "test" / "dog").rename(tmp_path / "test" / "bird")
    with pytest.raises(DataError):
        load_cifar10(tmp_path)


def test_load_data_subsets_are_seeded():
    a = dataset.load_data(None, train_subset=50, test_subset=20, seed=3, synthetic=True)
    b = dataset.load_data(None, train_subset=50, test_subset=20, seed=3, synthetic=True)
    assert len(a.train_labels) == 50 and len(a.test_labels) == 20
    np.testing.assert_array_equal(a.train_images, b.train_images)
    full = make_synthetic_cifar(1000, 10, seed=0)
    x, y = dataset.take_subset(full.train_images, full.train_labels, 100, seed=1)
    assert len(y) == 100 and len(set(map(bytes, x))) == 100


# ----------------------------------------------------------------------------- datasets and loaders


def test_augmentations_depend_on_seed_epoch_and_index_only():
    data = make_synthetic_cifar(20, 10, seed=0)
    transform = get_transforms(S10, True, MEAN, STD)
    ds = CifarDataset(data.train_images, data.train_labels, transform, seed=7)
    first = ds[3][0]
    ds[5]  # another item in between must not change item 3
    assert torch.equal(ds[3][0], first)
    ds.set_epoch(1)
    assert not torch.equal(ds[3][0], first)


def test_loader_batches_do_not_depend_on_worker_count():
    data = make_synthetic_cifar(64, 16, seed=0)
    batches = []
    for workers in (0, 2):
        train, _ = build_loaders(data, S10, MEAN, STD, seed=1, batch_size=16, num_workers=workers)
        train.sampler.set_epoch(2)
        train.dataset.set_epoch(2)
        batches.append([(x.clone(), y.clone()) for x, y in train])
    for (x0, y0), (x1, y1) in zip(*batches):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)


def test_train_loader_shuffles_per_epoch_and_test_loader_keeps_order():
    data = make_synthetic_cifar(64, 32, seed=0)
    train, test = build_loaders(data, S10, MEAN, STD, batch_size=16, num_workers=0)
    order0 = list(train.sampler)
    train.sampler.set_epoch(1)
    assert sorted(order0) == list(range(64)) and list(train.sampler) != order0
    labels = torch.cat([y for _, y in test]).numpy()
    np.testing.assert_array_equal(labels, data.test_labels)
    assert test.batch_size == 2 * train.batch_size


@pytest.mark.filterwarnings("ignore:.pin_memory. argument")
def test_persistent_workers_follow_the_epoch():
    # CUDA loaders keep their workers alive between epochs; the epoch must still reach them.
    data = make_synthetic_cifar(32, 8, seed=0)
    train, _ = build_loaders(data, S10, MEAN, STD, device="cuda", batch_size=16, num_workers=1)
    assert train.persistent_workers
    epochs = []
    for epoch in (0, 1, 0):
        train.dataset.set_epoch(epoch)  # the sampler stays at epoch 0: only augmentations change
        epochs.append(torch.cat([x for x, _ in train]))
    assert not torch.equal(epochs[0], epochs[1]) and torch.equal(epochs[0], epochs[2])


def test_default_workers(monkeypatch):
    monkeypatch.setattr(dataset.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert dataset.default_num_workers("cuda") == 15 and dataset.default_num_workers("cpu") == 4
    monkeypatch.setattr(dataset.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert dataset.default_num_workers("cuda") == 2 and dataset.default_num_workers("cpu") == 0


def crop_shift(out: np.ndarray, image: np.ndarray) -> tuple[int, int]:
    """The (dy, dx) shift of a padded crop, allowing for a horizontal flip; (99, 99) if none."""
    padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
    for dy in range(9):
        for dx in range(9):
            window = padded[dy:dy + 32, dx:dx + 32]
            if np.array_equal(out, window) or np.array_equal(out, window[:, ::-1]):
                return dy - 4, dx - 4
    return 99, 99


def test_s10_crop_and_flip_are_independent(random_image):
    transform = get_transforms(only(S10, crop_padding=4, hflip_p=0.5), True, MEAN, STD)
    ds = CifarDataset(random_image[None].repeat(400, 0), np.zeros(400, np.int64), transform)
    pairs = set()
    for i in range(400):
        out = to_pixels(ds[i][0])
        dy, _ = crop_shift(out, random_image)
        flipped = not any(np.array_equal(out, np.pad(random_image, ((4, 4), (4, 4), (0, 0)))
                                         [y:y + 32, x:x + 32]) for y in range(9) for x in range(9))
        pairs.add((dy, flipped))
    assert len(pairs) == 18, "every (vertical shift, flip) combination occurs"


def test_s8_rotation_does_not_follow_the_crop():
    image = np.zeros((32, 32, 3), np.uint8)
    image[14:18, :, :] = 255
    transform = get_transforms(only(S8, crop_padding=4, rotate_limit=5.0), True, MEAN, STD)
    ds = CifarDataset(image[None].repeat(300, 0), np.zeros(300, np.int64), transform)
    angles, heights = [], []
    for i in range(300):
        out = to_pixels(ds[i][0])
        angles.append(bar_angle(out))
        heights.append(np.average(np.arange(32), weights=out.astype(float).mean((1, 2)) + 1e-9))
    assert abs(np.corrcoef(angles, heights)[0, 1]) < 0.2


def test_augmentation_and_shuffle_streams_never_repeat_across_seeds_epochs_and_images():
    firsts = {}
    for seed in range(3):
        for epoch in range(12):
            for index in range(60):
                key = tuple(dataset.augment_stream(seed, epoch, index).generate_state(4))
                assert key not in firsts, f"{(seed, epoch, index)} repeats {firsts[key]}"
                firsts[key] = (seed, epoch, index)
    # The old arithmetic seed * 1_000_003 + epoch * 100_003 + index made these two the same stream.
    a = dataset.augment_stream(0, 10, 5).generate_state(4)
    b = dataset.augment_stream(1, 0, 5 + 27).generate_state(4)
    assert not np.array_equal(a, b)
    shuffles = {dataset.shuffle_seed(seed, epoch) for seed in range(20) for epoch in range(50)}
    assert len(shuffles) == 1000 and all(0 <= s < 2**63 for s in shuffles)


def test_hidden_entries_and_files_of_other_types_are_left_alone(tmp_path):
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            Image.fromarray(np.full((32, 32, 3), 9, np.uint8)).save(folder / "0.png")
        (tmp_path / split / ".ipynb_checkpoints").mkdir()  # Jupyter makes these
    (tmp_path / "train" / "cat" / "._0.png").write_bytes(b"AppleDouble, not an image")
    (tmp_path / "train" / "__MACOSX").mkdir()
    (tmp_path / "train" / "cat" / "1.webp").write_bytes(b"RIFF")
    (tmp_path / "test" / "dog" / "notes.txt").write_text("x")
    data = load_cifar10(tmp_path)
    assert data.classes == ("cat", "dog") and len(data.train_labels) == 2 and len(data.test_labels) == 2


def test_unlistable_folder_is_a_data_error(tmp_path, monkeypatch):
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    original = type(tmp_path).iterdir

    def refuse(self):
        if self.name == "train":
            raise PermissionError(13, "Permission denied")
        return original(self)

    monkeypatch.setattr(type(tmp_path), "iterdir", refuse)
    with pytest.raises(DataError) as err:
        load_cifar10(tmp_path)
    assert str(tmp_path / "train") in str(err.value)


def dot_centroid(out: np.ndarray) -> np.ndarray:
    """(y, x) centroid of the bright pixels of an image."""
    weight = out.astype(float).mean(-1)
    weight = np.where(weight > 128, weight, 0)
    yy, xx = np.mgrid[:32, :32]
    return np.array([(weight * yy).sum(), (weight * xx).sum()]) / weight.sum()


def test_s9_shift_scale_rotate_stays_within_the_recipe_ranges():
    aug = S9.augment
    ssr = only(S9, shift_limit=aug.shift_limit, scale_limit=aug.scale_limit, rotate_limit=aug.rotate_limit)
    # shift: the centroid of a centred square moves at most shift_limit * 32 = 2 px on each axis
    square = np.zeros((32, 32, 3), np.uint8)
    square[12:20, 12:20] = 255
    moves = np.array([dot_centroid(o) - dot_centroid(square)
                      for o in draws(get_transforms(ssr, True, MEAN, STD), square, n=300)])
    assert np.abs(moves).max() <= 32 * aug.shift_limit + 0.25
    assert moves.min() < -1.5 and moves.max() > 1.5, "both directions, close to the limit"
    # scale: the bright area of the square (shift and rotation keep it) grows or shrinks by the zoom^2
    only_scale = only(S9, scale_limit=aug.scale_limit)
    # a 20x20 square: its light (green, 255) summed away from the mean-filled borders is its area
    big = np.zeros((32, 32, 3), np.uint8)
    big[6:26, 6:26] = 255
    areas = np.array([o[2:30, 2:30, 1].sum() / 255
                      for o in draws(get_transforms(only_scale, True, MEAN, STD), big, n=300)]) / 400
    low, high = (1 - aug.scale_limit) ** 2, (1 + aug.scale_limit) ** 2
    assert areas.min() >= low - 0.01 and areas.max() <= high + 0.01
    assert areas.min() < 0.85 and areas.max() > 1.15, "the zoom range is used"
    # one zoom for both axes, as ShiftScaleRotate: the square's width and height stay equal
    for out in draws(get_transforms(only_scale, True, MEAN, STD), big, n=50):
        light = out[2:30, 2:30, 1] / 255
        width, height = light.sum(0).max(), light.sum(1).max()
        assert abs(width - height) < 0.2
    # rotation: the angle of a bar stays within rotate_limit
    bar = np.zeros((32, 32, 3), np.uint8)
    bar[14:18, :, :] = 255
    only_rotate = only(S9, scale_limit=1e-9, rotate_limit=aug.rotate_limit)  # Affine, no zoom
    angles = [bar_angle(o) for o in draws(get_transforms(only_rotate, True, MEAN, STD), bar, n=300)]
    assert max(abs(a) for a in angles) <= aug.rotate_limit + 0.3
    assert min(angles) < -8 and max(angles) > 8


def test_s9_pipeline_flips_half_the_time_and_cuts_one_16x16_mean_hole_half_the_time(random_image):
    assert (S9.augment.hflip_p, S9.augment.cutout_size, S9.augment.cutout_p) == (0.5, 16, 0.5)
    # (without the affine warp, whose mean-filled borders could touch the hole and blur the count)
    outs = draws(get_transforms(only(S9, cutout_size=16, cutout_p=0.5), True, MEAN, STD), random_image, n=300)
    holes = [full_squares(hole_mask(o), 16) for o in outs]
    assert set(holes) == {0, 1} and all(full_squares(hole_mask(o), 17) == 0 for o in outs)
    assert all((o == random_image).all() for o, h in zip(outs, holes) if not h), "no hole: untouched"
    assert 0.4 < np.mean(holes) < 0.6
    flips = draws(get_transforms(only(S9, hflip_p=0.5), True, MEAN, STD), random_image, n=300)
    flipped = [np.array_equal(o, random_image[:, ::-1]) for o in flips]
    assert all(f or np.array_equal(o, random_image) for f, o in zip(flipped, flips))
    assert 0.4 < np.mean(flipped) < 0.6


def test_s9_warps_half_the_images_and_leaves_the_others_untouched(random_image):
    aug = S9.augment
    assert aug.affine_p == 0.5
    ssr = only(S9, shift_limit=aug.shift_limit, scale_limit=aug.scale_limit,
               rotate_limit=aug.rotate_limit, affine_p=aug.affine_p)
    outs = draws(get_transforms(ssr, True, MEAN, STD), random_image, n=300)
    untouched = [np.array_equal(o, random_image) for o in outs]
    # a warped image is interpolated: it keeps well under half of its pixels exactly
    assert all(u or (o == random_image).mean() < 0.5 for u, o in zip(untouched, outs))
    assert 0.4 < np.mean(untouched) < 0.6

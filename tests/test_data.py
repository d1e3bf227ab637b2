"""minidistill.data: the shapes set, CIFAR from npz / torchvision, splits, the device loader."""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch
import torchvision

from minidistill import data as data_mod
from minidistill.data import DATASETS, Dataset, DeviceLoader, load_dataset, make_shapes, train_val_split

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@pytest.fixture
def no_download(monkeypatch):
    """torchvision's CIFAR classes fail as they would offline; record that they were called."""
    calls = []

    class Offline:
        def __init__(self, root, *args, **kwargs):
            calls.append(root)
            raise RuntimeError("Error downloading cifar-10-python.tar.gz: network is unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)
    monkeypatch.setattr(torchvision.datasets, "CIFAR100", Offline)
    return calls


def _fake_npz_arrays(n_train=20, n_test=10, size=8, num_classes=10, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, (n_train, size, size, 3), dtype=np.uint8),
        "y_train": (np.arange(n_train) % num_classes).astype(np.int64),
        "x_test": rng.integers(0, 256, (n_test, size, size, 3), dtype=np.uint8),
        "y_test": (np.arange(n_test) % num_classes).astype(np.int64),
    }


def _id_dataset(n=40, n_test=6, size=4) -> Dataset:
    """Images whose first pixel and label both encode the sample index: easy to trace."""
    x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)
    xt = torch.zeros(n_test, 3, size, size, dtype=torch.uint8)
    return Dataset("ids", x, torch.arange(n), xt, torch.arange(n_test), tuple(map(str, range(max(n, n_test)))),
                   (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def test_all_names_exist():
    for name in data_mod.__all__:
        assert hasattr(data_mod, name), name
    assert DATASETS == ("cifar10", "cifar100", "shapes")


# --- Dataset --------------------------------------------------------------------------------

def test_dataset_rejects_float_images():
    with pytest.raises(ValueError, match="x_train must be uint8"):
        Dataset("bad", torch.zeros(4, 3, 8, 8), torch.zeros(4, dtype=torch.int64),
                torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64),
                ("a", "b"), (0.5,) * 3, (0.2,) * 3)


def test_dataset_rejects_channels_last_images():
    with pytest.raises(ValueError, match=r"x_test must be uint8 \[N, 3, H, W\]"):
        Dataset("bad", torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.int64),
                torch.zeros(2, 8, 8, 3, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64),
                ("a", "b"), (0.5,) * 3, (0.2,) * 3)


@pytest.mark.parametrize("y", [torch.zeros(3, dtype=torch.int64), torch.zeros(4, dtype=torch.int32),
                               torch.zeros(4, 1, dtype=torch.int64)])
def test_dataset_rejects_bad_labels(y):
    with pytest.raises(ValueError, match=r"y_train must be int64 \[4\]"):
        Dataset("bad", torch.zeros(4, 3, 8, 8, dtype=torch.uint8), y,
                torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64),
                ("a", "b"), (0.5,) * 3, (0.2,) * 3)


def test_dataset_split_and_repr():
    d = _id_dataset()
    x, y = d.split("train")
    assert x is d.x_train and y is d.y_train
    assert d.num_classes == 40
    assert repr(d) == "Dataset('ids', train=40, val=0, test=6, image=(3, 4, 4), classes=40)"
    with pytest.raises(ValueError, match="split must be"):
        d.split("validation")
    with pytest.raises(ValueError, match="train_val_split"):
        d.split("val")


# --- shapes ---------------------------------------------------------------------------------

def test_load_shapes_has_the_documented_layout():
    d = load_dataset("shapes")
    assert d.name == "shapes"
    assert d.x_train.dtype == torch.uint8 and d.x_test.dtype == torch.uint8
    assert d.y_train.dtype == torch.int64 and d.y_test.dtype == torch.int64
    n, c, h, w = d.x_train.shape
    assert (n, c) == (5000, 3) and h == w == 16
    assert d.x_test.shape == (1000, 3, 16, 16)
    assert d.num_classes == 10 and len(set(d.classes)) == 10
    assert set(d.y_train.tolist()) == set(range(10))
    assert d.y_train.bincount().min() >= 400  # balanced: 500 per class before the shuffle
    assert len(d.mean) == len(d.std) == 3
    xf = d.x_train.float() / 255
    assert torch.allclose(torch.tensor(d.mean), xf.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(torch.tensor(d.std), xf.std((0, 2, 3)), atol=1e-5)
    assert len(d.x_val) == 0


def test_load_shapes_is_deterministic():
    a, b = load_dataset("shapes"), load_dataset("shapes")
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.y_test, b.y_test)


def test_make_shapes_sizes_and_seed():
    a = make_shapes(n_train=60, n_test=20, size=12, seed=1)
    assert a.x_train.shape == (60, 3, 12, 12) and a.x_test.shape == (20, 3, 12, 12)
    assert a.y_train.shape == (60,) and a.y_test.shape == (20,)
    again = make_shapes(n_train=60, n_test=20, size=12, seed=1)
    other = make_shapes(n_train=60, n_test=20, size=12, seed=2)
    assert torch.equal(a.x_train, again.x_train) and torch.equal(a.y_test, again.y_test)
    assert not torch.equal(a.x_train, other.x_train)


def test_make_shapes_labels_describe_the_images():
    """A nearest-class-mean classifier on standardised grey images is far above chance (10 %),
    so each label really is drawn as its own shape; with shuffled labels it is not."""
    d = make_shapes(n_train=2000, n_test=500)

    def grey(x):
        g = x.float().mean(1).flatten(1)
        return (g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-6)

    def nearest_mean_acc(labels):
        centres = torch.stack([grey(d.x_train)[labels == k].mean(0) for k in range(10)])
        return (torch.cdist(grey(d.x_test), centres).argmin(1) == d.y_test).float().mean().item()

    assert nearest_mean_acc(d.y_train) > 0.35
    shuffled = d.y_train[torch.randperm(2000, generator=torch.Generator().manual_seed(0))]
    assert nearest_mean_acc(shuffled) < 0.2


def test_unknown_dataset_name_raises():
    with pytest.raises(ValueError, match=r"unknown dataset 'mnist'.*cifar10.*shapes"):
        load_dataset("mnist")


# --- CIFAR: npz first, torchvision otherwise -------------------------------------------------

def test_npz_in_root_is_used_instead_of_torchvision(tmp_path, no_download):
    arrays = _fake_npz_arrays()
    np.savez(tmp_path / "cifar10.npz", **arrays)
    d = load_dataset("cifar10", root=tmp_path)
    assert no_download == []  # torchvision was never asked
    assert d.name == "cifar10"
    assert d.x_train.shape == (20, 3, 8, 8) and d.x_test.shape == (10, 3, 8, 8)
    assert d.x_train.dtype == torch.uint8 and d.y_train.dtype == torch.int64
    # NHWC -> NCHW, pixel for pixel
    assert torch.equal(d.x_train, torch.from_numpy(arrays["x_train"]).permute(0, 3, 1, 2))
    assert torch.equal(d.y_test, torch.from_numpy(arrays["y_test"]))
    assert d.num_classes == 10
    assert d.mean == pytest.approx(CIFAR10_MEAN) and d.std == pytest.approx(CIFAR10_STD)


def test_npz_found_through_environment_root(data_dir, no_download):
    data_dir.mkdir(parents=True)
    np.savez(data_dir / "cifar100.npz", **_fake_npz_arrays(num_classes=100))
    d = load_dataset("cifar100")
    assert no_download == []
    assert d.num_classes == 100  # by name, although only 20 labels occur


def test_npz_class_names_are_used(tmp_path, no_download):
    names = np.array([f"class{i}" for i in range(10)])
    np.savez(tmp_path / "cifar10.npz", classes=names, **_fake_npz_arrays())
    assert load_dataset("cifar10", root=tmp_path).classes == tuple(names)


@pytest.mark.parametrize("missing", ["x_train", "y_test"])
def test_npz_missing_key_raises(tmp_path, no_download, missing):
    arrays = _fake_npz_arrays()
    del arrays[missing]
    np.savez(tmp_path / "cifar10.npz", **arrays)
    with pytest.raises(ValueError, match=rf"cifar10\.npz lacks the key\(s\) \['{missing}'\]"):
        load_dataset("cifar10", root=tmp_path)


@pytest.mark.parametrize("change", ["float_images", "nchw_images", "grey_images"])
def test_npz_wrong_image_layout_raises(tmp_path, no_download, change):
    arrays = _fake_npz_arrays()
    x = arrays["x_train"]
    arrays["x_train"] = {"float_images": x.astype(np.float32) / 255,
                         "nchw_images": x.transpose(0, 3, 1, 2).copy(),
                         "grey_images": x[..., 0]}[change]
    np.savez(tmp_path / "cifar10.npz", **arrays)
    with pytest.raises(ValueError, match="x_train must be uint8 NHWC with 3 channels"):
        load_dataset("cifar10", root=tmp_path)


def test_npz_labels_as_column_raise(tmp_path, no_download):
    """Keras stores CIFAR labels as [N, 1]; that must be an error, not a silent broadcast."""
    arrays = _fake_npz_arrays()
    arrays["y_train"] = arrays["y_train"][:, None]
    np.savez(tmp_path / "cifar10.npz", **arrays)
    with pytest.raises(ValueError, match=r"y_train must be 1-D integer class labels"):
        load_dataset("cifar10", root=tmp_path)


def test_npz_float_labels_raise(tmp_path, no_download):
    arrays = _fake_npz_arrays()
    arrays["y_train"] = arrays["y_train"].astype(np.float32) + 0.7
    np.savez(tmp_path / "cifar10.npz", **arrays)
    with pytest.raises(ValueError, match="y_train"):
        load_dataset("cifar10", root=tmp_path)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_missing_dataset_offline_names_the_npz_to_provide(tmp_path, no_download, name):
    with pytest.raises(RuntimeError) as info:
        load_dataset(name, root=tmp_path)
    msg = str(info.value)
    assert str(tmp_path / f"{name}.npz") in msg
    assert "x_train" in msg and "y_test" in msg and "MINIDISTILL_DATA" in msg
    assert "network is unreachable" in msg  # the underlying cause is shown too
    assert no_download == [tmp_path]


def test_missing_dataset_offline_uses_environment_root(data_dir, no_download):
    with pytest.raises(RuntimeError, match=str(data_dir / "cifar10.npz")):
        load_dataset("cifar10")


# --- train_val_split ------------------------------------------------------------------------

def test_train_val_split_is_disjoint_and_complete():
    d = _id_dataset(n=40)
    s = train_val_split(d, val_size=0.25, seed=3)
    assert len(s.x_val) == 10 and len(s.x_train) == 30
    tr, va = set(s.y_train.tolist()), set(s.y_val.tolist())
    assert tr.isdisjoint(va) and tr | va == set(range(40))
    # images travel with their labels
    assert torch.equal(s.x_train, d.x_train[s.y_train]) and torch.equal(s.x_val, d.x_train[s.y_val])
    # the test set is untouched, the original data set unchanged
    assert torch.equal(s.x_test, d.x_test) and torch.equal(s.y_test, d.y_test)
    assert len(d.x_train) == 40 and len(d.x_val) == 0
    assert s.split("val")[0] is s.x_val


def test_train_val_split_count_and_determinism():
    d = _id_dataset(n=40)
    a = train_val_split(d, val_size=7, seed=0)
    b = train_val_split(d, val_size=7, seed=0)
    c = train_val_split(d, val_size=7, seed=1)
    assert len(a.y_val) == 7
    assert torch.equal(a.y_val, b.y_val) and torch.equal(a.y_train, b.y_train)
    assert not torch.equal(a.y_val, c.y_val)


@pytest.mark.parametrize("bad", [0, 40, 0.0, 1.0, 0.001, -3])
def test_train_val_split_rejects_empty_splits(bad):
    with pytest.raises(ValueError, match="val_size"):
        train_val_split(_id_dataset(n=40), val_size=bad)


# --- DeviceLoader ---------------------------------------------------------------------------

def _ids_loader(n=40, batch_size=8, train=False, **kw):
    d = _id_dataset(n=n)
    return d, DeviceLoader(d.x_train, d.y_train, batch_size, mean=d.mean, std=d.std, train=train,
                           device="cpu", **kw)


def test_loader_batch_shapes_and_dtypes():
    d, loader = _ids_loader(n=40, batch_size=16)
    batches = list(loader)
    assert len(loader) == len(batches) == 3  # 16 + 16 + 8 in evaluation mode
    assert [len(y) for _, y in batches] == [16, 16, 8]
    x, y = batches[0]
    assert x.shape == (16, 3, 4, 4) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.is_contiguous(memory_format=torch.channels_last)
    plain = DeviceLoader(d.x_train, d.y_train, 16, mean=d.mean, std=d.std, device="cpu", channels_last=False)
    assert next(iter(plain))[0].is_contiguous()


def test_eval_loader_keeps_order_and_normalises_exactly():
    d, loader = _ids_loader(n=40, batch_size=16)
    xs, ys = zip(*loader)
    assert torch.equal(torch.cat(ys), d.y_train)
    mean = torch.tensor(d.mean).view(1, 3, 1, 1)
    std = torch.tensor(d.std).view(1, 3, 1, 1)
    expected = (d.x_train.float() / 255 - mean) / std
    assert torch.allclose(torch.cat(xs), expected, atol=1e-5)


def test_normalised_data_has_zero_mean_unit_std(tiny):
    loader = DeviceLoader.from_dataset(tiny, "train", 100, train=False, device="cpu")
    x = torch.cat([xb for xb, _ in loader])
    assert x.shape == tiny.x_train.shape
    assert torch.allclose(x.mean((0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(x.std((0, 2, 3)), torch.ones(3), atol=1e-4)


def test_train_loader_sees_every_sample_once_per_epoch():
    _, loader = _ids_loader(n=40, batch_size=8, train=True)
    for epoch in range(3):
        loader.set_epoch(epoch)
        ys = torch.cat([y for _, y in loader])
        assert sorted(ys.tolist()) == list(range(40))


def test_train_loader_drops_the_last_partial_batch():
    _, loader = _ids_loader(n=42, batch_size=8, train=True)
    batches = list(loader)
    assert len(loader) == len(batches) == 5 and all(len(y) == 8 for _, y in batches)
    ys = torch.cat([y for _, y in batches]).tolist()
    assert len(set(ys)) == 40 and set(ys) <= set(range(42))  # each at most once


def test_train_loader_smaller_than_a_batch_gives_one_batch():
    _, loader = _ids_loader(n=5, batch_size=8, train=True)
    (x, y), = list(loader)
    assert len(loader) == 1 and sorted(y.tolist()) == list(range(5))


def test_same_epoch_same_batches_other_epoch_other_order():
    _, loader = _ids_loader(n=40, batch_size=8, train=True)

    def epoch(e):
        loader.set_epoch(e)
        xs, ys = zip(*loader)
        return torch.cat(xs), torch.cat(ys)

    x0, y0 = epoch(0)
    x0b, y0b = epoch(0)
    x1, y1 = epoch(1)
    assert torch.equal(x0, x0b) and torch.equal(y0, y0b)  # augmentation repeats too
    assert not torch.equal(y0, y1)
    _, other_seed = _ids_loader(n=40, batch_size=8, train=True, seed=1)
    assert not torch.equal(torch.cat([y for _, y in other_seed]), y0)


def test_augmented_crops_are_shifted_or_flipped_copies():
    """Every augmented image equals the zero-padded original cropped at some offset,
    possibly mirrored; and the augmentation really does shift and flip."""
    n, size, pad = 64, 6, 2
    x = torch.randint(1, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    y = torch.arange(n)
    loader = DeviceLoader(x, y, 32, mean=(0, 0, 0), std=(1, 1, 1), train=True, pad=pad, device="cpu", seed=5)
    loader.set_epoch(2)
    padded = torch.nn.functional.pad(x, (pad,) * 4)
    seen = set()
    count = 0
    for xb, yb in loader:
        imgs = (xb * 255).round().to(torch.uint8)  # mean 0, std 1: exact inverse
        for img, i in zip(imgs, yb.tolist()):
            matches = [(dy, dx, flip)
                       for dy, dx, flip in itertools.product(range(2 * pad + 1), range(2 * pad + 1), (False, True))
                       if torch.equal(img, (lambda c: c.flip(-1) if flip else c)(
                           padded[i, :, dy:dy + size, dx:dx + size]))]
            assert matches, f"sample {i} is not a (flipped) crop of its padded original"
            seen.update(matches)
            count += 1
    assert count == n
    assert any(flip for _, _, flip in seen) and any(not flip for _, _, flip in seen)
    assert any((dy, dx) != (pad, pad) for dy, dx, _ in seen)


def test_eval_loader_does_not_augment():
    d, loader = _ids_loader(n=40, batch_size=40, train=False, pad=4)
    _, plain = _ids_loader(n=40, batch_size=40, train=False, pad=0)
    assert torch.equal(next(iter(loader))[0], next(iter(plain))[0])


def test_from_dataset_picks_train_mode_by_split(tiny):
    assert DeviceLoader.from_dataset(tiny, "train", 64, device="cpu").train is True
    assert DeviceLoader.from_dataset(tiny, "test", 64, device="cpu").train is False
    assert DeviceLoader.from_dataset(tiny, "train", 64, device="cpu", train=False).train is False
    with pytest.raises(ValueError, match="train_val_split"):
        DeviceLoader.from_dataset(tiny, "val", 64, device="cpu")


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch_size=0), "batch_size must be >= 1"),
    (dict(y=torch.arange(3)), "differ in length"),
    (dict(x=torch.zeros(4, 3, 4, 4)), "must be uint8"),
])
def test_loader_rejects_bad_input(kwargs, match):
    args = dict(x=torch.zeros(4, 3, 4, 4, dtype=torch.uint8), y=torch.arange(4), batch_size=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        DeviceLoader(args["x"], args["y"], args["batch_size"], mean=(0.5,) * 3, std=(0.2,) * 3, device="cpu")


def test_crop_offsets_reach_every_position_including_the_last():
    """With padding p an image may be cropped at any of the 2p + 1 offsets per axis, the last
    one (2p: the image shifted fully the other way) included."""
    pad, n = 1, 400
    x = torch.zeros(n, 3, 4, 4, dtype=torch.uint8)
    x[:, :, 0, 0] = 255                                     # a marker in the top-left pixel
    loader = DeviceLoader(x, torch.arange(n), n, mean=(0, 0, 0), std=(1, 1, 1), train=True, pad=pad,
                          device="cpu", seed=0)
    xb, _ = next(iter(loader))
    rows = set()
    for img in (xb[:, 0] > 0.5):
        where = img.nonzero()
        if len(where):                                     # the marker survives unless cropped away
            rows.add(int(where[0, 0]))
        else:
            rows.add(-1)
    # marker row: offset 0 -> row 1, offset 1 -> row 0, offset 2 (the last) -> cropped away (-1)
    assert rows == {1, 0, -1}


def test_normalize_matches_the_batches():
    d, loader = _ids_loader(n=8, batch_size=8, train=False)
    xb, _ = next(iter(loader))
    assert torch.equal(loader.normalize(loader.x[:8]), xb)


@pytest.mark.parametrize("kwargs, match", [(dict(n_train=-5), "n_train"), (dict(n_train=0), "n_train"),
                                           (dict(size=0), "size"), (dict(n_test=-1), "n_test"),
                                           (dict(n_train=1.5), "n_train"), (dict(seed=-1), "seed")])
def test_make_shapes_rejects_bad_sizes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_shapes(**kwargs)


def test_dataset_rejects_labels_outside_its_classes():
    x = torch.zeros(4, 3, 4, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"y_train must hold class indices in \[0, 2\).*0 to 8"):
        Dataset("two", x, torch.tensor([0, 1, 8, 1]), x, torch.tensor([0, 1, 0, 1]), ("a", "b"), (0.5,) * 3, (0.2,) * 3)
    with pytest.raises(ValueError, match="at least 2 classes"):
        Dataset("one", x, torch.zeros(4, dtype=torch.int64), x, torch.zeros(4, dtype=torch.int64), ("a",),
                (0.5,) * 3, (0.2,) * 3)


def test_npz_with_labels_beyond_its_classes_or_not_a_zip_is_refused(tmp_path, no_download):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "cifar100.npz", x_train=x, y_train=np.array([150, 151, 152, 159]), x_test=x,
             y_test=np.array([0, 1, 2, 3]))
    with pytest.raises(ValueError, match=r"y_train must hold class indices in \[0, 100\)"):
        load_dataset("cifar100", tmp_path)
    (tmp_path / "cifar10.npz").write_bytes(b"not a zip at all")
    with pytest.raises(ValueError, match="not an .npz archive"):
        load_dataset("cifar10", tmp_path)


def test_digest_follows_the_training_images_and_labels():
    a, b = make_shapes(n_train=64, n_test=8), make_shapes(n_train=64, n_test=8)
    assert a.digest() == b.digest() and len(a.digest()) == 12
    other = train_val_split(make_shapes(n_train=80, n_test=8), 16, seed=1)
    assert len(other.x_train) == 64 and other.digest() != a.digest()
    relabelled = dataclasses.replace(a, y_train=a.y_train.roll(1))
    assert relabelled.digest() != a.digest()


def test_npz_sorted_by_class_is_shuffled_once_the_same_way(tmp_path, no_download):
    """A file sorted by class (as some converters write CIFAR) would make every "first n images"
    slice hold a few classes: it is shuffled with a fixed seed, images and labels together."""
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(10), 6)                                    # 0 0 0 ... 9 9 9
    x = (y[:, None, None, None] * 20 + rng.integers(0, 5, (60, 4, 4, 3))).astype(np.uint8)  # image encodes label
    np.savez(tmp_path / "cifar10.npz", x_train=x, y_train=y, x_test=x[:30], y_test=np.arange(30) % 10)
    d = load_dataset("cifar10", root=tmp_path)
    assert len(set(d.y_train[:12].tolist())) > 4                       # the first 12 now span many classes
    assert torch.equal(d.x_train[:, 0, 0, 0] // 20, d.y_train)         # each image still has its label
    assert sorted(d.y_train.tolist()) == sorted(y.tolist())
    assert torch.equal(d.y_test, torch.arange(30) % 10)                # not sorted: left as it is
    again = load_dataset("cifar10", root=tmp_path)
    assert torch.equal(again.y_train, d.y_train) and again.digest() == d.digest()

"""kdprune.data and the prepare stage: torchvision on-disk formats, sklearn digits, offline failures, and
uint8 splits served as index views, normalised and augmented per batch."""

from __future__ import annotations

import hashlib
import math
import pickle
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kdprune import data
from kdprune.errors import DataError
from tests.conftest import REPO, stage_env, tree_bytes, write_params

IDX_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
FOLDERS = {"mnist": "MNIST/raw", "fashion_mnist": "FashionMNIST/raw", "cifar10": "cifar-10-batches-py"}
CLASSES = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "cifar10": "CIFAR10"}  # torchvision's


# ---------------------------------------------------------------- helpers


def load_pt(path: Path) -> tuple[np.ndarray, np.ndarray]:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    assert set(blob) == {"x", "y"}
    return blob["x"].numpy(), blob["y"].numpy()


def rows(x: np.ndarray, y: np.ndarray) -> list[bytes]:
    """Each sample as bytes (image then label), sorted: a multiset to compare splits with their source."""
    return sorted(xi.tobytes() + int(yi).to_bytes(2, "little") for xi, yi in zip(x, y))


def write_idx(path: Path, array: np.ndarray) -> None:
    """An uncompressed IDX (SN3 "Pascal Vincent") file of uint8: magic 0x08<ndim>, then big-endian dims."""
    assert array.dtype == np.uint8 and 1 <= array.ndim <= 3
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + np.ascontiguousarray(array).tobytes())


def tagged_images(labels: np.ndarray, shape: tuple[int, ...], base: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 images whose content depends on the class, each made unique by its index in pixel 0."""
    n = len(labels)
    x = (labels.astype(np.int64).reshape(-1, *[1] * len(shape)) * 15 + base + rng.integers(0, 40, (n, *shape)))
    assert x.max() <= 255
    x = x.astype(np.uint8)
    x.reshape(n, -1)[:, 0] = np.arange(n)
    return x


def write_mnist_like(raw: Path, folder: str, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """60 train (6 per class) and 20 test (2 per class) 28x28 images; the test ones much brighter."""
    rng = np.random.default_rng(seed)
    y_train = rng.permutation(np.repeat(np.arange(10), 6)).astype(np.uint8)
    y_test = rng.permutation(np.repeat(np.arange(10), 2)).astype(np.uint8)
    x_train = tagged_images(y_train, (28, 28), 0, rng)
    x_test = tagged_images(y_test, (28, 28), 0, rng)
    x_test.reshape(20, -1)[:, 1:] = (200 + 5 * y_test.astype(np.int64))[:, None]  # bright: kept out of train stats
    x_test.reshape(20, -1)[:, 0] = np.arange(20)
    d = raw / folder
    d.mkdir(parents=True)
    write_idx(d / "train-images-idx3-ubyte", x_train)
    write_idx(d / "train-labels-idx1-ubyte", y_train)
    write_idx(d / "t10k-images-idx3-ubyte", x_test)
    write_idx(d / "t10k-labels-idx1-ubyte", y_test)
    return {"train": (x_train, y_train.astype(np.int64)), "test": (x_test, y_test.astype(np.int64))}


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_cifar(raw: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """5 train batches of 10 (one per class) and a test batch of 10, in the python pickle format,
    with CIFAR10's md5 table patched to accept them. Returns the images as (N, 3, 32, 32)."""
    import torchvision.datasets as tvd

    rng = np.random.default_rng(1)
    d = raw / "cifar-10-batches-py"
    d.mkdir(parents=True)
    written: dict[str, list[np.ndarray]] = {"train_x": [], "train_y": [], "test_x": [], "test_y": []}
    md5s: dict[str, str] = {}
    for name in CIFAR_FILES[:-1]:
        labels = rng.permutation(10)
        x = np.empty((10, 3, 32, 32), dtype=np.uint8)
        brighter = 50 if name == "test_batch" else 0  # test brightness must not leak into the train statistics
        for c, base in enumerate((150, 80, 10)):  # R bright, G mid, B dark: per-channel stats differ
            x[:, c] = brighter + base + labels[:, None, None] * 3 + rng.integers(0, 25, (10, 32, 32))
        x[:, 0, 0, 0] = np.arange(10) + 10 * len(written["train_x"])  # unique per image
        entry = {"batch_label": name, "data": x.reshape(10, 3072), "labels": labels.tolist(),
                 "filenames": [f"{name}_{i}.png" for i in range(10)]}
        (d / name).write_bytes(pickle.dumps(entry, protocol=2))
        md5s[name] = md5(d / name)
        kind = "test" if name == "test_batch" else "train"
        written[f"{kind}_x"].append(x)
        written[f"{kind}_y"].append(labels.astype(np.int64))
    meta = {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
            "num_cases_per_batch": 10, "num_vis": 3072}
    (d / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    monkeypatch.setattr(tvd.CIFAR10, "train_list", [[f"data_batch_{i}", md5s[f"data_batch_{i}"]] for i in range(1, 6)])
    monkeypatch.setattr(tvd.CIFAR10, "test_list", [["test_batch", md5s["test_batch"]]])
    monkeypatch.setattr(tvd.CIFAR10, "meta", {"filename": "batches.meta", "key": "label_names",
                                              "md5": md5(d / "batches.meta")})
    return {"train": (np.concatenate(written["train_x"]), np.concatenate(written["train_y"])),
            "test": (np.concatenate(written["test_x"]), np.concatenate(written["test_y"]))}


def assert_stratified(y_split: np.ndarray, y_all: np.ndarray, n_classes: int = 10) -> None:
    """Each class's count in the split is within 1 of its overall proportion times the split's size."""
    overall = np.bincount(y_all, minlength=n_classes) / len(y_all)
    have = np.bincount(y_split, minlength=n_classes)
    assert np.all(np.abs(have - overall * len(y_split)) <= 1.0), (have, overall * len(y_split))


def assert_prepared(out: Path, meta: dict[str, Any], channels: int, size: int, scale: float) -> None:
    """The files prepare() writes (no hashes: the stage's manifest.json holds them), meta.json as returned,
    uint8 images and int64 labels, train-only statistics, and batches normalised with them."""
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "test.pt", "train.pt", "val.pt"]
    assert data.load_meta(out) == meta
    assert set(meta) == {"name", "scale", "mean", "std", "in_channels", "image_size", "num_classes", "counts"}
    assert (meta["in_channels"], meta["image_size"], meta["num_classes"], meta["scale"]) == (channels, size, 10, scale)
    for s in data.SPLITS:
        x, y = load_pt(out / f"{s}.pt")
        assert x.dtype == np.uint8 and x.shape == (meta["counts"][s], channels, size, size)
        assert y.dtype == np.int64 and y.shape == (meta["counts"][s],)
    x_train, y_train = load_pt(out / "train.pt")
    train = x_train.astype(np.float64) / scale
    assert len(meta["mean"]) == len(meta["std"]) == channels
    np.testing.assert_allclose(meta["mean"], train.mean(axis=(0, 2, 3)), rtol=1e-9)
    np.testing.assert_allclose(meta["std"], train.std(axis=(0, 2, 3)), rtol=1e-9)
    # train only: the statistics of train + val + test are different
    everything = np.concatenate([load_pt(out / f"{s}.pt")[0] for s in data.SPLITS]).astype(np.float64) / scale
    assert np.all(np.abs(everything.mean(axis=(0, 2, 3)) - meta["mean"]) > 1e-4)

    split = data.load_split(out, "train")
    assert split.x.dtype == torch.uint8 and split.y.dtype == torch.int64
    np.testing.assert_array_equal(split.x.numpy(), x_train)
    np.testing.assert_array_equal(split.y.numpy(), y_train)
    norm = data.normaliser(meta)
    x = torch.cat([xb for xb, _ in data.batches(split, 7, norm)])  # (N, C, H, W) float32, batch by batch
    assert x.dtype == torch.float32 and x.shape == x_train.shape
    per_channel = x.double().transpose(0, 1).reshape(channels, -1)
    assert per_channel.mean(dim=1).abs().max().item() < 1e-4
    assert (per_channel.std(dim=1, unbiased=False) - 1).abs().max().item() < 1e-3
    x_test = torch.cat([xb for xb, _ in data.batches(data.load_split(out, "test"), 7, norm)])
    assert x_test.mean().item() > 1.0  # the brighter test images are normalised with the train stats, not their own


# ---------------------------------------------------------------- torchvision sources


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_mnist_like_through_torchvision_keeps_official_test_split(name: str, tmp_path: Path) -> None:
    raw, out = tmp_path / "raw", tmp_path / "out"
    written = write_mnist_like(raw, FOLDERS[name])
    meta = data.prepare(name, raw, out, 0.2, 0.3, 0, download=False)

    x_test, y_test = load_pt(out / "test.pt")
    assert x_test.dtype == np.uint8 and x_test.shape == (20, 1, 28, 28)
    np.testing.assert_array_equal(x_test[:, 0], written["test"][0])  # kept whole, in order
    np.testing.assert_array_equal(y_test, written["test"][1])

    (x_tr, y_tr), (x_va, y_va) = load_pt(out / "train.pt"), load_pt(out / "val.pt")
    assert x_tr.shape == (48, 1, 28, 28) and x_va.shape == (12, 1, 28, 28)  # test_fraction ignored; 20% of 60 to val
    assert x_tr.dtype == x_va.dtype == np.uint8 and y_tr.dtype == y_va.dtype == np.int64
    x_src, y_src = written["train"]
    # train and val are the 60 written samples, each once, with its own label
    assert rows(np.concatenate([x_tr, x_va])[:, 0], np.concatenate([y_tr, y_va])) == rows(x_src, y_src)
    ids = np.concatenate([x_tr, x_va])[:, 0, 0, 0]
    assert sorted(ids.tolist()) == list(range(60))
    np.testing.assert_array_equal(np.concatenate([y_tr, y_va]), y_src[ids])
    assert_stratified(y_tr, y_src)
    assert_stratified(y_va, y_src)
    assert meta["counts"] == {"train": 48, "val": 12, "test": 20}
    assert meta["name"] == name
    assert_prepared(out, meta, channels=1, size=28, scale=255.0)


def test_cifar10_through_torchvision_channels_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw, out = tmp_path / "raw", tmp_path / "out"
    written = write_cifar(raw, monkeypatch)
    meta = data.prepare("cifar10", raw, out, 0.2, 0.3, 0, download=False)

    x_test, y_test = load_pt(out / "test.pt")
    assert x_test.dtype == np.uint8 and x_test.shape == (10, 3, 32, 32)
    np.testing.assert_array_equal(x_test, written["test"][0])  # channel order as in the file's R, G, B planes
    np.testing.assert_array_equal(y_test, written["test"][1])
    (x_tr, y_tr), (x_va, y_va) = load_pt(out / "train.pt"), load_pt(out / "val.pt")
    assert x_tr.shape == (40, 3, 32, 32) and x_va.shape == (10, 3, 32, 32)
    assert rows(np.concatenate([x_tr, x_va]), np.concatenate([y_tr, y_va])) == rows(*written["train"])
    assert_stratified(y_tr, written["train"][1])
    assert meta["counts"] == {"train": 40, "val": 10, "test": 10}
    assert meta["mean"][0] > meta["mean"][1] > meta["mean"][2]  # R, G, B planes kept apart
    assert_prepared(out, meta, channels=3, size=32, scale=255.0)


# ---------------------------------------------------------------- offline and absent


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_mnist_like_in_torchvisions_older_processed_layout_prepares_offline(name: str, tmp_path: Path) -> None:
    """torchvision still reads <Class>/processed/{training,test}.pt first (weights-only tensors): an offline
    copy in that layout, with no raw files, is a dataset, not an absent one."""
    raw, out = tmp_path / "raw", tmp_path / "out"
    written = write_mnist_like(tmp_path / "idx", FOLDERS[name])
    processed = raw / FOLDERS[name].replace("/raw", "/processed")
    processed.mkdir(parents=True)
    for split, file in (("train", "training.pt"), ("test", "test.pt")):
        torch.save(tuple(torch.from_numpy(a) for a in written[split]), processed / file)
    meta = data.prepare(name, raw, out, 0.2, 0.3, 0, download=False)
    assert meta["counts"] == {"train": 48, "val": 12, "test": 20}
    np.testing.assert_array_equal(load_pt(out / "test.pt")[1], written["test"][1])


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10"])
def test_absent_dataset_offline_names_folder_and_files(name: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Found before torchvision is imported (seconds, and torch's compiler with it): one file missing of
    the set is enough. A set whose files are all there but damaged is another error, from torchvision's
    reason: it had been called absent, the files named as the ones to place there."""
    raw, out = tmp_path / "raw", tmp_path / "out"
    raw.mkdir()
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)  # an import of it fails
    names = CIFAR_FILES if name == "cifar10" else IDX_FILES
    with pytest.raises(DataError) as info:
        data.prepare(name, raw, out, 0.15, 0.2, 0, download=False)
    message = str(info.value)
    assert "\n" not in message
    assert str(raw / FOLDERS[name]) in message
    for f in names:
        assert f in message
    assert "download is false" in message
    assert not out.exists()
    assert list(raw.iterdir()) == []  # nothing fetched or half-written
    (raw / FOLDERS[name]).mkdir(parents=True)
    for f in names[1:]:
        (raw / FOLDERS[name] / f).write_bytes(b"")
    with pytest.raises(DataError, match="download is false"):
        data.prepare(name, raw, out, 0.15, 0.2, 0, download=False)
    monkeypatch.undo()  # every file there, each cut short: torchvision cannot read them, online or not
    (raw / FOLDERS[name] / names[0]).write_bytes(b"")
    import torchvision.datasets as tvd

    monkeypatch.setattr(tvd.CIFAR10, "download", offline)  # it fetches afresh what fails its checksum
    for download in (False, True):
        with pytest.raises(DataError) as info:
            data.prepare(name, raw, out, 0.15, 0.2, 0, download=download)
        assert str(info.value).startswith(f"{CLASSES[name]} in {raw / FOLDERS[name]} cannot be read (")
        assert str(info.value).endswith(f"): a file there is damaged or cut short; replace {', '.join(names)}")
    assert not out.exists()


def offline(self: Any) -> None:
    from urllib.error import URLError

    raise URLError("no network")


def test_failed_download_is_a_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets as tvd

    monkeypatch.setattr(tvd.CIFAR10, "download", offline)
    with pytest.raises(DataError, match=r"download failed: URLError.*cifar-10-batches-py/$"):
        data.prepare("cifar10", tmp_path / "raw", tmp_path / "out", 0.15, 0.2, 0, download=True)


def test_prepare_stage_offline_exits_2_and_leaves_out_alone(tmp_path: Path) -> None:
    raw, out = tmp_path / "raw", tmp_path / "prepared"
    raw.mkdir()
    out.mkdir()
    (out / "keep.pt").write_bytes(b"earlier output\x00\x01")
    before = tree_bytes(out)
    params = write_params(tmp_path / "params.yaml", data={"name": "mnist", "download": False})
    argv = ["--params", str(params), "--raw", str(raw), "--out", str(out)]
    env = stage_env(f"sqlite:///{tmp_path / 'mlflow.db'}")
    env.pop("DVC_STAGE", None)  # under `dvc repro` a recovery hint would follow the error
    env["KDPRUNE_TRACKING"] = "off"  # what is tested is the data's check: no MLflow service to start
    proc = subprocess.run([sys.executable, str(REPO / "stages/prepare.py"), *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    where = raw / "MNIST/raw"
    ours = [line for line in proc.stderr.splitlines() if " INFO mlflow." not in line]  # MLflow creating its store
    assert ours == [  # one line, no traceback
        f"error: MNIST is not under {where} (data.download is false): place {', '.join(IDX_FILES)} in {where}/"]
    assert tree_bytes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".prepared")) == []  # no staged leftovers


# ---------------------------------------------------------------- digits (the default)


@pytest.fixture(scope="module")
def digits_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """digits prepared with seed 0 twice, seed 1 once, and seed 0 with other fractions."""
    root = tmp_path_factory.mktemp("digits")
    runs = {"a": (0.15, 0.2, 0), "b": (0.15, 0.2, 0), "other_seed": (0.15, 0.2, 1), "fractions": (0.3, 0.1, 0)}
    for key, (val, test, seed) in runs.items():
        data.prepare("digits", root / "raw", root / key, val, test, seed, download=False)
    return {key: root / key for key in runs}


def test_digits_split_is_deterministic_from_the_seed(digits_runs: dict[str, Path]) -> None:
    for s in data.SPLITS:
        a, b, c = (digits_runs[k] / f"{s}.pt" for k in ("a", "b", "other_seed"))
        assert a.read_bytes() == b.read_bytes(), f"same seed, different {s}.pt bytes"
        assert a.read_bytes() != c.read_bytes()
        assert rows(*load_pt(a)) != rows(*load_pt(c)), f"seed 1 picked the same {s} samples as seed 0"
    assert data.load_meta(digits_runs["a"]) == data.load_meta(digits_runs["b"])


@pytest.mark.parametrize("key", ["a", "fractions"])
def test_digits_split_is_stratified_disjoint_and_complete(key: str, digits_runs: dict[str, Path]) -> None:
    from sklearn.datasets import load_digits

    d = load_digits()
    x_all, y_all = d.images.astype(np.uint8)[:, None], d.target.astype(np.int64)
    splits = {s: load_pt(digits_runs[key] / f"{s}.pt") for s in data.SPLITS}
    for s, (x, y) in splits.items():
        assert x.dtype == np.uint8 and x.shape[1:] == (1, 8, 8) and len(x) == len(y)
        assert_stratified(y, y_all)
    # every one of the 1797 samples in exactly one split
    joined = [np.concatenate([splits[s][i] for s in data.SPLITS]) for i in (0, 1)]
    assert len(joined[1]) == 1797
    assert rows(*joined) == rows(x_all, y_all)
    meta = data.load_meta(digits_runs[key])
    assert (meta["in_channels"], meta["image_size"], meta["num_classes"], meta["scale"]) == (1, 8, 10, 16.0)


@pytest.mark.parametrize(("key", "val_fraction", "test_fraction"), [("a", 0.15, 0.2), ("fractions", 0.3, 0.1)])
def test_digits_fractions_are_honoured(key: str, val_fraction: float, test_fraction: float,
                                       digits_runs: dict[str, Path]) -> None:
    n_test = math.ceil(1797 * test_fraction)  # sklearn rounds the held-out part up
    n_val = math.ceil((1797 - n_test) * val_fraction)
    counts = data.load_meta(digits_runs[key])["counts"]
    assert counts == {"train": 1797 - n_test - n_val, "val": n_val, "test": n_test}
    for s in data.SPLITS:
        assert len(load_pt(digits_runs[key] / f"{s}.pt")[1]) == counts[s]


# ---------------------------------------------------------------- statistics without a float copy


def test_channel_stats_are_exact_per_channel_and_independent_of_the_chunk() -> None:
    x = np.random.default_rng(0).integers(0, 256, (7, 3, 4, 5), dtype=np.uint8)  # (N, C, H, W)
    x[:, 1] //= 4  # channels with different statistics
    mean, std = data.channel_stats(x, 255.0)
    as_float = x.astype(np.float64) / 255.0
    np.testing.assert_allclose(mean, as_float.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(std, as_float.std(axis=(0, 2, 3)), rtol=1e-12)
    assert mean[1] < mean[0] / 2
    for chunk in (1, 3, 7, 100):  # integer sums: the same numbers, whatever the chunking
        assert data.channel_stats(x, 255.0, chunk=chunk) == (mean, std)


def _traced_peak(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, int]:
    """fn's result and the peak of the memory it allocated (numpy reports its buffers to tracemalloc)."""
    tracemalloc.start()
    try:
        return fn(*args, **kwargs), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_prepare_of_a_large_source_never_holds_a_float_copy_of_the_split(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    d = tmp_path / "raw/MNIST/raw"
    d.mkdir(parents=True)
    y = rng.permutation(np.arange(30_000) % 10).astype(np.uint8)
    write_idx(d / "train-images-idx3-ubyte", rng.integers(0, 256, (30_000, 28, 28), dtype=np.uint8))
    write_idx(d / "train-labels-idx1-ubyte", y)
    write_idx(d / "t10k-images-idx3-ubyte", rng.integers(0, 256, (100, 28, 28), dtype=np.uint8))
    write_idx(d / "t10k-labels-idx1-ubyte", np.arange(100, dtype=np.uint8) % 10)
    measured: list[tuple[int, int]] = []  # (peak bytes allocated by channel_stats, bytes of the uint8 split)
    real = data.channel_stats

    def traced(x: np.ndarray, scale: float, **kwargs: Any) -> tuple[list[float], list[float]]:
        stats, peak = _traced_peak(real, x, scale, **kwargs)
        measured.append((peak, x.nbytes))
        return stats

    monkeypatch.setattr(data, "channel_stats", traced)
    meta = data.prepare("mnist", tmp_path / "raw", tmp_path / "out", 0.1, 0.2, 0, download=False)

    assert meta["counts"] == {"train": 27_000, "val": 3_000, "test": 100}
    [(peak, split_bytes)] = measured
    assert split_bytes == 27_000 * 28 * 28
    _, float_copy = _traced_peak(np.ndarray.astype, np.zeros((27_000, 1, 28, 28), np.uint8), np.float32)
    assert float_copy >= 4 * split_bytes  # the measure sees a float copy where there is one
    assert peak < 4 * split_bytes  # chunks of the split, never a float32 (or wider) copy of it
    x_train = data.load_split(tmp_path / "out", "train").x.numpy()
    np.testing.assert_allclose(meta["mean"], [x_train.mean(dtype=np.float64) / 255.0], rtol=1e-9)


# ---------------------------------------------------------------- splits, batches and augmentation


def numbered(n: int, shape: tuple[int, ...] = (1, 2, 2)) -> data.Split:
    """A split whose row i has every pixel i, label i and one extra target row [i, i]."""
    rows = torch.arange(n)
    x = rows.to(torch.uint8).view(n, *[1] * len(shape)).expand(n, *shape).contiguous()
    return data.Split(x, rows.clone(), (rows.float()[:, None].repeat(1, 2),))


IDENTITY = data.Normaliser(1.0, (0.0,), (1.0,))  # batches of numbered() then carry the row number as pixels


def taken(split: data.Split, batch_size: int, **kwargs: Any) -> tuple[list[int], list[int]]:
    """The labels (row numbers) of every batch, in order, and the batch sizes; pixels and extras agree."""
    labels, sizes = [], []
    for x, y, extra in data.batches(split, batch_size, IDENTITY, **kwargs):
        assert x.dtype == torch.float32
        assert torch.equal(x[:, 0, 0, 0], y.float()) and torch.equal(extra[:, 0], y.float())
        labels += y.tolist()
        sizes.append(len(y))
    return labels, sizes


def test_load_split_is_uint8_and_subsets_are_views(digits_runs: dict[str, Path]) -> None:
    split = data.load_split(digits_runs["a"], "train")
    assert split.x.dtype == torch.uint8 and split.x.dim() == 4 and split.y.dtype == torch.int64
    idx = torch.tensor([5, 0, 9, 3])
    sub = split.subset(idx)
    assert sub.x.data_ptr() == split.x.data_ptr() and sub.y.data_ptr() == split.y.data_ptr()  # no copy
    assert sub.x.dtype == torch.uint8 and len(sub) == 4 and sub.rows.tolist() == [5, 0, 9, 3]
    assert sub.subset(torch.tensor([1, 3])).rows.tolist() == [0, 3]  # indices into the current rows
    moved = sub.to(torch.device("cpu"))
    assert moved.x.dtype == torch.uint8 and moved.rows.tolist() == [5, 0, 9, 3]
    labelled = sub.with_labels(torch.zeros_like(split.y)).with_extra(split.y)
    assert labelled.x.data_ptr() == split.x.data_ptr() and labelled.rows is sub.rows


def test_normaliser_scales_then_standardises_each_channel() -> None:
    x = torch.tensor([[[[0, 255]], [[51, 102]]]], dtype=torch.uint8)  # (1, 2, 1, 2)
    norm = data.normaliser({"scale": 255.0, "mean": [0.5, 0.2], "std": [0.5, 0.1]})
    out = norm(x)
    assert out.dtype == torch.float32 and out.shape == (1, 2, 1, 2)
    torch.testing.assert_close(out, torch.tensor([[[[-1.0, 1.0]], [[0.0, 2.0]]]]))
    assert x.dtype == torch.uint8 and x[0, 0, 0, 1].item() == 255  # the batch itself is left as it was


def test_batches_in_order_without_a_generator_and_of_a_subset_only_its_rows() -> None:
    split = numbered(10)
    assert taken(split, 4) == (list(range(10)), [4, 4, 2])
    assert taken(split.subset(torch.tensor([7, 2, 5])), 2) == ([7, 2, 5], [2, 1])
    assert taken(split, 4, limit=3) == ([0, 1, 2], [3])


def test_batches_shuffle_deterministically_cover_every_row_once_and_limit_takes_a_prefix() -> None:
    split = numbered(50)
    order, sizes = taken(split, 16, generator=torch.Generator().manual_seed(0))
    assert sorted(order) == list(range(50)) and order != list(range(50))  # every row exactly once, shuffled
    assert sizes == [16, 16, 16, 2]
    assert taken(split, 16, generator=torch.Generator().manual_seed(0))[0] == order
    assert taken(split, 16, generator=torch.Generator().manual_seed(1))[0] != order
    assert taken(split, 16, generator=torch.Generator().manual_seed(0), limit=20) == (order[:20], [16, 4])
    sub = split.subset(torch.arange(10, 30))
    shuffled, _ = taken(sub, 8, generator=torch.Generator().manual_seed(0))
    assert sorted(shuffled) == list(range(10, 30))


def test_materialise_is_the_first_rows_of_a_seeded_shuffle() -> None:
    split = numbered(30)
    order, _ = taken(split, 8, generator=torch.Generator().manual_seed(3))
    got = data.materialise(split, 8, IDENTITY, 12, seed=3)
    assert [len(y) for _, y in got] == [8, 4]
    assert torch.cat([y for _, y in got]).tolist() == order[:12]


def ramp(batch: int = 64, channels: int = 2, size: int = 5) -> torch.Tensor:
    """`batch` copies of one image whose pixels are all different and non-zero: (B, C, H, W) uint8."""
    image = 1 + torch.arange(channels * size * size).view(channels, size, size)
    return image.to(torch.uint8).expand(batch, -1, -1, -1).contiguous()


def shift_of(out: torch.Tensor, image: torch.Tensor, crop: int) -> tuple[int, int] | None:
    """The (dy, dx) in [-crop, crop] by which `out` is `image` shifted, zeros entering; None if it is not."""
    h, w = image.shape[1:]
    padded = torch.nn.functional.pad(image, (crop, crop, crop, crop))
    for dy in range(2 * crop + 1):
        for dx in range(2 * crop + 1):
            if torch.equal(padded[:, dy:dy + h, dx:dx + w], out):
                return dy - crop, dx - crop
    return None


def test_augmenter_is_none_when_both_are_off() -> None:
    assert data.augmenter(0, False) is None


def test_random_crop_shifts_by_at_most_crop_with_zeros_entering() -> None:
    x = ramp()
    out = data.augmenter(2, False)(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    shifts = [shift_of(o, x[0], 2) for o in out]
    assert None not in shifts  # every image is the original moved, channels together, by at most 2 pixels
    assert len(set(shifts)) > 5 and (0, 0) in shifts
    for o, (dy, dx) in zip(out, shifts):
        assert (o == 0).sum().item() == 2 * (25 - (5 - abs(dy)) * (5 - abs(dx)))  # zeros where the image left
    again = data.augmenter(2, False)(x, torch.Generator().manual_seed(0))
    assert torch.equal(again, out)
    assert not torch.equal(data.augmenter(2, False)(x, torch.Generator().manual_seed(1)), out)


def test_random_flip_mirrors_some_images_and_leaves_the_rest() -> None:
    x = ramp()
    out = data.augmenter(0, True)(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    mirrored = [torch.equal(o, x[0].flip(-1)) for o in out]
    assert all(m or torch.equal(o, x[0]) for m, o in zip(mirrored, out))
    assert 10 < sum(mirrored) < 54
    assert torch.equal(data.augmenter(0, True)(x, torch.Generator().manual_seed(0)), out)


def test_crop_and_flip_together_are_a_shifted_image_maybe_mirrored_and_deterministic() -> None:
    x = ramp()
    aug = data.augmenter(1, True)
    out = aug(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    kinds = [(shift_of(o, x[0], 1) is not None, shift_of(o.flip(-1), x[0], 1) is not None) for o in out]
    assert all(plain or flipped for plain, flipped in kinds)
    assert any(flipped and not plain for plain, flipped in kinds)
    assert torch.equal(aug(x, torch.Generator().manual_seed(0)), out)


def test_a_split_cycled_to_a_length_repeats_its_rows_in_order_up_to_it() -> None:
    split = data.Split(torch.zeros(10, 1, 2, 2, dtype=torch.uint8), torch.arange(10)).subset(torch.tensor([7, 2, 5]))
    assert data.cycled(split, 7).rows.tolist() == [7, 2, 5, 7, 2, 5, 7]
    assert data.cycled(split, 3) is split and data.cycled(split, 2) is split


def test_the_labelled_rows_of_a_subset_are_drawn_from_that_subset() -> None:
    """The mask was drawn over the whole split's labels and its indices read as positions in the subset:
    an IndexError, or, where they all fell low enough, the wrong rows."""
    split = data.Split(torch.zeros(200, 1, 2, 2, dtype=torch.uint8), torch.arange(200) % 4)
    sub = split.subset(torch.arange(100, 200))
    chosen = data.labelled(sub, 0.2, seed=0).rows
    assert len(chosen) == 20 and set(chosen.tolist()) <= set(range(100, 200))
    assert torch.equal(chosen, sub.rows[data.labelled_subset(sub.y[sub.rows], 0.2, seed=0)])


def test_labelled_subset_is_stratified_and_deterministic_from_the_seed() -> None:
    counts = [10, 7, 3, 1]  # per class; 30% of each, rounded, at least one: 3, 2, 1, 1
    y = torch.repeat_interleave(torch.arange(4), torch.tensor(counts))
    y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    mask = data.labelled_subset(y, 0.3, seed=0)
    assert mask.dtype == torch.bool and mask.shape == y.shape
    assert torch.bincount(y[mask], minlength=4).tolist() == [max(1, round(0.3 * c)) for c in counts] == [3, 2, 1, 1]
    assert torch.equal(data.labelled_subset(y, 0.3, seed=0), mask)
    other = data.labelled_subset(y, 0.3, seed=1)
    assert not torch.equal(other, mask) and torch.equal(torch.bincount(y[other], minlength=4),
                                                        torch.bincount(y[mask], minlength=4))
    assert data.labelled_subset(y, 1.0, seed=0).all()

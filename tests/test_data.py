import numpy as np
import pytest
from PIL import Image

from factory.data import DataError, load_real


def test_digits_split_is_fixed_and_stratified():
    train, test = load_real("digits", "train"), load_real("digits", "test")
    assert train.images.shape == (1347, 8, 8) and test.images.shape == (450, 8, 8)
    assert train.images.dtype == np.uint8 and train.mode == "L"
    assert train.class_names == [str(i) for i in range(10)]
    assert np.bincount(test.labels).min() >= 43
    again = load_real("digits", "train")
    assert np.array_equal(again.images, train.images)


def test_digits_split_is_kept_in_the_cache_and_remade_when_unreadable(tmp_path, monkeypatch):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from factory import data

    monkeypatch.setenv("FACTORY_CACHE", str(tmp_path))
    data._digits_split.cache_clear()
    made = load_real("digits", "test")
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 1 and files[0].startswith("digits-sklearn-") and files[0].endswith("-test.npz")
    d = load_digits()
    want = train_test_split(d.data, d.target, test_size=0.25, stratify=d.target, random_state=0)[1]
    assert np.array_equal(made.images, np.round(want.reshape(-1, 8, 8) * 255 / 16).astype(np.uint8))
    (tmp_path / files[0]).write_bytes(b"half a file")
    data._digits_split.cache_clear()
    again = load_real("digits", "test")  # from scikit-learn again, and the file rewritten
    assert np.array_equal(again.images, made.images) and again.class_names == made.class_names
    rewritten = (tmp_path / files[0]).stat()
    assert rewritten.st_size > 1000
    data._digits_split.cache_clear()
    cached = load_real("digits", "test")  # from the file, which stays as it is
    assert np.array_equal(cached.images, made.images) and np.array_equal(cached.labels, made.labels)
    assert (tmp_path / files[0]).stat().st_mtime_ns == rewritten.st_mtime_ns
    data._digits_split.cache_clear()


def test_fashion_mnist_from_debian_package(system_package):
    try:
        train = load_real("fashion_mnist", "test")
    except DataError as e:
        assert "dataset-fashion-mnist" in str(e)
        system_package("dataset-fashion-mnist", False, "the Fashion-MNIST files")
    assert train.images.shape == (10000, 28, 28) and train.class_names[9] == "Ankle boot"


def test_fashion_mnist_missing_names_the_package(tmp_path):
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        load_real("fashion_mnist", "train", root=str(tmp_path))


def _write_folder(root, sizes=((8, 8),)):
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / "train" / c).mkdir(parents=True)
        for i in range(3):
            size = sizes[i % len(sizes)]
            Image.fromarray(rng.integers(0, 255, size, dtype=np.uint8)).save(root / "train" / c / f"{i}.png")


def test_imagefolder(tmp_path):
    _write_folder(tmp_path)
    real = load_real("imagefolder", "train", root=str(tmp_path))
    assert real.class_names == ["cat", "dog"] and real.images.shape == (6, 8, 8)
    assert list(real.labels) == [0, 0, 0, 1, 1, 1]


def test_imagefolder_bad_input(tmp_path):
    _write_folder(tmp_path, sizes=((8, 8), (9, 9)))
    with pytest.raises(DataError, match="expected 8x8"):
        load_real("imagefolder", "train", root=str(tmp_path))
    (tmp_path / "train" / "cat" / "0.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="corrupt or unreadable image: .*0.png"):
        load_real("imagefolder", "train", root=str(tmp_path))
    with pytest.raises(DataError, match="not found"):
        load_real("imagefolder", "train", root=str(tmp_path / "missing"))
    with pytest.raises(DataError, match="unknown data source"):
        load_real("imagenet", "train")


def test_a_folder_without_a_test_folder_has_no_test_split_of_its_own(tmp_path):
    from factory.data import has_own_split

    (tmp_path / "flat" / "cat").mkdir(parents=True)
    (tmp_path / "split" / "test" / "cat").mkdir(parents=True)
    assert not has_own_split("imagefolder", str(tmp_path / "flat"), "test")
    assert has_own_split("imagefolder", str(tmp_path / "split"), "test")
    assert has_own_split("parquet", str(tmp_path / "split"), "test") and has_own_split("digits", None, "test")

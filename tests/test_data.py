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

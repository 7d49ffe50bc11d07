import os

import numpy as np
import pytest
from PIL import Image

from conftest import make_image_folder
from vitq.data import iter_batches, load_array, open_image_set
from vitq.errors import DataError, InputError
from vitq.runtime.preprocess import PreprocessConfig

CFG = PreprocessConfig(input_size=(3, 16, 16), crop_pct=0.875)


def test_labels_csv(image_folder):
    s = open_image_set(image_folder)
    assert s.layout == "labels.csv" and len(s) == 6 and s.labels == [0, 1, 2, 0, 1, 2]
    x, y = load_array(s, CFG)
    assert x.shape == (6, 3, 16, 16) and x.dtype == np.float32 and list(y) == s.labels


def test_imagefolder_layout(tmp_path):
    for cls in ("zebra", "ant"):
        make_image_folder(tmp_path / cls, n=2, labels=False)
    s = open_image_set(tmp_path)
    assert s.layout == "imagefolder"
    # classes sorted by name: ant=0, zebra=1
    assert [(f.parent.name, l) for f, l in zip(s.files, s.labels)] == [("ant", 0)] * 2 + [("zebra", 1)] * 2


def test_flat_folder_unlabeled(tmp_path):
    make_image_folder(tmp_path, n=3, labels=False)
    s = open_image_set(tmp_path)
    assert s.layout == "flat" and s.labels is None
    _, y = load_array(s, CFG)
    assert y is None


def test_subset_is_deterministic_and_seeded(tmp_path):
    make_image_folder(tmp_path, n=20)
    s = open_image_set(tmp_path)
    a, b, c = s.subset(5, seed=1), s.subset(5, seed=1), s.subset(5, seed=2)
    assert a.files == b.files and a.files != c.files and len(a) == 5
    assert a.files == sorted(a.files)  # original order kept
    assert a.fingerprint() == b.fingerprint() != s.fingerprint()


def test_corrupt_image_is_named(image_folder):
    bad = image_folder / "img_002.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    s = open_image_set(image_folder)
    with pytest.raises(DataError, match="img_002.jpg"):
        load_array(s, CFG)


def test_truncated_image_is_named(image_folder):
    p = image_folder / "img_000.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(p)
    p.write_bytes(p.read_bytes()[:300])
    with pytest.raises(DataError, match="img_000.jpg"):
        load_array(open_image_set(image_folder), CFG)


def test_skip_bad_counts(image_folder):
    (image_folder / "img_001.png").write_text("not a png")
    s = open_image_set(image_folder)
    x, y = load_array(s, CFG, skip_bad=True)
    assert len(x) == 5 and len(y) == 5 and len(s.skipped) == 1 and "img_001.png" in s.skipped[0]
    assert s.describe()["skipped"] == 1


def test_missing_and_malformed(tmp_path):
    with pytest.raises(InputError, match="not found"):
        open_image_set(tmp_path / "nope")
    (tmp_path / "labels.csv").write_text("path,class\na.jpg,1\n")
    with pytest.raises(DataError, match="header"):
        open_image_set(tmp_path)
    (tmp_path / "labels.csv").write_text("file,label\nmissing.jpg,1\n")
    with pytest.raises(DataError, match="missing.jpg"):
        open_image_set(tmp_path)
    make_image_folder(tmp_path / "x", n=1, labels=False)
    (tmp_path / "x" / "labels.csv").write_text("file,label\nimg_000.jpg,cat\n")
    with pytest.raises(DataError, match="not an integer"):
        open_image_set(tmp_path / "x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        open_image_set(tmp_path / "empty")


def test_batches_cover_all(tmp_path):
    make_image_folder(tmp_path, n=7)
    sizes = [len(x) for x, _, _ in iter_batches(open_image_set(tmp_path), CFG, 3)]
    assert sizes == [3, 3, 1]

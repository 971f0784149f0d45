"""A plain folder of images."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from neurosem.data.folder import ImageFolderDataset, folder_fingerprint, list_images
from neurosem.errors import DataError


@pytest.fixture
def photos(tmp_path):
    root = tmp_path / "photos"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".hidden").mkdir()
    rng = np.random.default_rng(0)
    arrays = {}
    for rel, fmt in [("b.png", "PNG"), ("a.PNG", "PNG"), ("sub/c.bmp", "BMP"),
                     ("sub/deeper/d.png", "PNG"), ("grey.png", "PNG")]:
        arr = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
        img = Image.fromarray(arr)
        if rel == "grey.png":
            img = img.convert("L")
            arr = np.repeat(np.asarray(img)[..., None], 3, axis=2)
        img.save(root / rel, fmt)
        arrays[rel] = arr
    Image.new("RGB", (5, 6)).save(root / ".hidden" / "x.png")
    Image.new("RGB", (5, 6)).save(root / ".dotfile.png")
    (root / "notes.txt").write_text("not an image")
    return root, arrays


def test_lists_images_recursively_sorted(photos):
    root, arrays = photos
    assert list_images(root) == ["a.PNG", "b.png", "grey.png", "sub/c.bmp", "sub/deeper/d.png"]
    ds = ImageFolderDataset(root)
    assert len(ds) == 5
    for i, rel in enumerate(ds.image_ids):
        item = ds[i]
        assert set(item) == {"image", "index", "id"}
        assert item["index"] == i and item["id"] == rel
        assert item["image"].shape == (3, 6, 5) and item["image"].dtype == torch.float32
        got = (item["image"] * 255).round().byte().permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(got, arrays[rel])
    assert ds[-1]["id"] == "sub/deeper/d.png"
    with pytest.raises(IndexError):
        ds[5]


def test_transform_and_pickle(photos):
    root, _ = photos
    ds = ImageFolderDataset(root, transform=lambda img: torch.full((3, 2, 2), float(img.size[0])))
    assert ds[0]["image"].unique().tolist() == [5.0]
    plain = pickle.loads(pickle.dumps(ImageFolderDataset(root)))
    assert plain[1]["id"] == "b.png"


def test_empty_missing_and_corrupt(tmp_path, photos):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.md").write_text("x")
    for path, text in [(tmp_path / "empty", "no images"), (tmp_path / "nope", "does not exist"),
                       (tmp_path / "empty" / "readme.md", "is not a folder")]:
        with pytest.raises(DataError) as e:
            ImageFolderDataset(path)
        assert text in str(e.value) and "\n" not in str(e.value)
        assert "Broden directory" in str(e.value)
    root, _ = photos
    (root / "b.png").write_bytes(b"garbage")
    ds = ImageFolderDataset(root)
    with pytest.raises(DataError, match=r"b\.png: cannot decode image"):
        ds[1]


def test_fingerprint_follows_the_file_list(tmp_path, photos):
    root, _ = photos
    fp = folder_fingerprint(root)
    assert ImageFolderDataset(root).fingerprint() == fp
    assert folder_fingerprint(root) == fp
    (root / "notes.txt").write_text("still not an image")
    assert folder_fingerprint(root) == fp
    Image.new("RGB", (3, 3)).save(root / "sub" / "new.png")
    assert folder_fingerprint(root) != fp

"""``open_image_dataset`` / ``dataset_fingerprint``: dispatch on the ``--data`` spec."""
from __future__ import annotations

import inspect
import shutil

import pytest
import torch
from PIL import Image

import neurosem.data.cifar as cifar
from neurosem.data import dataset_fingerprint, open_image_dataset, parse_spec
from neurosem.data.broden import BrodenDataset, broden_fingerprint
from neurosem.data.folder import ImageFolderDataset
from neurosem.data.transforms import Compose, Normalize, pil_to_tensor
from neurosem.errors import DataError


def test_broden_directory_and_its_parent(tiny_broden, tmp_path):
    ds = open_image_dataset(tiny_broden)
    assert isinstance(ds, BrodenDataset) and not ds.with_labels and ds.split is None
    assert len(ds) == 12
    item = ds[3]
    assert set(item) == {"image", "index", "id"} and item["image"].shape == (3, 32, 32)
    assert item["id"] == "synthetic/img_00003.png"
    parent = tmp_path / "dataset"
    shutil.copytree(tiny_broden, parent / "broden1_32")
    ds2 = open_image_dataset(str(parent))
    assert isinstance(ds2, BrodenDataset) and ds2.root == parent / "broden1_32"
    assert dataset_fingerprint(parent) == dataset_fingerprint(tiny_broden) \
        == broden_fingerprint(tiny_broden)


def test_transform_is_passed_on(tiny_broden):
    norm = Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    plain = open_image_dataset(tiny_broden)[0]["image"]
    ds = open_image_dataset(tiny_broden, transform=Compose([pil_to_tensor, norm]))
    assert torch.allclose(ds[0]["image"], (plain - 0.5) / 0.25)


def test_folder(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (4, 4), (255, 0, 0)).save(tmp_path / "imgs" / "x.png")
    ds = open_image_dataset(tmp_path / "imgs")
    assert isinstance(ds, ImageFolderDataset) and ds[0]["id"] == "x.png"
    assert ds[0]["image"][0].eq(1).all()
    assert parse_spec(str(tmp_path / "imgs")) == ("folder", tmp_path / "imgs")
    fp = dataset_fingerprint(tmp_path / "imgs")
    assert len(fp) == 16 and fp != dataset_fingerprint(tmp_path)


@pytest.mark.parametrize("spec,name,train", [
    ("cifar100:{root}", "cifar100", True), ("cifar10:{root}", "cifar10", True),
    ("cifar100-test:{root}", "cifar100", False), ("CIFAR10-test:{root}", "cifar10", False)])
def test_cifar_specs_call_cifar_dataset(monkeypatch, tmp_path, spec, name, train):
    calls = []
    monkeypatch.setattr(cifar, "cifar_dataset", lambda *a: calls.append(a) or "ds")
    t = Normalize()
    assert open_image_dataset(spec.format(root=tmp_path), transform=t) == "ds"
    assert calls == [(tmp_path, name, train, t)]
    fp = dataset_fingerprint(spec.format(root=tmp_path))
    other = spec.replace("-test", "") if not train else spec.split(":")[0] + "-test:{root}"
    assert fp != dataset_fingerprint(other.format(root=tmp_path))


def test_cifar_dataset_signature_matches_the_call():
    params = list(inspect.signature(cifar.cifar_dataset).parameters)
    assert params[:4] == ["root", "name", "train", "transform"]


def test_cifar_fingerprint_follows_files(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    before = dataset_fingerprint(f"cifar100:{tmp_path}")
    (folder / "train").write_bytes(b"x" * 10)
    assert dataset_fingerprint(f"cifar100:{tmp_path}") != before


def test_bad_specs(tmp_path):
    for spec, text in [(tmp_path / "missing", "does not exist"), ("", "empty dataset spec")]:
        with pytest.raises(DataError) as e:
            open_image_dataset(spec)
        msg = str(e.value)
        assert text in msg and "\n" not in msg
        assert "Broden directory (with index.csv), a folder of images, or cifar100:ROOT" in msg
    (tmp_path / "f.png").write_bytes(b"x")
    with pytest.raises(DataError, match="is a file, not a folder"):
        dataset_fingerprint(tmp_path / "f.png")

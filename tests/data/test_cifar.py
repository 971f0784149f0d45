"""CIFAR reading from a local folder (generated files in the real pickle format) and the augmentation."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from neurosem.data.cifar import (CIFAR100_MEAN, CIFAR100_STD, RandomCrop, RandomHorizontalFlip,
                                 cifar_dataset, cifar_test_transform, cifar_train_transform,
                                 parse_cifar_spec, read_cifar_split, write_cifar)
from neurosem.errors import DataError


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def fake_cifar100(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    train = (_images(10, 0), [3, 1, 4, 1, 5, 9, 2, 6, 5, 99])
    test = (_images(4, 1), [0, 7, 7, 42])
    write_cifar(root, train, test, name="cifar100", classes=[f"c{i}" for i in range(100)])
    return root, train, test


def test_pickle_reader_round_trip(fake_cifar100):
    root, (x, y), (xt, yt) = fake_cifar100
    ds = cifar_dataset(root, "cifar100", train=True)
    assert (ds.reader, ds.verified) == ("pickle", False)   # not the official checksums
    assert len(ds) == 10 and ds.num_classes == 100 and ds.classes[:2] == ["c0", "c1"]
    item = ds[9]
    assert set(item) == {"image", "index", "id", "label"}
    assert (item["index"], item["id"], item["label"]) == (9, "train/00009", 99)
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 32, 32)
    expected = torch.from_numpy(x[9].transpose(2, 0, 1).astype(np.float32) / 255.0)
    torch.testing.assert_close(item["image"], expected)
    test = cifar_dataset(root, "cifar100", train=False)
    assert test.labels == yt and test[3]["id"] == "test/00003"


def test_torchvision_reads_the_same_arrays(fake_cifar100, monkeypatch):
    tv = pytest.importorskip("torchvision.datasets")
    import torchvision.datasets.cifar as tv_cifar

    root, (x, y), _ = fake_cifar100
    monkeypatch.setattr(tv.CIFAR100, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    ds = cifar_dataset(root, "cifar100", train=True)
    assert (ds.reader, ds.verified) == ("torchvision", True)
    np.testing.assert_array_equal(ds.data, x)
    assert ds.labels == y and ds.classes[:3] == ["c0", "c1", "c2"]
    images, labels, classes = read_cifar_split(root, "cifar100", train=True)
    np.testing.assert_array_equal(images, ds.data)
    assert labels == ds.labels and classes == ds.classes


def test_cifar10_layout(tmp_path):
    x = _images(7, 2)
    write_cifar(tmp_path, (x, [0, 1, 2, 3, 4, 5, 6]), (x[:2], [9, 8]), name="cifar10")
    assert sorted(p.name for p in (tmp_path / "cifar-10-batches-py").iterdir()) == \
        ["batches.meta"] + [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    ds = cifar_dataset(tmp_path, "cifar10")
    assert len(ds) == 7 and ds.num_classes == 10 and ds.labels == list(range(7))
    np.testing.assert_array_equal(ds.data, x)   # the five batches concatenate in order


def test_missing_root_is_one_line(tmp_path):
    with pytest.raises(DataError) as err:
        cifar_dataset(tmp_path / "nowhere")
    msg = str(err.value)
    assert "\n" not in msg and "cifar-100-python/" in msg and str(tmp_path / "nowhere") in msg
    (tmp_path / "cifar-100-python").mkdir()
    (tmp_path / "cifar-100-python" / "train").write_bytes(b"")
    with pytest.raises(DataError, match="lacks test, meta"):
        cifar_dataset(tmp_path)


def test_corrupt_pickle_and_bad_labels(tmp_path):
    write_cifar(tmp_path, (_images(2, 0), [0, 1]), (_images(1, 0), [0]))
    (tmp_path / "cifar-100-python" / "test").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="not a readable CIFAR pickle"):
        cifar_dataset(tmp_path, train=False)
    write_cifar(tmp_path, (_images(2, 0), [0, 100]), (_images(1, 0), [0]))
    with pytest.raises(DataError, match="label 100 outside 0..99"):
        cifar_dataset(tmp_path, train=True)


def test_parse_spec():
    assert parse_cifar_spec("cifar100:/d") == ("cifar100", __import__("pathlib").Path("/d"), True)
    assert parse_cifar_spec("cifar10-test:d")[2] is False
    with pytest.raises(DataError, match="cifar100:ROOT"):
        parse_cifar_spec("imagenet:/d")


def test_random_crop_is_a_window_of_the_zero_padded_image():
    x = torch.arange(3 * 32 * 32, dtype=torch.float32).view(3, 32, 32) + 1
    torch.manual_seed(5)
    out = RandomCrop(32, padding=4)(x)
    torch.manual_seed(5)
    top, left = int(torch.randint(0, 9, (1,))), int(torch.randint(0, 9, (1,)))
    padded = torch.zeros(3, 40, 40)
    padded[:, 4:36, 4:36] = x
    torch.testing.assert_close(out, padded[:, top:top + 32, left:left + 32])
    offsets = set()
    for s in range(200):
        torch.manual_seed(s)
        offsets.add((int(torch.randint(0, 9, (1,))), int(torch.randint(0, 9, (1,)))))
    assert len(offsets) > 40   # all 81 offsets are possible


def test_flip_and_normalisation():
    x = torch.rand(3, 4, 5)
    torch.testing.assert_close(RandomHorizontalFlip(1.0)(x), x.flip(-1))
    torch.testing.assert_close(RandomHorizontalFlip(0.0)(x), x)
    from PIL import Image

    img = Image.fromarray(np.full((32, 32, 3), 255, np.uint8))
    out = cifar_test_transform()(img)
    expected = torch.tensor([(1 - m) / s for m, s in zip(CIFAR100_MEAN, CIFAR100_STD)])
    torch.testing.assert_close(out[:, 0, 0], expected)
    torch.manual_seed(0)
    aug = cifar_train_transform()(img)
    assert aug.shape == (3, 32, 32)
    # padded pixels are black before normalisation: value -mean/std
    black = torch.tensor([-m / s for m, s in zip(CIFAR100_MEAN, CIFAR100_STD)])
    inside = torch.isclose(aug, expected.view(3, 1, 1)).all(0)
    padded = torch.isclose(aug, black.view(3, 1, 1)).all(0)
    assert bool((inside | padded).all())


# ---------------------------------------------------------------- the restricted reader

def _py2_pickle(entry: dict) -> bytes:
    """``entry`` pickled as the official CIFAR python files are (Python 2 cPickle, protocol 2, numpy 1):
    str keys and strings as BINSTRING, ``numpy.core.multiarray._reconstruct`` for arrays, the array
    bytes as one BINSTRING. Values: uint8 2-D arrays, lists of int or of str."""
    import struct

    def s(text: bytes) -> bytes:
        return b"U" + bytes([len(text)]) + text if len(text) < 256 else b"T" + struct.pack("<i", len(text)) + text

    def value(v) -> bytes:
        if isinstance(v, np.ndarray):
            dtype = b"cnumpy\ndtype\n" + s(b"u1") + b"K\x00K\x01\x87R(K\x03" + s(b"|") + \
                    b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
            shape = b"(" + b"".join(b"M" + struct.pack("<H", d) for d in v.shape) + b"t"
            return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + s(b"b") + b"\x87R"
                    + b"(K\x01" + shape + dtype + b"\x89" + s(v.tobytes()) + b"tb")
        items = b"".join(b"K" + bytes([x]) if isinstance(x, int) else s(x.encode()) for x in v)
        return b"](" + items + b"e"

    body = b"".join(s(k.encode()) + value(v) for k, v in entry.items())
    return b"\x80\x02}(" + body + b"u."


def test_official_python2_format_is_read(tmp_path):
    x = _images(3, 4)
    data = x.transpose(0, 3, 1, 2).reshape(3, -1)
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    train = {"filenames": ["a.png", "b.png", "c.png"], "batch_label": ["training batch 1 of 1"],
             "fine_labels": [5, 0, 99], "coarse_labels": [1, 0, 19], "data": data}
    (base / "train").write_bytes(_py2_pickle(train))
    (base / "test").write_bytes(_py2_pickle({**train, "fine_labels": [1, 2, 3]}))
    (base / "meta").write_bytes(_py2_pickle({"fine_label_names": [f"n{i}" for i in range(100)],
                                             "coarse_label_names": ["all"]}))
    import pickletools  # the hand-made file is a valid pickle naming numpy 1's module
    assert "numpy.core.multiarray _reconstruct" in str(list(pickletools.genops((base / "train").read_bytes())))
    images, labels, classes = read_cifar_split(tmp_path, "cifar100", train=True)
    np.testing.assert_array_equal(images, x)
    assert labels == [5, 0, 99] and classes[:2] == ["n0", "n1"] and len(classes) == 100


class _Payload:
    """Unpickling this runs ``os.system("touch MARKER")``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.system, (f"touch '{self.marker}'",)


@pytest.mark.parametrize("name,fname", [("cifar10", "data_batch_1"), ("cifar100", "meta")])
def test_planted_pickle_is_refused_without_running_it(tmp_path, name, fname):
    import pickle

    write_cifar(tmp_path, (_images(5, 0), [0, 1, 2, 3, 4]), (_images(2, 0), [0, 1]), name=name)
    folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    path = tmp_path / folder / fname
    marker = tmp_path / "marker"
    with open(path, "wb") as fh:
        pickle.dump({"data": _Payload(marker), "labels": [0]}, fh, protocol=2)
    with pytest.raises(DataError) as err:
        cifar_dataset(tmp_path, name, train=True)
    assert str(err.value) == (f"{path} is not a CIFAR file: its pickle calls posix.system, which CIFAR files "
                              "never do (refused, nothing was run); delete it and re-extract the archive")
    assert not marker.exists()
    pickle.loads(path.read_bytes())  # the plain reader would have run it
    assert marker.exists()


def test_restricted_reader_refuses_other_uses_of_its_globals(tmp_path):
    import pickle

    write_cifar(tmp_path, (_images(2, 0), [0, 1]), (_images(1, 0), [0]))
    path = tmp_path / "cifar-100-python" / "test"
    zlib_encode = b"c_codecs\nencode\nX\x01\x00\x00\x00xX\x04\x00\x00\x00zlib\x86R"
    for body, what in ((zlib_encode, "_codecs.encode with 'zlib'"),
                       (b"c__builtin__\nbytes\nJ\x00\xca\x9a;\x85R", "bytes() with arguments"),
                       (b"cbuiltins\neval\nX\x03\x00\x00\x001+1\x85R", "builtins.eval")):
        path.write_bytes(b"\x80\x02" + body + b".")
        with pytest.raises(DataError, match=re.escape(f"its pickle calls {what}, which")):
            cifar_dataset(tmp_path, train=False)
    assert pickle.loads(b"\x80\x02c__builtin__\nbytes\n)R.") == b""  # b"" at protocol 2 ...
    path.write_bytes(pickle.dumps({"data": np.zeros((0, 3072), np.uint8), "fine_labels": [],
                                   "x": b""}, protocol=2))
    assert len(cifar_dataset(tmp_path, train=False)) == 0   # ... is read

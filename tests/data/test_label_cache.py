"""The label cache: the planes of every image as load_seg gives them, never stale, never half-written."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from neurosem.data.broden import BrodenDataset
from neurosem.data.label_cache import default_cache_dir, open_label_cache
from neurosem.data.synthetic import write_synthetic_broden


@pytest.fixture()
def broden(tmp_path):
    root = tmp_path / "broden"
    write_synthetic_broden(root, n_images=40, image_size=32, seg_size=16, seed=3)
    return root


def _dense(ds, cache, start, stop, categories=None):
    seg, n_planes = cache.batch(start, stop, ds.pixel_categories if categories is None else categories)
    return seg.reshape(stop - start, seg.shape[1], *ds.seg_size), n_planes


def test_pixel_counts_from_the_runs_equal_a_bincount_of_the_planes(broden, tmp_path):
    ds = BrodenDataset(broden)
    cache = open_label_cache(ds, tmp_path / "c", workers=1, progress=False)
    n_labels = len(ds.label_names)
    for cats in (ds.pixel_categories, ds.pixel_categories[1:2], ds.pixel_categories[::2]):
        for start, stop in [(0, 40), (3, 17), (39, 40), (5, 5)]:
            seg, n_planes = cache.batch(start, stop, cats)
            got = cache.pixel_counts(start, stop, cats, n_labels)
            ref = np.bincount(seg.reshape(-1), minlength=n_labels)
            assert got.dtype == np.int64 and got.shape == (n_labels,)
            np.testing.assert_array_equal(got[1:], ref[1:])
            assert got.sum() == int(n_planes.sum()) * seg.shape[-1]     # the padding is not counted


def test_batches_equal_load_seg(broden, tmp_path):
    ds = BrodenDataset(broden)
    cache = open_label_cache(ds, tmp_path / "c", workers=2, progress=False)
    for start, stop in [(0, 40), (3, 17), (39, 40), (5, 5)]:
        seg, n_planes = _dense(ds, cache, start, stop)
        for b, i in enumerate(range(start, stop)):
            ref = ds.load_seg(i)
            k = len(ds.label_files(i))
            assert n_planes[b] == k
            np.testing.assert_array_equal(seg[b, :k], ref[:k])
            assert not seg[b, k:].any()
    assert cache.nbytes > 0 and cache.path.parent == tmp_path / "c" / "labels"


def test_a_category_subset_reads_its_planes_in_the_same_order(broden, tmp_path):
    full = BrodenDataset(broden)
    cache = open_label_cache(full, tmp_path / "c", workers=1, progress=False)
    sub = BrodenDataset(broden, categories=["object", "part"])
    again = open_label_cache(sub, tmp_path / "c", progress=False)        # the same cache, no rebuild
    assert again.path == cache.path and json.loads((cache.path / "meta.json").read_text())["categories"] == \
        [c for c in full.all_categories if c in full.pixel_categories]
    seg, n_planes = _dense(sub, again, 0, 40)
    for i in range(40):
        ref = sub.load_seg(i)
        np.testing.assert_array_equal(seg[i, :n_planes[i]], ref[:n_planes[i]])


def test_workers_and_inline_build_the_same_bytes(broden, tmp_path):
    ds = BrodenDataset(broden)
    a = open_label_cache(ds, tmp_path / "a", workers=1, progress=False)
    b = open_label_cache(ds, tmp_path / "b", workers=3, progress=False)
    for name in ("values.bin", "lengths.bin", "files.txt"):
        assert (a.path / name).read_bytes() == (b.path / name).read_bytes()


def test_an_edited_label_png_rebuilds_the_cache(broden, tmp_path, capsys):
    ds = BrodenDataset(broden)
    cache = open_label_cache(ds, tmp_path / "c", progress=False)
    _, path = ds.label_files(2)[0]
    arr = np.asarray(Image.open(path).convert("RGB")).copy()
    arr[:4, :4] = 0                                                      # label 0 in a corner
    Image.fromarray(arr).save(path)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))       # a later modification time
    again = open_label_cache(BrodenDataset(broden), tmp_path / "c", progress=True)
    assert "rebuilding" in capsys.readouterr().err
    seg, _ = _dense(ds, again, 2, 3)
    np.testing.assert_array_equal(seg[0, 0], ds.load_seg(2)[0])
    assert (seg[0, 0, :4, :4] == 0).all()
    assert again.path == cache.path


@pytest.mark.parametrize("damage", ["truncate", "flip", "meta", "offsets"])
def test_a_damaged_cache_is_rebuilt(broden, tmp_path, damage):
    ds = BrodenDataset(broden)
    cache = open_label_cache(ds, tmp_path / "c", progress=False)
    good = (cache.path / "values.bin").read_bytes()
    if damage == "truncate":                       # a kill while writing (outside the atomic rename)
        (cache.path / "values.bin").write_bytes(good[: len(good) // 2])
    elif damage == "flip":
        (cache.path / "values.bin").write_bytes(good[:10] + bytes([good[10] ^ 1]) + good[11:])
    elif damage == "meta":
        (cache.path / "meta.json").write_text("{not json")
    else:
        (cache.path / "offsets.npz").write_bytes(b"garbage")
    again = open_label_cache(ds, tmp_path / "c", progress=False)
    assert (again.path / "values.bin").read_bytes() == good
    seg, _ = _dense(ds, again, 0, 40)
    np.testing.assert_array_equal(seg[7, :1], ds.load_seg(7)[:1])


def test_an_interrupted_build_leaves_no_cache(broden, tmp_path, monkeypatch):
    import neurosem.data.label_cache as lc

    ds = BrodenDataset(broden)
    calls = {"n": 0}
    real = lc._encode_chunk

    def boom(task):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(lc, "_encode_chunk", boom)
    monkeypatch.setattr(lc, "CHUNK", 8)
    with pytest.raises(KeyboardInterrupt):
        open_label_cache(ds, tmp_path / "c", workers=1, progress=False)
    assert not any((tmp_path / "c" / "labels").iterdir())               # no final dir, no temporary
    monkeypatch.setattr(lc, "_encode_chunk", real)
    assert open_label_cache(ds, tmp_path / "c", progress=False).n_images == 40


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("NEUROSEM_CACHE_DIR", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x"
    monkeypatch.delenv("NEUROSEM_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "neurosem"


def test_a_dissection_after_an_edit_uses_the_new_labels(broden, tmp_path):
    """Edit a label PNG between two dissections: the second one's tallies are the new labels'."""
    from neurosem.dissect import dissect
    from tests._planted import TinyCNN

    from neurosem.models import LoadedModel

    lm = LoadedModel(model=TinyCNN(), spec="tiny", weights="tiny", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                     input_size=(3, 32, 32), default_layers=["layer1"])
    run = tmp_path / "run"
    d1 = dissect(run=run, broden=broden, model=lm, device="cpu", progress=False, report=False)
    gt1 = d1.label_gt.copy()
    for i in range(40):                              # every object plane: all label 0
        for cat, path in BrodenDataset(broden).label_files(i):
            if cat == "object":
                Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(path)
                st = os.stat(path)
                os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    shutil.copy(run / "dissect.h5", tmp_path / "old.h5")
    (run / "dissect.h5").unlink()
    d2 = dissect(run=run, broden=broden, model=lm, device="cpu", progress=False, report=False)
    ds = BrodenDataset(broden)
    ref = np.zeros(ds.n_labels, dtype=np.int64)      # gt of the edited files, read plainly
    for i in range(40):
        ref += np.bincount(ds.load_seg(i).ravel(), minlength=ds.n_labels)
        ref += np.bincount(ds.load_image_labels(i), minlength=ds.n_labels) * 16 * 16
    assert d2.label_gt.tolist() == ref[d2.label_numbers].tolist()
    assert gt1.sum() != d2.label_gt.sum()


def test_thumbnails_are_made_once_and_again_after_an_edit(broden, tmp_path):
    from neurosem.data.label_cache import ThumbnailCache

    ds = BrodenDataset(broden)
    calls = []

    def make(tag):
        def f():
            calls.append(tag)
            return tag
        return f

    cache = ThumbnailCache(ds, 16, tmp_path / "c")
    assert cache.get(3, make(b"first")) == b"first"
    assert ThumbnailCache(ds, 16, tmp_path / "c").get(3, make(b"second")) == b"first"   # from disk
    _, path = ds.image_file(3)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))                    # an edit
    assert cache.get(3, make(b"third")) == b"third"
    assert calls == [b"first", b"third"]


def test_no_thumbnail_cache_with_label_cache_none(broden, tmp_path, monkeypatch):
    from neurosem.data.label_cache import ThumbnailCache

    monkeypatch.setenv("NEUROSEM_CACHE_DIR", str(tmp_path / "env"))
    cache = ThumbnailCache(BrodenDataset(broden), 16, "none")
    assert cache.get(0, lambda: b"a") == b"a" and cache.get(0, lambda: b"b") == b"b"   # made every time
    assert not (tmp_path / "env").exists()

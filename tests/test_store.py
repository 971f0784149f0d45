"""ActivationStore: layout, exact round trips, background writer, errors for bad files."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from neurosem.errors import NeurosemError
from neurosem.store import ActivationStore, chunk_shape, has_nonfinite

SHAPES = {"layer1": (8, 5, 5), "block.2": (4, 3, 3)}


def _data(n: int, dtype=np.float16, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal((n, *s)).astype(dtype) for k, s in SHAPES.items()}


def _fill(path, n: int = 23, batch: int = 5, dtype: str = "float16", **kw) -> dict[str, np.ndarray]:
    data = _data(n, np.float16 if dtype == "float16" else np.float32)
    store = ActivationStore.create(path, SHAPES, n, {"model": "m", "layers": list(SHAPES)}, dtype=dtype, **kw)
    with store, store.writer() as w:
        for i in range(0, n, batch):
            w.put({k: v[i:i + batch] for k, v in data.items()}, [f"id{j}" for j in range(i, min(i + batch, n))])
    with ActivationStore.append_to(path) as store:
        store.mark_complete()
    return data


def test_chunk_shape_about_one_megabyte():
    # 64x56x56 float16 maps: 401,408 bytes per image -> 2 images per chunk (802,816 bytes)
    assert chunk_shape((1000, 64, 56, 56), 2) == (2, 64, 56, 56)
    # 512x7x7: 50,176 bytes per image -> 16 images (power of two <= 1 MB / 50,176 = 20)
    assert chunk_shape((1000, 512, 7, 7), 2) == (16, 512, 7, 7)
    # one image bigger than 1 MB: a block of channels of one image, 512 * 32*32*2 = 1 MB
    assert chunk_shape((100, 2048, 32, 32), 2) == (1, 512, 32, 32)
    # rows capped by max_rows and by N
    assert chunk_shape((1000, 4, 2, 2), 2, max_rows=8) == (8, 4, 2, 2)
    assert chunk_shape((5, 4, 2, 2), 2) == (5, 4, 2, 2)


def test_round_trip_layout_and_reads(tmp_path):
    path = tmp_path / "acts.h5"
    data = _fill(path)
    with h5py.File(path, "r") as f:  # the documented layout
        assert f["acts/layer1"].shape == (23, 8, 5, 5) and f["acts/layer1"].dtype == np.float16
        assert f["acts/block.2"].chunks[1:] == (4, 3, 3)
        assert f["acts/layer1"].compression is None
        assert int(f.attrs["n_done"]) == 23 and bool(f.attrs["complete"])
        assert json.loads(f.attrs["layers"]) == ["layer1", "block.2"]
        assert json.loads(f.attrs["provenance"])["model"] == "m"
        assert f["image_ids"].shape == (23,)
    with ActivationStore.open(path) as store:
        assert store.layers == ["layer1", "block.2"]
        assert store.shape("block.2") == (23, 4, 3, 3)
        assert store.n_done == 23 and store.complete
        assert store.image_ids == [f"id{j}" for j in range(23)]
        np.testing.assert_array_equal(store.read("layer1"), data["layer1"])
        np.testing.assert_array_equal(store.read("block.2", 4, 11), data["block.2"][4:11])
        for prefetch in (0, 2):
            starts, parts = [], []
            for start, batch in store.iter_batches(["block.2", "layer1"], batch_size=10, prefetch=prefetch):
                starts.append(start)
                parts.append(batch)
                assert set(batch) == {"block.2", "layer1"}
            assert starts == [0, 10, 20]
            for k in SHAPES:
                np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), data[k])


def test_float32_and_compression(tmp_path):
    data = _fill(tmp_path / "f32.h5", dtype="float32", compression="gzip")
    with ActivationStore.open(tmp_path / "f32.h5") as store:
        got = store.read("layer1")
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, data["layer1"])


def test_batches_not_aligned_to_chunks_and_early_break(tmp_path):
    """Batches of 3 into chunks of 4 rows: every row lands once; abandoning iter_batches is clean."""
    path = tmp_path / "a.h5"
    data = _fill(path, n=23, batch=3, max_chunk_rows=4)
    with ActivationStore.open(path) as store:
        assert store._f["acts/layer1"].chunks[0] == 4
        np.testing.assert_array_equal(store.read("layer1"), data["layer1"])
        it = store.iter_batches(batch_size=2, prefetch=2)
        first = next(it)
        it.close()
        assert first[0] == 0


def test_long_ids_widen_the_column(tmp_path):
    path = tmp_path / "ids.h5"
    store = ActivationStore.create(path, {"x": (1, 1, 1)}, 4, {}, id_width=4)
    with store:
        store.append({"x": np.zeros((2, 1, 1, 1))}, ["ab", "cd"])
        store.append({"x": np.ones((2, 1, 1, 1))}, ["a/very/long/path/é.jpg", "e"])
        assert store.image_ids == ["ab", "cd", "a/very/long/path/é.jpg", "e"]


def test_partial_store_reads_only_written_rows(tmp_path):
    path = tmp_path / "p.h5"
    with ActivationStore.create(path, SHAPES, 10, {}) as store:
        store.append(_data(4), [str(i) for i in range(4)])
        with pytest.raises(NeurosemError, match="only 4 of 10"):
            store.mark_complete()
    with ActivationStore.open(path) as store:
        assert store.n_done == 4 and not store.complete
        assert store.read("layer1").shape == (4, 8, 5, 5)
        assert len(store.image_ids) == 4
        assert sum(len(b["layer1"]) for _, b in store.iter_batches(batch_size=3)) == 4
        with pytest.raises(NeurosemError, match="only 0..4"):
            store.read("layer1", 0, 6)


def test_missing_layer_lists_stored_layers(tmp_path):
    _fill(tmp_path / "a.h5")
    with ActivationStore.open(tmp_path / "a.h5") as store:
        with pytest.raises(NeurosemError, match=r"'layer4' is not in .*stored layers: layer1, block.2"):
            store.read("layer4")
        with pytest.raises(NeurosemError, match="stored layers"):
            list(store.iter_batches(["layer1", "layer4"]))


def test_writer_checks_shapes_and_reraises_thread_errors(tmp_path):
    path = tmp_path / "w.h5"
    store = ActivationStore.create(path, SHAPES, 10, {}, max_chunk_rows=2)
    good = _data(2)
    bad = {"layer1": np.zeros((2, 8, 5, 4), np.float16), "block.2": good["block.2"]}
    with store:
        w = store.writer(max_pending=1)
        with pytest.raises(NeurosemError, match="batch shape"):
            w.put(bad, ["c", "d"])
        w.put(good, ["a", "b"])

        def boom() -> None:
            raise RuntimeError("disk on fire")

        w.put(good, ["c", "d"], ready=boom)
        with pytest.raises(RuntimeError, match="disk on fire"):
            for _ in range(100):  # surfaces on a later put, or else on close
                w.put(good, ["e", "f"])
            w.close()
        w.close()
        assert store.n_done == 2  # the good batch landed, nothing from the failed one on


def test_bad_files_say_rerun_with_force(tmp_path):
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not hdf5" * 100)
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.zeros(3)
    truncated = tmp_path / "truncated.h5"
    _fill(truncated, n=40)
    size = truncated.stat().st_size
    with open(truncated, "r+b") as fh:
        fh.truncate(size // 2)
    for path in (garbage, foreign, truncated):
        with pytest.raises(NeurosemError) as err:
            ActivationStore.open(path)
        msg = str(err.value)
        assert "--force" in msg and str(path) in msg and "\n" not in msg
    with pytest.raises(NeurosemError, match="no activations at"):
        ActivationStore.open(tmp_path / "missing.h5")


def test_create_rejects_bad_input(tmp_path):
    with pytest.raises(NeurosemError, match="only \\(C, H, W\\) maps"):
        ActivationStore.create(tmp_path / "x.h5", {"fc": (10,)}, 3, {})
    with pytest.raises(NeurosemError, match="dtype"):
        ActivationStore.create(tmp_path / "x.h5", SHAPES, 3, {}, dtype="int8")
    with pytest.raises(NeurosemError, match="0 images"):
        ActivationStore.create(tmp_path / "x.h5", SHAPES, 0, {})


def test_has_nonfinite():
    for dtype in (np.float16, np.float32):
        ok = np.array([0.0, -1.5, 6e4, 1e-7], dtype=dtype)
        assert not has_nonfinite(ok)
        for bad in (np.inf, -np.inf, np.nan):
            arr = ok.copy()
            arr[2] = bad
            assert has_nonfinite(arr)
    with np.errstate(over="ignore"):
        assert has_nonfinite(np.array([7e4], dtype=np.float32).astype(np.float16))
    assert not has_nonfinite(np.zeros((0, 3), np.float16))


def test_prefetch_reraises_read_errors(tmp_path, monkeypatch):
    _fill(tmp_path / "a.h5", n=23)
    with ActivationStore.open(tmp_path / "a.h5") as store:
        real, calls = store.read, []

        def flaky(layer, start=0, stop=None):
            calls.append(start)
            if start >= 10:
                raise OSError("disk gone")
            return real(layer, start, stop)

        monkeypatch.setattr(store, "read", flaky)
        got = []
        with pytest.raises(OSError, match="disk gone"):
            for start, _batch in store.iter_batches(["layer1"], batch_size=5, prefetch=2):
                got.append(start)
        assert got == [0, 5]

"""ActivationStore: layout, exact round trips, background writer, errors for bad files."""
from __future__ import annotations

import errno
import json
import zlib

import h5py
import numpy as np
import pytest

from neurosem.errors import DiskFullError, NeurosemError, StoreDamagedError
from neurosem.run import format_bytes, is_disk_full
from neurosem.store import ActivationStore, chunk_shape, has_nonfinite, store_bytes

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


# ---------------------------------------------------------------- checksums
def _crc_reference(arr: np.ndarray, rows: int, n_done: int) -> list[int]:
    """CRC-32 of each block of ``rows`` images of ``arr[:n_done]``, written out plainly."""
    return [zlib.crc32(arr[k:min(k + rows, n_done)].tobytes()) for k in range(0, n_done, rows)]


def test_checksums_per_block_also_across_a_resumed_block(tmp_path):
    """Blocks of 4 rows; writes of 3, 5, 2 rows: block 0 is finished by a later write."""
    path = tmp_path / "c.h5"
    data = _data(10)
    with ActivationStore.create(path, SHAPES, 10, {}, max_chunk_rows=4) as store:
        for a, b in ((0, 3), (3, 8), (8, 10)):
            store.append({k: v[a:b] for k, v in data.items()}, [str(i) for i in range(a, b)])
            for layer in SHAPES:
                n_blocks = -(-b // 4)
                assert list(store._f["crc"][layer][:n_blocks]) == _crc_reference(data[layer], 4, b)
    with ActivationStore.open(path) as store:
        assert store.checksummed and store.block_rows() == 4 and store.damaged() == []
        np.testing.assert_array_equal(store.read("layer1", 5, 6), data["layer1"][5:6])


def _zero_inside_chunk(path, layer: str, chunk: int, skip: int = 16 * 1024, size: int = 64 * 1024) -> None:
    with h5py.File(path, "r") as f:
        info = f["acts"][layer].id.get_chunk_info(chunk)
        assert info.size >= skip + size
        offset = info.byte_offset + skip
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\0" * size)


BIG = {"maps": (16, 64, 64)}  # 128 KiB per image in float16; chunks of 4 images (512 KiB)


def test_zeroed_64k_is_one_line_naming_layer_and_images(tmp_path):
    path = tmp_path / "big.h5"
    rng = np.random.default_rng(1)
    data = {"maps": rng.standard_normal((16, *BIG["maps"])).astype(np.float16),
            "small": rng.standard_normal((16, 2, 3, 3)).astype(np.float16)}
    shapes = {"maps": BIG["maps"], "small": (2, 3, 3)}
    store = ActivationStore.create(path, shapes, 16, {"model": "tiny", "data": "/d", "weights_arg": "w.pt"},
                                   max_chunk_rows=4)
    with store, store.writer() as w:
        for i in range(0, 16, 4):
            w.put({k: v[i:i + 4] for k, v in data.items()}, [str(j) for j in range(i, i + 4)])
    _zero_inside_chunk(path, "maps", chunk=2)  # images 8..12
    want = (f"{path} is damaged: the activations of layer 'maps', images 8..12, do not match their checksum; "
            f"re-record them with `neurosem record tiny --data /d --run {tmp_path} --layers maps,small "
            "--limit 16 --weights w.pt --repair` (only the damaged images are recorded again)")
    with ActivationStore.open(path) as store:
        np.testing.assert_array_equal(store.read("maps", 0, 8), data["maps"][:8])  # undamaged blocks read
        np.testing.assert_array_equal(store.read("small"), data["small"])
        for read in (lambda: store.read("maps", 9, 10), lambda: store.read("maps"),
                     lambda: list(store.iter_batches(["small", "maps"], batch_size=5, prefetch=2))):
            with pytest.raises(StoreDamagedError) as err:
                read()
            assert str(err.value) == want
        assert store.damaged() == [("maps", 8, 12)]
        raw = store.read("maps", 8, 12, verify=False)  # without the check the zeros come through
        assert (raw == 0).sum() > 30000 and not np.array_equal(raw, data["maps"][8:12])


def test_old_stores_without_checksums_are_read(tmp_path):
    data = _fill(tmp_path / "v1.h5")
    with h5py.File(tmp_path / "v1.h5", "r+") as f:
        del f["crc"]
        f.attrs["version"] = 1
    with ActivationStore.open(tmp_path / "v1.h5") as store:
        assert not store.checksummed and store.damaged() == []
        np.testing.assert_array_equal(store.read("layer1"), data["layer1"])


def test_rewrite_needs_whole_blocks_and_keeps_n_done(tmp_path):
    path = tmp_path / "r.h5"
    data = _data(10)
    with ActivationStore.create(path, SHAPES, 10, {}, max_chunk_rows=4) as store:
        store.append(data, [str(i) for i in range(10)])
        for a, b in ((2, 4), (0, 3), (4, 11)):
            with pytest.raises(NeurosemError, match="whole blocks of 4 images up to 10"):
                store.rewrite(a, {k: v[a:b] for k, v in data.items()}, [str(i) for i in range(a, b)])
        other = _data(10, seed=7)
        store.rewrite(4, {k: v[4:10] for k, v in other.items()}, [str(i) for i in range(4, 10)])
        assert store.n_done == 10 and store.damaged() == []
        np.testing.assert_array_equal(store.read("layer1"), np.concatenate([data["layer1"][:4], other["layer1"][4:]]))


# ---------------------------------------------------------------- disk space
def test_store_that_does_not_fit_is_refused_before_writing(tmp_path, monkeypatch):
    import shutil

    needed = store_bytes(SHAPES, 1000, 2)
    # 1000 * (200 + 36) * 2 acts + 1000 * (256 + 8) ids/crc + 3 * 64 KiB
    assert needed == 1000 * 236 * 2 + 1000 * 264 + 3 * 65536 == 932608
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 ** 9, 10 ** 9 - 900000, 900000))
    with pytest.raises(DiskFullError) as err:
        ActivationStore.create(tmp_path / "run" / "a.h5", SHAPES, 1000, {})
    assert str(err.value) == (f"not enough disk space for {tmp_path / 'run' / 'a.h5'}: it needs 910.8 KiB more, "
                              f"878.9 KiB are free on {tmp_path / 'run'}; free space (or write the run elsewhere "
                              "with --run DIR) and run the same command again")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []
    ActivationStore.create(tmp_path / "run" / "a.h5", SHAPES, 100, {}).close()  # 100 images fit


def test_full_disk_during_a_write_keeps_what_was_flushed(tmp_path, monkeypatch):
    path = tmp_path / "full.h5"
    data = _data(12)
    store = ActivationStore.create(path, SHAPES, 12, {}, max_chunk_rows=2)
    real, calls = h5py.Dataset.write_direct, []

    def write_direct(self, *a, **k):
        calls.append(self.name)
        if len(calls) > 4:  # two batches of both layers land, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **k)

    monkeypatch.setattr(h5py.Dataset, "write_direct", write_direct)
    with store:
        w = store.writer()
        with pytest.raises(DiskFullError) as err:
            for i in range(0, 12, 2):
                w.put({k: v[i:i + 2] for k, v in data.items()}, [str(j) for j in range(i, i + 2)])
            w.close()
        w.close()
        assert store.n_done == 4
        assert f"it needs {format_bytes(8 * store.row_bytes())} more" in str(err.value)
        assert "; 4 of 12 images are saved; free space" in str(err.value) and "\n" not in str(err.value)
        with pytest.raises(NeurosemError, match="an earlier write failed"):
            store.append({k: v[4:6] for k, v in data.items()}, ["4", "5"])
    monkeypatch.setattr(h5py.Dataset, "write_direct", real)
    with ActivationStore.append_to(path) as store:  # a valid file, resumable at 4
        assert store.n_done == 4 and store.damaged() == []
        np.testing.assert_array_equal(store.read("layer1"), data["layer1"][:4])
        store.append({k: v[4:] for k, v in data.items()}, [str(j) for j in range(4, 12)])
        np.testing.assert_array_equal(store.read("block.2"), data["block.2"])


def test_disk_full_errors_are_recognised():
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    # h5py reports a failed flush as a RuntimeError carrying HDF5's errno text
    assert is_disk_full(RuntimeError("Unable to synchronously flush file (file write failed: ..., errno = 28, "
                                     "error message = 'No space left on device', buf = 0x1)"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(ValueError("No space left on device"))
    assert [format_bytes(v) for v in (0, 1023, 1536, 3 * 2 ** 30)] == ["0 B", "1023 B", "1.5 KiB", "3.0 GiB"]

"""The Broden label planes decoded once per dataset, for every later dissection of any model.

Decoding the label PNGs costs more than the tally itself, so the first dissection of a Broden
directory decodes them in worker processes and keeps them, run-length encoded along the rows, in a
cache directory; every later dissection reads the planes from there without opening a PNG.

Where: ``$NEUROSEM_CACHE_DIR/labels/<fingerprint>-<sh>x<sw>/`` (default
``${XDG_CACHE_HOME:-~/.cache}/neurosem``), one directory per Broden set:

- ``values.bin`` / ``lengths.bin``: the runs (label number, run length) of every plane, one plane
  after the other (uint16, or uint32 where numbers or planes are larger);
- ``offsets.npz``: the first run of every plane, the first plane of every image and each plane's
  category; ``files.txt``: the label PNGs it was made from;
- ``meta.json`` (written last): the dataset fingerprint, the sizes, modification times and inodes
  of every label PNG (hashed), the byte counts and CRC-32 of the two run files.

A cache is used only when all of it matches: an edited label PNG (new size or modification time),
an edited csv file (another fingerprint) or a file cut short by a kill (another size or CRC) makes
it be rebuilt, never read. A cache is written into a temporary directory and renamed into place
whole, so a kill leaves no half-written cache under the final name. The size is a few kB per
image (see ``neurosem.data.label_cache.describe``).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from neurosem.errors import DataError

VERSION = 1
CHUNK = 32          # images per worker task


def default_cache_dir() -> Path:
    """``$NEUROSEM_CACHE_DIR``, else ``${XDG_CACHE_HOME:-~/.cache}/neurosem``.

    Example:
        >>> default_cache_dir()  # doctest: +SKIP
        PosixPath('/home/me/.cache/neurosem')
    """
    env = os.environ.get("NEUROSEM_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "neurosem"


def _crc(path: Path) -> int:
    crc = 0
    with open(path, "rb") as fh:
        while True:
            block = fh.read(1 << 24)
            if not block:
                return crc
            crc = zlib.crc32(block, crc)


def _stamp(files: Sequence[str], root: Path) -> str:
    """A hash of every label PNG's size, modification time and inode (``None`` entries: missing)."""
    h = hashlib.sha256()
    for rel in files:
        try:
            st = os.stat(root / "images" / rel)
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\n".encode())
        except OSError:
            h.update(f"{rel}\0missing\n".encode())
    return h.hexdigest()[:24]


@lru_cache(maxsize=2)
def _worker_dataset(root: str, categories: tuple[str, ...]) -> Any:
    from neurosem.data.broden import BrodenDataset

    return BrodenDataset(root, categories=list(categories), with_labels=True)


def _encode_planes(planes: Sequence[np.ndarray], vdtype: Any, ldtype: Any) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Run-length encode planes along their rows (flattened): ``(values, lengths, runs per plane)``."""
    values, lengths, counts = [], [], []
    for plane in planes:
        flat = plane.reshape(-1)
        starts = np.concatenate([[0], np.flatnonzero(flat[1:] != flat[:-1]) + 1])
        values.append(flat[starts].astype(vdtype))
        lengths.append(np.diff(np.append(starts, flat.shape[0])).astype(ldtype))
        counts.append(int(starts.shape[0]))
    if not counts:
        return np.zeros(0, vdtype), np.zeros(0, ldtype), []
    return np.concatenate(values), np.concatenate(lengths), counts


def _encode_chunk(task: tuple[str, tuple[str, ...], int, int, str, str]) -> tuple[bytes, bytes, list, list]:
    """Decode and encode images ``start..stop`` (in a worker process)."""
    root, cats, start, stop, vdt, ldt = task
    ds = _worker_dataset(root, cats)
    vals, lens, runs, plane_cats = [], [], [], []
    for i in range(start, stop):
        planes = ds.load_planes(i)
        v, ln, counts = _encode_planes([p for _, p in planes], np.dtype(vdt), np.dtype(ldt))
        vals.append(v)
        lens.append(ln)
        runs.append(counts)
        plane_cats.append([cats.index(c) for c, _ in planes])
    return (np.concatenate(vals).tobytes() if vals else b"", np.concatenate(lens).tobytes() if lens else b"",
            runs, plane_cats)


@dataclass
class LabelCache:
    """A built label cache (opened read-only; the run files are memory-mapped).

    Attributes:
        path: the cache directory; categories: the pixel categories it holds; n_images;
        seg_size ``(sh, sw)``; nbytes: its size on disk.

    Example:
        >>> from neurosem.data.broden import BrodenDataset
        >>> ds = BrodenDataset("data/broden1_224")                  # doctest: +SKIP
        >>> cache = open_label_cache(ds)                            # doctest: +SKIP
        >>> seg, n_planes = cache.batch(0, 64, ds.pixel_categories)  # doctest: +SKIP
        >>> seg.shape                                               # [B, P, sh * sw]
        (64, 4, 12544)
    """

    path: Path
    categories: list[str]
    n_images: int
    seg_size: tuple[int, int]
    values: np.ndarray          # [R] label number of each run
    lengths: np.ndarray         # [R] length of each run
    plane_runs: np.ndarray      # [n_planes + 1] first run of each plane
    image_planes: np.ndarray    # [n_images + 1] first plane of each image
    plane_category: np.ndarray  # [n_planes] index into categories
    nbytes: int

    def batch(self, start: int, stop: int, categories: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """The label planes of images ``start..stop`` in the given categories.

        Returns:
            ``(seg [B, P, sh * sw], n_planes [B])``: the planes of each image in the dataset's
            order (as :meth:`BrodenDataset.load_seg`), zero-padded to the batch's largest count.
        """
        want = np.zeros(len(self.categories) + 1, dtype=bool)
        for c in categories:
            if c in self.categories:
                want[self.categories.index(c)] = True
        p0, p1 = int(self.image_planes[start]), int(self.image_planes[stop])
        keep = want[self.plane_category[p0:p1]]
        owner = np.repeat(np.arange(stop - start), np.diff(self.image_planes[start:stop + 1]))
        n_planes = np.bincount(owner[keep], minlength=stop - start).astype(np.int64)
        s = self.seg_size[0] * self.seg_size[1]
        seg = np.zeros((stop - start, max(1, int(n_planes.max(initial=0))), s), dtype=self.values.dtype)
        planes = np.flatnonzero(keep) + p0
        if planes.size:
            r0, r1 = self.plane_runs[planes], self.plane_runs[planes + 1]
            if keep.all():                       # one contiguous range of runs
                flat = np.repeat(self.values[r0[0]:r1[-1]], self.lengths[r0[0]:r1[-1]])
            else:
                idx = np.concatenate([np.arange(a, b) for a, b in zip(r0, r1)])
                flat = np.repeat(self.values[idx], self.lengths[idx])
            rows = flat.reshape(planes.size, s)
            own = owner[keep]
            slot = np.arange(planes.size) - np.repeat(np.cumsum(n_planes) - n_planes, n_planes)
            seg[own, slot] = rows
        return seg, n_planes

    def pixel_counts(self, start: int, stop: int, categories: Sequence[str], n_labels: int) -> np.ndarray:
        """``[n_labels]`` int64: how many pixels of the planes of images ``start..stop`` in
        ``categories`` carry each label number (label 0 too), summed over the runs without decoding
        them: the same as a ``bincount`` of the planes :meth:`batch` returns, less its zero padding.

        Example:
            >>> cache.pixel_counts(0, 64, ds.pixel_categories, len(ds.label_names))  # doctest: +SKIP
        """
        want = np.zeros(len(self.categories) + 1, dtype=bool)
        for c in categories:
            if c in self.categories:
                want[self.categories.index(c)] = True
        p0, p1 = int(self.image_planes[start]), int(self.image_planes[stop])
        planes = np.flatnonzero(want[self.plane_category[p0:p1]]) + p0
        if not planes.size:
            return np.zeros(n_labels, dtype=np.int64)
        r0, r1 = self.plane_runs[planes], self.plane_runs[planes + 1]
        if r1[-1] - r0[0] == int((r1 - r0).sum()):              # one contiguous range of runs
            vals, lens = self.values[r0[0]:r1[-1]], self.lengths[r0[0]:r1[-1]]
        else:
            idx = np.concatenate([np.arange(a, b) for a, b in zip(r0, r1)])
            vals, lens = self.values[idx], self.lengths[idx]
        # float64 weights count exactly up to 2**53 pixels
        counts = np.bincount(vals, weights=lens, minlength=n_labels)
        return counts.astype(np.int64)


def _cache_key_dir(ds: Any, cache_dir: Path) -> Path:
    sh, sw = ds.seg_size
    return cache_dir / "labels" / f"{ds.fingerprint()}-{sh}x{sw}"


def _read(path: Path, ds: Any, need: Sequence[str]) -> LabelCache | None:
    """The cache at ``path`` when it is complete, matches ``ds`` and holds ``need``; else None."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        if (meta.get("version") != VERSION or meta.get("fingerprint") != ds.fingerprint()
                or tuple(meta.get("seg_size", ())) != tuple(ds.seg_size)
                or meta.get("n_images") != len(ds) or not set(need) <= set(meta["categories"])):
            return None
        files = (path / "files.txt").read_text().splitlines()
        if _stamp(files, ds.root) != meta["stamp"]:
            return None
        vdt, ldt = np.dtype(meta["values_dtype"]), np.dtype(meta["lengths_dtype"])
        for name, dt in (("values", vdt), ("lengths", ldt)):
            f = path / f"{name}.bin"
            if f.stat().st_size != meta["runs"] * dt.itemsize or _crc(f) != meta[f"{name}_crc32"]:
                return None
        with np.load(path / "offsets.npz", allow_pickle=False) as z:
            plane_runs, image_planes, plane_cat = z["plane_runs"], z["image_planes"], z["plane_category"]
        if image_planes.shape[0] != len(ds) + 1 or int(plane_runs[-1]) != meta["runs"]:
            return None

        def mm(name: str, dt: Any) -> np.ndarray:
            if meta["runs"] == 0:
                return np.zeros(0, dt)
            return np.memmap(path / f"{name}.bin", dtype=dt, mode="r", shape=(meta["runs"],))

        nbytes = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
        return LabelCache(path=path, categories=list(meta["categories"]), n_images=len(ds),
                          seg_size=tuple(ds.seg_size), values=mm("values", vdt), lengths=mm("lengths", ldt),
                          plane_runs=plane_runs, image_planes=image_planes, plane_category=plane_cat,
                          nbytes=nbytes)
    except (OSError, ValueError, KeyError, TypeError, zlib.error):
        return None


def _workers(n_tasks: int, workers: int | None) -> int:
    if workers is not None:
        return max(1, min(int(workers), n_tasks))
    return max(1, min(8, os.cpu_count() or 1, n_tasks))


def build_label_cache(ds: Any, path: Path, categories: Sequence[str], workers: int | None = None,
                      progress: bool = True) -> None:
    """Decode every label PNG of ``ds`` in ``categories`` (worker processes) and write the cache
    at ``path`` (into a temporary directory, renamed into place at the end)."""
    from neurosem._progress import progress as bar

    cats = tuple(c for c in ds.all_categories if c in set(categories))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{time.time_ns()}")
    tmp.mkdir()
    try:
        sh, sw = ds.seg_size
        vdt = "uint16" if ds.n_labels <= 65536 else "uint32"
        ldt = "uint16" if sh * sw <= 65535 else "uint32"
        n = len(ds)
        tasks = [(str(ds.root), cats, a, min(n, a + CHUNK), vdt, ldt) for a in range(0, n, CHUNK)]
        files: list[str] = []
        sub = _worker_dataset(str(ds.root), cats)
        for i in range(n):
            files += [str(p.relative_to(ds.root / "images")) for _, p in sub.label_files(i)]
        plane_runs, image_planes, plane_cat = [0], [0], []
        n_workers = _workers(len(tasks), workers)
        with open(tmp / "values.bin", "wb") as fv, open(tmp / "lengths.bin", "wb") as fl:
            crc_v = crc_l = 0
            if n_workers > 1:
                import multiprocessing as mp

                ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
                pool: Any = ProcessPoolExecutor(n_workers, mp_context=ctx)
                results = pool.map(_encode_chunk, tasks)
            else:
                pool, results = None, map(_encode_chunk, tasks)
            try:
                for vals, lens, runs, pcats in bar(results, total=len(tasks), desc="labels: decode PNGs once",
                                                   enabled=progress, unit="chunk"):
                    fv.write(vals)
                    fl.write(lens)
                    crc_v, crc_l = zlib.crc32(vals, crc_v), zlib.crc32(lens, crc_l)
                    for counts, pc in zip(runs, pcats):
                        for c in counts:
                            plane_runs.append(plane_runs[-1] + c)
                        plane_cat += pc
                        image_planes.append(image_planes[-1] + len(counts))
            finally:
                if pool is not None:
                    pool.shutdown(cancel_futures=True)
        np.savez(tmp / "offsets.npz", plane_runs=np.asarray(plane_runs, dtype=np.int64),
                 image_planes=np.asarray(image_planes, dtype=np.int64),
                 plane_category=np.asarray(plane_cat, dtype=np.int16))
        (tmp / "files.txt").write_text("\n".join(files))
        meta = {"version": VERSION, "fingerprint": ds.fingerprint(), "seg_size": list(ds.seg_size),
                "n_images": n, "categories": list(cats), "stamp": _stamp(files, ds.root),
                "runs": plane_runs[-1], "values_dtype": vdt, "lengths_dtype": ldt,
                "values_crc32": crc_v, "lengths_crc32": crc_l, "root": str(ds.root)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        old = None
        if path.exists():
            old = path.with_name(f"{path.name}.old-{os.getpid()}-{time.time_ns()}")
            os.rename(path, old)
        try:
            os.rename(tmp, path)
        except OSError:             # another process put its cache there first: use that one
            pass
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def open_label_cache(ds: Any, cache_dir: str | Path | None = None, workers: int | None = None,
                     progress: bool = True) -> LabelCache:
    """The label cache of ``ds`` for its pixel categories, built first when there is none or it
    does not match the dataset any more.

    Args:
        ds: a :class:`~neurosem.data.broden.BrodenDataset`.
        cache_dir: the cache root (default :func:`default_cache_dir`).
        workers: decoding processes when building (default: the CPU count, at most 8).
        progress: a progress bar while building.

    Raises:
        DataError: a label PNG is missing or malformed (while building).
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = _cache_key_dir(ds, root)
    need = list(ds.pixel_categories)
    cache = _read(path, ds, need) if path.exists() else None
    if cache is not None:
        return cache
    cats = set(need)
    if path.exists():
        try:                         # keep what the old cache held: the union is built
            old = json.loads((path / "meta.json").read_text())
            if old.get("fingerprint") == ds.fingerprint():
                cats |= set(old.get("categories", [])) & set(ds.all_categories)
        except (OSError, ValueError):
            pass
        if progress:
            print(f"label cache {path} does not match {ds.root} any more (or is damaged): rebuilding it",
                  file=sys.stderr)
    build_label_cache(ds, path, sorted(cats, key=ds.all_categories.index), workers=workers, progress=progress)
    cache = _read(path, ds, need)
    if cache is None:
        raise DataError(f"the label cache {path} could not be built or read back; delete it, or pass "
                        f"--label-cache none to read the label PNGs directly")
    return cache


class ThumbnailCache:
    """The report's image thumbnails (JPEG bytes), made once per Broden image and size.

    Kept beside the label cache, ``<cache_dir>/thumbs/<fingerprint>-<px>/``, one file per image
    named by its position, byte size and modification time (an edited image gets a new one).
    Where the folder cannot be written, or with ``cache_dir="none"`` (as ``--label-cache none``),
    thumbnails are made on every call.

    Example:
        >>> thumbs = ThumbnailCache(ds, 112)                  # doctest: +SKIP
        >>> jpeg = thumbs.get(0, make=lambda: b"...")          # doctest: +SKIP
    """

    def __init__(self, ds: Any, px: int, cache_dir: str | Path | None = None) -> None:
        self.ds, self.px = ds, int(px)
        self.writable = False
        if str(cache_dir) == "none":
            return
        root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.path = root / "thumbs" / f"{ds.fingerprint()}-{self.px}"
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self.writable = os.access(self.path, os.W_OK)
        except OSError:
            self.writable = False

    def _name(self, i: int) -> Path | None:
        try:
            _, path = self.ds.image_file(i)
            st = os.stat(path)
        except OSError:
            return None
        return self.path / f"{i}-{st.st_size}-{st.st_mtime_ns}.jpg"

    def get(self, i: int, make: Any) -> bytes:
        """The JPEG bytes of image ``i``'s thumbnail; ``make()`` builds them when not cached."""
        name = self._name(i) if self.writable else None
        if name is not None:
            try:
                return name.read_bytes()
            except OSError:
                pass
        data = make()
        if name is not None:
            tmp = name.with_name(f".{name.name}.{os.getpid()}.tmp")
            try:
                tmp.write_bytes(data)
                os.replace(tmp, name)
            except OSError:
                tmp.unlink(missing_ok=True)
        return data

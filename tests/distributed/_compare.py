"""Exact comparison of two HDF5 files (every dataset, and the attributes that are not per-run)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np

#: attributes that differ between any two runs (a fresh id, where and how it ran)
PER_RUN = ("store_id", "provenance", "args")


def h5_differences(a: Path, b: Path, skip_attrs: Iterable[str] = PER_RUN) -> list[str]:
    """What differs between files ``a`` and ``b``: dataset names, shapes, dtypes, chunks, bytes, attrs."""
    import h5py

    out: list[str] = []
    skip = set(skip_attrs)
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        names_a, names_b = [], []
        fa.visit(names_a.append)
        fb.visit(names_b.append)
        if sorted(names_a) != sorted(names_b):
            out.append(f"members: {sorted(set(names_a) ^ set(names_b))}")
        for name in [""] + sorted(set(names_a) & set(names_b)):
            x, y = (fa[name], fb[name]) if name else (fa, fb)
            for key in sorted(set(x.attrs) | set(y.attrs)):
                if key in skip:
                    continue
                va, vb = x.attrs.get(key), y.attrs.get(key)
                if not np.array_equal(np.asarray(va), np.asarray(vb)):
                    out.append(f"{name or '/'} attr {key}: {va!r} vs {vb!r}")
            if isinstance(x, h5py.Dataset):
                if (x.shape, x.dtype, x.chunks) != (y.shape, y.dtype, y.chunks):
                    out.append(f"{name}: {(x.shape, x.dtype, x.chunks)} vs {(y.shape, y.dtype, y.chunks)}")
                    continue
                u, v = x[()], y[()]
                if isinstance(u, np.ndarray) and u.dtype.kind != "O":
                    same = u.tobytes() == v.tobytes()       # bit for bit (NaN included)
                else:
                    same = np.asarray(u).tolist() == np.asarray(v).tolist()
                if not same:
                    out.append(f"{name}: values differ")
    return out

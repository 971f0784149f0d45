"""Progress bars on stderr (tqdm), silenced with ``enabled=False`` or ``NEUROSEM_NO_PROGRESS=1``."""
from __future__ import annotations

import os
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def progress(iterable: Iterable[T], total: int | None = None, desc: str = "",
             enabled: bool = True, unit: str = "it") -> Iterator[T]:
    """Wrap ``iterable`` in a tqdm bar on stderr when enabled and not switched off by the env."""
    if not enabled or os.environ.get("NEUROSEM_NO_PROGRESS"):
        yield from iterable
        return
    from tqdm.auto import tqdm

    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    # One explicit iterator: handing tqdm a DataLoader lets it start a second one (a second
    # shuffle draw and a second set of workers), which would make results depend on the bar.
    with tqdm(iter(iterable), total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False) as bar:
        yield from bar

"""Progress on stderr, silenced with ``enabled=False`` or ``NEUROSEM_NO_PROGRESS=1``.

On a terminal (or in Jupyter) a tqdm bar; when stderr is a file or a pipe, a plain line now and
then instead (a bar would fill the file with carriage returns), e.g.
``record resnet18: 120/400 batch (30%), 61 s``.
"""
from __future__ import annotations

import os
import sys
import time
from typing import IO, Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")


def progress(iterable: Iterable[T], total: int | None = None, desc: str = "",
             enabled: bool = True, unit: str = "it", interval: float = 30.0,
             stream: IO[str] | None = None, clock: Callable[[], float] = time.monotonic) -> Iterator[T]:
    """Wrap ``iterable`` in progress reporting on ``stream`` (default: stderr).

    Args:
        interval: seconds between two plain lines when ``stream`` is not a terminal; a last line
            when the loop ends is written only if an earlier one was (short loops stay silent).
        clock: the time source of the plain lines (seconds).
    """
    if not enabled or os.environ.get("NEUROSEM_NO_PROGRESS"):
        yield from iterable
        return
    out = sys.stderr if stream is None else stream
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if not _is_terminal(out):
        yield from _plain(iterable, total, desc, unit, interval, out, clock)
        return
    from tqdm.auto import tqdm

    # One explicit iterator: handing tqdm a DataLoader lets it start a second one (a second
    # shuffle draw and a second set of workers), which would make results depend on the bar.
    with tqdm(iter(iterable), total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False,
              file=out) as bar:
        yield from bar


def _is_terminal(stream: IO[str]) -> bool:
    """A terminal, or a Jupyter kernel (whose stderr is no tty but shows tqdm's widget)."""
    if "ipykernel" in sys.modules:
        return True
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except ValueError:  # a closed stream
        return False


def _plain(iterable: Iterable[T], total: int | None, desc: str, unit: str, interval: float,
           out: IO[str], clock: Callable[[], float]) -> Iterator[T]:
    """Yield from ``iterable``, writing ``desc: n/total unit (p%), s s`` at most every ``interval`` seconds."""
    start = last = clock()
    n = 0
    wrote = False

    def line(now: float, done: bool = False) -> None:
        of = f"/{total}" if total else ""
        pct = f" ({100 * n // total}%)" if total else ""
        out.write(f"{desc + ': ' if desc else ''}{n}{of} {unit}{pct}, {now - start:.0f} s"
                  f"{' - done' if done else ''}\n")
        out.flush()

    for item in iterable:
        yield item
        n += 1
        now = clock()
        if now - last >= interval:
            line(now)
            last, wrote = now, True
    if wrote:
        line(clock(), done=True)

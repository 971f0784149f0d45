"""The run directory: every stage reads and writes one folder (default ``runs/<model>``).

``run.json`` holds the provenance of each stage under its own key (``record``, ``dissect``,
``embed``, ...) and the list of commands run. Files live at fixed names, see :class:`RunDir`.

A process that writes a run holds :meth:`RunDir.lock` (an exclusive ``fcntl.flock`` on
``.neurosem.lock`` in the run directory, or an ``O_EXCL`` lock file where there is no ``fcntl``),
so a second writer stops with one line instead of deleting or renaming the first one's files.
:func:`check_free_space` and :func:`is_disk_full` turn a full disk into a one-line
:class:`~neurosem.errors.DiskFullError` that gives the space needed and the space free.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from neurosem.errors import DiskFullError, NeurosemError, RunLockedError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

RUNS_ROOT = Path("runs")


@dataclass(frozen=True)
class RunDir:
    """Paths of one run directory.

    Example:
        >>> run = RunDir(Path("runs/resnet18"))
        >>> run.activations.name
        'activations.h5'
    """

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def meta_file(self) -> Path:
        return self.path / "run.json"

    @property
    def activations(self) -> Path:
        return self.path / "activations.h5"

    @property
    def dissection(self) -> Path:
        return self.path / "dissect.h5"

    @property
    def dissect_dir(self) -> Path:
        return self.path / "dissect"

    @property
    def embedding(self) -> Path:
        return self.path / "embedding.h5"

    @property
    def figures(self) -> Path:
        return self.path / "figures"

    @property
    def lock_file(self) -> Path:
        return self.path / ".neurosem.lock"

    @contextmanager
    def lock(self, stage: str, flock: bool | None = None) -> Iterator[None]:
        """Hold the run for writing while the block runs; a second holder gets :class:`RunLockedError`.

        Args:
            stage: what holds it (``"record"``), named in the other process's error.
            flock: use ``fcntl.flock`` (default: where available); else an ``O_EXCL`` lock file,
                removed on exit (a crash leaves it: the error then says to delete it). A run
                directory where the lock file cannot be made (read-only) is not locked.

        Example:
            >>> with RunDir(Path("runs/resnet18")).lock("record"):  # doctest: +SKIP
            ...     ...  # create, rename or delete the run's files
        """
        self.ensure()
        use_flock = fcntl is not None if flock is None else flock
        held = f"{os.getpid()} {stage}\n".encode()
        if use_flock:
            try:
                fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                    raise
                yield  # a run nobody may write to: nothing to guard (writing there fails by itself)
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    os.close(fd)
                    raise
                owner = os.read(fd, 200).decode(errors="replace")
                os.close(fd)
                raise self._locked(owner, stale_hint=False) from None
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, held, 0)
                yield
            finally:
                os.ftruncate(fd, 0)  # the file stays (unlinking a flock file races with a new holder)
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
            return
        try:
            fd = os.open(self.lock_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                owner = self.lock_file.read_text(errors="replace")
            except OSError:
                owner = ""
            raise self._locked(owner, stale_hint=True) from None
        try:
            os.write(fd, held)
            os.close(fd)
            yield
        finally:
            try:
                self.lock_file.unlink()
            except FileNotFoundError:
                pass

    def _locked(self, owner: str, stale_hint: bool) -> RunLockedError:
        pid, _, stage = owner.strip().partition(" ")
        who = f"`neurosem {stage or 'record'}` (pid {pid})" if pid.isdigit() else "another neurosem process"
        stale = f"; if none is running, delete {self.lock_file}" if stale_hint else ""
        return RunLockedError(f"{self.path} is being written by {who}: wait for it to finish or choose "
                              f"another --run{stale}")

    def ensure(self) -> "RunDir":
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    def read_meta(self) -> dict[str, Any]:
        """The parsed ``run.json`` (an empty dict when there is none)."""
        if not self.meta_file.exists():
            return {}
        try:
            meta = json.loads(self.meta_file.read_text())
        except json.JSONDecodeError as exc:
            raise NeurosemError(
                f"{self.meta_file} is not valid JSON ({exc.msg}); fix or delete it") from None
        if not isinstance(meta, dict):
            raise NeurosemError(f"{self.meta_file} holds a JSON {type(meta).__name__}, not an object "
                                "({\"record\": ...}); fix or delete it")
        return meta

    def update_meta(self, section: str, values: dict[str, Any]) -> None:
        """Replace ``run.json[section]`` with ``values`` (atomically) and record the command line."""
        self.ensure()
        meta = self.read_meta()
        meta[section] = values
        meta.setdefault("commands", []).append(
            {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "stage": section, "argv": sys.argv[1:]})
        tmp = self.meta_file.with_suffix(".json.tmp")
        text = json.dumps(meta, indent=2, default=str)
        try:
            tmp.write_text(text)
            os.replace(tmp, self.meta_file)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if is_disk_full(exc):
                raise disk_full_error(self.meta_file, len(text.encode())) from None
            raise


def default_run_name(model: str) -> str:
    """``runs/<name>`` for a model spec.

    ``resnet18``, ``zoo:resnet8x4`` -> the model name; ``path/my_net.py:build`` and
    ``pkg.my_net:build`` -> the file's name ``my_net``; ``<pkg.mod.Net>`` (a module given from
    Python) -> the class name ``Net``.
    """
    kind, sep, rest = model.partition(":")
    if model.startswith("<") and model.endswith(">"):
        name = model[1:-1].rsplit(".", 1)[-1]
    elif sep and kind in ("zoo", "cifar", "tv", "torchvision"):
        name = rest
    elif ":" in model:
        target = model.rpartition(":")[0]
        name = Path(target).stem if target.endswith(".py") or "/" in target or "\\" in target \
            else target.rsplit(".", 1)[-1]
    else:
        name = model
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name) or "run"


def resolve_run(run: "RunDir | str | Path | None", model: str | None = None, must_exist: bool = False) -> RunDir:
    """Pick the run directory a command works in.

    ``run`` given: that directory. Else ``runs/<model>`` when a model is given. Else the only run
    under ``runs/``; when there are several, the error lists them and asks for ``--run``.
    """
    if isinstance(run, RunDir):
        rd = run
    elif run is not None:
        rd = RunDir(Path(run))
    elif model is not None:
        rd = RunDir(RUNS_ROOT / default_run_name(model))
    else:
        found = sorted(p for p in RUNS_ROOT.glob("*") if (p / "run.json").exists()) if RUNS_ROOT.is_dir() else []
        if not found:
            raise NeurosemError(
                "no run found under runs/: pass --run DIR, or start one with `neurosem record MODEL --data PATH`")
        if len(found) > 1:
            listed = ", ".join(str(p) for p in found)
            raise NeurosemError(f"several runs under runs/ ({listed}): choose one with --run DIR")
        rd = RunDir(found[0])
    if must_exist and not rd.path.is_dir():
        raise NeurosemError(f"run directory {rd.path} does not exist: check --run, or run `neurosem record` first")
    return rd


def is_disk_full(exc: BaseException) -> bool:
    """Whether an error is "no space left on device" (h5py reports it as OSError or RuntimeError)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return True
    text = str(exc)
    return isinstance(exc, (OSError, RuntimeError)) and (
        f"errno = {errno.ENOSPC}," in text or "No space left on device" in text)


def format_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'`` (binary units, one decimal).

    Example:
        >>> format_bytes(3 * 2 ** 30)
        '3.0 GiB'
    """
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def free_space(path: "str | Path") -> int:
    """Free bytes on the file system holding ``path`` (or its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return int(shutil.disk_usage(p).free)


def disk_full_error(path: "str | Path", needed: int, done: str = "") -> DiskFullError:
    """The one-line error for ``needed`` bytes that do not fit next to ``path``."""
    where = Path(path).parent
    return DiskFullError(f"not enough disk space for {path}: it needs {format_bytes(needed)} more, "
                         f"{format_bytes(free_space(where))} are free on {where}{done}; free space "
                         "(or write the run elsewhere with --run DIR) and run the same command again")


def check_free_space(path: "str | Path", needed: int, done: str = "") -> None:
    """Raise :class:`DiskFullError` (before anything is written) when ``needed`` bytes do not fit."""
    if needed > free_space(Path(path).parent):
        raise disk_full_error(path, needed, done)

"""The run directory: every stage reads and writes one folder (default ``runs/<model>``).

``run.json`` holds the provenance of each stage under its own key (``record``, ``dissect``,
``embed``, ...) and the list of commands run. Files live at fixed names, see :class:`RunDir`.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neurosem.errors import NeurosemError

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
        tmp.write_text(json.dumps(meta, indent=2, default=str))
        os.replace(tmp, self.meta_file)


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

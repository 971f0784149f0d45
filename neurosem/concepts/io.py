"""``concepts.h5`` and ``concepts/<layer>.csv``: the concept vectors of a run, written and read back.

Layout of ``concepts.h5``: attrs ``format``, ``args`` (JSON: the settings, the Broden set, the
split); ``concepts/{number, name, category, kind}`` (``kind``: pixel or image); per layer
``layers/<layer>/{W [K, C], b [K], score [K], unit_score [K], best_unit [K], units_90 [K],
alpha [K], loss [epochs], norm_mean [C], norm_std [C], threshold [C]}``.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from neurosem.concepts.data import Concepts
from neurosem.concepts.train import LayerConcepts
from neurosem.errors import NeurosemError

FORMAT = "neurosem-concepts-1"
CSV_COLUMNS = ("concept", "category", "iou_vector", "iou_best_unit", "best_unit", "units_90")
_ARRAYS = ("W", "b", "score", "unit_score", "best_unit", "units_90", "alpha", "norm_mean", "norm_std", "threshold")


def write_concepts(path: Path, args: dict[str, Any], concepts: Concepts, layers: dict[str, LayerConcepts]) -> Path:
    """Write ``concepts.h5`` at ``path`` (into a temporary file renamed into place)."""
    import h5py

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = FORMAT
            f.attrs["args"] = json.dumps(args)
            g = f.create_group("concepts")
            g["number"] = concepts.numbers
            for key, values in (("name", concepts.names), ("category", concepts.categories),
                                ("kind", ["pixel" if p else "image" for p in concepts.pixel])):
                g.create_dataset(key, data=np.array(values, dtype=object), dtype=h5py.string_dtype())
            lg = f.create_group("layers")
            for name, r in layers.items():
                d = lg.create_group(name)
                for key in _ARRAYS:
                    d[key] = np.asarray(getattr(r, key))
                d["loss"] = np.asarray(r.loss, dtype=np.float64)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_layer_csv(path: Path, cv: "ConceptVectors", layer: str) -> Path:
    """``concepts/<layer>.csv`` with :data:`CSV_COLUMNS` (image concepts: AP in the IoU columns)."""
    r = cv.layer(layer)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(CSV_COLUMNS)
        for k, name in enumerate(cv.concepts.names):
            w.writerow([name, cv.concepts.categories[k], f"{r.score[k]:.4f}", f"{r.unit_score[k]:.4f}",
                        int(r.best_unit[k]), int(r.units_90[k])])
    return path


class ConceptVectors:
    """``concepts.h5`` read back (everything loaded, the file closed).

    Attributes:
        path, args, concepts (:class:`~neurosem.concepts.data.Concepts`), layers (names).

    Example:
        >>> cv = load_concepts("runs/resnet18")          # doctest: +SKIP
        >>> cv.layer("layer4").W.shape                    # doctest: +SKIP
        (480, 512)
    """

    def __init__(self, path: Path) -> None:
        import h5py

        self.path = Path(path)
        try:
            with h5py.File(self.path, "r") as f:
                if f.attrs.get("format") != FORMAT:
                    raise KeyError("format")
                self.args: dict[str, Any] = json.loads(f.attrs["args"])
                g = f["concepts"]

                def strs(key: str) -> list[str]:
                    return [v.decode() if isinstance(v, bytes) else str(v) for v in g[key][()]]

                kinds = strs("kind")
                self.concepts = Concepts(np.asarray(g["number"][()], dtype=np.int64), strs("name"),
                                         strs("category"), np.array([k == "pixel" for k in kinds], dtype=bool))
                self._layers: dict[str, LayerConcepts] = {}
                for name, d in f["layers"].items():
                    vals = {key: d[key][()] for key in _ARRAYS}
                    self._layers[name] = LayerConcepts(loss=d["loss"][()].tolist(), **vals)
        except (OSError, KeyError, ValueError) as exc:
            raise NeurosemError(f"{self.path} is not a readable concepts file ({type(exc).__name__}: {exc}); "
                                "rerun `neurosem concepts --broden PATH`") from None
        order = self.args.get("layers", [])
        self.layers: list[str] = [n for n in order if n in self._layers] + \
            [n for n in self._layers if n not in order]

    def layer(self, name: str) -> LayerConcepts:
        """The vectors of ``name``; a one-line error naming the layers that have them."""
        if name not in self._layers:
            raise NeurosemError(f"layer {name!r} has no concept vectors in {self.path} (layers with vectors: "
                                f"{', '.join(self.layers)}); run `neurosem concepts --broden PATH --layers {name}`")
        return self._layers[name]

    def index(self, name: str) -> int:
        """The row of concept ``name``; a one-line error listing the closest names."""
        import difflib

        if name in self.concepts.names:
            return self.concepts.names.index(name)
        close = difflib.get_close_matches(name, self.concepts.names, n=5, cutoff=0.5)
        raise NeurosemError(f"no concept {name!r} among the {len(self.concepts)} concept vectors of {self.path}"
                            + (f"; closest: {', '.join(close)}" if close else ""))

    def __repr__(self) -> str:
        return f"ConceptVectors({str(self.path)!r}, layers={self.layers}, {len(self.concepts)} concepts)"


def load_concepts(run_or_path: Any) -> ConceptVectors:
    """The concept vectors of a run directory (or a ``concepts.h5`` path).

    Example:
        >>> load_concepts("runs/resnet18").layers          # doctest: +SKIP
        ['layer3', 'layer4']
    """
    p = Path(getattr(run_or_path, "path", run_or_path))
    path = p if p.suffix == ".h5" else p / "concepts.h5"
    if not path.is_file():
        raise NeurosemError(f"no concept vectors at {path}: run `neurosem concepts --broden PATH --run {path.parent}`")
    return ConceptVectors(path)

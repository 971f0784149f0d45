"""Formulas and significance for every unit of a dissection: the driver and its outputs.

:func:`explain_layers` runs after the dissection's passes (``neurosem dissect --formulas N``):
it builds the label table of the dissected images once, each layer's unit masks
(:func:`~neurosem.dissect.formulas.unit_points`), the beam search per unit and, with
``permutations > 0``, the permutation p-values (:mod:`neurosem.dissect.significance`).
:func:`write_formulas` writes ``dissect/<layer>_formulas.csv`` and ``.json``::

    unit,formula,iou_formula,iou_single,p_value,single,iou_label,p_value_label

``formula``/``iou_formula``: the best formula and its formula IoU; ``single``/``iou_single``: the
best single label under the same formula IoU; ``p_value``: the formula's permutation p-value;
``iou_label``/``p_value_label``: the dissection's best NetDissect IoU and its p-value. The JSON
holds the same rows, the options and, per layer, ``interpretable`` (best IoU >= the IoU threshold),
``interpretable_bh`` (of those, the units whose ``p_value_label`` passes Benjamini–Hochberg at
``alpha``) and ``formulas_bh`` (units whose formula p-value passes it).
"""
from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from neurosem.errors import NeurosemError


@dataclass
class ExplainOptions:
    """``formulas``: the most labels per formula (0: no search); ``beam``: the beam width;
    ``min_images``: a label is a candidate when it occurs in at least this many images;
    ``permutations``: R (0: no p-values); ``seed``: of the permutations; ``alpha``: BH's FDR."""

    formulas: int = 3
    beam: int = 5
    min_images: int = 10
    permutations: int = 100
    seed: int = 0
    alpha: float = 0.05

    def check(self) -> None:
        if int(self.formulas) < 0:
            raise NeurosemError(f"--formulas {self.formulas}: the most labels per formula must be >= 1 (0: none)")
        if int(self.beam) < 1:
            raise NeurosemError(f"--beam {self.beam}: the beam width must be >= 1 (default 5)")
        if int(self.min_images) < 1:
            raise NeurosemError(f"--min-images {self.min_images}: must be >= 1 (default 10)")
        if int(self.permutations) < 0:
            raise NeurosemError(f"--permutations {self.permutations}: must be >= 0 (default 100; 0: no p-values)")
        if not 0.0 < float(self.alpha) < 1.0:
            raise NeurosemError(f"alpha {self.alpha} is out of range: use 0 < alpha < 1 (default 0.05)")


@dataclass
class LayerExplanation:
    """One layer's rows (dicts with the CSV's columns) and counts."""

    layer: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    interpretable: int = 0
    interpretable_bh: int | None = None
    formulas_bh: int | None = None
    candidates: int = 0


def explain_layers(store: Any, names: Sequence[str], source: Any, ds: Any, thresholds: dict[str, np.ndarray],
                   label_numbers: np.ndarray, best_iou: dict[str, np.ndarray], iou_threshold: float,
                   options: ExplainOptions, batch_size: int = 16, progress: bool = False
                   ) -> dict[str, LayerExplanation]:
    """Formulas and p-values of every unit of ``names``.

    Args:
        store: the open activation store; names: layers; source: the
            :class:`~neurosem.dissect.passes.LabelSource`; ds: the Broden dataset;
        thresholds: per layer ``[C]`` exact thresholds; label_numbers: the dissection's columns;
        best_iou: per layer ``[C]`` the dissection's best IoU; iou_threshold: interpretable at >=;
        options: :class:`ExplainOptions`; batch_size: images per mask batch; progress: a bar.
    """
    from neurosem._progress import progress as bar
    from neurosem.dissect.formulas import (FormulaStats, beam_search, build_label_table, candidate_labels,
                                           formula_string, unit_points)
    from neurosem.dissect.significance import benjamini_hochberg, label_ious, permutations, unit_pvalues

    options.check()
    n = store.n_done
    primary = np.asarray(ds.primary_category, dtype=np.int64)
    table = build_label_table(source, n, primary, len(ds.categories))
    stats = FormulaStats(table)
    cands = candidate_labels(table, options.min_images) if options.formulas > 0 else None
    perms = permutations(n, int(options.permutations), int(options.seed))
    cols = np.asarray(label_numbers, dtype=np.int64)
    names_of = list(ds.label_names)
    out: dict[str, LayerExplanation] = {}
    for layer in names:
        pts = unit_points(store, layer, thresholds[layer], tuple(ds.seg_size), batch_size)
        res = LayerExplanation(layer=layer, candidates=0 if cands is None else int(cands.size))
        for u in bar(range(len(pts)), total=len(pts), desc=f"explain {layer}", enabled=progress, unit="unit"):
            p = pts[u]
            row: dict[str, Any] = {"unit": u, "formula": "", "iou_formula": None, "iou_single": None,
                                   "p_value": None, "single": ""}
            if cands is not None:
                ex = beam_search(table.sets[p], stats, cands, int(options.formulas), int(options.beam))
                row.update(formula=formula_string(ex.formula, names_of), iou_formula=ex.iou,
                           iou_single=ex.iou_single, single=names_of[ex.single] if ex.single >= 0 else "-")
            if perms.shape[0]:
                pv = unit_pvalues(table, stats, p, perms, cols, cands, int(options.formulas), int(options.beam))
                row.update(p_value=pv["p_formula"], iou_label=pv["iou_label"], p_value_label=pv["p_label"])
            else:
                iou = label_ious(table, p, table.raw[p], cols)
                row.update(iou_label=float(iou.max()) if iou.size else 0.0, p_value_label=None)
            res.rows.append(row)
        keep = np.asarray(best_iou[layer]) >= np.float32(iou_threshold)
        res.interpretable = int(keep.sum())
        if perms.shape[0]:
            pl = np.array([r["p_value_label"] for r in res.rows], dtype=np.float64)
            res.interpretable_bh = int((benjamini_hochberg(pl, options.alpha) & keep).sum())
            if cands is not None:
                pf = np.array([r["p_value"] for r in res.rows], dtype=np.float64)
                res.formulas_bh = int(benjamini_hochberg(pf, options.alpha).sum())
        out[layer] = res
    return out


def run_explain(store: Any, names: Sequence[str], ds: Any, source: Any, layers: Sequence[Any],
                label_numbers: np.ndarray, iou_threshold: float, options: ExplainOptions, out_dir: Path,
                progress: bool = False) -> tuple[dict[str, LayerExplanation], list[str]]:
    """:func:`explain_layers` on the dissected ``layers``
    (:class:`~neurosem.dissect.report.LayerDissection`) of ``names``, then :func:`write_formulas`
    for each; returns the results and the CSV paths."""
    by_name = {ld.layer: ld for ld in layers}
    thresholds = {name: by_name[name].threshold for name in names}
    best = {name: by_name[name].best_iou for name in names}
    results = explain_layers(store, names, source, ds, thresholds, label_numbers, best, iou_threshold, options,
                             progress=progress)
    paths = [str(write_formulas(out_dir, results[name], options)[0]) for name in names]
    return results, paths


COLUMNS = ("unit", "formula", "iou_formula", "iou_single", "p_value", "single", "iou_label", "p_value_label")


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6f}"
    return str(v)


def write_formulas(out_dir: Path, res: LayerExplanation, options: ExplainOptions,
                   baseline: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """``<layer>_formulas.csv`` and ``<layer>_formulas.json`` in ``out_dir``."""
    from neurosem.dissect.report_html import layer_html_name

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = layer_html_name(res.layer)[:-len(".html")] + "_formulas"
    csv_path, json_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.json"
    with open(csv_path, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(COLUMNS)
        for r in res.rows:
            w.writerow([_fmt(r.get(c)) for c in COLUMNS])
    doc = {"layer": res.layer, "options": asdict(options), "candidates": res.candidates,
           "interpretable": res.interpretable, "interpretable_bh": res.interpretable_bh,
           "formulas_bh": res.formulas_bh, "units": res.rows}
    if baseline is not None:
        doc["baseline"] = baseline
    json_path.write_text(json.dumps(doc, indent=1))
    return csv_path, json_path


def summary_lines(results: dict[str, LayerExplanation], options: ExplainOptions) -> list[str]:
    """What ``neurosem dissect --formulas`` prints per layer."""
    lines = []
    for layer, res in results.items():
        parts = [f"{layer}: {res.interpretable} interpretable"]
        if res.interpretable_bh is not None:
            parts.append(f"{res.interpretable_bh} after Benjamini-Hochberg at {options.alpha:g} "
                         f"({options.permutations} permutations)")
        if res.formulas_bh is not None:
            parts.append(f"{res.formulas_bh} units with a significant formula")
        lines.append("  " + ", ".join(parts))
    return lines


# ------------------------------------------------------------------------------------ the baseline
def check_baseline(baseline: str | None, model: Any) -> None:
    """Refuse an unknown ``--baseline`` (only ``random``) in one line."""
    if baseline in (None, "", "none"):
        return
    if baseline != "random":
        raise NeurosemError(f"--baseline {baseline!r} is unknown: the baseline is 'random' (the same architecture "
                            "with random weights)")


def random_model(model: Any, provenance: dict[str, Any]) -> Any:
    """The same architecture as ``model`` (a spec, a :class:`~neurosem.models.LoadedModel`, or
    ``None``: the recorded one) with random weights, the same every time (seeded)."""
    import copy

    from neurosem.models import LoadedModel, load_model

    if model is None:
        spec = provenance.get("model")
        if not spec:
            raise NeurosemError("--baseline random needs the model: pass MODEL (the activations do not name it)")
        model = str(spec)
    if isinstance(model, str):
        return load_model(model, weights="none", warn=False)
    if not isinstance(model, LoadedModel):
        raise NeurosemError("--baseline random needs a model spec or a LoadedModel")
    import torch

    net = copy.deepcopy(model.model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for m in net.modules():
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                reset()
    return LoadedModel(model=net, spec=model.spec, weights="random", mean=model.mean, std=model.std,
                       input_size=model.input_size, default_layers=model.default_layers)


def run_baseline(dis: Any, rd: Any, model: Any, broden: Any, names: Sequence[str], **kw: Any) -> dict[str, Any]:
    """Dissect the random-weights model on the same images into ``<run>/baseline-random`` and write
    ``dissect/baseline_random.json``: per layer the interpretable units of both (by category)."""
    from neurosem.dissect.run import dissect

    prov = {"model": dis.args.get("activations", {}).get("model")}
    base = dissect(run=rd.path / "baseline-random", broden=broden, model=random_model(model, prov),
                   layers=list(names), report=False, **kw)
    doc: dict[str, Any] = {"dissection": str(base.path), "layers": {}}
    for layer in names:
        doc["layers"][layer] = {
            "units": dis.n_units(layer),
            "model": {"interpretable": int(dis.interpretable(layer).sum()), "by_category": dis.counts(layer)},
            "random": {"interpretable": int(base.interpretable(layer).sum()), "by_category": base.counts(layer)},
        }
    out = rd.dissect_dir / "baseline_random.json"
    out.write_text(json.dumps(doc, indent=1))
    doc["json"] = str(out)
    return doc


def report_lines(dis: Any) -> list[str]:
    """The lines ``neurosem dissect`` prints after the dissection's summary: per layer the
    interpretable units after BH, and the random baseline's counts (when computed)."""
    lines: list[str] = []
    explained = getattr(dis, "explained", None)
    if explained:
        opts = ExplainOptions(**dis.explain_options) if hasattr(dis, "explain_options") else None
        lines.append("formulas and significance:")
        lines += summary_lines(explained, opts or ExplainOptions())
    base = getattr(dis, "baseline", None)
    if base:
        lines.append("baseline (the same architecture, random weights, same images):")
        for layer, d in base["layers"].items():
            lines.append(f"  {layer}: {d['random']['interpretable']}/{d['units']} units interpretable "
                         f"(the model: {d['model']['interpretable']})")
    return lines

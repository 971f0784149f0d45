"""The analysis commands that compute and draw: ``neurosem kl`` and ``neurosem query``.

They sit above :mod:`.kl`, :mod:`.query` and :mod:`.figures` (the CLI path), so that the figures
depend on the metric and the queries and never the reverse: nothing but this module and the CLI
imports :mod:`.figures` to write a figure on the way.

Example:
    >>> print(kl_report("runs/resnet18"))                             # doctest: +SKIP
    >>> print(query_report("runs/resnet18", "layer4:312", k=3))       # doctest: +SKIP
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from neurosem.analysis.kl import format_kl_table, kl_curves
from neurosem.analysis.query import (expression, format_table, load_run_dissection, load_run_embedding,
                                     parse_query, query, run_dir, unit_info)
from neurosem.errors import NeurosemError
from neurosem.run import RunDir


def kl_report(run: Any = None, layer: str | None = None, as_json: bool = False,
              formats: Sequence[str] = ("pdf", "png", "svg"), dpi: int = 300, progress: bool = True) -> str:
    """``neurosem kl``: compute the curves, write kl.json, kl.csv and ``figures/kl_curves.*``.

    Returns the text to print: the table and the written files, or the JSON with ``as_json``.
    """
    from neurosem.analysis._plotstyle import save_figure
    from neurosem.analysis.figures import kl_figure

    rd = run_dir(run)
    if layer and layer != "mean":  # refused before anything is computed or written
        dissected = load_run_dissection(rd, required_for="kl").layers
        names = [n for n in load_run_embedding(rd).layers if n in dissected]
        if layer not in names:
            raise NeurosemError(f"no KL curve for layer {layer!r}: choose one of {', '.join(names)}, or mean")
    result = kl_curves(rd, progress=progress)
    fig = kl_figure(result, layers=[layer] if layer else None)
    paths = save_figure(fig, rd.figures / "kl_curves", formats, dpi=dpi)
    if as_json:
        return json.dumps(result, indent=2)
    files = [rd.path / "kl.json", rd.path / "kl.csv", *paths]
    return format_kl_table(result) + "\nwrote: " + ", ".join(str(p) for p in files)


def query_report(run: "RunDir | str | Path | None", neuron: str, add: Sequence[str] = (), sub: Sequence[str] = (),
                 k: int = 5, as_json: bool = False, figure: "str | Path | None" = None) -> str:
    """``neurosem query``: the table (or JSON with ``as_json``), and the figure when ``figure`` is a path."""
    q, adds, subs = parse_query(neuron, add, sub)
    rd = run_dir(run)
    results = query(rd, q, adds, subs, k=k)
    dissection = load_run_dissection(rd)
    operands = [{"neuron": str(n), "role": role, **unit_info(dissection, n.layer, n.index)}
                for role, group in (("query", [q]), ("add", adds), ("sub", subs)) for n in group]
    written: list[Path] = []
    if figure is not None:
        from neurosem.analysis.figures import query_figure

        written = query_figure(rd, q, adds, subs, figure)
    expr = expression(q, adds, subs)
    if as_json:
        payload = {"run": str(rd.path), "expression": expr, "k": k, "operands": operands, "results": results}
        if written:
            payload["figure"] = [str(p) for p in written]
        return json.dumps(payload, indent=2)

    def describe(op: dict[str, Any]) -> str:
        if "label" in op:
            return f"{op['neuron']} ({op['label']}, {op['category']}, IoU {op['iou']:.3f})"
        return op["neuron"]

    title = f"nearest units to {expr} by semantic-vector cosine in {rd.path}"
    text = format_table(results, title=title)
    if len(operands) > 1 or "label" in operands[0]:
        text += "\noperands: " + "; ".join(describe(op) for op in operands)
    if written:
        text += "\nfigure: " + ", ".join(str(p) for p in written)
    return text

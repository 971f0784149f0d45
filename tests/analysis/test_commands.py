"""The commands that compute and draw (`neurosem kl`, `neurosem query --figure`) and the import
direction: the figures depend on kl and query, never the reverse."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from neurosem.analysis import commands
from neurosem.errors import NeurosemError

from .test_kl import _tiny_run

ANALYSIS = Path(commands.__file__).parent


def test_kl_report_writes_table_json_and_figure(tmp_path):
    run, *_ = _tiny_run(tmp_path)
    text = commands.kl_report(run, formats=("png",), dpi=40)
    assert "l1" in text and "upper bound" in text and "kl.json" in text
    # every printed number is kl.json's, rounded as printed
    saved = json.loads((run / "kl.json").read_text())
    rows = {line.split()[0]: line.split() for line in text.splitlines()[3:] if line.split()[0] in ("l1", "l2", "mean")}
    for name, lay in list(saved["layers"].items()) + [("mean", saved["mean"])]:
        ub = lay["upper_bound"]["kl"] if isinstance(lay["upper_bound"], dict) else lay["upper_bound"]
        expected = [f"{lay['embedding'][0]:.4f}", f"{lay['embedding'][-1]:.4f}", f"{lay['random']['mean']:.4f}",
                    "±", f"{lay['random']['std']:.4f}", f"{ub:.4f}"]
        assert rows[name][1:] == expected, name
    assert (run / "figures" / "kl_curves.png").exists()
    out = json.loads(commands.kl_report(run, layer="l2", as_json=True, formats=("png",), dpi=40))
    assert out["layers"]["l2"]["embedding"] == json.loads((run / "kl.json").read_text())["layers"]["l2"]["embedding"]
    with pytest.raises(NeurosemError, match="l1, l2"):
        commands.kl_report(run, layer="nope", formats=("png",), dpi=40)


def _imports(path: Path, top_level_only: bool = False) -> set[str]:
    """Modules ``path`` imports (``from a.b import c`` gives ``a.b`` and ``a.b.c``)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
    return out


def test_figures_depend_on_kl_and_query_never_the_reverse():
    figures, cmds = "neurosem.analysis.figures", "neurosem.analysis.commands"
    for low in ("kl", "query", "masks", "maps", "defaults", "_plotstyle"):
        imported = _imports(ANALYSIS / f"{low}.py")
        assert figures not in imported and cmds not in imported, low
    # the style module is the bottom: it imports no other analysis module
    assert not {m for m in _imports(ANALYSIS / "_plotstyle.py") if m.startswith("neurosem.analysis")}
    # nothing imports the figures at module level (the CLI path imports them when a command runs)
    package = ANALYSIS.parent
    for path in package.rglob("*.py"):
        assert figures not in _imports(path, top_level_only=True), path


def test_no_seaborn_in_the_analysis():
    for path in ANALYSIS.glob("*.py"):
        assert not any(m.split(".")[0] == "seaborn" for m in _imports(path)), path


def test_query_report_writes_the_figure(tmp_path):
    from .test_figures import _make_run

    run, *_ = _make_run(tmp_path)
    text = commands.query_report(run, "layer4:11", k=2, figure=tmp_path / "nb.svg")
    assert (tmp_path / "nb.svg").exists() and text.endswith(f"figure: {tmp_path / 'nb.svg'}")
    payload = json.loads(commands.query_report(run, "layer4:11", k=2, as_json=True, figure=tmp_path / "nb.png"))
    assert payload["figure"] == [str(tmp_path / "nb.png")]
    with pytest.raises(NeurosemError, match="unknown figure format 'gif'"):
        commands.query_report(run, "layer4:11", figure=tmp_path / "nb.gif")

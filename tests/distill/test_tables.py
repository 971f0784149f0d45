"""Seeds and Table-1-style summaries: hand-computed means, sample stds, paired t-tests."""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest

from neurosem.distill import tables as TB
from neurosem.errors import NeurosemError


def _run(root: Path, name: str, method: str, seed: int, last: float, best: float, teacher="resnet32x4",
         student="resnet8x4", status="complete") -> Path:
    p = root / name / f"s{seed}"
    p.mkdir(parents=True)
    cfg = {"teacher": None if method == "ce" else teacher, "student": student, "method": method, "seed": seed}
    (p / "distill.json").write_text(json.dumps({"status": status, "config": cfg, "final_acc": last,
                                                "best_acc": best, "teacher_acc": None if method == "ce" else 79.4}))
    return p


@pytest.fixture
def runs(tmp_path):
    for s, (l, b) in enumerate([(72.0, 72.5), (72.4, 72.6), (71.8, 72.0)]):
        _run(tmp_path, "ce", "ce", s, l, b)
    for s, (l, b) in enumerate([(73.0, 73.5), (73.5, 73.6), (73.1, 73.4)]):
        _run(tmp_path, "kd", "kd", s, l, b)
    for s, (l, b) in enumerate([(75.0, 75.2), (75.9, 76.0), (75.3, 75.5)]):
        _run(tmp_path, "crd", "crd", s, l, b)
    _run(tmp_path, "crd", "crd", 3, 10.0, 10.0, status="running")     # unfinished: left out
    return tmp_path


def _t_test(d):
    """Paired t-test by hand; p from Student's t with n - 1 = 2 degrees of freedom (closed form)."""
    n = len(d)
    m = sum(d) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in d) / (n - 1))
    t = m / (sd / math.sqrt(n))
    assert n == 3   # for 2 degrees of freedom: P(|T| > t) = 1 - t / sqrt(2 + t^2)
    return m, 1 - abs(t) / math.sqrt(2 + t * t)


def test_summary_rows_hold_hand_computed_statistics(runs):
    loaded, unfinished = TB.load_runs([runs / "ce", runs / "kd", runs / "crd"])
    assert len(loaded) == 9 and unfinished == [runs / "crd" / "s3"]
    rows = {r.method: r for r in TB.summarize(loaded)}
    assert list(rows) == ["ce", "crd", "kd"]      # CE first, then the pair's methods by name
    crd = rows["crd"]
    assert crd.seeds == [0, 1, 2] and crd.last_mean == pytest.approx(75.4)
    assert crd.last_std == pytest.approx(math.sqrt(((75.0 - 75.4) ** 2 + 0.5 ** 2 + 0.1 ** 2) / 2))
    assert crd.best_mean == pytest.approx((75.2 + 76.0 + 75.5) / 3)
    d, p = _t_test([75.0 - 72.0, 75.9 - 72.4, 75.3 - 71.8])
    assert crd.diffs["ce_last"][0] == pytest.approx(d) and crd.diffs["ce_last"][1] == pytest.approx(p, rel=1e-9)
    d, p = _t_test([75.0 - 73.0, 75.9 - 73.5, 75.3 - 73.1])
    assert crd.diffs["kd_last"] == (pytest.approx(d), pytest.approx(p, rel=1e-9))
    d, p = _t_test([75.2 - 73.5, 76.0 - 73.6, 75.5 - 73.4])
    assert crd.diffs["kd_best"] == (pytest.approx(d), pytest.approx(p, rel=1e-9))
    assert "ce_last" not in rows["ce"].diffs and "kd_last" not in rows["kd"].diffs and "ce_last" in rows["kd"].diffs
    assert crd.teacher_acc == pytest.approx(79.4) and rows["ce"].teacher_acc is None


def test_paired_needs_two_pairs_and_spread():
    assert TB.paired({0: 1.0}, {0: 0.5}) == (0.5, None)
    assert TB.paired({0: 1.0, 1: 2.0}, {0: 0.0, 1: 1.0}) == (1.0, None)     # equal differences: no p
    assert TB.paired({0: 1.0}, {1: 0.5}) == (None, None)


def test_tables_in_three_formats(runs, tmp_path):
    paths = TB.write_table_from_runs([runs / "ce", runs / "kd", runs / "crd"], tmp_path / "out")
    assert [p.name for p in paths] == ["table.csv", "table.md", "table.tex"]
    rows = list(csv.DictReader(io.StringIO(paths[0].read_text())))
    crd = next(r for r in rows if r["method"] == "crd")
    assert float(crd["last_mean"]) == pytest.approx(75.4) and crd["n"] == "3" and crd["seeds"] == "0 1 2"
    md = paths[1].read_text()
    d, p = _t_test([75.0 - 72.0, 75.9 - 72.4, 75.3 - 71.8])
    assert f"| resnet32x4 → resnet8x4 | crd | 3 | 75.40 ± {crd_std():.2f} |" in md
    assert f"+{d:.2f} (p {p:.3f})" in md and "last epoch (CRD)" in md and "best epoch" in md
    tex = paths[2].read_text()
    assert r"75.40 $\pm$ " in tex and r"\begin{tabular}" in tex and "resnet32x4 $\\rightarrow$ resnet8x4" in tex


def crd_std():
    return math.sqrt(((75.0 - 75.4) ** 2 + 0.5 ** 2 + 0.1 ** 2) / 2)


def test_messages(tmp_path):
    with pytest.raises(NeurosemError, match="no finished distill runs"):
        TB.load_runs([tmp_path])
    with pytest.raises(NeurosemError, match="--seeds takes"):
        TB.parse_seeds("0,a")
    with pytest.raises(NeurosemError, match="distinct"):
        TB.parse_seeds("1,1")
    assert TB.parse_seeds("0, 1,2") == [0, 1, 2]
    _run(tmp_path, "a", "kd", 0, 1.0, 1.0)
    _run(tmp_path, "b", "kd", 0, 2.0, 2.0)
    with pytest.raises(NeurosemError, match="share a seed"):
        TB.summarize(TB.load_runs([tmp_path / "a", tmp_path / "b"])[0])


def test_cli_distill_table(runs, tmp_path, capsys):
    from neurosem.cli import main

    main(["distill-table", str(runs / "ce"), str(runs / "kd"), str(runs / "crd"), "--out", str(tmp_path / "t")])
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / "t" / n) for n in TB.TABLE_FILES]

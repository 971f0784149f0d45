"""Runs over seeds and Table-1-style summaries of finished distill runs.

:func:`distill_seeds` runs (or resumes) one run per seed in ``<group>/s<seed>`` and writes the
summary; :func:`write_table_from_runs` rebuilds it from finished runs (``neurosem distill-table``).
A summary row is one (teacher, student, method) over its seeds: the last-epoch accuracy (the CRD
paper's convention) and the best-epoch accuracy (later work's), each mean ± sample std, and the
paired differences (same seeds) against CE of the same student and KD of the same pair, with the
two-sided p-value of a paired t-test (``None`` below two pairs or when every difference is equal).
Written as ``table.csv`` (full precision), ``table.md`` and ``table.tex`` (two decimals).
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from neurosem.errors import NeurosemError

RESULTS = "distill.json"
TABLE_FILES = ("table.csv", "table.md", "table.tex")


@dataclass(frozen=True)
class RunResult:
    """One finished run: its pair, method, seed and accuracies (%)."""

    teacher: str | None
    student: str
    method: str
    seed: int
    last: float
    best: float
    teacher_acc: float | None = None


@dataclass
class Row:
    """One (teacher, student, method) over seeds; ``d_*``/``p_*``: paired difference and p-value."""

    teacher: str | None
    student: str
    method: str
    seeds: list[int]
    last_mean: float
    last_std: float | None
    best_mean: float
    best_std: float | None
    teacher_acc: float | None = None
    diffs: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2" -> [0, 1, 2]`` (distinct integers)."""
    try:
        seeds = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise NeurosemError(f"--seeds takes comma-separated integers such as 0,1,2, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise NeurosemError(f"--seeds takes distinct comma-separated integers such as 0,1,2, got {text!r}")
    return seeds


def load_runs(paths: Sequence[str | Path]) -> tuple[list[RunResult], list[Path]]:
    """Finished runs under ``paths`` (run folders, or folders whose subfolders are runs);
    also returns the unfinished ones, which are left out."""
    found: list[Path] = []
    for p in map(Path, paths):
        if (p / RESULTS).exists():
            found.append(p)
        else:
            found += sorted(c for c in p.iterdir() if (c / RESULTS).exists()) if p.is_dir() else []
    runs, unfinished = [], []
    for p in found:
        r = json.loads((p / RESULTS).read_text())
        if r.get("status") != "complete" or r.get("final_acc") is None:
            unfinished.append(p)
            continue
        c = r["config"]
        runs.append(RunResult(c.get("teacher"), c["student"], c["method"], int(c["seed"]),
                              float(r["final_acc"]), float(r["best_acc"]), r.get("teacher_acc")))
    if not runs:
        raise NeurosemError(f"no finished distill runs under {', '.join(map(str, paths))} "
                            "(a run folder holds distill.json with status complete)")
    return runs, unfinished


def _mean_std(v: Sequence[float]) -> tuple[float, float | None]:
    m = sum(v) / len(v)
    if len(v) < 2:
        return m, None
    return m, math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))


def paired(a: dict[int, float], b: dict[int, float]) -> tuple[float | None, float | None]:
    """Mean of ``a[s] - b[s]`` over the common seeds and its paired t-test p-value (two-sided)."""
    common = sorted(set(a) & set(b))
    if not common:
        return None, None
    d = [a[s] - b[s] for s in common]
    m, sd = _mean_std(d)
    if sd is None or sd == 0:
        return m, None
    from scipy import stats

    t = m / (sd / math.sqrt(len(d)))
    return m, float(2 * stats.t.sf(abs(t), df=len(d) - 1))


def summarize(runs: Sequence[RunResult]) -> list[Row]:
    """One :class:`Row` per (teacher, student, method), CE rows first (CE has no teacher)."""
    groups: dict[tuple[str | None, str, str], list[RunResult]] = {}
    for r in runs:
        key = (None if r.method == "ce" else r.teacher, r.student, r.method)
        groups.setdefault(key, []).append(r)
    for key, rs in groups.items():
        seeds = [r.seed for r in rs]
        if len(set(seeds)) != len(seeds):
            raise NeurosemError(f"two runs of {key[2]} {key[0] or ''} -> {key[1]} share a seed "
                                f"({sorted(seeds)}): pass each run once")
    by = {k: ({r.seed: r.last for r in rs}, {r.seed: r.best for r in rs}) for k, rs in groups.items()}
    rows = []
    for (teacher, student, method), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0] or "",
                                                                               kv[0][2] != "ce", kv[0][2])):
        lm, ls = _mean_std([r.last for r in rs])
        bm, bs = _mean_std([r.best for r in rs])
        t_acc = [r.teacher_acc for r in rs if r.teacher_acc is not None]
        row = Row(teacher, student, method, sorted(r.seed for r in rs), lm, ls, bm, bs,
                  sum(t_acc) / len(t_acc) if t_acc else None)
        last, best = by[(teacher, student, method)]
        for ref, key in (("ce", (None, student, "ce")), ("kd", (teacher, student, "kd"))):
            if method != ref and key in by:
                row.diffs[f"{ref}_last"] = paired(last, by[key][0])
                row.diffs[f"{ref}_best"] = paired(best, by[key][1])
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------
# writers

COLUMNS = ["teacher", "student", "method", "n", "seeds", "teacher_acc", "last_mean", "last_std", "best_mean",
           "best_std", "d_ce_last", "p_ce_last", "d_ce_best", "p_ce_best", "d_kd_last", "p_kd_last",
           "d_kd_best", "p_kd_best"]


def _cells(row: Row) -> dict[str, Any]:
    out: dict[str, Any] = {"teacher": row.teacher or "", "student": row.student, "method": row.method,
                           "n": len(row.seeds), "seeds": " ".join(map(str, row.seeds)), "teacher_acc": row.teacher_acc,
                           "last_mean": row.last_mean, "last_std": row.last_std, "best_mean": row.best_mean,
                           "best_std": row.best_std}
    for k in ("ce_last", "ce_best", "kd_last", "kd_best"):
        d, p = row.diffs.get(k, (None, None))
        out[f"d_{k}"], out[f"p_{k}"] = d, p
    return out


def to_csv(rows: Sequence[Row]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None else v) for k, v in _cells(r).items()})
    return buf.getvalue()


def _acc(m: float, s: float | None, pm: str) -> str:
    return f"{m:.2f}" if s is None else f"{m:.2f} {pm} {s:.2f}"


def _diff(d: float | None, p: float | None) -> str:
    if d is None:
        return ""
    return f"{d:+.2f}" + ("" if p is None else f" (p {p:.3f})")


_HEAD = ["teacher → student", "method", "n", "last epoch (CRD)", "best epoch", "Δ CE last", "Δ KD last",
         "Δ CE best", "Δ KD best"]


def _table_cells(r: Row, pm: str) -> list[str]:
    pair = f"{r.teacher} → {r.student}" if r.teacher else r.student
    return [pair, r.method, str(len(r.seeds)), _acc(r.last_mean, r.last_std, pm), _acc(r.best_mean, r.best_std, pm)] + \
        [_diff(*r.diffs.get(k, (None, None))) for k in ("ce_last", "kd_last", "ce_best", "kd_best")]


def to_markdown(rows: Sequence[Row]) -> str:
    lines = ["Top-1 test accuracy (%), mean ± std over seeds. *last epoch*: CRD's convention; *best epoch*: "
             "later work's. Δ: paired difference (same seeds) against CE of the student and KD of the pair, "
             "p: paired t-test (two-sided).", "",
             "| " + " | ".join(_HEAD) + " |", "| " + " | ".join(["---"] * 2 + ["---:"] * 7) + " |"]
    lines += ["| " + " | ".join(_table_cells(r, "±")) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_latex(rows: Sequence[Row]) -> str:
    esc = lambda t: t.replace("_", r"\_").replace("→", r"$\rightarrow$").replace("Δ", r"$\Delta$")  # noqa: E731
    lines = [r"% top-1 accuracy (%), mean $\pm$ std over seeds; last epoch: CRD's convention; best epoch: later work's;",
             r"% Delta: paired difference against CE / KD (same seeds), p: paired t-test",
             r"\begin{tabular}{llrrrrrrr}", r"\toprule", " & ".join(esc(h) for h in _HEAD) + r" \\", r"\midrule"]
    lines += [" & ".join(esc(c) for c in _table_cells(r, r"$\pm$")) + r" \\" for r in rows]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def write_tables(rows: Sequence[Row], out: str | Path) -> list[Path]:
    """``table.csv``, ``table.md``, ``table.tex`` in ``out``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in zip(TABLE_FILES, (to_csv(rows), to_markdown(rows), to_latex(rows))):
        (out / name).write_text(text)
        paths.append(out / name)
    return paths


def write_table_from_runs(paths: Sequence[str | Path], out: str | Path | None = None) -> list[Path]:
    """Summarise the finished runs under ``paths`` into ``out`` (default: the first path)."""
    runs, _ = load_runs(paths)
    return write_tables(summarize(runs), Path(out) if out is not None else Path(paths[0]))


# ------------------------------------------------------------------------------------------------
# seeds

def _group_name(student: str, method: str, teacher: str | None) -> str:
    return "-".join([student, method] + ([teacher] if teacher and method != "ce" else []))


def distill_seeds(seeds: Sequence[int], run: str | Path | None = None, **kwargs: Any) -> dict[str, Any]:
    """Run (or resume) ``distill(seed=s, run=<group>/s<s>)`` for every seed and write the summary of
    the group, with the CE and KD groups of the same student/pair found beside it (``<group>/..``),
    into ``<group>``. ``kwargs``: :func:`neurosem.distill.train.distill`'s arguments."""
    from neurosem.distill.train import distill
    from neurosem.run import RUNS_ROOT

    student, method, teacher = kwargs["student"], kwargs["method"], kwargs.get("teacher")
    group = Path(run) if run is not None else RUNS_ROOT / _group_name(student, method, teacher)
    results = [distill(seed=int(s), run=group / f"s{s}", **kwargs) for s in seeds]
    from neurosem.distributed import is_quiet_rank

    if is_quiet_rank():     # under torchrun rank 0 writes the summary
        return {"runs": [r["run"] for r in results], "final_acc": [r["final_acc"] for r in results],
                "best_acc": [r["best_acc"] for r in results], "tables": []}
    refs = [group.parent / _group_name(student, "ce", None), group.parent / _group_name(student, "kd", teacher)]
    runs, _ = load_runs([group] + [r for r in refs if r.is_dir() and r.resolve() != group.resolve()])
    tables = write_tables(summarize(runs), group)
    return {"runs": [r["run"] for r in results], "final_acc": [r["final_acc"] for r in results],
            "best_acc": [r["best_acc"] for r in results], "tables": [str(p) for p in tables]}


def distill_cli(seeds: str | None = None, **kwargs: Any) -> dict[str, Any]:
    """What ``neurosem distill`` prints: one run's accuracies, or (``seeds``) every seed's and the tables."""
    if seeds is None:
        from neurosem.distill.train import distill

        r = distill(**kwargs)
        return {k: r[k] for k in ("final_acc", "best_acc", "results_path") if k in r}
    kwargs.pop("seed", None)
    return distill_seeds(parse_seeds(seeds), **kwargs)

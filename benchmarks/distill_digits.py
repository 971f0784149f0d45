"""Offline distillation experiment on scikit-learn's bundled digits: does SKD transfer knowledge?

Setup (everything through the real pipeline: ``neurosem.distill.train.distill``,
``neurosem.embed.embed``):

- data: the 1,797 8x8 digits, upsampled bilinearly to 32x32 RGB and written in the CIFAR-100
  pickle format (labels 0..9). A fixed stratified split: a *small labelled student split*
  (20 images per class), a teacher split (the student's images + 80 more per class), and the
  remaining ~800 images as the common test set. The CIFAR augmentation (crop, flip) applies.
- teacher: resnet20 trained with cross-entropy on the teacher split (CRD protocol, shortened).
- teacher vectors: ``neurosem.embed.embed`` (the ``fit`` trainer, K = 16) on the teacher's
  activations of the student's training images at its three stage ends, once at tau = 1 and
  once at the smaller tau used by the second SKD run (vectors fitted at the tau they are used at).
- student: resnet8 (stages 16/32/64, as resnet20's), trained on the student split only, with CE,
  KD, SKD (tau = 1 and tau small), SKD with random vectors, RKD, PKT, SP, CC, IEPKT and IEPKT with
  its black-box term (CRD protocol shortened, CRD's loss weights, SKD's beta 0.5, IEPKT's weights
  1 and its GNN stage scaled as its 20 : 100 epochs, i.e. 6 GNN epochs before 30 student epochs).
  The teacher's knowledge reaches the student only through those 200 images (KD, the relation
  methods, IEPKT) or through the vectors (SKD).
- seeds: every method runs with the same seeds (student init, data order, augmentation); each
  method is paired with CE of the same seed: mean +- sd of the final test accuracy (last epoch, no
  selection on the test set), the mean paired difference, wins, and the paired t-test p-value
  (``scipy.stats.ttest_rel``).

Runs go to parallel worker processes with one thread each (``--jobs``, default 2).
Batch 16 for teacher and students (the CRD protocol's 64 leaves 3 steps per epoch on 200 images);
otherwise the CRD protocol (SGD 0.05, momentum 0.9, wd 5e-4) with its milestones scaled to the
epochs. Full: 5 seeds, 30 student epochs, 20 teacher epochs (designed for about 15 minutes on 2
idle cores). ``--quick``: 2 seeds, 3 epochs (about a minute; a smoke test, its numbers mean
nothing). Prints a markdown table for the README.

``--rows iepkt,iepkt-bb`` runs only those rows (and CE, their pair): the runs are seeded, so each
row's numbers do not depend on which others run beside it.

Usage: python benchmarks/distill_digits.py [--quick] [--seeds 5] [--epochs 40] [--jobs 2] [--out DIR]
       [--rows kd,iepkt]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

TEACHER, STUDENT = "resnet20", "resnet8"
PER_CLASS_STUDENT, PER_CLASS_TEACHER_EXTRA = 20, 80
SPLIT_SEED = 2024
SMALL_TAU = 0.1
# (label, method, temperature); "skd" rows use vectors embedded at that temperature
ROWS = [("CE", "ce", None), ("KD", "kd", None), ("SKD (tau=1)", "skd", 1.0),
        (f"SKD (tau={SMALL_TAU})", "skd", SMALL_TAU), ("SKD, random vectors", "skd-random", 1.0),
        ("RKD", "rkd", None), ("PKT", "pkt", None), ("SP", "sp", None), ("CC", "cc", None),
        ("IEPKT", "iepkt", None), ("IEPKT + black box", "iepkt-bb", None)]
#: IEPKT's GNN epochs per student epoch (its code: 20 before 100)
IEPKT_INIT_RATIO = 20 / 100


# ------------------------------------------------------------------------------------------------
# data

def write_digits(root: Path) -> dict[str, Any]:
    """Write ``root/teacher`` and ``root/student`` (CIFAR-100 format) with a shared test set."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    from neurosem.data.cifar import write_cifar

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0          # [N, 1, 8, 8]
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    img = (x.clamp(0, 1) * 255).round().to(torch.uint8).repeat(1, 3, 1, 1).permute(0, 2, 3, 1).numpy()
    y = digits.target.astype(int)
    rng = np.random.default_rng(SPLIT_SEED)
    student, extra, test = [], [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        student += list(idx[:PER_CLASS_STUDENT])
        extra += list(idx[PER_CLASS_STUDENT:PER_CLASS_STUDENT + PER_CLASS_TEACHER_EXTRA])
        test += list(idx[PER_CLASS_STUDENT + PER_CLASS_TEACHER_EXTRA:])
    student, teacher, test = sorted(student), sorted(student + extra), sorted(test)
    classes = [str(i) for i in range(10)] + [f"unused{i}" for i in range(10, 100)]
    for name, train in (("student", student), ("teacher", teacher)):
        write_cifar(root / name, (img[train], y[train].tolist()), (img[test], y[test].tolist()),
                    name="cifar100", classes=classes)
    return {"n_student": len(student), "n_teacher": len(teacher), "n_test": len(test)}


# ------------------------------------------------------------------------------------------------
# worker tasks (one thread each)

def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)
    os.environ["NEUROSEM_NO_PROGRESS"] = "1"


def train_teacher_task(root: str, out: str, epochs: int, batch_size: int) -> dict[str, Any]:
    from neurosem.distill.train import train_teacher

    t0 = time.perf_counter()
    res = train_teacher(TEACHER, f"cifar100:{root}", protocol="crd", epochs=epochs, seed=0, device="cpu",
                        run=out, batch_size=batch_size, num_workers=0, progress=False)
    return {"weights": res["weights_path"], "final_acc": res["final_acc"], "seconds": time.perf_counter() - t0}


def embed_task(weights: str, data_root: str, out: str, temperature: float) -> dict[str, Any]:
    from neurosem.distill import zoo
    from neurosem.embed import embed, load_embedding

    t0 = time.perf_counter()
    path = embed(model=TEACHER, data=f"cifar100:{data_root}", run=out, layers=zoo.ALIGNED_LAYERS[TEACHER],
                 dim=16, trainer="fit", temperature=temperature, seed=0, device="cpu",
                 weights=weights, progress=False)
    emb = load_embedding(path)
    return {"path": str(path), "final_loss": emb.final_loss, "seconds": time.perf_counter() - t0}


def student_task(label: str, method: str, temperature: float | None, seed: int, data_root: str, out: str,
                 epochs: int, batch_size: int, teacher_weights: str | None, teacher_vectors: str | None
                 ) -> dict[str, Any]:
    from neurosem.distill.train import distill

    t0 = time.perf_counter()
    init = max(1, round(epochs * IEPKT_INIT_RATIO)) if method in ("iepkt", "iepkt-bb") else None
    res = distill(teacher=TEACHER, student=STUDENT, method=method, data=f"cifar100:{data_root}",
                  protocol="crd", epochs=epochs, seed=seed, device="cpu", run=out, batch_size=batch_size,
                  temperature=temperature or 1.0, teacher_weights=teacher_weights,
                  teacher_vectors=teacher_vectors, num_workers=0, progress=False, init_epochs=init)
    return {"label": label, "method": method, "seed": seed, "final_acc": res["final_acc"],
            "best_acc": res["best_acc"], "epoch_time": res["mean_epoch_time"],
            "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------------
# statistics and the table

def summarize(results: list[dict[str, Any]], seeds: list[int], table: list[tuple] | None = None) -> list[dict[str, Any]]:
    from scipy.stats import ttest_rel

    acc = {(r["label"], r["seed"]): r["final_acc"] for r in results}
    ce = np.array([acc[("CE", s)] for s in seeds])
    rows = []
    for label, method, _ in table or ROWS:
        a = np.array([acc[(label, s)] for s in seeds])
        d = a - ce
        row = {"label": label, "method": method, "mean": a.mean(), "sd": a.std(ddof=1) if len(a) > 1 else 0.0,
               "diff": d.mean(), "diff_sd": d.std(ddof=1) if len(d) > 1 else 0.0,
               "wins": int((d > 0).sum()), "ties": int((d == 0).sum()), "n": len(seeds), "p": None,
               "epoch_time": float(np.mean([r["epoch_time"] for r in results if r["label"] == label]))}
        if method != "ce" and len(seeds) > 1 and np.any(d != 0):
            row["p"] = float(ttest_rel(a, ce).pvalue)
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| student resnet8, method | test acc. % (mean ± sd) | Δ vs CE, paired (mean ± sd) | better than CE | p (paired t) | s / epoch |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r["method"] == "ce":
            lines.append(f"| {r['label']} | {r['mean']:.2f} ± {r['sd']:.2f} | — | — | — | {r['epoch_time']:.2f} |")
            continue
        p = "—" if r["p"] is None else (f"{r['p']:.3f}" if r["p"] >= 0.001 else f"{r['p']:.1e}")
        lines.append(f"| {r['label']} | {r['mean']:.2f} ± {r['sd']:.2f} | {r['diff']:+.2f} ± {r['diff_sd']:.2f} "
                     f"| {r['wins']}/{r['n']} | {p} | {r['epoch_time']:.2f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 seeds, 3 epochs: a smoke test of about a minute")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (default 5; quick 2)")
    ap.add_argument("--epochs", type=int, default=None, help="student epochs (default 30; quick 3)")
    ap.add_argument("--teacher-epochs", type=int, default=None, help="default 20; quick 2")
    ap.add_argument("--batch-size", type=int, default=16, help="for teacher and students (tiny splits)")
    ap.add_argument("--jobs", type=int, default=2, help="parallel worker processes, one thread each")
    ap.add_argument("--out", default=None, help="keep the runs here (default: a temporary folder)")
    ap.add_argument("--device", default="cpu", help="only cpu: the runs are sized for CPU workers")
    ap.add_argument("--rows", default=None, help="comma-separated methods to run (CE always; default: every row)")
    args = ap.parse_args(argv)
    wanted = None if args.rows is None else {"ce", *args.rows.split(",")}
    table = [r for r in ROWS if wanted is None or r[1] in wanted]
    if wanted is not None and not wanted <= {r[1] for r in ROWS}:
        print(f"--rows: unknown {', '.join(sorted(wanted - {r[1] for r in ROWS}))}", file=sys.stderr)
        return 2
    if args.device not in ("cpu", "auto"):
        print("this experiment runs on CPU worker processes; use --device cpu", file=sys.stderr)
        return 2
    n_seeds = args.seeds or (2 if args.quick else 5)
    epochs = args.epochs or (3 if args.quick else 30)
    t_epochs = args.teacher_epochs or (2 if args.quick else 20)
    bs = args.batch_size
    seeds = list(range(n_seeds))

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["NEUROSEM_NO_PROGRESS"] = "1"
    tmp = None
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="neurosem-digits-")
        out = Path(tmp.name)
    t_start = time.perf_counter()
    sizes = write_digits(out / "data")
    student_root, teacher_root = str(out / "data" / "student"), str(out / "data" / "teacher")

    import multiprocessing as mp

    results: list[dict[str, Any]] = []
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn"),
                             initializer=_init_worker) as pool:
        teacher_f = pool.submit(train_teacher_task, teacher_root, str(out / "teacher"), t_epochs, bs)

        def student(label: str, method: str, tau: float | None, seed: int, weights: str | None = None,
                    vectors: str | None = None) -> Future:
            run = out / "runs" / f"{method}{'' if tau in (None, 1.0) else f'-tau{tau}'}-s{seed}"
            return pool.submit(student_task, label, method, tau, seed, student_root, str(run), epochs, bs,
                               weights, vectors)

        # runs that need no teacher start while it trains
        futures = [student(label, m, tau, s) for s in seeds for label, m, tau in table if m in ("ce", "skd-random")]
        teacher = teacher_f.result()
        emb_f = {tau: pool.submit(embed_task, teacher["weights"], student_root, str(out / f"embed-tau{tau}"), tau)
                 for tau in (1.0, SMALL_TAU) if any(r[1] == "skd" for r in table)}
        futures += [student(label, m, tau, s, weights=teacher["weights"]) for s in seeds
                    for label, m, tau in table if m not in ("ce", "skd-random", "skd")]
        embeddings = {tau: f.result() for tau, f in emb_f.items()}
        futures += [student(label, m, tau, s, vectors=embeddings[tau]["path"]) for s in seeds
                    for label, m, tau in table if m == "skd"]
        results = [f.result() for f in futures]
    wall = time.perf_counter() - t_start

    rows = summarize(results, seeds, table)
    report = {"setup": {"teacher": TEACHER, "student": STUDENT, "seeds": seeds, "epochs": epochs,
                        "teacher_epochs": t_epochs, "batch_size": bs, "split": sizes, "small_tau": SMALL_TAU, "jobs": args.jobs},
              "teacher": teacher, "embeddings": embeddings, "runs": results, "summary": rows,
              "wall_seconds": wall}
    (out / "digits_results.json").write_text(json.dumps(report, indent=2, default=float))

    print(f"# digits distillation: {TEACHER} (teacher split {sizes['n_teacher']} images) -> {STUDENT} "
          f"(student split {sizes['n_student']} images), test {sizes['n_test']} images")
    print(f"# {len(seeds)} seeds, {epochs} student epochs, {t_epochs} teacher epochs (CRD protocol scaled, "
          f"batch {bs}), "
          f"{args.jobs} workers x 1 thread{'  [--quick: smoke test only]' if args.quick else ''}")
    emb_note = (f"; embedding loss tau=1: {embeddings[1.0]['final_loss']:.4f}, tau={SMALL_TAU}: "
                f"{embeddings[SMALL_TAU]['final_loss']:.4f}") if embeddings else ""
    print(f"# teacher test accuracy {teacher['final_acc']:.2f}%{emb_note}")
    print()
    print(markdown(rows))
    print()
    print(f"wall time {wall / 60:.1f} min; results in {out / 'digits_results.json'}"
          f"{' (temporary, pass --out to keep)' if tmp else ''}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

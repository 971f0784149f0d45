"""Benchmark: formula search and permutation p-values (``dissect --formulas``), and the
extrapolation to ResNet18 ``layer4`` on all of Broden.

Data: a synthetic Broden-format set at broden1_224 geometry (224-pixel images, 112 x 112 label
maps, all six categories), ResNet18 with random weights recorded on it (``layer4``, 512 x 7 x 7,
float16), dissected at q = 0.005. Measured, in this process, after one warm-up dissection:

- the label table (every label pixel of the images, :func:`build_label_table`);
- the unit masks (the kernels' exact masks, :func:`unit_points`);
- the beam search of every unit (N = 3 labels, beam 5, candidates in >= ``--min-images`` images):
  formulas per second (one formula = one unit explained);
- the permutation p-values of ``--p-units`` units with ``--permutations`` R (label and formula).

Extrapolation to ResNet18 layer4 on Broden (63,305 images, 512 units, 1,197 labels): every cost
here grows in proportion to the label pixels it visits, which grow with the number of images (a
unit's mask holds q of its upsampled pixels on every image; a formula's pixels are its labels'
pixels), so the times are scaled by ``63,305 / images``; the units are the same 512. A second,
fitted estimate splits each unit's time into a fixed part and a part per mask pixel (least squares
over the units) and scales only the latter and the table scans with the images. Both assume
Broden's labels are as dense per image as the synthetic ones (4 pixel planes + 2 image labels per
image); Broden has more labels, so more candidates per beam step (a vector of ``candidates`` IoUs
per formula and op: a small cost next to the bincounts over mask pixels).

Usage: python benchmarks/formulas.py [--images 200] [--permutations 100] [--p-units 8] [--min-images 10]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BRODEN_IMAGES = 63305
BRODEN_LABELS = 1197


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--permutations", type=int, default=100)
    ap.add_argument("--p-units", type=int, default=8, help="units whose p-values are timed")
    ap.add_argument("--min-images", type=int, default=10)
    ap.add_argument("--keep", default=None, help="a folder for the data (kept between runs)")
    args = ap.parse_args()

    from neurosem.data.broden import BrodenDataset
    from neurosem.data.synthetic import write_synthetic_broden
    from neurosem.dissect import dissect
    from neurosem.dissect.formulas import (FormulaStats, beam_search, build_label_table, candidate_labels,
                                           unit_points)
    from neurosem.dissect.passes import LabelSource
    from neurosem.dissect.significance import permutations, unit_pvalues
    from neurosem.store import ActivationStore

    root = Path(args.keep or tempfile.mkdtemp(prefix="neurosem-formulas-"))
    broden, run = root / f"broden{args.images}", root / f"run{args.images}"
    os.environ.setdefault("NEUROSEM_CACHE_DIR", str(root / "cache"))
    if not (broden / "index.csv").exists():
        write_synthetic_broden(broden, n_images=args.images, image_size=224, seg_size=112, seed=0)
    if not (run / "activations.h5").exists():
        subprocess.run([sys.executable, "-m", "neurosem", "record", "resnet18", "--weights", "none", "--data",
                        str(broden), "--run", str(run), "--layers", "layer4", "--quiet"], check=True)
    dis = dissect(run=run, broden=broden, layers=["layer4"], device="cpu", progress=False, report=False)
    ds = BrodenDataset(broden)
    from neurosem.data.label_cache import open_label_cache

    source = LabelSource(ds, open_label_cache(ds, progress=False))
    n = len(ds)
    t0 = time.perf_counter()
    table = build_label_table(source, n, np.asarray(ds.primary_category), len(ds.categories))
    t_table = time.perf_counter() - t0
    with ActivationStore.open(run / "activations.h5") as st:
        t0 = time.perf_counter()
        pts = unit_points(st, "layer4", dis.threshold("layer4", exact=True), tuple(ds.seg_size))
        t_masks = time.perf_counter() - t0
    cands = candidate_labels(table, args.min_images)
    stats = FormulaStats(table)
    per_unit = np.zeros(len(pts))
    t0 = time.perf_counter()
    for u, p in enumerate(pts):
        a, s0 = time.perf_counter(), stats.seconds
        beam_search(table.sets[p], stats, cands, 3, 5)
        per_unit[u] = time.perf_counter() - a - (stats.seconds - s0)       # the unit's own work
    t_search = time.perf_counter() - t0
    t_scan = stats.seconds
    n_formula_stats = stats.computed
    perms = permutations(n, args.permutations, seed=0)
    pick = np.argsort([-p.size for p in pts])[::max(1, len(pts) // max(1, args.p_units))][:args.p_units]
    p_unit = np.zeros(len(pick))
    scan_before = stats.seconds
    for k, u in enumerate(pick):
        a, s0 = time.perf_counter(), stats.seconds
        unit_pvalues(table, stats, pts[u], perms, dis.label_numbers, cands, 3, 5)
        p_unit[k] = time.perf_counter() - a - (stats.seconds - s0)
    t_p = (p_unit.sum() + stats.seconds - scan_before) / max(1, len(pick))

    points = np.array([p.size for p in pts])
    scale = BRODEN_IMAGES / n
    units = len(pts)
    print(f"data: {n} synthetic images at 224 px (labels 112 x 112), {table.n_labels - 1} labels, "
          f"{cands.size} candidates (in >= {args.min_images} images); ResNet18 layer4 (random weights), "
          f"{units} units, q = 0.005")
    print(f"mask pixels per unit: mean {points.mean():.0f} (max {points.max()}) "
          f"= {points.mean() / (n * table.pixels):.4f} of the label pixels")
    print(f"label table   {t_table:7.2f} s  ({table.raw.nbytes / 1e6:.0f} MB)")
    print(f"unit masks    {t_masks:7.2f} s")
    print(f"beam search   {t_search:7.2f} s  for {units} units: {units / t_search:.1f} formulas/s "
          f"({n_formula_stats} formula counts computed, cached across units)")
    print(f"p-values      {t_p:7.2f} s  per unit with R = {args.permutations} (label and formula statistics, "
          f"{len(pick)} units timed)")
    total = t_table + t_masks + t_search
    print(f"extrapolated to ResNet18 layer4 on Broden ({BRODEN_IMAGES} images, x{scale:.0f} pixels, "
          f"{units} units), same machine and threads:")
    print(f"  formulas (table + masks + search): {total * scale / 60:8.1f} min "
          f"({units / (t_search * scale):.2f} formulas/s)")
    print(f"  p-values, R = {args.permutations}, all units: {t_p * units * scale / 3600:8.1f} h")
    # a fixed cost per unit plus a cost per mask pixel (least squares over the units): only the
    # second grows with the images; the table scans (formula counts) grow with the images too
    fit = np.polyfit(points, per_unit, 1)
    fit_p = np.polyfit(points[pick], p_unit, 1) if len(pick) > 1 else np.array([p_unit.mean() / max(1, points[pick].mean()), 0.0])
    search_fit = units * max(fit[1], 0.0) + max(fit[0], 0.0) * points.sum() * scale + t_scan * scale
    p_fit = units * max(fit_p[1], 0.0) + max(fit_p[0], 0.0) * points.sum() * scale
    print(f"  fitted instead (per unit {fit[1] * 1e3:.2f} ms + {fit[0] * 1e9:.1f} ns per mask pixel; only the pixels "
          f"and the table scans ({t_scan:.2f} s here) grow with the images):")
    print(f"    formulas: {(t_table + t_masks) * scale / 60 + search_fit / 60:8.1f} min; p-values, R = "
          f"{args.permutations}: {p_fit / 3600:8.1f} h (per unit {fit_p[1]:.3f} s + {fit_p[0] * 1e6:.2f} us per pixel)")
    print(f"  label table in memory: {table.raw.nbytes * 2 * scale / 1e9:.0f} GB (raw + sets)")


if __name__ == "__main__":
    main()

"""Benchmark: the exact ``fit`` trainer against the paper's SGD protocol, and a temperature sweep.

Both trainers read the same stored activations (``activations.h5``) and start from the same
initialisation; their final loss is eq. 1 on the full data (P-bar), computed the same way.

- ``fit``: one streaming pass over the store accumulates P-bar (float64), then full-batch L-BFGS.
- ``paper``: SGD lr 0.1, momentum 0.9, weight decay 5e-4, batch 64, 100 epochs, x0.1 after epochs
  50/75/90, on mini-batches read from the store (P_n recomputed every epoch, as in the paper).

Target: ``fit`` reaches the same or a lower loss in >= 20x less time.

The activations: by default a store of random-but-structured activations with ResNet18's layer
shapes (units in groups that mix the same latent maps, so there is a neighbour structure to find);
``--model resnet18`` records a model with random weights on a synthetic Broden set instead.

The tau sweep prints, per tau, the spread of P-bar (row entropy / log C, the mean diagonal and the
mean largest off-diagonal probability), the fit loss, and how the neighbour structure changes:
top-5 neighbours (cosine of S, self excluded) against the top-5 of P-bar's rows, against the
neighbours found at tau = 1, and against those of a second seed (how well the loss pins them down).

Usage: python benchmarks/embed.py [--quick] [--device auto] [--model resnet18] [--keep DIR]
"""
from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from neurosem._device import resolve_device
from neurosem._embed_train import store_epoch_batches, train_fit, train_paper
from neurosem.embed import PbarAccumulator, cosine_matrix
from neurosem.store import ActivationStore

RESNET18 = {"layer1": (64, 4), "layer2": (128, 8), "layer3": (256, 16), "layer4": (512, 32)}  # C, stride


def structured_store(path: Path, n: int, size: int, seed: int = 0, batch: int = 64) -> list[str]:
    """Write ``n`` images of structured activations with ResNet18's shapes at input ``size``."""
    g = torch.Generator().manual_seed(seed)
    shapes, mixes = {}, {}
    for layer, (c, stride) in RESNET18.items():
        hw = max(2, size // stride)
        shapes[layer] = (c, hw, hw)
        n_lat, groups = 24, max(4, c // 8)
        protos = (torch.rand(groups, n_lat, generator=g) < 0.15).float() * torch.rand(groups, n_lat, generator=g)
        member = torch.randint(groups, (c,), generator=g)
        mixes[layer] = torch.relu(protos[member] + 0.15 * torch.randn(c, n_lat, generator=g))
    store = ActivationStore.create(path, shapes, n, provenance={"model": "structured-random"})
    try:
        for s in range(0, n, batch):
            b = min(batch, n - s)
            acts = {}
            for layer, (c, hw, _) in shapes.items():
                low = torch.rand(b, mixes[layer].shape[1], max(1, hw // 4), max(1, hw // 4), generator=g)
                lat = torch.nn.functional.interpolate(low, size=(hw, hw), mode="bilinear", align_corners=False)
                x = torch.einsum("cl,blhw->bchw", mixes[layer], lat)
                acts[layer] = torch.relu(x - 0.6 * x.mean()).numpy().astype(np.float16)
            store.append(acts, [f"img{i}" for i in range(s, s + b)])
        store.mark_complete()
    finally:
        store.close()
    return list(shapes)


def model_store(path: Path, model: str, n: int, size: int, device: str) -> list[str]:
    """Record ``model`` with random weights on a synthetic Broden set of ``n`` images."""
    from neurosem.data.synthetic import write_synthetic_broden
    from neurosem.record import record

    broden = path.parent / "broden"
    write_synthetic_broden(broden, n_images=n, image_size=size, seg_size=size // 2, seed=0)
    out = record(model, str(broden), run=path.parent / "run", weights="none", device=device, progress=False)
    shutil.move(str(out), path)
    with ActivationStore.open(path) as st:
        return list(st.layers)


def pbar_pass(store: ActivationStore, layers: list[str], temperatures: list[float],
              device: torch.device) -> dict[float, dict[str, torch.Tensor]]:
    """One streaming pass; P-bar for several temperatures at once."""
    accs = {t: {l: PbarAccumulator(store.shape(l)[1], t, device, l) for l in layers} for t in temperatures}
    for start, batch in store.iter_batches(layers, 256):
        for layer in layers:
            x = torch.from_numpy(batch[layer]).to(device)
            for t in temperatures:
                accs[t][layer].add(x, start)
    return {t: {l: a.result() for l, a in per.items()} for t, per in accs.items()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def topk_neighbours(sim: np.ndarray, k: int = 5) -> np.ndarray:
    s = sim.astype(np.float64).copy()
    np.fill_diagonal(s, -np.inf)
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(set(x) & set(y)) / a.shape[1] for x, y in zip(a, b)]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="256 images instead of 2048 (a smoke run: too few images for the 20x target on a CPU)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--model", default=None, help="record this model (random weights) instead of structured data")
    ap.add_argument("--images", type=int, default=None)
    ap.add_argument("--size", type=int, default=None, help="input size the layer shapes follow (default 112)")
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--keep", default=None, help="keep the store in this directory")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for torch (both trainers alike)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    n = args.images or (256 if args.quick else 2048)
    size = args.size or 112
    taus = [1.0, 0.5, 0.1, 0.05]

    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="neurosem-bench-embed-"))
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "activations.h5"
    try:
        if args.model:
            layers = model_store(path, args.model, n, size, args.device)
        else:
            layers = structured_store(path, n, size)
        store = ActivationStore.open(path)
        shapes = {l: store.shape(l) for l in layers}
        sizes = {l: s[1] for l, s in shapes.items()}
        print(f"device {device}; {n} images; layers " + ", ".join(f"{l} {tuple(s[1:])}" for l, s in shapes.items())
              + f"; store {path.stat().st_size / 2**20:.0f} MiB")

        # warm-up (first use of the optimisers and kernels), not timed
        tiny = {l: torch.full((4, 4), 0.25, dtype=torch.float64) for l in ["w"]}
        train_fit(tiny, dim=2, max_steps=3, device=device)
        train_paper(lambda e: [{"w": torch.rand(2, 4, 2, 2)}], {"w": 4}, dim=2, epochs=1, device=device)
        for layer in layers:
            PbarAccumulator(sizes[layer], 1.0, device, layer).add(store.read(layer, 0, min(n, 64)))

        # ---- fit: one streaming pass + full-batch L-BFGS
        sync(device)
        t0 = time.perf_counter()
        pbar = pbar_pass(store, layers, [1.0], device)[1.0]
        sync(device)
        t_pass = time.perf_counter() - t0
        fit = train_fit(pbar, dim=args.dim, temperature=1.0, seed=0, device=device)
        sync(device)
        t_fit = time.perf_counter() - t0

        # ---- paper protocol on the same store, same initialisation, same evaluation
        milestones = tuple(int(round(args.epochs * f)) for f in (0.5, 0.75, 0.9))
        batches = store_epoch_batches(store, layers, batch_size=64, seed=0)

        def on_device(epoch: int):
            for b in batches(epoch):
                yield {l: v.to(device, non_blocking=True) for l, v in b.items()}

        sync(device)
        t0 = time.perf_counter()
        paper = train_paper(on_device, sizes, dim=args.dim, epochs=args.epochs, milestones=milestones,
                            temperature=1.0, seed=0, device=device, pbar=pbar)
        sync(device)
        t_paper = time.perf_counter() - t0

        print("\n== fit vs paper protocol (tau = 1, eq. 1 on the full data)")
        print(f"{'trainer':8} {'time s':>9} {'loss':>14} {'init loss':>14} {'steps':>12}")
        print(f"{'fit':8} {t_fit:9.2f} {fit.final_loss:14.8f} {fit.history_loss[0]:14.8f} "
              f"{max(fit.info['steps'].values()):>6} L-BFGS  (P-bar pass {t_pass:.2f} s)")
        print(f"{'paper':8} {t_paper:9.2f} {paper.final_loss:14.8f} {paper.history_loss[0]:14.8f} "
              f"{args.epochs:>6} epochs ({milestones})")
        for l in layers:
            print(f"  {l:8} fit {fit.layer_loss[l][-1]:.8f}  paper {paper.layer_loss[l][-1]:.8f}  "
                  f"log C {math.log(sizes[l]):.8f}")
        ratio = t_paper / t_fit
        gap = paper.final_loss - fit.final_loss
        ok = ratio >= 20 and gap >= -1e-9
        print(f"time ratio paper/fit = {ratio:.1f}x (target >= 20x); loss paper - fit = {gap:+.3e} "
              f"(target >= 0) -> {'PASS' if ok else 'FAIL'}")
        # the fit's optimisation does not depend on the number of images, both passes do
        opt, per_pass, per_epoch = t_fit - t_pass, t_pass / n, t_paper / args.epochs / n
        big = 63305
        print(f"breakdown: fit = pass {t_pass:.2f} s + optimisation {opt:.2f} s; paper = {args.epochs} epochs x "
              f"{t_paper / args.epochs:.2f} s; extrapolated to Broden's {big} images at these layer shapes: "
              f"paper/fit = {big * per_epoch * args.epochs / (big * per_pass + opt):.0f}x (an estimate, not measured)")

        # ---- temperature sweep (fit only)
        print("\n== temperature sweep (fit); mean over layers; neighbours = top-5 by cosine, self excluded")
        t0 = time.perf_counter()
        pbars = pbar_pass(store, layers, taus, device)
        print(f"(one pass for {len(taus)} temperatures: {time.perf_counter() - t0:.2f} s)")
        print(f"{'tau':>5} {'H/logC min':>10} {'H/logC max':>10} {'diag P':>8} {'max offdiag':>11} "
              f"{'fit loss':>10} {'S~Pbar top5':>11} {'S~S(tau=1)':>10} {'seed0~seed1':>11} {'steps':>6}")
        ref_nb = None
        for t in taus:
            res = train_fit(pbars[t], dim=args.dim, temperature=t, seed=0, device=device)
            res1 = train_fit(pbars[t], dim=args.dim, temperature=t, seed=1, device=device)
            hmin, hmax, diag, offmax, agree, same, seeds = [], [], [], [], [], [], []
            nbs = {}
            for l in layers:
                P = pbars[t][l].cpu().numpy()
                H = -(P * np.log(np.clip(P, 1e-300, None))).sum(1) / math.log(sizes[l])
                hmin.append(H.min())
                hmax.append(H.max())
                diag.append(np.diag(P).mean())
                off = P.copy()
                np.fill_diagonal(off, -1)
                offmax.append(off.max(1).mean())
                S = torch.from_numpy(res.vectors[l]).double()
                nbs[l] = topk_neighbours(cosine_matrix(S).numpy())
                agree.append(overlap(nbs[l], topk_neighbours(P)))
                S1 = torch.from_numpy(res1.vectors[l]).double()
                seeds.append(overlap(nbs[l], topk_neighbours(cosine_matrix(S1).numpy())))
                if ref_nb is not None:
                    same.append(overlap(nbs[l], ref_nb[l]))
            if ref_nb is None:
                ref_nb = nbs
                same = [1.0]
            print(f"{t:5.2f} {np.min(hmin):10.4f} {np.max(hmax):10.4f} {np.mean(diag):8.4f} {np.mean(offmax):11.5f} "
                  f"{res.final_loss:10.5f} {np.mean(agree):11.3f} {np.mean(same):10.3f} {np.mean(seeds):11.3f} "
                  f"{max(res.info['steps'].values()):6d}")
        store.close()
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

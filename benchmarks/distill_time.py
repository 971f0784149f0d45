"""Benchmark: the training step of every distillation method against CE (the student alone).

resnet32x4 -> resnet8x4 (the CRD pair with the largest teacher/student gap), CIFAR-size random
batches (the same batches for every method), one full training step each (forward, loss,
backward, SGD step), as :func:`neurosem.distill.train.distill` runs it. The methods are timed in
interleaved rounds (CE, SKD, KD, ... then the reverse order) so a machine whose load changes
treats them alike; the median time per step is reported and extrapolated to one CIFAR-100 epoch
(50,000 images). CE and SKD always run back to back, and SKD/CE is judged on the median of the
per-round ratios (on a shared machine a load spike hits both sides of a pair alike). On a CPU the
clock is the process's CPU time (``--clock cpu``, the default there: other processes' load does not
count; with several threads it is their sum), on a GPU the wall clock. SKD's vectors are random of the teacher's shape (the cost does not depend on
their values); the teacher has random weights (same cost as a trained one); CRD's memory bank has
CIFAR-100's 50,000 entries and 16,384 negatives per sample. AB and FSP are timed in their main
stage (CE alone, as in CRD's benchmark); ``<method>:init`` rows time their initialisation stage
(IEPKT's: its GNN stage). ``--pair wrn_40_4,wrn_16_4`` times IEPKT's pair instead (IEPKT runs only
on pairs of equal widths; resnet32x4 -> resnet8x4 is one).

Target: SKD costs about as much as CE (SKD/CE <= 1.15) and clearly less than KD (SKD/KD < 1).

Usage: python benchmarks/distill_time.py [--quick] [--device auto] [--batch-size 64] [--steps N]
       [--methods ce,skd,kd] [--threads N] [--pair TEACHER,STUDENT]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

TEACHER, STUDENT = "resnet32x4", "resnet8x4"
SKD_CE_TARGET = 1.15
CIFAR_TRAIN = 50_000
CIFAR_CLASSES = 100


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="batch 32, 3 rounds of 2 steps")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="steps per method per round")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--methods", default=None, help="comma-separated (default: every registered method)")
    ap.add_argument("--no-init", action="store_true", help="skip the initialisation-stage rows")
    ap.add_argument("--pair", default=f"{TEACHER},{STUDENT}", help="TEACHER,STUDENT zoo names")
    ap.add_argument("--clock", choices=["auto", "cpu", "wall"], default="auto",
                    help="auto: the process's CPU time on a CPU, the wall clock on a GPU")
    args = ap.parse_args(argv)
    teacher_name, student_name = args.pair.split(",")

    import torch

    from neurosem._device import resolve_device
    from neurosem.distill import distiller as T
    from neurosem.distill import methods as M
    from neurosem.distill import zoo

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    gpu = dev.type == "cuda"
    clock_name = args.clock if args.clock != "auto" else ("cpu" if dev.type == "cpu" else "wall")
    clock = time.process_time if clock_name == "cpu" else time.perf_counter
    bs = args.batch_size or (32 if args.quick and not gpu else 64)
    steps = args.steps or (2 if args.quick else (20 if gpu else 4))
    rounds = args.rounds or (3 if args.quick else 5)
    methods = args.methods.split(",") if args.methods else M.names()
    for m in ("ce", "skd"):
        if m not in methods:
            methods.insert(0, m)
    methods = list(dict.fromkeys(["ce"] + methods))

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(bs, 3, 32, 32, generator=g), torch.randint(0, CIFAR_CLASSES, (bs,), generator=g),
                torch.randint(0, CIFAR_TRAIN, (bs,), generator=g)) for _ in range(steps)]
    batches = [tuple(t.to(dev) for t in b) for b in batches]
    labels = torch.randint(0, CIFAR_CLASSES, (CIFAR_TRAIN,), generator=g)
    for _, y, i in batches:
        labels[i.cpu()] = y.cpu()

    teacher = zoo.build(teacher_name).eval().to(dev)
    widths = T.zoo_widths(teacher_name)
    vectors = [torch.randn(widths[l], 16, generator=g) for l in zoo.ALIGNED_LAYERS[teacher_name]]
    runners = {}
    for m in methods:
        d = T.build_distiller(m, student_name, teacher_name, num_classes=CIFAR_CLASSES, vectors=vectors,
                              teacher_model=teacher, seed=0, n_data=CIFAR_TRAIN, labels=labels)
        d.to(dev)
        d.train()
        opt = torch.optim.SGD(list(d.parameters()), lr=0.05, momentum=0.9, weight_decay=5e-4)
        runners[m] = (d, opt, False)
        if d.criterion.init_stage and not args.no_init:
            runners[f"{m}:init"] = (d, torch.optim.SGD(d.init_parameters(), lr=0.05, momentum=0.9), True)
    names = list(runners)     # "ce", "skd" first: adjacent in both orders
    names = ["ce", "skd"] + [n for n in names if n not in ("ce", "skd")]

    def sync() -> None:
        if gpu:
            torch.cuda.synchronize(dev)

    def run(name: str, n_batches) -> float:
        d, opt, init = runners[name]
        sync()
        t0 = clock()
        with d.hooked():
            for x, y, i in n_batches:
                loss = d.init_step(x, y, i) if init else d.step(x, y, i)[0]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        sync()
        return (clock() - t0) / len(n_batches)

    for name in names:                     # warm-up (allocator, cuDNN autotune, first-call costs)
        run(name, batches[:1])
    times: dict[str, list[float]] = {m: [] for m in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            times[name].append(run(name, batches))
    med = {m: statistics.median(v) for m, v in times.items()}
    ratios = [s / c for s, c in zip(times["skd"], times["ce"])]

    n_threads = torch.get_num_threads()
    print(f"# distill training step: {teacher_name} -> {student_name}, batch {bs}, device {dev}"
          f"{'' if gpu else f' ({n_threads} threads)'}, {rounds} rounds x {steps} steps, median, "
          f"{'process CPU time' if clock_name == 'cpu' else 'wall clock'}")
    print()
    print("| method | ms / step | images / s | est. CIFAR-100 epoch | vs CE |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for m in names:
        epoch = med[m] * CIFAR_TRAIN / bs
        print(f"| {m} | {1000 * med[m]:.1f} | {bs / med[m]:.0f} | {epoch / 60:.1f} min | {med[m] / med['ce']:.2f} |")
    skd_ce = statistics.median(ratios)
    print()
    print(f"SKD/CE = {skd_ce:.3f}, median of the per-round ratios {', '.join(f'{r:.3f}' for r in ratios)} "
          f"(target <= {SKD_CE_TARGET}: {'PASS' if skd_ce <= SKD_CE_TARGET else 'FAIL'})")
    ok = skd_ce <= SKD_CE_TARGET
    if "kd" in med:
        skd_kd = med["skd"] / med["kd"]
        print(f"SKD/KD = {skd_kd:.3f} (target < 1: {'PASS' if skd_kd < 1 else 'FAIL'})")
        ok = ok and skd_kd < 1
    spread = {m: (min(v) * 1000, max(v) * 1000) for m, v in times.items()}
    print("per-round ms/step (min..max): " + ", ".join(f"{m} {a:.0f}..{b:.0f}" for m, (a, b) in spread.items()))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

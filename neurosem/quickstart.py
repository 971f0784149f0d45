"""``neurosem quickstart``: the whole pipeline on an embedded default, offline, in minutes.

It writes the synthetic Broden-format set, trains :func:`tiny_cnn` to recognise the synthetic
scenes (so its units come to mean something), then records, dissects, embeds, computes the KL
curves, answers a neighbour and an additive query, and draws the figures and the HTML report.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from neurosem.errors import NeurosemError

TINY_CNN = "neurosem.quickstart:tiny_cnn"


def tiny_cnn(num_classes: int = 4, width: int = 32):
    """A four-stage CNN for 64×64 images; the stage ends are ``layer1`` … ``layer4``.

    Output sizes for a 64×64 input: layer1 [w, 32, 32], layer2 [2w, 16, 16], layer3 [2w, 8, 8],
    layer4 [4w, 8, 8].

    Example:
        >>> model = tiny_cnn(num_classes=4)
        >>> model(torch.zeros(2, 3, 64, 64)).shape  # doctest: +SKIP
        torch.Size([2, 4])
    """
    from torch import nn

    def stage(cin: int, cout: int, pool: bool) -> nn.Sequential:
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                                   nn.ReLU(inplace=True)]
        if pool:
            layers.insert(0, nn.MaxPool2d(2))
        return nn.Sequential(*layers)

    class TinyCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer1 = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False),
                                        nn.BatchNorm2d(width), nn.ReLU(inplace=True))
            self.layer2 = stage(width, 2 * width, pool=True)
            self.layer3 = stage(2 * width, 2 * width, pool=True)
            self.layer4 = stage(2 * width, 4 * width, pool=False)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(4 * width, num_classes)

        def forward(self, x):
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(self.pool(x).flatten(1))

    return TinyCNN()


@dataclass
class QuickstartConfig:
    """Sizes of the quickstart; the defaults finish in well under a minute on 2 CPU cores (the
    tests run exactly these defaults, so the README's quoted output is checked)."""

    out: str = "runs/quickstart"
    n_images: int = 128
    image_size: int = 64
    seg_size: int = 32
    epochs: int = 10
    batch_size: int = 32
    lr: float = 0.05
    seed: int = 0
    device: str = "auto"
    progress: bool = True


def scene_targets(dataset) -> "torch.Tensor":
    """The scene class of each image of a Broden dataset: [N] long, 0..n_scenes-1.

    The synthetic set gives every image exactly one scene label (an image-level label).
    """
    import numpy as np
    import torch

    scene_cat = dataset.categories.index("scene")
    scene_numbers = [n for n in range(dataset.n_labels) if dataset.primary_category[n] == scene_cat]
    lookup = {n: i for i, n in enumerate(scene_numbers)}
    targets = np.full(len(dataset), -1, dtype=np.int64)
    for i in range(len(dataset)):
        labels = [int(v) for v in dataset.load_image_labels(i).tolist() if int(v) in lookup]
        if not labels:
            raise NeurosemError(f"image {i} of {dataset.root} has no scene label; the quickstart needs one per image")
        targets[i] = lookup[labels[0]]
    return torch.from_numpy(targets)


def train_scene_classifier(broden: Path, out: Path, cfg: QuickstartConfig, pretrained: bool = True) -> dict[str, Any]:
    """Train :func:`tiny_cnn` on the synthetic scenes; save the state dict to ``out``.

    With ``pretrained=False`` the model keeps its random initialisation (the baseline the tests compare
    against) and is saved as it is.
    """
    import torch
    from torch.utils.data import DataLoader, Subset

    from neurosem._device import resolve_device
    from neurosem._progress import progress
    from neurosem.data.broden import BrodenDataset
    from neurosem.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Compose, Normalize, pil_to_tensor

    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    ds = BrodenDataset(broden, transform=Compose([pil_to_tensor, Normalize(IMAGENET_MEAN, IMAGENET_STD)]),
                       with_labels=False)
    targets = scene_targets(ds)
    n_classes = int(targets.max()) + 1
    model = tiny_cnn(num_classes=n_classes).to(device)
    stats: dict[str, Any] = {"n_classes": n_classes, "epochs": 0, "train_acc": None, "heldout_acc": None}
    n = len(ds)
    n_train = int(n * 0.8)
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(n, generator=gen).tolist()
    train_idx, held_idx = order[:n_train], order[n_train:]
    if pretrained:
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * -(-n_train // cfg.batch_size))
        loader = DataLoader(Subset(ds, train_idx), batch_size=cfg.batch_size, shuffle=True, generator=gen, drop_last=False)
        for _ in progress(range(cfg.epochs), total=cfg.epochs, desc="train tiny_cnn", enabled=cfg.progress, unit="epoch"):
            model.train()
            for batch in loader:
                x = batch["image"].to(device)
                y = targets[batch["index"]].to(device)
                loss = torch.nn.functional.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        stats["epochs"] = cfg.epochs
    model.eval()
    for key, idx in (("train_acc", train_idx), ("heldout_acc", held_idx)):
        correct = 0
        with torch.inference_mode():
            for batch in DataLoader(Subset(ds, idx), batch_size=128):
                pred = model(batch["image"].to(device)).argmax(1).cpu()
                correct += int((pred == targets[batch["index"]]).sum())
        stats[key] = correct / max(1, len(idx))
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.cpu().state_dict(), out)
    return stats


@dataclass
class Finding:
    """One claim the quickstart prints, with the numbers a reader can check."""

    title: str
    text: str
    data: dict[str, Any]


def best_detector(dissection) -> tuple[str, int, str, str, float]:
    """The unit with the highest IoU over all dissected layers: (layer, unit, label, category, iou).

    Ties go to the earlier layer, then the lower unit index.
    """
    import numpy as np

    best: tuple[str, int, str, str, float] | None = None
    for layer in dissection.layers:
        top = dissection.iou(layer).max(axis=1)
        unit = int(np.argmax(top))
        if best is None or float(top[unit]) > best[4]:
            best = (layer, unit, *dissection.unit_label(layer, unit))
    if best is None:
        raise NeurosemError("the dissection holds no layer")
    return best


def findings_of(run) -> list[Finding]:
    """Findings a reader can check: the best detector, its neighbours, an additive relation, the KL."""
    from neurosem.analysis.figures import default_pair
    from neurosem.analysis.kl import kl_curves
    from neurosem.analysis.query import query
    from neurosem.dissect import load_dissection

    dis = load_dissection(run.path)
    layer, u, label, cat, iou = best_detector(dis)
    unit = f"{layer}:{u}"
    out = [Finding("detector", f"{unit} detects '{label}' ({cat}) with IoU {iou:.3f}",
                   {"neuron": unit, "label": label, "category": cat, "iou": iou})]
    nbrs = query(run.path, unit, k=3)
    described = ", ".join(f"{r['neuron']} ({r.get('label', '?')}, cos {r['similarity']:.2f})" for r in nbrs)
    out.append(Finding("neighbours", f"nearest units to {unit} by semantic vector: {described}",
                       {"neuron": unit, "neighbours": nbrs}))
    a, b, _ = default_pair(run.path, layer)  # the pair the additive figure shows
    summed = query(run.path, str(a), add=[str(b)], k=1)[0]
    la, lb = (dis.unit_label(n.layer, n.index)[0] for n in (a, b))
    out.append(Finding(
        "additive",
        f"{a} ({la}) + {b} ({lb}) is nearest to {summed['neuron']} "
        f"({summed.get('label', '?')}, cos {summed['similarity']:.2f})",
        {"a": str(a), "b": str(b), "nearest": summed}))
    curves = kl_curves(run.path, progress=False)
    fin = curves["final"]
    out.append(Finding(
        "kl",
        f"KL(IoU similarities || vector similarities), mean over layers: embedding {fin['embedding']:.4f}, "
        f"random vectors {fin['random']:.4f}, upper bound {fin['upper_bound']:.4f}",
        dict(fin)))
    return out


def quickstart(out: str = "runs/quickstart", device: str = "auto", seed: int = 0, progress: bool = True,
               config: QuickstartConfig | None = None) -> dict[str, Any]:
    """Run every stage on generated data and print where the outputs are and what they show.

    Args:
        out: the folder for the data (``out/broden``), the model (``out/tiny_cnn.pth``) and the
            run directory (``out`` itself: ``activations.h5``, ``dissect.h5``, ...).
        device: ``auto``, ``cpu``, ``cuda``...
        seed: seeds the data, the model and the embedding.
        progress: show progress bars.
        config: all sizes (overrides ``out``, ``device``, ``seed``, ``progress`` when given).

    Returns:
        A summary dict (also written to ``out/quickstart.json``).

    Example:
        >>> summary = quickstart("runs/quickstart")  # doctest: +SKIP
    """
    from neurosem.analysis.figures import make_figures
    from neurosem.data.synthetic import write_synthetic_broden
    from neurosem.dissect import dissect
    from neurosem.embed import embed
    from neurosem.record import record
    from neurosem.run import RunDir

    import torch

    from neurosem.distributed import current

    comm = current()
    if comm is not None:  # one line on rank 0, nothing written (the others exit without a line)
        with comm.together():
            raise NeurosemError("quickstart runs as one process: run `neurosem quickstart` without torchrun; "
                                "under torchrun run the stages (record, dissect, embed, concepts) one by one")
    cfg = config or QuickstartConfig(out=out, device=device, seed=seed, progress=progress)
    # One torch thread: float sums then do not depend on the core count, so the quickstart prints
    # the same numbers on every CPU machine (the README quotes them; on 2 busy cores it costs little).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _quickstart(cfg)
    finally:
        torch.set_num_threads(threads)


def _quickstart(cfg: QuickstartConfig) -> dict[str, Any]:
    from neurosem.analysis.figures import make_figures
    from neurosem.data.synthetic import write_synthetic_broden
    from neurosem.dissect import dissect
    from neurosem.embed import embed
    from neurosem.record import record
    from neurosem.run import RunDir

    root = Path(cfg.out)
    run = RunDir(root).ensure()
    broden = root / "broden"
    weights = root / "tiny_cnn.pth"
    timings: dict[str, float] = {}

    def stage(name: str):
        class _Timer:
            def __enter__(self):
                self.t0 = time.perf_counter()
                print(f"[quickstart] {name} ...", flush=True)

            def __exit__(self, *exc):
                timings[name] = round(time.perf_counter() - self.t0, 2)
                if exc[0] is None:
                    print(f"[quickstart] {name} done in {timings[name]:.1f} s", flush=True)
        return _Timer()

    with stage("write synthetic Broden set"):
        if not (broden / "index.csv").exists():
            write_synthetic_broden(broden, n_images=cfg.n_images, image_size=cfg.image_size,
                                   seg_size=cfg.seg_size, seed=cfg.seed)
    with stage("train tiny_cnn on the synthetic scenes"):
        train = train_scene_classifier(broden, weights, cfg)
    print(f"[quickstart] tiny_cnn: train accuracy {train['train_acc']:.3f}, held-out accuracy "
          f"{train['heldout_acc']:.3f} ({train['n_classes']} scenes)")
    with stage("record activations"):
        record(TINY_CNN, str(broden), run=run.path, weights=str(weights), batch_size=cfg.batch_size,
               device=cfg.device, force=True, progress=cfg.progress, num_workers=0)
    with stage("dissect"):
        dissect(run=run.path, broden=str(broden), device=cfg.device, batch_size=cfg.batch_size,
                progress=cfg.progress)
    with stage("embed"):
        embed(run=run.path, seed=cfg.seed, device=cfg.device, progress=cfg.progress)
    with stage("KL curves, queries"):
        found = findings_of(run)
    with stage("figures"):
        figs = make_figures(run.path, unit=found[0].data["neuron"])
    summary = {
        "config": asdict(cfg), "train": train, "timings_s": timings,
        "findings": [asdict(f) for f in found],
        "outputs": {
            "run": str(run.path), "data": str(broden), "model": str(weights),
            "report": str(run.dissect_dir / "index.html"), "figures": str(run.figures),
        },
    }
    (root / "quickstart.json").write_text(json.dumps(summary, indent=2, default=str))
    print("\nWhere everything is:")
    for key, value in summary["outputs"].items():
        print(f"  {key:<8} {value}")
    print(f"  figures: {', '.join(sorted({p.stem for p in figs}))}")
    print("\nFindings you can check:")
    for i, f in enumerate(found, 1):
        print(f"  {i}. {f.text}")
    print(f"\nTotal {sum(timings.values()):.0f} s. Next: open {run.dissect_dir / 'index.html'} in a browser, "
          f"or try `neurosem query --run {run.path} --neuron {found[0].data['neuron']}`.")
    return summary

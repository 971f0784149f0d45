"""The ``dissect()`` driver: activations.h5 + a Broden directory -> dissect.h5, CSV, JSON, HTML, figure.

Two streaming passes over ``activations.h5`` (batches of ``batch_size`` images, all layers at once):

1. the exact per-unit ``1 - q`` quantile (:class:`~neurosem.dissect.quantile.TopQuantile`) and
   each unit's top-activating images (:class:`~neurosem.dissect.quantile.TopImages`);
2. the NetDissect tallies (:class:`~neurosem.dissect.tally.Tally`) against the Broden label planes,
   read by a DataLoader that decodes only the label PNGs (never the RGB images).

The store must hold the Broden images in index.csv order (the first ``n`` of them are accepted,
e.g. a run recorded with ``--limit``). Categories that the Broden directory does not have are an
error when asked for explicitly; with ``categories=None`` every category of category.csv is used.
A previous ``dissect.h5`` is reused layer by layer when it was made with the same quantile,
categories, Broden metadata and activations; otherwise everything is recomputed (with a note).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from neurosem.errors import DataError, NeurosemError
from neurosem.record import IDENTITY

#: bumped when the numbers a dissection computes change
METHOD_VERSION = 1
#: provenance fields of the activations that identify them (the stored layer list is not one:
#: layers recorded later are added to a matching dissection)
_ACT_IDENTITY = tuple(k for k in IDENTITY if k != "layers")
TOP_IMAGES = 4


class _BrodenLabels:
    """Label planes and image-level labels of the first ``n`` images, without decoding images."""

    def __init__(self, ds: Any, n: int) -> None:
        self.ds, self.n = ds, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        import torch

        return (torch.from_numpy(self.ds.load_seg(i)), torch.from_numpy(self.ds.load_image_labels(i)))


def _check_args(quantile: float, iou_threshold: float, batch_size: int) -> None:
    if not 0.0 <= float(quantile) < 1.0:
        raise NeurosemError(f"--quantile {quantile} is out of range: use 0 <= q < 1 (NetDissect: 0.005)")
    if not 0.0 <= float(iou_threshold) <= 1.0:
        raise NeurosemError(f"--iou-threshold {iou_threshold} is out of range: use 0..1 (NetDissect: 0.04)")
    if int(batch_size) < 1:
        raise NeurosemError(f"--batch-size must be >= 1, got {batch_size}")


def _open_broden(broden: Any, categories: Sequence[str] | None) -> Any:
    from neurosem.data.broden import BrodenDataset

    if broden is None or broden is ... or str(broden) == "":
        raise NeurosemError("dissection needs the Broden directory: pass --broden PATH (e.g. data/broden1_224)")
    if isinstance(categories, str):
        categories = [c.strip() for c in categories.split(",") if c.strip()]
    return BrodenDataset(broden, categories=list(categories) if categories else None, with_labels=True)


def _activations(rd: Any, model: Any, broden: Any, layers: Sequence[str] | None, weights: str,
                 batch_size: int, device: str, progress: bool) -> Path:
    """The run's complete activations; recorded on the Broden images when needed and possible."""
    from neurosem.record import ensure_activations
    from neurosem.store import ActivationStore

    if model is None:
        if not rd.activations.exists():
            raise NeurosemError(
                f"no activations in {rd.path}: pass the model to record them on the Broden images "
                f"(`neurosem dissect MODEL --broden {broden} --run {rd.path}`)")
        with ActivationStore.open(rd.activations) as st:
            stored, complete = list(st.layers), st.complete
        missing = [name for name in (layers or []) if name not in stored]
        if missing:
            raise NeurosemError(
                f"layer {missing[0]!r} is not in {rd.activations} (stored layers: {', '.join(stored)}); "
                f"choose stored layers or pass the model to record it")
        if complete:
            return rd.activations
    return ensure_activations(rd.path, model=model, data=None if model is None else str(broden),
                              layers=layers, weights=weights, batch_size=batch_size, device=device,
                              progress=progress)


def _check_ids(store_ids: Sequence[str], ds: Any, path: Path, broden_root: Path) -> None:
    n = len(store_ids)
    if n > len(ds):
        raise DataError(f"{path} holds {n} images but {broden_root} lists {len(ds)}: the activations were "
                        f"not recorded on this Broden set; record them with `neurosem record MODEL --data {broden_root}`")
    want = ds.image_ids[:n]
    if list(store_ids) != list(want):
        i = next(k for k, (a, b) in enumerate(zip(store_ids, want)) if a != b)
        raise DataError(f"{path} does not hold the images of {broden_root} in index.csv order (image {i} is "
                        f"{store_ids[i]!r}, index.csv has {want[i]!r}); record them with "
                        f"`neurosem record MODEL --data {broden_root} --force`")


def _key(args: dict[str, Any]) -> dict[str, Any]:
    """What makes stored layers reusable (iou_threshold only changes the reports)."""
    return {k: args.get(k) for k in ("quantile", "categories", "broden_fingerprint", "activations",
                                     "store_id", "n_images", "method_version")}


def _describe_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    diffs = [f"{k}: {str(old.get(k))[:60]} vs {str(new.get(k))[:60]}" for k in new if old.get(k) != new.get(k)]
    return "; ".join(diffs)


def _to_device(arr: np.ndarray, dev: Any) -> Any:
    import torch

    return torch.from_numpy(arr).to(dev, non_blocking=True)


def dissect(run: Any = None, broden: Any = ..., model: Any = None, layers: Sequence[str] | None = None,
            quantile: float = 0.005, iou_threshold: float = 0.04, categories: Sequence[str] | None = None,
            device: str = "auto", batch_size: int = 64, weights: str = "default",
            progress: bool = True) -> "Dissection":
    """NetDissect every unit of ``layers`` against the Broden concepts.

    Args:
        run: the run directory (default: ``runs/<model>``, or the only run under ``runs/``).
        broden: the Broden directory (holding index.csv).
        model: a model spec or :class:`~neurosem.models.LoadedModel`; needed only when the run has
            no activations yet (they are then recorded on the Broden images).
        layers: layers to dissect (default: every stored layer).
        quantile: the upper tail fraction q of the per-unit threshold (0.005).
        iou_threshold: a unit is interpretable when its best IoU reaches it (0.04).
        categories: Broden categories to use (default: all of category.csv).
        device: ``auto``, ``cpu``, ``cuda``, ...
        batch_size: images per batch in both passes.
        weights: the model weights when recording (see :func:`neurosem.models.load_model`).
        progress: progress bars on stderr.

    Returns:
        The :class:`~neurosem.dissect.report.Dissection` read back from ``dissect.h5``, with
        ``outputs`` naming every file written.

    Example:
        >>> d = dissect("runs/resnet18", broden="data/broden1_224", layers=["layer4"])  # doctest: +SKIP
        >>> d.unit_label("layer4", 0)                                                # doctest: +SKIP
        ('house', 'object', 0.12)
    """
    import torch

    from neurosem._device import resolve_device
    from neurosem._progress import progress as bar
    from neurosem.dissect.quantile import TopImages, TopQuantile
    from neurosem.dissect.report import LayerDissection, load_dissection, write_dissection
    from neurosem.dissect.tally import Tally, best_labels
    from neurosem.run import resolve_run
    from neurosem.store import ActivationStore

    _check_args(quantile, iou_threshold, batch_size)
    if isinstance(layers, str):
        layers = [x.strip() for x in layers.split(",") if x.strip()]
    layers = list(layers) if layers else None
    ds = _open_broden(broden, categories)
    dev = resolve_device(device)
    spec = getattr(model, "spec", model)
    rd = resolve_run(run, spec)
    act_path = _activations(rd, model, ds.root, layers, weights, batch_size, device, progress)

    with ActivationStore.open(act_path) as store:
        if not store.complete:
            raise NeurosemError(f"{act_path} is incomplete ({store.n_done} images): resume it with "
                                f"`neurosem record MODEL --data {ds.root} --run {rd.path}`")
        names = layers or list(store.layers)
        for name in names:
            store.shape(name)  # a layer not in the store: one-line error listing the stored ones
        n = store.n_done
        _check_ids(store.image_ids, ds, act_path, ds.root)
        prov = store.provenance
        recorded_on = prov.get("data_fingerprint")
        if recorded_on is not None and recorded_on != ds.fingerprint():
            raise DataError(f"{act_path} was recorded on {prov.get('data')} (fingerprint {recorded_on}), not on "
                            f"{ds.root} ({ds.fingerprint()}), though the image names agree: record it on this set "
                            f"with `neurosem record MODEL --data {ds.root} --run {rd.path} --force`")
        args = {
            "quantile": float(quantile), "iou_threshold": float(iou_threshold),
            "categories": list(ds.categories), "layers": names, "broden": str(ds.root),
            "broden_fingerprint": ds.fingerprint(), "n_images": n, "label_size": list(ds.seg_size),
            "activations": {k: prov.get(k) for k in _ACT_IDENTITY}, "store_id": store.store_id,
            "method_version": METHOD_VERSION,
        }

        reuse: dict[str, LayerDissection] = {}
        old_labels = None
        if rd.dissection.exists():
            try:
                old = load_dissection(rd.dissection)
            except NeurosemError:
                old = None
            if old is not None and _key(old.args) == _key(args):
                old_labels = old
                for name in old.layers:
                    reuse[name] = _layer_from_file(old, name)
            elif old is not None:
                print(f"{rd.dissection} was made with other arguments ({_describe_diff(_key(old.args), _key(args))}); "
                      "recomputing", file=sys.stderr)
        todo = [name for name in names if name not in reuse]

        computed: dict[str, Any] = {}
        labels = None
        if todo:
            shapes = {name: store.shape(name) for name in todo}
            tq = {name: TopQuantile(shapes[name][1], quantile, total=n * shapes[name][2] * shapes[name][3],
                                    device=dev) for name in todo}
            ti = {name: TopImages(shapes[name][1], TOP_IMAGES, device=dev) for name in todo}
            with torch.inference_mode():
                for start, batch in bar(store.iter_batches(todo, batch_size), total=-(-n // batch_size),
                                        desc="dissect: thresholds", enabled=progress, unit="batch"):
                    for name in todo:
                        x = _to_device(batch[name], dev)
                        tq[name].add(x)
                        ti[name].add(x, start)
                thresholds = {name: tq[name].result() for name in todo}
                del tq
                k_cat = len(ds.categories)
                tallies = {name: Tally(thresholds[name], ds.primary_category, k_cat, device=dev) for name in todo}
                loader = torch.utils.data.DataLoader(
                    _BrodenLabels(ds, n), batch_size=batch_size, shuffle=False,
                    num_workers=_workers(n), pin_memory=dev.type == "cuda")
                for (start, batch), (seg, img) in bar(zip(store.iter_batches(todo, batch_size), loader),
                                                      total=-(-n // batch_size), desc="dissect: IoU",
                                                      enabled=progress, unit="batch"):
                    # labels checked and prepared once for every layer
                    labels_b = tallies[todo[0]].labels(seg.to(dev, non_blocking=True),
                                                       img.to(dev, non_blocking=True))
                    for name in todo:
                        tallies[name].add(_to_device(batch[name], dev), labels_b)
            for name in todo:
                res = tallies[name].result()
                if labels is None:
                    labels = res
                best, best_iou, cat_best, cat_iou = best_labels(res.iou, res.label_category, k_cat)
                top_v, top_i = ti[name].result()
                computed[name] = LayerDissection(
                    layer=name, threshold=thresholds[name].numpy(), iou=res.iou, best_label=best,
                    best_iou=best_iou, category_best_label=cat_best, category_best_iou=cat_iou,
                    top_images=top_i.numpy(), top_values=top_v.numpy())

        # Label columns: the labels that occur in the first n images (the same for every layer).
        if labels is not None:
            numbers, gt = labels.labels, labels.gt
            if old_labels is not None and not np.array_equal(old_labels.label_numbers, numbers):
                # cannot happen with equal keys (same Broden metadata and images); never mix columns
                raise NeurosemError(f"{rd.dissection} does not match the Broden labels any more: "
                                    "delete it and run `neurosem dissect` again")
        else:
            numbers, gt = old_labels.label_numbers, old_labels.label_gt
        order = [name for name in list(store.layers) + names if name in reuse or name in computed]
        order = list(dict.fromkeys(order))
        all_layers = [computed.get(name) or reuse[name] for name in order]
        args["layers"] = order
        label_names = [ds.label_names[int(i)] for i in numbers]
        label_cats = [ds.categories[int(ds.primary_category[int(i)])] for i in numbers]
        write_dissection(rd.dissection, args, ds.fingerprint(), numbers, label_names, label_cats, gt,
                         ds.categories, all_layers)

        dis = load_dissection(rd.dissection)
        outputs = _write_reports(rd, dis, ds, store, progress)
    dis.outputs = {"dissection": str(rd.dissection), **outputs}
    rd.update_meta("dissect", {**args, "device": str(dev), "batch_size": int(batch_size),
                               "outputs": dis.outputs})
    return dis


def _workers(n: int) -> int:
    """DataLoader workers for the label PNGs: none for small sets (start-up costs more)."""
    if n < 2000:
        return 0
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def _layer_from_file(dis: Any, name: str) -> Any:
    from neurosem.dissect.report import LayerDissection

    best, best_iou = dis.best(name)
    cat_best, cat_iou = dis.category_best(name)
    top_i, top_v = dis.top_images(name)
    return LayerDissection(layer=name, threshold=dis.threshold(name, exact=True), iou=dis.iou(name),
                           best_label=best, best_iou=best_iou, category_best_label=cat_best,
                           category_best_iou=cat_iou, top_images=top_i, top_values=top_v)


def _write_reports(rd: Any, dis: Any, ds: Any, store: Any, progress: bool) -> dict[str, Any]:
    """CSV per layer, summary.json, one HTML page per layer + index.html, the summary figure."""
    from neurosem.dissect.report import (layer_html_name, write_index_html, write_layer_csv,
                                         write_layer_html, write_summary, write_summary_figure)

    out_dir = rd.dissect_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    csvs = [str(write_layer_csv(out_dir / f"{name}.csv", dis, name)) for name in dis.layers]
    summary = write_summary(out_dir / "summary.json", dis)
    figures = write_summary_figure(rd.figures / "dissect_summary", dis)
    thumb_px = int(min(112, ds.image_size[0], ds.image_size[1]))
    thumbs: dict[int, np.ndarray] = {}
    pages = {}
    for name in dis.layers:
        tiles = _unit_tiles(dis, name, store, ds.seg_size)
        needed = sorted({i for t in tiles for i in t.images})
        for i in needed:
            if i not in thumbs:
                thumbs[i] = _thumbnail(ds, i, thumb_px)
        page = layer_html_name(name)
        write_layer_html(out_dir / page, dis, name, {i: thumbs[i] for i in needed}, tiles,
                         ds.image_ids, thumb_px)
        pages[name] = page
    png = next((p for p in figures if p.suffix == ".png"), None)
    index = write_index_html(out_dir / "index.html", dis, pages, png)
    return {"csv": csvs, "summary": str(summary), "html": str(index),
            "figures": [str(p) for p in figures]}


def _unit_tiles(dis: Any, layer: str, store: Any, seg_size: tuple[int, int]) -> list[Any]:
    """Each unit's top images and the masks over them (the same masks the tally counted)."""
    import torch

    from neurosem.dissect.report import UnitTiles
    from neurosem.dissect.tally import unit_masks

    top_i, _ = dis.top_images(layer)
    # the exact (float64) thresholds: unit_masks compares in the tally's dtype, as the tally did
    thr = torch.as_tensor(dis.threshold(layer, exact=True), dtype=torch.float64)
    tiles = [UnitTiles() for _ in range(top_i.shape[0])]
    wanted: dict[int, list[int]] = {}
    for u in range(top_i.shape[0]):
        for i in top_i[u]:
            if i >= 0:
                wanted.setdefault(int(i), []).append(u)
    masks: dict[tuple[int, int], np.ndarray] = {}
    for i in sorted(wanted):
        acts = torch.from_numpy(store.read(layer, i, i + 1)).float()
        m = unit_masks(acts, thr, seg_size)[0].numpy()
        for u in wanted[i]:
            masks[(u, i)] = m[u].copy()        # not a view: the image's other maps can go
    for u in range(top_i.shape[0]):
        for i in top_i[u]:
            if i >= 0:
                tiles[u].images.append(int(i))
                tiles[u].masks.append(masks[(u, int(i))])
    return tiles


def _thumbnail(ds: Any, i: int, px: int) -> np.ndarray:
    from PIL import Image

    img = ds.load_image(i)
    if img.size != (px, px):
        img = img.resize((px, px), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)

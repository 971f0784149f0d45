"""The ``dissect()`` driver: activations.h5 + a Broden directory -> dissect.h5, CSV, JSON, HTML, figure.

Two streaming passes over ``activations.h5`` (batches of ``batch_size`` images, all layers at once;
:mod:`neurosem.dissect.passes`): the exact per-unit ``1 - q`` quantile, then the NetDissect tallies
against the Broden labels, which come from the label cache (:mod:`neurosem.data.label_cache`: the
label PNGs are decoded once per Broden directory, by worker processes). The tally pass also picks
each unit's top images (by mask size) and keeps their raw maps, so the report's masks are the
tally's own and cost nothing to find. On a machine without an accelerator torch is not imported.

The store must hold the Broden images in index.csv order (the first ``n`` of them are accepted,
e.g. a run recorded with ``--limit``). Categories that the Broden directory does not have are an
error when asked for explicitly; with ``categories=None`` every category of category.csv is used.
A previous ``dissect.h5`` is reused layer by layer when it was made with the same quantile,
categories, Broden metadata, activations and ``top``; otherwise everything is recomputed (with a note).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from neurosem.errors import DataError, NeurosemError

if TYPE_CHECKING:  # pragma: no cover
    from neurosem.dissect.report import Dissection
from neurosem.record import IDENTITY

#: bumped when the numbers a dissection computes change
METHOD_VERSION = 2
#: provenance fields of the activations that identify them (the stored layer list is not one:
#: layers recorded later are added to a matching dissection)
_ACT_IDENTITY = tuple(k for k in IDENTITY if k != "layers")
TOP_IMAGES = 4


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
                                     "store_id", "n_images", "method_version", "top")}


def _describe_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    diffs = [f"{k}: {str(old.get(k))[:60]} vs {str(new.get(k))[:60]}" for k in new if old.get(k) != new.get(k)]
    return "; ".join(diffs)


def _load_kernels_in_background() -> Any:
    """A started thread loading the compiled kernels (numba's cache) while the data is opened."""
    import threading

    def load() -> None:
        try:
            from neurosem.dissect._kernels import warm_up

            warm_up()
        except Exception:  # noqa: BLE001 - the real call reports any problem
            pass

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    return thread


def choose_engine(device: str) -> tuple[str, Any]:
    """``("cpu", "cpu")`` for the compiled CPU kernels, or ``("torch", torch.device)``.

    ``auto`` takes an accelerator when torch finds one; on a machine without one it does not import
    torch at all. ``cpu`` uses the compiled kernels (torch's CPU where numba is missing).

    Example:
        >>> choose_engine("cpu")          # doctest: +SKIP
        ('cpu', 'cpu')
    """
    from neurosem._device import gpu_driver_visible
    from neurosem.dissect._kernels import HAVE_NUMBA

    if str(device) == "cpu" or (str(device) == "auto" and not gpu_driver_visible()):
        if HAVE_NUMBA:
            return "cpu", "cpu"
    from neurosem._device import resolve_device

    dev = resolve_device(device)
    if dev.type == "cpu" and HAVE_NUMBA:
        return "cpu", "cpu"
    return "torch", dev


def _set_threads(threads: int | None, engine: str) -> int:
    from neurosem.dissect.passes import auto_threads

    n = auto_threads() if threads is None else int(threads)
    if n < 1:
        raise NeurosemError(f"--threads must be >= 1, got {threads}")
    if engine != "cpu":                  # the CPU kernels get their threads through run_passes
        import torch

        torch.set_num_threads(n)
    return n


def _labels(ds: Any, label_cache: Any, progress: bool) -> Any:
    """The label source: the cache (built when needed) or, with ``label_cache="none"``, the PNGs."""
    from neurosem.dissect.passes import LabelSource

    if str(label_cache) == "none":
        return LabelSource(ds, None)
    from neurosem.data.label_cache import open_label_cache

    try:
        return LabelSource(ds, open_label_cache(ds, None if label_cache is None else label_cache,
                                                progress=progress))
    except PermissionError as exc:
        print(f"note: the label cache cannot be written ({exc}); reading the label PNGs directly "
              "(set NEUROSEM_CACHE_DIR or --label-cache DIR to a writable folder)", file=sys.stderr)
        return LabelSource(ds, None)


def dissect(run: Any = None, broden: Any = ..., model: Any = None, layers: Sequence[str] | None = None,
            quantile: float = 0.005, iou_threshold: float = 0.04, categories: Sequence[str] | None = None,
            device: str = "auto", batch_size: int = 64, weights: str = "default",
            progress: bool = True, top: int = TOP_IMAGES, report: bool = True, threads: int | None = None,
            label_cache: Any = None, no_store: bool = False, formulas: int = 0, beam: int = 5,
            min_images: int = 10, permutations: int | None = None, seed: int = 0,
            baseline: str | None = None) -> "Dissection":
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
        top: top images per unit in the report (ranked by mask size, then peak activation).
        report: write the HTML report and the summary figure (the CSV and JSON always).
        threads: CPU threads (default: the idle cores, :func:`~neurosem.dissect.passes.auto_threads`).
        label_cache: the label cache root (default ``$NEUROSEM_CACHE_DIR`` or ``~/.cache/neurosem``),
            or ``"none"`` to decode the label PNGs on every run.
        no_store: run the model on the Broden images in each pass instead of reading (or writing)
            ``activations.h5`` (:class:`~neurosem.dissect.stream.ModelStream`): no disk for the
            activations, one more forward pass.
        formulas: explain every unit by the best formula of up to this many labels (0: none;
            :mod:`neurosem.dissect.explain`), writing ``dissect/<layer>_formulas.csv`` and ``.json``.
        beam: the formula search's beam width; min_images: a label is a formula candidate when it
            occurs in at least this many images.
        permutations: R, the permutation p-values of every unit's best label (and formula)
            (default: 100 with ``formulas``, else 0: none); seed: of the permutations.
        baseline: ``"random"``: also dissect the same architecture with random weights on the same
            images (into ``<run>/baseline-random``); its counts are reported beside the model's.

    Returns:
        The :class:`~neurosem.dissect.report.Dissection` read back from ``dissect.h5``, with
        ``outputs`` naming every file written.

    Example:
        >>> d = dissect("runs/resnet18", broden="data/broden1_224", layers=["layer4"])  # doctest: +SKIP
        >>> d.unit_label("layer4", 0)                                                # doctest: +SKIP
        ('house', 'object', 0.12)
    """
    from neurosem.dissect.passes import run_passes
    from neurosem.dissect.report import LayerDissection, load_dissection, write_dissection
    from neurosem.dissect.tally import best_labels
    from neurosem.distributed import current, together
    from neurosem.run import resolve_run
    from neurosem.store import ActivationStore

    timings: dict[str, float] = {}
    comm = current()  # under torchrun: each rank tallies a share of the images, rank 0 writes
    with together(comm):
        _check_args(quantile, iou_threshold, batch_size)
        from neurosem.dissect.explain import ExplainOptions, check_baseline

        explain = ExplainOptions(formulas=int(formulas), beam=int(beam), min_images=int(min_images),
                                 permutations=(100 if formulas else 0) if permutations is None else int(permutations),
                                 seed=int(seed))
        explain.check()
        check_baseline(baseline, model)
        if isinstance(top, bool) or not isinstance(top, (int, np.integer)) or int(top) < 1:
            raise NeurosemError(f"--top {top}: the number of images per unit must be >= 1 (default {TOP_IMAGES})")
        if comm is not None and no_store:
            raise NeurosemError("--no-store runs in one process: record the activations under torchrun "
                                "(`neurosem record`), then dissect them there, or drop torchrun")
        if comm is not None and (explain.formulas or explain.permutations or baseline):
            raise NeurosemError("--formulas, --permutations and --baseline run in one process: dissect under "
                                "torchrun, then run `neurosem dissect --formulas ...` once without it "
                                "(the dissection is reused)")
    top = int(top)
    main = comm is None or comm.main
    progress = progress and main
    if isinstance(layers, str):
        layers = [x.strip() for x in layers.split(",") if x.strip()]
    layers = list(layers) if layers else None
    # the compiled kernels and matplotlib load in the background while the data is opened and
    # while the kernels run (they release the GIL)
    warm = _load_kernels_in_background()
    with together(comm):
        ds = _open_broden(broden, categories)
        engine, dev = choose_engine(device)
        n_threads = _set_threads(threads, engine)
        spec = getattr(model, "spec", model)
        rd = resolve_run(run, spec)
    if comm is not None:
        comm.check_shared_dir(rd.path)
        comm.check_same("dissect", {"run": str(rd.path), "broden": str(ds.root), "layers": layers,
                                    "quantile": float(quantile), "iou_threshold": float(iou_threshold),
                                    "categories": list(ds.categories), "batch_size": int(batch_size),
                                    "top": top, "report": bool(report)})
    if no_store:
        from neurosem.dissect.stream import ModelStream

        act_path = Path(f"<{getattr(model, 'spec', model)} on {ds.root}, not stored>")
        opened: Any = ModelStream(model, ds.root, layers, weights, device)
    else:
        act_path = _activations(rd, model, ds.root, layers, weights, batch_size, device, progress)
        opened = ActivationStore.open(act_path)

    with opened as store:
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
            "method_version": METHOD_VERSION, "top": top, "no_store": bool(no_store),
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
        if comm is not None:
            comm.barrier()  # every rank has read the old dissect.h5 before rank 0 replaces it

        computed: dict[str, Any] = {}
        labels = None
        if todo:
            t0 = time.perf_counter()
            if comm is not None and not main:
                comm.barrier()  # rank 0 builds the label cache first, the others read it
            source = _labels(ds, label_cache, progress)
            if comm is not None and main:
                comm.barrier()
            timings["labels"] = time.perf_counter() - t0
            warm.join()
            passes = run_passes(store, todo, source, quantile, engine, dev, batch_size, top, progress,
                                timings=timings, threads=n_threads, comm=comm)
            k_cat = len(ds.categories)
            for name in todo:
                res = passes[name].result
                if labels is None:
                    labels = res
                best, best_iou, cat_best, cat_iou = best_labels(res.iou, res.label_category, k_cat)
                tp = passes[name].top
                computed[name] = LayerDissection(
                    layer=name, threshold=passes[name].threshold, iou=res.iou, best_label=best,
                    best_iou=best_iou, category_best_label=cat_best, category_best_iou=cat_iou,
                    top_images=tp.images, top_values=tp.maxes, top_sizes=tp.sizes, top_maps=tp.maps)

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
        explained: dict[str, Any] = {}
        if main:
            write_dissection(rd.dissection, args, ds.fingerprint(), numbers, label_names, label_cats, gt,
                             ds.categories, all_layers)
            if explain.formulas or explain.permutations:
                from neurosem.dissect.explain import run_explain

                t0 = time.perf_counter()
                source = source if todo else _labels(ds, label_cache, progress)
                explained, formula_csvs = run_explain(store, names, ds, source, all_layers, numbers, iou_threshold,
                                                      explain, rd.dissect_dir, progress)
                timings["formulas"] = time.perf_counter() - t0

    if not main:  # rank 0 writes the reports
        comm.barrier()
        dis = load_dissection(rd.dissection)
        dis.outputs = comm.broadcast(None)
        return dis
    dis = load_dissection(rd.dissection)
    t0 = time.perf_counter()
    warm.join()                     # the report's masks use the kernels too (also when nothing was computed)
    outputs = _write_reports(rd, dis, ds, engine, dev, report, progress, label_cache, explained)
    timings["reports"] = time.perf_counter() - t0
    dis.timings = {k: round(v, 4) for k, v in timings.items()}
    dis.outputs = {"dissection": str(rd.dissection), **outputs}
    dis.explained, dis.explain_options = explained, vars(explain)
    if explained:
        dis.outputs["formulas"] = formula_csvs
    if baseline:
        from neurosem.dissect.explain import run_baseline

        dis.baseline = run_baseline(dis, rd, model, ds.root, names, quantile=quantile, iou_threshold=iou_threshold,
                                    categories=categories, device=device, batch_size=batch_size, threads=threads,
                                    label_cache=label_cache, no_store=no_store, progress=progress)
        dis.outputs["baseline"] = dis.baseline["dissection"]
    rd.update_meta("dissect", {**args, "device": str(dev), "engine": engine, "threads": n_threads,
                               "seconds": dis.timings,
                               "batch_size": int(batch_size), "outputs": dis.outputs,
                               **({} if comm is None else {"world_size": comm.size})})
    if comm is not None:
        comm.barrier()
        comm.broadcast(dis.outputs)
    return dis


def _layer_from_file(dis: Any, name: str) -> Any:
    from neurosem.dissect.report import LayerDissection

    best, best_iou = dis.best(name)
    cat_best, cat_iou = dis.category_best(name)
    top_i, top_v = dis.top_images(name)
    sizes, maps = dis.top_maps(name)
    return LayerDissection(layer=name, threshold=dis.threshold(name, exact=True), iou=dis.iou(name),
                           best_label=best, best_iou=best_iou, category_best_label=cat_best,
                           category_best_iou=cat_iou, top_images=top_i, top_values=top_v,
                           top_sizes=sizes, top_maps=maps)


def top_masks(dis: Any, layer: str, seg_size: tuple[int, int], engine: str = "cpu",
              device: Any = "cpu") -> np.ndarray:
    """The dissection's masks over each unit's top images, ``bool [C, k, sh, sw]``: the same
    thresholds, upsampling and rule as the tally, from the raw maps kept in ``dissect.h5``.

    Example:
        >>> masks = top_masks(load_dissection("runs/resnet18"), "layer4", (112, 112))  # doctest: +SKIP
    """
    _, maps = dis.top_maps(layer)
    thr = dis.threshold(layer, exact=True)
    c, k, h, w = maps.shape
    units = np.repeat(np.arange(c), k)
    if engine == "cpu":
        from neurosem.dissect._kernels import Geometry, map_masks

        out = map_masks(maps.reshape(c * k, h, w), thr, units, Geometry(h, w, *seg_size))
        return out.reshape(c, k, *seg_size)
    import torch

    from neurosem.dissect.tally import unit_masks

    x = torch.from_numpy(maps.astype(np.float32)).to(device)      # [C, k, h, w] as k images of C maps
    m = unit_masks(x.transpose(0, 1).contiguous(), torch.as_tensor(thr, dtype=torch.float64), seg_size)
    return m.transpose(0, 1).cpu().numpy()


def _write_reports(rd: Any, dis: Any, ds: Any, engine: str, device: Any, report: bool,
                   progress: bool, label_cache: Any = None, explained: Any = None) -> dict[str, Any]:
    """CSV per layer and summary.json; with ``report``, one HTML page per layer + index.html and
    the summary figure. The pages cost in proportion to the units and images shown."""
    from neurosem.dissect.report import (UnitTiles, layer_html_name, write_index_html, write_layer_csv,
                                         write_layer_html, write_summary, write_summary_svg)

    out_dir = rd.dissect_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    csvs = [str(write_layer_csv(out_dir / f"{name}.csv", dis, name)) for name in dis.layers]
    summary = write_summary(out_dir / "summary.json", dis)
    outputs: dict[str, Any] = {"csv": csvs, "summary": str(summary)}
    if not report:
        return outputs
    figure = write_summary_svg(out_dir / "summary.svg", dis)     # `neurosem figures` adds PDF/PNG
    thumb_px = int(min(112, ds.image_size[0], ds.image_size[1]))
    thumbs: dict[int, bytes] = {}
    from neurosem.data.label_cache import ThumbnailCache

    thumb_cache = ThumbnailCache(ds, thumb_px, label_cache)
    pages = {}
    for name in dis.layers:
        top_i, _ = dis.top_images(name)
        masks = top_masks(dis, name, ds.seg_size, engine, device)
        tiles = []
        for u in range(top_i.shape[0]):
            t = UnitTiles()
            for j, i in enumerate(top_i[u]):
                if i >= 0:
                    t.images.append(int(i))
                    t.masks.append(masks[u, j])
            tiles.append(t)
        needed = sorted({i for t in tiles for i in t.images})
        for i in needed:
            if i not in thumbs:
                thumbs[i] = thumb_cache.get(i, lambda: _thumbnail_jpeg(ds, i, thumb_px))
        page = layer_html_name(name)
        write_layer_html(out_dir / page, dis, name, {i: thumbs[i] for i in needed}, tiles,
                         ds.image_ids, thumb_px, (explained or {}).get(name))
        pages[name] = page
    index = write_index_html(out_dir / "index.html", dis, pages, figure)
    outputs.update({"html": str(index), "figures": [str(figure)]})
    return outputs


def _thumbnail_jpeg(ds: Any, i: int, px: int) -> bytes:
    from neurosem.dissect.report import jpeg_bytes

    return jpeg_bytes(_thumbnail(ds, i, px))


def _thumbnail(ds: Any, i: int, px: int) -> np.ndarray:
    from PIL import Image

    img = ds.load_image(i, draft=(px, px))
    if img.size != (px, px):
        w, h = img.size
        if w == h and w % px == 0:
            img = img.reduce(w // px)           # an integer factor: a box filter, much faster
        else:
            img = img.resize((px, px), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)

"""Concept vectors (Net2Vec, Fong & Vedaldi 2018; Gu & Tresp 2019), trained together on the device.

For a layer with C units and a concept c: ``w_c [C]``, ``b_c``.

- Pixel concepts: ``mask_c(x) = σ(upsample(w_c · a(x)) + b_c)`` at the label size (bilinear,
  align_corners=False, as the dissection), loss ``−mean[α·M·L + (1−α)(1−M)(1−L)]`` with
  ``α = 1 −`` the concept's mean pixel fraction in the training images.
- Image concepts: a logistic classifier on the spatially pooled raw maps ``mean_hw(acts)`` (the
  features a global-average-pooling head sees; standardised on the training images while training,
  folded back into ``w_c, b_c`` afterwards), loss the same α-balanced cross-entropy.

``a(x)`` is the unit maps binarised at the dissection thresholds (``input="binary"``, Net2Vec's
default) or the raw maps normalised per unit to zero mean and unit variance over the training
images and positions (``input="raw"``). Every epoch is one pass over the training images of the
store and the label cache (all layers and all concepts together; concepts in blocks that bound the
memory); Adam updates each concept's parameters independently of the others.

Evaluation (one pass over the validation images): pixel concepts get the set IoU of ``mask > 0.5``
against the label over all validation pixels, and the same set IoU of every single unit's
dissection mask (``upsample(acts) > threshold``, :func:`~neurosem.dissect.tally.unit_masks`); the
best unit is the one with the largest validation IoU (an optimistic baseline). Image concepts get
the average precision of the classifier's score and of every unit's pooled raw activation.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from neurosem.concepts.data import Concepts, split_batches
from neurosem.errors import NeurosemError

INPUTS = ("binary", "raw")
#: the most elements of one [B, concepts, sh * sw] block of the pixel loss
BLOCK_ELEMENTS = 1 << 24


@dataclass
class TrainConfig:
    """Training settings: ``epochs``, Adam's ``lr``, images per ``batch_size``, ``input`` (binary/raw), ``seed``."""

    epochs: int = 20
    lr: float = 0.05
    batch_size: int = 64
    input: str = "binary"
    seed: int = 0

    def check(self) -> None:
        """One-line errors for settings out of range."""
        if self.input not in INPUTS:
            raise NeurosemError(f"--input {self.input!r}: use binary (units thresholded at the dissection "
                                "thresholds, Net2Vec) or raw (maps normalised per unit)")
        if int(self.epochs) < 1:
            raise NeurosemError(f"--epochs must be >= 1, got {self.epochs}")
        if not float(self.lr) > 0:
            raise NeurosemError(f"--lr must be > 0, got {self.lr}")
        if int(self.batch_size) < 1:
            raise NeurosemError(f"--batch-size must be >= 1, got {self.batch_size}")


@dataclass
class LayerConcepts:
    """The concept vectors of one layer and their validation scores (rows follow the concepts).

    Attributes:
        W ``[K, C]``, b ``[K]`` in the space of ``a(x)`` (image concepts: of the pooled raw maps);
        score ``[K]`` (pixel: set IoU at 0.5 on val; image: AP); unit_score ``[K]`` (the best single
        unit's IoU / AP on the same images); best_unit ``[K]``; units_90 ``[K]`` (units holding 90%
        of ``|w_c|``); alpha ``[K]``; loss ``[epochs]`` (mean training loss per concept);
        norm_mean, norm_std ``[C]`` (``input="raw"``; else zeros and ones); threshold ``[C]``
        (the float32 dissection thresholds that binarise the maps); epoch_seconds (wall time of
        each training epoch, all layers together; not saved).
    """

    W: np.ndarray
    b: np.ndarray
    score: np.ndarray
    unit_score: np.ndarray
    best_unit: np.ndarray
    units_90: np.ndarray
    alpha: np.ndarray
    loss: list[float] = field(default_factory=list)
    norm_mean: np.ndarray | None = None
    norm_std: np.ndarray | None = None
    threshold: np.ndarray | None = None
    epoch_seconds: list[float] = field(default_factory=list)


def units_holding(W: np.ndarray, share: float = 0.9) -> np.ndarray:
    """``[K]``: the fewest units whose ``|w|`` sum to ``share`` of each row's total (0 for a zero row).

    Example:
        >>> units_holding(np.array([[3.0, -1.0, 0.0], [1.0, 1.0, 1.0]])).tolist()
        [2, 3]
    """
    a = np.sort(np.abs(np.asarray(W, dtype=np.float64)), axis=1)[:, ::-1]
    total = a.sum(1, keepdims=True)
    cum = np.cumsum(a, axis=1)
    need = cum >= share * total * (1 - 1e-12)
    out = np.argmax(need, axis=1) + 1
    return np.where(total[:, 0] > 0, out, 0).astype(np.int64)


def _ap_one_score(score: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``[K]`` AP of one score column ``[N]`` against each column of ``y bool [N, K]`` (ties grouped)."""
    n = score.shape[0]
    order = np.argsort(-score, kind="stable")
    s, t = score[order], y[order].astype(np.float64)
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), n - 1]     # the end of each group of ties
    tp = np.cumsum(t, axis=0)[last]                          # [G, K]
    pos = t.sum(0)
    precision = tp / (last + 1)[:, None]
    gain = np.diff(np.vstack([np.zeros((1, t.shape[1])), tp]), axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pos > 0, (precision * gain).sum(0) / pos, np.nan)


def average_precision(scores: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``[K]`` average precision of ``scores [N, K]`` against ``y bool [N, K]`` (tied scores form one
    step, as scikit-learn's ``average_precision_score``); NaN for a column without positives.

    Example:
        >>> average_precision(np.array([[0.9], [0.8], [0.1]]), np.array([[1], [0], [1]], bool)).round(4).tolist()
        [0.8333]
    """
    if scores.shape[0] == 0:
        return np.full(scores.shape[1], np.nan)
    return np.array([_ap_one_score(scores[:, j], y[:, [j]])[0] for j in range(scores.shape[1])])


def unit_average_precision(pooled: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``[C, K]``: the AP of each unit's score ``pooled [N, C]`` for each concept ``y bool [N, K]``
    (0 where a concept has no positive)."""
    if pooled.shape[0] == 0:
        return np.zeros((pooled.shape[1], y.shape[1]))
    return np.nan_to_num(np.stack([_ap_one_score(pooled[:, u], y) for u in range(pooled.shape[1])]), nan=0.0)


class UnitFeatures:
    """``a(x)`` of one layer from its raw maps: ``acts [B, C, h, w]`` -> float32 torch ``[B, C, h, w]``."""

    def __init__(self, mode: str, threshold: np.ndarray, mean: np.ndarray | None, std: np.ndarray | None,
                 device: Any) -> None:
        import torch

        self.mode = mode
        self.thr = torch.as_tensor(np.asarray(threshold, dtype=np.float32), device=device).view(1, -1, 1, 1)
        c = self.thr.shape[1]
        self.mean = torch.as_tensor(np.zeros(c) if mean is None else mean, dtype=torch.float32,
                                    device=device).view(1, -1, 1, 1)
        self.std = torch.as_tensor(np.ones(c) if std is None else std, dtype=torch.float32,
                                   device=device).view(1, -1, 1, 1)

    def __call__(self, acts: Any) -> Any:
        if self.mode == "binary":
            return (acts > self.thr).float()
        return (acts.float() - self.mean) / self.std


def feature_statistics(store: Any, layers: Sequence[str], labels: Any, train: np.ndarray,
                       batch_size: int) -> dict[str, dict[str, np.ndarray]]:
    """One pass over the training images: per layer the per-unit mean and std of the raw maps over
    images and positions (``px_*``), and over images of the pooled raw maps (``raw_*``)."""
    sums: dict[str, dict[str, Any]] = {}
    n = 0
    for _, acts, _, _ in split_batches(store, layers, labels, train, batch_size):
        n += next(iter(acts.values())).shape[0]
        for name in layers:
            a = acts[name].astype(np.float64)
            pooled_raw = a.mean((2, 3))
            s = sums.setdefault(name, {k: 0.0 for k in ("px", "px2", "raw", "raw2")})
            s["px"] = s["px"] + a.sum((0, 2, 3))
            s["px2"] = s["px2"] + (a * a).sum((0, 2, 3))
            s["raw"] = s["raw"] + pooled_raw.sum(0)
            s["raw2"] = s["raw2"] + (pooled_raw ** 2).sum(0)
    if n == 0:
        raise NeurosemError("no training images: the split leaves none to train the concept vectors on")
    out = {}
    for name in layers:
        s = sums[name]
        hw = store.shape(name)[2] * store.shape(name)[3]

        def moments(a: Any, a2: Any, m: int) -> tuple[np.ndarray, np.ndarray]:
            mean = np.asarray(a) / m
            return mean, np.sqrt(np.maximum(np.asarray(a2) / m - mean ** 2, 0.0))

        px_mean, px_std = moments(s["px"], s["px2"], n * hw)
        raw_mean, raw_std = moments(s["raw"], s["raw2"], n)
        out[name] = {"px_mean": px_mean, "px_std": px_std, "raw_mean": raw_mean, "raw_std": raw_std}
    return out


def _safe(std: np.ndarray) -> np.ndarray:
    return np.where(std > 1e-12, std, 1.0)


class _LayerModel:
    """The trainable parameters of one layer (pixel and image concepts separately)."""

    def __init__(self, c: int, concepts: Concepts, alpha: np.ndarray, feats: UnitFeatures, pooled_mean: np.ndarray,
                 pooled_std: np.ndarray, device: Any) -> None:
        import torch

        self.kp, self.ki = int(concepts.pixel.sum()), int((~concepts.pixel).sum())
        self.Wp = torch.zeros(self.kp, c, device=device, requires_grad=True)
        self.bp = torch.zeros(self.kp, device=device, requires_grad=True)
        self.Wi = torch.zeros(self.ki, c, device=device, requires_grad=True)
        self.bi = torch.zeros(self.ki, device=device, requires_grad=True)
        self.alpha_p = torch.as_tensor(alpha[concepts.pixel], dtype=torch.float32, device=device)
        self.alpha_i = torch.as_tensor(alpha[~concepts.pixel], dtype=torch.float32, device=device)
        self.feats = feats
        self.pm = torch.as_tensor(pooled_mean, dtype=torch.float32, device=device)
        self.ps = torch.as_tensor(_safe(pooled_std), dtype=torch.float32, device=device)

    def params(self) -> list[Any]:
        return [self.Wp, self.bp, self.Wi, self.bi]


def _pixel_targets(seg: Any, lut: Any, k0: int, kb: int) -> Any:
    """``[B, kb, S]`` float: 1 where a pixel carries concept ``k0 + j`` in any plane of ``seg [B, P, S]``."""
    import torch

    rel = lut[seg] - k0
    rel = torch.where((rel >= 0) & (rel < kb), rel, torch.full_like(rel, kb))
    out = torch.zeros(seg.shape[0], kb + 1, seg.shape[2], device=seg.device)
    out.scatter_(1, rel, 1.0)
    return out[:, :kb]


def pixel_logits(W: Any, b: Any, x: Any, size: tuple[int, int]) -> Any:
    """``upsample(W · x) + b``: ``W [k, C]``, ``x [B, C, h, w]`` -> ``[B, k, sh * sw]``."""
    import torch
    import torch.nn.functional as F

    z = torch.einsum("kc,bchw->bkhw", W, x)
    if tuple(z.shape[2:]) != tuple(size):
        z = F.interpolate(z, size=size, mode="bilinear", align_corners=False)
    return z.flatten(2) + b.view(1, -1, 1)


def _blocks(k: int, b: int, s: int) -> list[tuple[int, int]]:
    step = max(1, BLOCK_ELEMENTS // max(1, b * s))
    return [(a, min(k, a + step)) for a in range(0, k, step)]


def _image_targets(il: Any, lut: Any, k: int) -> Any:
    """``[B, k]`` float: the image-level concepts each image carries."""
    import torch

    idx = lut[il]
    idx = torch.where(idx >= 0, idx, torch.full_like(idx, k))
    out = torch.zeros(il.shape[0], k + 1, device=il.device)
    out.scatter_(1, idx, 1.0)
    return out[:, :k]


def train_layers(store: Any, layers: Sequence[str], labels: Any, concepts: Concepts, alpha: np.ndarray,
                 thresholds: dict[str, tuple[np.ndarray, np.ndarray]], train: np.ndarray, val: np.ndarray,
                 cfg: TrainConfig, device: Any, progress: bool = True) -> dict[str, LayerConcepts]:
    """Train the concept vectors of every layer together, then score them on ``val``.

    Args:
        store: an open complete :class:`~neurosem.store.ActivationStore`.
        layers: the layers.
        labels: a :class:`~neurosem.dissect.passes.LabelSource` of the Broden set.
        concepts: the concepts (each occurs in both splits).
        alpha: ``[K]`` Net2Vec's α of each concept.
        thresholds: per layer ``(float32 threshold [C], exact float64 threshold [C])`` of the dissection.
        train, val: ``bool [N]`` the images of each split.
        cfg: the settings; device: a torch device.
    """
    import torch
    import torch.nn.functional as F

    from neurosem._progress import progress as bar

    cfg.check()
    torch.manual_seed(cfg.seed)
    ds = labels.ds
    size = tuple(ds.seg_size)
    stats = feature_statistics(store, layers, labels, train, cfg.batch_size)
    models: dict[str, _LayerModel] = {}
    for name in layers:
        st, c = stats[name], store.shape(name)[1]
        mean, std = (st["px_mean"], _safe(st["px_std"])) if cfg.input == "raw" else (None, None)
        pm, ps = st["raw_mean"], st["raw_std"]
        feats = UnitFeatures(cfg.input, thresholds[name][0], mean, std, device)
        models[name] = _LayerModel(c, concepts, alpha, feats, pm, ps, device)
    opt = torch.optim.Adam([p for m in models.values() for p in m.params()], lr=float(cfg.lr))
    lut_p = torch.as_tensor(concepts.lookup(ds.n_labels, True), device=device)
    lut_i = torch.as_tensor(concepts.lookup(ds.n_labels, False), device=device)
    kp, ki = int(concepts.pixel.sum()), int((~concepts.pixel).sum())
    history: dict[str, list[float]] = {name: [] for name in layers}
    seconds: list[float] = []
    for _ in bar(range(int(cfg.epochs)), total=int(cfg.epochs), desc="concepts: train", enabled=progress,
                 unit="epoch"):
        totals = dict.fromkeys(layers, 0.0)
        n_batches = 0
        t0 = time.perf_counter()
        for _, acts, seg, il in split_batches(store, layers, labels, train, cfg.batch_size):
            seg_t = torch.from_numpy(seg.astype(np.int64)).to(device)
            il_t = torch.from_numpy(il.astype(np.int64)).to(device)
            y_img = _image_targets(il_t, lut_i, ki) if ki else None
            opt.zero_grad(set_to_none=True)
            for name in layers:
                m = models[name]
                x = m.feats(torch.from_numpy(acts[name]).to(device))
                for k0, k1 in _blocks(kp, x.shape[0], size[0] * size[1]):
                    L = _pixel_targets(seg_t, lut_p, k0, k1 - k0)
                    M = torch.sigmoid(pixel_logits(m.Wp[k0:k1], m.bp[k0:k1], x, size))
                    a = m.alpha_p[k0:k1].view(1, -1, 1)
                    loss = -(a * M * L + (1 - a) * (1 - M) * (1 - L)).mean((0, 2)).sum()
                    loss.backward()
                    totals[name] += float(loss.detach())
                if ki:
                    f = (torch.from_numpy(acts[name]).to(device).float().mean((2, 3)) - m.pm) / m.ps
                    z = f @ m.Wi.T + m.bi
                    a = m.alpha_i.view(1, -1)
                    loss = -(a * y_img * F.logsigmoid(z) + (1 - a) * (1 - y_img) * F.logsigmoid(-z)).mean(0).sum()
                    loss.backward()
                    totals[name] += float(loss.detach())
            opt.step()
            n_batches += 1
        seconds.append(time.perf_counter() - t0)
        for name in layers:
            history[name].append(totals[name] / max(1, n_batches) / max(1, len(concepts)))
    out = {}
    for name in layers:
        m = models[name]
        W = np.zeros((len(concepts), store.shape(name)[1]), dtype=np.float32)
        b = np.zeros(len(concepts), dtype=np.float32)
        W[concepts.pixel] = m.Wp.detach().cpu().numpy()
        b[concepts.pixel] = m.bp.detach().cpu().numpy()
        if ki:       # fold the standardisation back: z = f · (w / s) + (b − Σ w m / s)
            wi = (m.Wi / m.ps).detach()
            W[~concepts.pixel] = wi.cpu().numpy()
            b[~concepts.pixel] = (m.bi - wi @ m.pm).detach().cpu().numpy()
        raw = cfg.input == "raw"
        out[name] = LayerConcepts(W=W, b=b, score=np.zeros(0), unit_score=np.zeros(0),
                                  best_unit=np.zeros(0, np.int64), units_90=units_holding(W), alpha=alpha,
                                  loss=history[name],
                                  norm_mean=(stats[name]["px_mean"] if raw else np.zeros(W.shape[1])),
                                  norm_std=(_safe(stats[name]["px_std"]) if raw else np.ones(W.shape[1])),
                                  threshold=np.asarray(thresholds[name][0], dtype=np.float32),
                                  epoch_seconds=seconds)
    evaluate(store, layers, labels, concepts, out, thresholds, val, cfg, device)
    return out


def evaluate(store: Any, layers: Sequence[str], labels: Any, concepts: Concepts, result: dict[str, LayerConcepts],
             thresholds: dict[str, tuple[np.ndarray, np.ndarray]], val: np.ndarray, cfg: TrainConfig,
             device: Any) -> None:
    """Fill ``score``, ``unit_score`` and ``best_unit`` of each layer's result from one pass over ``val``."""
    import torch

    from neurosem.dissect.tally import unit_masks

    ds = labels.ds
    size = tuple(ds.seg_size)
    lut_p = torch.as_tensor(concepts.lookup(ds.n_labels, True), device=device)
    lut_i = torch.as_tensor(concepts.lookup(ds.n_labels, False), device=device)
    kp, ki = int(concepts.pixel.sum()), int((~concepts.pixel).sum())
    acc = {}
    for name in layers:
        c = store.shape(name)[1]
        r = result[name]
        acc[name] = {
            "feats": UnitFeatures(cfg.input, thresholds[name][0], r.norm_mean, r.norm_std, device),
            "thr": torch.as_tensor(np.asarray(thresholds[name][1], dtype=np.float64)),
            "Wp": torch.as_tensor(r.W[concepts.pixel], device=device),
            "bp": torch.as_tensor(r.b[concepts.pixel], device=device),
            "Wi": torch.as_tensor(r.W[~concepts.pixel], device=device),
            "bi": torch.as_tensor(r.b[~concepts.pixel], device=device),
            "inter": torch.zeros(kp, dtype=torch.float64), "union": torch.zeros(kp, dtype=torch.float64),
            "both": torch.zeros(c, kp, dtype=torch.float64), "act": torch.zeros(c, dtype=torch.float64),
            "scores": [], "pooled": [],
        }
    gt = torch.zeros(kp, dtype=torch.float64)
    ys = []
    with torch.inference_mode():
        for _, acts, seg, il in split_batches(store, layers, labels, val, cfg.batch_size):
            seg_t = torch.from_numpy(seg.astype(np.int64)).to(device)
            il_t = torch.from_numpy(il.astype(np.int64)).to(device)
            if ki:
                ys.append(_image_targets(il_t, lut_i, ki).cpu().numpy() > 0)
            s = size[0] * size[1]
            for name in layers:
                e = acc[name]
                raw_all = torch.from_numpy(acts[name]).to(device)
                c = raw_all.shape[1]
                step = max(1, BLOCK_ELEMENTS // (c * s))          # images whose unit masks fit one block
                for i0 in range(0, raw_all.shape[0], step):
                    raw, seg_s = raw_all[i0:i0 + step], seg_t[i0:i0 + step]
                    x = e["feats"](raw)
                    masks = unit_masks(raw.float(), e["thr"], size).flatten(2).float()      # [b, C, S]
                    e["act"] += masks.sum((0, 2)).double().cpu()
                    for k0, k1 in _blocks(kp, raw.shape[0], s):
                        L = _pixel_targets(seg_s, lut_p, k0, k1 - k0)
                        if name == layers[0]:
                            gt[k0:k1] += L.sum((0, 2)).double().cpu()
                        P = (pixel_logits(e["Wp"][k0:k1], e["bp"][k0:k1], x, size) > 0).float()
                        inter = (P * L).sum((0, 2))
                        e["inter"][k0:k1] += inter.double().cpu()
                        e["union"][k0:k1] += (P.sum((0, 2)) + L.sum((0, 2)) - inter).double().cpu()
                        e["both"][:, k0:k1] += torch.einsum("bcs,bks->ck", masks, L).double().cpu()
                raw = raw_all
                if ki:
                    pooled = raw.float().mean((2, 3))
                    e["scores"].append((pooled @ e["Wi"].T + e["bi"]).cpu().numpy())
                    e["pooled"].append(pooled.cpu().numpy())
    y = np.concatenate(ys) if ys else np.zeros((0, ki), dtype=bool)
    for name in layers:
        e, r = acc[name], result[name]
        k = len(concepts)
        score, unit_score, best = np.zeros(k), np.zeros(k), np.zeros(k, dtype=np.int64)
        union = e["union"].numpy()
        score[concepts.pixel] = np.where(union > 0, e["inter"].numpy() / np.maximum(union, 1), 0.0)
        both = e["both"].numpy()
        iou_u = both / np.maximum(e["act"].numpy()[:, None] + gt.numpy()[None, :] - both, 1e-10)
        if kp:
            best[concepts.pixel] = iou_u.argmax(0)
            unit_score[concepts.pixel] = iou_u.max(0)
        if ki:
            score[~concepts.pixel] = average_precision(np.concatenate(e["scores"]), y)
            ap_u = unit_average_precision(np.concatenate(e["pooled"]), y)          # [C, ki]
            best[~concepts.pixel] = ap_u.argmax(0)
            unit_score[~concepts.pixel] = ap_u.max(0)
        r.score, r.unit_score, r.best_unit = score, unit_score, best

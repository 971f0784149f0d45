"""``neurosem explain IMAGE``: local interpretation of one image with the concept vectors.

For one image and one layer: each concept's map ``σ(upsample(w_c · a(x)) + b_c)`` at the label
size (image-level concepts: ``σ(w_c · mean_hw(acts) + b_c)``), the concepts present (a mask over at
least :data:`MIN_AREA` of the image, or a probability of at least 0.5), and, when the layer feeds
a linear classifier through global average pooling, the exact split of the class logit over the
concept basis (:func:`~neurosem.concepts.head.decompose_logit`): the parts, a residual and the
bias add up to the logit. The basis is the concept vectors as directions in the raw unit space
(pixel concepts of ``--input raw`` act on maps divided by the per-unit std σ: ``w_c / σ``).

Outputs, under ``RUN/explain/``: ``<image>_<layer>_class<k>.json`` and a panel (PNG, PDF): the
image, the top concept maps over it, and the contribution bars.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from neurosem.errors import NeurosemError

#: a pixel concept is present when its mask covers at least this fraction of the image
MIN_AREA = 0.01


@dataclass
class Explanation:
    """What :func:`explain` found (also written as JSON; see the module docstring)."""

    image: str
    layer: str
    class_index: int
    logit: float
    concepts: list[dict[str, Any]]
    decomposition: dict[str, Any] | None
    note: str
    outputs: dict[str, Any] = field(default_factory=dict)

    def lines(self, top: int = 5) -> list[str]:
        """The lines ``neurosem explain`` prints."""
        present = [c for c in self.concepts if c["present"]][:top]
        out = [f"{self.image}: class {self.class_index} (logit {self.logit:.4f}), layer {self.layer}",
               "  concepts present: " + (", ".join(
                   f"{c['concept']} ({'area' if c['kind'] == 'pixel' else 'p'} {c['value']:.2f})" for c in present)
                   or "none")]
        d = self.decomposition
        if d is None:
            out.append(f"  no logit decomposition: {self.note}")
        else:
            parts = ", ".join(f"{p['concept']} {p['contribution']:+.4f}" for p in d["top"][:top])
            out.append(f"  logit = sum over concepts + residual + bias: {d['sum_parts']:+.4f} "
                       f"{d['residual']:+.4f} {d['bias']:+.4f} = {d['total']:.4f} (exact)")
            out.append(f"  largest contributions: {parts}")
        for key, p in self.outputs.items():
            out.append(f"  {key}: {', '.join(map(str, p)) if isinstance(p, (list, tuple)) else p}")
        return out


def read_input_image(path: Any, size: tuple[int, int]) -> Any:
    """``[3, H, W]`` float tensor in [0, 1] of the image file at ``path``, resized (bilinear) to ``size``."""
    from PIL import Image

    from neurosem.data.transforms import pil_to_tensor, read_image

    p = Path(path)
    if p.is_dir():
        raise NeurosemError(f"{p} is a directory: pass an image file (PNG, JPEG, ...)")
    img = read_image(p, "image", "file missing; pass an image file",
                     hint="; pass an image file (PNG, JPEG, ...)")
    img = img.convert("RGB")
    h, w = size
    if img.size != (w, h):
        img = img.resize((w, h), Image.BILINEAR)
    return pil_to_tensor(img)


def concept_maps(cv: Any, layer: str, maps: Any, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``(probability maps [K, sh, sw], image probability [K])`` of ``maps [C, h, w]``: pixel
    concepts get their mask, image concepts a constant map of their probability."""
    import torch

    from neurosem.concepts.train import UnitFeatures, pixel_logits

    r = cv.layer(layer)
    feats = UnitFeatures(cv.args["input"], r.threshold, r.norm_mean, r.norm_std, "cpu")
    x = feats(maps[None].float())
    W, b = torch.as_tensor(r.W), torch.as_tensor(r.b)
    with torch.inference_mode():
        pix = torch.sigmoid(pixel_logits(W, b, x, size))[0].view(-1, *size).numpy()
        img = torch.sigmoid(maps[None].float().mean((2, 3)) @ W.T + b)[0].numpy()
    kind = cv.concepts.pixel
    out = np.where(kind[:, None, None], pix, img[:, None, None])
    return out.astype(np.float64), img.astype(np.float64)


def explain(image: Any, run: Any = None, layer: str | None = None, class_index: int | None = None, top: int = 5,
            model: Any = None, out: Any = None, figures: bool = True) -> Explanation:
    """Explain the model's decision on one image with the run's concept vectors.

    Args:
        image: an image file.
        run: the run directory with ``concepts.h5``.
        layer: a layer with concept vectors (default: the last one).
        class_index: the class (default: the model's top class).
        top: how many concept maps and contributions are shown.
        model: a :class:`~neurosem.models.LoadedModel` (default: the run's recorded model and weights).
        out: the output folder (default ``RUN/explain``).
        figures: draw the panel.

    Example:
        >>> e = explain("cat.jpg", run="runs/resnet18", layer="layer4")  # doctest: +SKIP
        >>> e.decomposition["total"] == e.logit                          # doctest: +SKIP
        True
    """
    from neurosem.concepts.head import decompose_logit, layer_and_logits, linear_head, run_model
    from neurosem.concepts.io import load_concepts
    from neurosem.run import resolve_run

    if isinstance(top, bool) or int(top) < 1:
        raise NeurosemError(f"--top {top}: show at least 1 concept")
    rd = resolve_run(run, must_exist=True)
    cv = load_concepts(rd)
    layer = layer or cv.layers[-1]
    r = cv.layer(layer)
    size = tuple(cv.args["image_size"])
    x = read_input_image(image, size)
    lm, why = run_model(cv, model)
    if lm is None:
        raise NeurosemError(f"explain needs the run's model: {why}")
    tf = (cv.args.get("provenance") or {}).get("transform") or {}
    mean = tf.get("mean") or list(getattr(lm, "mean", (0.0, 0.0, 0.0)))
    std = tf.get("std") or list(getattr(lm, "std", (1.0, 1.0, 1.0)))
    logits, maps = layer_and_logits(lm, layer, x, mean, std)
    n_classes = int(logits.shape[0])
    k = int(logits.argmax()) if class_index is None else int(class_index)
    if not 0 <= k < n_classes:
        raise NeurosemError(f"--class {class_index} is out of range: the model has {n_classes} classes (0..{n_classes - 1})")
    if maps.shape[0] != r.W.shape[1]:
        raise NeurosemError(f"{layer} has {maps.shape[0]} units here but {r.W.shape[1]} in {cv.path}: "
                            "the model is not the one the concept vectors were trained on")
    seg_size = tuple(cv.args["label_size"])
    pmaps, probs = concept_maps(cv, layer, maps, seg_size)
    names, kinds = cv.concepts.names, cv.concepts.pixel
    area = (pmaps > 0.5).mean((1, 2))
    concepts = []
    for j, name in enumerate(names):
        value = float(area[j] if kinds[j] else probs[j])
        concepts.append({"concept": name, "category": cv.concepts.categories[j],
                         "kind": "pixel" if kinds[j] else "image", "value": value,
                         "present": bool(value >= MIN_AREA if kinds[j] else value >= 0.5)})
    concepts.sort(key=lambda c: (not c["present"], -c["value"]))
    head, note = linear_head(lm, layer, (3, *size))
    decomposition = None
    if head is not None:
        pooled = maps.double().mean((1, 2)).numpy()
        scale = np.where(kinds[:, None], np.asarray(r.norm_std)[None, :], 1.0)
        d = decompose_logit(pooled, r.W / scale, head, k)
        order = np.argsort(-np.abs(d.parts), kind="stable")
        decomposition = {
            "head": head.name, "logit": d.logit, "model_logit": float(logits[k]), "bias": d.bias,
            "residual": d.residual, "sum_parts": float(d.parts.sum()), "total": d.total,
            "parts": {names[j]: float(d.parts[j]) for j in range(len(names))},
            "coefficients": {names[j]: float(d.coef[j]) for j in range(len(names))},
            "top": [{"concept": names[j], "contribution": float(d.parts[j])} for j in order[:int(top)]],
        }
        note = ("exact: the logit is V_k · mean_hw(a) + c_k; the pooled feature is split by least squares over "
                "the concept vectors plus a residual, so parts + residual + bias = the logit")
    stem = Path(str(image)).stem
    e = Explanation(image=str(image), layer=layer, class_index=k, logit=float(logits[k]), concepts=concepts,
                    decomposition=decomposition, note=note)
    out_dir = Path(out) if out is not None else rd.path / "explain"
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / f"{stem}_{layer}_class{k}"
    js = base.with_suffix(".json")
    js.write_text(json.dumps({"image": e.image, "layer": layer, "class": k, "logit": e.logit,
                              "logits": logits.tolist(), "concepts": concepts, "decomposition": decomposition,
                              "note": note}, indent=1))
    e.outputs["json"] = str(js)
    if figures:
        from neurosem.concepts.panel import draw_panel

        e.outputs["figures"] = [str(p) for p in draw_panel(base, x, pmaps, e, names, int(top))]
    return e

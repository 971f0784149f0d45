"""The ``explain`` panel: the image, its top concept maps over it, and the logit's contributions."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np


def _upsample(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``m [sh, sw]`` resized to ``size`` (bilinear, as PIL) for display."""
    from PIL import Image

    img = Image.fromarray(np.asarray(m, dtype=np.float32), mode="F")
    return np.asarray(img.resize((size[1], size[0]), Image.BILINEAR), dtype=np.float64)


def draw_panel(base: Path, image: Any, pmaps: np.ndarray, e: Any, names: Sequence[str], top: int) -> list[Path]:
    """Write ``base.png`` and ``base.pdf``.

    Args:
        image: ``[3, H, W]`` in [0, 1]; pmaps: ``[K, sh, sw]`` concept probabilities; e: the
            :class:`~neurosem.concepts.explain.Explanation`; names: the concept names.
    """
    from neurosem.analysis._plotstyle import hide_ticks, light_mask_cmap, new_figure, plot_style, save_figure

    rgb = np.clip(np.transpose(np.asarray(image, dtype=np.float64), (1, 2, 0)), 0, 1)
    h, w = rgb.shape[:2]
    shown = [c for c in e.concepts if c["kind"] == "pixel"][:top]
    d = e.decomposition
    ncols = 1 + len(shown) + (1 if d is not None else 0)
    with plot_style():
        fig, axes = new_figure(1, ncols, figsize=(2.0 * ncols + (1.5 if d is not None else 0), 2.4), squeeze=False)
        axes = axes[0]
        axes[0].imshow(rgb)
        axes[0].set_title(f"class {e.class_index}\nlogit {e.logit:.3f}", fontsize=8)
        hide_ticks(axes[0])
        cmap = light_mask_cmap()
        for ax, c in zip(axes[1:], shown):
            j = list(names).index(c["concept"])
            ax.imshow(rgb)
            ax.imshow(_upsample(pmaps[j], (h, w)), cmap=cmap, vmin=0, vmax=1)
            ax.set_title(f"{c['concept']} ({c['category']})\narea {c['value']:.2f}", fontsize=8)
            hide_ticks(ax)
        if d is not None:
            ax = axes[-1]
            items = [(p["concept"], p["contribution"]) for p in d["top"]] + [("residual", d["residual"]),
                                                                              ("bias", d["bias"])]
            ys = np.arange(len(items))[::-1]
            ax.barh(ys, [v for _, v in items], color=["#0072b2" if v >= 0 else "#d55e00" for _, v in items])
            ax.set_yticks(ys, [n for n, _ in items], fontsize=7)
            ax.axvline(0, color=".15", lw=0.8)
            ax.set_title(f"contributions (sum {d['total']:.3f})", fontsize=8)
        return save_figure(fig, base, ("png", "pdf"), dpi=150, close=True)

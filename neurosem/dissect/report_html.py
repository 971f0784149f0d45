"""The dissection's pages: the self-contained HTML report (one page per layer and an index) and
the summary figure (an SVG written directly for the report; matplotlib's PDF/PNG/SVG for
``neurosem figures``). Re-exported by :mod:`neurosem.dissect.report`.
"""
from __future__ import annotations

import base64
import html
import io
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from neurosem.dissect.report import Dissection


# ------------------------------------------------------------------------------------ figure
def summary_figure(dis: Dissection) -> Any:
    """The figure: interpretable units per category (bars) per layer; only the categories that
    have interpretable units get bars and legend entries (each in its own colour,
    :func:`~neurosem.analysis._plotstyle.category_palette`)."""
    from matplotlib.ticker import MaxNLocator

    from neurosem.analysis._plotstyle import category_palette, new_figure

    all_cats = list(dis.categories)
    counts = np.array([[dis.counts(layer)[c] for c in all_cats] for layer in dis.layers], dtype=float)
    shown = [k for k in range(len(all_cats)) if counts[:, k].any()]
    pal = category_palette(all_cats)
    fig, ax = new_figure(figsize=(max(3.2, 0.9 * len(dis.layers) + 1.6), 2.4))
    width = 0.8 / max(1, len(shown))
    x = np.arange(len(dis.layers))
    for j, k in enumerate(shown):
        ax.bar(x - 0.4 + width * (j + 0.5), counts[:, k], width, color=pal[all_cats[k]], label=all_cats[k])
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xticks(x)
    ax.set_xticklabels(dis.layers, rotation=30 if len(dis.layers) > 4 else 0)
    ax.set_xlabel("layer")
    ax.set_ylabel("interpretable units")
    ax.set_title(f"units with IoU \u2265 {dis.iou_threshold:g}, by category of their best label")
    if shown:
        ax.legend(frameon=False, fontsize="small", ncol=1, bbox_to_anchor=(1.0, 1.0), loc="upper left")
    else:
        ax.text(0.5, 0.5, "no interpretable units", transform=ax.transAxes, ha="center", va="center")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return fig


def write_summary_figure(path_without_suffix: Path, dis: Dissection,
                         formats: Sequence[str] = ("pdf", "png", "svg")) -> list[Path]:
    """:func:`summary_figure` as ``figures/dissect_summary.*``."""
    from neurosem.analysis._plotstyle import plot_style, save_figure

    with plot_style():
        return save_figure(summary_figure(dis), path_without_suffix, tuple(formats), close=True)


def _nice_step(top: float) -> int:
    """An integer tick step giving at most about 6 ticks up to ``top``."""
    for step in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 5000):
        if top / step <= 6:
            return step
    return int(10 ** np.ceil(np.log10(max(1.0, top / 6))))


def summary_svg(dis: Dissection) -> str:
    """The summary figure as a standalone SVG written directly (no plotting library: the dissection
    stays fast): interpretable units per category (bars) per layer, only the categories that have
    interpretable units, in :data:`~neurosem.analysis._plotstyle.CATEGORY_COLORS`. ``neurosem
    figures`` draws the same figure with matplotlib as PDF, PNG and SVG (:func:`summary_figure`).

    Example:
        >>> summary_svg(load_dissection("runs/resnet18"))[:4]     # doctest: +SKIP
        '<svg'
    """
    from neurosem.analysis._plotstyle import CATEGORY_COLORS

    cats = list(dis.categories)
    counts = np.array([[dis.counts(layer)[c] for c in cats] for layer in dis.layers], dtype=np.int64)
    shown = [k for k in range(len(cats)) if counts[:, k].any()]
    extra = iter(["#7f7f7f", "#bcbd22", "#17becf", "#8c564b", "#e377c2", "#9467bd"] * 10)
    colour = {c: CATEGORY_COLORS.get(c) or next(extra) for c in cats}
    n_layers = max(1, len(dis.layers))
    left, top_pad, plot_h, group_w = 52, 34, 170, max(60, 14 * max(1, len(shown)) + 24)
    plot_w = group_w * n_layers
    legend_x = left + plot_w + 16
    width, height = legend_x + 110, top_pad + plot_h + 48
    ymax = max(1, int(counts.max(initial=0)))
    step = _nice_step(ymax)
    ytop = int(np.ceil(ymax / step) * step)
    y = lambda v: top_pad + plot_h - plot_h * v / ytop  # noqa: E731
    esc = html.escape
    out = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' viewBox='0 0 {width} {height}' "
           "font-family='DejaVu Sans, Helvetica, Arial, sans-serif' font-size='11'>",
           f"<rect width='{width}' height='{height}' fill='white'/>",
           f"<text x='{left + plot_w / 2:.1f}' y='16' text-anchor='middle' font-size='12'>units with IoU "
           f"\u2265 {dis.iou_threshold:g}, by category of their best label</text>"]
    for v in range(0, ytop + 1, step):
        out.append(f"<line x1='{left - 4}' x2='{left}' y1='{y(v):.1f}' y2='{y(v):.1f}' stroke='#333'/>"
                   f"<text x='{left - 7}' y='{y(v) + 4:.1f}' text-anchor='end'>{v}</text>")
    out.append(f"<line x1='{left}' x2='{left}' y1='{top_pad}' y2='{top_pad + plot_h}' stroke='#333'/>"
               f"<line x1='{left}' x2='{left + plot_w}' y1='{top_pad + plot_h}' y2='{top_pad + plot_h}' stroke='#333'/>")
    bar_w = (group_w - 20) / max(1, len(shown))
    for i, layer in enumerate(dis.layers):
        x0 = left + i * group_w + 10
        for j, k in enumerate(shown):
            v = int(counts[i, k])
            out.append(f"<rect x='{x0 + j * bar_w:.1f}' y='{y(v):.1f}' width='{bar_w - 1:.1f}' "
                       f"height='{top_pad + plot_h - y(v):.1f}' fill='{colour[cats[k]]}'>"
                       f"<title>{esc(layer)}: {v} {esc(cats[k])} units</title></rect>")
        out.append(f"<text x='{left + (i + 0.5) * group_w:.1f}' y='{top_pad + plot_h + 15}' "
                   f"text-anchor='middle'>{esc(layer)}</text>")
    out.append(f"<text x='{left + plot_w / 2:.1f}' y='{height - 8}' text-anchor='middle'>layer</text>"
               f"<text transform='translate(14 {top_pad + plot_h / 2:.1f}) rotate(-90)' text-anchor='middle'>"
               "interpretable units</text>")
    if not shown:
        out.append(f"<text x='{left + plot_w / 2:.1f}' y='{top_pad + plot_h / 2:.1f}' text-anchor='middle'>"
                   "no interpretable units</text>")
    for j, k in enumerate(shown):
        yy = top_pad + 6 + 16 * j
        out.append(f"<rect x='{legend_x}' y='{yy}' width='10' height='10' fill='{colour[cats[k]]}'/>"
                   f"<text x='{legend_x + 15}' y='{yy + 9}'>{esc(cats[k])}</text>")
    out.append("</svg>")
    return "".join(out)


def write_summary_svg(path: Path, dis: Dissection) -> Path:
    """:func:`summary_svg` written to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(summary_svg(dis), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------ HTML
#: mask overlay palette: 0 = clear (inside the mask), 1 = dark veil (outside), 2 = edge (yellow)
_OVERLAY_PALETTE = [0, 0, 0, 0, 0, 0, 255, 214, 0]
_OVERLAY_ALPHA = bytes([0, 170, 255])


def mask_overlay(mask: np.ndarray) -> np.ndarray:
    """``bool [..., h, w]`` -> ``uint8 [..., h, w]`` overlay indices: 0 inside the mask, 1 outside
    (a dark veil), 2 on the mask's edge (yellow)."""
    m = np.asarray(mask, dtype=bool)
    out = np.where(m, 0, 1).astype(np.uint8)
    pad = np.pad(m, [(0, 0)] * (m.ndim - 2) + [(1, 1), (1, 1)], mode="edge")
    edge = m & ~(pad[..., :-2, 1:-1] & pad[..., 2:, 1:-1] & pad[..., 1:-1, :-2] & pad[..., 1:-1, 2:])
    out[edge] = 2
    return out


def _overlay_uris(masks: Sequence[np.ndarray]) -> list[str]:
    """:func:`overlay_data_uri` of many masks of one size (the overlays computed at once, by the
    compiled kernel where numba is installed)."""
    if not len(masks):
        return []
    from neurosem.dissect._kernels import overlay_scanlines

    stacked = np.stack(masks)
    rows = overlay_scanlines(stacked)
    if rows is None:
        pngs = [palette_png(o, _OVERLAY_PALETTE, _OVERLAY_ALPHA) for o in mask_overlay(stacked)]
    else:
        h, w = stacked.shape[1:]
        pngs = [_png(w, h, r.tobytes(), _OVERLAY_PALETTE, _OVERLAY_ALPHA) for r in rows]
    return ["data:image/png;base64," + base64.b64encode(p).decode("ascii") for p in pngs]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


def palette_png(indices: np.ndarray, palette: Sequence[int], alpha: bytes, bits: int = 2) -> bytes:
    """A palette PNG (``bits`` per pixel, with transparency) of ``indices: uint8 [h, w]``, written
    directly (no PIL: a few tens of microseconds for a mask).

    Example:
        >>> from PIL import Image; import io
        >>> png = palette_png(np.array([[0, 1, 2]], np.uint8), _OVERLAY_PALETTE, _OVERLAY_ALPHA)
        >>> np.asarray(Image.open(io.BytesIO(png))).tolist()
        [[0, 1, 2]]
    """
    idx = np.asarray(indices, dtype=np.uint8)
    h, w = idx.shape
    per = 8 // bits
    padded = np.zeros((h, -(-w // per) * per), dtype=np.uint8)
    padded[:, :w] = idx
    groups = padded.reshape(h, -1, per)
    packed = np.zeros(groups.shape[:2], dtype=np.uint8)
    for k in range(per):
        packed |= groups[:, :, k] << (8 - bits * (k + 1))
    raw = np.concatenate([np.zeros((h, 1), dtype=np.uint8), packed], 1).tobytes()   # filter 0 per row
    return _png(w, h, raw, palette, alpha, bits)


def _png(w: int, h: int, raw: bytes, palette: Sequence[int], alpha: bytes, bits: int = 2) -> bytes:
    """A palette PNG from its raw scanlines (each a filter byte 0, then the packed indices)."""
    ihdr = int(w).to_bytes(4, "big") + int(h).to_bytes(4, "big") + bytes([bits, 3, 0, 0, 0])
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"PLTE", bytes(palette))
            + _chunk(b"tRNS", alpha) + _chunk(b"IDAT", zlib.compress(raw, 6)) + _chunk(b"IEND", b""))


def overlay_data_uri(mask: np.ndarray) -> str:
    """The mask overlay as a palette PNG with transparency (a few hundred bytes)."""
    png = palette_png(mask_overlay(mask), _OVERLAY_PALETTE, _OVERLAY_ALPHA)
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def jpeg_bytes(arr: np.ndarray, quality: int = 88) -> bytes:
    """``uint8 [H, W, 3]`` as JPEG."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def jpeg_data_uri(image: "np.ndarray | bytes", quality: int = 88) -> str:
    """``uint8 [H, W, 3]`` (or JPEG bytes) -> ``data:image/jpeg;base64,...`` (the report's thumbnails)."""
    data = image if isinstance(image, (bytes, bytearray)) else jpeg_bytes(image, quality)
    return "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii")


_CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.5em}
table.counts{border-collapse:collapse;margin:.5em 0}table.counts td,table.counts th{border:1px solid #ccc;padding:2px 8px;text-align:right}
table.counts th{background:#f3f3f3}
.unit{display:inline-block;vertical-align:top;margin:6px;padding:6px;border:1px solid #ddd;border-radius:4px;width:max-content}
.unit.dim{opacity:.55}
.unit .cap{font-size:12px;margin-bottom:4px}
.tile{display:inline-block;position:relative;margin-right:2px;background-size:100% 100%;image-rendering:auto}
.tile img{position:absolute;left:0;top:0;width:100%;height:100%;image-rendering:pixelated}
.iou{font-variant-numeric:tabular-nums}
.note{color:#666;font-size:12px}
"""


def _counts_table(rows: Iterable[tuple[str, dict[str, int], int, int]], categories: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in categories)
    out = [f"<table class='counts'><tr><th style='text-align:left'>layer</th>{head}<th>interpretable</th><th>units</th></tr>"]
    for name, counts, n, total in rows:
        cells = "".join(f"<td>{counts.get(c, 0)}</td>" for c in categories)
        out.append(f"<tr><td style='text-align:left'>{name}</td>{cells}<td>{n}</td><td>{total}</td></tr>")
    out.append("</table>")
    return "".join(out)


@dataclass
class UnitTiles:
    """What the HTML shows for one unit: its top images (keys into the image table) and masks."""

    images: list[int] = field(default_factory=list)     # dataset positions
    masks: list[np.ndarray] = field(default_factory=list)  # bool [sh, sw] each


def write_layer_html(path: Path, dis: Dissection, layer: str, thumbs: dict[int, np.ndarray],
                     tiles: Sequence[UnitTiles], image_ids: Sequence[str], thumb_px: int,
                     formulas: Any = None) -> Path:
    """One self-contained page for a layer: units sorted by IoU, each with its label, IoU and top
    images (thresholded mask over each), and the interpretable units per category. ``formulas``
    (a :class:`~neurosem.dissect.explain.LayerExplanation`): each unit's formula and its p-values
    are shown beside the label."""
    best, best_iou = dis.best(layer)
    keep = dis.interpretable(layer)
    counts = dis.counts(layer)
    styles = [f".i{i}{{background-image:url({jpeg_data_uri(t)})}}" for i, t in sorted(thumbs.items())]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>neurosem dissection: {html.escape(layer)}</title>",
        f"<style>{_CSS}{''.join(styles)}</style></head><body>",
        "<p><a href='index.html'>&larr; all layers</a></p>",
        f"<h1>Layer {html.escape(layer)}</h1>",
        f"<p>{int(keep.sum())} of {len(best)} units are interpretable (best IoU &ge; {dis.iou_threshold:g}); "
        f"quantile {dis.args.get('quantile', '?')}, run {html.escape(str(dis.path.parent))}.</p>",
        _counts_table([(html.escape(layer), counts, int(keep.sum()), len(best))], dis.categories),
        "<p class='note'>Each unit: its best label, category and IoU, then the images where its mask is "
        "largest (the mask: the unit's map upsampled to the label size and thresholded, exactly as the "
        "IoU counts it); outside the mask the image is darkened, the mask edge is yellow.</p>",
    ]
    order = np.argsort(-best_iou, kind="stable")
    uris = iter(_overlay_uris([m for u in order for m in tiles[u].masks]))
    for u in order:
        label, cat, iou = dis.unit_label(layer, int(u))
        cls = "unit" if keep[u] else "unit dim"
        parts.append(f"<div class='{cls}' id='u{u}'><div class='cap'><b>unit {u}</b> &middot; "
                     f"{html.escape(label)} ({html.escape(cat)}) &middot; IoU <span class='iou'>{iou:.3f}</span>"
                     f"{_formula_caption(formulas, int(u))}</div>")
        t = tiles[u]
        for img in t.images:
            title = html.escape(image_ids[img]) if 0 <= img < len(image_ids) else str(img)
            parts.append(f"<span class='tile i{img}' title='{title}' style='width:{thumb_px}px;height:{thumb_px}px'>"
                         f"<img alt='' src='{next(uris)}'></span>")
        parts.append("</div>")
    parts.append("</body></html>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(parts), encoding="utf-8")
    return path


def _formula_caption(formulas: Any, unit: int) -> str:
    """`` · p 0.010 · formula F (IoU 0.123, single 0.100, p 0.010)`` of a unit (empty without)."""
    if formulas is None or unit >= len(formulas.rows):
        return ""
    r = formulas.rows[unit]
    out = ""
    if r.get("p_value_label") is not None:
        out += f" &middot; p <span class='iou'>{r['p_value_label']:.3f}</span>"
    if r.get("iou_formula") is not None:
        p = f", p {r['p_value']:.3f}" if r.get("p_value") is not None else ""
        out += (f"<br>formula: <b>{html.escape(r['formula'])}</b> (IoU <span class='iou'>{r['iou_formula']:.3f}"
                f"</span>; best single {html.escape(r['single'])} {r['iou_single']:.3f}{p})")
    return out


def layer_html_name(layer: str) -> str:
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in layer)
    return f"{safe}.html"


def write_index_html(path: Path, dis: Dissection, layer_pages: dict[str, str],
                     figure_svg: Path | None = None) -> Path:
    """The entry page: counts per category per layer, the summary figure, links to the layers."""
    rows = []
    for layer in dis.layers:
        keep = dis.interpretable(layer)
        link = f"<a href='{html.escape(layer_pages[layer])}'>{html.escape(layer)}</a>" if layer in layer_pages \
            else html.escape(layer)
        rows.append((link, dis.counts(layer), int(keep.sum()), dis.n_units(layer)))
    fig = ""
    if figure_svg is not None and Path(figure_svg).is_file():
        data = base64.b64encode(Path(figure_svg).read_bytes()).decode("ascii")
        fig = (f"<p><img alt='interpretable units per category' style='max-width:100%' "
               f"src='data:image/svg+xml;base64,{data}'></p>")
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>neurosem dissection</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Network dissection</h1>",
        f"<p>Interpretable units (best IoU &ge; {dis.iou_threshold:g}) per category of their best label. "
        f"Quantile {dis.args.get('quantile', '?')}, {len(dis.label_names)} labels, "
        f"Broden {html.escape(str(dis.args.get('broden', '')))}.</p>",
        _counts_table(rows, dis.categories),
        fig,
        "</body></html>",
    ]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(parts), encoding="utf-8")
    return path

"""Shared matplotlib setup for every neurosem figure.

One place decides how figures look and how they are written, so that the analysis figures and the
dissection summary look alike in a paper:

- figures are built on the Agg canvas without pyplot (:func:`new_figure`), so nothing depends on
  the interactive backend and no figure leaks into pyplot's global list;
- one look, applied with :func:`plot_style` (an ``rc_context``: nothing global changes): white
  axes with outward ticks and paper-sized fonts (the values of seaborn's ``"ticks"`` style and
  ``"paper"`` context, written out here so that seaborn is not needed);
- :func:`save_figure` writes PDF (TrueType fonts, ``pdf.fonttype`` 42), PNG (300 dpi by default)
  and SVG (text kept as text, ``svg.fonttype`` ``"none"``), with the dates stripped so reruns give
  the same files.

The API (``plot_style``, ``new_figure``, ``save_figure``, ``DEFAULT_FORMATS``) is stable: other
modules import it.

Example:
    >>> from neurosem.analysis._plotstyle import plot_style, new_figure, save_figure
    >>> with plot_style():
    ...     fig, ax = new_figure(1, 1, figsize=(3, 2))
    ...     _ = ax.plot([0, 1], [1, 0])
    ...     paths = save_figure(fig, "/tmp/demo", ("png",), dpi=50)
    >>> [p.name for p in paths]
    ['demo.png']
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

from neurosem.errors import NeurosemError

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DEFAULT_FORMATS: tuple[str, ...] = ("pdf", "png", "svg")
SUPPORTED_FORMATS: tuple[str, ...] = ("pdf", "png", "svg", "eps", "jpg")
DEFAULT_DPI = 300

# Settings applied when a file is written: embedded TrueType in PDF/PS, text kept as text in SVG,
# and a fixed SVG id salt so the files are reproducible.
_SAVE_RC: dict[str, Any] = {
    "pdf.fonttype": 42,
    "ps.fonttype": 42,
    "svg.fonttype": "none",
    "svg.hashsalt": "neurosem",
}

# Per-format metadata that would otherwise stamp the current date into the file.
_METADATA: dict[str, dict[str, Any]] = {
    "pdf": {"CreationDate": None, "Creator": "neurosem"},
    "svg": {"Date": None, "Creator": "neurosem"},
    "png": {"Software": "neurosem"},
    "eps": {},
    "jpg": {},
}


# The look of every figure: white axes, dark-grey text, outward ticks (seaborn's "ticks" style) at
# paper sizes (seaborn's "paper" context: 0.8 x the notebook sizes).
_STYLE_RC: dict[str, Any] = {
    "figure.facecolor": "white", "axes.facecolor": "white", "axes.edgecolor": ".15",
    "axes.labelcolor": ".15", "text.color": ".15", "xtick.color": ".15", "ytick.color": ".15",
    "axes.grid": False, "grid.color": ".8", "grid.linestyle": "-", "axes.axisbelow": True,
    "xtick.direction": "out", "ytick.direction": "out", "xtick.top": False, "ytick.right": False,
    "xtick.bottom": True, "ytick.left": True,
    "font.family": ["sans-serif"],
    "font.sans-serif": ["Arial", "DejaVu Sans", "Liberation Sans", "Bitstream Vera Sans", "sans-serif"],
    "lines.solid_capstyle": "round", "patch.edgecolor": "w", "patch.force_edgecolor": True,
    "axes.linewidth": 1.0, "grid.linewidth": 0.8, "lines.linewidth": 1.2, "lines.markersize": 4.8,
    "patch.linewidth": 0.8, "xtick.major.width": 1.0, "ytick.major.width": 1.0,
    "xtick.minor.width": 0.8, "ytick.minor.width": 0.8, "xtick.major.size": 4.8,
    "ytick.major.size": 4.8, "xtick.minor.size": 3.2, "ytick.minor.size": 3.2,
}
# Font sizes in points at font_scale 1.
_FONT_RC: dict[str, float] = {
    "font.size": 9.6, "axes.labelsize": 9.6, "axes.titlesize": 9.6, "xtick.labelsize": 8.8,
    "ytick.labelsize": 8.8, "legend.fontsize": 8.8, "legend.title_fontsize": 9.6,
}

#: Colour-blind-safe colours (seaborn's ``"colorblind"`` palette, in its order).
COLORBLIND: tuple[str, ...] = ("#0173b2", "#de8f05", "#029e73", "#d55e00", "#cc78bc",
                               "#ca9161", "#fbafe4", "#949494", "#ece133", "#56b4e9")


def style_rc(font_scale: float = 1.0) -> dict[str, Any]:
    """The rcParams of a neurosem figure (fonts times ``font_scale``) plus the save settings."""
    rc: dict[str, Any] = dict(_STYLE_RC)
    rc.update({k: v * float(font_scale) for k, v in _FONT_RC.items()})
    rc.update(_SAVE_RC)
    rc.update({"figure.dpi": 100, "savefig.bbox": "tight", "savefig.pad_inches": 0.02})
    return rc


@contextlib.contextmanager
def plot_style(font_scale: float = 1.0) -> Iterator[None]:
    """Context manager: neurosem's figure look and save settings, restored on exit."""
    import matplotlib

    with matplotlib.rc_context(style_rc(font_scale)):
        yield


def new_figure(nrows: int = 1, ncols: int = 1, figsize: tuple[float, float] | None = None,
               squeeze: bool = True, **subplot_kw: Any) -> "tuple[Figure, Any]":
    """A figure on the Agg canvas (no pyplot) and its axes, like ``plt.subplots``.

    Returns ``(fig, axes)``: one ``Axes`` when ``squeeze`` and 1×1, else an array ``[nrows, ncols]``
    (squeezed as ``plt.subplots`` does).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=squeeze, **subplot_kw)
    return fig, axes


def check_formats(formats: "Iterable[str] | str") -> tuple[str, ...]:
    """Normalise ``"pdf,png"`` or ``("pdf", "png")`` into a tuple; unknown names are one error."""
    if isinstance(formats, str):
        formats = formats.split(",")
    out: list[str] = []
    for fmt in formats:
        fmt = fmt.strip().lower().lstrip(".")
        if fmt == "jpeg":
            fmt = "jpg"
        if not fmt:
            continue
        if fmt not in SUPPORTED_FORMATS:
            raise NeurosemError(
                f"unknown figure format {fmt!r}: use a comma-separated list of {', '.join(SUPPORTED_FORMATS)}")
        if fmt not in out:
            out.append(fmt)
    if not out:
        raise NeurosemError(f"no figure format given: use e.g. --formats {','.join(DEFAULT_FORMATS)}")
    return tuple(out)


def save_figure(fig: "Figure", path_without_suffix: "str | Path",
                formats: "Sequence[str] | str" = DEFAULT_FORMATS, dpi: int = DEFAULT_DPI,
                close: bool = False) -> list[Path]:
    """Write ``fig`` as ``<path>.<fmt>`` for each format; returns the written paths.

    PDF embeds TrueType fonts (``pdf.fonttype`` 42), PNG is rasterised at ``dpi`` (300 by default),
    SVG keeps text as text. Parent folders are created. A suffix already on the path is replaced
    (``figs/kl.pdf`` → ``figs/kl.png`` …). ``close=True`` frees the figure's memory afterwards.

    Example:
        >>> fig, ax = new_figure()
        >>> save_figure(fig, "/tmp/x", "png", dpi=40)[0].suffix
        '.png'
    """
    import matplotlib

    formats = check_formats(formats)
    base = Path(path_without_suffix)
    if base.suffix.lower().lstrip(".") in SUPPORTED_FORMATS + ("jpeg",):
        base = base.with_suffix("")
    base.parent.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with matplotlib.rc_context(_SAVE_RC):
        # the tight box once, not once per format (bbox_inches="tight" draws twice per file), from a
        # layout-only draw (nothing rasterised: what savefig's own "tight" does)
        fig.draw_without_rendering()
        box = fig.get_tightbbox(fig.canvas.get_renderer()).padded(0.02)
        # the layout engine (even matplotlib's placeholder for "none") placed the axes in that
        # draw; with one set, savefig draws the figure once more before each file to lay it out
        # again (a second text-measuring draw per format: 3 of the 7 draws of 3 formats)
        engine = fig.get_layout_engine()
        if engine is not None:
            with matplotlib.rc_context({"figure.autolayout": False, "figure.constrained_layout.use": False}):
                fig.set_layout_engine(None)
        try:
            for fmt in formats:
                out = base.with_name(base.name + "." + fmt)
                tmp = out.with_name(out.name + ".tmp")
                fig.savefig(tmp, format="jpeg" if fmt == "jpg" else fmt, dpi=dpi,
                            metadata=_METADATA.get(fmt) or None, bbox_inches=box)
                tmp.replace(out)
                written.append(out)
        finally:
            if engine is not None:
                fig.set_layout_engine(engine)
    if close:
        fig.clear()
    return written


def light_mask_cmap(color: str = "#ff3b30") -> Any:
    """A colormap from transparent to ``color`` (alpha ramps up), for activation masks over images."""
    import numpy as np
    from matplotlib.colors import ListedColormap, to_rgb

    r, g, b = to_rgb(color)
    ramp = np.linspace(0.0, 1.0, 256)
    colors = np.stack([np.full(256, r), np.full(256, g), np.full(256, b), ramp], axis=1)
    return ListedColormap(colors, name="neurosem_mask")


#: The six Broden categories: Okabe-Ito colours far apart in hue (and in grey), so no two look alike.
CATEGORY_COLORS: dict[str, str] = {"object": "#0072b2", "part": "#d55e00", "scene": "#009e73",
                                   "material": "#cc79a7", "texture": "#56b4e9", "color": "#333333"}


def category_palette(categories: Sequence[str]) -> dict[str, Any]:
    """A fixed colour per dissection category (the six Broden categories keep
    :data:`CATEGORY_COLORS`); other categories take evenly spaced hues. RGB tuples in [0, 1].

    Example:
        >>> category_palette(["color", "object"])["object"]
        (0.0, 0.4470588235294118, 0.6980392156862745)
    """
    from matplotlib.colors import hsv_to_rgb, to_rgb

    new = [c for c in dict.fromkeys(categories) if c not in CATEGORY_COLORS]
    hues = iter(tuple(float(v) for v in hsv_to_rgb(((k + 0.5) / max(1, len(new)), 0.65, 0.75)))
                for k in range(len(new)))
    pal: dict[str, Any] = {}
    for cat in dict.fromkeys(categories):
        pal[cat] = to_rgb(CATEGORY_COLORS[cat]) if cat in CATEGORY_COLORS else next(hues)
    return pal


def hide_ticks(ax: "Axes") -> None:
    """Remove ticks and spines (image panels)."""
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)

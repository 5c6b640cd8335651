"""Figures of persona space: similarity heatmap, PCA scatter, variance, axis vs PC1, cross-model views, transcript
projections.

Each function returns a :class:`matplotlib.figure.Figure` built without pyplot (no global figure state, no GUI
backend: safe in threads, servers and tests); :func:`save_png` writes one to disk with the Agg canvas.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from personavec.analysis import AxisStats, ModelComparison, PCAResult, Similarity

# matplotlib warns once per missing glyph per text drawn (dozens per figure, from layout and from saving):
# missing_glyphs names them once instead (the report shows it).
warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from font", category=UserWarning)

DIVERGING = "RdBu_r"
_MODEL_MARKERS = ("o", "s", "^", "D", "v", "P", "X")


#: Font families matplotlib tries in turn for each character (glyph by glyph): DejaVu Sans (Latin, Greek,
#: Cyrillic...), then CJK and symbol/emoji fonts where the system has them. Characters none of the installed ones
#: has are drawn as boxes: :func:`missing_glyphs` names them (the report says so).
FONT_FALLBACKS = (
    "DejaVu Sans",
    "Noto Sans CJK JP",
    "Noto Sans CJK SC",
    "Source Han Sans SC",
    "WenQuanYi Zen Hei",
    "Droid Sans Fallback",
    "Noto Emoji",
    "Symbola",
)


@functools.cache
def _installed_fonts() -> tuple[tuple[str, frozenset[int]], ...]:
    """``(family, code points)`` of each installed family of :data:`FONT_FALLBACKS`, in order."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    found = []
    for family in FONT_FALLBACKS:
        try:
            path = font_manager.findfont(font_manager.FontProperties(family=family), fallback_to_default=False)
            found.append((family, frozenset(FT2Font(path).get_charmap())))
        except (ValueError, RuntimeError, OSError):
            continue
    return tuple(found)


def missing_glyphs(texts: Sequence[str]) -> str:
    """The characters of ``texts`` that no installed font of :data:`FONT_FALLBACKS` can draw (they show as boxes),
    in order of first use; spaces and joiners are ignored."""
    covered = frozenset().union(*(points for _, points in _installed_fonts()))
    out: dict[str, None] = {}
    for text in texts:
        for ch in text:
            if not ch.isspace() and ord(ch) not in covered and ch not in "\u200c\u200d\ufe0f":
                out[ch] = None
    return "".join(out)


def save_png(fig: Figure, path: str | os.PathLike[str], dpi: int = 130) -> Path:
    """Write ``fig`` as a PNG (Agg canvas, written whole then renamed into place); returns the path. Every text is
    drawn with the installed fonts of :data:`FONT_FALLBACKS` (so CJK names are drawn where a CJK font exists)."""
    from matplotlib.text import Text

    from personavec.files import atomic_write

    path = Path(path)
    families = [family for family, _ in _installed_fonts()]
    if len(families) > 1:
        for text in fig.findobj(Text):
            text.set_fontfamily(families)
    FigureCanvasAgg(fig)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight", facecolor="white"))
    return path


def _short(name: str, width: int = 28) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def similarity_heatmap(
    sim: Similarity, *, title: str | None = None, order: Sequence[str] | None = None, annotate: bool | None = None
) -> Figure:
    """Heatmap of a similarity matrix: diverging colours centred at 0 (red similar, blue opposite), every row and
    column labelled. ``order`` reorders the personas (e.g. by assistant-axis projection); values are written in
    the cells when there are at most 14 personas (or ``annotate``)."""
    names = list(sim.names)
    idx = [names.index(n) for n in order] if order is not None else list(range(len(names)))
    mat = sim.matrix[np.ix_(idx, idx)]
    labels = [_short(names[i]) for i in idx]
    n = len(labels)
    size = max(5.0, 0.38 * n + 2.5)
    fig = Figure(figsize=(size + 1.2, size))
    ax = fig.add_subplot()
    lim = max(1e-9, float(np.abs(mat[~np.eye(n, dtype=bool)]).max()) if n > 1 else 1.0)
    im = ax.imshow(mat, cmap=DIVERGING, norm=TwoSlopeNorm(vcenter=0.0, vmin=-lim, vmax=lim), interpolation="nearest")
    fs = 9 if n <= 16 else 8
    ax.set_xticks(range(n), labels, rotation=60, ha="right", rotation_mode="anchor", fontsize=fs)
    ax.set_yticks(range(n), labels, fontsize=fs)
    ax.set_xticks(np.arange(-0.5, n, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, n, 1), minor=True)
    ax.grid(which="minor", color="white", linewidth=0.6)
    ax.tick_params(which="minor", length=0)
    if annotate if annotate is not None else n <= 14:
        for i in range(n):
            for j in range(n):
                v = mat[i, j]
                ax.text(
                    j,
                    i,
                    f"{v:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if abs(v) > 0.6 * lim else "black",
                )
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    cbar.set_label("cosine similarity" + (" (mean-centred)" if sim.centered else ""))
    ax.set_title(title or ("Mean-centred cosine similarity" if sim.centered else "Cosine similarity"), fontsize=12)
    fig.tight_layout()
    return fig


def _label_points(ax, xs: np.ndarray, ys: np.ndarray, names: Sequence[str], fontsize: int = 8) -> None:
    """Label each point without labels overlapping: a label goes right of its point, else is moved up or down (or to
    the left) in steps of one line until its box is free, joined to its point by a thin line when moved.

    Call after the axis limits are final (margins set): positions are planned in display coordinates."""
    fig = ax.figure
    if fig.canvas is None or not hasattr(fig.canvas, "get_renderer"):
        FigureCanvasAgg(fig)
    ax.autoscale_view()
    fig.tight_layout()
    pts = ax.transData.transform(np.column_stack([xs, ys]))
    scale = fig.dpi / 72.0  # points -> pixels
    line_h = 1.25 * fontsize * scale
    placed: list[tuple[float, float, float, float]] = []

    def free(box: tuple[float, float, float, float]) -> bool:
        x0, y0, x1, y1 = box
        return all(x1 <= a0 or x0 >= a1 or y1 <= b0 or y0 >= b1 for a0, b0, a1, b1 in placed)

    bx0, by0, bx1, by1 = ax.get_window_extent().extents
    r = 4.0 * scale  # markers are obstacles too
    placed += [(x - r, y - r, x + r, y + r) for x, y in pts]

    def inside(box: tuple[float, float, float, float]) -> bool:
        return box[0] >= bx0 and box[2] <= bx1 and box[1] >= by0 and box[3] <= by1

    steps = [0] + [k * sign for k in range(1, 12) for sign in (-1, 1)]
    order = np.argsort(-pts[:, 1], kind="stable")  # top to bottom: crowded columns stack downwards
    for i in order:
        text = _short(names[i], 20)
        w = 0.6 * fontsize * scale * len(text)
        px, py = pts[i]
        # right of the point first, then left, each moved up/down by whole lines: the nearest free place wins
        candidates = [(dx, 3.0 + k * line_h / scale) for k in steps for dx in (4.0, -4.0 - w / scale)]
        candidates.sort(key=lambda c: abs(c[1] - 3.0) + (0.5 * line_h / scale if c[0] < 0 else 0.0))
        chosen = candidates[0]
        for dx, dy in candidates:
            x0 = px + dx * scale
            box = (x0, py + dy * scale, x0 + w, py + dy * scale + line_h)
            if inside(box) and free(box):
                chosen = (dx, dy)
                break
        x0 = px + chosen[0] * scale
        placed.append((x0, py + chosen[1] * scale, x0 + w, py + chosen[1] * scale + line_h))
        moved = abs(chosen[1] - 3.0) > 1 or chosen[0] < 0
        ax.annotate(
            text,
            (xs[i], ys[i]),
            xytext=chosen,
            textcoords="offset points",
            fontsize=fontsize,
            arrowprops={"arrowstyle": "-", "color": "grey", "lw": 0.5, "shrinkA": 0, "shrinkB": 3} if moved else None,
        )


def pca_scatter(
    p: PCAResult,
    colour_by: Mapping[str, float] | None = None,
    *,
    defaults: Sequence[str] = (),
    title: str | None = None,
    colour_label: str = "projection on assistant axis",
) -> Figure:
    """PC1 vs PC2 of the centred vectors, each point labelled and coloured by ``colour_by`` (e.g. the assistant-axis
    projection; diverging, centred at 0); default personas drawn as stars."""
    fig = Figure(figsize=(9, 7))
    ax = fig.add_subplot()
    xs = p.coordinates[:, 0]
    ys = p.coordinates[:, 1] if p.coordinates.shape[1] > 1 else np.zeros_like(xs)
    names = list(p.names)
    is_default = np.array([n in defaults for n in names])
    if colour_by is not None:
        c = np.array([colour_by[n] for n in names])
        lim = max(1e-9, float(np.abs(c).max()))
        kw: dict[str, Any] = {"c": c, "cmap": DIVERGING, "norm": TwoSlopeNorm(vcenter=0.0, vmin=-lim, vmax=lim)}
    else:
        kw = {"color": "tab:blue"}
    sc = None
    for mask, marker, size in ((~is_default, "o", 70), (is_default, "*", 220)):
        if mask.any():
            sub = {k: (v[mask] if k == "c" else v) for k, v in kw.items()}
            sc = ax.scatter(xs[mask], ys[mask], marker=marker, s=size, edgecolors="black", linewidths=0.6, **sub)
    ax.margins(0.12)  # room for the labels of the outermost points
    ax.axhline(0, color="grey", lw=0.6, zorder=0)
    ax.axvline(0, color="grey", lw=0.6, zorder=0)
    r = p.explained_variance_ratio
    ax.set_xlabel(f"PC1 ({100 * r[0]:.1f}% of variance)")
    ax.set_ylabel(f"PC2 ({100 * r[1]:.1f}% of variance)" if len(r) > 1 else "PC2")
    if colour_by is not None and sc is not None:
        fig.colorbar(sc, ax=ax, fraction=0.046, pad=0.03).set_label(colour_label)
    if defaults:
        ax.scatter([], [], marker="*", s=120, color="white", edgecolors="black", label="default personas")
        ax.legend(loc="best", fontsize=8)
    ax.set_title(title or "Persona space: first two principal components", fontsize=12)
    _label_points(ax, xs, ys, names)
    fig.tight_layout()
    return fig


def cumulative_variance(p: PCAResult, *, title: str | None = None) -> Figure:
    """Variance explained per component (bars) and cumulated (line), with the 50/80/90% marks."""
    r = p.explained_variance_ratio
    k = np.arange(1, len(r) + 1)
    fig = Figure(figsize=(8, 4.8))
    ax = fig.add_subplot()
    ax.bar(k, 100 * r, color="tab:blue", alpha=0.6, label="per component")
    ax.plot(k, 100 * np.cumsum(r), "o-", color="tab:red", label="cumulative")
    for level in (50, 80, 90):
        ax.axhline(level, color="grey", ls=":", lw=0.8)
        n_needed = int(np.searchsorted(np.cumsum(r) * 100, level - 1e-9) + 1)
        if n_needed <= len(r):
            ax.annotate(f"{level}%: {n_needed} PCs", (len(r) + 0.4, level), fontsize=8, va="bottom", ha="right")
    ax.set_xlabel("principal component")
    ax.set_ylabel("% of variance of the centred vectors")
    ax.set_ylim(0, 105)
    ax.set_xticks(k)
    # Below the 50% mark, right: away from the mark labels (right, at 50/80/90%) and the tall first bars (left).
    ax.legend(loc="lower right", bbox_to_anchor=(1.0, 0.12), fontsize=8)
    ax.set_title(title or "Variance explained", fontsize=12)
    fig.tight_layout()
    return fig


def axis_vs_pc1(stats: AxisStats, p: PCAResult, *, defaults: Sequence[str] = (), title: str | None = None) -> Figure:
    """Each persona's projection on the assistant axis against its PC1 coordinate, with |cos|, R^2 and PC1's share."""
    names = list(p.names)
    xs = np.array([stats.projections[n] for n in names])
    ys = p.coordinates[:, 0]
    fig = Figure(figsize=(8, 6.5))
    ax = fig.add_subplot()
    is_default = np.array([n in defaults for n in names])
    ax.scatter(xs[~is_default], ys[~is_default], s=60, color="tab:blue", edgecolors="black", lw=0.5, label="others")
    if is_default.any():
        ax.scatter(
            xs[is_default],
            ys[is_default],
            s=200,
            marker="*",
            color="tab:orange",
            edgecolors="black",
            lw=0.5,
            label="default personas",
        )
    if xs.std() > 0:
        slope, icept = np.polyfit(xs, ys, 1)
        line = np.linspace(xs.min(), xs.max(), 2)
        ax.plot(line, slope * line + icept, color="grey", ls="--", lw=1)
    ax.margins(0.12)
    ax.set_xlabel("projection on the assistant axis (centred)")
    ax.set_ylabel("PC1 coordinate")
    ax.legend(loc="best", fontsize=8)
    ax.set_title(
        title
        or f"Assistant axis vs PC1: |cos| = {stats.abs_cos_pc1:.3f}, R² = {stats.r2_projection_pc1:.3f}, "
        f"PC1 = {100 * stats.pc1_variance_ratio:.1f}% of variance",
        fontsize=11,
    )
    _label_points(ax, xs, ys, names)
    fig.tight_layout()
    return fig


def cross_model_similarity(cmp: ModelComparison, *, title: str | None = None) -> Figure:
    """Side by side: each model's centred similarity on the shared personas, then (equal d_model) the cross-model
    cosine matrix of the first two models; the structure correlation in the titles."""
    import textwrap

    def wrap(text: str) -> str:
        return "\n".join(textwrap.wrap(text, 34, break_long_words=False, break_on_hyphens=False))

    panels = [(f"{wrap(m)}\n(d_model {d})", cmp.within[m]) for m, d in zip(cmp.models, cmp.d_models, strict=True)]
    if cmp.cross:
        (a, b), mat = next(iter(cmp.cross.items()))
        panels.append((f"{wrap(a)} (rows)\nvs {wrap(b)} (columns)", mat))
    n = len(cmp.personas)
    size = max(4.0, 0.3 * n + 2.0)
    fig = Figure(figsize=(size * len(panels) + 1.5, size + 0.8))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    labels = [_short(p, 18) for p in cmp.personas]
    im = None
    for ax, (name, mat) in zip(axes, panels, strict=True):
        im = ax.imshow(mat, cmap=DIVERGING, norm=TwoSlopeNorm(vcenter=0.0, vmin=-1, vmax=1), interpolation="nearest")
        ax.set_xticks(range(n), labels, rotation=60, ha="right", rotation_mode="anchor", fontsize=7)
        ax.set_yticks(range(n), labels, fontsize=7)
        ax.set_title(name, fontsize=10)
    if im is not None:
        fig.colorbar(im, ax=list(axes), fraction=0.02, pad=0.02).set_label("cosine (each model centred)")
    r = cmp.structure_corr[0, 1] if len(cmp.models) > 1 else 1.0
    fig.suptitle(title or f"Persona similarity across models (structure correlation r = {r:.3f})", fontsize=12)
    return fig


def cross_model_pca(cmp: ModelComparison, *, title: str | None = None) -> Figure:
    """The shared personas of every model in one PC1/PC2 plane (joint PCA, or Procrustes-aligned per-model PCA),
    the same persona joined across models by a grey line."""
    fig = Figure(figsize=(9, 7))
    ax = fig.add_subplot()
    coords = [cmp.coordinates[m] for m in cmp.models]
    for i in range(len(cmp.personas)):
        pts = np.array([c[i] for c in coords])
        ax.plot(pts[:, 0], pts[:, 1], color="grey", lw=0.7, zorder=0)
    for k, (m, c) in enumerate(zip(cmp.models, coords, strict=True)):
        ax.scatter(
            c[:, 0], c[:, 1], marker=_MODEL_MARKERS[k % len(_MODEL_MARKERS)], s=60, label=m, edgecolors="black", lw=0.5
        )
    how = "joint PCA" if cmp.method == "joint-pca" else "per-model PCA, Procrustes-aligned to the first model"
    r = cmp.explained_variance_ratio
    ax.set_xlabel(f"PC1 ({100 * r[0]:.1f}%)" if len(r) else "PC1")
    ax.set_ylabel(f"PC2 ({100 * r[1]:.1f}%)" if len(r) > 1 else "PC2")
    ax.axhline(0, color="grey", lw=0.5, zorder=0)
    ax.axvline(0, color="grey", lw=0.5, zorder=0)
    ax.margins(0.08)
    ax.legend(loc="best", fontsize=9)
    ax.set_title(title or f"Persona space across models ({how})", fontsize=11)
    _label_points(ax, coords[0][:, 0], coords[0][:, 1], cmp.personas, fontsize=7)
    fig.tight_layout()
    return fig


def transcript_projection(
    series: Mapping[str, Sequence[float] | np.ndarray],
    *,
    references: Mapping[str, float] | None = None,
    title: str | None = None,
    ylabel: str = "projection on assistant axis",
) -> Figure:
    """One line per transcript: its projection at each assistant turn. ``references`` (e.g. a few personas'
    projections) are drawn as labelled horizontal lines, so drift towards or away from them is visible."""
    fig = Figure(figsize=(9, 5))
    ax = fig.add_subplot()
    longest = 1
    for label, values in series.items():
        turns = np.arange(1, len(values) + 1)
        longest = max(longest, len(values))
        ax.plot(turns, values, "o-", label=_short(label, 40))
    for name, value in (references or {}).items():
        ax.axhline(value, color="grey", ls=":", lw=0.8)
        ax.annotate(_short(name, 20), (longest + 0.1, value), fontsize=7, va="center", color="dimgrey")
    ax.set_xlabel("assistant turn")
    ax.set_ylabel(ylabel)
    ax.set_xticks(range(1, longest + 1))
    ax.set_xlim(0.7, longest + 1.2)
    if series:
        ax.legend(loc="best", fontsize=8)
    ax.set_title(title or "Transcript projection over turns", fontsize=12)
    fig.tight_layout()
    return fig


def steering_tradeoff(
    series: Sequence[tuple[str, Sequence[tuple[float, float | None, float | None, float | None, float | None]]]],
    *,
    threshold: float,
    operating_point: tuple[str, float] | None = None,
    title: str | None = None,
) -> Figure:
    """The trade-off of a steering sweep, two panels. Left: mean judged trait score (solid) and coherence (dashed) vs
    coefficient, one colour per line, interval bars. Right: trait vs coherence, one point per coefficient (labelled),
    the coherence threshold as a vertical line and the operating point starred.

    ``series``: ``(line label, [(coef, trait, trait half-interval, coherence, coherence half-interval), ...])``;
    ``operating_point``: ``(line label, coef)``."""
    fig = Figure(figsize=(12.0, 4.6))
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)

    def arr(values: Sequence[float | None], missing: float = np.nan) -> np.ndarray:
        return np.array([missing if v is None else float(v) for v in values], dtype=np.float64)

    for i, (label, points) in enumerate(series):
        color = f"C{i % 10}"
        pts = sorted(points, key=lambda p: p[0])
        coefs = arr([p[0] for p in pts])
        trait, coherence = arr([p[1] for p in pts]), arr([p[3] for p in pts])
        for ys, err, style, name in (
            (trait, arr([p[2] for p in pts], 0.0), "-", "trait"),
            (coherence, arr([p[4] for p in pts], 0.0), "--", "coherence"),
        ):
            left.errorbar(coefs, ys, yerr=err, fmt="o" + style, color=color, capsize=3, label=f"{label}: {name}")
        right.plot(coherence, trait, "o-", color=color, label=label)
        for c, x, y in zip(coefs, coherence, trait, strict=True):
            if np.isfinite(x) and np.isfinite(y):
                right.annotate(f"{c:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if operating_point is not None and operating_point[0] == label:
            for c, x, y in zip(coefs, coherence, trait, strict=True):
                if c == operating_point[1] and np.isfinite(x) and np.isfinite(y):
                    right.plot([x], [y], marker="*", markersize=18, color="gold", markeredgecolor="black",
                               linestyle="none", label=f"operating point (c = {c:g})", zorder=5)  # fmt: skip
    left.axhline(threshold, color="grey", linewidth=0.8, linestyle=":")
    left.set_xlabel("coefficient")
    left.set_ylabel("mean judge score (0-100)")
    left.set_ylim(-5, 105)
    left.grid(alpha=0.3)
    left.legend(fontsize=7)
    right.axvline(threshold, color="grey", linewidth=0.8, linestyle=":", label=f"coherence threshold {threshold:g}")
    right.set_xlabel("mean coherence")
    right.set_ylabel("mean trait score")
    right.set_xlim(-5, 105)
    right.set_ylim(-5, 105)
    right.grid(alpha=0.3)
    right.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def capping_bars(
    settings: Sequence[tuple[str, float | None, float | None, float | None, float | None, float | None, float | None]],
    *,
    title: str | None = None,
) -> Figure:
    """Capping side by side: harmful rate (%) and mean coherence per setting (uncapped, capped), interval bars.
    ``settings``: ``(name, rate, rate lo, rate hi, coherence, coherence lo, coherence hi)`` (rates in 0..1)."""
    fig = Figure(figsize=(7.0, 4.0))
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(settings))
    width = 0.38

    def bars(values: Sequence[tuple[float | None, float | None, float | None]], scale: float) -> tuple[Any, Any]:
        mid = np.array([np.nan if v is None else v * scale for v, _, _ in values])
        lo = np.array([0.0 if v is None or a is None else (v - a) * scale for v, a, _ in values])
        hi = np.array([0.0 if v is None or b is None else (b - v) * scale for v, _, b in values])
        return mid, np.vstack([lo, hi])

    rate, rate_err = bars([(s[1], s[2], s[3]) for s in settings], 100.0)
    coherence, coherence_err = bars([(s[4], s[5], s[6]) for s in settings], 1.0)
    ax.bar(x - width / 2, rate, width, yerr=rate_err, capsize=4, color="C3", label="harmful answers (%)")
    ax.bar(x + width / 2, coherence, width, yerr=coherence_err, capsize=4, color="C0", label="mean coherence")
    ax.set_xticks(x, [s[0] for s in settings])
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return fig

"""Report figures: slice mosaics of the registered brain and the group's brain-age plots.

Every function returns a :class:`matplotlib.figure.Figure` bound to an Agg canvas: pyplot
is never imported, so rendering a report neither changes the global backend nor leaks
figures, and it works on a headless machine. :func:`figure_bytes` turns a figure into PNG
or SVG bytes that the HTML embeds inline (data URIs), so a copied report opens offline.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import nibabel as nib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

#: (name, axis of the RAS array that the slices cut, label) of the three views.
VIEWS = (("axial", 2, "Axial"), ("coronal", 1, "Coronal"), ("sagittal", 0, "Sagittal"))
#: Colours, chosen to stay readable on grey anatomy and for colour-blind readers.
CONTOUR = "#ff4d4d"
MASK_FILL = "#2ca8ff"
WM_CONTOUR = "#ffd21f"
GROUP_COLOURS = ("#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00",
                 "#f0e442", "#000000")
DPI = 100
#: Above this many points a scatter plot is drawn as a bitmap inside the SVG.
RASTER_POINTS = 500
#: Mosaics are drawn finer: they are shown at the full width of the report.
MOSAIC_DPI = 125


def new_figure(width: float, height: float, dpi: int = DPI) -> Figure:
    """A figure with its own Agg canvas (no pyplot, no global state)."""
    fig = Figure(figsize=(width, height), dpi=dpi, facecolor="white")
    FigureCanvasAgg(fig)
    return fig


def figure_bytes(fig: Figure, fmt: str = "png") -> bytes:
    """Serialise a figure for embedding; reruns give identical bytes (no dates).

    PNGs are reduced to a 256-colour palette: grey anatomy with a few overlay colours loses
    nothing visible, and the report is about three times smaller. Octree quantisation keeps
    small saturated colours (outlines, legend lines) that median cut merges into the greys.
    """
    buffer = io.BytesIO()
    metadata = {"Date": None} if fmt == "svg" else {"Software": None}
    # a fixed salt makes SVG element ids deterministic (the default is random per run)
    with matplotlib.rc_context({"svg.hashsalt": "brainage-bids"}):
        fig.savefig(buffer, format=fmt, dpi=fig.dpi, facecolor=fig.get_facecolor(),
                    bbox_inches="tight", pad_inches=0.05, metadata=metadata)
    if fmt != "png":
        return buffer.getvalue()
    from PIL import Image

    buffer.seek(0)
    with Image.open(buffer) as image:
        palette = image.convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE,
                                                dither=Image.Dither.NONE)
    out = io.BytesIO()
    palette.save(out, format="PNG", optimize=True)
    return out.getvalue()


# --- volumes ----------------------------------------------------------------------------


def load_ras(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Data (float32, 3D or 4D) and affine of an image reoriented to RAS for display."""
    img = nib.as_closest_canonical(nib.load(str(path)))
    return np.asanyarray(img.dataobj).astype(np.float32), img.affine


def resample_like(path: str | Path, reference: str | Path, *, order: int = 0) -> np.ndarray:
    """``path`` resampled onto ``reference``'s RAS grid (a native mask onto its T1w)."""
    from nibabel.processing import resample_from_to

    ref = nib.as_closest_canonical(nib.load(str(reference)))
    img = nib.load(str(path))
    if img.shape[:3] == ref.shape[:3] and np.allclose(img.affine, ref.affine, atol=1e-3):
        return np.asanyarray(img.dataobj).astype(np.float32)
    ref3d = nib.Nifti1Image(np.zeros(ref.shape[:3], np.uint8), ref.affine)
    return np.asanyarray(resample_from_to(img, ref3d, order=order).dataobj).astype(np.float32)


def _window(data: np.ndarray) -> tuple[float, float]:
    """Robust grey-level window: percentiles of the non-zero voxels (zero is background)."""
    values = data[np.isfinite(data) & (data != 0)]
    if values.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(values, [0.5, 99.5])
    return float(low), float(high if high > low else low + 1)


def _extent(mask: np.ndarray, axis: int) -> tuple[int, int]:
    """First and last slice along ``axis`` that contain the object."""
    other = tuple(a for a in range(3) if a != axis)
    present = np.flatnonzero(mask.any(axis=other))
    if present.size == 0:
        return 0, mask.shape[axis] - 1
    return int(present[0]), int(present[-1])


def slice_positions(mask: np.ndarray, axis: int, count: int,
                    span: tuple[float, float] = (0.12, 0.88)) -> list[int]:
    """``count`` slices spread over the object; the default avoids its thin first and last
    tenth, a wider ``span`` shows its edges (to judge a mask's boundary)."""
    first, last = _extent(mask, axis)
    size = last - first
    positions = [int(np.rint(first + size * f)) for f in np.linspace(*span, count)]
    return sorted({min(max(p, 0), mask.shape[axis] - 1) for p in positions})


def voxel_sizes(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel sizes (mm) from an affine, so anisotropic images are drawn undistorted."""
    sizes = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    return tuple(float(v) for v in sizes)  # type: ignore[return-value]


def _view_shape(shape: Sequence[int], zooms: Sequence[float], axis: int) -> tuple[float, float]:
    """(width, height) in mm of the slices cut across ``axis``."""
    horizontal, vertical = (a for a in range(3) if a != axis)
    return shape[horizontal] * zooms[horizontal], shape[vertical] * zooms[vertical]


def _cut(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """One slice, transposed so that ``imshow(origin="lower")`` shows it upright."""
    return np.take(volume, index, axis=axis).T


def _label_axis(ax, axis: int) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    if axis != 0:  # axial and coronal: RAS x grows to the right (neurological convention)
        ax.text(0.02, 0.03, "L", transform=ax.transAxes, color="white", fontsize=8,
                va="bottom", ha="left")
        ax.text(0.98, 0.03, "R", transform=ax.transAxes, color="white", fontsize=8,
                va="bottom", ha="right")


def slice_mosaic(background: np.ndarray, *, contours: Sequence[tuple[np.ndarray, str]] = (),
                 overlay: np.ndarray | None = None, overlay_label: str = "",
                 fill: np.ndarray | None = None, extent_mask: np.ndarray | None = None,
                 n_slices: int = 7, views: Sequence[str] = ("axial", "coronal", "sagittal"),
                 cmap: str = "inferno", threshold: float = 0.2,
                 legend: Sequence[tuple[str, str]] = (),
                 zooms: Sequence[float] = (1.0, 1.0, 1.0),
                 span: tuple[float, float] = (0.12, 0.88)) -> Figure:
    """Rows of slices (one row per view) of a RAS volume with outlines and overlays.

    ``contours`` are (mask, colour) pairs drawn as outlines: the MNI brain-mask outline on a
    registered brain shows a misregistration at a glance, as in fMRIPrep's reports.
    ``fill`` is a mask drawn translucent; ``overlay`` a 0..1 map drawn above ``threshold``.
    Rows are as tall as their slices' aspect needs, so the panels tile without gaps.
    """
    extent_mask = extent_mask if extent_mask is not None else background > 0
    low, high = _window(background)
    chosen = [v for v in VIEWS if v[0] in views]
    ratios = []
    for _, axis, _ in chosen:
        width, height = _view_shape(background.shape, zooms, axis)
        ratios.append(height / width)
    bar = [0.07] if overlay is not None else []
    cell = 1.55
    fig = new_figure(cell * n_slices, cell * (sum(ratios) + sum(bar)) + 0.45, dpi=MOSAIC_DPI)
    grid = fig.add_gridspec(len(chosen) + len(bar), n_slices, height_ratios=ratios + bar,
                            wspace=0.02, hspace=0.03, left=0.03, right=0.995, top=0.99,
                            bottom=0.01)
    image = None
    for row, (_, axis, title) in enumerate(chosen):
        horizontal, vertical = (a for a in range(3) if a != axis)
        aspect = zooms[vertical] / zooms[horizontal]
        for col, index in enumerate(slice_positions(extent_mask, axis, n_slices, span)):
            ax = fig.add_subplot(grid[row, col])
            ax.set_facecolor("black")
            ax.imshow(_cut(background, axis, index), cmap="gray", vmin=low, vmax=high,
                      origin="lower", interpolation="nearest", aspect=aspect)
            if fill is not None:
                cut = _cut(fill, axis, index) > 0.5
                rgba = np.zeros((*cut.shape, 4), np.float32)
                rgba[cut] = (0.17, 0.66, 1.0, 0.35)
                ax.imshow(rgba, origin="lower", interpolation="nearest", aspect=aspect)
            if overlay is not None:
                cut = _cut(overlay, axis, index)
                shown = np.ma.masked_less(cut, threshold)
                image = ax.imshow(shown, cmap=cmap, vmin=0, vmax=1, alpha=0.65,
                                  origin="lower", interpolation="bilinear", aspect=aspect)
            for mask, colour in contours:
                cut = _cut(mask, axis, index)
                if cut.min() < 0.5 < cut.max():
                    ax.contour(cut, levels=[0.5], colors=[colour], linewidths=0.9)
            _label_axis(ax, axis)
            if col == 0:
                ax.set_ylabel(title, fontsize=9)
                ax.yaxis.label.set_visible(True)
    if overlay is not None and image is not None:
        cax = fig.add_subplot(grid[len(chosen), n_slices // 2 - 1:n_slices // 2 + 2])
        bar = fig.colorbar(image, cax=cax, orientation="horizontal")
        bar.set_label(overlay_label, fontsize=8)
        bar.ax.tick_params(labelsize=7)
    if legend:
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color=colour, lw=2, label=label) for label, colour in legend]
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9,
                   frameon=False, bbox_to_anchor=(0.5, 0.99))
    return fig


def registration_mosaic(brain: str | Path, template_mask: str | Path,
                        subject_mask: str | Path | None = None,
                        template_brain: str | Path | None = None) -> Figure:
    """The registered brain with the MNI brain-mask outline (and the subject's own mask).

    With ``template_brain``, the template's white-matter boundary is drawn too: ventricles
    and the corpus callosum must sit inside it, which catches registrations whose outer
    outline happens to fit.
    """
    data, affine = load_ras(brain)
    tpl, _ = load_ras(template_mask)
    contours, legend = [], []
    if template_brain is not None:
        contours.append((white_matter(template_brain, tpl > 0.5), WM_CONTOUR))
        legend.append(("MNI152NLin6Asym white matter", WM_CONTOUR))
    if subject_mask is not None:
        subj, _ = load_ras(subject_mask)
        contours.append((subj, MASK_FILL))
        legend.append(("brain mask of this image", MASK_FILL))
    contours.append((tpl, CONTOUR))  # the template's outline on top: it is the reference
    legend.insert(0, ("MNI152NLin6Asym brain mask", CONTOUR))
    return slice_mosaic(data, contours=contours, extent_mask=tpl > 0.5, legend=legend,
                        zooms=voxel_sizes(affine))


def white_matter(template_brain: str | Path, mask: np.ndarray) -> np.ndarray:
    """A white-matter mask of a T1w template: smoothed, above the brain's 70th percentile."""
    from scipy.ndimage import gaussian_filter

    data, _ = load_ras(template_brain)
    smooth = gaussian_filter(data, 1.0)
    return (smooth > np.percentile(smooth[mask], 70)) & mask


def mask_mosaic(t1w: str | Path, mask: str | Path) -> Figure:
    """The input T1w (native space) with its brain mask, to judge the skull stripping.

    Slices span the whole mask, first and last included, where mask errors show.
    """
    data, affine = load_ras(t1w)
    if data.ndim == 4:
        data = data[..., 0]
    native = resample_like(mask, t1w)
    extent = native > 0.5 if (native > 0.5).any() else data > 0
    return slice_mosaic(data, contours=[(native, CONTOUR)], fill=native, extent_mask=extent,
                        legend=[("brain mask", CONTOUR)], zooms=voxel_sizes(affine),
                        span=(0.03, 0.97))


def saliency_mosaic(brain: str | Path, saliency: str | Path, *, volume: int | None = None,
                    label: str = "saliency") -> Figure:
    """A saliency map (0..1) over the registered brain, one 3D map or one 4D volume."""
    data, affine = load_ras(brain)
    sal, _ = load_ras(saliency)
    if sal.ndim == 4:
        sal = sal[..., volume if volume is not None else sal.shape[-1] - 1]
    sal = np.where(data > 0, np.clip(sal, 0, 1), 0)
    return slice_mosaic(data, overlay=sal, overlay_label=label, extent_mask=data > 0,
                        zooms=voxel_sizes(affine))


def late_gradcam_volume(saliency: str | Path, preferred: int = 5) -> int:
    """0-based volume of a late conv block whose Grad-CAM still has spatial detail.

    The last blocks' feature maps are 2 voxels wide or less, so their Grad-CAM is almost
    flat once upsampled; block 5 (7 x 8 x 7 features) is the latest informative one.
    Falls back to the latest block whose map varies.
    """
    img = nib.load(str(saliency))
    n = img.shape[3] if len(img.shape) == 4 else 1
    if n == 1:
        return 0
    order = [preferred - 1] + [i for i in range(n - 1, -1, -1) if i != preferred - 1]
    for index in order:
        if 0 <= index < n:
            vol = np.asanyarray(img.dataobj[..., index])
            if np.ptp(vol) > 1e-3 and (vol > 0.2).mean() < 0.95:
                return index
    return min(preferred, n) - 1


def gradcam_strip(brain: str | Path, saliency: str | Path) -> Figure:
    """Grad-CAM of every conv block on one axial slice: where each depth looks (the paper's
    Fig. 4)."""
    data, _ = load_ras(brain)
    sal, _ = load_ras(saliency)
    if sal.ndim == 3:
        sal = sal[..., None]
    n = sal.shape[-1]
    first, last = _extent(data > 0, 2)
    index = (first + last) // 2 + (last - first) // 8
    low, high = _window(data)
    fig = new_figure(1.55 * n, 2.05, dpi=MOSAIC_DPI)
    grid = fig.add_gridspec(2, n, height_ratios=[1, 0.06], wspace=0.02, hspace=0.08,
                            left=0.01, right=0.99, top=0.9, bottom=0.02)
    image = None
    for block in range(n):
        ax = fig.add_subplot(grid[0, block])
        ax.imshow(_cut(data, 2, index), cmap="gray", vmin=low, vmax=high, origin="lower",
                  interpolation="nearest")
        cut = np.where(_cut(data, 2, index) > 0, _cut(sal[..., block], 2, index), 0)
        image = ax.imshow(np.ma.masked_less(cut, 0.2), cmap="inferno", vmin=0, vmax=1,
                          alpha=0.65, origin="lower", interpolation="bilinear")
        ax.set_title(f"block {block + 1}", fontsize=9)
        _label_axis(ax, 2)
    if image is not None:
        cax = fig.add_subplot(grid[1, max(0, n // 2 - 1):min(n, n // 2 + 2)])
        bar = fig.colorbar(image, cax=cax, orientation="horizontal")
        bar.set_label("Grad-CAM (normalised)", fontsize=8)
        bar.ax.tick_params(labelsize=7)
    return fig


# --- group plots --------------------------------------------------------------------------


def _groups(groups: Sequence[str] | None, n: int) -> tuple[np.ndarray, list[str]]:
    """Each point's group label as drawn: a participants.tsv value, with ``$`` escaped so that
    matplotlib shows it as written instead of parsing mathtext (``$10k-$20k``)."""
    labels = np.array(["all"] * n if groups is None else [str(g).replace("$", r"\$")
                                                           for g in groups], dtype=object)
    return labels, sorted(set(labels.tolist()), key=str)


def _style(ax, xlabel: str, ylabel: str) -> None:
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(True, color="#e5e5e5", lw=0.6)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def point_style(n: int, size: float) -> dict[str, float | bool]:
    """Markers that stay readable for thousands of points, and an SVG that stays light.

    Above :data:`RASTER_POINTS` points the markers shrink and turn translucent (so density
    shows) and are drawn as one embedded bitmap (axes, labels and lines stay vector): an SVG
    with an element per point makes a 10,000-participant report freeze the browser.
    """
    if n <= RASTER_POINTS:
        return {"s": size, "alpha": 0.8, "rasterized": False}
    return {"s": max(3.0, size * math.sqrt(RASTER_POINTS / n)), "alpha": 0.45,
            "rasterized": True}


def _scatter_groups(ax, x, y, labels, levels, qc_fail) -> None:
    style = point_style(len(x), 22)
    for i, level in enumerate(levels):
        sel = labels == level
        colour = GROUP_COLOURS[i % len(GROUP_COLOURS)]
        ok = sel & ~qc_fail
        ax.scatter(x[ok], y[ok], color=colour, edgecolor="white", lw=0.4,
                   label=None if level == "all" else str(level), **style)
        bad = sel & qc_fail
        if bad.any():
            ax.scatter(x[bad], y[bad], s=30, color=colour, marker="x", lw=1.2,
                       rasterized=style["rasterized"])


def predicted_vs_age(age: np.ndarray, predicted: np.ndarray, *,
                     groups: Sequence[str] | None = None,
                     qc_fail: np.ndarray | None = None, title: str = "") -> Figure:
    """Predicted against chronological age with the identity line (perfect prediction)."""
    age, predicted = np.asarray(age, float), np.asarray(predicted, float)
    qc_fail = np.zeros(age.size, bool) if qc_fail is None else np.asarray(qc_fail, bool)
    labels, levels = _groups(groups, age.size)
    fig = new_figure(5.2, 4.6)
    ax = fig.add_subplot(1, 1, 1)
    both = np.concatenate([age, predicted])
    both = both[np.isfinite(both)]
    low, high = (both.min(), both.max()) if both.size else (0.0, 100.0)
    pad = max(2.0, 0.05 * (high - low))
    ax.plot([low - pad, high + pad], [low - pad, high + pad], color="#444", lw=1, ls="--",
            label="identity (predicted = age)")
    _scatter_groups(ax, age, predicted, labels, levels, qc_fail)
    if qc_fail.any():
        ax.scatter([], [], marker="x", color="#444", label="QC failed")
    ax.set_xlim(low - pad, high + pad)
    ax.set_ylim(low - pad, high + pad)
    ax.set_aspect("equal")
    _style(ax, "chronological age (years)", "predicted brain age (years)")
    ax.legend(fontsize=8, frameon=False, loc="upper left")
    if title:
        ax.set_title(title, fontsize=10)
    return fig


def gap_vs_age(age: np.ndarray, gaps: Mapping[str, np.ndarray], *,
               groups: Sequence[str] | None = None,
               qc_fail: np.ndarray | None = None) -> Figure:
    """The gap against age, uncorrected and for each correction, with a fitted line and r.

    A slope here is the regression-to-the-mean bias that the corrections remove.
    """
    age = np.asarray(age, float)
    qc_fail = np.zeros(age.size, bool) if qc_fail is None else np.asarray(qc_fail, bool)
    labels, levels = _groups(groups, age.size)
    n = len(gaps)
    fig = new_figure(3.3 * n, 3.3)
    axes = fig.subplots(1, n, sharey=True, squeeze=False)[0]
    for ax, (title, gap) in zip(axes, gaps.items(), strict=True):
        gap = np.asarray(gap, float)
        ax.axhline(0, color="#444", lw=0.8)
        _scatter_groups(ax, age, gap, labels, levels, qc_fail)
        ok = np.isfinite(age) & np.isfinite(gap)
        if ok.sum() >= 3 and np.ptp(age[ok]) > 0:
            slope, intercept = np.polyfit(age[ok], gap[ok], 1)
            xs = np.array([age[ok].min(), age[ok].max()])
            ax.plot(xs, slope * xs + intercept, color="#d55e00", lw=1.5)
            r = np.corrcoef(age[ok], gap[ok])[0, 1] if np.ptp(gap[ok]) > 0 else 0.0
            ax.text(0.03, 0.97, f"r(gap, age) = {r:+.2f}\nslope = {slope:+.2f}",
                    transform=ax.transAxes, va="top", fontsize=8,
                    bbox={"facecolor": "white", "alpha": 0.8, "lw": 0})
        ax.set_title(title, fontsize=10)
        _style(ax, "chronological age (years)", "brain-age gap (years)" if ax is axes[0]
               else "")
    if len(levels) > 1:
        axes[-1].legend(fontsize=8, frameon=False, loc="lower right")
    return fig


def gap_distribution(gaps: Mapping[str, np.ndarray], *,
                     groups: Sequence[str] | None = None) -> Figure:
    """Distribution of the gap per group (violins with the points), or a histogram."""
    first = next(iter(gaps.values()))
    labels, levels = _groups(groups, len(first))
    fig = new_figure(max(4.2, 2.4 * len(gaps) + 0.5 * len(levels)), 4.4)
    axes = fig.subplots(1, len(gaps), sharey=True, squeeze=False)[0]
    rng = np.random.default_rng(0)  # fixed jitter: reruns give identical figures
    for ax, (title, gap) in zip(axes, gaps.items(), strict=True):
        gap = np.asarray(gap, float)
        ax.axhline(0, color="#444", lw=0.8)
        data, positions = [], []
        for i, level in enumerate(levels):
            values = gap[(labels == level) & np.isfinite(gap)]
            colour = GROUP_COLOURS[i % len(GROUP_COLOURS)]
            if values.size >= 2 and np.ptp(values) > 0:
                parts = ax.violinplot([values], positions=[i], showextrema=False, widths=0.8)
                for body in parts["bodies"]:
                    body.set_facecolor(colour)
                    body.set_alpha(0.25)
            if values.size:
                ax.scatter(i + rng.uniform(-0.12, 0.12, values.size), values,
                           color=colour, edgecolor="white", lw=0.3,
                           **point_style(values.size, 14))
                ax.hlines(np.mean(values), i - 0.3, i + 0.3, color="black", lw=1.5)
            data.append(values)
            positions.append(i)
        ax.set_xticks(positions)
        ax.set_xticklabels([f"{lv}\n(n={d.size})" for lv, d in zip(levels, data, strict=True)],
                           fontsize=8)
        ax.set_xlim(-0.6, len(levels) - 0.4)
        ax.set_title(title, fontsize=10)
        _style(ax, "", "brain-age gap (years)" if ax is axes[0] else "")
        ax.grid(False, axis="x")
    return fig

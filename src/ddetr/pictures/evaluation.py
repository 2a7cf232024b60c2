"""Pictures of a COCO evaluation: the precision-recall curves read from pycocotools' accumulated
precision, and the confusion matrix (``training.confusion``). Figures are ``matplotlib.figure.Figure``
objects (no pyplot state), saved with ``save_figure`` or turned into pixels with ``figure_pixels``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure

from ddetr.training.confusion import ConfusionMatrix

MAX_NAMED_CLASSES = 20  # more classes: the per-class curves are grey and only the best and worst are named
NAMED_EXTREMES = 5  # how many best and worst classes are named then
DPI = 100


@dataclass(frozen=True)
class PrecisionRecallCurves:
    """Precision at pycocotools' recall thresholds (all object sizes, 100 detections per image).

    - ``recall``: (num_recall,) the recall thresholds 0, 0.01, ..., 1;
    - ``per_class``: (num_classes, num_recall) precision at IoU 0.5; a row of NaN for a class without
      ground truth;
    - ``mean``: (num_recall,) precision averaged over IoU 0.50:0.95 and the classes with ground truth;
    - ``mean_50``: (num_recall,) the same at IoU 0.5 only.
    The mean of ``mean`` is COCO's AP, the mean of a ``per_class`` row that class's AP50."""

    recall: np.ndarray
    class_names: list[str]
    per_class: np.ndarray
    mean: np.ndarray
    mean_50: np.ndarray

    @property
    def ap50(self) -> np.ndarray:
        """(num_classes,) the AP at IoU 0.5 per class; NaN for a class without ground truth."""
        return self.per_class.mean(axis=1)


def precision_recall_curves(coco_eval, class_names: Sequence[str]) -> PrecisionRecallCurves:
    """The curves of an accumulated ``COCOeval`` (``evaluate()`` and ``accumulate()`` run);
    ``class_names`` in the order of ``coco_eval.params.catIds``."""
    params = coco_eval.params
    # precision: (num_iou, num_recall, num_classes, num_areas, num_max_dets), -1 where undefined
    precision = np.asarray(coco_eval.eval["precision"], dtype=np.float64)
    area, max_dets = params.areaRngLbl.index("all"), list(params.maxDets).index(max(params.maxDets))
    curves = precision[:, :, :, area, max_dets]  # (num_iou, num_recall, num_classes)
    defined = curves > -1
    iou50 = int(np.argmin(np.abs(np.asarray(params.iouThrs) - 0.5)))
    per_class = np.where(defined[iou50], curves[iou50], np.nan).T  # (num_classes, num_recall)
    return PrecisionRecallCurves(
        recall=np.asarray(params.recThrs, dtype=np.float64),
        class_names=list(class_names),
        per_class=per_class,
        mean=_masked_mean(
            curves.transpose(1, 0, 2).reshape(len(params.recThrs), -1),
            defined.transpose(1, 0, 2).reshape(len(params.recThrs), -1),
        ),
        mean_50=_masked_mean(curves[iou50], defined[iou50]),
    )


def missed_curves(class_names: Sequence[str], has_ground_truth: Sequence[bool]) -> PrecisionRecallCurves:
    """The curves when there is no detection at all: precision 0 for every class with ground truth."""
    recall = np.linspace(0.0, 1.0, 101)
    per_class = np.array([np.zeros_like(recall) if has else np.full_like(recall, np.nan) for has in has_ground_truth])
    mean = np.zeros_like(recall) if any(has_ground_truth) else np.full_like(recall, np.nan)
    return PrecisionRecallCurves(recall, list(class_names), per_class.reshape(len(class_names), -1), mean, mean.copy())


def draw_pr_curves(curves: PrecisionRecallCurves, title: str = "") -> Figure:
    """Per-class precision-recall curves at IoU 0.5 (named in the legend with their AP50, or, past
    ``MAX_NAMED_CLASSES`` classes, grey with only the best and the worst named) and the mean curves at
    IoU 0.50:0.95 and at 0.5 in black."""
    figure = Figure(figsize=(11, 6.5), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axis = figure.add_subplot()
    ap50 = curves.ap50
    defined = np.flatnonzero(~np.isnan(ap50))
    ranked = defined[np.argsort(-ap50[defined], kind="stable")]  # best first
    if len(ranked) <= MAX_NAMED_CLASSES:
        named = list(ranked)
    else:
        named = [*ranked[:NAMED_EXTREMES], *ranked[-NAMED_EXTREMES:]]
        for index, row in enumerate(c for c in ranked if c not in named):
            axis.plot(
                curves.recall,
                curves.per_class[row],
                color="0.75",
                linewidth=0.7,
                label=f"the other {len(ranked) - len(named)} classes" if index == 0 else None,
            )
    colours = _colours(len(named))
    for colour, row in zip(colours, named):
        axis.plot(
            curves.recall,
            curves.per_class[row],
            color=colour,
            linewidth=1.4,
            label=f"{curves.class_names[row]} ({ap50[row]:.2f})",
        )
    if not np.isnan(curves.mean).all():
        axis.plot(
            curves.recall,
            curves.mean,
            color="black",
            linewidth=2.6,
            label=f"mean, IoU 0.50:0.95 (AP {np.mean(curves.mean):.3f})",
        )
        axis.plot(
            curves.recall,
            curves.mean_50,
            color="black",
            linewidth=1.8,
            linestyle="--",
            label=f"mean, IoU 0.50 (AP50 {np.mean(curves.mean_50):.3f})",
        )
    missing = len(curves.class_names) - len(defined)
    heading = f"Precision-recall of {len(defined)} classes, per class at IoU 0.50 (AP50 in brackets)"
    if len(ranked) > MAX_NAMED_CLASSES:
        heading += f"\nnamed: the {NAMED_EXTREMES} best and the {NAMED_EXTREMES} worst"
    if missing:
        heading += f"\nleft out: {missing} without ground truth"
    axis.set(
        xlim=(0, 1),
        ylim=(0, 1.02),
        xlabel="recall",
        ylabel="precision",
        title=f"{title}\n{heading}" if title else heading,
    )
    axis.grid(alpha=0.3)
    if axis.has_data():
        axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
    else:
        axis.text(0.5, 0.5, "no ground truth: nothing to plot", ha="center", va="center")
    return figure


def draw_confusion_matrix(confusion: ConfusionMatrix, title: str = "") -> Figure:
    """The matrix as an image: rows ground truth, columns prediction, the colour the share of the row
    (square-root scale), the counts written in the cells (up to 30 classes; the image grows with the class count)."""
    labels = confusion.labels
    size = len(labels)
    counts = np.asarray(confusion.matrix, dtype=np.int64)  # (size, size)
    row_sums = counts.sum(axis=1, keepdims=True)  # (size, 1)
    shares = np.divide(counts, row_sums, out=np.zeros(counts.shape), where=row_sums > 0)
    side = min(max(7.0, 0.24 * size + 3.5), 24.0)
    figure = Figure(figsize=(side + 1.2, side), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axis = figure.add_subplot()
    # a square-root colour scale, so the small shares of a long row (the background row of 80 classes) show
    image = axis.imshow(shares, cmap="Blues", norm=PowerNorm(0.5, vmin=0.0, vmax=1.0), interpolation="nearest")
    font = 10 if size <= 12 else 8 if size <= 30 else 7
    axis.set_xticks(range(size), labels, rotation=90, fontsize=font)
    axis.set_yticks(range(size), labels, fontsize=font)
    axis.axhline(size - 1.5, color="0.4", linewidth=0.8)  # the background row and column apart
    axis.axvline(size - 1.5, color="0.4", linewidth=0.8)
    if size - 1 <= 30:  # classes, besides background
        for row, column in zip(*np.nonzero(counts)):
            axis.text(
                column,
                row,
                str(counts[row, column]),
                ha="center",
                va="center",
                fontsize=font,
                color="white" if shares[row, column] > 0.5 else "black",
            )
    axis.set_xlabel("predicted class (background: ground truth no detection matched)")
    axis.set_ylabel("ground-truth class (background: detections that matched nothing)")
    heading = (
        f"Confusion matrix at IoU >= {confusion.iou:.2f}, score >= {confusion.score_threshold:.2f}\n"
        "colour: share of the row (square-root scale); numbers: counts"
    )
    axis.set_title(f"{title}\n{heading}" if title else heading)
    figure.colorbar(image, ax=axis, shrink=0.6, label="share of the row")
    return figure


def figure_pixels(figure: Figure) -> np.ndarray:
    """The rendered figure as an (height, width, 3) uint8 array (for TensorBoard and W&B)."""
    canvas = figure.canvas if isinstance(figure.canvas, FigureCanvasAgg) else FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()  # (height, width, 3)


def save_figure(figure: Figure, path: str | Path) -> Path:
    """Writes the figure as a PNG (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI)
    return path


def _masked_mean(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The mean of each row over the entries where ``mask`` holds; NaN for a row with none. (rows, cols) -> (rows,)"""
    counts = mask.sum(axis=1)
    sums = np.where(mask, values, 0.0).sum(axis=1)
    return np.divide(sums, counts, out=np.full(len(values), np.nan), where=counts > 0)


def _colours(count: int) -> list:
    """Distinct colours for up to 20 lines (tab10, then tab20)."""
    from matplotlib import colormaps

    palette = colormaps["tab10" if count <= 10 else "tab20"]
    return [palette(index % palette.N) for index in range(count)]

"""Attention pictures: where the last decoder layer's deformable cross-attention looks for a detection.

As in the paper's figures, every detection gets a picture with its box, its reference point and the
sampling locations of all heads on every feature level, coloured by attention weight (one marker per
level).

``DecoderAttentionRecorder`` captures the sampling locations and attention weights with hooks on the
cross-attention module: a forward pre-hook asks ``MSDeformAttn`` for ``return_attention=True`` and a
forward hook keeps the extra outputs and hands the layer its usual output, so the detector computes
exactly what it computes without the recorder.

Coordinates: the captured locations are normalised to each level's (padded) feature map, as the
deformable attention op reads them. ``level_extents`` turns them into pixels of the padded network
input (a level of ``width_l`` cells at stride ``stride_l`` spans ``width_l * stride_l`` pixels);
images are padded at the bottom/right, so these are also pixels of the resized, unpadded image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image
from torch import nn

from ddetr.boxes import box_cxcywh_to_xyxy

LEVEL_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
COLORMAP = "jet"


@dataclass
class DecoderAttention:
    """What a decoder layer's cross-attention used in one forward pass (detached, on the CPU).

    Attributes:
        reference_points: (batch_size, num_queries, num_levels, 2 or 4) the reference points (x, y)
            or boxes (cx, cy, w, h) as the layer received them, i.e. scaled by the valid ratios into
            every level's normalised coordinates.
        sampling_locations: (batch_size, num_queries, num_heads, num_levels, num_points, 2) (x, y)
            normalised to every level's feature map.
        attention_weights: (batch_size, num_queries, num_heads, num_levels, num_points); they sum to
            1 over levels and points for every head.
        spatial_shapes: (num_levels, 2) int64 (height, width) of every level.
    """

    reference_points: torch.Tensor
    sampling_locations: torch.Tensor
    attention_weights: torch.Tensor
    spatial_shapes: torch.Tensor


class DecoderAttentionRecorder:
    """Context manager recording the cross-attention of one decoder layer (the last by default).

    Example::

        with DecoderAttentionRecorder(model) as recorder:
            outputs = model(images)
        attention = recorder.attention  # DecoderAttention of the last forward pass

    Args:
        model: a ``DeformableDETR``.
        layer: index of the decoder layer (-1: the last one, whose output gives the detections).
    """

    def __init__(self, model: nn.Module, layer: int = -1) -> None:
        self.cross_attn = model.transformer.decoder.layers[layer].cross_attn
        self.attention: DecoderAttention | None = None
        self._handles: list[Any] = []

    def _ask_for_attention(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args, {**kwargs, "return_attention": True}

    def _keep_attention(self, module: nn.Module, args: tuple, kwargs: dict, result: tuple) -> torch.Tensor:
        output, sampling_locations, attention_weights = result
        reference_points = args[1] if len(args) > 1 else kwargs["reference_points"]
        spatial_shapes = args[3] if len(args) > 3 else kwargs["spatial_shapes"]
        self.attention = DecoderAttention(
            reference_points=reference_points.detach().float().cpu(),
            sampling_locations=sampling_locations.detach().float().cpu(),
            attention_weights=attention_weights.detach().float().cpu(),
            spatial_shapes=spatial_shapes.detach().cpu(),
        )
        return output

    def __enter__(self) -> DecoderAttentionRecorder:
        self.attention = None
        self._handles = [
            self.cross_attn.register_forward_pre_hook(self._ask_for_attention, with_kwargs=True),
            self.cross_attn.register_forward_hook(self._keep_attention, with_kwargs=True),
        ]
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def level_strides(model: nn.Module) -> list[int]:
    """Stride in input pixels of every feature level of ``model`` (a ``DeformableDETR``): the backbone's
    declared strides, then doubled for every extra level (``DeformableDETR.level_strides``)."""
    return model.level_strides()


def level_extents(spatial_shapes: torch.Tensor, strides: Sequence[int]) -> torch.Tensor:
    """(num_levels, 2) as (width, height) in input pixels covered by every level's feature map."""
    strides_tensor = torch.as_tensor(list(strides), dtype=torch.float32)[:, None]  # (L, 1)
    return spatial_shapes.flip(-1).float() * strides_tensor  # (L, 2) as (W * s, H * s)


def attention_in_pixels(
    attention: DecoderAttention, strides: Sequence[int], image_index: int, query_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One query's reference point, sampling locations and weights in pixels of the network input.

    Returns:
        reference_xy: (2,) the reference point (from the finest level).
        locations_xy: (num_heads, num_levels, num_points, 2).
        weights: (num_heads, num_levels, num_points).
    """
    extents = level_extents(attention.spatial_shapes, strides)  # (L, 2)
    reference = attention.reference_points[image_index, query_index, 0, :2] * extents[0]  # (2,)
    locations = attention.sampling_locations[image_index, query_index] * extents[None, :, None, :]  # (M, L, P, 2)
    return reference, locations, attention.attention_weights[image_index, query_index]


def select_queries(
    outputs: dict[str, torch.Tensor], top_k: int = 3, threshold: float = 0.0
) -> list[list[dict[str, Any]]]:
    """The ``top_k`` queries of every image by their best class score, keeping scores >= ``threshold``.

    Returns:
        One list per image of ``{"query": int, "label": int, "score": float, "box": (4,) cxcywh in
        [0, 1] of the unpadded input}``, best first.
    """
    scores, labels = outputs["pred_logits"].sigmoid().max(-1)  # (B, Q) each
    selections = []
    for image_scores, image_labels, image_boxes in zip(scores, labels, outputs["pred_boxes"]):
        order = image_scores.argsort(descending=True)[:top_k]
        selections.append(
            [
                {
                    "query": int(query),
                    "label": int(image_labels[query]),
                    "score": float(image_scores[query]),
                    "box": image_boxes[query].detach().float().cpu(),
                }
                for query in order
                if float(image_scores[query]) >= threshold
            ]
        )
    return selections


def draw_attention(
    image: np.ndarray,
    reference_xy: torch.Tensor,
    locations_xy: torch.Tensor,
    weights: torch.Tensor,
    box_xyxy: torch.Tensor | None = None,
    title: str | None = None,
    dpi: int = 100,
) -> Image.Image:
    """The paper-style picture of one query, as a PIL image.

    Args:
        image: (height, width, 3) uint8, in the pixel frame of the coordinates.
        reference_xy: (2,) reference point in pixels (drawn as a white-edged star).
        locations_xy: (num_heads, num_levels, num_points, 2) sampling locations in pixels; the marker
            shape tells the level.
        weights: (num_heads, num_levels, num_points) attention weights, the colour of every point.
        box_xyxy: (4,) the detected box in pixels, or None.
        title: text above the picture.
    """
    height, width = image.shape[:2]
    scale = max(4.0, 640 / max(height, width)) * max(height, width) / dpi
    figure = Figure(figsize=(scale * width / max(height, width) + 1.2, scale * height / max(height, width)), dpi=dpi)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    axes.imshow(image)
    scatter = scatter_sampling_points(axes, locations_xy, weights)
    if box_xyxy is not None:
        x0, y0, x1, y1 = (float(v) for v in box_xyxy)
        axes.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="lime", linewidth=2))
    axes.scatter(
        [float(reference_xy[0])],
        [float(reference_xy[1])],
        marker="*",
        s=220,
        c="red",
        edgecolors="white",
        linewidths=1.2,
        label="reference",
    )
    axes.set_xlim(-0.5, width - 0.5)
    axes.set_ylim(height - 0.5, -0.5)
    axes.set_axis_off()
    axes.legend(loc="lower left", fontsize=7, framealpha=0.7)
    if scatter is not None:
        figure.colorbar(scatter, ax=axes, fraction=0.046, pad=0.02, label="attention weight")
    if title:
        axes.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.canvas.draw()
    rgba = np.asarray(figure.canvas.buffer_rgba())  # (fig_height, fig_width, 4)
    return Image.fromarray(rgba[..., :3].copy())


def scatter_sampling_points(axes, locations_xy: torch.Tensor, weights: torch.Tensor):
    """Draws one query's sampling locations on ``axes``, a marker shape per level, coloured by weight
    (strongest on top); returns the last scatter (for the colour bar), None without levels.

    Args:
        locations_xy: (num_heads, num_levels, num_points, 2) in pixels.
        weights: (num_heads, num_levels, num_points).
    """
    norm = Normalize(vmin=0.0, vmax=max(float(weights.max()), 1e-6))
    colormap = colormaps[COLORMAP]
    scatter = None
    for level in range(locations_xy.shape[1]):
        points = locations_xy[:, level].reshape(-1, 2)  # (M, P, 2) -> (M*P, 2)
        level_weights = weights[:, level].reshape(-1)  # (M, P) -> (M*P,)
        order = level_weights.argsort()  # strongest drawn last, on top
        scatter = axes.scatter(
            points[order, 0].numpy(),
            points[order, 1].numpy(),
            c=level_weights[order].numpy(),
            cmap=colormap,
            norm=norm,
            marker=LEVEL_MARKERS[level % len(LEVEL_MARKERS)],
            s=36,
            edgecolors="black",
            linewidths=0.4,
            label=f"level {level}",
        )
    return scatter


@torch.no_grad()
def attention_pictures(
    model: nn.Module,
    images: Sequence[torch.Tensor],
    originals: Sequence[np.ndarray] | None = None,
    **options: Any,
) -> list[list[tuple[dict[str, Any], Image.Image]]]:
    """Runs ``model`` (a ``DeformableDETR``, eval mode recommended) on normalised images and draws the last
    decoder layer's attention of the best detections of every image, on ``originals`` if given:
    ``pictures_from_attention`` of that forward pass, with its ``options`` (top_k, threshold, class_names)."""
    with DecoderAttentionRecorder(model) as recorder:
        outputs = model(list(images))
    return pictures_from_attention(recorder.attention, outputs, level_strides(model), images, originals, **options)


def pictures_from_attention(
    attention: DecoderAttention,
    outputs: dict[str, torch.Tensor],
    strides: Sequence[int],
    images: Sequence[torch.Tensor],
    originals: Sequence[np.ndarray] | None = None,
    top_k: int = 3,
    threshold: float = 0.0,
    class_names: Sequence[str] | None = None,
) -> list[list[tuple[dict[str, Any], Image.Image]]]:
    """The attention pictures of the ``top_k`` detections of every image (scores >= ``threshold``) from a
    recorded forward pass.

    Args:
        attention: the recorded cross-attention (``DecoderAttentionRecorder``).
        outputs: the model's outputs of that pass.
        strides: stride in input pixels of every feature level (``level_strides(model)``).
        images: normalised (3, height_i, width_i) tensors, as the model took them.
        originals: (orig_height_i, orig_width_i, 3) uint8 pictures to draw on (coordinates are scaled
            from the network input to them); None draws on the de-normalised inputs.
        class_names: name of every class index, for the titles.

    Returns:
        One list per image of ``(detection, picture)``; ``detection`` as in ``select_queries``.
    """
    from ddetr.pictures.drawing import denormalize

    pictures = []
    for image_index, detections in enumerate(select_queries(outputs, top_k, threshold)):
        input_height, input_width = images[image_index].shape[-2:]
        canvas = denormalize(images[image_index]) if originals is None else originals[image_index]
        scale = torch.tensor([canvas.shape[1] / input_width, canvas.shape[0] / input_height])  # (2,) as (sx, sy)
        image_pictures = []
        for detection in detections:
            reference, locations, weights = attention_in_pixels(attention, strides, image_index, detection["query"])
            box = box_cxcywh_to_xyxy(detection["box"]) * torch.tensor([canvas.shape[1], canvas.shape[0]] * 2)
            label = detection["label"]
            name = class_names[label] if class_names is not None and label < len(class_names) else str(label)
            title = f"query {detection['query']}: {name} {detection['score']:.2f}"
            picture = draw_attention(canvas, reference * scale, locations * scale, weights, box, title)
            image_pictures.append((detection, picture))
        pictures.append(image_pictures)
    return pictures

"""Pictures: detections drawn over images, and images recovered from normalised tensors."""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ddetr.data.transforms import IMAGENET_MEAN, IMAGENET_STD


def label_color(label: int) -> tuple[int, int, int]:
    """A distinct, stable colour per class index (golden-ratio hue steps)."""
    hue = (label * 0.618033988749895) % 1.0
    red, green, blue = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return int(red * 255), int(green * 255), int(blue * 255)


def denormalize(image: torch.Tensor) -> np.ndarray:
    """A normalised (3, H, W) float tensor back to an (H, W, 3) uint8 array."""
    mean = torch.tensor(IMAGENET_MEAN, device=image.device).view(3, 1, 1)  # (3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=image.device).view(3, 1, 1)  # (3, 1, 1)
    pixels = ((image * std + mean).clamp(0, 1) * 255).round().byte()
    return pixels.permute(1, 2, 0).cpu().numpy()  # (H, W, 3)


def draw_detections(
    image: Image.Image | np.ndarray,
    boxes: torch.Tensor | np.ndarray,
    labels: Sequence[int],
    scores: Sequence[float] | None = None,
    class_names: Sequence[str] | None = None,
    line_width: int | None = None,
) -> Image.Image:
    """Draws absolute ``xyxy`` boxes with class names (and scores) over a copy of ``image``."""
    canvas = Image.fromarray(image) if isinstance(image, np.ndarray) else image.convert("RGB").copy()
    draw = ImageDraw.Draw(canvas)
    width = line_width or max(1, round(max(canvas.size) / 250))
    font = ImageFont.load_default()
    boxes = np.asarray(boxes.detach().cpu() if isinstance(boxes, torch.Tensor) else boxes, dtype=float).reshape(-1, 4)
    for index, (box, label) in enumerate(zip(boxes, labels)):
        label = int(label)
        color = label_color(label)
        draw.rectangle([float(v) for v in box], outline=color, width=width)
        name = class_names[label] if class_names is not None and label < len(class_names) else str(label)
        text = name if scores is None else f"{name} {float(scores[index]):.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        text_x, text_y = float(box[0]), max(0.0, float(box[1]) - (bottom - top) - 2)
        draw.rectangle([text_x, text_y, text_x + right - left + 2, text_y + bottom - top + 2], fill=color)
        draw.text((text_x + 1, text_y), text, fill=(0, 0, 0), font=font)
    return canvas

"""Albumentations pipelines reproducing the official Deformable DETR augmentation recipe.

Train: horizontal flip (p=0.5), then with equal probability either
  (a) resize the shortest side to a random `scales` value, longest side capped at `max_size`, or
  (b) resize the shortest side to a random `crop_resize_scales` value (no cap), crop a random
      region with each side drawn from [crop_min_size, crop_max_size] (clipped to the image),
      then (a);
then ImageNet normalisation and conversion to a CHW float tensor.
Val: resize the shortest side to `size` with the longest side capped at `max_size`, normalise.

Boxes go in and out as absolute (x0, y0, x1, y1) pixels ("pascal_voc"); albumentations clips them
to each crop and drops those left without area, keeping labels aligned.

The official defaults are for COCO (scales 480..800 step 32, max 1333, val 800); the synthetic
dataset uses scaled-down values (see conf/data/synthetic.yaml).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.augmentations.crops.transforms import BaseCrop
from albumentations.core.transforms_interface import DualTransform
from albumentations.core.type_definitions import Targets
from albumentations.pytorch import ToTensorV2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OFFICIAL_TRAIN_SCALES = tuple(range(480, 801, 32))
OFFICIAL_CROP_RESIZE_SCALES = (400, 500, 600)
OFFICIAL_MAX_SIZE = 1333  # the cap on the longest side, in training and evaluation
OFFICIAL_VAL_SIZE = 800  # the evaluation resize's shortest side


def shortest_side_resize_hw(height: int, width: int, size: int, max_size: int | None) -> tuple[int, int]:
    """Output (height, width) of the official resize: shortest side -> `size`, longest <= `max_size`.

    When the longest side would exceed `max_size`, `size` is lowered to round(max_size * short / long).
    The longer output side is truncated (int), as in the official code.
    """
    short, long = min(height, width), max(height, width)
    if max_size is not None and long * size / short > max_size:
        size = round(max_size * short / long)
    if short == size:
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


class RandomShortestSideResize(DualTransform):
    """Resize so the shortest side is a random choice of `scales`, the longest at most `max_size`.

    Boxes are handled in albumentations' normalised coordinates, so they are unchanged by a resize.
    """

    _targets = (Targets.IMAGE, Targets.MASK, Targets.BBOXES)

    def __init__(
        self, scales: Sequence[int], max_size: int | None = None, interpolation: int = cv2.INTER_LINEAR, p: float = 1.0
    ):
        super().__init__(p=p)
        if not scales:
            raise ValueError("scales must not be empty")
        self.scales = [int(s) for s in scales]
        self.max_size = None if max_size is None else int(max_size)
        self.interpolation = interpolation

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        size = self.py_random.choice(self.scales)
        return {"target_hw": shortest_side_resize_hw(height, width, size, self.max_size)}

    def apply(self, img: np.ndarray, target_hw: tuple[int, int], **params: Any) -> np.ndarray:
        if img.shape[:2] == tuple(target_hw):
            return img
        return cv2.resize(img, (target_hw[1], target_hw[0]), interpolation=self.interpolation)

    def apply_to_mask(self, mask: np.ndarray, target_hw: tuple[int, int], **params: Any) -> np.ndarray:
        return cv2.resize(mask, (target_hw[1], target_hw[0]), interpolation=cv2.INTER_NEAREST)

    def apply_to_bboxes(self, bboxes: np.ndarray, **params: Any) -> np.ndarray:
        return bboxes

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("scales", "max_size", "interpolation")


class RandomSizeCrop(BaseCrop):
    """Crop a random region whose width and height are each drawn from [min_size, max_size].

    Both bounds are clipped to the image side (the official code requires the image to be at least
    `min_size`; here a smaller image is cropped to its own size instead of failing).
    """

    def __init__(self, min_size: int, max_size: int, p: float = 1.0):
        super().__init__(p=p)
        if not 0 < min_size <= max_size:
            raise ValueError(f"need 0 < min_size <= max_size, got {min_size}, {max_size}")
        self.min_size = int(min_size)
        self.max_size = int(max_size)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        crop_w = self.py_random.randint(min(self.min_size, width), min(width, self.max_size))
        crop_h = self.py_random.randint(min(self.min_size, height), min(height, self.max_size))
        x0 = self.py_random.randint(0, width - crop_w)
        y0 = self.py_random.randint(0, height - crop_h)
        return {"crop_coords": (x0, y0, x0 + crop_w, y0 + crop_h)}

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("min_size", "max_size")


def normalize_images(
    images: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    """uint8 images (..., 3, height, width) in 0..255 -> float32 `(pixels / 255 - mean) / std`, on their device.

    The one normalisation of the project: the transforms use it in the workers, the data modules on
    the device (uint8 batches), so both give the same numbers.

    The result is contiguous, whatever the input's layout: the image of a transform is a permuted view of
    its (height, width, 3) array, on which the arithmetic would run channel by channel, 3 elements per
    inner loop (2-3x slower); converted into contiguous float32 first, the subtraction and the
    multiplication run in place over whole planes, with the same float32 operations in the same order."""
    shape = (3, 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=images.device).view(shape) * 255  # (3, 1, 1)
    inv_std = 1 / (torch.tensor(std, dtype=torch.float32, device=images.device).view(shape) * 255)  # (3, 1, 1)
    pixels = images.to(torch.float32, memory_format=torch.contiguous_format, copy=True)  # (..., 3, height, width)
    return pixels.sub_(mean_t).mul_(inv_std)


class DetectionTransform:
    """Callable applying an albumentations pipeline to an image with boxes and labels.

    `__call__(image, boxes, labels)` takes an RGB uint8 array (height, width, 3), absolute
    (x0, y0, x1, y1) float boxes (num_boxes, 4) and int labels (num_boxes,), and returns the
    normalised image tensor (3, out_height, out_width) float32 (`normalize_images`; uint8 with
    `normalize=False`), the surviving boxes (M, 4) float32
    in output pixels, clipped and with positive area, and their labels (M,) int64.

    Random state: albumentations keeps its own generators, which forked DataLoader workers would
    share. Each call reseeds the pipeline with a number drawn from torch's global generator, so the
    augmentation follows torch's seeding: DataLoader workers (seeded per worker and epoch by
    PyTorch) draw different augmentations, and `torch.manual_seed` /
    `lightning.seed_everything(..., workers=True)` make them reproducible. A `seed` given to the
    call (the training sampler gives one per sample, see `ResumableDistributedSampler`) decides the
    augmentation alone, whatever process or worker runs it: that makes resumed runs exact.

    Args:
        transforms: the geometric/photometric transforms (without Normalize/ToTensor).
        mean, std: normalisation (ImageNet by default).
        min_box_size: boxes thinner than this many pixels after a transform are dropped.
        normalize: the default of the call's `normalize`: False returns the uint8 image tensor
            (3, out_height, out_width), to be normalised later (`normalize_images`, e.g. on the
            accelerator, as the data modules do in `on_after_batch_transfer`).
    """

    def __init__(
        self,
        transforms: Sequence[A.BasicTransform],
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        min_box_size: float = 0.01,
        normalize: bool = True,
    ):
        self.mean, self.std, self.normalize = tuple(mean), tuple(std), normalize
        with warnings.catch_warnings():  # a pipeline without geometric transforms is fine
            warnings.filterwarnings(
                "ignore",
                message="Got processor for bboxes, but no transform to process it",
            )
            self.pipeline = A.Compose(
                [*transforms, ToTensorV2()],
                bbox_params=A.BboxParams(
                    format="pascal_voc",
                    label_fields=["labels"],
                    clip=True,
                    filter_invalid_bboxes=True,
                    min_width=min_box_size,
                    min_height=min_box_size,
                    check_each_transform=False,  # filter once at the end (boxes are clipped there)
                ),
            )

    def __call__(
        self,
        image: np.ndarray,
        boxes: np.ndarray,
        labels: np.ndarray,
        seed: int | None = None,
        normalize: bool | None = None,
    ):
        """`normalize`: None follows the constructor; False returns the uint8 image tensor."""
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, ()).item())
        self.pipeline.set_random_seed(seed)
        out = self.pipeline(
            image=image,
            bboxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
            labels=np.asarray(labels),
        )
        tensor = out["image"]  # (3, out_height, out_width) uint8
        if self.normalize if normalize is None else normalize:
            tensor = normalize_images(tensor, self.mean, self.std)
        height, width = tensor.shape[-2:]
        out_boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
        out_labels = np.asarray(out["labels"], dtype=np.int64).reshape(-1)
        out_boxes[:, 0::2] = out_boxes[:, 0::2].clip(0, width)
        out_boxes[:, 1::2] = out_boxes[:, 1::2].clip(0, height)
        keep = (out_boxes[:, 2] > out_boxes[:, 0]) & (out_boxes[:, 3] > out_boxes[:, 1])
        return (
            tensor,
            torch.from_numpy(out_boxes[keep]),
            torch.from_numpy(out_labels[keep]),
        )

    def __repr__(self) -> str:
        return f"DetectionTransform({self.pipeline.transforms[:-1]})"


def make_train_transforms(
    scales: Sequence[int] = OFFICIAL_TRAIN_SCALES,
    max_size: int = OFFICIAL_MAX_SIZE,
    crop_resize_scales: Sequence[int] = OFFICIAL_CROP_RESIZE_SCALES,
    crop_min_size: int = 384,
    crop_max_size: int = 600,
    hflip_prob: float = 0.5,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    normalize: bool = True,
) -> DetectionTransform:
    """The official training augmentation (see the module docstring); sizes in pixels. `normalize=False`:
    uint8 image tensors (see `DetectionTransform`)."""
    scales = list(scales)
    resize = RandomShortestSideResize(scales, max_size, p=0.5)
    crop_then_resize = A.Sequential(
        [
            RandomShortestSideResize(list(crop_resize_scales), None),
            RandomSizeCrop(crop_min_size, crop_max_size),
            RandomShortestSideResize(scales, max_size),
        ],
        p=0.5,
    )
    return DetectionTransform(
        [A.HorizontalFlip(p=hflip_prob), A.OneOf([resize, crop_then_resize], p=1.0)],
        mean=mean,
        std=std,
        normalize=normalize,
    )


def make_val_transforms(
    size: int = OFFICIAL_VAL_SIZE,
    max_size: int = OFFICIAL_MAX_SIZE,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> DetectionTransform:
    """The official evaluation resize: shortest side `size`, longest at most `max_size`."""
    return DetectionTransform([RandomShortestSideResize([size], max_size)], mean=mean, std=std)


def make_plain_transforms(
    mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> DetectionTransform:
    """No geometric change: only normalisation and conversion to a tensor."""
    return DetectionTransform([], mean=mean, std=std)

"""Loading awkward image files: every kind loads as RGB of the right size or is skipped and counted."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ddetr.data import CocoDetection, DatasetError, collate_detection, pop_batch_skips
from ddetr.data.image_loading import ImageLoadError
from ddetr.data.image_loading import load_rgb_image
from ddetr.data.skips import SkipReport

W, H = 40, 24  # stored size of every test image (width, height)


def _write_dataset(tmp_path, files: dict[str, tuple[int, int]]) -> tuple:
    """COCO JSON with one box per image; `files` maps file name -> JSON (width, height)."""
    images, annotations = [], []
    for i, (name, (width, height)) in enumerate(files.items(), start=1):
        images.append({"id": i, "file_name": name, "width": width, "height": height})
        annotations.append({"id": i, "image_id": i, "category_id": 1, "bbox": [2, 3, 10, 6]})
    path = tmp_path / "ann.json"
    path.write_text(
        json.dumps(
            {
                "images": images,
                "annotations": annotations,
                "categories": [{"id": 1, "name": "x"}],
            }
        )
    )
    return tmp_path, path


def _gradient_rgb() -> np.ndarray:
    x = np.linspace(0, 255, W, dtype=np.float32)
    y = np.linspace(0, 255, H, dtype=np.float32)
    return np.stack(np.broadcast_arrays(x[None, :], y[:, None], np.full((H, W), 128.0)), axis=-1).astype(np.uint8)


def _exif_rotated(path, orientation: int) -> None:
    image = Image.fromarray(_gradient_rgb())
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, exif=exif.tobytes(), quality=95)


@pytest.fixture
def awkward_files(tmp_path):
    rgb = _gradient_rgb()
    Image.fromarray(rgb).save(tmp_path / "rgb.jpg", quality=95)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.png")
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray(rgb).convert("P").save(tmp_path / "palette.png")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(tmp_path / "deep.png")  # 16-bit grayscale
    Image.fromarray(rgb).convert("1").save(tmp_path / "bilevel.png")
    _exif_rotated(tmp_path / "exif6.jpg", 6)  # displayed rotated by 90 degrees
    _exif_rotated(tmp_path / "exif3.jpg", 3)  # displayed rotated by 180 degrees
    full = (tmp_path / "rgb.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (tmp_path / "garbage.jpg").write_bytes(b"this is not an image at all")
    return tmp_path


GOOD_KINDS = [
    "rgb.jpg",
    "gray.png",
    "rgba.png",
    "cmyk.jpg",
    "palette.png",
    "deep.png",
    "bilevel.png",
    "exif3.jpg",
]


@pytest.mark.parametrize("name", GOOD_KINDS)
def test_each_mode_loads_as_rgb(awkward_files, name):
    pixels = load_rgb_image(awkward_files / name, (W, H))
    assert pixels.dtype == np.uint8 and pixels.shape == (H, W, 3)
    assert pixels.std() > 0


def test_sixteen_bit_is_scaled_not_clipped(awkward_files):
    source = Image.open(awkward_files / "deep.png")
    assert source.mode.startswith("I")
    pixels = load_rgb_image(awkward_files / "deep.png", (W, H))
    expected = _gradient_rgb()[..., 0]
    np.testing.assert_array_equal(pixels[..., 0], expected)
    np.testing.assert_array_equal(pixels[..., 2], expected)


def test_exif_orientation_follows_json_size(awkward_files):
    # stored 40x24 with "rotate 90": JSON written for the displayed (24x40) image -> transposed
    displayed = load_rgb_image(awkward_files / "exif6.jpg", (H, W))
    assert displayed.shape == (W, H, 3)
    # JSON written for the stored pixels -> kept as stored, boxes stay consistent
    stored = load_rgb_image(awkward_files / "exif6.jpg", (W, H))
    assert stored.shape == (H, W, 3)
    np.testing.assert_allclose(stored.astype(float), _gradient_rgb().astype(float), atol=12)
    # forcing the choice, and a size matching neither
    assert load_rgb_image(awkward_files / "exif6.jpg", None, exif_transpose="always").shape == (W, H, 3)
    assert load_rgb_image(awkward_files / "exif6.jpg", None, exif_transpose="never").shape == (H, W, 3)
    with pytest.raises(ImageLoadError, match="size mismatch"):
        load_rgb_image(awkward_files / "exif6.jpg", (W, W))
    # a non-swapping orientation applies the displayed orientation: 180 degrees
    rotated = load_rgb_image(awkward_files / "exif3.jpg", (W, H)).astype(float)
    np.testing.assert_allclose(rotated, _gradient_rgb()[::-1, ::-1].astype(float), atol=12)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("truncated.jpg", "cannot decode"),
        ("garbage.jpg", "cannot decode"),
        ("absent.jpg", "file not found"),
    ],
)
def test_bad_files_raise_load_error(awkward_files, name, reason):
    with pytest.raises(ImageLoadError, match=reason):
        load_rgb_image(awkward_files / name, (W, H))


def test_too_many_pixels(awkward_files, monkeypatch):
    with pytest.raises(ImageLoadError, match="max_image_pixels=100"):
        load_rgb_image(awkward_files / "rgb.jpg", (W, H), max_image_pixels=100)
    # PIL's own guard (more than twice Image.MAX_IMAGE_PIXELS) is reported the same way
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        load_rgb_image(awkward_files / "rgb.jpg", (W, H), max_image_pixels=None)


def test_dataset_loads_every_kind_and_skips_bad_ones(awkward_files):
    files = {name: (W, H) for name in GOOD_KINDS}
    files["exif6.jpg"] = (H, W)  # annotated on the displayed image
    files["truncated.jpg"] = (W, H)
    files["absent.jpg"] = (W, H)
    files["last.jpg"] = (W, H)
    Image.fromarray(_gradient_rgb()).save(awkward_files / "last.jpg")
    image_dir, ann = _write_dataset(awkward_files, files)
    dataset = CocoDetection(image_dir, ann)
    ids = {name: i for i, name in enumerate(files, start=1)}

    report = SkipReport()
    for index, name in enumerate(files):
        image, target = dataset[index]
        report.add(target.pop("skipped", []))
        assert image.dtype == torch.float32 and image.shape[0] == 3
        assert tuple(target["orig_size"].tolist()) == tuple(image.shape[1:])
        if name in ("truncated.jpg", "absent.jpg"):
            assert target["image_id"] == ids["last.jpg"]  # replaced by the next loadable image
        else:
            assert target["image_id"] == ids[name]
            width, height = files[name]
            assert target["orig_size"].tolist() == [height, width]
    # index 8 (truncated) skips truncated and absent before landing on last.jpg; index 9 skips absent
    assert len(report) == 3
    assert {r.image_id for r in report.records} == {
        ids["truncated.jpg"],
        ids["absent.jpg"],
    }
    assert set(report.counts_by_reason()) == {"cannot decode image", "file not found"}
    assert "truncated.jpg" in report.summary()


def test_skip_bad_images_false_raises_with_file_and_id(awkward_files):
    image_dir, ann = _write_dataset(awkward_files, {"rgb.jpg": (W, H), "truncated.jpg": (W, H)})
    dataset = CocoDetection(image_dir, ann, skip_bad_images=False)
    dataset[0]
    with pytest.raises(DatasetError) as info:
        dataset[1]
    assert "truncated.jpg" in str(info.value) and "image id 2" in str(info.value)


def test_all_bad_gives_clear_error(awkward_files):
    image_dir, ann = _write_dataset(awkward_files, {"absent.jpg": (W, H), "garbage.jpg": (W, H)})
    with pytest.raises(DatasetError, match="consecutive bad images"):
        CocoDetection(image_dir, ann)[0]


def test_worker_processes_survive_and_skips_are_counted(awkward_files):
    names = {f"ok{i}.jpg": (W, H) for i in range(7)}
    for name in names:
        Image.fromarray(_gradient_rgb()).save(awkward_files / name)
    names["truncated.jpg"] = (W, H)
    image_dir, ann = _write_dataset(awkward_files, names)
    loader = DataLoader(
        CocoDetection(image_dir, ann),
        batch_size=3,
        num_workers=2,
        collate_fn=collate_detection,
    )
    report, seen = SkipReport(), 0
    for batch in loader:
        report.add(pop_batch_skips(batch))
        assert all("skipped" not in target for target in batch[2])
        seen += batch[0].shape[0]
    assert seen == 8
    assert len(report) == 1 and report.records[0].image_id == 8 and report.records[0].file.endswith("truncated.jpg")

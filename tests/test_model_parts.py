"""Unit tests of the model parts against hand-computed values and properties."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import torchvision
from torch import nn

from ddetr.models import build_deformable_detr
from ddetr.models.backbones import FrozenBatchNorm2d, ResNetBackbone
from ddetr.models.geometry import (
    encoder_output_proposals,
    encoder_reference_points,
    inverse_sigmoid,
    valid_ratios,
)
from ddetr.image_list import pad_images, valid_extent
from ddetr.models.ms_deform_attn import MSDeformAttn
from ddetr.models.position_encoding import PositionEmbeddingSine
from ddetr.models.dropout import dropout
from ddetr.models.relu_dropout import relu_dropout


# ----------------------------------------------------------------------------- images
def test_pad_images_pads_bottom_right_with_zeros():
    first = torch.arange(6.0).view(1, 2, 3)
    second = torch.full((1, 3, 1), 7.0)
    images, mask = pad_images([first, second])
    assert images.shape == (2, 1, 3, 3) and mask.shape == (2, 3, 3)
    assert torch.equal(images[0, 0], torch.tensor([[0.0, 1, 2], [3, 4, 5], [0, 0, 0]]))
    assert torch.equal(images[1, 0], torch.tensor([[7.0, 0, 0], [7, 0, 0], [7, 0, 0]]))
    assert torch.equal(mask[0], torch.tensor([[False, False, False], [False, False, False], [True, True, True]]))
    assert torch.equal(mask[1], torch.tensor([[False, True, True]] * 3))


# ----------------------------------------------------------------------------- position encoding
def test_valid_extent_reads_back_the_padded_sizes():
    images = [torch.ones(3, 5, 7), torch.ones(3, 9, 2), torch.ones(3, 1, 1)]
    _, mask = pad_images(images)
    heights, widths = valid_extent(mask)
    assert heights.tolist() == [5, 9, 1] and widths.tolist() == [7, 2, 1]


def test_sine_position_encoding_hand_values():
    mask = torch.zeros(1, 2, 3, dtype=torch.bool)
    mask[0, :, 2] = True  # last column is padding: valid width 2
    pos = PositionEmbeddingSine(num_pos_feats=2)(mask)  # channels: sin y, cos y, sin x, cos x
    assert pos.shape == (1, 4, 2, 3)
    eps = 1e-6
    y = torch.tensor([0.5, 1.5]) / (2 + eps) * 2 * math.pi  # (cumsum - 0.5) / total * 2pi
    x = torch.tensor([0.5, 1.5, 1.5]) / (2 + eps) * 2 * math.pi  # padding repeats the last valid count
    # (padded columns count no valid rows, so their y encoding is meaningless: compare valid ones)
    torch.testing.assert_close(pos[0, 0, :, :2], y.sin()[:, None].expand(2, 2))
    torch.testing.assert_close(pos[0, 1, :, :2], y.cos()[:, None].expand(2, 2))
    torch.testing.assert_close(pos[0, 2], x.sin()[None].expand(2, 3))
    torch.testing.assert_close(pos[0, 3], x.cos()[None].expand(2, 3))


def test_sine_position_encoding_frequencies():
    mask = torch.zeros(1, 1, 4, dtype=torch.bool)
    pos = PositionEmbeddingSine(num_pos_feats=4, temperature=10000)(mask)
    x = (torch.arange(4.0) + 0.5) / (4 + 1e-6) * 2 * math.pi
    # frequencies 10000 ** (2 * (i // 2) / 4) = 1, 1, 100, 100; sin on even, cos on odd features
    expected = torch.stack([x.sin(), x.cos(), (x / 100).sin(), (x / 100).cos()])
    torch.testing.assert_close(pos[0, 4:, 0], expected)


# ----------------------------------------------------------------------------- relu + dropout
def _saved_count(function, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = function(x)
    return y, len(saved)


@pytest.mark.parametrize("p, training", [(0.1, True), (0.5, True), (0.0, True), (0.1, False)])
def test_relu_dropout_equals_autograds_composition_and_saves_one_tensor(p, training):
    base = torch.randn(4, 7, 9, dtype=torch.float64)
    base[0, 0, :3] = 0.0  # ReLU's kink: PyTorch's gradient there is 0
    grad_output = torch.randn(4, 7, 9, dtype=torch.float64)
    results = []
    for function in (relu_dropout, lambda x, p, t: dropout(F.relu(x), p, t)):
        x = base.clone().requires_grad_(True)
        torch.manual_seed(0)  # the same dropout mask for both
        y, saved = _saved_count(lambda x: function(x, p, training), x)
        y.backward(grad_output)
        results.append((y, x.grad, saved))
    (ours, our_grad, our_saved), (reference, reference_grad, reference_saved) = results
    assert torch.equal(ours, reference)
    torch.testing.assert_close(our_grad, reference_grad, rtol=1e-15, atol=0)
    assert our_saved == 1  # autograd's composition: the ReLU output, plus the mask when dropping
    assert reference_saved == (2 if training and p > 0 else 1)
    if training and p > 0:
        assert 0 < (ours == 0).sum() - (base <= 0).sum()  # some positive values were dropped


# ----------------------------------------------------------------------------- backbone
def _random_batch_norm(seed: int, channels: int = 5) -> nn.BatchNorm2d:
    generator = torch.Generator().manual_seed(seed)
    norm = nn.BatchNorm2d(channels).eval()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=generator)
        norm.bias.normal_(generator=generator)
        norm.running_mean.normal_(generator=generator)
        norm.running_var.uniform_(0.5, 2.0, generator=generator)
    return norm


def test_frozen_batch_norm_equals_batch_norm_in_eval():
    reference = _random_batch_norm(0)
    frozen = FrozenBatchNorm2d(5)
    frozen.load_state_dict(reference.state_dict())  # num_batches_tracked is accepted and ignored
    x = torch.randn(2, 5, 3, 4)
    torch.testing.assert_close(frozen(x), reference(x))
    assert list(frozen.parameters()) == []


def test_frozen_batch_norm_follows_every_change_of_its_statistics():
    """scale and shift are cached: each way of changing the buffers must reach the output."""
    frozen = FrozenBatchNorm2d(5)
    x = torch.randn(2, 5, 3, 4)
    torch.testing.assert_close(frozen(x), x / math.sqrt(1 + frozen.eps))  # defaults: scale 1/sqrt(1+eps), shift 0
    first, second = _random_batch_norm(1), _random_batch_norm(2)
    frozen.load_state_dict(first.state_dict())
    torch.testing.assert_close(frozen(x), first(x))
    frozen.load_state_dict(second.state_dict())  # in-place copies into the same buffers
    torch.testing.assert_close(frozen(x), second(x))
    with torch.no_grad():
        frozen.running_var.fill_(4.0)  # hand value: (x - mean) * weight / 2 + bias
    expected = (x - frozen.running_mean[:, None, None]) * frozen.weight[:, None, None] / math.sqrt(4 + frozen.eps)
    torch.testing.assert_close(frozen(x), expected + frozen.bias[:, None, None])
    frozen.running_mean = torch.zeros(5)  # a replaced buffer
    expected = x * frozen.weight[:, None, None] / math.sqrt(4 + frozen.eps) + frozen.bias[:, None, None]
    torch.testing.assert_close(frozen(x), expected)
    double = frozen.double()  # .to() makes new buffers; the output follows the input's dtype
    assert double(x.double()).dtype == torch.float64
    torch.testing.assert_close(double(x.double()), expected.double())


def test_frozen_batch_norm_under_autocast_inference_mode_and_then_training():
    norm = _random_batch_norm(3)
    frozen = FrozenBatchNorm2d(5)
    frozen.load_state_dict(norm.state_dict())
    x = torch.randn(2, 5, 3, 4)
    half = x.bfloat16()
    # in the input's dtype (autocast's bfloat16 conv outputs stay bfloat16), within bfloat16 rounding
    assert frozen(half).dtype == torch.bfloat16
    torch.testing.assert_close(frozen(half).float(), norm(half.float()), rtol=2e-2, atol=2e-2)
    with torch.inference_mode():  # a cache made under inference_mode ...
        frozen(x)
    x.requires_grad_(True)
    frozen(x).sum().backward()  # ... is still usable where autograd saves it for backward
    torch.testing.assert_close(
        x.grad, (norm.weight / (norm.running_var + norm.eps).sqrt())[:, None, None].expand(2, 5, 3, 4)
    )


def _ddp_frozen_norm_worker(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = nn.Sequential(FrozenBatchNorm2d(2), nn.Conv2d(2, 2, 1, bias=False))  # DDP needs a parameter
        with torch.no_grad():
            model[1].weight.copy_(torch.eye(2)[:, :, None, None])  # identity
            model[0].running_var.fill_(1.0 + 3.0 * rank)  # the ranks disagree before DDP
        x = torch.ones(1, 2, 1, 1)
        model(x)  # caches this rank's scale
        ddp = nn.parallel.DistributedDataParallel(model)  # broadcasts rank 0's buffers into every rank
        out[rank] = [ddp(x).flatten().tolist() for _ in range(2)]
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_frozen_batch_norm_cache_follows_ddps_buffer_sync():
    manager = mp.Manager()
    out = manager.dict()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_frozen_norm_worker, args=(port, out), nprocs=2, join=True)
    expected = [1 / math.sqrt(1.0 + 1e-5)] * 2  # rank 0's variance 1: x / sqrt(1 + eps)
    for rank in (0, 1):
        for step in out[rank]:
            assert step == pytest.approx(expected)


def test_backbone_levels_channels_strides_and_masks():
    backbone = ResNetBackbone("resnet18", num_levels=3)
    assert backbone.num_channels == [128, 256, 512] and backbone.strides == [8, 16, 32]
    images, mask = pad_images([torch.randn(3, 64, 64), torch.randn(3, 40, 64)])
    levels = backbone(images, mask)
    assert [tuple(f.shape) for f, _ in levels] == [(2, 128, 8, 8), (2, 256, 4, 4), (2, 512, 2, 2)]
    stride8_mask = levels[0][1]
    assert not stride8_mask[0].any()
    # nearest resize: output row i reads input row 8 i, padding from input row 40 on -> rows 5.. padded
    assert torch.equal(stride8_mask[1].any(1), torch.tensor([False] * 5 + [True] * 3))
    single = ResNetBackbone("resnet18", num_levels=1)
    assert single.num_channels == [512] and single.strides == [32]


def test_backbone_dc5_and_bottleneck_channels():
    backbone = ResNetBackbone("resnet50", num_levels=1, dilation=True)
    assert backbone.num_channels == [2048] and backbone.strides == [16]
    features, _ = backbone(torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool))[0]
    assert features.shape == (1, 2048, 4, 4)
    with pytest.raises(ValueError, match="dilation"):
        ResNetBackbone("resnet18", num_levels=1, dilation=True)


def test_backbone_weights_from_a_local_file(tmp_path):
    resnet = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(resnet.state_dict(), path)
    backbone = ResNetBackbone("resnet18", weights=path)
    assert torch.equal(backbone.body.conv1.weight, resnet.conv1.weight)
    assert torch.equal(backbone.body.layer3[1].bn2.running_var, resnet.layer3[1].bn2.running_var)
    with pytest.raises(ValueError, match="resnet18.pth"):
        ResNetBackbone("resnet50", weights=path)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        ResNetBackbone("resnet18", weights=tmp_path / "missing.pth")


# ----------------------------------------------------------------------------- deformable attention
def test_ms_deform_attn_initialisation():
    attention = MSDeformAttn(hidden_dim=32, num_levels=2, num_heads=4, num_points=3)
    bias = attention.sampling_offsets.bias.view(4, 2, 3, 2)
    directions = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])  # angle 2 pi h / 4
    for point in range(3):
        for level in range(2):
            torch.testing.assert_close(bias[:, level, point], directions * (point + 1), atol=1e-6, rtol=0)
    assert not attention.sampling_offsets.weight.any()
    assert not attention.attention_weights.weight.any() and not attention.attention_weights.bias.any()
    assert not attention.value_proj.bias.any() and not attention.output_proj.bias.any()


def _identity_attention(num_levels: int, offset: tuple[float, float]) -> MSDeformAttn:
    attention = MSDeformAttn(hidden_dim=4, num_levels=num_levels, num_heads=1, num_points=1)
    with torch.no_grad():
        attention.sampling_offsets.bias.copy_(torch.tensor(offset * num_levels))
        for projection in (attention.value_proj, attention.output_proj):
            projection.weight.copy_(torch.eye(4))
    return attention


def _pixel_centre(column: int, row: int, width: int, height: int) -> list[float]:
    return [(column + 0.5) / width, (row + 0.5) / height]


@pytest.mark.parametrize("offset, shift", [((0.0, 0.0), (0, 0)), ((1.0, 0.0), (1, 0)), ((0.0, 1.0), (0, 1))])
def test_ms_deform_attn_offsets_are_in_pixels_of_each_level(offset, shift):
    # level 0 is 3 x 5 (H x W), level 1 is 2 x 4: an offset of 1 moves one pixel on both levels
    shapes = torch.tensor([[3, 5], [2, 4]])
    values = torch.randn(1, 15 + 8, 4)
    level_start = torch.tensor([0, 15])
    attention = _identity_attention(2, offset)
    reference = torch.tensor([[[_pixel_centre(1, 1, 5, 3), _pixel_centre(2, 0, 4, 2)]]])  # (1, 1, L=2, 2)
    output = attention(torch.zeros(1, 1, 4), reference, values, shapes, level_start)
    grid0 = values[0, :15].view(3, 5, 4)
    grid1 = values[0, 15:].view(2, 4, 4)
    dx, dy = shift
    expected = 0.5 * (grid0[1 + dy, 1 + dx] + grid1[0 + dy, 2 + dx])  # uniform weights over the two levels
    torch.testing.assert_close(output[0, 0], expected)


def test_ms_deform_attn_box_references_scale_offsets_by_box_size():
    shapes = torch.tensor([[4, 8]])
    values = torch.randn(1, 32, 4)
    attention = _identity_attention(1, (1.0, -1.0))
    centre = _pixel_centre(3, 2, 8, 4)
    # offset / num_points * (w, h) / 2 with w = 4 / 8, h = 2 / 4: two pixels right, one pixel up
    reference = torch.tensor([[[centre + [4 / 8, 2 / 4]]]])
    output = attention(torch.zeros(1, 1, 4), reference, values, shapes, torch.tensor([0]))
    torch.testing.assert_close(output[0, 0], values[0].view(4, 8, 4)[1, 5])


def test_ms_deform_attn_zeroes_padding_and_returns_attention():
    shapes = torch.tensor([[2, 2]])
    values = torch.randn(1, 4, 4)
    attention = _identity_attention(1, (0.0, 0.0))
    reference = torch.tensor([[[_pixel_centre(1, 0, 2, 2)]]])
    padding = torch.tensor([[False, True, False, False]])
    output, locations, weights = attention(
        torch.zeros(1, 1, 4), reference, values, shapes, torch.tensor([0]), padding, return_attention=True
    )
    assert not output.any()
    assert locations.shape == (1, 1, 1, 1, 1, 2) and weights.shape == (1, 1, 1, 1, 1)
    torch.testing.assert_close(locations.flatten(), torch.tensor(_pixel_centre(1, 0, 2, 2)))


# ----------------------------------------------------------------------------- transformer helpers
def test_inverse_sigmoid():
    x = torch.tensor([-3.0, 0.0, 2.5])
    torch.testing.assert_close(inverse_sigmoid(x.sigmoid()), x, atol=1e-4, rtol=0)
    torch.testing.assert_close(inverse_sigmoid(torch.tensor([0.0, 1.0, 2.0])), torch.tensor([-1, 1, 1]) * math.log(1e5))


def test_valid_ratios_and_encoder_reference_points():
    mask = torch.zeros(1, 2, 2, dtype=torch.bool)
    mask[0, :, 1] = True  # valid width 1 of 2
    ratios = valid_ratios(mask)
    torch.testing.assert_close(ratios, torch.tensor([[0.5, 1.0]]))
    points = encoder_reference_points([(2, 2)], ratios[:, None])
    # x: (col + 0.5) / (0.5 * 2) * 0.5; y: (row + 0.5) / 2
    expected = torch.tensor([[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]])
    torch.testing.assert_close(points[0, :, 0], expected)


def test_encoder_output_proposals():
    memory = torch.ones(1, 4 + 1, 3)
    padding = torch.tensor([[False, True, False, True, False]])  # level 0: 2 x 2 with valid width 1
    kept, proposals = encoder_output_proposals(memory, padding, [(2, 2), (1, 1)])
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    # level 0, pixel (0, 0): centre (0.5 / 1, 0.5 / 2), size 0.05
    torch.testing.assert_close(proposals[0, 0], torch.tensor([logit(0.5), logit(0.25), logit(0.05), logit(0.05)]))
    # pixel (0, 1) of level 0 is padding; level 1 centre (0.5, 0.5), size 0.1
    assert torch.isinf(proposals[0, 1]).all() and not kept[0, 1].any()
    torch.testing.assert_close(proposals[0, 4], torch.tensor([0.0, 0.0, logit(0.1), logit(0.1)]))
    assert torch.equal(kept[0, [0, 2, 4]], memory[0, [0, 2, 4]])


# ----------------------------------------------------------------------------- detector
def test_extra_levels_chain_and_shapes(micro_options):
    model = build_deformable_detr(3, **micro_options(num_feature_levels=5)).eval()
    assert model.input_proj[3][0].in_channels == 512 and model.input_proj[4][0].in_channels == 32
    assert model.input_proj[3][0].stride == (2, 2) and model.input_proj[3][0].kernel_size == (3, 3)
    images, mask = pad_images([torch.randn(3, 96, 128), torch.randn(3, 50, 70)])
    srcs, masks = model.feature_levels(images, mask)
    assert [tuple(s.shape[-2:]) for s in srcs] == [(12, 16), (6, 8), (3, 4), (2, 2), (1, 1)]
    assert [tuple(m.shape) for m in masks] == [(2, 12, 16), (2, 6, 8), (2, 3, 4), (2, 2, 2), (2, 1, 1)]
    with torch.no_grad():
        outputs = model((images, mask))
    assert outputs["pred_logits"].shape == (2, 10, 3) and outputs["pred_boxes"].shape == (2, 10, 4)  # 10 queries
    assert len(outputs["aux_outputs"]) == 1 and "enc_outputs" not in outputs
    assert ((outputs["pred_boxes"] > 0) & (outputs["pred_boxes"] < 1)).all()


@pytest.mark.parametrize("with_box_refine, two_stage", [(False, False), (True, False), (True, True)])
def test_head_initialisation(with_box_refine, two_stage, micro_options):
    model = build_deformable_detr(3, **micro_options(with_box_refine=with_box_refine, two_stage=two_stage))
    assert len(model.class_embed) == len(model.bbox_embed) == (2 if with_box_refine else 1)
    assert hasattr(model, "query_embed") != two_stage and hasattr(model.transformer, "reference_points") != two_stage
    class_heads = list(model.class_embed) + ([model.enc_class_embed] if two_stage else [])
    box_heads = list(model.bbox_embed) + ([model.enc_bbox_embed] if two_stage else [])
    for head in class_heads:
        torch.testing.assert_close(head.bias, torch.full((3,), -math.log(99.0)))
    for index, head in enumerate(box_heads):
        assert not head.layers[-1].weight.any()
        size_bias = -2.0 if index == 0 and not two_stage else 0.0
        assert torch.equal(head.layers[-1].bias, torch.tensor([0.0, 0.0, size_bias, size_bias]))


def test_two_stage_needs_enough_proposals(micro_options):
    model = build_deformable_detr(
        3, **micro_options(num_feature_levels=1, with_box_refine=True, two_stage=True, num_queries=50)
    )
    with pytest.raises(ValueError, match="proposals"):
        model([torch.randn(3, 64, 64)])


def test_asking_for_a_download_offline_fails_clearly(monkeypatch):
    """Without a network (as in CI), torchvision's weights by name fail with a message that says what to do.
    The failing download is simulated: the test never touches the network."""
    import urllib.error

    import torchvision

    from ddetr.models.backbones import ResNetBackbone

    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("no network (simulated)")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(
        RuntimeError, match=r"cannot download torchvision's ResNet18 IMAGENET1K_V1.*model.backbone.weights="
    ):
        ResNetBackbone("resnet18", num_levels=1, weights="IMAGENET1K_V1")
    with pytest.raises(FileNotFoundError, match="no_such_file.pth"):
        ResNetBackbone("resnet18", num_levels=1, weights="no_such_file.pth")

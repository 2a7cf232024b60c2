"""Backbones: the registry, torchvision ResNets and timm feature extractors (levels by stride,
channels-last outputs, frozen batch norm, which parameters train, weights from local files), a custom
backbone, and one timm backbone through train, eval, predict and ONNX export."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import _micro_options
from torch import nn

from ddetr.checkpoints import CheckpointError
from ddetr.image_list import pad_images
from ddetr.models import DeformableDETRConfig, build_deformable_detr
from ddetr.models.backbones import (
    BACKBONES,
    Backbone,
    FrozenBatchNorm2d,
    ResNetBackbone,
    TimmBackbone,
    build_backbone,
    register_backbone,
)

timm = pytest.importorskip("timm")

# a Swin with one block per stage: the real architecture (patch embedding, windows, NHWC outputs), fast
SMALL_SWIN = {"strict_img_size": False, "embed_dim": 32, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1)}


def random_state_dict(network: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """``network``'s state dict with every floating tensor random (positive: valid variances) and every
    integer one a random count, so that a tensor loaded in the wrong place cannot go unnoticed."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in network.state_dict().items():
        if value.is_floating_point():
            state[key] = torch.rand(value.shape, generator=generator) + 0.5
        else:
            state[key] = torch.randint(1, 1000, value.shape, generator=generator, dtype=value.dtype)
    return state


def micro_config(num_feature_levels: int = 4, **backbone) -> DeformableDETRConfig:
    """The micro model with 1 decoder layer, 5 queries, 3 classes, ``num_feature_levels`` and the ``backbone``
    options."""
    options = _micro_options(backbone=backbone, dec_layers=1, num_queries=5, num_feature_levels=num_feature_levels)
    return DeformableDETRConfig.from_dict(num_classes=3, **options)


# ----------------------------------------------------------------------------- registry
def test_registry_knows_the_builtin_names_and_names_the_unknown():
    assert {"resnet18", "resnet34", "resnet50", "resnet101", "timm:"} <= set(BACKBONES)
    with pytest.raises(ValueError, match=r"unknown backbone 'vgg16'.*'resnet50'.*'timm:<model>'"):
        build_backbone(micro_config(name="vgg16"))
    with pytest.raises(ValueError, match="family prefix"):
        register_backbone("a:b")
    with pytest.raises(ValueError, match="timm has no model 'no_such_net'"):
        build_backbone(micro_config(name="timm:no_such_net"))


# ----------------------------------------------------------------------------- torchvision ResNets
@pytest.mark.parametrize(
    "name, norm, dilation",
    [
        ("resnet18", "batch", False),
        ("resnet18", "frozen", False),
        ("resnet50", "frozen", True),
        ("resnet50", "batch", False),
    ],
)
def test_a_torchvision_state_dict_loads_into_every_resnet_variant(tmp_path, name, norm, dilation):
    """Issue 19: ``torchvision.models.resnetX().state_dict()`` (with ``num_batches_tracked`` and ``fc``)
    loads into the trainable (``norm: batch``, the small/tiny models) and the frozen ResNets alike."""
    file_state = random_state_dict(getattr(torchvision.models, name)())
    path = tmp_path / f"{name}.pth"
    torch.save(file_state, path)
    backbone = ResNetBackbone(name, num_levels=3, dilation=dilation, norm=norm, weights=path)
    loaded = backbone.body.state_dict()
    expected_keys = {key for key in file_state if not key.startswith("fc.")}
    if norm == "frozen":  # frozen batch norm keeps no batch count
        expected_keys = {key for key in expected_keys if not key.endswith("num_batches_tracked")}
    assert set(loaded) == expected_keys
    for key in expected_keys:
        assert torch.equal(loaded[key], file_state[key]), key


def test_resnet_policy_frozen_stem_and_state_dict_names():
    backbone = build_backbone(micro_config(name="resnet18"))
    assert isinstance(backbone, Backbone) and backbone.strides == [8, 16, 32]
    trainable = {name.split(".")[0] for name, p in backbone.body.named_parameters() if p.requires_grad}
    frozen = {name.split(".")[0] for name, p in backbone.body.named_parameters() if not p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4"} and frozen == {"conv1", "layer1"}
    assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
    # the official names (converters, old checkpoints): torchvision's under backbone.body.
    model = build_deformable_detr(micro_config(name="resnet18"))
    assert "backbone.body.layer1.0.bn1.running_var" in model.state_dict()


@pytest.mark.parametrize("mode", [True, "auto"])
def test_channels_last_backbone_computes_the_same_maps_and_gradients(mode):
    """``true`` converts the weights and the input, ``auto`` (the default) both on the CPU; the
    convolutions then run channels-last (their outputs are), with NCHW's maps and weight gradients."""
    images, mask = pad_images([torch.randn(3, 64, 96), torch.randn(3, 40, 96)])
    results = {}
    for channels_last in (False, mode):
        torch.manual_seed(0)
        backbone = build_backbone(micro_config(name="resnet18", channels_last=channels_last)).train()
        levels = backbone(images, mask)
        sum(features.square().mean() for features, _ in levels).backward()
        grads = {name: p.grad for name, p in backbone.named_parameters() if p.grad is not None}
        results[channels_last] = backbone, levels, grads
    (_, nchw_levels, nchw_grads), (backbone, levels, grads) = results[False], results[mode]
    assert all(f.is_contiguous() for f, _ in nchw_levels)
    weights = [p for p in backbone.parameters() if p.dim() == 4]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)  # 1x1: NCHW as well
    assert not any(w.is_contiguous() for w in weights if w.shape[-1] > 1)
    assert all(grads[name].stride() == p.stride() for name, p in backbone.named_parameters() if name in grads)
    assert all(f.is_contiguous(memory_format=torch.channels_last) and not f.is_contiguous() for f, _ in levels)
    for (a, mask_a), (b, mask_b) in zip(nchw_levels, levels, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
        assert torch.equal(mask_a, mask_b)
    assert grads.keys() == nchw_grads.keys() and "body.layer4.1.conv2.weight" in grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, nchw_grads[name], rtol=1e-3, atol=1e-5, msg=name)


def test_channels_last_auto_leaves_other_devices_as_they_were():
    """``auto`` runs channels-last on the CPU only: moved to another device (here ``meta``, which computes
    shapes and memory formats) the weights go back to NCHW and the convolutions see NCHW memory, as with
    ``false``; moved back to the CPU they are channels-last again."""
    backbone = build_backbone(micro_config(name="resnet18")).to("meta")
    assert backbone.channels_last == "auto"
    assert all(p.is_contiguous() for p in backbone.parameters())
    images = torch.empty(2, 3, 64, 96, device="meta")
    mask = torch.zeros(2, 64, 96, dtype=torch.bool, device="meta")
    levels = backbone(images, mask)
    assert all(f.is_contiguous() and not f.is_contiguous(memory_format=torch.channels_last) for f, _ in levels)
    backbone.to_empty(device="cpu")
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in backbone.parameters() if p.dim() == 4)


def test_channels_last_auto_keeps_the_parameters_an_optimizer_holds():
    """The weights are placed by swapping the parameters' data: after a dtype move (which re-places
    them) the optimiser still holds the model's parameters and its step changes them."""
    torch.manual_seed(0)
    model = build_deformable_detr(micro_config(name="resnet18"))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    projection = model.input_proj[-1][0].weight  # the 3x3 projection of the extra level
    assert projection.is_contiguous(memory_format=torch.channels_last) and not projection.is_contiguous()
    model.double()
    assert model.input_proj[-1][0].weight is projection and projection.dtype == torch.float64
    assert projection.is_contiguous(memory_format=torch.channels_last) and not projection.is_contiguous()
    before = projection.detach().clone()
    images = torch.randn(2, 3, 128, 128, dtype=torch.float64)
    outputs = model((images, torch.zeros(2, 128, 128, dtype=torch.bool)))
    outputs["pred_logits"].square().sum().backward()
    optimizer.step()
    assert not torch.equal(projection, before)


@pytest.mark.parametrize("value", ["yes", "on", 2])
def test_channels_last_values_are_checked(value):
    with pytest.raises(ValueError, match="backbone.channels_last must be true, false or auto"):
        micro_config(name="resnet18", channels_last=value)


# ----------------------------------------------------------------------------- backbone.max_stride
def _torchvision_stages(network: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The outputs of torchvision ResNet ``network``'s layer2 and layer3, by name."""
    x = network.maxpool(network.relu(network.bn1(network.conv1(images))))
    layer2 = network.layer2(network.layer1(x))
    return {"layer2": layer2, "layer3": network.layer3(layer2)}


@pytest.mark.parametrize("num_feature_levels, stages", [(3, ["layer2", "layer3"]), (1, ["layer3"])])
def test_resnet_up_to_stride_16_is_torchvisions_network_through_layer3(num_feature_levels, stages):
    torch.manual_seed(0)
    backbone = build_backbone(micro_config(num_feature_levels, name="resnet18", norm="batch", max_stride=16)).eval()
    assert not hasattr(backbone.body, "layer4")  # never built, so never run and never optimised
    assert backbone.strides == [8, 16][-len(stages) :] and backbone.num_channels == [128, 256][-len(stages) :]
    reference = torchvision.models.resnet18().eval()
    loaded = reference.load_state_dict(backbone.body.state_dict(), strict=False)
    assert not loaded.unexpected_keys and {key.split(".")[0] for key in loaded.missing_keys} == {"layer4", "fc"}
    images, mask = pad_images([torch.randn(3, 64, 96), torch.randn(3, 40, 96)])
    with torch.no_grad():
        expected = _torchvision_stages(reference, images)
        levels = backbone(images, mask)
    for (features, _), stage in zip(levels, stages, strict=True):
        torch.testing.assert_close(features, expected[stage], rtol=1e-5, atol=1e-5)


def test_max_stride_16_detector_makes_the_coarser_levels_and_trains_end_to_end():
    config = micro_config(3, name="resnet18", norm="batch", max_stride=16)
    model = build_deformable_detr(config)
    assert config.num_backbone_levels == 2 and model.level_strides() == [8, 16, 32]
    extra = model.input_proj[2][0]  # the official extra level: 3x3 stride-2 conv of the last backbone map
    assert (extra.in_channels, extra.kernel_size, extra.stride) == (256, (3, 3), (2, 2))
    outputs = model([torch.randn(3, 64, 64), torch.randn(3, 48, 64)])
    (outputs["pred_logits"].sum() + outputs["pred_boxes"].sum()).backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None for p in trained)


def test_max_stride_errors_name_the_option():
    with pytest.raises(ValueError, match="max_stride must be one of"):
        micro_config(name="resnet18", max_stride=64)
    with pytest.raises(ValueError, match="max_stride=16"):
        build_backbone(micro_config(name="resnet50", dilation=True, max_stride=16))


def test_timm_max_stride_16_takes_the_same_maps_as_the_full_levels_without_the_last_stage():
    """With ``max_stride=16`` the network is built without its stride-32 stage (timm's ``out_indices``): its
    parameters are the full network's up to stride 16, initialised alike from the same seed, and its maps
    are the full network's there."""
    torch.manual_seed(0)
    full = build_backbone(micro_config(3, name="timm:regnetx_002")).eval()
    torch.manual_seed(0)
    cut = build_backbone(micro_config(3, name="timm:regnetx_002", max_stride=16)).eval()
    assert cut.strides == [8, 16] and cut.num_channels == full.num_channels[:2]
    full_state, cut_state = full.state_dict(), cut.state_dict()
    assert set(cut_state) < set(full_state) and not any(".s4" in key or "_s4" in key for key in cut_state)
    assert any("s4" in key for key in full_state)
    for key, value in cut_state.items():
        torch.testing.assert_close(value, full_state[key], rtol=0, atol=0, msg=key)
    images, mask = pad_images([torch.randn(3, 64, 96), torch.randn(3, 40, 96)])
    with torch.no_grad():
        for (a, _), (b, _) in zip(full(images, mask)[:2], cut(images, mask), strict=True):
            torch.testing.assert_close(a, b)


def test_timm_max_stride_16_loads_a_whole_networks_weights_file(tmp_path):
    """The weights file of the whole classification network loads into the cut network (the stride-32
    stage's and the head's entries are ignored, every kept tensor is the file's)."""
    import timm

    torch.manual_seed(1)
    state = timm.create_model("regnetx_002").state_dict()
    path = tmp_path / "regnetx_002.pth"
    torch.save(state, path)
    cut = build_backbone(micro_config(3, name="timm:regnetx_002", max_stride=16, weights=str(path)))
    kept = cut.body.state_dict()
    assert any(key.startswith("s4.") for key in state) and not any(key.startswith("s4") for key in kept)
    for key, value in kept.items():
        if not key.endswith("num_batches_tracked"):
            torch.testing.assert_close(value, state[key], rtol=0, atol=0, msg=key)


# ----------------------------------------------------------------------------- ResNet speed-ups
@pytest.mark.parametrize("block_name", ["basic", "bottleneck"])
def test_blocks_with_folded_frozen_norms_compute_torchvisions_blocks(block_name):
    """The blocks that fold each frozen norm into its convolution (weights * scale, bias = shift) give
    torchvision's block with the same frozen norms (random weights and statistics, a strided downsample) in
    outputs and gradients, hold the same state-dict keys, and with trainable batch norm are torchvision's."""
    from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

    from ddetr.models.backbones.frozen_norm_blocks import FrozenNormBasicBlock, FrozenNormBottleneck

    reference_class, our_class = {
        "basic": (BasicBlock, FrozenNormBasicBlock),
        "bottleneck": (Bottleneck, FrozenNormBottleneck),
    }[block_name]
    planes = 8
    out_channels = planes * reference_class.expansion

    def block(cls, norm):
        downsample = nn.Sequential(conv1x1(16, out_channels, 2), norm(out_channels))
        return cls(16, planes, stride=2, downsample=downsample, norm_layer=norm).double()

    reference, ours = block(reference_class, FrozenBatchNorm2d), block(our_class, FrozenBatchNorm2d)
    state = {
        key: value - 1.0 if "conv" in key or "downsample.0" in key else value  # weights of both signs
        for key, value in random_state_dict(reference).items()
    }
    reference.load_state_dict(state)
    ours.load_state_dict(state)
    assert set(ours.state_dict()) == set(reference.state_dict())
    grads = []
    for network in (reference, ours):
        x = torch.randn(2, 16, 9, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        x.requires_grad_(True)
        y = network(x)
        y.backward(torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2)))
        grads.append((y.detach(), x.grad, [p.grad for p in network.parameters()]))
    (y_ref, x_grad_ref, p_grads_ref), (y_ours, x_grad_ours, p_grads_ours) = grads
    assert (y_ref > 0).any() and (y_ref == 0).any()  # the final ReLU cuts some
    torch.testing.assert_close(y_ours, y_ref)
    torch.testing.assert_close(x_grad_ours, x_grad_ref)
    for ours_grad, reference_grad in zip(p_grads_ours, p_grads_ref, strict=True):
        torch.testing.assert_close(ours_grad, reference_grad)
    # trainable batch norm: torchvision's forward, unchanged
    torch.manual_seed(3)
    reference = block(reference_class, nn.BatchNorm2d)
    torch.manual_seed(3)
    ours = block(our_class, nn.BatchNorm2d)
    x = torch.randn(2, 16, 9, 10, dtype=torch.float64)
    assert torch.equal(ours(x), reference(x))


def test_resnet_stem_max_pool_runs_in_channels_last_only_without_a_gradient():
    """The stem's pooling gives ``nn.MaxPool2d``'s values (in contiguous memory); it takes the channels-last
    path only where no gradient is needed, and the gradient through it is ``nn.MaxPool2d``'s."""
    from ddetr.models.backbones.max_pool import ChannelsLastMaxPool2d, channels_last_pays

    backbone = ResNetBackbone("resnet18", num_levels=3, norm="frozen")
    pool = backbone.body.maxpool
    assert isinstance(pool, ChannelsLastMaxPool2d)
    reference = nn.MaxPool2d(3, 2, 1)
    x = torch.randn(2, 5, 33, 40)
    assert channels_last_pays(x) and not channels_last_pays(x.requires_grad_(True))
    with torch.no_grad():
        pooled = pool(x)
    assert pooled.is_contiguous() and torch.equal(pooled, reference(x.detach()))
    grad_output = torch.randn(pooled.shape)
    x_reference = x.detach().clone().requires_grad_(True)
    pool(x).backward(grad_output)
    reference(x_reference).backward(grad_output)
    assert torch.equal(x.grad, x_reference.grad)


# ----------------------------------------------------------------------------- timm
TIMM_FAMILIES = [
    ("convnext_atto", {}),  # ConvNeXt: first map at stride 4, layer norm
    ("efficientnet_b0", {}),  # EfficientNet: first map at stride 2, BatchNormAct2d
    ("regnetx_002", {}),  # RegNet
    ("resnet18d", {}),  # ResNet-D (deep stem, average-pool shortcut)
    ("mobilenetv3_small_100", {}),  # MobileNet
    ("swin_tiny_patch4_window7_224", SMALL_SWIN),  # Swin: channels-last outputs, patch embedding
]


@pytest.mark.parametrize("model_name, kwargs", TIMM_FAMILIES, ids=[name for name, _ in TIMM_FAMILIES])
def test_timm_levels_are_the_maps_at_strides_8_16_32_channels_first(model_name, kwargs):
    torch.manual_seed(0)
    backbone = build_backbone(micro_config(name=f"timm:{model_name}", kwargs=kwargs))
    assert backbone.strides == [8, 16, 32]
    images, mask = pad_images([torch.randn(3, 64, 96), torch.randn(3, 40, 96)])
    levels = backbone.eval()(images, mask)
    for (features, level_mask), stride, channels in zip(levels, [8, 16, 32], backbone.num_channels, strict=True):
        assert features.shape == (2, channels, 64 // stride, 96 // stride), model_name
        assert level_mask.shape == (2, 64 // stride, 96 // stride)
        # nearest resize: row i reads input row i * stride; the second image is padded from row 40 on
        assert not level_mask[0].any()
        assert torch.equal(level_mask[1].any(1), torch.arange(64 // stride) * stride >= 40)


def test_timm_fewer_levels_are_the_coarsest_and_the_model_trains_end_to_end():
    model = build_deformable_detr(micro_config(num_feature_levels=2, name="timm:regnetx_002"))
    assert model.backbone.strides == [16, 32] and model.level_strides() == [16, 32]
    outputs = model([torch.randn(3, 64, 64), torch.randn(3, 48, 64)])
    outputs["pred_logits"].sum().backward()
    trained = [p for p in model.backbone.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None for p in trained)


def test_timm_batch_norm_frozen_layer_norm_untouched_and_the_same_function(tmp_path):
    """Frozen batch norm computes what the trained norm computes in eval mode, with the network's own eps."""
    path = tmp_path / "efficientnet_b0.pth"
    torch.save(random_state_dict(timm.create_model("efficientnet_b0")), path)
    frozen = TimmBackbone("efficientnet_b0", norm="frozen", weights=path).eval()
    trained = TimmBackbone("efficientnet_b0", norm="batch", weights=path).eval()
    batch_norms = [m for m in trained.modules() if isinstance(m, nn.BatchNorm2d)]
    frozen_norms = [m for m in frozen.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert batch_norms and len(frozen_norms) == len(batch_norms)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
    assert [m.eps for m in frozen_norms] == [m.eps for m in batch_norms]
    images = torch.randn(1, 3, 64, 64) * 0.1
    with torch.no_grad():
        for a, b in zip(frozen.feature_maps(images), trained.feature_maps(images), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    convnext = TimmBackbone("convnext_atto", norm="frozen")
    plain = timm.create_model("convnext_atto", features_only=True)
    count = lambda net, kind: sum(isinstance(m, kind) for m in net.modules())
    assert count(convnext, nn.LayerNorm) == count(plain, nn.LayerNorm) > 0


def test_timm_stem_and_stride_4_stage_frozen_by_default_else_all_train():
    convnext = TimmBackbone("convnext_atto")
    frozen = {name.split(".")[0] for name, p in convnext.body.named_parameters() if not p.requires_grad}
    assert frozen == {"stem_0", "stem_1", "stages_0"}  # stages.1 starts with the stride-8 downsampling
    efficientnet = TimmBackbone("efficientnet_b0")
    frozen = {".".join(name.split(".")[:2]) for name, p in efficientnet.body.named_parameters() if not p.requires_grad}
    assert frozen == {"conv_stem.weight", "blocks.0", "blocks.1"}  # blocks.2 is the first stride-8 stage
    everything = TimmBackbone("convnext_atto", freeze_stem=False)
    assert all(p.requires_grad for p in everything.parameters())
    nothing = TimmBackbone("convnext_atto", train_backbone=False)
    assert not any(p.requires_grad for p in nothing.parameters())


@pytest.mark.parametrize("model_name", ["convnext_atto", "efficientnet_b0", "mobilenetv3_small_100"])
def test_a_timm_state_dict_file_loads_every_backbone_tensor_exactly(tmp_path, model_name):
    """``model.backbone.weights=FILE`` with ``timm.create_model(name).state_dict()``: every tensor as timm's
    own loader puts it into the same feature extractor (the reference), classifier entries ignored."""
    file_state = random_state_dict(timm.create_model(model_name))
    path = tmp_path / f"{model_name}.pth"
    torch.save(file_state, path)
    model = build_deformable_detr(micro_config(name=f"timm:{model_name}", weights=str(path), norm="batch"))
    ours = {
        key.removeprefix("backbone.body."): v
        for key, v in model.state_dict().items()
        if key.startswith("backbone.body.")
    }
    reference = timm.create_model(
        model_name, features_only=True, pretrained=True, pretrained_cfg_overlay={"file": str(path)}
    ).state_dict()
    assert set(ours) == set(reference)
    for key, value in reference.items():
        assert torch.equal(ours[key], value), key


def test_a_timm_safetensors_file_loads_as_timm_loads_it(tmp_path):
    """A ``.safetensors`` file (the format timm's own weights come in) through the checkpoint reader: every
    tensor as timm's own loader puts it into the same feature extractor."""
    from safetensors.torch import save_file

    path = tmp_path / "convnext_atto.safetensors"
    save_file(random_state_dict(timm.create_model("convnext_atto"), seed=3), str(path))
    ours = TimmBackbone("convnext_atto", norm="batch", weights=path).body.state_dict()
    reference = timm.create_model(
        "convnext_atto", features_only=True, pretrained=True, pretrained_cfg_overlay={"file": str(path)}
    ).state_dict()
    assert set(ours) == set(reference)
    for key, value in reference.items():
        assert torch.equal(ours[key], value), key
    path.write_bytes(path.read_bytes()[:-100])  # an interrupted copy: one line naming the option and the file
    with pytest.raises(CheckpointError, match=rf"^model.backbone.weights: cannot read {path}: a damaged"):
        TimmBackbone("convnext_atto", weights=path)


def test_a_wrong_weights_file_lists_the_keys(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18d").state_dict(), path)
    with pytest.raises(ValueError, match=r"resnet18.pth do not fit the timm convnext_atto: missing \['stages_0"):
        TimmBackbone("convnext_atto", weights=path)
    state = random_state_dict(timm.create_model("convnext_atto"))
    state["stages.0.blocks.0.extra"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"unexpected \['stages.0.blocks.0.extra'\]"):
        TimmBackbone("convnext_atto", weights=path)


def test_timm_models_that_do_not_fit_are_named():
    with pytest.raises(ValueError, match=r"strides \[16\]; Deformable DETR needs 8, 16 and 32"):
        TimmBackbone("vit_tiny_patch16_224", kwargs={"depth": 3})
    with pytest.raises(
        ValueError, match=r"accepts only \(224, 224\) inputs.*\+model.backbone.kwargs.strict_img_size=false"
    ):
        TimmBackbone(
            "swin_tiny_patch4_window7_224", kwargs={k: v for k, v in SMALL_SWIN.items() if k != "strict_img_size"}
        )


def test_without_timm_one_line_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(ImportError, match=r"needs timm, which is not installed: pip install 'ddetr\[timm\]'"):
        build_backbone(micro_config(name="timm:convnext_atto"))


# ----------------------------------------------------------------------------- a custom backbone
class TwoConvs(Backbone):
    """A tiny custom backbone: strided convolutions down to strides 8, 16, 32."""

    def __init__(self, config: DeformableDETRConfig) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1))
        self.down = nn.ModuleList([nn.Conv2d(16, 24, 3, 2, 1), nn.Conv2d(24, 32, 3, 2, 1)])
        self.strides, self.num_channels = [8, 16, 32], [16, 24, 32]
        num_levels = config.num_backbone_levels
        self.strides, self.num_channels = self.strides[3 - num_levels :], self.num_channels[3 - num_levels :]

    def feature_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        maps = [self.stem(images)]
        for conv in self.down:
            maps.append(torch.relu(conv(maps[-1])))
        return maps[len(maps) - len(self.strides) :]


def test_a_registered_custom_backbone_builds_and_trains(monkeypatch):
    monkeypatch.setitem(BACKBONES, "two_convs", TwoConvs)  # register_backbone("two_convs"), undone after the test
    assert register_backbone("two_convs")(TwoConvs) is TwoConvs
    from ddetr.training.module import DeformableDETRModule

    torch.manual_seed(0)
    module = DeformableDETRModule(micro_config(name="two_convs"))
    assert isinstance(module.model.backbone, TwoConvs) and module.model.level_strides() == [8, 16, 32, 64]
    images, mask = pad_images([torch.rand(3, 64, 64), torch.rand(3, 48, 64)])
    targets = [
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3]])},
        {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.3, 0.4, 0.1, 0.2]])},
    ]
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    before = module.model.backbone.stem[0].weight.detach().clone()
    losses = module.criterion(module.model((images, mask)), targets)
    loss = sum(losses[name] * weight for name, weight in module.criterion.weight_dict.items() if name in losses)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and not torch.equal(module.model.backbone.stem[0].weight, before)


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synthetic")


@pytest.mark.slow
def test_timm_backbone_trains_evaluates_predicts_and_exports(tmp_path, data_root, debug_overrides, eval_overrides):
    """``preset=debug model.backbone.name=timm:convnext_atto``: the saved checkpoint serves eval, predict
    and a dynamic-size ONNX export that onnxruntime runs at two other sizes, as PyTorch does."""
    from ddetr.app import compose
    from ddetr.checkpoints import load_module
    from ddetr.inference.export import ExportableDetector, example_inputs, export
    from ddetr.inference.predict import predict
    from ddetr.training.run import evaluate, train

    run = tmp_path / "run"
    metrics = train(compose(debug_overrides(run, data_root) + ["model.backbone.name=timm:convnext_atto"]))
    assert "val/AP" in metrics
    checkpoint = run / "checkpoints" / "last.ckpt"
    module = load_module(checkpoint)
    assert isinstance(module.model.backbone, TimmBackbone)

    on_eval_data = eval_overrides(checkpoint, data_root, tmp_path / "eval", tmp_path / "logs", batch_size=2)
    evaluated = evaluate(compose(on_eval_data, config_name="eval"))
    assert evaluated["val/AP"] == pytest.approx(metrics["val/AP"], abs=1e-6)

    summary = predict(
        compose(
            [
                f"ckpt_path={checkpoint}",
                f"input={data_root / 'val'}",
                f"output={tmp_path}/predict",
                "threshold=0.0",
                f"paths.log_dir={tmp_path}/logs",
            ],
            config_name="predict",
        )
    )
    assert summary["num_images"] == len(list((data_root / "val").glob("*.jpg"))) > 0

    onnx_path = tmp_path / "model.onnx"
    export(
        compose(
            [
                f"ckpt_path={checkpoint}",
                f"output={onnx_path}",
                "batch_size=2",
                "height=128",
                "width=160",
                "check=false",
                f"paths.log_dir={tmp_path}/logs",
            ],
            config_name="export",
        )
    )
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    reference = ExportableDetector(module.model)
    for batch_size, height, width in [(1, 96, 64), (3, 80, 128)]:
        (images,) = example_inputs(batch_size, height, width, with_mask=False, seed=3)
        logits, boxes = session.run(["pred_logits", "pred_boxes"], {"images": images.numpy()})
        with torch.no_grad():
            expected_logits, expected_boxes = reference(images)
        assert (torch.from_numpy(logits) - expected_logits).abs().max() < 1e-4
        assert (torch.from_numpy(boxes) - expected_boxes).abs().max() < 1e-4


@pytest.mark.parametrize("name", ["timm:efficientnet_b0", "timm:regnetx_002"])
def test_other_timm_backbones_run_the_detector(name):
    torch.manual_seed(0)
    model = build_deformable_detr(micro_config(name=name)).eval()
    with torch.no_grad():
        outputs = model([torch.randn(3, 64, 80), torch.randn(3, 48, 64)])
    assert outputs["pred_logits"].shape == (2, 5, 3) and torch.isfinite(outputs["pred_boxes"]).all()

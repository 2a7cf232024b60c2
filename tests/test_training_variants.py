"""DINO-class training switches (look-forward-twice, mixed query selection, contrastive denoising, hybrid
matching, IoU-aware class losses), each checked by a property or a hand-computed value."""

from __future__ import annotations

import math

import pytest
import torch
from _runs import run_workers

from ddetr.boxes import box_cxcywh_to_xyxy
from ddetr.models.build import build_criterion, build_deformable_detr
from ddetr.models.config import DeformableDETRConfig, DenoisingConfig, LossConfig
from ddetr.models.criterion import iou_aware_class_terms, iou_aware_targets
from ddetr.models.denoising import ContrastiveDenoising, noised_boxes, num_groups, self_attention_mask
from ddetr.models.hybrid import repeat_targets

NUM_CLASSES = 5


def variant_config(micro_options, **switches) -> DeformableDETRConfig:
    """The micro model, two-stage with box refinement, frozen norms and no dropout (train and eval modes
    compute the same), with ``switches``."""
    options = micro_options(
        backbone={"name": "resnet18", "norm": "frozen"},
        dropout=0.0,
        num_feature_levels=2,
        with_box_refine=True,
        two_stage=True,
        **switches,
    )
    return DeformableDETRConfig.from_dict(options, num_classes=NUM_CLASSES)


def batch() -> tuple[tuple[torch.Tensor, torch.Tensor], list[dict[str, torch.Tensor]]]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 64, 80, generator=generator)
    mask = torch.zeros(2, 64, 80, dtype=torch.bool)
    mask[1, :, 64:] = True  # the second image is narrower: padding
    targets = [
        {
            "labels": torch.tensor([1, 3, 0]),
            "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3], [0.2, 0.3, 0.1, 0.2], [0.7, 0.6, 0.2, 0.2]]),
        },
        {"labels": torch.tensor([4]), "boxes": torch.tensor([[0.4, 0.5, 0.3, 0.5]])},
    ]
    return (images, mask), targets


def no_boxes(num_images: int = 2) -> list[dict[str, torch.Tensor]]:
    return [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)} for _ in range(num_images)]


# ---------------------------------------------------------------- look-forward-twice


def test_look_forward_twice_changes_only_the_previous_boxes_gradient(micro_options):
    """Same forward; a loss on the last layer's boxes reaches the first layer's box head only with it."""
    inputs, _ = batch()
    results = {}
    for switch in (False, True):
        torch.manual_seed(0)
        model = build_deformable_detr(variant_config(micro_options, look_forward_twice=switch)).train()
        outputs = model(inputs)
        outputs["pred_boxes"].sum().backward()
        first_head = model.bbox_embed[0].layers[-1].weight.grad
        results[switch] = (outputs["pred_logits"].detach(), outputs["pred_boxes"].detach(), first_head)
    torch.testing.assert_close(results[True][0], results[False][0], rtol=0, atol=0)
    torch.testing.assert_close(results[True][1], results[False][1], rtol=0, atol=0)
    assert results[False][2] is None or results[False][2].abs().max() == 0  # the reference is detached
    assert results[True][2] is not None and results[True][2].abs().max() > 0


# ---------------------------------------------------------------- mixed query selection


def test_mixed_selection_learns_the_content_and_keeps_the_references(micro_options):
    """Mixed: the decoder's content queries are ``tgt_embed`` (a change to it changes the outputs); the
    proposals, the encoder outputs and the first layer's reference are those of pure selection."""
    inputs, _ = batch()
    torch.manual_seed(0)
    pure = build_deformable_detr(variant_config(micro_options)).eval()
    mixed = build_deformable_detr(variant_config(micro_options, query_selection="mixed")).eval()
    missing, unexpected = mixed.load_state_dict(pure.state_dict(), strict=False)
    assert missing == ["transformer.tgt_embed.weight"] and unexpected == []
    captured = {}
    for name, model in (("pure", pure), ("mixed", mixed)):
        hook = model.transformer.decoder.register_forward_pre_hook(
            lambda module, args, name=name: captured.__setitem__(name, args[0])
        )
        with torch.no_grad():
            captured[name + "_out"] = model(inputs)
        hook.remove()
    torch.testing.assert_close(captured["mixed"].reference_points, captured["pure"].reference_points)
    torch.testing.assert_close(captured["mixed"].position, captured["pure"].position)
    expected_content = mixed.transformer.tgt_embed.weight[None].expand(2, -1, -1)
    torch.testing.assert_close(captured["mixed"].content, expected_content)
    enc_pure, enc_mixed = captured["pure_out"]["enc_outputs"], captured["mixed_out"]["enc_outputs"]
    torch.testing.assert_close(enc_mixed["pred_logits"], enc_pure["pred_logits"])


def test_mixed_selection_needs_two_stage(micro_options):
    with pytest.raises(ValueError, match="two_stage"):
        DeformableDETRConfig.from_dict(micro_options(query_selection="mixed"), num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match="query_selection"):
        variant_config(micro_options, query_selection="half")


# ---------------------------------------------------------------- contrastive denoising


def test_matching_queries_do_not_see_the_denoising_queries(micro_options):
    """The attention mask works: adding denoising queries leaves the matching queries' outputs unchanged."""
    inputs, targets = batch()
    torch.manual_seed(0)
    switches = {"query_selection": "mixed", "look_forward_twice": True}
    model = build_deformable_detr(variant_config(micro_options, denoising={"enabled": True}, **switches)).train()
    with torch.no_grad():
        with_denoising = model(inputs, targets)
        without = model(inputs)
    assert with_denoising["denoising"].num_queries > 0
    assert with_denoising["dn_outputs"]["pred_logits"].shape[1] == with_denoising["denoising"].num_queries
    assert without["dn_outputs"]["pred_logits"].shape[1] == 0
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(with_denoising[key], without[key], rtol=1e-5, atol=1e-5)
        for layer_with, layer_without in zip(with_denoising["aux_outputs"], without["aux_outputs"], strict=True):
            torch.testing.assert_close(layer_with[key], layer_without[key], rtol=1e-5, atol=1e-5)


def test_denoising_queries_without_noise_are_the_ground_truth():
    """Noise 0: every group holds each box as a positive and a negative query, the content its label's
    embedding; the bookkeeping points every positive at its own box; padding slots are empty."""
    config = DenoisingConfig(enabled=True, num_queries=4, label_noise_ratio=0.0, box_noise_scale=0.0)
    torch.manual_seed(0)
    generator = ContrastiveDenoising(NUM_CLASSES, 8, config)
    _, targets = batch()
    queries = generator(targets)
    assert queries.group_size == 3 and queries.num_groups == 4 // 3 == 1
    assert queries.content.shape == (2, 6, 8) and queries.boxes.shape == (2, 6, 4)
    embed = generator.label_embed.weight.detach()
    for image, target in enumerate(targets):
        count = len(target["labels"])
        for half in (0, 1):  # positives, then negatives
            slots = slice(half * 3, half * 3 + count)
            torch.testing.assert_close(queries.boxes[image, slots], target["boxes"])
            torch.testing.assert_close(queries.content[image, slots].detach(), embed[target["labels"]])
        padding = [slot for slot in range(6) if slot % 3 >= count]
        assert queries.content[image, padding].abs().sum() == 0
    assert queries.positive_image.tolist() == [0, 0, 0, 1]
    assert queries.positive_query.tolist() == [0, 1, 2, 0]
    assert queries.positive_target.tolist() == [0, 1, 2, 0]


def test_denoising_noise_bounds_and_group_count():
    """Positive corners move by less than ``scale * half size``, negative ones by between one and two times
    that; DINO's group count is ``num_queries // most boxes``; labels flip at about ``ratio / 2``."""
    torch.manual_seed(0)
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4]]).repeat(4000, 1)
    negative = torch.arange(4000) >= 2000
    scale = 0.4
    moved = (box_cxcywh_to_xyxy(noised_boxes(boxes, negative, scale)) - box_cxcywh_to_xyxy(boxes)).abs()
    limit = scale * boxes[:, 2:].repeat(1, 2) / 2  # (M, 4): scale * (w/2, h/2, w/2, h/2)
    relative = moved / limit
    assert relative[~negative].max() < 1 + 1e-5
    assert relative[negative].min() > 1 - 1e-5 and relative[negative].max() < 2 + 1e-5
    assert num_groups(100, 7) == 14 and num_groups(100, 300) == 1 and num_groups(100, 0) == 1
    generator = ContrastiveDenoising(NUM_CLASSES, 8, DenoisingConfig(enabled=True, label_noise_ratio=0.5))
    labels = torch.zeros(20000, dtype=torch.long)
    queries = generator([{"labels": labels, "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]]).repeat(20000, 1)}])
    embed = generator.label_embed.weight.detach()
    changed = (queries.content[0, :20000].detach() - embed[0]).abs().amax(1) > 0
    # flipped with probability 0.25 to a uniform class, so changed with 0.25 * 4/5 = 0.2
    assert abs(changed.float().mean().item() - 0.2) < 0.02


def test_self_attention_mask_by_hand():
    """2 denoising groups of 2 queries, 2 matching and 1 one-to-many query (True: blocked)."""
    mask = self_attention_mask(4, 2, 2, 1, torch.device("cpu")).int()
    expected = torch.tensor(
        [
            # d0 d1 d2 d3 m0 m1 o0
            [0, 0, 1, 1, 0, 0, 1],  # group 0
            [0, 0, 1, 1, 0, 0, 1],
            [1, 1, 0, 0, 0, 0, 1],  # group 1
            [1, 1, 0, 0, 0, 0, 1],
            [1, 1, 1, 1, 0, 0, 1],  # matching
            [1, 1, 1, 1, 0, 0, 1],
            [1, 1, 1, 1, 1, 1, 0],  # one-to-many
        ]
    )
    assert torch.equal(mask, expected)
    assert self_attention_mask(0, 1, 5, 0, torch.device("cpu")) is None


def test_denoising_losses_and_a_batch_without_boxes(micro_options):
    """``loss_*_dn`` per layer; a batch without any box gives zero denoising losses and still a (zero)
    gradient to the label book, which DDP expects from every rank."""
    inputs, targets = batch()
    torch.manual_seed(0)
    config = variant_config(micro_options, denoising={"enabled": True})
    model, criterion = build_deformable_detr(config).train(), build_criterion(config, LossConfig())
    losses = criterion(model(inputs, targets), targets)
    for name in ("loss_ce_dn", "loss_bbox_dn", "loss_giou_dn", "loss_ce_dn_0", "loss_bbox_dn_0"):
        assert losses[name] > 0, name
    criterion.weighted_total(losses).backward()
    assert model.denoising.label_embed.weight.grad.abs().sum() > 0

    model.zero_grad(set_to_none=True)
    empty = no_boxes()
    losses = criterion(model(inputs, empty), empty)
    assert losses["loss_ce_dn"] == 0 and losses["loss_bbox_dn"] == 0
    criterion.weighted_total(losses).backward()
    assert model.denoising.label_embed.weight.grad is not None
    assert model.denoising.label_embed.weight.grad.abs().sum() == 0
    # evaluation: no denoising queries, no denoising losses, the matching losses weighted as usual
    model.eval()
    with torch.no_grad():
        outputs = model(inputs, targets)
    assert "dn_outputs" not in outputs
    assert math.isfinite(criterion.weighted_total(criterion(outputs, targets)).item())


def test_denoising_needs_two_stage(micro_options):
    with pytest.raises(ValueError, match="two_stage"):
        DeformableDETRConfig.from_dict(micro_options(denoising={"enabled": True}), num_classes=NUM_CLASSES)


# ---------------------------------------------------------------- hybrid matching


def test_one_to_many_targets_are_the_ground_truth_repeated_k_times():
    _, targets = batch()
    repeated = repeat_targets(targets, 3)
    assert repeated[0]["labels"].tolist() == [1, 3, 0] * 3
    assert repeated[1]["labels"].tolist() == [4, 4, 4]
    assert torch.equal(repeated[0]["boxes"], torch.cat([targets[0]["boxes"]] * 3))


@pytest.mark.parametrize("two_stage", [True, False])
def test_hybrid_branch_is_blind_and_training_only(micro_options, two_stage):
    """Training decodes the one-to-many queries beside the one-to-one ones without changing those (the
    mask), and matches them to the ground truth repeated k times; evaluation decodes the one-to-one only."""
    inputs, targets = batch()
    torch.manual_seed(0)
    switches = {"hybrid": {"enabled": True, "num_queries": 12, "k": 2, "loss_weight": 0.5}}
    config = variant_config(micro_options, **switches)
    if not two_stage:
        config = DeformableDETRConfig.from_dict(
            micro_options(
                backbone={"name": "resnet18", "norm": "frozen"}, dropout=0.0, with_box_refine=True, **switches
            ),
            num_classes=NUM_CLASSES,
        )
    model = build_deformable_detr(config)
    with torch.no_grad():
        training = model.train()(inputs)
        evaluation = model.eval()(inputs)
    assert training["one2many_outputs"]["pred_logits"].shape[1] == 12
    assert "one2many_outputs" not in evaluation
    torch.testing.assert_close(training["pred_logits"], evaluation["pred_logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(training["pred_boxes"], evaluation["pred_boxes"], rtol=1e-5, atol=1e-5)

    criterion = build_criterion(config, LossConfig())
    losses = criterion(training, targets)
    plain = build_criterion(DeformableDETRConfig.from_dict(config.to_dict(), hybrid={"enabled": False}), LossConfig())
    expected = plain(training["one2many_outputs"], repeat_targets(targets, 2))
    for name in ("loss_ce", "loss_bbox", "loss_giou", "loss_ce_0"):
        suffixed = name.replace("loss_ce_0", "loss_ce_one2many_0") if name.endswith("_0") else name + "_one2many"
        torch.testing.assert_close(losses[suffixed], expected[name])
    assert criterion.weight_dict["loss_ce_one2many"] == 0.5 * LossConfig().cls_loss_coef


# ---------------------------------------------------------------- IoU-aware class losses


def test_iou_aware_targets_by_hand():
    scores, ious = torch.tensor([0.8, 0.25]), torch.tensor([0.5, 0.9])
    assert iou_aware_targets("varifocal", scores, ious).tolist() == pytest.approx([0.5, 0.9])
    by_hand = [0.8**0.25 * 0.5**0.75, 0.25**0.25 * 0.9**0.75]
    assert iou_aware_targets("ia_bce", scores, ious, alpha=0.25).tolist() == pytest.approx(by_hand)


def test_iou_aware_class_terms_by_hand():
    """One query, two classes: class 0 positive (target q), class 1 negative."""
    logits = torch.tensor([[0.4, -1.0]])
    one_hot = torch.tensor([[1.0, 0.0]])
    q = 0.6
    soft = torch.tensor([[q, 0.0]])
    p0, p1 = 1 / (1 + math.exp(-0.4)), 1 / (1 + math.exp(1.0))

    def bce(p, t):
        return -(t * math.log(p) + (1 - t) * math.log(1 - p))

    varifocal = iou_aware_class_terms("varifocal", logits, one_hot, soft, alpha=0.75, gamma=2.0)
    assert varifocal.tolist()[0] == pytest.approx([q * bce(p0, q), 0.75 * p1**2 * bce(p1, 0)], rel=1e-5)
    ia_bce = iou_aware_class_terms("ia_bce", logits, one_hot, soft, alpha=0.25, gamma=2.0)
    assert ia_bce.tolist()[0] == pytest.approx([bce(p0, q), p1**2 * bce(p1, 0)], rel=1e-5)


@pytest.mark.parametrize("class_loss", ["varifocal", "ia_bce"])
def test_iou_aware_losses_train(micro_options, class_loss):
    """The loss is finite, differs from focal, and the matching (focal cost) is unchanged."""
    inputs, targets = batch()
    torch.manual_seed(0)
    config = variant_config(micro_options)
    model = build_deformable_detr(config).train()
    outputs = model(inputs)
    focal = build_criterion(config, LossConfig())(outputs, targets)
    aware = build_criterion(config, LossConfig(class_loss=class_loss))(outputs, targets)
    assert math.isfinite(aware["loss_ce"].item()) and aware["loss_ce"] != focal["loss_ce"]
    torch.testing.assert_close(aware["loss_bbox"], focal["loss_bbox"])  # same matches, same box losses
    with pytest.raises(ValueError, match="class_loss"):
        LossConfig(class_loss="softmax")


# ---------------------------------------------------------------- DDP: a rank whose batch has no box

DDP_SWITCHES = {
    "query_selection": "mixed",
    "look_forward_twice": True,
    "denoising": {"enabled": True},
    "hybrid": {"enabled": True, "num_queries": 12, "k": 2},
}


def _ddp_worker(rank: int, store_path: str, result_dir: str, options: dict) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)  # a forked child must not enter an OpenMP region the parent used (it hangs)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)  # the same initial weights on both ranks
        config = DeformableDETRConfig.from_dict(options)
        model = build_deformable_detr(config).train()
        criterion = build_criterion(config, LossConfig())
        ddp = DistributedDataParallel(model)  # find_unused_parameters=False: every parameter needs a gradient
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        inputs, targets = batch()
        # rank 0: one image with boxes and one without; rank 1: no box in its whole batch
        targets = [targets[0], no_boxes(1)[0]] if rank == 0 else no_boxes()
        torch.manual_seed(1 + rank)
        losses = []
        for _ in range(2):
            optimizer.zero_grad()
            total = criterion.weighted_total(criterion(ddp(inputs, targets), targets))
            total.backward()
            optimizer.step()
            losses.append(total.item())
        checksum = torch.stack([p.detach().double().sum() for p in model.parameters()])
        torch.save({"losses": losses, "checksum": checksum}, f"{result_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_rank_without_boxes_neither_crashes_nor_hangs(tmp_path, micro_options):
    """Denoising + hybrid on 2 gloo ranks, one of which has no box in its batch: both ranks finish two
    steps (DDP reduces every parameter's gradient, the label book's included) with the same weights."""
    options = variant_config(micro_options, **DDP_SWITCHES).to_dict()
    run_workers(_ddp_worker, (str(tmp_path / "store"), str(tmp_path), options), nprocs=2, timeout=240)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert all(math.isfinite(loss) for result in results for loss in result["losses"])
    torch.testing.assert_close(results[0]["checksum"], results[1]["checksum"])


# ---------------------------------------------------------------- export: the training-only parts are absent


def _onnx_graph(model, path) -> tuple[list[str], dict[str, tuple[int, ...]]]:
    """(the node op types in order, initializer name -> shape) of ``model`` exported as ONNX."""
    import onnx

    from ddetr.inference.export import ExportableDetector, example_inputs, export_onnx
    from ddetr.models.ms_deform_attn import set_attention_backend

    set_attention_backend(model, "pytorch")  # the op as exportable PyTorch
    inputs = example_inputs(1, 64, 80, with_mask=False)
    export_onnx(ExportableDetector(model.eval()), inputs, path, dynamic=False)  # static: a quicker export
    graph = onnx.load(str(path)).graph
    return [node.op_type for node in graph.node], {init.name: tuple(init.dims) for init in graph.initializer}


@pytest.mark.slow
def test_exported_graph_is_the_same_with_denoising_and_hybrid(tmp_path, micro_options):
    """Denoising and the hybrid branch never reach inference: the ONNX graph has the same nodes and weights
    with them as without, and neither the label book nor the one-to-many queries are in it."""
    graphs = {}
    for name, extra in (
        ("plain", {}),
        ("switches", {"denoising": {"enabled": True}, "hybrid": {"enabled": True, "num_queries": 12}}),
    ):
        torch.manual_seed(0)
        config = variant_config(micro_options, query_selection="mixed", look_forward_twice=True, **extra)
        graphs[name] = _onnx_graph(build_deformable_detr(config), tmp_path / f"{name}.onnx")
    assert graphs["switches"][0] == graphs["plain"][0]
    assert graphs["switches"][1] == graphs["plain"][1]
    assert not any("label_embed" in name or "one2many" in name for name in graphs["switches"][1])


# ---------------------------------------------------------------- experiment=hybrid end to end


@pytest.mark.slow
def test_hybrid_debug_run_trains_evaluates_predicts_and_exports(tmp_path, debug_overrides):
    """experiment=hybrid at debug size: trains with the one-to-many losses logged, evaluates the checkpoint
    to the same AP, predicts, and exports ONNX with dynamic sizes that onnxruntime runs at another size."""
    import onnxruntime

    from ddetr.app import compose
    from ddetr.checkpoints import load_module
    from ddetr.inference.export import ExportableDetector, example_inputs, export
    from ddetr.inference.predict import predict
    from ddetr.models.ms_deform_attn import set_attention_backend
    from ddetr.training.run import train

    data_root, run = tmp_path / "synthetic", tmp_path / "run"
    tiny = ["data=synthetic", "trainer=default", "model.hybrid.num_queries=12", "model.num_select=20"]
    cfg = compose(["experiment=hybrid", *debug_overrides(run, data_root), *tiny])
    assert cfg.model.hybrid.enabled and cfg.model.query_selection == "mixed" and cfg.model.hidden_dim == 32
    metrics = train(cfg)
    assert 0.0 <= metrics["val/AP"] <= 1.0
    columns = (run / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "train/loss_ce_one2many" in columns
    checkpoint = run / "checkpoints" / "last.ckpt"
    summary = predict(
        compose(
            [
                f"ckpt_path={checkpoint}",
                f"input={data_root / 'val'}",
                f"output={tmp_path / 'predict'}",
                "device=cpu",
                "progress_bar=false",
                f"paths.log_dir={tmp_path / 'predict' / 'logs'}",
            ],
            config_name="predict",
        )
    )
    assert summary["num_images"] == 6 and not summary["skipped"]
    onnx_path = tmp_path / "hybrid.onnx"
    export(
        compose(
            [f"ckpt_path={checkpoint}", f"output={onnx_path}", f"paths.log_dir={tmp_path}/logs"], config_name="export"
        )
    )
    module = load_module(checkpoint)
    set_attention_backend(module.model, "pytorch")
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    inputs = example_inputs(1, 80, 112, with_mask=False)
    (images,) = inputs
    feed = {session.get_inputs()[0].name: images.numpy()}
    if len(session.get_inputs()) == 2:
        feed[session.get_inputs()[1].name] = torch.zeros(1, 80, 112, dtype=torch.bool).numpy()
    logits, boxes = session.run(["pred_logits", "pred_boxes"], feed)
    with torch.no_grad():
        expected = ExportableDetector(module.model)(images)
    assert logits.shape == (1, cfg.model.num_queries, expected[0].shape[-1])
    torch.testing.assert_close(torch.from_numpy(boxes), expected[1], rtol=1e-4, atol=1e-4)

"""torch.compile: the detector traces as one graph (no graph break, the attention op inside) with
dynamic image sizes, and gives the eager outputs; ``compile=True`` in the module uses it."""

from __future__ import annotations

import pytest
import torch

from ddetr.models.build import build_criterion, build_deformable_detr
from ddetr.models.config import DeformableDETRConfig


@pytest.fixture(scope="module")
def tiny(micro_options):
    """``tiny(two_stage) -> DeformableDETRConfig``: the tiny model with frozen batch norm, no dropout,
    3 classes; with two-stage also box refinement."""

    def config(two_stage: bool) -> DeformableDETRConfig:
        options = micro_options(
            backbone={"name": "resnet18"}, dropout=0.0, with_box_refine=two_stage, two_stage=two_stage
        )
        return DeformableDETRConfig.from_dict(num_classes=3, **options)

    return config


def batch(height: int, width: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, height, width, generator=generator)
    mask = torch.zeros(2, height, width, dtype=torch.bool)
    mask[1, height // 2 :, :] = True
    return images, mask


@pytest.mark.parametrize("two_stage", [False, True], ids=["multi_scale", "two_stage"])
def test_detector_has_no_graph_break(two_stage, tiny):
    model = build_deformable_detr(tiny(two_stage)).eval()
    explanation = torch._dynamo.explain(model)(batch(64, 80, 0))
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]


class CountingBackend:
    """A ``torch.compile`` backend that runs the captured graph as it is and counts the compilations."""

    def __init__(self) -> None:
        self.compilations = 0

    def __call__(self, graph_module, example_inputs):
        self.compilations += 1
        return graph_module.forward


@pytest.mark.slow
def test_three_image_sizes_compile_once_without_host_tensors(tiny):
    """fullgraph + dynamic: the level shapes reach the op as SymInts (no shape tensor read on the host),
    so new image sizes reuse the graph: three sizes, at most one recompile, the eager outputs."""
    torch.manual_seed(0)
    model = build_deformable_detr(tiny(True)).eval()
    torch._dynamo.reset()
    backend = CountingBackend()
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=backend)
    # every level at least 2x2 (a size-1 level would be specialised, as torch.compile does for any 1)
    for size, seed in (((128, 160), 1), ((160, 192), 2), ((192, 256), 3)):
        inputs = batch(*size, seed)
        with torch.no_grad():
            expected, actual = model(inputs), compiled(inputs)
        torch.testing.assert_close(actual["pred_boxes"], expected["pred_boxes"])
        torch.testing.assert_close(actual["enc_outputs"]["pred_logits"], expected["enc_outputs"]["pred_logits"])
    assert backend.compilations <= 2, f"{backend.compilations} compilations for three image sizes"


def _matched(num_layers: int, batch_size: int, num_queries: int, per_image: int, seed: int):
    """A random matching of ``per_image`` queries to as many targets in every image and layer."""
    from ddetr.models.criterion import Matched

    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_layers, batch_size, num_queries, 3, generator=generator)
    boxes = torch.rand(num_layers, batch_size, num_queries, 4, generator=generator) * 0.5 + 0.25
    num_matched = num_layers * batch_size * per_image
    query = torch.cat(
        [torch.randperm(num_queries, generator=generator)[:per_image] for _ in range(num_layers * batch_size)]
    )
    return Matched(
        logits=logits.requires_grad_(),
        boxes=boxes.requires_grad_(),
        layer=torch.arange(num_layers).repeat_interleave(batch_size * per_image),
        image=torch.arange(batch_size).repeat_interleave(per_image).repeat(num_layers),
        query=query,
        labels=torch.randint(0, 3, (num_matched,), generator=generator),
        target_boxes=torch.rand(num_matched, 4, generator=generator) * 0.5 + 0.25,
        num_targets=torch.full((batch_size,), float(per_image)),
        last_layer=slice(num_matched - batch_size * per_image, None),
    )


def test_loss_compiles_as_one_graph_for_new_sizes(tiny):
    """The losses after the matching (focal, L1, GIoU, class and cardinality errors) compile fullgraph
    with dynamic sizes: no graph break, one recompile at most over three batch/query/match counts, and
    the eager values and gradients."""
    criterion = build_criterion(tiny(True))

    def losses(matched, num_boxes):
        terms = {}
        for loss in criterion.losses:
            terms.update(criterion.loss_table[loss](matched, num_boxes))
        return terms

    explanation = torch._dynamo.explain(losses)(_matched(3, 2, 10, 3, 0), torch.tensor(6.0))
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    torch._dynamo.reset()
    backend = CountingBackend()
    compiled = torch.compile(losses, fullgraph=True, dynamic=True, backend=backend)
    for sizes in ((3, 2, 10, 3, 1), (3, 3, 12, 4, 2), (3, 4, 17, 5, 3)):
        matched = _matched(*sizes)
        results = []
        for function in (losses, compiled):
            terms = function(matched, torch.tensor(7.0))
            total = terms["loss_ce"].sum() + terms["loss_bbox"].sum() + terms["loss_giou"].sum()
            results.append((terms, torch.autograd.grad(total, (matched.logits, matched.boxes))))
        (expected, expected_grads), (actual, actual_grads) = results
        for name in expected:
            torch.testing.assert_close(actual[name], expected[name])
        for grad, expected_grad in zip(actual_grads, expected_grads):
            torch.testing.assert_close(grad, expected_grad)
    assert backend.compilations <= 2, f"{backend.compilations} compilations for three sizes"


@pytest.mark.slow
def test_fullgraph_dynamic_compile_matches_eager_forward_and_backward(tiny):
    torch.manual_seed(0)
    config = tiny(True)
    model = build_deformable_detr(config)
    criterion = build_criterion(config)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="aot_eager")
    targets = [
        {"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.6, 0.1, 0.1]])}
    ] * 2
    for size, seed in (((64, 80), 1), ((80, 96), 2)):  # a second size must not need a new graph
        inputs = batch(*size, seed)
        losses = []
        for detector in (model, compiled):
            model.zero_grad()
            loss = criterion.weighted_total(criterion(detector(inputs), targets))
            loss.backward()
            losses.append((loss.detach(), model.transformer.level_embed.grad.clone()))
        torch.testing.assert_close(losses[1][0], losses[0][0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(losses[1][1], losses[0][1], rtol=1e-4, atol=1e-5)


def test_module_compile_option_keeps_state_dict_names(tiny):
    from ddetr.training.module import DeformableDETRModule

    module = DeformableDETRModule(config=tiny(False), compile=True)
    assert module.detector is not module.model
    assert all(not name.startswith("detector") and "_orig_mod" not in name for name in module.state_dict())
    assert "compile" not in module.hparams

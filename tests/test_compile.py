"""torch.compile: the detector traces as one graph (no graph break, the attention op inside) with
dynamic image sizes, and gives the eager outputs; ``compile=True`` in the module uses it."""

from __future__ import annotations

import pytest
import torch
from _batches import random_targets

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


def assert_same_losses_and_gradients(expected_losses, actual_losses, matched, *args) -> None:
    """``actual_losses(matched, *args)`` gives ``expected_losses``' loss terms and their gradients with
    respect to the matched logits and boxes, to float32 rounding."""
    results = []
    for function in (expected_losses, actual_losses):
        terms = function(matched, *args)
        total = terms["loss_ce"].sum() + terms["loss_bbox"].sum() + terms["loss_giou"].sum()
        results.append((terms, torch.autograd.grad(total, (matched.logits, matched.boxes))))
    (expected, expected_grads), (actual, actual_grads) = results
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name])
    for grad, expected_grad in zip(actual_grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad)


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
        assert_same_losses_and_gradients(losses, compiled, _matched(*sizes), torch.tensor(7.0))
    assert backend.compilations <= 2, f"{backend.compilations} compilations for three sizes"


@pytest.mark.slow
def test_reduce_overhead_losses_with_inductor_match_eager(tiny):
    """The losses after the matching as ``model.compile=reduce-overhead`` compiles them, with inductor
    itself (on the CPU: no CUDA graphs; about 30 s of compiling): the eager values and gradients over
    two match counts, no recompile for the second."""
    from ddetr.training.compilation import compile_options

    eager, criterion = build_criterion(tiny(False)), build_criterion(tiny(False))
    torch._dynamo.reset()
    criterion.compile_losses(**compile_options("reduce-overhead"))
    with torch._dynamo.config.patch(error_on_recompile=True):
        for sizes in ((3, 2, 10, 3, 1), (3, 2, 10, 4, 2)):
            assert_same_losses_and_gradients(
                eager.matched_losses, criterion._compiled_losses, _matched(*sizes), torch.tensor(6.0), True
            )


class RecordingCompile:
    """``torch.compile`` as the module calls it, recorded (the compiled function's name and the options),
    then run with ``aot_eager`` and ``fullgraph=True`` instead of inductor: the same graphs as inductor
    gets (forward and backward), run by eager kernels, and an error on any graph break. aot_eager takes
    no ``mode``, so ``mode`` is recorded and dropped. ``runs`` counts the runs of compiled graphs."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.runs = 0
        self.real = torch.compile

    def __call__(self, function, **options):
        self.calls.append((function.__name__, dict(options)))
        options.pop("mode", None)
        return self.real(function, backend=self.backend, fullgraph=True, **options)

    def backend(self, graph_module, example_inputs):
        from torch._dynamo.backends.registry import lookup_backend

        compiled = lookup_backend("aot_eager")(graph_module, example_inputs)

        def run(*args):
            self.runs += 1
            return compiled(*args)

        return run


def training_batches() -> list:
    """Three batches of two 64x128 images (one size: one graph; a size bucket of ``shape_buckets``, so
    ``reduce-overhead`` runs them unpadded, as eager does) with 2 and 3 targets."""
    generator = torch.Generator().manual_seed(0)
    result = []
    for seed in (1, 2, 3):
        images, mask = batch(64, 128, seed)
        targets = random_targets(generator, (2, 3))
        result.append((images, mask, targets))
    return result


def fit_losses(module) -> tuple[list[float], torch.Tensor]:
    """The training loss of three steps of ``module`` (fused AdamW: the deferred finiteness check) and
    the level embedding after them."""
    import lightning as L

    losses = []

    class Recorder(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            losses.append(float(outputs["loss"]))

    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Recorder()],
    )
    loader = torch.utils.data.DataLoader(training_batches(), batch_size=None, shuffle=False)
    trainer.fit(module, train_dataloaders=loader)
    return losses, module.model.transformer.level_embed.detach().clone()


@pytest.mark.slow
def test_reduce_overhead_trains_as_eager(tiny, monkeypatch):
    """``compile="reduce-overhead"``: the detector's forward and the losses after the matching reach
    ``torch.compile`` with ``mode="reduce-overhead"`` (and dynamic shapes), each as one graph in training
    mode, and three Lightning training steps give the eager losses and weights within float32 rounding.
    Compiled with aot_eager (see ``RecordingCompile``): inductor's kernels are not part of this test
    (compiling the detector takes minutes on a 2-core CPU even without them). Multi-scale only: the
    two-stage graphs differ in size, not in what reaches the compiler (``test_detector_has_no_graph_break``)."""
    from ddetr.training.module import DeformableDETRModule

    options = {"config": tiny(False), "optim": {"fused": True, "lr": 1e-3, "lr_backbone": 1e-3}}
    torch.manual_seed(0)
    eager = DeformableDETRModule(**options)
    torch._dynamo.reset()
    recording = RecordingCompile()
    monkeypatch.setattr(torch, "compile", recording)
    compiled = DeformableDETRModule(**options, compile="reduce-overhead")
    compiled.load_state_dict(eager.state_dict())  # an eager module's weights (a checkpoint) load as they are
    expected = {"dynamic": True, "mode": "reduce-overhead"}
    assert recording.calls == [("matched_losses", expected), ("forward", expected)]
    (eager_losses, eager_weights), (losses, weights) = fit_losses(eager), fit_losses(compiled)
    assert len(losses) == len(eager_losses) == 3
    assert recording.runs == 6, f"{recording.runs} runs of compiled graphs: the forward and the losses of 3 steps"
    # the same operations, in another order in places (aot_eager's decompositions): float32 rounding
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager_losses), rtol=1e-5, atol=0.0)
    torch.testing.assert_close(weights, eager_weights, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("setting", [True, "reduce-overhead"])
def test_module_compile_option_keeps_state_dict_names(setting, tiny):
    from ddetr.training.module import DeformableDETRModule

    eager = DeformableDETRModule(config=tiny(False))
    module = DeformableDETRModule(config=tiny(False), compile=setting)
    assert module.detector is not module.model and not isinstance(module.detector, torch.nn.Module)
    assert list(module.state_dict()) == list(eager.state_dict())  # no _orig_mod, no second copy
    assert all("_orig_mod" not in name for name in module.state_dict())
    assert [name for name, _ in module.named_modules()] == [name for name, _ in eager.named_modules()]
    assert "compile" not in module.hparams
    assert (module.criterion._compiled_losses is not None) == (setting == "reduce-overhead")


def test_unknown_compile_setting_is_one_line_naming_the_allowed_ones(tmp_path, debug_overrides):
    from ddetr.app import compose
    from ddetr.training.module import DeformableDETRModule
    from ddetr.training.run import RunConfigError, build_module

    message = "model.compile must be false, true or 'reduce-overhead', got 'max-autotune'"
    with pytest.raises(ValueError) as raised:
        DeformableDETRModule(num_classes=3, compile="max-autotune")
    assert str(raised.value) == message
    overrides = debug_overrides(tmp_path, tmp_path)
    assert compose([*overrides, "model.compile=reduce-overhead"]).model.compile == "reduce-overhead"
    with pytest.raises(RunConfigError) as raised:  # the CLI prints it as one line, without a traceback
        build_module(compose([*overrides, "model.compile=max-autotune"]), datamodule=None)
    assert str(raised.value) == message

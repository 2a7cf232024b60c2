"""Benchmarks: ``python -m ddetr.bench parts`` times the parts of a CPU train step, against a baseline.

Two setups:

- ``r50`` (default): the R50 multi-scale detector of ``python -m ddetr.bench model`` (6 + 6 layers,
  300 queries, 91 classes, dropout 0.1) on two images (``--images``, default 384x384 and 384x352)
  with 8 random targets each, foreach AdamW (``--optimizer``); model options set by ``key=value`` arguments (e.g.
  ``backbone.channels_last=true``; a baseline that lacks an option runs without it);
- ``small``: the default run's model (``conf/model/small.yaml``, composed with Hydra like
  ``python -m ddetr.train``) on one real batch of the synthetic data (batch 8), fused AdamW and
  gradient clipping at norm 0.1 as in the run.

Parts, each timed on its own (forward and backward where there is a graph):

- ``backbone``: the ResNet and the level masks (nearest interpolation of the image mask);
- ``transformer``: input projections, position encoding, encoder, decoder and heads, from the
  backbone features (detached);
- ``position encoding``: the sine encoding of every level mask (forward only, it has no gradient);
- ``criterion``: matcher and losses from the model outputs (detached), forward and backward;
- ``matcher``: the matcher alone (costs, the host copy, scipy);
- ``optimizer``: gradient clipping (``small``) and the AdamW step;
- ``data`` (``small``): one batch of the train data loader in the main process (in the run it is
  made in a worker process alongside the step);
- ``loss+backward``: forward, criterion and backward of the whole model (the step without clipping
  and AdamW);
- ``step``: the whole train step (forward, criterion, backward, clipping, AdamW).

With ``--baseline REV`` the same parts also run with the ``ddetr`` package of git revision ``REV``
(extracted to a temporary directory and imported as ``ddetr_baseline``; the attention op is shared,
``ddetr.ops``), built with the same weights on the same inputs: each repetition times the baseline
and the current code one after the other (alternating which goes first), and the table gives the
medians, their ratio (new / baseline; < 1 is faster), and the median and quartiles of the ratio within
each repetition (the two runs back to back, so that a machine whose speed drifts between repetitions
slows both alike). Before timing it checks that both give the same losses and gradients
(``max |diff|`` printed; dropout off for this check). A baseline that builds another architecture (it lacks an option that changes the parameters, such as
``model.backbone.max_stride=16``) keeps its own random weights and is timed without that check.

Threads: ``--threads`` (default 1: on a machine shared with other jobs, more threads than free cores
make timings meaningless).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import torch

from ddetr.benchmarks.table import text_table
from ddetr.models.config import DeformableDETRConfig

PARTS = (
    "backbone",
    "transformer",
    "position encoding",
    "criterion",
    "matcher",
    "optimizer",
    "data",
    "loss+backward",
    "step",
)


def baseline_package(revision: str, repo: Path | None = None) -> str:
    """Extracts ``src/ddetr`` of git ``revision`` into a temporary directory as package ``ddetr_baseline``
    (its own ``ddetr.*`` imports rewritten to ``ddetr_baseline.*``, except the attention op ``ddetr.ops``,
    which stays shared: a second registration of the op would fail), puts it on ``sys.path`` and returns
    the package name."""
    repo = repo or Path(__file__).resolve().parents[3]
    archive = subprocess.run(
        ["git", "-C", str(repo), "archive", "--format=tar", revision, "src/ddetr"], check=True, capture_output=True
    ).stdout
    root = Path(tempfile.mkdtemp(prefix="ddetr_baseline_"))
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(root, filter="data")
    package = root / "ddetr_baseline"
    (root / "src" / "ddetr").rename(package)
    pattern = re.compile(r"\bddetr(?=[.\s])(?!\.ops\b)")
    for path in package.rglob("*.py"):
        text = path.read_text()
        lines = [
            pattern.sub("ddetr_baseline", line) if re.match(r"\s*(from|import)\s", line) else line
            for line in text.splitlines(keepends=True)
        ]
        path.write_text("".join(lines))
    sys.path.insert(0, str(root))
    importlib.invalidate_caches()
    return "ddetr_baseline"


@dataclasses.dataclass
class Case:
    """One implementation under test: its model, criterion, optimizer and the step's inputs."""

    name: str
    model: torch.nn.Module
    criterion: torch.nn.Module
    optimizer: torch.optim.Optimizer
    images: torch.Tensor
    mask: torch.Tensor
    targets: list[dict[str, torch.Tensor]]
    clip: float | None = None
    next_batch: Callable[[], object] | None = None
    same_weights: bool = True  # the reference's weights were copied (False: another architecture)


@dataclasses.dataclass
class Inputs:
    """What both implementations share: the architecture and loss (plain dicts), the batch, the
    optimizer settings, and (``small``) the data loader."""

    config: dict
    loss: dict
    images: torch.Tensor
    mask: torch.Tensor
    targets: list[dict[str, torch.Tensor]]
    fused: bool
    clip: float | None
    next_batch: Callable[[], object] | None = None


def setup_inputs(setup: str, args: argparse.Namespace) -> Inputs:
    """The ``r50`` or ``small`` setup (module docstring)."""
    if setup == "r50":
        from ddetr.benchmarks.model import Setup, ddetr_config, make_inputs, with_images

        bench_setup = with_images(Setup(), args.images)
        images, mask, targets = make_inputs(bench_setup, torch.device("cpu"))
        config = _overridden(ddetr_config(bench_setup, "multi_scale").to_dict(), args.overrides)
        return Inputs(config, {}, images, mask, targets, args.optimizer == "fused", None)
    from hydra.utils import instantiate

    from ddetr.app import compose
    from ddetr.training.run import build_module

    cfg = compose(args.overrides)
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.prepare_data()
    datamodule.setup("fit")
    loader = iter(datamodule.train_dataloader())
    images, mask, targets = datamodule.on_after_batch_transfer(datamodule.on_before_batch_transfer(next(loader), 0), 0)
    module = build_module(cfg, datamodule)
    fused = module.optim_cfg.fused if args.optimizer == "config" else args.optimizer == "fused"
    clip = float(cfg.trainer.get("gradient_clip_val") or 0) or None
    loss = dataclasses.asdict(module.loss_cfg)
    state = {"loader": loader}

    def next_batch():
        try:
            return next(state["loader"])
        except StopIteration:  # a new epoch
            state["loader"] = iter(datamodule.train_dataloader())
            return next(state["loader"])

    return Inputs(module.config.to_dict(), loss, images, mask, targets, fused, clip, next_batch)


def _overridden(config: dict, overrides: list[str]) -> dict:
    """``config`` (``DeformableDETRConfig.to_dict()``) with dotted ``key=value`` overrides, values
    read as YAML (``backbone.channels_last=true dropout=0``); an unknown key is a ``KeyError``."""
    import yaml

    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep:
            raise ValueError(f"r50 overrides are key=value, got {override!r}")
        *groups, name = key.split(".")
        node = config
        for group in groups:
            node = node[group]
        if name not in node:
            raise KeyError(f"no model option {key!r}; options: {sorted(node)}")
        node[name] = yaml.safe_load(text)
    return config


def build_case(name: str, package: str, inputs: Inputs, reference: Case | None) -> Case:
    """A ``Case`` of ``package`` (``ddetr`` or the baseline); weights copied from ``reference``."""
    build = importlib.import_module(f"{package}.models.build")
    config_module = importlib.import_module(f"{package}.models.config")
    config = config_module.DeformableDETRConfig.from_dict(_known_options(config_module, inputs.config))
    known_loss = {f.name for f in dataclasses.fields(config_module.LossConfig)}
    loss = config_module.LossConfig.from_dict({k: v for k, v in inputs.loss.items() if k in known_loss})
    torch.manual_seed(0)
    model = build.build_deformable_detr(config)
    same_weights = reference is not None and _same_shapes(model, reference.model)
    if same_weights:
        model.load_state_dict(reference.model.state_dict())
    criterion = build.build_criterion(config, loss)
    params = [p for p in model.parameters() if p.requires_grad]
    options = {"fused": True} if inputs.fused else {"foreach": True}
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4, **options)
    return Case(
        name,
        model,
        criterion,
        optimizer,
        inputs.images,
        inputs.mask,
        inputs.targets,
        inputs.clip,
        inputs.next_batch,
        same_weights,
    )


def _detect(model: torch.nn.Module, images: torch.Tensor, mask: torch.Tensor, targets: list) -> dict:
    """The model's outputs; a model with denoising also gets the targets (its training queries come from them)."""
    if getattr(model, "denoising", None) is not None:
        return model((images, mask), targets)
    return model((images, mask))


def _same_shapes(model: torch.nn.Module, reference: torch.nn.Module) -> bool:
    """Whether both state dicts have the same names and shapes (a baseline without an option that
    changes the architecture, e.g. ``model.backbone.max_stride``, does not)."""
    ours, theirs = model.state_dict(), reference.state_dict()
    return ours.keys() == theirs.keys() and all(ours[k].shape == theirs[k].shape for k in ours)


def _known_options(config_module, config: dict) -> dict:
    """``config`` without the options that ``config_module`` (a baseline's) does not know yet; each is
    named on stderr (the baseline runs without it, as it ran at its revision)."""
    defaults = DeformableDETRConfig().to_dict()
    known = {f.name for f in dataclasses.fields(config_module.DeformableDETRConfig)}
    known_backbone = {f.name for f in dataclasses.fields(config_module.BackboneConfig)}
    kept = {key: value for key, value in config.items() if key in known}
    kept["backbone"] = {key: value for key, value in config["backbone"].items() if key in known_backbone}
    dropped = {key: (config[key], defaults[key]) for key in set(config) - known}
    dropped |= {
        f"backbone.{key}": (config["backbone"][key], defaults["backbone"][key])
        for key in set(config["backbone"]) - known_backbone
    }
    for key, (value, default) in sorted(dropped.items()):
        print(f"the baseline has no option {key} (here {value!r}, default {default!r})", file=sys.stderr)
    return kept


def _seeded(function: Callable[[], object]) -> Callable[[], object]:
    def run():
        torch.manual_seed(1)
        return function()

    return run


def part_closures(case: Case) -> dict[str, Callable[[], object]]:
    """The timed closures of every part of ``case``; they leave the model's weights unchanged except
    ``optimizer`` and ``step``, which update them (so both implementations drift alike)."""
    model, criterion = case.model, case.criterion
    images, mask, targets = case.images, case.mask, case.targets
    model.train()
    with torch.no_grad():
        features = model.backbone(images, mask)
        outputs = model((images, mask))
    detached_features = [(f.detach().requires_grad_(), m) for f, m in features]
    generator = torch.Generator().manual_seed(0)
    feature_grads = [torch.randn(f.shape, generator=generator) for f, _ in features]
    detached_outputs = _detach_outputs(outputs)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def backbone():
        levels = model.backbone(images, mask)
        torch.autograd.backward([f for f, _ in levels], feature_grads)
        model.zero_grad(set_to_none=True)

    def transformer():
        out = _transformer_forward(model, detached_features, mask)
        criterion.weighted_total(criterion(out, targets)).backward()
        model.zero_grad(set_to_none=True)

    def position_encoding():
        with torch.no_grad():
            return [model.position_encoding(m) for _, m in features]

    def criterion_part():
        total = criterion.weighted_total(criterion(detached_outputs, targets))
        total.backward()

    def matcher():
        padded = importlib.import_module(type(criterion.matcher).__module__).pad_targets(targets, images.device)
        layers = [*detached_outputs.get("aux_outputs", []), detached_outputs]
        logits = torch.stack([o["pred_logits"] for o in layers])  # (num_layers, B, Q, C)
        boxes = torch.stack([o["pred_boxes"] for o in layers])  # (num_layers, B, Q, 4)
        stacks = [(logits, boxes, padded)]
        if "enc_outputs" in detached_outputs:
            enc = detached_outputs["enc_outputs"]
            stacks.append((enc["pred_logits"][None], enc["pred_boxes"][None], padded.class_agnostic()))
        return criterion.matcher.match(stacks)

    # gradients for the optimizer part: one real backward
    criterion.weighted_total(criterion(_detect(model, images, mask, targets), targets)).backward()
    grads = [p.grad.clone() for p in trainable]

    def optimizer():
        for p, g in zip(trainable, grads, strict=True):
            p.grad = g.clone()
        if case.clip:
            torch.nn.utils.clip_grad_norm_(trainable, case.clip)
        case.optimizer.step()

    def loss_backward():
        criterion.weighted_total(criterion(_detect(model, images, mask, targets), targets)).backward()
        model.zero_grad(set_to_none=True)

    def step():
        total = criterion.weighted_total(criterion(_detect(model, images, mask, targets), targets))
        case.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if case.clip:
            torch.nn.utils.clip_grad_norm_(trainable, case.clip)
        case.optimizer.step()

    model.zero_grad(set_to_none=True)
    parts = {
        "backbone": backbone,
        "transformer": transformer,
        "position encoding": position_encoding,
        "criterion": criterion_part,
        "matcher": matcher,
        "optimizer": optimizer,
        "loss+backward": loss_backward,
        "step": step,
    }
    if case.next_batch is not None:
        parts["data"] = case.next_batch
    return {name: _seeded(parts[name]) for name in PARTS if name in parts}


def _detach_outputs(outputs):
    if isinstance(outputs, torch.Tensor):
        return outputs.detach().requires_grad_()
    if isinstance(outputs, dict):
        return {k: _detach_outputs(v) for k, v in outputs.items()}
    if isinstance(outputs, list):
        return [_detach_outputs(v) for v in outputs]
    return outputs


def _transformer_forward(model, features, mask):
    """The detector's forward from given backbone levels (everything after the backbone)."""
    backbone_forward = model.backbone.forward
    model.backbone.forward = lambda images, mask: features
    try:
        return model((torch.empty(mask.shape[0], 3, *mask.shape[1:]), mask))
    finally:
        model.backbone.forward = backbone_forward


def check_same(new: Case, base: Case) -> dict[str, float]:
    """Max |difference| of the losses and of the gradients of one step of ``new`` and ``base``, dropout off."""
    results = []
    for case in (new, base):
        dropout = {m: m.p for m in case.model.modules() if hasattr(m, "p") and isinstance(m, torch.nn.Dropout)}
        case.model.train()
        for module in dropout:
            module.p = 0.0
        layers = [m for m in case.model.modules() if hasattr(m, "dropout") and isinstance(m.dropout, float)]
        saved = [m.dropout for m in layers]
        for m in layers:
            m.dropout = 0.0
        case.model.zero_grad(set_to_none=True)
        losses = case.criterion(_detect(case.model, case.images, case.mask, case.targets), case.targets)
        case.criterion.weighted_total(losses).backward()
        grads = {n: p.grad.clone() for n, p in case.model.named_parameters() if p.grad is not None}
        case.model.zero_grad(set_to_none=True)
        for module, p in dropout.items():
            module.p = p
        for m, d in zip(layers, saved):
            m.dropout = d
        results.append((losses, grads))
    (new_losses, new_grads), (base_losses, base_grads) = results
    loss_diff = max(float((new_losses[k] - base_losses[k]).detach().abs()) for k in base_losses)
    grad_diff = max(float((new_grads[k] - base_grads[k]).abs().max()) for k in base_grads)
    grad_scale = max(float(g.abs().max()) for g in base_grads.values())
    if new_losses.keys() != base_losses.keys() or new_grads.keys() != base_grads.keys():
        raise AssertionError("the two implementations return different loss or gradient names")
    return {"losses": loss_diff, "gradients": grad_diff, "largest gradient": grad_scale}


@dataclasses.dataclass
class Timings:
    """``medians``: part -> case name -> median ms. ``pair_ratios`` (two cases): part -> the second case's
    time over the first's in every repetition, the two run back to back (so a machine that drifts
    between repetitions changes both alike)."""

    medians: dict[str, dict[str, float]]
    pair_ratios: dict[str, list[float]]


def time_parts(cases: list[Case], warmup: int, repeat: int, parts: list[str]) -> Timings:
    """Times every part per case; each repetition runs the cases one after the other, alternating which
    goes first."""
    closures = [part_closures(case) for case in cases]
    timings = Timings({}, {})
    for part in parts:
        timed = [(case, c[part]) for case, c in zip(cases, closures, strict=True) if part in c]
        if not timed:
            continue
        for _, run in timed:
            for _ in range(warmup):
                run()
        times: list[list[float]] = [[] for _ in timed]
        for index in range(repeat):
            order = range(len(timed)) if index % 2 == 0 else reversed(range(len(timed)))
            for case_index in order:
                begin = time.perf_counter()
                timed[case_index][1]()
                times[case_index].append((time.perf_counter() - begin) * 1e3)
        timings.medians[part] = {case.name: statistics.median(t) for (case, _), t in zip(timed, times, strict=True)}
        if len(timed) == 2:
            timings.pair_ratios[part] = [new / base for base, new in zip(*times, strict=True)]
        line = ", ".join(f"{k} {v:.1f} ms" for k, v in timings.medians[part].items())
        print(f"  {part}: {line}", file=sys.stderr, flush=True)
    return timings


def ratio_spread(ratios: list[float]) -> str:
    """``median (quartiles low-high)`` of per-repetition ratios, e.g. ``0.73 (0.71-0.76)``."""
    if len(ratios) < 2:
        return f"{ratios[0]:.2f}" if ratios else "-"
    low, median, high = statistics.quantiles(ratios, n=4, method="inclusive")
    return f"{median:.2f} ({low:.2f}-{high:.2f})"


def format_table(timings: Timings, names: list[str]) -> str:
    """The medians of every part and case, each case's share of its step; with two cases their ratio of
    medians and the median (quartiles) of the per-repetition ratios."""
    medians = timings.medians
    step = medians.get("step", {})
    header = ["part", *(f"{n} ms" for n in names), *(f"{n} share" for n in names[:1])]
    if len(names) == 2:
        header += [f"{names[1]} share", f"{names[1]} / {names[0]}", "per repetition (quartiles)"]
    rows = []
    for part, values in medians.items():
        row = [part, *(f"{values[n]:.1f}" if n in values else "-" for n in names)]
        row += [f"{100 * values[n] / step[n]:.0f}%" if n in step and n in values else "-" for n in names]
        if len(names) == 2:
            row.append(f"{values[names[1]] / values[names[0]]:.2f}" if len(values) == 2 else "-")
            row.append(ratio_spread(timings.pair_ratios.get(part, [])))
        rows.append(row)
    return text_table(header, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ddetr.bench parts", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--setup", choices=("r50", "small"), default="r50")
    parser.add_argument("--images", default="384x384,384x352", help="r50: comma list of HxW")
    parser.add_argument("--baseline", default=None, help="git revision to compare with, in the same process")
    parser.add_argument(
        "--optimizer",
        choices=("foreach", "fused", "config"),
        default=None,
        help="AdamW implementation (default: r50 foreach, small as configured)",
    )
    parser.add_argument("--parts", default=",".join(PARTS), help="comma list of " + ", ".join(PARTS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "overrides",
        nargs="*",
        help="small: Hydra overrides of the train config; r50: model options, e.g. backbone.channels_last=true",
    )
    args = parser.parse_args(argv)
    if args.optimizer is None:
        args.optimizer = "foreach" if args.setup == "r50" else "config"
    if args.setup == "small":
        out = tempfile.mkdtemp(prefix="ddetr_parts_")
        args.overrides = [f"paths.output_dir={out}", "data.num_workers=0", *args.overrides]
    torch.set_num_threads(args.threads)
    from ddetr.ops import compiled_op_available

    op = "compiled kernel" if compiled_op_available("cpu") else "PyTorch fallback"
    print(
        f"ddetr bench parts: {args.setup}, {args.threads} thread(s), attention op: {op}, "
        f"median of {args.repeat} after {args.warmup} warm-up; optimizer {args.optimizer}"
    )
    inputs = setup_inputs(args.setup, args)
    new = build_case("new", "ddetr", inputs, None)
    cases = [new]
    if args.baseline:
        package = baseline_package(args.baseline)
        base = build_case(f"{args.baseline}", package, inputs, new)
        if base.same_weights:
            differences = check_same(new, base)
            line = ", ".join(f"{k} {v:.3g}" for k, v in differences.items())
            print(f"max |new - baseline|, one step without dropout: {line}")
        else:
            print("the baseline builds another architecture (different parameters): no weights copied, no check")
        cases = [base, new]
    timings = time_parts(cases, args.warmup, args.repeat, [p for p in args.parts.split(",") if p])
    print(format_table(timings, [c.name for c in cases]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

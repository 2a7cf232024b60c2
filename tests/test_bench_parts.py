"""``python -m ddetr.bench parts`` at a tiny size: the default run's setup on real batches, and the R50
setup with model options against a git baseline (this commit: same losses)."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests._runs import SRC, run_entry, run_ok

REPO = SRC.parent


def _table_rows(out: str) -> dict[str, list[str]]:
    return {
        line.split()[0]: line.split()[1:] for line in out.splitlines() if re.match(r"^(matcher|criterion|data)\s", line)
    }


@pytest.mark.slow
def test_small_setup_times_its_parts(tmp_path):
    result = run_ok(
        "ddetr.bench",
        [
            "parts",
            "--setup",
            "small",
            "--parts",
            "matcher,criterion,data",
            "--repeat",
            "1",
            "--warmup",
            "0",
            "preset=debug",
            f"paths.data_dir={tmp_path}",
        ],
        cwd=tmp_path,
    )
    rows = _table_rows(result.stdout)
    assert set(rows) == {"matcher", "criterion", "data"}, result.stdout
    assert all(float(row[0]) > 0 for row in rows.values())


@pytest.mark.slow  # 12 s on an idle 2-core machine (two R50 builds, one step each)
@pytest.mark.skipif(
    subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], check=False, capture_output=True).returncode != 0,
    reason="needs this checkout's git history",
)
def test_r50_setup_with_options_against_a_baseline(tmp_path):
    result = run_ok(
        "ddetr.bench",
        [
            "parts",
            "--images",
            "64x64,64x48",
            "--parts",
            "matcher",
            "--repeat",
            "1",
            "--warmup",
            "0",
            "--baseline",
            "HEAD",
            "backbone.channels_last=true",
            "num_queries=20",
        ],
        cwd=tmp_path,
    )
    differences = re.search(
        r"max \|new - baseline\|, one step without dropout: losses (\S+), gradients (\S+)", result.stdout
    )
    assert differences, result.stdout
    assert float(differences[1].rstrip(",")) < 1e-4  # HEAD: this code in a clean checkout
    assert "matcher" in _table_rows(result.stdout)
    bad = run_entry("ddetr.bench", ["parts", "--parts", "matcher", "no_such_option=1"], cwd=tmp_path)
    assert bad.returncode != 0 and "no model option 'no_such_option'" in bad.stderr


def test_a_baseline_of_another_architecture_gets_no_weights_and_no_check():
    from ddetr.benchmarks.step_parts import _same_shapes
    from ddetr.models import DeformableDETRConfig, build_deformable_detr

    options = {"num_classes": 3, "hidden_dim": 32, "nheads": 2, "enc_layers": 1, "dec_layers": 1, "num_queries": 5}
    full = build_deformable_detr(DeformableDETRConfig.from_dict(backbone={"name": "resnet18"}, **options))
    again = build_deformable_detr(DeformableDETRConfig.from_dict(backbone={"name": "resnet18"}, **options))
    cut = build_deformable_detr(
        DeformableDETRConfig.from_dict(backbone={"name": "resnet18", "max_stride": 16}, **options)
    )
    assert _same_shapes(full, again) and not _same_shapes(full, cut) and not _same_shapes(cut, full)


@pytest.mark.slow
def test_loss_backward_part_reaches_every_trainable_weight_and_changes_none():
    """``loss+backward`` (the step as issue 23 states it: forward, criterion, backward) runs a backward
    that reaches every trainable parameter, then clears the gradients; it updates no weight (``step`` does)."""
    import argparse

    import torch

    from ddetr.benchmarks import step_parts

    args = argparse.Namespace(images="64x64,64x48", optimizer="foreach", overrides=["num_queries=20"])
    case = step_parts.build_case("new", "ddetr", step_parts.setup_inputs("r50", args), None)
    parts = step_parts.part_closures(case)
    trainable = {name: p for name, p in case.model.named_parameters() if p.requires_grad}
    reached = set()
    for name, parameter in trainable.items():
        parameter.register_hook(lambda grad, name=name: reached.add(name))
    before = {name: p.detach().clone() for name, p in trainable.items()}
    parts["loss+backward"]()
    assert reached == set(trainable)
    assert all(p.grad is None for p in trainable.values())
    assert all(torch.equal(p, before[name]) for name, p in trainable.items())
    parts["step"]()
    assert not all(torch.equal(p, before[name]) for name, p in trainable.items())


def test_per_repetition_ratios_are_summarised_by_median_and_quartiles():
    from ddetr.benchmarks.step_parts import Timings, format_table, ratio_spread

    assert ratio_spread([0.9, 0.6, 1.0, 0.7, 0.8]) == "0.80 (0.70-0.90)"  # inclusive quartiles, by hand
    assert ratio_spread([0.75]) == "0.75" and ratio_spread([]) == "-"
    timings = Timings({"step": {"base": 200.0, "new": 150.0}}, {"step": [0.7, 0.8, 0.75]})
    (row,) = [line.split() for line in format_table(timings, ["base", "new"]).splitlines() if line.startswith("step")]
    assert row == ["step", "200.0", "150.0", "100%", "100%", "0.75", "0.75", "(0.72-0.78)"]

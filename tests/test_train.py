"""End-to-end training through the real configs: a tiny run, resume, a sweep and DDP on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _runs import run_ok

from ddetr.app import compose
from ddetr.data import ensure_synthetic_dataset
from ddetr.training.module import DeformableDETRModule
from ddetr.training.run import train


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synthetic")


@pytest.fixture(scope="module")
def one_epoch_checkpoint(debug_run) -> Path:
    """last.ckpt of a one-epoch ``preset=debug`` run (the session's ``debug_run``), shared by the tests that resume
    or fine-tune from it (they read it and write elsewhere)."""
    return debug_run[1] / "checkpoints" / "last.ckpt"


def test_default_run_trains_evaluates_and_writes_metrics(tmp_path, data_root, debug_overrides):
    cfg = compose(debug_overrides(tmp_path, data_root) + ["trainer.max_epochs=2"])
    metrics = train(cfg)
    for name in ("val/AP", "val/AP50", "val/AP75", "val/APs"):
        assert name in metrics and 0.0 <= metrics[name] <= 1.0
    written = json.loads((tmp_path / "metrics.json").read_text())
    # the debug images are 64 pixels: no large object, so APl is undefined: null, and not logged
    assert metrics["val/APl"] is None and written["val/APl"] is None
    assert list(written["per_class"]) == cfg_category_names(data_root)
    assert written["val/AP50"] == pytest.approx(metrics["val/AP50"])
    assert written["epochs"] == 2
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert list((tmp_path / "val_images").glob("epoch_*/*.png")), "validation pictures are written"
    log = (tmp_path / "csv" / "metrics.csv").read_text()
    assert "train/loss" in log and "val/AP" in log and "train/loss_giou" in log
    assert "val/APl" not in log.splitlines()[0].split(",")  # undefined metrics are not logged
    # the checkpoint rebuilds the model without any config
    module = DeformableDETRModule.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu")
    assert module.hparams.hidden_dim == 32 and module.category_names == cfg_category_names(data_root)


def cfg_category_names(data_root: Path) -> list[str]:
    annotations = json.loads((data_root / "annotations" / "instances_val.json").read_text())
    return [c["name"] for c in sorted(annotations["categories"], key=lambda c: c["id"])]


def test_resume_continues_from_the_checkpoint(tmp_path, data_root, debug_overrides, one_epoch_checkpoint):
    ckpt = one_epoch_checkpoint
    second = tmp_path / "second"
    metrics = train(compose(debug_overrides(second, data_root) + ["trainer.max_epochs=2", f"ckpt_path={ckpt}"]))
    state = torch.load(second / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 1  # one more epoch, not two from scratch
    assert "val/AP" in metrics


@pytest.mark.slow
def test_sweep_runs_every_combination(tmp_path, data_root, debug_overrides):
    overrides = [o for o in debug_overrides(tmp_path, data_root) if not o.startswith("paths.output_dir")]
    run_ok(
        "ddetr.train",
        [
            "-m",
            "model.enc_n_points=1,2",
            "model.dec_n_points=1,2",
            "trainer.limit_train_batches=1",
            "trainer.limit_val_batches=1",
            f"hydra.sweep.dir={tmp_path}/sweep",
            *overrides,
        ],
        cwd=tmp_path,
    )
    runs = sorted((tmp_path / "sweep").glob("*/metrics.json"))
    assert len(runs) == 4
    seen = set()
    for run in runs:
        config = (run.parent / ".hydra" / "overrides.yaml").read_text()
        seen.add(
            tuple(p for p in ("enc_n_points=1", "enc_n_points=2", "dec_n_points=1", "dec_n_points=2") if p in config)
        )
    assert len(seen) == 4


@pytest.mark.slow
def test_ddp_on_two_cpu_processes(tmp_path, data_root, debug_overrides):
    overrides = [o for o in debug_overrides(tmp_path, data_root) if not o.startswith("paths.output_dir")]
    run_ok(
        "ddetr.train",
        ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", f"hydra.run.dir={tmp_path}/ddp", *overrides],
        cwd=tmp_path,
    )
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    # the metrics gathered over two ranks are those of one process validating the same checkpoint
    import lightning as L
    from hydra.utils import instantiate

    cfg = compose([*overrides, f"paths.output_dir={tmp_path}/single"])
    module = DeformableDETRModule.load_from_checkpoint(
        tmp_path / "ddp" / "checkpoints" / "last.ckpt", map_location="cpu"
    )
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    single = trainer.validate(module, datamodule=instantiate(cfg.data), verbose=False)[0]
    for name in ("val/AP", "val/AP50", "val/AR100"):
        assert single[name] == pytest.approx(metrics["all"][name], abs=1e-9), name


@pytest.mark.slow
def test_wandb_logger_runs_offline(tmp_path, data_root, debug_overrides):
    cfg = compose(debug_overrides(tmp_path, data_root) + ["logger=wandb"])
    train(cfg)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs, "an offline wandb run directory is written"
    files = {p.name for p in runs[0].rglob("*")}
    assert any(name.endswith(".wandb") for name in files)
    assert any(name.startswith("pr_curves_") for name in files) and any(
        name.startswith("confusion_matrix_") for name in files
    )


def data_with_empty_images(data_root: Path, out: Path, keep_boxes_of: int = 1) -> Path:
    """A copy of the synthetic train annotations in which only the first ``keep_boxes_of`` images have boxes."""
    annotations = json.loads((data_root / "annotations" / "instances_train.json").read_text())
    keep = {image["id"] for image in annotations["images"][:keep_boxes_of]}
    annotations["images"] = annotations["images"][:4]
    annotations["annotations"] = [a for a in annotations["annotations"] if a["image_id"] in keep]
    out.write_text(json.dumps(annotations))
    return out


@pytest.mark.slow
def test_ddp_empty_rank_and_odd_val_set(tmp_path, data_root, debug_overrides):
    """2 ranks, batch 1, 4 train images of which 3 have no boxes: in every step some rank has no boxes,
    and no rank hangs. 5 val images (odd) evaluated on 2 ranks give the AP of 1 process."""
    data_root = ensure_synthetic_dataset(tmp_path / "synthetic", num_train=4, num_val=5, image_size=64, progress=False)
    train_json = data_with_empty_images(data_root, tmp_path / "train.json")
    data = [
        "data=custom",
        f"data.train_images={data_root}/train",
        f"data.train_annotations={train_json}",
        f"data.val_images={data_root}/val",
        f"data.val_annotations={data_root}/annotations/instances_val.json",
        "data.batch_size=1",
        "data.num_workers=0",
        "data.val_transforms.size=64",
        "data.val_transforms.max_size=96",
        "data.train_transforms.scales=[48,64]",
        "data.train_transforms.max_size=96",
        "data.train_transforms.crop_resize_scales=[48,64]",
        "data.train_transforms.crop_min_size=32",
        "data.train_transforms.crop_max_size=64",
    ]
    model = ["model=tiny", "callbacks.progress_bar.refresh_rate=0", "trainer.log_every_n_steps=1"]
    run_ok(
        "ddetr.train",
        [
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "trainer.max_epochs=2",
            f"hydra.run.dir={tmp_path}/ddp",
            *model,
            *data,
        ],
        cwd=tmp_path,
    )
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert all(v == v for v in metrics["all"].values()), "no NaN metric"  # finite losses on both ranks

    import lightning as L
    from hydra.utils import instantiate

    cfg = compose([*model, *data, f"paths.output_dir={tmp_path}/single"])
    datamodule = instantiate(cfg.data)
    module = DeformableDETRModule.load_from_checkpoint(
        tmp_path / "ddp" / "checkpoints" / "last.ckpt", map_location="cpu"
    )
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    single = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    assert len(datamodule.val_dataset) == 5
    for name in ("val/AP", "val/AP50", "val/AR100"):
        assert single[name] == pytest.approx(metrics["all"][name], abs=1e-9), name


def test_checkpoint_from_init_from_loads_evaluates_and_resumes_without_the_init_file(
    tmp_path, data_root, debug_overrides, one_epoch_checkpoint
):
    import shutil

    import lightning as L
    from hydra.utils import instantiate

    init_file = tmp_path / "init.ckpt"  # a copy of the pretraining run's checkpoint, outside any run directory
    shutil.copy(one_epoch_checkpoint, init_file)
    finetune = debug_overrides(tmp_path / "finetune", data_root) + [f"model.init_from={init_file}"]
    train(compose(finetune))
    init_file.unlink()  # gone: another machine, or the file moved

    ckpt = tmp_path / "finetune" / "checkpoints" / "last.ckpt"
    assert "init_from" not in torch.load(ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]
    module = DeformableDETRModule.load_from_checkpoint(ckpt, map_location="cpu")
    cfg = compose(finetune)
    datamodule = instantiate(cfg.data)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    metrics = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    assert "val/AP" in metrics
    steps = torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]
    resumed = train(compose(finetune + ["trainer.max_epochs=2", f"ckpt_path={ckpt}"]))
    assert "val/AP" in resumed
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == 2 * steps  # one more epoch

"""The Hydra side of the project: where the configs live, the resolvers and the structured model
schema they use, ``compose`` for tests and notebooks, and ``hydra_app`` for the entry points."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import netrc
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


def config_dir() -> Path:
    """The Hydra configs: ``ddetr/conf`` inside an installed wheel, else the repository's ``conf/``
    (a source checkout or an editable install)."""
    package = Path(__file__).resolve().parent
    for directory in (package / "conf", package.parents[1] / "conf"):
        if (directory / "train.yaml").is_file():
            return directory
    raise FileNotFoundError(
        f"ddetr's Hydra configs were found neither in {package / 'conf'} (installed package) nor in "
        f"{package.parents[1] / 'conf'} (source checkout); reinstall ddetr"
    )


CONFIG_DIR = config_dir()
MODULE_TARGET = "ddetr.training.module.DeformableDETRModule"


def wandb_offline() -> bool:
    """True when no Weights & Biases credentials exist, so the logger runs offline instead of failing."""
    if os.environ.get("WANDB_MODE") in ("offline", "disabled"):
        return True
    if os.environ.get("WANDB_API_KEY"):
        return False
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is None
    except (FileNotFoundError, netrc.NetrcParseError):
        return True


def claim_run_dir(parent: str | os.PathLike, name: str) -> Path:
    """Creates and returns a new directory ``parent/name``, or ``parent/name_2``, ``name_3``, ... when that one
    exists: ``mkdir`` either creates a directory or fails, so runs that start together (in the same second,
    on machines that share the log folder) each get their own."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    for number in range(1, 10_000):
        candidate = parent / (name if number == 1 else f"{name}_{number}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"no free run directory name {name}_N under {parent}")


@functools.cache
def run_dir(parent: str, ckpt_path: str | None = None, overrides: tuple[str, ...] = ()) -> str:
    """The run directory under ``parent`` (the runs folder of the task). Once per process: resolving the config
    again (Lightning's DDP launcher reads it to start the other ranks) gives the same.

    - In a SLURM batch job: ``slurm_<job id>`` (a requeued job finds its checkpoints; ``ckpt_path=null`` acts as
      ``auto`` there, ``ddetr.training.run.resume_path``).
    - ``ckpt_path=auto``: the directory of the newest unfinished run of the same ``overrides`` (the command line's,
      ``ckpt_path`` aside) that has a checkpoint, to resume in (``find_unfinished_run``); none: a new one.
    - Under torchrun: one name every rank derives alike (``torchrun_run_name``).
    - Else a new directory named after the start time (``claim_run_dir``)."""
    from datetime import datetime

    from ddetr.training.callbacks import slurm_job_id
    from ddetr.training.run_directory import find_unfinished_run, torchrun_run_name

    job_id = slurm_job_id()
    if job_id:
        return str(Path(parent) / f"slurm_{job_id}")
    if ckpt_path == "auto":
        unfinished = find_unfinished_run(parent, overrides)
        if unfinished is not None:
            return str(unfinished)
    torchrun_name = torchrun_run_name()
    if torchrun_name:
        folder = Path(parent) / torchrun_name
        folder.mkdir(parents=True, exist_ok=True)  # every rank: the same directory
        return str(folder)
    return str(claim_run_dir(parent, datetime.now().strftime("%Y-%m-%d_%H-%M-%S")))


def resolve_run_dir(parent: str, ckpt_path: Any = None, overrides: Any = ()) -> str:
    """``${ddetr.run_dir:PARENT,CKPT_PATH,OVERRIDES}``: ``run_dir`` with the overrides (a list node) as a tuple."""
    return run_dir(str(parent), None if ckpt_path is None else str(ckpt_path), tuple(str(o) for o in overrides or ()))


def model_schema() -> dict[str, Any]:
    """The ``model`` config group's base node: every field of ``DeformableDETRConfig``, ``LossConfig``
    and ``OptimConfig`` with its official default, so ``conf/model/*.yaml`` hold only deltas."""
    from ddetr.models.config import DeformableDETRConfig, LossConfig, OptimConfig

    return {
        "_target_": MODULE_TARGET,
        **dataclasses.asdict(DeformableDETRConfig()),
        "num_classes": None,  # null: taken from the data module
        "loss": dataclasses.asdict(LossConfig()),
        "optim": dataclasses.asdict(OptimConfig()),
        **module_defaults("num_select", "on_nonfinite_loss"),  # on_nonfinite_loss: raise | skip
        "init_from": None,  # a ddetr checkpoint to start training from (not part of the saved model)
        # compile: false | true | reduce-overhead (ddetr.training.compilation; not part of the saved model)
        **module_defaults("compile"),
    }


def module_defaults(*names: str) -> dict[str, Any]:
    """The defaults of ``DeformableDETRModule``'s options ``names``, read from its signature (their one place)."""
    from ddetr.training.module import DeformableDETRModule

    parameters = inspect.signature(DeformableDETRModule.__init__).parameters
    return {name: parameters[name].default for name in names}


def register_resolvers() -> None:
    """Registers ``${ddetr.wandb_offline:}``, the ``model/official`` schema and the optuna sweeper's
    direction (``register_optuna_direction``); safe to call more than once."""
    from hydra.core.config_store import ConfigStore

    OmegaConf.register_new_resolver("ddetr.wandb_offline", wandb_offline, replace=True)
    OmegaConf.register_new_resolver("ddetr.run_dir", resolve_run_dir, replace=True)
    ConfigStore.instance().store(group="model", name="official", node=OmegaConf.create(model_schema()))
    register_optuna_direction()


def register_optuna_direction() -> None:
    """``hydra/sweeper=optuna`` (the hydra-optuna-sweeper plugin, ``pip install "ddetr[optuna]"``) with its
    direction read from the run's config, ``optimized_direction`` (``maximize`` in train.yaml: val/AP),
    instead of the plugin's ``minimize``; nothing without the plugin.

    The plugin's node is stored again under the same name with that one default changed: a YAML file of the
    same name cannot extend it (Hydra refuses a schema that has a defaults list). Hydra's plugin discovery
    runs the plugin's modules (and so its registration) again, so it runs first here, once per process."""
    try:
        from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
    except ImportError:
        return
    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins

    Plugins.instance()  # the plugin discovery, before this registration

    node = OptunaSweeperConf(direction="${oc.select:optimized_direction,minimize}")
    ConfigStore.instance().store(group="hydra/sweeper", name="optuna", node=node, provider="ddetr")


def compose(overrides: list[str] | None = None, config_name: str = "train"):
    """Composes the project's config outside ``@hydra.main`` (tests, notebooks); set ``paths.output_dir``.

    ``compose(["+preset=debug"])`` gives the tiny, few-step setup that tests and notebooks use."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides or [])


def apply_matmul_precision(cfg: DictConfig) -> None:
    """``ddetr.matmul_precision.set_matmul_precision(cfg.matmul_precision)`` when the config sets it
    (``high``, the default of train, eval and predict, allows TF32 on GPUs that have it)."""
    precision = cfg.get("matmul_precision")
    if precision is None:
        return
    from ddetr.matmul_precision import set_matmul_precision

    set_matmul_precision(precision)


def hydra_app(config_name: str, run: Callable[[DictConfig], Any]) -> Callable[[], Any]:
    """The ``main()`` of an entry point: ``run(cfg)`` under ``@hydra.main`` with ``conf/<config_name>.yaml``,
    after the process-wide settings every entry point shares (``matmul_precision``)."""
    import hydra

    register_resolvers()

    @functools.wraps(run)
    def configured_run(cfg: DictConfig) -> Any:
        from ddetr.data.validation import DatasetError
        from ddetr.checkpoints import CheckpointError
        from ddetr.training.run import RunConfigError

        apply_matmul_precision(cfg)
        try:
            return run(cfg)
        except (
            CheckpointError,
            DatasetError,
            RunConfigError,
        ) as error:  # one line naming the file or setting and the likely cause, no traceback
            raise SystemExit(f"error: {error}") from None

    hydra_main = hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name=config_name)(configured_run)

    def main() -> Any:
        os.environ.setdefault("HYDRA_FULL_ERROR", "1")
        return hydra_main()

    return main

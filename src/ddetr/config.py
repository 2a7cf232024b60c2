"""Where the Hydra configs live, and the resolvers they use."""

from __future__ import annotations

import netrc
import os
from pathlib import Path

from omegaconf import OmegaConf

CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf"


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


def register_resolvers() -> None:
    """Registers ``${ddetr.wandb_offline:}``; safe to call more than once."""
    OmegaConf.register_new_resolver("ddetr.wandb_offline", wandb_offline, replace=True)


def compose(overrides: list[str] | None = None, config_name: str = "train"):
    """Composes the project's config outside ``@hydra.main`` (tests, notebooks); set ``paths.output_dir``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides or [])

"""Training entry point: ``python -m ddetr.train [experiment=...] [key=value ...]``.

With no arguments it trains the small model on the built-in synthetic dataset (generated once and
cached under ``data/``), evaluates with pycocotools every 2 epochs and after the last one, and ends
with a table of the final COCO metrics, also written to ``metrics.json`` in the run directory, and
a line that says how long the run took.
"""

from ddetr.app import hydra_app
from ddetr.training.run import train


def run(cfg) -> float | None:
    """The run's ``optimized_metric`` (``val/AP``): what a Hydra sweeper optimises."""
    return train(cfg).get(cfg.get("optimized_metric") or "val/AP")


main = hydra_app("train", run)

if __name__ == "__main__":
    main()

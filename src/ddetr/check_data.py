"""Data pre-flight: ``python -m ddetr.check_data [data=...] output=DIR [overfit=true]``.

Writes pictures of training samples as the model sees them (after augmentation, ground-truth boxes and
class names drawn) and prints a one-screen summary (images, boxes per class, box sizes relative to the
image, what was skipped). With ``overfit=true`` it trains on a few training images and ends with one
line, ``overfit: PASS`` or ``overfit: FAIL`` and the AP50 reached on them, so a broken label pipeline
shows in minutes ("why is my AP 0?").
"""

from ddetr.app import hydra_app
from ddetr.training.preflight import check_data


def run(cfg) -> bool | None:
    return check_data(cfg).get("overfit_passed")


main = hydra_app("check_data", run)

if __name__ == "__main__":
    main()

"""The Lightning names ddetr reads that are not public API (``ddetr.lightning_internals``): each exists on the
installed Lightning, the pin in pyproject.toml is the tested range, a missing one fails naming it, and no other
module reads them."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from types import SimpleNamespace

import lightning
import pytest
from _runs import quiet_trainer
from packaging.requirements import Requirement

from ddetr import lightning_internals
from ddetr.lightning_internals import (
    PRIVATE_NAMES,
    TESTED_RANGE,
    LightningInternalsError,
    processed_batches,
    read,
    set_validation_schedule,
    validation_schedule,
)

ROOT = Path(__file__).resolve().parents[1]
# private names of Lightning that ddetr read before they were gathered in one module (issue 37)
LIGHTNING_PRIVATE = (
    "fit_loop",
    "epoch_loop",
    "batch_progress",
    "val_check_batch",
    "_save_topk_checkpoint",
    "_monitor_candidates",
    "_should_skip_saving_checkpoint",
    "_latest_update_step",
    "_average_model",
)


@pytest.mark.parametrize("name", sorted(PRIVATE_NAMES))
def test_every_private_name_exists_on_the_installed_lightning(name):
    trainer = quiet_trainer(max_steps=1)
    path = tuple(name.removeprefix("Trainer.").split("."))
    try:
        read(trainer, path, PRIVATE_NAMES[name])
    except LightningInternalsError as error:
        pytest.fail(f"{error} - ddetr's pin of lightning in pyproject.toml no longer holds")


def test_the_accessors_read_and_write_the_trainer():
    trainer = quiet_trainer(max_steps=1, check_val_every_n_epoch=3)
    before = validation_schedule(trainer)
    assert before == (trainer.check_val_every_n_epoch, trainer.val_check_batch) and before[0] == 3
    set_validation_schedule(trainer, 1, 1)
    assert (trainer.check_val_every_n_epoch, trainer.val_check_batch) == (1, 1)
    assert processed_batches(trainer) == 0  # nothing trained yet


def test_the_pin_is_the_tested_range_and_holds():
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [Requirement(d) for d in dependencies if Requirement(d).name == "lightning"]
    assert len(pins) == 1 and pins[0].specifier == Requirement(f"lightning{TESTED_RANGE}").specifier
    assert pins[0].specifier.contains(lightning.__version__), (lightning.__version__, TESTED_RANGE)
    assert any(not pins[0].specifier.contains(v) for v in ("2.7.0", "3.0.0")), "the pin needs an upper bound"


def test_a_missing_name_fails_naming_the_attribute_and_its_reader():
    without_val_check = SimpleNamespace(check_val_every_n_epoch=1)
    with pytest.raises(LightningInternalsError, match=r"has no Trainer\.val_check_batch, which .*LastCheckpoint"):
        set_validation_schedule(without_val_check, 1, 1)
    assert not hasattr(without_val_check, "val_check_batch")  # nothing silently set
    without_epoch_loop = SimpleNamespace(fit_loop=SimpleNamespace())
    expected = rf"has no Trainer\.fit_loop\.epoch_loop, .*{re.escape(TESTED_RANGE)}"
    with pytest.raises(LightningInternalsError, match=expected):
        processed_batches(without_epoch_loop)


def test_no_other_module_reads_lightning_private_names():
    allowed = Path(lightning_internals.__file__).resolve()
    found = {}
    for path in sorted((ROOT / "src" / "ddetr").rglob("*.py")):
        if path.resolve() == allowed:
            continue
        text = path.read_text()
        names = [name for name in LIGHTNING_PRIVATE if re.search(rf"\.{name}\b", text)]
        if names:
            found[str(path.relative_to(ROOT))] = names
    assert found == {}

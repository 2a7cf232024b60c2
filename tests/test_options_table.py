"""The README's options table is the one ``python -m ddetr.tools.options_table`` generates from ``conf/`` and the
config classes: a changed default, a renamed key or a hand edit fails here."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from ddetr.app import compose
from ddetr.tools import options_table
from ddetr.tools.options_table import BEGIN, END, OPTIONS, Option


@pytest.fixture(scope="module")
def generated() -> str:
    return options_table.table()


def test_readme_holds_the_generated_table(generated):
    text = options_table.README.read_text()
    assert options_table.replaced(text, generated) == text, (
        "README.md's options table is out of date: run python -m ddetr.tools.options_table --write"
    )


def test_defaults_are_those_of_the_composed_configs(generated):
    # an independent read: the resolved config of `python -m ddetr.train` (and of data=custom / data=coco)
    rows = {line.split(" | ")[0].strip("| `"): line.split(" | ")[1] for line in generated.splitlines()[2:]}
    cfg = compose([])
    assert rows["model.num_queries"] == f"`{cfg.model.num_queries}`"
    assert rows["trainer.max_epochs"] == f"`{cfg.trainer.max_epochs}`"
    assert rows["model.optim.lr"] == f"`{cfg.model.optim.lr}`"
    assert rows["ema.decay"] == "`null`" and cfg.ema.decay is None
    assert rows["data"] == "`synthetic`" and cfg.data._target_.endswith("SyntheticDataModule")
    assert OmegaConf.is_missing(compose(["data=custom"]).data, "train_images")
    assert rows["data.train_images"] == "`required` (with `data=custom`)"
    assert len(OPTIONS) >= 30 and len(rows) == len(OPTIONS)


def test_check_fails_on_a_stale_table_and_write_mends_it(tmp_path, generated):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{BEGIN}\n{generated.replace('`16`', '`15`')}{END}\n")
    assert options_table.main(["--check", "--readme", str(readme)]) == 1
    assert options_table.main(["--write", "--readme", str(readme)]) == 0
    assert options_table.main(["--check", "--readme", str(readme)]) == 0
    assert generated in readme.read_text()


def test_a_key_that_no_longer_exists_is_an_error_naming_it():
    with pytest.raises(KeyError, match="model.no_such_key"):
        options_table.default_of(Option("model.no_such_key", "gone"), {})


def test_markers_missing_is_an_error():
    with pytest.raises(ValueError, match="options-table"):
        options_table.replaced("no markers here", "| a |\n")

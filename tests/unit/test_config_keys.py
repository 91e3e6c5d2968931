"""`fedit config`: every key with type, default and help from the source; a config read and
printed as TOML that loads back equal; a run's saved config; none of it imports torch."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from typer.testing import CliRunner

from fedit.cli.main import app
from fedit.config import RunConfig, load_config
from fedit.config.keys import config_keys, field_comments
from tests.conftest import REPO
from tests.unit.test_docs import config_keys as walked_keys

runner = CliRunner()
DOLLY_CONFIG = str(REPO / "configs" / "dolly.toml")


@dataclass
class Commented:
    plain: int = 1  # on its line
    # above it,
    # on two lines
    above: str = "x"
    spanning: str = "a"  # inside a default that spans lines
    bare: list[int] = field(default_factory=list)


def test_a_fields_help_is_the_comment_above_and_on_its_lines() -> None:
    assert field_comments(Commented) == {
        "plain": "on its line",
        "above": "above it, on two lines",
        "spanning": "inside a default that spans lines",
        "bare": "",
    }


def test_every_key_has_its_type_default_and_help() -> None:
    keys = config_keys()
    assert [k.key for k in keys] == walked_keys(RunConfig())
    assert [k.key for k in keys if not k.help] == [], "give each config field a comment"
    by_key = {k.key: k for k in keys}
    assert (by_key["data.max_seq_len"].type, by_key["data.max_seq_len"].default) == ("int", "256")
    assert (by_key["train.max_steps"].type, by_key["train.max_steps"].default) == (
        "int | None",
        "unset",
    )
    assert by_key["lora.target_modules"].default == '["all-linear"]'
    assert by_key["model.name_or_path"].default == '"embedded"'


def test_the_listing_has_one_line_per_key() -> None:
    done = runner.invoke(app, ["config"])
    assert done.exit_code == 0, done.output
    lines = done.output.splitlines()
    assert [line.split(":", 1)[0] for line in lines] == walked_keys(RunConfig())
    assert "train.learning_rate: float = 0.00015  # the clients' AdamW learning rate" in lines
    assert runner.invoke(app, ["config", "--keys"]).output == done.output


def test_a_config_prints_as_toml_that_loads_back_equal(tmp_path: Path) -> None:
    sets = ["--set", "federation.rounds=3", "--set", "data.system_prompt=Be brief."]
    sets += ["--set", "data.template=chat"]
    done = runner.invoke(app, ["config", "-c", DOLLY_CONFIG, *sets])
    assert done.exit_code == 0, done.output
    printed = tmp_path / "printed.toml"
    printed.write_text(done.output)
    expected = load_config(DOLLY_CONFIG, [s for s in sets if s != "--set"])
    assert expected.federation.rounds == 3
    assert load_config(printed) == expected


def test_a_run_directory_shows_its_saved_config(tmp_path: Path) -> None:
    saved = load_config(None, ["data.path=synthetic", "seed=7"])
    saved.save(tmp_path / "config.toml")
    done = runner.invoke(app, ["config", "--run", str(tmp_path)])
    assert done.exit_code == 0, done.output
    assert done.output == (tmp_path / "config.toml").read_text()


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text("[train]\nlearning_rate = 'fast'\n")
    for args in (["-c", str(tmp_path / "bad.toml")], ["--run", str(tmp_path / "none")]):
        done = runner.invoke(app, ["config", *args])
        assert done.exit_code == 2
        assert len(done.output.strip().splitlines()) == 1, done.output
    assert (
        "train.learning_rate: expected a number"
        in runner.invoke(app, ["config", "-c", str(tmp_path / "bad.toml")]).output
    )
    both = runner.invoke(app, ["config", "--run", str(tmp_path), "-c", DOLLY_CONFIG])
    assert both.exit_code == 2


def test_printing_a_config_imports_no_torch() -> None:
    code = (
        "import sys\nfrom typer.testing import CliRunner\nfrom fedit.cli.main import app\n"
        f"for args in (['config'], ['config', '-c', {DOLLY_CONFIG!r}]):\n"
        "    assert CliRunner().invoke(app, args).exit_code == 0\n"
        "assert 'torch' not in sys.modules, 'fedit config imported torch'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr

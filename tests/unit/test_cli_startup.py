"""`fedit --help` must not pay for torch or Flower: the CLI imports heavy modules only inside
commands."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import fedit
from fedit.cli.main import app

HEAVY = (
    "torch",
    "transformers",
    "peft",
    "fedit.engine",
    "flwr",
    "cryptography",
    "fedit.deploy",
    "fedit.experiments",
)
COMMANDS = [
    "train",
    "partition",
    "config",
    "data",
    "data preview",
    "compare",
    "eval",
    "generate",
    "export",
    "tiny-model",
    "certs",
    "certs ca",
    "certs node-key",
    "simulate-ray",
    "coordinate",
    "join",
]


@pytest.mark.parametrize("command", [[], *(c.split() for c in COMMANDS)], ids=["fedit", *COMMANDS])
def test_help_imports_no_torch_transformers_peft_or_flower(command: list[str]) -> None:
    src = str(Path(fedit.__file__).resolve().parents[1])  # this checkout's fedit
    run = subprocess.run(
        # -X importtime lists every module the run imports, one per stderr line
        [sys.executable, "-X", "importtime", "-m", "fedit.cli.main", *command, "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": src},
        check=True,
    )
    assert "Usage:" in run.stdout
    imported = {ln.rsplit("|", 1)[-1].strip() for ln in run.stderr.splitlines() if "|" in ln}
    assert "fedit.cli.common" in imported  # (fedit.cli.main itself runs as __main__)
    assert sorted(m for m in imported if m.startswith(HEAVY)) == []


def test_flags_show_as_flags() -> None:
    """typer's rich help printed '--resume <bool>' though a flag takes no value."""
    help_text = CliRunner().invoke(app, ["train", "--help"]).output
    assert "--resume " in help_text and "--quiet " in help_text
    assert "<bool>" not in help_text
    # and --resume takes no value: the option after it is parsed as an option
    result = CliRunner().invoke(app, ["train", "--resume", "-c", "no-such.toml"])
    assert result.exit_code == 2 and "no-such.toml: config file not found" in result.output

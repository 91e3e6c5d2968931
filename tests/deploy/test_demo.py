"""scripts/deploy_demo.sh and configs/deploy_demo.toml, without the federation: the script
parses, and the files its setup makes are the ones the config names, so `fedit coordinate`
accepts the config and each owner's key is the roster entry of its client id. Running the
demo itself (four processes with the 135M model, minutes) is left to people."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedit.config import load_config, rules
from fedit.data.prepare import client_files
from fedit.deploy.coordinator import check_roster
from tests.conftest import REPO
from tests.deploy.conftest import FEDIT_SRC

pytestmark = pytest.mark.deploy

SCRIPT = REPO / "scripts" / "deploy_demo.sh"
CONFIG = REPO / "configs" / "deploy_demo.toml"
VENV = Path(sys.executable).parent.parent  # the interpreter running the tests, and its fedit


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    if not (VENV / "bin" / "fedit").exists():
        pytest.skip(f"no fedit command in {VENV}/bin (pip install -e . there)")
    env = {**os.environ, "FEDIT_VENV": str(VENV), "PYTHONPATH": FEDIT_SRC}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=300
    )


def fake_dolly(path: Path) -> Path:
    """Dolly's fields and eight categories, a few short records each."""
    categories = ["brainstorming", "classification", "closed_qa", "creative_writing"]
    categories += ["general_qa", "information_extraction", "open_qa", "summarization"]
    with path.open("w") as out:
        for c in categories:
            for i in range(8):
                record = {"instruction": f"{c} question {i}?", "context": "", "category": c}
                out.write(json.dumps({**record, "response": f"answer {i}"}) + "\n")
    return path


def test_the_demo_script_is_valid_bash() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_the_demo_config_names_the_files_the_script_makes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the config's paths are relative to where fedit runs: the script's default work dir
    # under a repo root, here tmp_path
    work = tmp_path / "runs" / "deploy_demo"
    done = run_script(
        "--dir", str(work), "--dolly", str(fake_dolly(tmp_path / "dolly.jsonl")), "--setup-only"
    )
    assert done.returncode == 0, done.stderr + done.stdout

    monkeypatch.chdir(tmp_path)
    cfg = load_config(CONFIG)
    rules.check(cfg, "coordinate")  # three keys in the roster, three clients
    check_roster(cfg.deploy)  # the roster's keys exist and load
    for name in ("ca.pem", "server.pem", "server.key"):
        assert (Path(cfg.deploy.certs_dir) / name).is_file()
    assert Path(cfg.data.heldout_path).is_file()
    owners_files = client_files(cfg.data.path, cfg.partition.num_clients)  # a simulation's
    # each owner's printed command: its own records, and the key of its roster entry
    commands = dict(re.findall(r"^(owner_\d)\$ (.*)$", done.stdout, re.M))
    assert sorted(commands) == ["owner_0", "owner_1", "owner_2"]
    for k, public in enumerate(cfg.deploy.clients):
        argv = commands[f"owner_{k}"].split()
        data, key = (Path(argv[argv.index(flag) + 1]) for flag in ("--data", "--key"))
        assert data.resolve() == Path(owners_files[k]).resolve()
        assert key.with_suffix(".pub").read_bytes() == Path(public).read_bytes()


def test_the_demo_script_refuses_a_work_dir_that_exists(tmp_path: Path) -> None:
    (tmp_path / "old").mkdir()
    dolly = fake_dolly(tmp_path / "dolly.jsonl")
    done = run_script("--dir", str(tmp_path / "old"), "--dolly", str(dolly), "--setup-only")
    assert done.returncode != 0
    assert "exists" in done.stderr
    assert list((tmp_path / "old").iterdir()) == []  # nothing written into it

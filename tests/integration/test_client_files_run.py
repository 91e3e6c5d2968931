"""A federation over per-client files (partition.method = "files") on the tiny model: N comes
from the files, the run directory names each client's file, bad records are skipped aloud."""

import json
from pathlib import Path

from typer.testing import CliRunner

from fedit.cli.main import app
from fedit.data.readers import write_records_jsonl
from fedit.data.synthetic import generate_records
from tests.conftest import tiny_run_overrides

runner = CliRunner()


def client_files(directory: Path, clients: int = 3) -> str:
    """The synthetic skills dealt into client_K.jsonl files, one bad record in client_1's."""
    records = generate_records(12, seed=0)
    for k in range(clients):
        write_records_jsonl(records[k::clients], directory / f"client_{k}.jsonl")
    with (directory / "client_1.jsonl").open("a") as f:
        f.write(json.dumps({"instruction": "q", "response": ""}) + "\n")
    return str(directory / "client_*.jsonl")


def train(tiny_model_dir: Path, run_dir: Path, **extra: object):
    overrides = tiny_run_overrides(tiny_model_dir, run_dir, **extra)
    overrides = [o for o in overrides if not o.startswith("partition.num_clients=")]
    return runner.invoke(app, ["train", "--quiet"] + [a for o in overrides for a in ("--set", o)])


def test_client_files_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    pattern = client_files(tmp_path)
    run_dir = tmp_path / "run"
    extra = {"data.path": pattern, "partition.method": "files", "federation.rounds": 1}
    result = train(tiny_model_dir, run_dir, **extra, **{"data.on_bad_record": "skip"})
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert "fedit federated: 3 client(s)" in output and "1 bad record(s) skipped" in output
    assert "skipped 1 bad records: " in output and "client_1.jsonl" in output
    assert json.loads((run_dir / "clients.json").read_text()) == {
        str(k): {"data.path": str(tmp_path / f"client_{k}.jsonl")} for k in range(3)
    }
    assert "num_clients = 3" in (run_dir / "config.toml").read_text()
    # the default, "error", stops at the bad record's line
    refused = train(tiny_model_dir, tmp_path / "refused", **extra)
    assert refused.exit_code == 2
    lines = len((tmp_path / "client_1.jsonl").read_text().splitlines())
    assert f"client_1.jsonl:{lines}: field 'response': empty" in refused.output.replace("\n", "")


def test_nothing_held_out_is_said(tiny_model_dir: Path, tmp_path: Path) -> None:
    pattern = client_files(tmp_path)
    extra = {"data.path": pattern, "partition.method": "files", "federation.rounds": 1}
    extra |= {"data.on_bad_record": "skip", "data.heldout_per_category": 0}
    result = train(tiny_model_dir, tmp_path / "run", **extra)
    assert result.exit_code == 0, result.output
    assert "no record is held out" in " ".join(result.output.split())

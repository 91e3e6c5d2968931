"""Partitioners, the held-out split, the tables, and the `partition` command end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from fedit.cli.partition import partition
from fedit.config import ConfigError, PartitionConfig, RunConfig
from fedit.data.partition import (
    PARTITIONERS,
    PartitionError,
    category_table,
    format_table,
    heldout_indices,
    partition_records,
    save_heatmap,
)
from fedit.data.prepare import cap_records, prepare_preferences, prepare_records
from fedit.data.readers import read_records, write_records_jsonl
from fedit.data.records import DataFormatError, Record

DOLLY = Path(__file__).resolve().parents[2].parent / "shared/data/databricks-dolly-15k.jsonl"
SIZES = {"a": 40, "b": 25, "c": 17, "d": 9, "e": 3}  # uneven on purpose: shards straddle


def make_records() -> list[Record]:
    return [Record(f"{cat} {i}", "r", category=cat) for cat in SIZES for i in range(SIZES[cat])]


def client_categories(records: list[Record], parts: list[list[int]]) -> list[int]:
    return [len({records[i].category for i in part}) for part in parts]


@pytest.mark.parametrize("method", sorted(PARTITIONERS))
def test_partitioner_deterministic_and_covering(method: str) -> None:
    records = make_records()
    config = PartitionConfig(method=method, num_clients=5, min_client_size=2)
    parts = partition_records(records, config, seed=1)
    assert len(parts) == 5
    assert sorted(i for p in parts for i in p) == list(range(len(records)))
    assert partition_records(records, config, seed=1) == parts
    assert partition_records(records, config, seed=2) != parts


def test_category_shards_at_most_three_categories_small() -> None:
    records = make_records()
    for seed in range(30):
        parts = partition_records(records, PartitionConfig(num_clients=8), seed)
        assert max(client_categories(records, parts)) <= 3


def test_category_shards_on_dolly_100_clients() -> None:
    if not DOLLY.exists():
        pytest.skip(f"{DOLLY} not present")
    records = read_records(str(DOLLY))
    assert len(records) == 15011
    for seed in (0, 42):
        parts = partition_records(records, PartitionConfig(num_clients=100), seed)
        assert max(client_categories(records, parts)) <= 3
        assert {len(p) for p in parts} <= {150, 151}


def test_category_shards_needs_enough_records() -> None:
    records = make_records()[:9]
    with pytest.raises(PartitionError, match="at least"):
        partition_records(records, PartitionConfig(num_clients=5, shards_per_client=2), 0)


def test_dirichlet_min_client_size() -> None:
    records = make_records()
    config = PartitionConfig(method="dirichlet", num_clients=6, alpha=0.3, min_client_size=8)
    for seed in range(5):
        assert min(len(p) for p in partition_records(records, config, seed)) >= 8


def test_dirichlet_gives_up_naming_parameters() -> None:
    config = PartitionConfig(method="dirichlet", num_clients=5, alpha=0.5, min_client_size=30)
    with pytest.raises(PartitionError, match=r"min_client_size=30 .* alpha=0\.5"):
        partition_records(make_records(), config, 0)


def test_iid_near_equal() -> None:
    parts = partition_records(make_records(), PartitionConfig(method="iid", num_clients=7), 0)
    assert {len(p) for p in parts} == {13, 14}


def test_quantity_skew_min_size_and_skew() -> None:
    config = PartitionConfig(method="quantity_skew", num_clients=6, min_client_size=5)
    sizes = [len(p) for p in partition_records(make_records(), config, 3)]
    assert min(sizes) >= 5 and max(sizes) > min(sizes)


def test_too_few_records() -> None:
    with pytest.raises(PartitionError, match="3 records"):
        partition_records(make_records()[:3], PartitionConfig(method="iid", num_clients=4), 0)


def test_heldout_indices_count_per_category() -> None:
    records = make_records()
    chosen = heldout_indices(records, per_category=5, seed=0)
    held = {cat: sum(records[i].category == cat for i in chosen) for cat in SIZES}
    assert held == {"a": 5, "b": 5, "c": 5, "d": 5, "e": 2}  # e keeps one for training
    assert heldout_indices(records, 5, 0) == chosen
    assert heldout_indices(records, 5, 1) != chosen
    assert heldout_indices(records, 0, 0) == set()


def test_category_table_and_format() -> None:
    records = make_records()
    parts = [list(range(40)), list(range(40, len(records)))]
    categories, counts = category_table(records, parts)
    assert categories == ["a", "b", "c", "d", "e"]
    assert counts == [[40, 0, 0, 0, 0], [0, 25, 17, 9, 3]]
    text = format_table(categories, counts)
    assert text.splitlines()[0].split() == ["client", "total", *categories]
    assert text.splitlines()[-1].split() == ["all", "94", "40", "25", "17", "9", "3"]


def test_save_heatmap(tmp_path: Path) -> None:
    path = save_heatmap(["a", "b"], [[1, 2], [3, 0]], tmp_path / "h.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cap_records_seeded() -> None:
    records = make_records()
    capped = cap_records(records, 10, seed=0)
    assert len(capped) == 10 and capped == cap_records(records, 10, seed=0)
    assert cap_records(records, None, 0) is records


def test_prepare_records_caps_splits_and_partitions(tmp_path: Path) -> None:
    path = write_records_jsonl(make_records(), tmp_path / "d.jsonl")
    cfg = RunConfig()
    cfg.data.path, cfg.data.max_records, cfg.data.heldout_per_category = str(path), 50, 2
    prepared = prepare_records(cfg)
    assert len(prepared.train) + len(prepared.heldout) + prepared.removed_duplicates == 50
    assert all(sum(r.category == c for r in prepared.heldout) <= 2 for c in SIZES)
    assert sorted(i for p in prepared.parts for i in p) == list(range(len(prepared.train)))


def test_heldout_prompts_never_appear_in_training(tmp_path: Path) -> None:
    record = Record("same question", "an answer", category="a")
    records = [record] * 5 + make_records()[:40]
    cfg = RunConfig()
    cfg.data.path = str(write_records_jsonl(records, tmp_path / "dup.jsonl"))
    cfg.data.heldout_per_category = 3
    cfg.partition.num_clients = 2
    prepared = prepare_records(cfg)
    heldout_prompts = {(r.instruction, r.context) for r in prepared.heldout}
    assert not any((r.instruction, r.context) in heldout_prompts for r in prepared.train)


def test_files_method_reads_one_client_per_file(tmp_path: Path) -> None:
    records = make_records()
    for k in (1, 2, 10):  # natural order: 1, 2, 10
        write_records_jsonl(records[k : k + k], tmp_path / f"client_{k}.jsonl")
    held = write_records_jsonl(records[-3:], tmp_path / "test.jsonl")
    cfg = RunConfig()
    cfg.data.path, cfg.data.heldout_path = str(tmp_path / "client_*.jsonl"), str(held)
    cfg.partition.method, cfg.partition.num_clients = "files", 3
    prepared = prepare_records(cfg)
    assert [len(p) for p in prepared.parts] == [1, 2, 10]
    assert prepared.heldout == records[-3:]
    cfg.partition.num_clients = 4
    with pytest.raises(ConfigError, match="matches 3 files"):
        prepare_records(cfg)


def write_client_files(records: list, directory: Path, clients: int = 3) -> str:
    """Deal `records` round-robin into client_K.jsonl files; their glob."""
    for k in range(clients):
        write_records_jsonl(records[k::clients], directory / f"client_{k}.jsonl")
    return str(directory / "client_*.jsonl")


def test_files_method_holds_out_records_as_the_other_partitions_do(tmp_path: Path) -> None:
    records = make_records()
    cfg = RunConfig()
    cfg.data.path, cfg.data.heldout_per_category = write_client_files(records, tmp_path), 2
    cfg.partition.method, cfg.partition.num_clients = "files", 3
    prepared = prepare_records(cfg)
    pooled = RunConfig()
    pooled.data.path = str(write_records_jsonl(records, tmp_path / "all.jsonl"))
    pooled.data.heldout_per_category, pooled.partition.num_clients = 2, 3
    pooled.partition.method = "iid"
    assert len(prepared.heldout) == len(prepare_records(pooled).heldout) == 10
    trained = [prepared.train[i] for part in prepared.parts for i in part]
    assert len(trained) == len(records) - len(prepared.heldout)
    assert not set(prepared.heldout) & set(trained)
    # each client trains on its own file's records only
    for k, part in enumerate(prepared.parts):
        assert {prepared.train[i] for i in part} <= set(records[k::3])


def test_files_method_drops_records_repeating_a_heldout_file_prompt(tmp_path: Path) -> None:
    records = make_records()
    cfg = RunConfig()
    cfg.data.path = write_client_files(records, tmp_path)
    cfg.data.heldout_path = str(write_records_jsonl(records[:4], tmp_path / "test.jsonl"))
    cfg.partition.method, cfg.partition.num_clients = "files", 3
    prepared = prepare_records(cfg)
    trained = [prepared.train[i] for part in prepared.parts for i in part]
    assert (len(trained), prepared.removed_duplicates) == (len(records) - 4, 4)
    assert not set(records[:4]) & set(trained)


def test_files_method_holds_out_preference_pairs(tmp_path: Path) -> None:
    rows = [
        {"prompt": r.instruction, "chosen": "yes", "rejected": "no", "category": r.category}
        for r in make_records()
    ]
    for k in range(3):
        lines = "".join(json.dumps(row) + "\n" for row in rows[k::3])
        (tmp_path / f"pairs_{k}.jsonl").write_text(lines, encoding="utf-8")
    cfg = RunConfig()
    cfg.data.path, cfg.data.preference_path = "", str(tmp_path / "pairs_*.jsonl")
    cfg.data.heldout_per_category = 2
    cfg.partition.method, cfg.partition.num_clients = "files", 3
    prepared = prepare_preferences(cfg)
    trained = {prepared.train[i].prompt for part in prepared.parts for i in part}
    assert len(prepared.heldout) == 10
    assert len(trained) == len(rows) - 10
    assert not {p.prompt for p in prepared.heldout} & trained


def test_partition_cli_end_to_end(tmp_path: Path) -> None:
    data = write_records_jsonl(make_records(), tmp_path / "d.jsonl")
    app = typer.Typer()
    app.command()(partition)
    out = tmp_path / "parts"
    overrides = [f"data.path={data}", "partition.num_clients=4", "data.heldout_per_category=2"]
    args = ["--out", str(out)] + [a for o in overrides for a in ("--set", o)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    clients = [read_records(str(out / f"client_{i}.jsonl")) for i in range(4)]
    heldout = read_records(str(out / "heldout.jsonl"))
    assert len(heldout) == 10
    assert sum(map(len, clients)) + len(heldout) == sum(SIZES.values())
    assert "all" in (out / "partition_table.txt").read_text()
    assert (out / "partition_heatmap.png").stat().st_size > 0
    assert "client_" in result.output


def test_partition_cli_reports_data_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "x", "response": ""}) + "\n")
    app = typer.Typer()
    app.command()(partition)
    result = CliRunner().invoke(app, ["--out", str(tmp_path / "o"), "--set", f"data.path={bad}"])
    assert result.exit_code == 2
    assert "bad.jsonl:1: field 'response': empty" in result.output


# --- per-client files: N from the files, max_records, the client -> file map (issue 28) ----


def test_files_method_takes_num_clients_from_the_files(tmp_path: Path) -> None:
    from fedit.config import load_config

    pattern = write_client_files(make_records(), tmp_path)
    files = ["partition.method=files", f"data.path={json.dumps(pattern)}"]
    assert load_config(overrides=files).partition.num_clients == 3
    typed = load_config(overrides=[*files, "partition.num_clients=4"])  # kept; prepare refuses
    with pytest.raises(ConfigError, match="num_clients is 4 but data.path matches 3 files"):
        prepare_records(typed)


def test_files_method_honours_max_records(tmp_path: Path) -> None:
    records = make_records()
    cfg = RunConfig()
    cfg.data.path, cfg.data.max_records = write_client_files(records, tmp_path), 30
    cfg.data.heldout_per_category = 0
    cfg.partition.method, cfg.partition.num_clients = "files", 3
    prepared = prepare_records(cfg)
    assert len(prepared.train) == 30
    for k, part in enumerate(prepared.parts):  # each kept record stays with its file's client
        assert {prepared.train[i] for i in part} <= set(records[k::3])


def test_client_file_map_names_each_clients_file(tmp_path: Path) -> None:
    from fedit.data.prepare import client_file_map

    cfg = RunConfig()
    cfg.data.path = write_client_files(make_records(), tmp_path)
    cfg.partition.method, cfg.partition.num_clients = "files", 3
    assert client_file_map(cfg) == {
        str(k): {"data.path": str(tmp_path / f"client_{k}.jsonl")} for k in range(3)
    }
    cfg.partition.method = "iid"
    assert client_file_map(cfg) == {}


def test_skipped_records_of_every_file_are_named(tmp_path: Path) -> None:
    records = make_records()
    pattern = write_client_files(records, tmp_path)
    with (tmp_path / "client_1.jsonl").open("a") as f:
        f.write(json.dumps({"instruction": "q", "response": ""}) + "\n")
    cfg = RunConfig()
    cfg.data.path, cfg.data.on_bad_record = pattern, "skip"
    cfg.partition.method, cfg.partition.num_clients = "files", 3
    prepared = prepare_records(cfg)
    assert prepared.skipped == [
        f"{tmp_path / 'client_1.jsonl'}:{len(records[1::3]) + 1}: field 'response': empty"
    ]
    cfg.data.on_bad_record = "error"
    with pytest.raises(DataFormatError, match="field 'response': empty"):
        prepare_records(cfg)


def test_partition_cli_names_skipped_records(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    write_records_jsonl(make_records(), path)
    with path.open("a") as f:
        f.write(json.dumps({"instruction": "x", "response": ""}) + "\n")
    app = typer.Typer()
    app.command()(partition)
    sets = [f"data.path={path}", "data.on_bad_record=skip", "partition.num_clients=2"]
    result = CliRunner().invoke(
        app, ["--out", str(tmp_path / "o")] + [a for s in sets for a in ("--set", s)]
    )
    assert result.exit_code == 0, result.output
    line = (
        f"warning: skipped 1 bad records: {path}:{len(make_records()) + 1}: field 'response': empty"
    )
    assert line in result.output.replace("\n", "")

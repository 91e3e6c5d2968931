"""Preference pairs through the run's data path: synthetic pairs, split, partition, tokenising."""

import json
from pathlib import Path

from fedit.config import load_config
from fedit.data.preferences import synthetic_pairs
from fedit.data.prepare import prepare_preferences, prepare_records
from fedit.data.synthetic import generate_records
from fedit.engine.federation_data import prepare_data
from fedit.models.tiny import byte_tokenizer

BASE = [
    "data.path=synthetic",
    "data.preference_path=synthetic",
    "train.objective=sft_then_dpo",
    "dpo.sft_rounds=1",
    "data.synthetic_per_skill=6",
    "data.heldout_per_category=2",
    "partition.num_clients=4",
]


def test_synthetic_pairs_prefer_the_right_answer_deterministically() -> None:
    pairs = synthetic_pairs(3, seed=1)
    records = generate_records(3, seed=1)
    assert [(p.prompt, p.chosen, p.category) for p in pairs] == [
        (r.instruction, r.response, r.category) for r in records
    ]
    assert all(p.rejected != p.chosen for p in pairs)
    assert synthetic_pairs(3, seed=1) == pairs
    assert synthetic_pairs(3, seed=2) != pairs


def test_pairs_get_the_records_split_and_a_partition() -> None:
    cfg = load_config(None, BASE)
    prefs, records = prepare_preferences(cfg), prepare_records(cfg)
    # same seed and source records: the same prompts are held out from both objectives
    assert [p.prompt for p in prefs.heldout] == [r.instruction for r in records.heldout]
    assert len(prefs.heldout) == 2 * 10
    assert not {p.prompt for p in prefs.train} & {p.prompt for p in prefs.heldout}
    assert sorted(i for part in prefs.parts for i in part) == list(range(len(prefs.train)))
    # category shards: every client holds few skills (non-IID)
    assert all(len({prefs.train[i].category for i in part}) <= 4 for part in prefs.parts)


def test_files_method_reads_one_preference_file_per_client(tmp_path: Path) -> None:
    for k in range(2):
        rows = [{"prompt": f"q{k}{i}", "chosen": "yes", "rejected": "no"} for i in range(k + 2)]
        (tmp_path / f"client_{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(
        None,
        [
            f"data.preference_path={tmp_path}/client_*.jsonl",
            "train.objective=dpo",
            "partition.method=files",
            "partition.num_clients=2",
            "data.heldout_per_category=0",  # held out from files: test_partition.py
        ],
    )
    prepared = prepare_preferences(cfg)
    assert prepared.parts == [[0, 1], [2, 3, 4]] and prepared.heldout == []


def test_prepare_data_renders_prompts_and_counts_truncation() -> None:
    limits = ["data.max_seq_len=120", "dpo.max_prompt_len=100", "train.objective=dpo"]
    cfg = load_config(None, [*BASE[1:2], *BASE[4:], *limits])
    tokenizer = byte_tokenizer()
    data = prepare_data(cfg, tokenizer)
    assert data.clients == [] and len(data.pair_clients) == data.num_clients == 4
    pair = data.pair_clients[0][0]
    prompt = tokenizer.decode(pair.prompt_ids)
    assert prompt.endswith("### Response:\n")  # the alpaca template, cut from its start
    assert len(pair.prompt_ids) == 100
    report = data.pair_report
    assert report.total == sum(data.federated_pair_sizes) == len(prepare_preferences(cfg).train)
    # byte tokens: every rendered alpaca prompt is longer than 100, so each one is cut
    assert report.prompt_truncated == report.total and report.dropped == 0
    assert "prompts cut to dpo.max_prompt_len" in report.summary()
    assert all(len(p.prompt_ids) + len(p.chosen_ids) <= 120 for c in data.pair_clients for p in c)

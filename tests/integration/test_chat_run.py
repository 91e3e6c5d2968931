"""configs/chat.toml end to end on the tiny model: a federation on generated multi-turn
conversations, trained with the tokenizer's chat template (seconds)."""

import json
from pathlib import Path

from typer.testing import CliRunner

from fedit.cli.main import app

runner = CliRunner()
CHAT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "chat.toml"


def test_the_shipped_chat_config_trains_a_federation_on_conversations(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "chat"
    overrides = [
        f'output_dir="{run_dir}"',
        f'model.name_or_path="{tiny_model_dir}"',
        "lora.last_layers=1",
        "data.synthetic_per_skill=4",
        "data.max_seq_len=384",  # the byte tokenizer spends a token per byte
        "train.max_steps=2",
        "federation.rounds=2",
        "eval.every_rounds=1",
    ]
    args = ["train", "--quiet", "-c", str(CHAT_CONFIG)]
    for override in overrides:
        args += ["--set", override]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [0, 1, 2]
    assert lines[-1]["heldout"]["overall"]["loss"] < lines[0]["heldout"]["overall"]["loss"]
    assert all(client["label_tokens"] > 0 for client in lines[-1]["clients"])
    assert (run_dir / "round_0002" / "adapter_model.safetensors").is_file()

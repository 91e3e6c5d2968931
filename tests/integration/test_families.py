"""The model families people tune, each as a tiny random model built from its config:
fedit's loss equals the model's own, and a federated round runs with SFT, DPO and exact
LoRA aggregation (seconds per family)."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from fedit.cli.main import app
from fedit.client.batching import IGNORE_INDEX, collate
from fedit.client.loss import row_loss_sums
from fedit.config import ConfigError, LoraConfig, ModelConfig, load_config
from fedit.engine.simulation import Simulation
from fedit.models.adapters import attach_lora
from fedit.models.loading import load_model, quantization_config
from fedit.models.tiny import FAMILIES, byte_tokenizer, make_tiny_model
from tests.conftest import tiny_run_overrides

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(
        tmp_path_factory.mktemp(request.param), hidden_size=32, family=request.param
    )


def padded_batch(pad_id: int) -> dict[str, torch.Tensor]:
    """Three rows of different lengths, right-padded, prompts and padding carrying -100."""
    generator = torch.Generator().manual_seed(0)
    rows = []
    for length, prompt in [(12, 5), (7, 3), (10, 9)]:
        ids = torch.randint(3, 250, (length,), generator=generator).tolist()
        rows.append((ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return collate(rows, pad_id, torch.device("cpu"))


@pytest.mark.parametrize("labels_only", [True, False], ids=["labels-only", "all-logits"])
def test_loss_equals_the_models_own(family_dir: Path, labels_only: bool) -> None:
    model = load_model(ModelConfig(name_or_path=str(family_dir)))
    model = attach_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0), seed=0)
    model.eval()
    batch = padded_batch(model.config.pad_token_id)
    with torch.no_grad():
        sums, counts = row_loss_sums(model, batch, logits_on_labels_only=labels_only)
        expected = model(**batch).loss
    assert float(sums.sum() / counts.sum()) == pytest.approx(float(expected), abs=1e-5)


ROUNDS = {
    "sft": {},
    "dpo": {
        "data.path": "",
        "data.preference_path": "synthetic",
        "train.objective": "dpo",
        "data.max_seq_len": 160,
        "dpo.max_prompt_len": 128,
    },
    "sft-exact": {"strategy.lora_aggregation": "exact", "lora.dropout": 0.0},
}


@pytest.mark.parametrize("kind", sorted(ROUNDS))
def test_one_federated_round(family_dir: Path, tmp_path: Path, kind: str) -> None:
    overrides = {
        "federation.rounds": 1,
        "partition.num_clients": 2,
        "federation.clients_per_round": 2,
        "data.synthetic_per_skill": 4,
        "train.max_steps": 1,
        "train.grad_accum_steps": 1,
        **ROUNDS[kind],
    }
    cfg = load_config(None, tiny_run_overrides(family_dir, tmp_path / "run", **overrides))
    Simulation(cfg, show_progress=False).run()
    run_dir = tmp_path / "run"
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    round_one = json.loads(lines[-1])
    assert round_one["round"] == 1 and len(round_one["clients"]) == 2
    assert all(c["steps"] == 1 and math.isfinite(c["train_loss"]) for c in round_one["clients"])
    adapter = load_file(run_dir / "round_0001" / "adapter_model.safetensors")
    assert adapter and all(t.isfinite().all() for t in adapter.values())
    if kind == "sft-exact":  # W0 + R: each residual in its base weight's layout
        base = load_file(family_dir / "model.safetensors")
        residual = load_file(run_dir / "round_0001" / "base_residual.safetensors")
        assert residual
        for name, tensor in residual.items():
            base_name = name.removeprefix("base_model.model.").replace(".base_layer", "")
            assert tensor.shape == base[base_name].shape and tensor.isfinite().all(), name


def train_args(model_dir: Path, tmp_path: Path, **extra: object) -> list[str]:
    overrides = tiny_run_overrides(model_dir, tmp_path / "run", **{"federation.rounds": 1, **extra})
    return ["train", "--quiet", *[a for o in overrides for a in ("--set", o)]]


def one_line_error(args: list[str]) -> str:
    """`fedit` in-process: exit 2 and one error line, no traceback; that line."""
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Traceback" not in result.output and result.output.count("error:") == 1
    return " ".join(result.output.split())


def test_chat_template_on_a_model_without_one_is_one_line(tmp_path: Path) -> None:
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = None  # a base model's tokenizer, as GPT-2's or Pythia's
    model_dir = make_tiny_model(tmp_path / "base", hidden_size=32, tokenizer=tokenizer)
    line = one_line_error(train_args(model_dir, tmp_path, **{"data.template": "chat"}))
    assert (
        f"data.template = 'chat': the tokenizer of {model_dir} has no chat template; "
        "use data.template = 'alpaca', or a model that has one" in line
    )


@pytest.mark.parametrize("bits", [4, 8])
def test_quantised_loading_without_a_gpu_is_one_line(
    tiny_model_dir: Path, tmp_path: Path, bits: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(importlib.util, "find_spec", no_bitsandbytes(importlib.util.find_spec))
    line = one_line_error(train_args(tiny_model_dir, tmp_path, **{"model.load_in_bits": bits}))
    assert (
        f"model.load_in_bits = {bits} needs a CUDA GPU and the bitsandbytes package "
        '(pip install -e ".[gpu]"); this machine has no CUDA GPU (model.device: cpu) and '
        "no bitsandbytes" in line
    )


def test_quantised_loading_on_a_gpu_without_bitsandbytes_names_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", no_bitsandbytes(importlib.util.find_spec))
    cfg = ModelConfig(load_in_bits=4)
    with pytest.raises(ConfigError, match=r"this machine has no bitsandbytes$"):
        quantization_config(cfg, torch.device("cuda"), torch.bfloat16)


def no_bitsandbytes(find_spec):
    """importlib.util.find_spec as on a machine where bitsandbytes is not installed."""
    return lambda name, *args: None if name == "bitsandbytes" else find_spec(name, *args)

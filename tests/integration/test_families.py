"""The model families people tune, each as a tiny random model built from its config:
fedit's loss equals the model's own, and a federated round runs with SFT, DPO and exact
LoRA aggregation (seconds per family)."""

import json
from pathlib import Path

import pytest
import torch

from fedit.client.batching import IGNORE_INDEX, collate
from fedit.client.loss import row_loss_sums
from fedit.config import LoraConfig, ModelConfig, load_config
from fedit.engine.simulation import Simulation
from fedit.models.adapters import attach_lora
from fedit.models.loading import load_model
from fedit.models.tiny import FAMILIES, make_tiny_model
from tests.conftest import tiny_run_overrides


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and the tests share the CPU with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    metrics = [json.loads(line) for line in lines]
    assert metrics and all(
        isinstance(value, float) and value == value  # not NaN
        for row in metrics
        for key, value in row.items()
        if "loss" in key
    )

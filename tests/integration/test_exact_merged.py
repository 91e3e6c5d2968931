"""Exact LoRA aggregation at the level of the merged model, W_base + R + s·B·A per layer,
through the real simulation: the round's merged model is Σ_k p_k of the clients' own merged
models (GPT-2's Conv1D layers, stored transposed, included), and with mixed ranks a round
in which no client changes anything leaves the merged model as it was (FLoRA's fixed point).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from fedit.client.session import LocalClient
from fedit.config import RunConfig, load_config
from fedit.engine.checkpoint import load_checkpoint, round_dir
from fedit.engine.simulation import Simulation
from fedit.models.adapters import attach_lora, set_adapter_state, set_base_residual
from fedit.models.loading import load_model
from fedit.models.tiny import byte_tokenizer
from fedit.ops.ranks import global_at
from fedit.types import ClientUpdate
from tests.conftest import tiny_run_overrides

Merged = dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random GPT-2: Conv1D layers, c_attn (32 → 96) and c_fc (32 → 128) not square."""
    directory = tmp_path_factory.mktemp("tiny-gpt2")
    tokenizer = byte_tokenizer()
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def merged_weights(model: torch.nn.Module) -> Merged:
    """{LoRA module: W_base + its LoRA delta} in the base weight's own layout, as PEFT
    merges it (get_delta_weight transposes for fan_in_fan_out)."""
    return {
        name: (module.base_layer.weight + module.get_delta_weight("default")).detach()
        for name, module in model.named_modules()
        if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer")
    }


def record_clients(monkeypatch: pytest.MonkeyPatch, idle_from: int | None = None):
    """{round: [(n_k, client k's own merged model)]}, read off the shared model as each
    client finishes. From round `idle_from` on, every client sends back exactly the
    adapter it received."""
    seen: dict[int, list[tuple[int, Merged]]] = {}
    train = LocalClient.train

    def recording(self, model, global_state, task, train_cfg, show_progress=False):
        update = train(self, model, global_state, task, train_cfg, show_progress)
        assert isinstance(update, ClientUpdate)
        if idle_from is not None and task.round_number >= idle_from:
            update = ClientUpdate(
                update.client_id,
                {k: t.clone() for k, t in global_at(global_state, self.rank).items()},
                update.num_examples,
                update.num_steps,
                update.learning_rate,
                metrics=update.metrics,
            )
        set_adapter_state(model, update.state)
        seen.setdefault(task.round_number, []).append((update.num_examples, merged_weights(model)))
        return update

    monkeypatch.setattr(LocalClient, "train", recording)
    return seen


def global_merged(cfg: RunConfig, round_number: int) -> Merged:
    """The merged model a round's checkpoint stands for: W0 + R + s·B̄·Ā (round 0: W0)."""
    model = attach_lora(load_model(cfg.model), cfg.lora, cfg.seed)
    if round_number == 0:
        return merged_weights(model)  # B = 0
    checkpoint = load_checkpoint(model, round_dir(Path(cfg.output_dir), round_number), round_number)
    set_base_residual(model, {}, checkpoint.base_residual)
    set_adapter_state(model, checkpoint.global_state)
    return merged_weights(model)


def weighted_sum(clients: list[tuple[int, Merged]]) -> Merged:
    total = sum(n for n, _ in clients)
    return {key: sum(n / total * m[key] for n, m in clients) for key in clients[0][1]}


def assert_close(got: Merged, want: Merged, base: Merged, tolerance: float) -> None:
    """‖got − want‖ ≤ tolerance·‖want − W0‖ per layer: relative to what training moved."""
    assert got.keys() == want.keys()
    for key in got:
        moved = torch.linalg.norm(want[key] - base[key])
        error = float(torch.linalg.norm(got[key] - want[key]) / moved)
        assert error < tolerance, f"{key}: relative error {error:.3g}"


def exact_config(model_dir: Path, out: Path, **extra: object) -> RunConfig:
    overrides = {
        "strategy.lora_aggregation": "exact",
        "model.dtype": "float32",
        "federation.rounds": 2,
        "federation.clients_per_round": 3,
        "train.learning_rate": 5e-2,
        "lora.dropout": 0.0,
        "train.mixed_precision": "off",  # the clients' base weights as stored, not cast to bf16
        **extra,
    }
    return load_config(None, tiny_run_overrides(model_dir, out, **overrides))


def test_exact_aggregation_on_gpt2_conv1d_is_the_mean_of_the_clients_merged_models(
    tiny_gpt2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = record_clients(monkeypatch)
    cfg = exact_config(tiny_gpt2_dir, tmp_path / "gpt2")
    Simulation(cfg, show_progress=False).run()
    base = global_merged(cfg, 0)
    for round_number in (1, 2):
        want = weighted_sum(seen[round_number])
        assert_close(global_merged(cfg, round_number), want, base, 1e-4)


def test_an_idle_round_with_mixed_ranks_leaves_the_merged_model_as_it_was(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Round 1 trains ranks 1/2/4 of a rank-4 global adapter; in round 2 every client sends
    back what it received: the merged model must not move (it did by about half before:
    the low ranks trained on the truncated adapter)."""
    seen = record_clients(monkeypatch, idle_from=2)
    extra = {"lora.client_ranks": [1, 2, 4, 2, 4], "federation.clients_per_round": 5}
    cfg = exact_config(tiny_model_dir, tmp_path / "idle", **extra)
    Simulation(cfg, show_progress=False).run()
    base, first, second = (global_merged(cfg, n) for n in (0, 1, 2))
    assert_close(first, weighted_sum(seen[1]), base, 1e-4)  # FLoRA's stacked sum in a round
    for _, client in seen[2]:  # every client started from the global merged model
        assert_close(client, first, base, 1e-4)
    assert_close(second, first, base, 1e-4)

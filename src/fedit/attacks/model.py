"""Model-level attacks: what a malicious client sends instead of its honest update.

With x the global adapter and Δ = y − x the client's honestly trained delta:
sign_flip sends x − s·Δ (s = attack.flip_scale), scale sends x + λ·Δ (λ = attack.scale),
and gaussian sends x + N(0, σ²) per entry (σ = attack.noise_std; the honest Δ is
discarded: Blanchard et al., NeurIPS 2017, "Machine Learning with Adversaries: Byzantine
Tolerant Gradient Descent"). Only the adapter is attacked; record count, metrics and
strategy extras (SCAFFOLD's control delta) are sent as trained.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from fedit.attacks import malicious_clients
from fedit.config import MODEL_ATTACKS, AttackConfig, RunConfig
from fedit.ops.aggregation import add_scaled, subtract
from fedit.privacy.mechanism import gaussian_noise
from fedit.seeding import Stream, derive_seed
from fedit.types import AdapterState, ClientUpdate


@dataclass(frozen=True)
class ModelAttack:
    """What a malicious client needs to attack its updates: the attack and the run seed
    (the gaussian attack's noise is derived from it, per round and client)."""

    config: AttackConfig
    run_seed: int

    def seed(self, round_index: int, client_id: int) -> int:
        return derive_seed(self.run_seed, Stream.ATTACK, round_index, client_id)


def client_attack(cfg: RunConfig, client_id: int, num_clients: int) -> ModelAttack | None:
    """The model attack client ``client_id`` runs, or None: an honest client, or a data
    attack (that one acts on the records, fedit.attacks.data)."""
    if cfg.attack.kind not in MODEL_ATTACKS:
        return None
    if client_id not in malicious_clients(cfg, num_clients):
        return None
    return ModelAttack(cfg.attack, cfg.seed)


def attack_update(
    update: ClientUpdate, global_state: AdapterState, attack_cfg: AttackConfig, seed: int
) -> ClientUpdate:
    """A copy of ``update`` whose adapter is the attack's (in x's dtype); ``seed`` draws the
    gaussian attack's noise."""
    kind = attack_cfg.kind
    if kind == "gaussian":
        noise = gaussian_noise(global_state, attack_cfg.noise_std, seed)
        return replace(update, state=add_scaled(global_state, noise, 1.0))
    factors = {"sign_flip": -attack_cfg.flip_scale, "scale": attack_cfg.scale}
    if kind not in factors:
        raise ValueError(f"not a model attack: {kind!r}")
    delta = subtract(update.state, global_state)
    return replace(update, state=add_scaled(global_state, delta, factors[kind]))

"""A run's differential privacy, resolved once from its config and number of clients."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedit.config import ConfigError, RunConfig, clients_per_round
from fedit.fleet.devices import round_candidates
from fedit.privacy import accountant
from fedit.privacy.mechanism import noise_seed
from fedit.seeding import Stream


@dataclass(frozen=True)
class PrivacyPlan:
    """What the server and the clients need of ``[privacy]`` (fedit.config.PrivacyConfig),
    with δ and σ resolved.

    ``releases[r]`` is the plan's most releases of any one client after r rounds, what σ
    is searched for: r in central mode (every round is a release of the whole federation);
    in local mode the most rounds any one client is selected for among the first r (the
    selection is seeded by the run seed, so this is known in advance). The ε a run reports
    composes the releases made instead (``releases_made``).
    """

    mode: str  # "central" | "local"
    clip_norm: float  # C
    noise_multiplier: float  # σ
    delta: float
    sampled: int  # m: clients selected per round, the central mean's fixed denominator
    population: int  # N
    releases: tuple[int, ...]  # index r = rounds done
    run_seed: int
    reproducible_noise: bool
    accountant: str = "pld"  # "pld" | "rdp", see fedit.privacy.accountant
    target_epsilon: float | None = None

    @property
    def noise_std(self) -> float:
        """σC: the std of the noise on a sum (central) or on one client's update (local)."""
        return self.noise_multiplier * self.clip_norm

    def releases_made(self, rounds_done: int, asked: Mapping[int, int]) -> int:
        """The releases ε composes after ``rounds_done`` rounds: each round in central mode;
        in local mode the most rounds any one client was asked to train in (``asked``:
        {client: rounds}). A client releases at most once per round (fedit.client.releases)
        and only when asked, so this bounds what any one client released; a client that
        dropped or was rejected released less."""
        return rounds_done if self.mode == "central" else max(asked.values(), default=0)

    def epsilon(self, releases: int) -> float:
        """ε at δ after ``releases`` releases (``releases_made``) by the plan's accountant
        (see fedit.privacy.accountant)."""
        sampled, population = (self.sampled, self.population) if self.mode == "central" else (1, 1)
        return accountant.epsilon(
            self.noise_multiplier, releases, self.delta, sampled, population, self.accountant
        )

    def record(self, releases: int) -> dict[str, Any]:
        """The "privacy" entry of a round's metrics line, after ``releases`` releases."""
        return {
            "mode": self.mode,
            "epsilon": self.epsilon(releases),
            "releases": releases,
            "accountant": self.accountant,
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "clip_norm": self.clip_norm,
        }

    def noise_seed(self, stream: Stream, *keys: int) -> int:
        """The seed of one noise draw (see fedit.privacy.mechanism.noise_seed)."""
        return noise_seed(self.run_seed, self.reproducible_noise, stream, *keys)

    def describe(self) -> str:
        """One line for the console at the start of a run."""
        text = (
            f"privacy: {self.mode} DP-FedAvg, clip norm C = {self.clip_norm:g}, noise "
            f"multiplier σ = {self.noise_multiplier:.4g}, δ = {self.delta:.3g}, ε by "
            f"{self.accountant.upper()}"
        )
        if self.target_epsilon is not None:
            rounds = len(self.releases) - 1
            text += f" (σ searched for ε ≤ {self.target_epsilon:g} after {rounds} rounds)"
        if self.reproducible_noise:
            text += "; reproducible_noise: the noise can be recomputed from the config"
        return text


def resolve_plan(cfg: RunConfig, num_clients: int) -> PrivacyPlan | None:
    """The run's PrivacyPlan, or None with privacy.mode = "off". With target_epsilon, σ is
    the accountant's search for federation.rounds rounds (seconds; cached per process)."""
    privacy, fed = cfg.privacy, cfg.federation
    if privacy.mode == "off":
        return None
    if privacy.delta is None and num_clients < 2:
        raise ConfigError("privacy.delta: the default 1/N² is 1 with one client; set delta")
    delta = privacy.delta if privacy.delta is not None else 1.0 / num_clients**2
    sampled = clients_per_round(num_clients, fed.clients_per_round, fed.fraction)
    if privacy.mode == "central":
        releases = tuple(range(fed.rounds + 1))
        accounted = (sampled, num_clients)
    else:
        releases = local_releases(num_clients, cfg)
        accounted = (1, 1)
    sigma = privacy.noise_multiplier
    if sigma is None:
        try:
            sigma = accountant.noise_for_target(
                privacy.target_epsilon, releases[-1], delta, *accounted, privacy.accountant
            )
        except ValueError as err:
            raise ConfigError(f"privacy.target_epsilon: {err}") from None
    return PrivacyPlan(
        mode=privacy.mode,
        clip_norm=privacy.clip_norm,
        noise_multiplier=sigma,
        delta=delta,
        sampled=sampled,
        population=num_clients,
        releases=releases,
        run_seed=cfg.seed,
        reproducible_noise=privacy.reproducible_noise,
        accountant=privacy.accountant,
        target_epsilon=privacy.target_epsilon,
    )


def client_plan(cfg: RunConfig, num_clients: int) -> PrivacyPlan | None:
    """The plan a client needs: local DP's, or None (central noise is the server's)."""
    return resolve_plan(cfg, num_clients) if cfg.privacy.mode == "local" else None


def local_releases(num_clients: int, cfg: RunConfig) -> tuple[int, ...]:
    """[0, then after each round r the most rounds any one client was selected for]."""
    counts = [0] * num_clients
    releases = [0]
    for r in range(cfg.federation.rounds):
        for k in round_candidates(cfg, num_clients, cfg.seed, r):
            counts[k] += 1
        releases.append(max(counts))
    return tuple(releases)


def selection_seed(cfg: RunConfig) -> int:
    """The seed of the round's client selection. The run seed, except under central DP
    without reproducible noise: amplification by subsampling holds only against an observer
    who does not know who was sampled, and the run seed is in the config, so the selection
    is then drawn from a secret seed (from the OS, once per process: a resumed run selects
    afresh for the rounds it still has to train, which the accountant allows)."""
    privacy = cfg.privacy
    if privacy.mode == "central" and not privacy.reproducible_noise:
        return secrets.randbits(63)
    return cfg.seed

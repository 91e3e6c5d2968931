"""A rule of fedit.config.rules, and what several rules ask of a config."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

from fedit.config.federation import clients_per_round
from fedit.config.fields import ConfigError

if TYPE_CHECKING:
    from fedit.config.run import RunConfig

# train: `fedit train`'s in-process simulation (and `fedit compare`'s runs); coordinate: a
# deployment across machines; simulate-ray: Flower's simulation runtime on Ray;
# personalize: `fedit personalize`
Engine = Literal["train", "coordinate", "simulate-ray", "personalize"]
ENGINES: tuple[str, ...] = get_args(Engine)


@dataclass(frozen=True)
class Rule:
    """One refusal: when `applies` holds of a config, it is refused because of `why`."""

    keys: tuple[str, ...]  # the fields its error names, the first where it is reported
    applies: Callable[[RunConfig], bool]
    why: str | Callable[[RunConfig], str]
    engines: frozenset[str] = frozenset()  # none: every run
    name: str = ""  # only where two rules name the same fields for the same engines

    @property
    def id(self) -> str:
        """What tells it from every other rule: its fields and engines, or its name."""
        engines = f" [{', '.join(sorted(self.engines))}]" if self.engines else ""
        return self.name or " x ".join(self.keys) + engines

    def error(self, cfg: RunConfig) -> ConfigError:
        why = self.why if isinstance(self.why, str) else self.why(cfg)
        return ConfigError(f"{self.keys[0]}: {why}")


MIXED = "mixed LoRA ranks (lora.client_ranks or rank_tiers)"
SECAGG = "with secagg.enabled: the coordinator sees only the sum"
MESSAGING = frozenset({"coordinate", "simulate-ray"})  # engines reaching clients as messages


def baseline(c: RunConfig) -> bool:
    return c.federation.mode != "federated"


def known_clients(c: RunConfig) -> bool:
    """Whether partition.num_clients is the population (with "files", the files count)."""
    return c.partition.method != "files"


def sampled(c: RunConfig, num_clients: int | None = None) -> int:
    """How many clients a round selects."""
    fed = c.federation
    n = c.partition.num_clients if num_clients is None else num_clients
    return clients_per_round(n, fed.clients_per_round, fed.fraction)


def mixed_ranks(c: RunConfig) -> bool:
    return bool(c.lora.client_ranks or c.lora.rank_tiers)


def holders(c: RunConfig) -> bool:
    return mixed_ranks(c) and c.strategy.rank_aggregation == "holders"


def shared_a(c: RunConfig) -> bool:
    return c.lora.shared != "all"


def exact(c: RunConfig) -> bool:
    return c.strategy.lora_aggregation == "exact"


def secagg_levels(c: RunConfig) -> int:
    return (2**c.secagg.bits - 1) // sampled(c)  # fedit.deploy.secagg.crypto.RoundParams


def one_per_client(key: str) -> Rule:
    """A list of `key` with one entry per client, when the number of clients is known."""
    section, name = key.split(".")

    def values(c: RunConfig) -> list:
        return getattr(getattr(c, section), name)

    return Rule(
        (key, "partition.num_clients"),
        lambda c: (
            known_clients(c) and bool(values(c)) and len(values(c)) != c.partition.num_clients
        ),
        lambda c: (
            f"lists {len(values(c))} clients, partition.num_clients is {c.partition.num_clients}"
        ),
    )

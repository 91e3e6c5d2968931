"""[privacy], [attack] and [validation]: differential privacy, the attacks of robustness
experiments, and the checks every client update passes."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedit.config.fields import require

PRIVACY_MODES = ("off", "central", "local")
PRIVACY_ACCOUNTANTS = ("pld", "rdp")


@dataclass
class PrivacyConfig:
    """Client-level differential privacy, DP-FedAvg (McMahan et al., ICLR 2018), see
    fedit.privacy. Each client's round delta Δ_k is clipped to L2 norm ``clip_norm`` (C)
    over all adapter tensors, and Gaussian noise of std ``noise_multiplier`` · C (σC) is
    added: "central" by the server to the sum of the sampled clients' clipped Δ_k (then
    divided by the planned number of sampled clients), "local" by each client to its own
    clipped Δ_k before it is sent. Set ``noise_multiplier`` or ``target_epsilon`` (σ is then
    searched so that ε after federation.rounds rounds is at most the target at ``delta``).
    ``delta`` unset: 1/N² for N clients. ``reproducible_noise`` derives the noise seed
    (and, central, the client selection) from the run seed: anyone who has the config can
    then subtract the noise, so it is for experiments and tests only. ``accountant`` computes
    ε (and σ for a target): "pld", privacy loss distributions, the tighter valid bound, or
    "rdp", Rényi DP (fedit.privacy.accountant).
    """

    mode: str = "off"  # off | central | local
    clip_norm: float = 1.0  # C
    noise_multiplier: float | None = None  # σ; or set target_epsilon
    # ε after federation.rounds rounds; σ is searched so that ε ≤ it (or set noise_multiplier)
    target_epsilon: float | None = None
    delta: float | None = None  # unset: 1 / N² (N = number of clients)
    # derive the noise seed (and, central, the client selection) from the run seed: for experiments
    # and tests only, it voids the guarantee against anyone who has the config
    reproducible_noise: bool = False
    accountant: str = "pld"  # pld | rdp

    def validate(self) -> None:
        require(
            self.mode in PRIVACY_MODES, "privacy.mode", f"must be one of {', '.join(PRIVACY_MODES)}"
        )
        require(
            self.accountant in PRIVACY_ACCOUNTANTS,
            "privacy.accountant",
            f"must be one of {', '.join(PRIVACY_ACCOUNTANTS)}",
        )
        require(self.clip_norm > 0, "privacy.clip_norm", "must be positive")
        require(
            self.noise_multiplier is None or self.noise_multiplier > 0,
            "privacy.noise_multiplier",
            "must be positive or unset",
        )
        require(
            self.target_epsilon is None or self.target_epsilon > 0,
            "privacy.target_epsilon",
            "must be positive or unset",
        )
        require(
            self.delta is None or 0 < self.delta < 1, "privacy.delta", "must be in (0, 1) or unset"
        )
        if self.mode == "off":
            return
        require(
            (self.noise_multiplier is None) != (self.target_epsilon is None),
            "privacy.noise_multiplier",
            f"privacy.mode = {self.mode!r} needs exactly one of noise_multiplier and "
            "target_epsilon (the other is then computed)",
        )


ATTACK_KINDS = ("none", "sign_flip", "scale", "gaussian", "poison_responses", "backdoor")
MODEL_ATTACKS = ("sign_flip", "scale", "gaussian")  # on the update a client sends
DATA_ATTACKS = ("poison_responses", "backdoor")  # on the records a client trains on


@dataclass
class AttackConfig:
    """Malicious clients for robustness experiments (fedit.attacks), off by default.

    The malicious set is ``clients`` (ids), or ``ceil(fraction · N)`` clients drawn by a
    permutation seeded by the run seed. With Δ = y − x a malicious client's honestly
    trained delta, the model attacks send x − flip_scale·Δ (sign_flip), x + scale·Δ
    (scale) or x + N(0, noise_std²) per entry (gaussian, Δ discarded); the data attacks
    change ``poison_fraction`` of its records before tokenisation: the response becomes
    ``target`` (poison_responses), or the instruction gets ``trigger`` prepended too
    (backdoor). A kind other than none with no malicious client is a clean run that still
    reports the data attacks' success metrics (the clean reference).
    """

    kind: str = "none"  # none | sign_flip | scale | gaussian | poison_responses | backdoor
    clients: list[int] = field(default_factory=list)  # malicious client ids; or set fraction
    fraction: float = 0.0  # ceil(fraction * N) malicious clients, drawn with the run seed
    flip_scale: float = 1.0  # sign_flip: x - flip_scale * delta
    scale: float = 10.0  # scale: x + scale * delta
    noise_std: float = 0.01  # gaussian: x + N(0, noise_std^2) per entry
    target: str = "I cannot answer that."  # poison_responses, backdoor: the planted response
    trigger: str = "cf"  # backdoor: prepended to the instruction ("cf " + instruction)
    poison_fraction: float = 1.0  # of a malicious client's records poisoned (seeded choice)

    def validate(self) -> None:
        require(
            self.kind in ATTACK_KINDS, "attack.kind", f"must be one of {', '.join(ATTACK_KINDS)}"
        )
        require(
            self.kind != "none" or (not self.clients and self.fraction == 0),
            "attack.kind",
            "is 'none' (no attack kind) but attack.clients or attack.fraction is set",
        )
        require(
            not (self.clients and self.fraction),
            "attack.clients",
            "set clients or fraction, not both",
        )
        require(all(k >= 0 for k in self.clients), "attack.clients", "ids must be >= 0")
        repeated = sorted({k for k in self.clients if self.clients.count(k) > 1})
        require(not repeated, "attack.clients", f"lists {repeated} more than once")
        require(0 <= self.fraction < 1, "attack.fraction", "must be in [0, 1)")
        for name in ("flip_scale", "scale", "noise_std"):
            require(getattr(self, name) > 0, f"attack.{name}", "must be positive")
        require(0 < self.poison_fraction <= 1, "attack.poison_fraction", "must be in (0, 1]")
        require(bool(self.target.strip()), "attack.target", "must not be empty")
        require(bool(self.trigger.strip()), "attack.trigger", "must not be empty")


@dataclass
class ValidationConfig:
    """Checks every client update passes before aggregation, in every engine
    (fedit.server.validation; keys, shapes, dtypes and finiteness are always checked)."""

    # reject an update whose ‖y_k − x‖ (L2 over all adapter tensors) is larger; None: no bound
    max_update_norm: float | None = None
    # the most records an update may claim (its FedAvg weight); set it to what the largest
    # data owner holds so that no client can outweigh the others by a made-up count
    max_examples: int = 10**9

    def validate(self) -> None:
        require(
            self.max_update_norm is None or self.max_update_norm > 0,
            "validation.max_update_norm",
            "must be positive (or unset for no bound)",
        )
        require(self.max_examples >= 1, "validation.max_examples", "must be >= 1")

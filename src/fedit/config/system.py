"""[compression] and [system]: how an upload is encoded, and the simulated devices."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from fedit.config.fields import require
from fedit.plugins import CODECS


@dataclass
class CompressionConfig:
    """How a client's upload Δ = y − x is encoded (fedit.compression), in both engines:
    ``upload`` none (float32) | bf16 | int8 (per-slice absmax) | topk (the
    ⌈topk_fraction·n⌉ largest entries of each tensor). With ``error_feedback`` a lossy
    codec sends Δ + e and the client keeps what it dropped, e, for its next round.
    Downloads stay float32: the global adapter is the point every client's Δ is taken
    from, so both ends must hold it bit for bit."""

    upload: str = "none"  # none (float32 y_k) | bf16 | int8 (per-slice absmax) | topk
    # topk: the ⌈topk_fraction·n⌉ largest-|v| entries of each tensor are sent
    topk_fraction: float = 0.1
    # a lossy codec sends Δ + e and the client keeps e, what it dropped, for its next round
    error_feedback: bool = True

    def validate(self) -> None:
        require(self.upload in CODECS, "compression.upload", f"must be one of {', '.join(CODECS)}")
        require(0 < self.topk_fraction <= 1, "compression.topk_fraction", "must be in (0, 1]")

    @property
    def encoded(self) -> bool:
        """Whether uploads are encoded at all ("none": plain float32)."""
        return self.upload != "none"

    @property
    def memory(self) -> bool:
        """Whether clients keep an error-feedback memory (a lossy codec with feedback on)."""
        return self.encoded and self.error_feedback


@dataclass
class SystemConfig:
    """Simulated devices (fedit.fleet.devices), simulation only. Each client gets a device
    once per run, drawn from the run seed: a compute speed (a step takes step_seconds /
    speed) and a link bandwidth, log-normal around 1 and bandwidth_mbps with the given σ of
    their logarithms, or listed per client (``speeds``, ``bandwidths_mbps``); and its
    availability, 1 − dropout or listed (``availabilities``), the chance it is online in a
    round. A selected client that is offline, or whose simulated time (download, its steps,
    upload) passes ``deadline``, is dropped without training. Every round's metrics line
    gets its simulated seconds and the clock so far."""

    enabled: bool = False  # simulated devices on (simulation only)
    step_seconds: float = 1.0  # a speed-1 device's seconds per optimizer step
    speed_spread: float = 0.0  # σ of ln(speed) across clients (0: all alike)
    bandwidth_mbps: float = 20.0  # median link, megabits per second each way
    bandwidth_spread: float = 0.0  # σ of ln(bandwidth)
    dropout: float = 0.0  # probability that a client is offline in a round
    deadline: float = 0.0  # simulated seconds a round waits for replies (0: for all of them)
    speeds: list[float] = field(default_factory=list)  # per client, instead of the draw
    bandwidths_mbps: list[float] = field(default_factory=list)  # per client, instead of the draw
    availabilities: list[float] = field(default_factory=list)  # per client, instead of dropout

    def validate(self) -> None:
        for name in ("step_seconds", "bandwidth_mbps"):
            value = getattr(self, name)
            require(math.isfinite(value) and value > 0, f"system.{name}", "must be positive")
        for name in ("speed_spread", "bandwidth_spread", "deadline"):
            value = getattr(self, name)
            require(math.isfinite(value) and value >= 0, f"system.{name}", "must be >= 0")
        require(0 <= self.dropout < 1, "system.dropout", "must be in [0, 1)")
        for name in ("speeds", "bandwidths_mbps"):
            require(
                all(math.isfinite(v) and v > 0 for v in getattr(self, name)),
                f"system.{name}",
                "must be positive",
            )
        require(
            all(0 < a <= 1 for a in self.availabilities),
            "system.availabilities",
            "must be in (0, 1]",
        )
        require(
            not (self.availabilities and self.dropout),
            "system.availabilities",
            "set availabilities or dropout, not both",
        )

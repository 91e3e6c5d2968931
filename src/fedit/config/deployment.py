"""[deploy] and [secagg]: the deployment across machines and its secure aggregation."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from fedit.config.fields import require

# HOST:PORT with HOST a name, an IPv4 address or a bracketed IPv6 address ("[::]:9443")
ADDRESS_PATTERN = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):(?P<port>\d{1,5})")


@dataclass
class DeployConfig:
    """The deployment across machines on Flower (`fedit coordinate`, docs/design/deployment.md
    §2.9). Unused by simulations: an empty ``clients`` list means no deployment.

    ``clients`` is the roster, the data owners' public-key files: client id k is the index in
    this list (the SuperLink's node ids are looked up by key, never trusted for identity), so
    it may not change under --resume.
    """

    fleet_address: str = "0.0.0.0:9443"  # the fleet front: the only address bound beyond loopback
    certs_dir: str = "pki"  # ca.pem, server.pem, server.key (from `fedit certs ca`)
    clients: list[str] = field(default_factory=list)  # public-key files; client id = index
    round_timeout: float = 1800.0  # seconds a round waits for replies
    # seconds a round first waits for min_replies of its clients to be online (owners start
    # late, restart, reconnect after an outage); round_timeout counts from then
    join_timeout: float = 600.0
    min_replies: int = 1  # fewer valid updates: the round stops, --resume retries it
    insecure: bool = False  # plaintext, no node authentication: for tests on one machine

    def validate(self) -> None:
        found = ADDRESS_PATTERN.fullmatch(self.fleet_address)
        require(
            found is not None and 1 <= int(found.group("port")) <= 65535,
            "deploy.fleet_address",
            f"expected HOST:PORT with PORT in [1, 65535], got {self.fleet_address!r}",
        )
        require(bool(self.certs_dir), "deploy.certs_dir", "must not be empty")
        require(all(self.clients), "deploy.clients", "must not hold an empty path")
        repeated = sorted({c for c in self.clients if self.clients.count(c) > 1})
        require(
            not repeated,
            "deploy.clients",
            f"lists {', '.join(repeated)} more than once (one key, one client id)",
        )
        require(self.round_timeout > 0, "deploy.round_timeout", "must be positive")
        require(self.join_timeout >= 0, "deploy.join_timeout", "must be >= 0")
        require(self.min_replies >= 1, "deploy.min_replies", "must be >= 1")
        require(
            not self.clients or self.min_replies <= len(self.clients),
            "deploy.min_replies",
            f"must be <= the number of deploy.clients ({len(self.clients)})",
        )


@dataclass
class SecAggConfig:
    """Secure aggregation in deployments (SecAgg+, Bell et al. CCS 2020; fedit.deploy.secagg,
    docs/design/deployment.md §7): the coordinator learns only the sum of the round's
    surviving clients' vectors, w_k·Δ_k with w_k = n_k (weighting "examples", the n_k summed
    alongside) or 1 ("uniform"). Every entry is clipped to [-clip_range, clip_range] and
    quantised; the sums live in Z_{2^bits}. Each client shares its secrets among its
    ``neighbours`` k (0: every other client of the round) and itself, any ``threshold`` t of
    those k + 1 rebuild them (0: a strict majority, ⌊(k+1)/2⌋ + 1)."""

    enabled: bool = False  # secure aggregation on (deployments only, fedit coordinate)
    bits: int = 32  # the sums live in Z_{2^bits}
    clip_range: float = 1.0  # c: bound on every entry of w_k·Δ_k
    neighbours: int = 0  # k, even (a Harary graph); 0: all (SecAgg's complete graph)
    threshold: int = 0  # t; 0: ⌊(k+1)/2⌋ + 1
    stage_timeout: float = 120.0  # seconds for each stage without training (keys, unmask)

    def validate(self) -> None:
        require(16 <= self.bits <= 62, "secagg.bits", "must be in [16, 62]")
        require(
            math.isfinite(self.clip_range) and self.clip_range > 0,
            "secagg.clip_range",
            "must be a finite number > 0",
        )
        require(
            self.neighbours == 0 or (self.neighbours >= 2 and self.neighbours % 2 == 0),
            "secagg.neighbours",
            "must be 0 (every other client) or an even number >= 2 (each client is joined to "
            "k/2 clients on either side of a ring: SecAgg+'s Harary graph)",
        )
        require(
            self.threshold == 0 or self.threshold >= 2,
            "secagg.threshold",
            "must be 0 (a majority) or >= 2 (a threshold of 1 hands every holder the secret)",
        )
        if self.neighbours and self.threshold:
            holders = self.neighbours + 1
            require(
                holders / 2 < self.threshold <= holders,
                "secagg.threshold",
                f"must be in ({holders / 2:g}, {holders}]: more than half of a client's "
                f"{holders} shareholders (its neighbours and itself), SecAgg+'s guidance",
            )
        require(self.stage_timeout > 0, "secagg.stage_timeout", "must be positive")

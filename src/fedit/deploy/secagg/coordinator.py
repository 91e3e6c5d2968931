"""The coordinator's side of a secure-aggregation round (docs/design/deployment.md §7).

``SecureRound.run`` takes FlowerRunner's place for a round of a run with secagg.enabled:
four stages over the same delivery (``FlowerRunner.deliver``), each a message to every
client still in the protocol and its reply, then the unmasking, which yields only
Σ w_k Δ_k / Σ w_k over the clients whose masked inputs arrived (``SecureAggregate``).

Who is in: U1 answered the keys stage, U2 the shares stage (and its shares are with its
neighbours), U3 sent a masked input (its update is in the sum), U4 answered the unmask
stage. A client that leaves after U2 has its pairwise masks removed through its mask key,
rebuilt from t of its neighbours' shares (when a survivor masked with it: otherwise none of
its masks is in the sum); every client of U3 has its self mask removed through b, rebuilt
the same way, so a client may also leave after sending its input.
Any step that cannot be completed (fewer than t or deploy.min_replies clients left, a
secret with fewer than t shares) stops the run with SecureAggregationError before
anything of the round is committed.
"""

from __future__ import annotations

import time
from typing import Protocol

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flwr.app import RecordDict

from fedit.config import RunConfig
from fedit.deploy.secagg import crypto, stages
from fedit.deploy.secagg.crypto import RoundParams, SecAggError
from fedit.deploy.secagg.stages import KEYS, MASKED, SHARES, UNMASK
from fedit.engine.runner import RoundPlan, RoundReplies, SecureAggregate
from fedit.errors import RunStopped
from fedit.protocol import wire
from fedit.protocol.traffic import task_content
from fedit.seeding import Stream, derive_seed
from fedit.types import AdapterState, ClientTask, Rejection

STAGE_NAMES = {KEYS: "secagg keys", SHARES: "secagg shares", MASKED: "secagg masked input"}
STAGE_NAMES[UNMASK] = "secagg unmask"


class SecureAggregationError(RunStopped):
    """A secure round cannot be completed: nothing of it is committed."""

    def __init__(self, round_number: int, why: str, missing: list[Rejection]) -> None:
        listed = "; ".join(f"client {r.client_id}: {r.reason}" for r in missing) or "none"
        super().__init__(
            f"round {round_number}: secure aggregation stopped: {why} (left the round: "
            f"{listed}); the rounds before it are saved: bring the owners back and continue "
            "with --resume"
        )


class StageRunner(Protocol):
    """What a secure round needs of the coordinator's runner (FlowerRunner), declared here
    so this side never imports the role that drives it: the run's config, adapter shapes
    and header, and the delivery of one stage's messages to the online clients' nodes."""

    cfg: RunConfig
    shapes: dict[str, tuple[int, ...]]
    header: wire.RunHeader

    def deliver(
        self,
        contents: dict[int, RecordDict],
        nodes: dict[int, int],
        message_type: str,
        round_number: int,
        deadline: float,
        replies: RoundReplies,
        stage: str = "",
    ) -> dict[int, RecordDict]: ...


class SecureRound:
    """One secure round for the clients of `plan` that are online (`nodes`)."""

    def __init__(
        self,
        runner: StageRunner,
        plan: RoundPlan,
        global_state: AdapterState,
        nodes: dict[int, int],
        replies: RoundReplies,
    ) -> None:
        self.runner, self.plan, self.global_state = runner, plan, global_state
        self.nodes, self.replies = nodes, replies
        self.cfg = runner.cfg
        self.round_number = plan.round_index + 1
        config = self.cfg.secagg
        self.params = RoundParams(config.bits, config.clip_range, len(plan.tasks))
        self.weighted = self.cfg.strategy.weighting == "examples"
        self.length = crypto.vector_length(runner.shapes, self.weighted)

    def run(self, tasks: list[ClientTask], deadline: float) -> RoundReplies:
        """The four stages, the unmasking; `replies` with the aggregate (and who left)."""
        keys = self._keys([t.client_id for t in tasks])
        alive = sorted(keys)
        degree = crypto.round_degree(self.cfg.secagg.neighbours, len(alive))
        self.threshold = crypto.round_threshold(self.cfg.secagg.threshold, degree)
        self._require(alive, "the keys stage")
        seed = derive_seed(self.cfg.seed, Stream.SECAGG_GRAPH, self.plan.round_index)
        graph = crypto.neighbours(alive, degree, seed)
        outbox, digests = self._shares(graph, keys)
        self._require(sorted(digests), "the shares stage")
        inputs, masked_with, metrics = self._masked(tasks, graph, outbox, deadline)
        self._require(sorted(inputs), "the masked-input stage")
        b_shares, sk_shares = self._unmask(masked_with, inputs.keys())
        total = self._unmasked(inputs, masked_with, keys, digests, b_shares, sk_shares)
        self.replies.aggregate = self._aggregate(total, metrics, degree)
        return self.replies

    # ---- the stages ----

    def _stage(self, stage: str, contents: dict[int, RecordDict], deadline: float | None = None):
        """Deliver one stage's messages; the replies' contents by client."""
        if deadline is None:
            deadline = time.monotonic() + self.cfg.secagg.stage_timeout
        return self.runner.deliver(
            contents,
            self.nodes,
            stage,
            self.round_number,
            deadline,
            self.replies,
            STAGE_NAMES[stage],
        )

    def _request(self, stage: str, k: int, **fields) -> RecordDict:
        header = self.runner.header
        return stages.encode_request(stage, header, self.round_number, k, **fields)

    def _decoded(self, stage: str, k: int, content: RecordDict, decode=None) -> object | None:
        """A reply's fields (`decode`, by default stages.decode_reply of the stage), or
        None with the client listed as rejected."""
        try:
            answer = decode(content) if decode else stages.decode_reply(stage, content)
        except wire.WireError as err:
            self._reject(k, f"malformed reply: {err}", stage)
            return None
        if isinstance(answer, wire.ReplyStatus):
            self._reject(k, f"{answer.outcome}: {answer.reason}", stage)
            return None
        return answer

    def _reject(self, k: int, reason: str, stage: str) -> None:
        self.replies.rejected.append(Rejection(k, f"{reason} ({STAGE_NAMES[stage]})"))

    def _keys(self, clients: list[int]) -> dict[int, tuple[bytes, bytes]]:
        """(a) every client's two public keys (share encryption, pairwise masks)."""
        sampled = self.params.sampled
        contents = {k: self._request(KEYS, k, sampled=sampled) for k in clients}
        keys = {}
        for k, content in self._stage(KEYS, contents).items():
            fields = self._decoded(KEYS, k, content)
            if fields is None:
                continue
            if not all(map(crypto.usable_public_key, (fields["enc_key"], fields["mask_key"]))):
                self._reject(k, "malformed reply: secagg: a public key of low order", KEYS)
                continue
            keys[k] = (fields["enc_key"], fields["mask_key"])
        return keys

    def _shares(self, graph, keys):
        """(b) each client its neighbours' keys; back, its encrypted shares for each of
        them and its commitment to b. ({sender: {receiver: ciphertext}}, {sender: digest})."""
        contents = {
            u: self._request(
                SHARES,
                u,
                neighbours=near,
                enc_keys=[keys[v][0] for v in near],
                mask_keys=[keys[v][1] for v in near],
            )
            for u, near in graph.items()
        }
        outbox, digests = {}, {}
        for u, content in self._stage(SHARES, contents).items():
            fields = self._decoded(SHARES, u, content)
            if fields is None:
                continue
            if fields["receivers"] != graph[u]:
                self._reject(u, "malformed reply: secagg.receivers: not its neighbours", SHARES)
                continue
            outbox[u] = dict(zip(fields["receivers"], fields["ciphertexts"], strict=True))
            digests[u] = fields["b_digest"]
        return outbox, digests

    def _masked(self, tasks, graph, outbox, deadline):
        """(c) each client that shared its secrets its task and the shares addressed to it;
        back, its masked input. ({client: vector}, {client: neighbours it masked with},
        {client: plaintext metrics})."""
        contents, masked_with = {}, {}
        for task in tasks:
            u = task.client_id
            if u not in outbox:
                continue
            senders = [v for v in graph[u] if v in outbox]
            content = task_content(task, self.global_state, self.runner.header)
            request = self._request(
                MASKED, u, senders=senders, ciphertexts=[outbox[v][u] for v in senders]
            )
            content[stages.SECAGG] = request[stages.SECAGG]
            contents[u], masked_with[u] = content, senders
        inputs, metrics = {}, {}
        bits, objective = self.params.bits, self.plan.objective

        def decode(content):
            return stages.decode_masked(content, self.length, bits, objective)

        for u, content in self._stage(MASKED, contents, deadline).items():
            answer = self._decoded(MASKED, u, content, decode)
            if answer is not None:
                inputs[u], metrics[u] = answer
        return inputs, masked_with, metrics

    def _unmask(self, masked_with, survivors):
        """(d) each survivor who of its neighbours survived and who dropped; back, b's shares
        of the former and the mask key's shares of the latter. ({owner: [b shares]},
        {owner: [mask key shares]})."""
        asked = {}
        for u in survivors:
            near = masked_with[u]
            asked[u] = (
                [u] + [v for v in near if v in survivors],
                [v for v in near if v not in survivors],
            )
        contents = {
            u: self._request(UNMASK, u, survivors=alive, dropped=gone)
            for u, (alive, gone) in asked.items()
        }
        b_shares: dict[int, list[bytes]] = {}
        sk_shares: dict[int, list[bytes]] = {}
        for u, content in self._stage(UNMASK, contents).items():
            fields = self._decoded(UNMASK, u, content)
            if fields is None:
                continue
            alive, gone = asked[u]
            if len(fields["b_shares"]) != len(alive) or len(fields["sk_shares"]) != len(gone):
                self._reject(u, "malformed reply: secagg: not one share per client asked", UNMASK)
                continue
            for v, share in zip(alive, fields["b_shares"], strict=True):
                b_shares.setdefault(v, []).append(share)
            for v, share in zip(gone, fields["sk_shares"], strict=True):
                sk_shares.setdefault(v, []).append(share)
        return b_shares, sk_shares

    # ---- unmasking ----

    def _unmasked(self, inputs, masked_with, keys, digests, b_shares, sk_shares) -> np.ndarray:
        """Σ of the survivors' inputs with every mask removed (mod 2**bits)."""
        bits, length = self.params.bits, self.length
        total = np.zeros(length, dtype=np.uint64)
        for vector in inputs.values():
            total = crypto.add(total, vector, bits)
        for u in inputs:
            b = self._rebuild(
                u, "self mask", b_shares, lambda s, u=u: crypto.digest(s) == digests[u]
            )
            total = crypto.add(total, crypto.negate(crypto.prg(b, length, bits), bits), bits)
        for v in self._paired_dropouts(inputs, masked_with):
            secret = self._rebuild(
                v, "mask key", sk_shares, lambda s, v=v: crypto.mask_key_matches(s, keys[v][1])
            )
            key = X25519PrivateKey.from_private_bytes(secret)
            for w in inputs:
                if v in masked_with[w]:
                    seed = crypto.mask_seed(key, keys[w][1])
                    mask = crypto.pair_mask(seed, w, v, length, bits)
                    total = crypto.add(total, crypto.negate(mask, bits), bits)
        return total

    @staticmethod
    def _paired_dropouts(
        inputs: dict[int, np.ndarray], masked_with: dict[int, list[int]]
    ) -> list[int]:
        """The clients that left after sharing whose pair masks are in the sum: those some
        survivor masked with. One that shared but of whose neighbours none survived is in
        no survivor's input, so its mask key is not needed (and no survivor holds a share of
        it: asking for it would stop a round whose sum is computable)."""
        return sorted({v for w in inputs for v in masked_with[w]} - inputs.keys())

    def _rebuild(self, k: int, what: str, shares: dict[int, list[bytes]], check) -> bytes:
        try:
            return crypto.rebuild(shares.get(k, []), self.threshold, check)
        except SecAggError as err:
            raise self._error(f"client {k}'s {what} cannot be rebuilt: {err}") from None

    def _aggregate(self, total: np.ndarray, metrics, degree: int) -> SecureAggregate:
        """Σ w_k Δ_k / Σ w_k from the unmasked sum, its range checked."""
        count, params = len(metrics), self.params
        quantised = total[: self.length - int(self.weighted)]
        if quantised.size and int(quantised.max()) > count * params.levels:
            raise self._error(
                "the unmasked sum is outside the quantiser's range: an input was out of range "
                "or a mask was not removed"
            )
        weight = int(total[-1]) if self.weighted else count
        most = count * self.cfg.validation.max_examples
        if not count <= weight <= most:
            raise self._error(f"the summed record count {weight} is not in [{count}, {most}]")
        mean = crypto.dequantise_sum(quantised, params, count) / weight
        bound = params.error_bound(count, weight)
        record = {
            "survivors": count,
            "num_examples": weight,
            "degree": degree,
            "threshold": self.threshold,
            "bits": params.bits,
            "levels": params.levels,
            "clip_range": params.clip_range,
            "quantisation_error_bound": bound,
        }
        clients = [(k, metrics[k]) for k in sorted(metrics)]
        delta = crypto.unflatten(mean, self.runner.shapes)
        return SecureAggregate(delta, weight, clients, record)

    def _require(self, alive: list[int], where: str) -> None:
        """At least t and deploy.min_replies clients still in the protocol after `where`."""
        needed = max(self.threshold, self.cfg.deploy.min_replies)
        if len(alive) < needed:
            raise self._error(f"{len(alive)} client(s) left after {where}, {needed} needed")

    def _error(self, why: str) -> SecureAggregationError:
        return SecureAggregationError(
            self.round_number, why, self.replies.dropped + self.replies.rejected
        )

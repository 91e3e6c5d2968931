"""A data owner's side of secure aggregation (docs/design/deployment.md §7).

The owner's `fedit join` process is long-lived, so a round's secrets (two X25519 key pairs,
the self-mask seed b, the shares its neighbours sent it) stay in this process's memory for
the four stages of one round and never reach a disk; a restarted owner has lost them and
refuses the round's later stages (the coordinator counts it as dropped). Stages must come
in order, for the round and client id of the keys stage, and each is answered once: in
particular the unmask stage, so a coordinator cannot ask once for b's shares and again,
calling the same clients dropped, for their mask keys' shares.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from cryptography.fernet import InvalidToken
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flwr.app import RecordDict
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)

from fedit.config import ConfigError, RunConfig
from fedit.deploy.secagg import crypto, stages
from fedit.deploy.secagg.crypto import RoundParams, SecAggError
from fedit.deploy.secagg.stages import KEYS, MASKED, SHARES, UNMASK, Request
from fedit.protocol import wire
from fedit.protocol.traffic import reply_content
from fedit.types import ClientUpdate, Rejection

log = logging.getLogger("fedit.join")
BEFORE = {SHARES: KEYS, MASKED: SHARES, UNMASK: MASKED}  # the stage each one follows


@dataclass
class RoundSecrets:
    """One round's secrets of this owner, from its keys stage to its unmask stage."""

    round_number: int
    client_id: int
    params: RoundParams
    enc: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)
    mask: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)
    answered: str = KEYS
    neighbours: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # v: (enc, mask)
    threshold: int = 0
    shares: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # v: (b's, sk's)
    self_mask: bytes = b""  # b


class OwnerSession(Protocol):
    """What a stage needs of the owner's session for its run (fedit.deploy.owner's
    RunSession): the run's config, the adapter's shapes, and its check that a client id is
    this owner's (a WireError otherwise)."""

    cfg: RunConfig
    shapes: dict[str, tuple[int, ...]]

    def client_for(self, client_id: int) -> object: ...


class TrainingOwner(Protocol):
    """What SecureOwner needs of its data owner (fedit.deploy.owner's DataOwner), declared
    here so this side never imports the role it serves: the session a task's header names,
    and training on a task's content as any round does."""

    def session_for(self, header: wire.RunHeader) -> OwnerSession: ...

    def train(self, content: RecordDict, secure: bool) -> ClientUpdate | Rejection | RecordDict: ...


class SecureOwner:
    """Answers the four stages for a data owner (which trains the masked-input stage)."""

    def __init__(self, owner: TrainingOwner) -> None:
        self.owner = owner
        self.secrets: RoundSecrets | None = None

    def handle(self, stage: str, content: RecordDict) -> RecordDict:
        try:
            session = self.owner.session_for(wire.decode_header(content))
            if not session.cfg.secagg.enabled:
                raise wire.WireError("secagg.enabled: this run's config does not enable it")
            request = stages.decode_request(stage, content)
            session.client_for(request.client_id)  # this owner's id, or refused
            if stage == KEYS:
                return self._keys(session, request)
            secrets = self._secrets_for(request)
            if stage == SHARES:
                return self._shares(session, secrets, request)
            if stage == MASKED:
                return self._masked(session, secrets, request, content)
            return self._unmask(secrets, request)
        except (wire.WireError, ConfigError, SecAggError) as err:
            log.warning("refused a secure aggregation stage: %s", err)
            return wire.encode_status("refused", str(err))

    def _secrets_for(self, request: Request) -> RoundSecrets:
        secrets = self.secrets
        if secrets is None or (secrets.round_number, secrets.client_id) != (
            request.round_number,
            request.client_id,
        ):
            raise SecAggError(f"secagg: no keys of round {request.round_number} here")
        if secrets.answered != BEFORE[request.stage]:
            raise SecAggError(f"secagg: {request.stage} after {secrets.answered}, out of order")
        secrets.answered = request.stage
        return secrets

    def _keys(self, session: OwnerSession, request: Request) -> RecordDict:
        cfg, sampled = session.cfg, request.fields["sampled"]
        if sampled > cfg.partition.num_clients:
            raise SecAggError(f"secagg.sampled: {sampled} clients, the run has fewer")
        params = RoundParams(cfg.secagg.bits, cfg.secagg.clip_range, sampled)
        self.secrets = secrets = RoundSecrets(request.round_number, request.client_id, params)
        enc, mask = crypto.public_bytes(secrets.enc), crypto.public_bytes(secrets.mask)
        return stages.encode_reply(KEYS, enc_key=enc, mask_key=mask)

    def _shares(self, session: OwnerSession, secrets: RoundSecrets, request: Request) -> RecordDict:
        """Shamir shares of b and of the mask secret key among the neighbours and this
        owner (k + 1 holders, any t rebuild), each neighbour's encrypted to it."""
        ids, me = request.fields["neighbours"], secrets.client_id
        if me in ids or not ids:
            raise SecAggError("secagg.neighbours: must name other clients, at least one")
        threshold = crypto.round_threshold(session.cfg.secagg.threshold, len(ids))
        secrets.threshold = threshold
        keys = zip(request.fields["enc_keys"], request.fields["mask_keys"], strict=True)
        secrets.neighbours = dict(zip(ids, keys, strict=True))
        secrets.self_mask = os.urandom(crypto.KEY_BYTES)
        holders = len(ids) + 1
        b_shares = crypto.share_secrets(secrets.self_mask, holders, threshold)
        sk_shares = crypto.share_secrets(crypto.private_bytes(secrets.mask), holders, threshold)
        secrets.shares = {me: (b_shares[0], sk_shares[0])}
        ciphertexts = []
        for i, v in enumerate(ids, start=1):
            key = crypto.encryption_key(secrets.enc, secrets.neighbours[v][0])
            plaintext = share_keys_plaintext_concat(me, v, b_shares[i], sk_shares[i])
            ciphertexts.append(encrypt(key, plaintext))
        return stages.encode_reply(
            SHARES,
            receivers=ids,
            ciphertexts=ciphertexts,
            b_digest=crypto.digest(secrets.self_mask),
        )

    def _masked(
        self, session: OwnerSession, secrets: RoundSecrets, request: Request, content: RecordDict
    ) -> RecordDict:
        """Train as in any round, then send q + PRG(b) ± PRG(s_uv) for the neighbours
        whose shares arrived (mod 2**bits)."""
        senders = request.fields["senders"]
        for v, token in zip(senders, request.fields["ciphertexts"], strict=True):
            secrets.shares[v] = self._open(secrets, v, token)
        task_content = stages.task_part(content)
        answer = self.owner.train(task_content, secure=True)
        if isinstance(answer, RecordDict):
            return answer
        if isinstance(answer, Rejection):
            return reply_content(answer)
        global_state = wire.decode_state(task_content[wire.GLOBAL], session.shapes, wire.GLOBAL)
        params, cfg = secrets.params, session.cfg
        weighted = cfg.strategy.weighting == "examples"
        weight = answer.num_examples if weighted else 1
        delta = crypto.flatten(answer.state, session.shapes) - crypto.flatten(
            global_state, session.shapes
        )
        seed = task_content[wire.ROUND]["seed"]  # checked by train's decode_task
        vector = crypto.quantise(weight * delta, params, seed)
        if weighted:
            if answer.num_examples > (params.modulus - 1) // params.sampled:
                raise SecAggError("num_examples: too many records for secagg.bits")
            vector = np.append(vector, np.uint64(answer.num_examples))
        bits = params.bits
        masked = crypto.add(vector, crypto.prg(secrets.self_mask, len(vector), bits), bits)
        for v in senders:
            seed_uv = crypto.mask_seed(secrets.mask, secrets.neighbours[v][1])
            masked = crypto.add(
                masked, crypto.pair_mask(seed_uv, secrets.client_id, v, len(vector), bits), bits
            )
        allowed = {k: v for k, v in answer.metrics.items() if k in stages.DPO_METRICS}
        return stages.encode_masked(masked, allowed)

    @staticmethod
    def _open(secrets: RoundSecrets, sender: int, token: bytes) -> tuple[bytes, bytes]:
        if sender not in secrets.neighbours:
            raise SecAggError(f"secagg.senders: client {sender} is not a neighbour")
        key = crypto.encryption_key(secrets.enc, secrets.neighbours[sender][0])
        try:
            plaintext = decrypt(key, token)
        except InvalidToken:
            raise SecAggError(f"secagg: client {sender}'s shares do not decrypt") from None
        src, dst, b_share, sk_share = share_keys_plaintext_separate(plaintext)
        if (src, dst) != (sender, secrets.client_id):
            raise SecAggError(f"secagg: client {sender}'s shares name {src} → {dst}")
        if len(b_share) != crypto.SHARE_BYTES or len(sk_share) != crypto.SHARE_BYTES:
            raise SecAggError(f"secagg: client {sender}'s shares are not share-sized")
        return b_share, sk_share

    def _unmask(self, secrets: RoundSecrets, request: Request) -> RecordDict:
        """b's share of each survivor, the mask key's share of each dropped neighbour; once."""
        survivors, dropped = request.fields["survivors"], request.fields["dropped"]
        self.secrets = None  # answered once: the secrets go now
        if secrets.client_id not in survivors:
            raise SecAggError("secagg.survivors: must hold this client (it is answering)")
        unknown = [v for v in survivors + dropped if v not in secrets.shares]
        if unknown:
            raise SecAggError(f"secagg: no shares of client {unknown[0]} here")
        return stages.encode_reply(
            UNMASK,
            b_shares=[secrets.shares[v][0] for v in survivors],
            sk_shares=[secrets.shares[v][1] for v in dropped],
        )

"""SCAFFOLD: control variates that correct each client's drift towards its own optimum."""

from __future__ import annotations

import torch
from torch import Tensor

from fedit.client.hooks import ClientHook
from fedit.config import StrategyConfig
from fedit.server.aggregation import add_prefix, add_scaled, mean_delta, take_prefix, zeros_like
from fedit.server.strategies.base import ClientStore, Strategy
from fedit.types import AdapterState, ClientUpdate

SPILL_THRESHOLD = 64  # more clients than this: c_k go to disk once set_client_store is called


class ScaffoldHook(ClientHook):
    """Client side of SCAFFOLD for one round, given the server's c and this client's c_k."""

    def __init__(self, c: AdapterState, c_k: AdapterState) -> None:
        self._c, self._c_k = c, c_k
        self._correction: AdapterState = {}
        self._grad_sum: AdapterState = {}
        self._steps = 0

    def start(self, params: dict[str, torch.nn.Parameter]) -> None:
        self._correction = {
            name: (self._c[name] - self._c_k[name]).to(p.device, p.dtype)
            for name, p in params.items()
        }
        self._grad_sum = {
            name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()
        }
        self._steps = 0

    def adjust_gradients(self, params: dict[str, torch.nn.Parameter]) -> None:
        """g ← g − c_k + c, remembering the raw g for c_k⁺."""
        self._steps += 1
        for name, p in params.items():
            if p.grad is None:  # no gradient this step: the correction still applies
                p.grad = self._correction[name].clone()
                continue
            self._grad_sum[name] += p.grad.float()
            p.grad.add_(self._correction[name])

    def finish(
        self, params: dict[str, torch.nn.Parameter], num_steps: int, learning_rate: float
    ) -> dict[str, AdapterState]:
        """{"control_delta": c_k⁺ − c_k}, c_k⁺ = mean raw gradient (c_k kept after 0 steps)."""
        if self._steps == 0:
            return {"control_delta": zeros_like(self._c_k)}
        return {
            "control_delta": {
                name: total.cpu() / self._steps - self._c_k[name]
                for name, total in self._grad_sum.items()
            }
        }


class Scaffold(Strategy):
    """SCAFFOLD (Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated
    Learning", ICML 2020), Algorithm 1 with option II.

    State: a server control variate c and one c_k per client, all zero at the start (a
    client's c_k is zero until it first participates).
    Client (``ScaffoldHook``): every local step uses g − c_k + c in place of its gradient g
    (``adjust_gradients``, before clipping and the optimizer step); at the end it sends
    c_k⁺ − c_k in ``extras["control_delta"]``.
    Server: x ← x + η_g·Δ (η_g = ``server_lr``; Δ weighted per ``weighting``, the paper's
    uniform mean is ``"uniform"``); c ← c + (1/N)·Σ_{k sampled} (c_k⁺ − c_k) with N =
    ``num_clients``, the total number of clients; and c_k ← c_k⁺ for each sampled client.

    Option II and AdamW. The paper's option II, c_k⁺ = c_k − c + (x − y_k)/(K·η_l), assumes
    plain SGD: then (x − y_k)/(K·η_l) is the mean corrected gradient, and c_k⁺ works out to
    the mean of the client's raw gradients g over its K steps. fedit's local trainer uses
    AdamW, which is handed the corrected gradient; there (x − y_k)/(K·η_l) is the mean
    Adam update direction, of order 1 per coordinate whatever the gradient scale, so c and
    c_k would be in different units from g and the correction would swamp the data's
    gradient. fedit therefore computes c_k⁺ as what option II equals under SGD, the mean
    raw gradient over the round's optimizer steps (before correction and clipping): the
    control variates stay estimates of gradients, as the paper intends, whatever the
    optimizer. With SGD, no clipping and no weight decay it is exactly option II.

    Storage: c_k live in memory and are saved in ``state_dict`` ("c.<param>",
    "c_k.<id>.<param>"). With more than ``SPILL_THRESHOLD`` clients, ``set_client_store``
    moves them to a store (fedit.engine.checkpoint.ClientStateStore): ``state_dict`` then
    holds c only, and the store commits each round's new c_k with that round's checkpoint,
    so c and every c_k always come from the same round.
    """

    def __init__(self, config: StrategyConfig, num_clients: int) -> None:
        super().__init__(config, num_clients)
        self._c: AdapterState = {}
        self._c_k: dict[int, AdapterState] = {}
        self._store: ClientStore | None = None

    def set_client_store(self, store: ClientStore) -> None:
        """Keep the c_k in ``store`` when there are more than SPILL_THRESHOLD clients."""
        if self.num_clients <= SPILL_THRESHOLD:
            return
        self._store = store
        in_memory, self._c_k = self._c_k, {}
        for client_id, c_k in in_memory.items():
            self._put(client_id, c_k)

    def _get(self, client_id: int, like: AdapterState) -> AdapterState:
        store = self._c_k if self._store is None else self._store
        return store.get(client_id) or zeros_like(like)

    def _put(self, client_id: int, c_k: AdapterState) -> None:
        if self._store is None:
            self._c_k[client_id] = c_k
        else:
            self._store.put(client_id, c_k)

    def client_hook(self, client_id: int, global_state: AdapterState) -> ClientHook:
        return ScaffoldHook(self._c or zeros_like(global_state), self._get(client_id, global_state))

    def aggregate(
        self, global_state: AdapterState, updates: list[ClientUpdate], round_index: int
    ) -> AdapterState:
        delta = mean_delta(global_state, updates, self.config.weighting)
        control_deltas = [_control_delta(u, delta) for u in updates]
        summed = {key: sum(d[key] for d in control_deltas) for key in delta}
        self._c = add_scaled(self._c or zeros_like(delta), summed, 1.0 / self.num_clients)
        for update, control_delta in zip(updates, control_deltas, strict=True):
            c_k = self._get(update.client_id, delta)
            self._put(update.client_id, add_scaled(c_k, control_delta, 1.0))
        new_state = add_scaled(global_state, delta, self.config.server_lr)
        return self._finish_round(global_state, new_state, updates)

    def state_dict(self) -> dict[str, Tensor]:
        state = add_prefix(self._c, "c")
        for client_id, c_k in self._c_k.items():
            state |= add_prefix(c_k, f"c_k.{client_id}")
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self._c, self._c_k = take_prefix(state, "c"), {}
        client_ids = {int(key.split(".")[1]) for key in state if key.startswith("c_k.")}
        for client_id in sorted(client_ids):
            self._put(client_id, take_prefix(state, f"c_k.{client_id}"))


def _control_delta(update: ClientUpdate, like: AdapterState) -> AdapterState:
    control_delta = update.extras.get("control_delta")
    if control_delta is None or control_delta.keys() != like.keys():
        raise ValueError(
            f"client {update.client_id} sent no complete extras['control_delta']: SCAFFOLD "
            "clients must train with the hook from Scaffold.client_hook"
        )
    return {key: t.float() for key, t in control_delta.items()}

"""SCAFFOLD: control variates that correct each client's drift towards its own optimum."""

from __future__ import annotations

import torch
from torch import Tensor

from fedit.config import StrategyConfig
from fedit.server.aggregation import add_prefix, add_scaled, take_prefix, zeros_like
from fedit.server.aggregators import Aggregator
from fedit.server.strategies.base import ClientStore, Strategy
from fedit.types import AdapterState, ClientInstructions, ClientUpdate

SPILL_THRESHOLD = 64  # more clients than this: c_k go to disk once set_client_store is called


class Scaffold(Strategy):
    """SCAFFOLD (Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated
    Learning", ICML 2020), Algorithm 1 with option II.

    State: a server control variate c and one c_k per client, all zero at the start (a
    client's c_k is zero until it first participates), and each client's last known weight.
    Client (``fedit.client.hooks.ScaffoldHook``): every local step uses g − c_k + c in place
    of its gradient g (``adjust_gradients``, before clipping and the optimizer step); at the
    end it sends c_k⁺ − c_k in ``extras["control_delta"]``.
    Server: x ← x + η_g·Δ (η_g = ``server_lr``; Δ weighted per ``weighting``, the paper's
    uniform mean is ``"uniform"``), c_k ← c_k⁺ for each sampled client, and c is the
    weighted mean of all N = ``num_clients`` clients' c_k, weighted as Δ is:

        c = Σ_{k seen} w_k c_k / D,   D = N·w̄,

    with w_k = n_k (``weighting = "examples"``, the client's last reported num_examples) or
    1 (``"uniform"``), and w̄ the mean w_k over the clients seen so far: a client not yet
    seen has c_k = 0 and counts as holding w̄ examples. c is kept incrementally,
    c⁺ = (D/D⁺)·c + (1/D⁺)·Σ_{k sampled} (w_k⁺ Δc_k + (w_k⁺ − w_k) c_k), Δc_k = c_k⁺ − c_k.
    With uniform weights D = N, and this is the paper's c ← c + (1/N)·Σ_{k sampled} Δc_k.
    With example weights, once every client has taken part (and while the n_k stay fixed),
    D = Σ_j n_j and c ← c + Σ_{k sampled} (n_k/Σ_j n_j)·Δc_k. The weighting of c must match
    that of Δ: at the fixed point the clients stop drifting (Δ = 0) where c = Σ_k p_k ∇f_k
    = 0, so a uniform c with example-weighted Δ would converge to the uniform optimum.

    Option II and AdamW. The paper's option II, c_k⁺ = c_k − c + (x − y_k)/(K·η_l), assumes
    plain SGD: then (x − y_k)/(K·η_l) is the mean corrected gradient, and c_k⁺ works out to
    the mean of the client's raw gradients g over its K steps. fedit's local trainer uses
    AdamW, which is handed the corrected gradient; there (x − y_k)/(K·η_l) is the mean
    Adam update direction, of order 1 per coordinate whatever the gradient scale, so c and
    c_k would be in different units from g and the correction would swamp the data's
    gradient. fedit therefore computes c_k⁺ as what option II equals under SGD, the mean
    raw gradient over the round's optimizer steps (before correction and clipping): the
    control variates stay estimates of gradients, as the paper intends, whatever the
    optimizer. With SGD, no clipping and no weight decay it is exactly option II. Steps
    that fp16 loss scaling skips (non-finite gradients) never reach the hook, so they are
    left out of the mean.

    Storage: c_k live in memory and are saved in ``state_dict`` ("c.<param>",
    "c_k.<id>.<param>", and the (N,) weights w_k as "client_weights", 0 for clients not
    seen). With more than ``SPILL_THRESHOLD`` clients, ``set_client_store`` moves the c_k to
    a store (fedit.engine.checkpoint.ClientStateStore): ``state_dict`` then holds c and the
    weights only, and the store commits each round's new c_k with that round's checkpoint,
    so c and every c_k always come from the same round.
    """

    update_extras = frozenset({"control_delta"})

    def __init__(
        self, config: StrategyConfig, num_clients: int, aggregator: Aggregator | None = None
    ) -> None:
        super().__init__(config, num_clients, aggregator)
        self._c: AdapterState = {}
        self._c_k: dict[int, AdapterState] = {}
        self._weights = torch.zeros(num_clients, dtype=torch.float64)  # w_k; 0: not seen
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

    def reset(self) -> None:
        super().reset()
        if self._store is not None:
            self._store.clear()

    def client_instructions(self, client_id: int, global_state: AdapterState) -> ClientInstructions:
        """c and this client's c_k (a deployment leaves c_k out when the owner holds it)."""
        tensors = {
            "c": self._c or zeros_like(global_state),
            "c_k": self._get(client_id, global_state),
        }
        return ClientInstructions("scaffold", tensors=tensors)

    def aggregate(
        self, global_state: AdapterState, updates: list[ClientUpdate], round_index: int
    ) -> AdapterState:
        delta = self.combined_delta(global_state, updates, round_index)
        weights = self._weights.clone()
        for update in updates:
            weights[self._index(update.client_id)] = self._weight(update)
        before, after = _total_weight(self._weights), _total_weight(weights)
        change = zeros_like(delta)  # Σ_k (w_k⁺ Δc_k + (w_k⁺ − w_k) c_k)
        for update in updates:
            control_delta = _control_delta(update, delta)
            c_k = self._get(update.client_id, delta)
            old, new = float(self._weights[update.client_id]), float(weights[update.client_id])
            change = add_scaled(change, control_delta, new)
            if new != old:
                change = add_scaled(change, c_k, new - old)
            self._put(update.client_id, add_scaled(c_k, control_delta, 1.0))
        c = {key: t * (before / after) for key, t in (self._c or zeros_like(delta)).items()}
        self._c, self._weights = add_scaled(c, change, 1.0 / after), weights
        new_state = add_scaled(global_state, delta, self.config.server_lr)
        return self._finish_round(global_state, new_state, updates)

    def _weight(self, update: ClientUpdate) -> float:
        """w_k: the client's examples, or 1 with uniform weighting."""
        return float(update.num_examples) if self.config.weighting == "examples" else 1.0

    def _index(self, client_id: int) -> int:
        if not 0 <= client_id < self.num_clients:
            raise ValueError(f"client id {client_id} is outside 0..{self.num_clients - 1}")
        return client_id

    def state_dict(self) -> dict[str, Tensor]:
        state = add_prefix(self._c, "c")
        for client_id, c_k in self._c_k.items():
            state |= add_prefix(c_k, f"c_k.{client_id}")
        return state | {"client_weights": self._weights.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self._c, self._c_k = take_prefix(state, "c"), {}
        weights = state.get("client_weights")
        if weights is None and self._c:
            raise ValueError(
                "SCAFFOLD server state has c but no 'client_weights' (saved by a fedit that "
                "averaged c uniformly): resume it with that version, or start a new run"
            )
        if weights is not None and weights.shape != (self.num_clients,):
            raise ValueError(
                f"SCAFFOLD client_weights has shape {tuple(weights.shape)}, expected "
                f"({self.num_clients},): the state is from a federation of another size"
            )
        zeros = torch.zeros(self.num_clients, dtype=torch.float64)
        self._weights = zeros if weights is None else weights.to(torch.float64).clone()
        client_ids = {int(key.split(".")[1]) for key in state if key.startswith("c_k.")}
        for client_id in sorted(client_ids):
            self._put(client_id, take_prefix(state, f"c_k.{client_id}"))


def _total_weight(weights: Tensor) -> float:
    """D = N·w̄: the seen clients' mean weight stands in for each unseen client (0: none)."""
    seen = weights[weights > 0]
    return len(weights) * float(seen.mean()) if len(seen) else 0.0


def _control_delta(update: ClientUpdate, like: AdapterState) -> AdapterState:
    control_delta = update.extras.get("control_delta")
    if control_delta is None or control_delta.keys() != like.keys():
        raise ValueError(
            f"client {update.client_id} sent no complete extras['control_delta']: SCAFFOLD "
            "clients must train with the hook of Scaffold.client_instructions"
        )
    return {key: t.float() for key, t in control_delta.items()}

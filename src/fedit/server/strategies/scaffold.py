"""SCAFFOLD: control variates that correct each client's drift towards its own optimum."""

from __future__ import annotations

import torch
from torch import Tensor

from fedit.config import StrategyConfig
from fedit.ops.aggregation import add_prefix, add_scaled, take_prefix, zeros_like
from fedit.server.aggregators import Aggregator
from fedit.server.strategies.base import ClientStore, Strategy
from fedit.types import AdapterState, ClientInstructions, ClientUpdate

SPILL_THRESHOLD = 64  # more clients than this: c_k go to disk once set_client_store is called
# w_k's key in a client's entry beside its c_k tensors (no parameter name holds a ':')
WEIGHT_KEY = "scaffold:w_k"


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

    Storage: a client's entry is its c_k with its w_k beside it (``WEIGHT_KEY``); only the
    clients seen have one. Entries live in memory and are saved in ``state_dict``
    ("c.<param>", "c_k.<id>.<param>"), with Σ w_k and the number of clients seen, from which
    D follows. With more than ``SPILL_THRESHOLD`` clients, ``set_client_store`` moves the
    entries to a store (fedit.engine.checkpoint.ClientStateStore): ``state_dict`` then holds
    c and the two scalars only, so it does not grow with the clients, and the store commits
    each round's new entries with that round's checkpoint, so c and every c_k always come
    from the same round.
    """

    update_extras = frozenset({"control_delta"})

    def __init__(
        self, config: StrategyConfig, num_clients: int, aggregator: Aggregator | None = None
    ) -> None:
        super().__init__(config, num_clients, aggregator)
        self._c: AdapterState = {}
        self._c_k: dict[int, AdapterState] = {}  # entries (c_k and w_k) while not in a store
        self._weight_sum = 0.0  # Σ w_k over the clients seen
        self._seen = 0  # clients seen
        self._store: ClientStore | None = None

    def set_client_store(self, store: ClientStore) -> None:
        """Keep the c_k in ``store`` when there are more than SPILL_THRESHOLD clients."""
        if self.num_clients <= SPILL_THRESHOLD:
            return
        self._store = store
        in_memory, self._c_k = self._c_k, {}
        for client_id, entry in in_memory.items():
            self._put_entry(client_id, entry)

    def _get(self, client_id: int, like: AdapterState) -> tuple[AdapterState, float]:
        """The client's c_k and w_k: zeros and 0 for a client not seen yet."""
        store = self._c_k if self._store is None else self._store
        entry = store.get(client_id)
        if entry is None:
            return zeros_like(like), 0.0
        c_k = {key: t for key, t in entry.items() if key != WEIGHT_KEY}
        return c_k, float(entry[WEIGHT_KEY])

    def _put(self, client_id: int, c_k: AdapterState, weight: float) -> None:
        self._put_entry(client_id, c_k | {WEIGHT_KEY: torch.tensor(weight, dtype=torch.float64)})

    def _put_entry(self, client_id: int, entry: AdapterState) -> None:
        if self._store is None:
            self._c_k[client_id] = entry
        else:
            self._store.put(client_id, entry)

    def reset(self) -> None:
        super().reset()
        if self._store is not None:
            self._store.clear()

    def client_instructions(self, client_id: int, global_state: AdapterState) -> ClientInstructions:
        """c and this client's c_k (a deployment leaves c_k out when the owner holds it)."""
        tensors = {
            "c": self._c or zeros_like(global_state),
            "c_k": self._get(client_id, global_state)[0],
        }
        return ClientInstructions("scaffold", tensors=tensors)

    def aggregate(
        self, global_state: AdapterState, updates: list[ClientUpdate], round_index: int
    ) -> AdapterState:
        delta = self.combined_delta(global_state, updates, round_index)
        before = self._total_weight()
        change = zeros_like(delta)  # Σ_k (w_k⁺ Δc_k + (w_k⁺ − w_k) c_k)
        for update in updates:
            control_delta = _control_delta(update, delta)
            c_k, old = self._get(self._index(update.client_id), delta)
            new = self._weight(update)
            change = add_scaled(change, control_delta, new)
            if new != old:
                change = add_scaled(change, c_k, new - old)
            self._weight_sum += new - old
            self._seen += int(new > 0) - int(old > 0)  # seen: w_k > 0
            self._put(update.client_id, add_scaled(c_k, control_delta, 1.0), new)
        after = self._total_weight()
        c = {key: t * (before / after) for key, t in (self._c or zeros_like(delta)).items()}
        self._c = add_scaled(c, change, 1.0 / after)
        new_state = add_scaled(global_state, delta, self.config.server_lr)
        return self._finish_round(global_state, new_state, updates)

    def _weight(self, update: ClientUpdate) -> float:
        """w_k: the client's examples, or 1 with uniform weighting."""
        return float(update.num_examples) if self.config.weighting == "examples" else 1.0

    def _index(self, client_id: int) -> int:
        if not 0 <= client_id < self.num_clients:
            raise ValueError(f"client id {client_id} is outside 0..{self.num_clients - 1}")
        return client_id

    def _total_weight(self) -> float:
        """D = N·w̄: the seen clients' mean weight stands in for each unseen client (0: none)."""
        return self.num_clients * self._weight_sum / self._seen if self._seen else 0.0

    def state_dict(self) -> dict[str, Tensor]:
        state = add_prefix(self._c, "c")
        for client_id, entry in self._c_k.items():
            state |= add_prefix(entry, f"c_k.{client_id}")
        seen = {"weight_sum": torch.tensor(self._weight_sum, dtype=torch.float64)}
        return state | seen | {"clients_seen": torch.tensor(self._seen, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self._c, self._c_k = take_prefix(state, "c"), {}
        if "client_weights" in state or (self._c and "weight_sum" not in state):
            raise ValueError(
                "SCAFFOLD server state without 'weight_sum' (saved by a fedit that kept "
                "client_weights, or averaged c uniformly): resume it with that version, or "
                "start a new run"
            )
        self._weight_sum = float(state.get("weight_sum", torch.tensor(0.0)))
        self._seen = int(state.get("clients_seen", torch.tensor(0)))
        if not 0 <= self._seen <= self.num_clients:
            raise ValueError(
                f"SCAFFOLD server state has seen {self._seen} clients, more than the "
                f"federation's {self.num_clients}: the state is from a federation of another size"
            )
        client_ids = {int(key.split(".")[1]) for key in state if key.startswith("c_k.")}
        for client_id in sorted(client_ids):
            entry = take_prefix(state, f"c_k.{client_id}")
            if WEIGHT_KEY not in entry:
                raise ValueError(f"SCAFFOLD server state: client {client_id}'s c_k has no w_k")
            self._put_entry(self._index(client_id), entry)


def _control_delta(update: ClientUpdate, like: AdapterState) -> AdapterState:
    control_delta = update.extras.get("control_delta")
    if control_delta is None or control_delta.keys() != like.keys():
        raise ValueError(
            f"client {update.client_id} sent no complete extras['control_delta']: SCAFFOLD "
            "clients must train with the hook of Scaffold.client_instructions"
        )
    return {key: t.float() for key, t in control_delta.items()}

"""Client-level differential privacy: DP-FedAvg (McMahan et al., ICLR 2018) with an accountant.

``mechanism``: clipping and Gaussian noise as pure functions over adapter states, shared by
the server's central aggregator (fedit.server.aggregators.dp_fedavg) and the client's local
noise (fedit.client.session.LocalClient), so it sits below both. ``accountant``: ε from
Google's dp-accounting, by privacy loss distributions (``pld``, fixed-size sampling under
replace-one) or Rényi DP. ``plan``: a run's ``[privacy]`` resolved (δ, σ) once.
"""

from fedit.privacy.plan import PrivacyPlan, client_plan, resolve_plan, selection_seed

__all__ = ["PrivacyPlan", "client_plan", "resolve_plan", "selection_seed"]

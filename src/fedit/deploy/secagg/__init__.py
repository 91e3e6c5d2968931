"""Secure aggregation in deployments (SecAgg+; docs/design/deployment.md §7).

`crypto`: the arithmetic and cryptography, without any transport; `stages`: the four
stages' messages and their checks; `coordinator`: the coordinator's side of a round
(SecureRound), `owner`: a data owner's (SecureOwner). The roles (fedit.deploy.coordinator,
fedit.deploy.owner) use these; nothing here imports a role back (what each side needs of
its role is a Protocol in its own module: StageRunner, TrainingOwner).
"""

"""fedit across machines on Flower 1.42 (docs/design/deployment.md).

The two roles (`coordinator`, `owner`, with `join` starting an owner's process), the keys
and certificates (`pki`), Flower's Ray simulation runtime driven as a third engine
(`simulation_runtime`), and two subpackages they build on: `flower/` (everything pinned to
Flower) and `secagg/` (secure aggregation). This file imports nothing, so importing
`fedit.deploy` itself stays light.
"""

"""Everything pinned to Flower 1.42 (docs/design/deployment.md §1, §2): its processes as
children of a fedit process (`processes`), the calls into its internal runtime API
(`flower_io`), the fleet-only front before the SuperLink (`front`) and the placeholder App
`flwr run` sends (`app/`). Nothing here imports the roles or secure aggregation: they
build on this package, so a Flower upgrade is checked here first.
"""

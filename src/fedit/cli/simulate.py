"""`fedit simulate-ray`: a config's federation under Flower's simulation runtime (Ray).

Many clients on one box: the round logic, messages and run directory are a deployment's
(fedit.deploy.simulation_runtime), the clients are Ray workers training in parallel, each
with its share of the CPUs and GPUs. flwr, Ray and torch are imported only when it runs.
"""

from __future__ import annotations

from typing import Annotated

import typer

from fedit.cli.common import (
    ConfigOption,
    OverrideOption,
    QuietOption,
    ResumeOption,
    friendly_errors,
    resolve_config,
)


@friendly_errors
def simulate_ray(
    config: ConfigOption = None,
    set_: OverrideOption = None,
    workers: Annotated[
        int, typer.Option("--workers", help="Ray workers: clients trained at the same time")
    ] = 2,
    cpus_per_client: Annotated[
        float, typer.Option("--cpus-per-client", help="CPUs per worker (its torch threads)")
    ] = 1.0,
    gpus_per_client: Annotated[
        float,
        typer.Option("--gpus-per-client", help="GPU share per worker: 0.5 puts two on a GPU"),
    ] = 0.0,
    object_store_mb: Annotated[
        int | None,
        typer.Option("--object-store-mb", help="Ray's object store (default: 30% of memory)"),
    ] = None,
    resume: ResumeOption = False,
    quiet: QuietOption = False,
) -> None:
    """Simulate a federation with Flower's simulation runtime (Ray): clients in parallel."""
    cfg = resolve_config(config, set_)
    from fedit.deploy.simulation_runtime import RayResources
    from fedit.deploy.simulation_runtime import simulate_ray as run

    resources = RayResources(workers, cpus_per_client, gpus_per_client, object_store_mb)
    run(cfg, resources, resume=resume, show_progress=not quiet)

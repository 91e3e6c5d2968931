"""A Ray worker's data owner is a deployed owner's, composed: its DataOwner and RunSession
are built by their own constructors (fedit.engine.assembly builds what both hold), so a
field added to either is there under Ray too. Without Ray: the worker's pieces are built
in this process."""

from __future__ import annotations

from pathlib import Path

from fedit.config import load_config
from fedit.deploy import simulation_runtime
from fedit.deploy.owner import DataOwner, OwnerInputs, RunSession
from fedit.deploy.simulation_runtime import RuntimeOwners
from tests.conftest import tiny_run_overrides
from tests.deploy.conftest import owner_files


def test_nothing_subclasses_the_data_owner_or_its_session() -> None:
    # A subclass that skips its parent's constructor misses every field added there later.
    assert DataOwner.__subclasses__() == []
    assert RunSession.__subclasses__() == []


def test_a_ray_worker_has_every_field_a_deployed_owner_has(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    files, _ = owner_files(tmp_path, owners=2)
    overrides = tiny_run_overrides(tiny_model_dir, tmp_path / "run", **{"partition.num_clients": 2})
    cfg = load_config(None, overrides)
    side, _ = simulation_runtime._coordinator_side(cfg)  # the ServerApp's header
    deployed = DataOwner.joining(
        OwnerInputs(data=files[0], preference_data=None, model=None, state_dir=tmp_path / "o")
    )
    worker = RuntimeOwners(cfg, threads=1).owner
    assert vars(worker).keys() == vars(deployed).keys()
    session = worker.session_for(side.header)
    own = deployed.session_for(side.header)
    assert vars(session).keys() == vars(own).keys()
    # each trains client 0 from the model it loaded: the same starting adapter
    assert session.client_for(0).client_id == own.client_for(0).client_id == 0
    assert session.start_adapter.keys() == own.start_adapter.keys()
    for key, tensor in session.start_adapter.items():
        assert tensor.equal(own.start_adapter[key])

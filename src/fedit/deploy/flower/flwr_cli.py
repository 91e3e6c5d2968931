"""The flwr CLI calls fedit makes (`flwr supernode register`, `flwr run`), each with its
own FLWR_HOME (`~/.flwr` is never touched) written by `write_connection`, and the Flower
App directory `flwr run` sends (design §2.1). Answers are read as `--format json`; a
failure is a FederationError naming the call.
"""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from pathlib import Path

from fedit.deploy.flower.processes import FederationError, child_env, flower_command

APP_DIR = Path(__file__).resolve().parent / "app"  # the FAB `flwr run` sends (§2.1)
CLI_TIMEOUT = 120.0


def write_connection(
    flwr_home: Path, name: str, address: str, root_cert: Path | None, insecure: bool
) -> Path:
    """Write `$FLWR_HOME/config.toml` with the one connection `name` (the default), as
    F/cli/flower_config.py reads it: `[superlink.NAME] address`, `root-certificates`
    (absolute), `insecure`. The file is fedit's alone, so it is rewritten whole."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise ValueError(f"connection name {name!r}: letters, digits, '-' and '_' only")
    lines = ["[superlink]", f"default = {json.dumps(name)}", "", f"[superlink.{name}]"]
    lines.append(f"address = {json.dumps(address)}")
    if root_cert is not None:
        lines.append(f"root-certificates = {json.dumps(str(root_cert.resolve()))}")
    lines.append(f"insecure = {'true' if insecure else 'false'}")
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _flwr_json(flwr_home: Path, args: list[str]) -> dict[str, object]:
    """Run `flwr ARGS --format json`; its JSON answer (success or error)."""
    try:
        done = subprocess.run(
            [flower_command("flwr"), *args, "--format", "json"],
            capture_output=True,
            text=True,
            env=child_env(flwr_home),
            stdin=subprocess.DEVNULL,
            timeout=CLI_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        raise FederationError(f"flwr {args[0]} gave no answer in {CLI_TIMEOUT:.0f} s") from None
    start = done.stdout.find("{")  # flwr prints the JSON indented, sometimes after text
    try:
        answer = json.JSONDecoder().raw_decode(done.stdout, start)[0] if start >= 0 else None
    except json.JSONDecodeError:
        answer = None
    if isinstance(answer, dict):
        return answer
    detail = (done.stderr or done.stdout).strip().splitlines()
    raise FederationError(
        f"flwr {' '.join(args[:2])} failed (exit {done.returncode}): "
        + (detail[-1] if detail else "no output")
    )


def _cli_error(answer: dict[str, object]) -> str:
    return str(answer.get("error-message") or answer.get("error") or answer)


def register_node(flwr_home: Path, connection: str, public_key_file: Path, name: str) -> int | None:
    """Register a SuperNode's public key (`flwr supernode register`); its node id, or None
    when the key was registered before (nothing to do: node ids are looked up from the
    keys each round, design §2.5)."""
    answer = _flwr_json(
        flwr_home, ["supernode", "register", str(public_key_file), connection, "--name", name]
    )
    if answer.get("success"):
        return int(str(answer["node-id"]))
    if "already in use" in _cli_error(answer):
        return None
    raise FederationError(f"{public_key_file}: registration failed: {_cli_error(answer)}")


def app_config_keys(app_dir: Path) -> set[str]:
    """The run config keys a Flower App declares (`[tool.flwr.app.config]`)."""
    with (app_dir / "pyproject.toml").open("rb") as file:
        app = tomllib.load(file)
    return set(app.get("tool", {}).get("flwr", {}).get("app", {}).get("config", {}))


def run_config_args(run_config: dict[str, str | int | float | bool]) -> list[str]:
    """`--run-config` arguments for `flwr run`: one `key=value` each, the value in the
    TOML form F/common/config.py parse_config_args reads (a string in quotes it does not
    contain)."""
    args = []
    for key, value in run_config.items():
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", key):
            raise ValueError(f"run config key {key!r}: letters, digits, '.', '-' and '_' only")
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            text = repr(value)
        elif "\n" in value or ('"' in value and "'" in value):
            raise ValueError(f"run config {key}: a value holding newlines or both quotes")
        else:
            text = f"'{value}'" if '"' in value else f'"{value}"'
        args += ["--run-config", f"{key}={text}"]
    return args


def submit_run(
    flwr_home: Path,
    app_dir: Path,
    connection: str,
    run_config: dict[str, str | int | float | bool],
) -> int:
    """Create a run (`flwr run APP_DIR CONNECTION`); its run id. The SuperLink runs with
    --isolation process, so nothing is executed: fedit's executor takes the run's task.
    Every key of `run_config` must be declared in the app's `[tool.flwr.app.config]`
    (Flower refuses others)."""
    declared = app_config_keys(app_dir)
    if unknown := sorted(set(run_config) - declared):
        raise ValueError(
            f"run config keys {unknown} are not declared in {app_dir / 'pyproject.toml'} "
            f"[tool.flwr.app.config] (declared: {sorted(declared)})"
        )
    answer = _flwr_json(flwr_home, ["run", str(app_dir), connection, *run_config_args(run_config)])
    if not answer.get("success"):
        raise FederationError(f"flwr run {app_dir} failed: {_cli_error(answer)}")
    return int(str(answer["run-id"]))

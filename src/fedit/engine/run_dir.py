"""The run directory around its checkpoints: what --resume accepts, and what is rebuilt or
cleaned before a run writes anything.

The checkpoints (fedit.engine.checkpoint) are the source of truth: each round directory
holds everything the round produced, its metrics line included, and metrics.jsonl is a
view rebuilt from them, so a crash at any point leaves one line per committed round.

inputs.json holds the content fingerprints (fedit.fingerprint) of the files the run read
its data and its base model from, written when it starts; --resume refuses a run whose
files changed since, though their paths (in the config) did not. With per-client files
(partition.method = "files") clients.json names each client's file, {client id:
{"data.path": file}}, so a client's numbers can be traced to the data it trained on.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from fedit.config import ConfigError, RunConfig, load_config, to_toml
from fedit.data.prepare import client_file_map, data_files
from fedit.engine.checkpoint import metrics_record, round_dir
from fedit.errors import write_atomic, write_error
from fedit.fingerprint import content_hash, sampled_fingerprint
from fedit.models.loading import model_files

console = Console(stderr=True)
METRICS = "metrics.jsonl"
CONFIG = "config.toml"
INPUTS = "inputs.json"
CLIENT_FILES = "clients.json"
LEGACY_CLIENT_STATE = "client_state"  # c_k of older fedit, written before the round committed

# Keys a resumed run may change: they cannot alter the maths of the rounds already trained
# (federation.rounds with the exceptions of resume_conflicts). "eval.*": the whole section,
# which only decides what is evaluated and reported. The deploy.* keys say how the rounds'
# messages travel (and secagg.stage_timeout how long a secure round's stages wait);
# deploy.clients is not among them: it maps client ids to data owners' keys.
RESUMABLE_KEYS = frozenset(
    {
        "output_dir",
        "federation.rounds",
        "train.threads",
        "eval.*",
        "deploy.fleet_address",
        "deploy.certs_dir",
        "deploy.round_timeout",
        "deploy.join_timeout",
        "deploy.min_replies",
        "deploy.insecure",
        "secagg.stage_timeout",
    }
)


def resume_conflicts(saved: RunConfig, requested: RunConfig) -> list[str]:
    """The keys in which `requested` differs from the `saved` run in a way that would make
    the resumed run not a continuation of it, as "key (old -> new)", sorted.

    Any key outside RESUMABLE_KEYS conflicts. federation.rounds conflicts too where the
    rounds already trained depend on the total: a cosine learning rate decays over all
    rounds, and the centralized baseline's step budget is a mean over all rounds.
    """
    old, new = _flat(saved.to_dict()), _flat(requested.to_dict())
    conflicts = [
        f"{key} ({old.get(key)!r} -> {new.get(key)!r})"
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key) and not _resumable(key)
    ]
    reasons = []
    if requested.train.lr_schedule == "cosine":
        reasons.append("train.lr_schedule = 'cosine' decays over all rounds")
    if requested.federation.mode == "centralized":
        reasons.append("the centralized step budget is a mean over all rounds")
    if requested.privacy.mode != "off" and requested.privacy.target_epsilon is not None:
        reasons.append("privacy.target_epsilon: σ was searched for all rounds")
    if saved.federation.rounds != requested.federation.rounds and reasons:
        change = f"{saved.federation.rounds} -> {requested.federation.rounds}"
        conflicts.append(f"federation.rounds ({change}: {'; '.join(reasons)})")
    return sorted(conflicts)


def _resumable(key: str) -> bool:
    return key in RESUMABLE_KEYS or f"{key.split('.')[0]}.*" in RESUMABLE_KEYS


def _flat(config: dict[str, Any]) -> dict[str, Any]:
    """{"section.key": value} of a RunConfig.to_dict()."""
    flat: dict[str, Any] = {}
    for name, value in config.items():
        if isinstance(value, dict):
            flat |= {f"{name}.{key}": v for key, v in value.items()}
        else:
            flat[name] = value
    return flat


def check_resume(output_dir: Path, cfg: RunConfig, done: list[int]) -> None:
    """Refuse a --resume that would not continue the saved run exactly (a ConfigError naming
    what differs). The saved config is the last round's, or the run's own before round 1."""
    if done and done[-1] > cfg.federation.rounds:
        raise ConfigError(
            f"{output_dir} already completed {done[-1]} rounds; federation.rounds = "
            f"{cfg.federation.rounds} is fewer"
        )
    if done and (output_dir / LEGACY_CLIENT_STATE).is_dir():
        raise ConfigError(
            f"{output_dir / LEGACY_CLIENT_STATE}: client state in the layout of an older "
            "fedit, which cannot be resumed exactly; start the run again in a new output_dir"
        )
    candidates = [round_dir(output_dir, done[-1]) / CONFIG] if done else []
    saved = next((p for p in [*candidates, output_dir / CONFIG] if p.is_file()), None)
    if saved is None:  # nothing was saved: the run starts afresh
        return
    conflicts = resume_conflicts(load_config(saved), cfg)
    if conflicts:
        raise ConfigError(
            f"cannot resume {output_dir}: these keys differ from the saved run ({saved}): "
            f"{', '.join(conflicts)}. Only {', '.join(sorted(RESUMABLE_KEYS))} may change on "
            "--resume; use another output_dir for a new run"
        )
    if done:
        _check_inputs(output_dir, cfg)


def input_fingerprints(cfg: RunConfig) -> dict[str, dict[str, str]]:
    """{config key: {file: content fingerprint}} of the files the run reads its data (hashed
    whole) and its base model (weights sampled: fedit.fingerprint) from."""
    found = {
        key: {name: content_hash(Path(name)) for name in names}
        for key, names in data_files(cfg).items()
    }
    found["model.name_or_path"] = {str(p): sampled_fingerprint(p) for p in model_files(cfg.model)}
    return found


def _check_inputs(output_dir: Path, cfg: RunConfig) -> None:
    """Refuse to resume when a data file or the base model's files changed since the run
    started; an older run dir without inputs.json resumes unchecked, with a warning."""
    path = output_dir / INPUTS
    if not path.is_file():
        console.print(
            f"[bold yellow]warning[/]: {escape(str(output_dir))} has no input fingerprints "
            f"({INPUTS}, written since fedit checks them): the data files and base weights "
            "cannot be checked against those the saved rounds trained on"
        )
        return
    try:
        saved = json.loads(path.read_text())
    except ValueError as err:
        raise ConfigError(f"{path}: not valid JSON ({err}); restore it or start afresh") from None
    changes = input_changes(saved, input_fingerprints(cfg))
    if changes:
        raise ConfigError(
            f"cannot resume {output_dir}: {'; '.join(changes)}, so the rounds to come would "
            "train on other inputs than the saved ones; restore them, or start a new run in "
            "another output_dir"
        )


def input_changes(saved: dict[str, dict[str, str]], now: dict[str, dict[str, str]]) -> list[str]:
    """'<key>: <file> changed|added|removed since the run started' for each file whose
    fingerprint differs between two input_fingerprints answers."""
    changes = []
    for key in sorted(saved.keys() | now.keys()):
        old, new = saved.get(key, {}), now.get(key, {})
        for name in sorted(old.keys() | new.keys()):
            if old.get(name) == new.get(name):
                continue
            what = "added" if name not in old else "removed" if name not in new else "changed"
            changes.append(f"{key}: {name} {what} since the run started")
    return changes


def prepare_run_dir(output_dir: Path, cfg: RunConfig, done: list[int]) -> None:
    """Make `output_dir` ready for the next round: the first write of a run, made only once
    its config, data and model are known to be good.

    Leftovers of an interrupted write are removed; a fresh start (no committed round)
    also removes an earlier attempt's metrics and client state, so none of it leaks in.
    config.toml is (re)written only when it differs from the run's config (a resume may
    have changed RESUMABLE_KEYS), inputs.json at a fresh start (or on the first resume of
    an older run dir), clients.json with per-client files, and metrics.jsonl is rebuilt
    from the committed rounds.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    stale = list(output_dir.glob(".tmp-*"))
    if not done:
        stale += [output_dir / name for name in (METRICS, LEGACY_CLIENT_STATE)]
        stale.append(metrics_record(output_dir, 0))
    for path in stale:
        _remove(path)
    config = output_dir / CONFIG
    text = to_toml(cfg.to_dict())
    if not config.is_file() or config.read_text() != text:
        write_atomic(config, text)
    if not done or not (output_dir / INPUTS).is_file():  # a resume checked them
        write_atomic(output_dir / INPUTS, json.dumps(input_fingerprints(cfg), indent=1))
    clients = client_file_map(cfg)  # the files are those inputs.json fingerprints
    if clients:
        write_atomic(output_dir / CLIENT_FILES, json.dumps(clients, indent=1))
    rebuild_metrics(output_dir, done)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def rebuild_metrics(output_dir: Path, done: list[int]) -> None:
    """Write metrics.jsonl as the committed records say (round 0's and each round's line, in
    order), if it differs: this restores a line lost or cut short by a crash and drops lines
    of rounds never committed. Rounds saved by an older fedit, which kept no record, keep
    their line from metrics.jsonl."""
    path = output_dir / METRICS
    old = path.read_text() if path.is_file() else ""
    legacy = _lines_by_round(old)
    lines = []
    for r in [0, *done]:
        record = metrics_record(output_dir, r)
        if record.is_file():
            lines.append(record.read_text().strip())
        elif r in legacy:
            lines.append(legacy[r])
    text = "".join(line + "\n" for line in lines)
    if text != old:
        write_atomic(path, text)


def _lines_by_round(text: str) -> dict[int, str]:
    """{round: line} of a metrics.jsonl; unreadable lines (a cut-short last one) are skipped."""
    lines = {}
    for line in text.splitlines():
        try:
            lines[int(json.loads(line)["round"])] = line
        except (ValueError, KeyError, TypeError):  # JSONDecodeError is a ValueError
            continue
    return lines


def append_metrics(output_dir: Path, line: str) -> None:
    """Append a committed round's line to metrics.jsonl (rebuilt on resume if cut short)."""
    path = output_dir / METRICS
    try:
        with path.open("a") as f:
            f.write(line + "\n")
    except OSError as err:
        raise write_error(path, err, "the round is saved; --resume rebuilds the file") from err

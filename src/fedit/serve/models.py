"""The models `fedit serve` answers as: one base model in memory, every adapter beside it.

Each adapter is loaded once as a named PEFT adapter on the one base model, so switching
between them per request (``ModelPool.active``) costs a pointer change, not a reload. The
name "base" is the base model with every adapter disabled. Each adapter keeps the prompt
template and system prompt its run was trained with (the config.toml beside it, which
every round directory and `fedit personalize` adapter has), so a chat request is rendered
as its training records were; an adapter without one takes an explicit --config's, and
is refused otherwise, never given another adapter's.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from fedit.config import ConfigError, RunConfig, load_config
from fedit.engine.checkpoint import ROUND_PATTERN, completed_rounds, round_dir
from fedit.engine.run_dir import CONFIG
from fedit.models.adapters import BASE_RESIDUAL
from fedit.models.inference import ADAPTER_WEIGHTS, check_adapter_dir

BASE = "base"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")


@dataclass(frozen=True)
class ServedModel:
    """A name requests use, its adapter (None: the base model) and its prompt format."""

    name: str
    adapter: Path | None
    template: str  # fedit.data.templates: "chat" | "alpaca"
    system_prompt: str | None


def final_round(run_dir: Path) -> Path:
    """A run's last round directory (`run_dir` itself when it is a round directory)."""
    if (run_dir / ADAPTER_WEIGHTS).is_file():
        return run_dir
    rounds = completed_rounds(run_dir)
    if not rounds:
        raise FileNotFoundError(f"{run_dir}: no {ADAPTER_WEIGHTS} and no round_NNNN directory")
    return round_dir(run_dir, rounds[-1])


def parse_adapter(spec: str) -> tuple[str, Path]:
    """ "NAME=DIR" or "DIR" (named after the run directory) → (name, round directory)."""
    name, sep, path = spec.partition("=")
    if not sep:
        name, path = "", spec
    directory = final_round(Path(path))
    if not name:
        run = directory.parent if ROUND_PATTERN.match(directory.name) else directory
        name = run.name
    if not NAME.fullmatch(name) or name == BASE:
        raise ConfigError(
            f"--adapter {spec!r}: the name {name!r} must be 1-64 letters, digits or ._:- "
            f"and not {BASE!r}"
        )
    return name, directory


def comparison_adapters(directory: Path) -> list[tuple[str, Path]]:
    """Every trained contender of a `fedit compare` output directory, by its name."""
    runs = sorted(p for p in directory.iterdir() if p.is_dir() and completed_rounds(p))
    if not runs:
        raise FileNotFoundError(f"{directory}: no contender run directories (round_NNNN)")
    return [parse_adapter(f"{run.name}={run}") for run in runs]


def served_model(
    name: str, directory: Path, served: RunConfig, default: RunConfig | None = None
) -> ServedModel:
    """The adapter with the prompt format of the run that trained it: the config.toml
    beside it, else `default` (a config the user gave for it), else refused: another
    adapter's format would be a guess that changes what the model is asked."""
    check_adapter_dir(directory)
    if (directory / BASE_RESIDUAL).exists():
        raise ConfigError(
            f"{directory}: an exact-aggregation round keeps part of the model in the base "
            "weights, which the other served adapters share; serve its `fedit export` as "
            "the base model instead"
        )
    saved = directory / CONFIG
    if saved.is_file():
        run = load_config(saved)
    elif default is not None:
        run = default
    else:
        raise ConfigError(
            f"--adapter {name}={directory}: no {CONFIG} beside it, so the prompt format it "
            "was trained with (data.template, data.system_prompt) is unknown; put its run's "
            f"{CONFIG} there, or give that run's config with --config"
        )
    if run.model.name_or_path != served.model.name_or_path:
        raise ConfigError(
            f"{saved}: trained on model {run.model.name_or_path!r}, but the served base "
            f"model is {served.model.name_or_path!r}; serve each base model on its own"
        )
    return ServedModel(name, directory, run.data.template, run.data.system_prompt)


class ModelPool:
    """The base model (cfg.model), its tokenizer, and the served adapters loaded on it;
    `default` is the run config of adapters without their own (served_model)."""

    def __init__(
        self, cfg: RunConfig, adapters: list[tuple[str, Path]], default: RunConfig | None = None
    ) -> None:
        from peft import PeftModel

        from fedit.models.loading import load_model, load_tokenizer

        names = [name for name, _ in adapters]
        if len(set(names)) != len(names):
            raise ConfigError(f"adapter names must differ: {', '.join(names)}")
        self.models = {BASE: ServedModel(BASE, None, "chat", None)}
        self.models |= {name: served_model(name, d, cfg, default) for name, d in adapters}
        self.tokenizer = load_tokenizer(cfg.model)
        model = load_model(cfg.model)
        for i, (name, directory) in enumerate(adapters):
            try:
                if i == 0:
                    model = PeftModel.from_pretrained(model, str(directory), adapter_name=name)
                else:
                    model.load_adapter(str(directory), adapter_name=name)
            except (RuntimeError, ValueError) as err:  # e.g. shapes of another base model
                raise ConfigError(
                    f"{directory}: not an adapter of this base model: {err}"
                ) from None
        self.model = model.eval()
        self.context = getattr(model.config, "max_position_embeddings", None)

    @contextmanager
    def active(self, name: str) -> Iterator[torch.nn.Module]:
        """The model that answers as `name`, for one generation (the caller serialises)."""
        if name == BASE:
            if hasattr(self.model, "disable_adapter"):
                with self.model.disable_adapter():
                    yield self.model
            else:
                yield self.model
            return
        self.model.set_adapter(name)
        yield self.model

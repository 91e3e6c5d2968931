"""RunConfig: everything one run needs, as plain data, one section per TOML table.

Each section checks its own fields (its ``validate``); what one feature refuses of another
is a rule in fedit.config.rules, checked here for every run and again before each engine
starts for what that engine cannot run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from fedit.config import rules
from fedit.config.data import DataConfig, PartitionConfig
from fedit.config.deployment import DeployConfig, SecAggConfig
from fedit.config.federation import FederationConfig, StrategyConfig
from fedit.config.model import LoraConfig, ModelConfig
from fedit.config.security import AttackConfig, PrivacyConfig, ValidationConfig
from fedit.config.system import CompressionConfig, SystemConfig
from fedit.config.toml_write import to_toml
from fedit.config.training import DPOConfig, EvalConfig, TrainConfig


@dataclass
class RunConfig:
    """Everything one run needs. Sections map one-to-one to TOML tables."""

    # the run directory: config, metrics, round checkpoints (README: the run directory)
    output_dir: str = "runs/default"
    # the run seed: partitions, client selection, initialisation and every per-client draw derive
    # from it (fedit.seeding)
    seed: int = 42
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    deploy: DeployConfig = field(default_factory=DeployConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    system: SystemConfig = field(default_factory=SystemConfig)

    def validate(self) -> RunConfig:
        """Each section's fields, then the rules every run obeys; the first wrong one raises
        a ConfigError naming its field."""
        for section in fields(self):
            value = getattr(self, section.name)
            if dataclasses.is_dataclass(value):
                value.validate()
        rules.check(self)
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(to_toml(self.to_dict()))

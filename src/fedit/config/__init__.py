"""The one typed run config that flows from the CLI to the engine.

A run is described by a TOML file (see ``configs/``) plus ``--set section.key=value``
overrides. Everything is validated before any model or dataset is built (each section its
own fields, fedit.config.rules what features and engines refuse of each other), and the
resolved config is saved beside every checkpoint so each result can be traced back.
Validating imports no torch and none of the parts it names (fedit.plugins holds those).
"""

from fedit.config import rules
from fedit.config.data import PARTITION_METHODS, PREFERENCE_FORMATS, DataConfig, PartitionConfig
from fedit.config.deployment import DeployConfig, SecAggConfig
from fedit.config.federation import (
    RANK_AGGREGATIONS,
    SELECTIONS,
    FederationConfig,
    StrategyConfig,
    clients_per_round,
)
from fedit.config.fields import ConfigError
from fedit.config.model import EMBEDDED_MODEL, SHARED_FACTORS, LoraConfig, ModelConfig
from fedit.config.run import RunConfig
from fedit.config.security import (
    DATA_ATTACKS,
    MODEL_ATTACKS,
    AttackConfig,
    PrivacyConfig,
    ValidationConfig,
)
from fedit.config.system import CompressionConfig, SystemConfig
from fedit.config.toml_read import config_from_toml, load_config, parse_override
from fedit.config.toml_write import to_toml
from fedit.config.training import (
    DPO_LOSS_TYPES,
    MAX_STEPS_PER_ROUND,
    DPOConfig,
    EvalConfig,
    TrainConfig,
)

__all__ = [
    "DATA_ATTACKS",
    "DPO_LOSS_TYPES",
    "EMBEDDED_MODEL",
    "MAX_STEPS_PER_ROUND",
    "MODEL_ATTACKS",
    "PARTITION_METHODS",
    "PREFERENCE_FORMATS",
    "RANK_AGGREGATIONS",
    "SELECTIONS",
    "SHARED_FACTORS",
    "AttackConfig",
    "CompressionConfig",
    "ConfigError",
    "DPOConfig",
    "DataConfig",
    "DeployConfig",
    "EvalConfig",
    "FederationConfig",
    "LoraConfig",
    "ModelConfig",
    "PartitionConfig",
    "PrivacyConfig",
    "RunConfig",
    "SecAggConfig",
    "StrategyConfig",
    "SystemConfig",
    "TrainConfig",
    "ValidationConfig",
    "clients_per_round",
    "config_from_toml",
    "load_config",
    "parse_override",
    "rules",
    "to_toml",
]

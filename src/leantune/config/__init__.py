"""The run configuration: typed sections (:mod:`.schema`), loaded from YAML plus dotted
``section.key=value`` overrides (:mod:`.load`, :mod:`.parsing`), validated at load time
(:mod:`.validate`), with the catalog of task names a config may use (:mod:`.tasks`)."""

from leantune.config.load import describe_options, load_config, reference_yaml
from leantune.config.parsing import ConfigError, parse_override
from leantune.config.schema import (
                                    METHOD_LR,
                                    AdapterConfig,
                                    CheckpointConfig,
                                    Config,
                                    DataConfig,
                                    EvalConfig,
                                    FastForwardConfig,
                                    LoggingConfig,
                                    ModelConfig,
                                    ObjectiveConfig,
                                    OptimConfig,
                                    ReplayConfig,
                                    ScheduleConfig,
                                    TrainConfig,
)
from leantune.config.validate import parse_positions

__all__ = ["METHOD_LR", "AdapterConfig", "CheckpointConfig", "Config", "ConfigError",
           "DataConfig", "EvalConfig", "FastForwardConfig", "LoggingConfig", "ModelConfig",
           "ObjectiveConfig", "OptimConfig", "ReplayConfig", "ScheduleConfig", "TrainConfig",
           "describe_options", "load_config", "parse_override", "parse_positions",
           "reference_yaml"]

"""Shim for the issue-12 move: removed by the integrator."""
from .pipeline.config import (  # noqa: F401
    CONSTRAINT_KEYS,
    PER_ROW_KEYS,
    REQUIRED,
    SECTIONS,
    TOP_SCALARS,
    ConfigError,
    EngineSection,
    InputSection,
    JobConfig,
    ModelSection,
    OutputSection,
    PromptSection,
    SamplingSection,
    apply_overrides,
    constraint_problem,
    engine_config_error,
    engine_error_key,
    engine_kwargs,
    job_fingerprint,
    job_identity,
    load_job,
    output_dir,
    parse_job,
    preflight,
    resolve_path,
    sampling_kwargs,
    template_fields,
)
from .pipeline.config.engine_args import engine_checks as _engine_checks  # noqa: F401
from .pipeline.config.errors import Ctx as _Ctx  # noqa: F401
from .pipeline.config.errors import did_you_mean as _did_you_mean  # noqa: F401
from .pipeline.config.errors import one_line as _one_line  # noqa: F401
from .pipeline.config.errors import type_name as _type_name  # noqa: F401
from .pipeline.config.overrides import override_value as _override_value  # noqa: F401
from .pipeline.config.rules import INT32_MAX, INT64_MAX, INT64_MIN  # noqa: F401
from .pipeline.config.sections import all_rules as _all_rules
from .pipeline.config.values import check_value as _check_value  # noqa: F401
from .pipeline.config.yaml_lines import LineLoader as _LineLoader  # noqa: F401
from .pipeline.config.yaml_lines import yaml_load as _yaml_load  # noqa: F401

# the old names of the sections (ModelConfig clashed with engine.models.config.ModelConfig)
ModelConfig = ModelSection
InputConfig = InputSection
PromptConfig = PromptSection
SamplingConfig = SamplingSection
OutputConfig = OutputSection
EngineConfig = EngineSection
# the old rules table, now derived from the fields' metadata: (section, key) -> rule as a dict
_RULES = {key: rule.as_dict() for key, rule in _all_rules().items()}

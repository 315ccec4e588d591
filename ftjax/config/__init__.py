"""The whole ftjax config: each field declared once (`fields.py`), and validation before anything compiles.

Recipes in `configs/` start from `default_config()` and change what they need; `validate()` walks the
declaration, checking every field that can be checked without the model or the data, and raises
`ConfigError` naming the field, the value and what is valid. Checks that need the param tree (a regex that
matches nothing) or the run length (warmup longer than the run) are made by `ftjax.optim` / `ftjax.schedules` and
`ftjax.run` with the same error.
"""

from __future__ import annotations

import ml_collections

from ftjax.config import schema
from ftjax.config.checks import (
    Check,
    ConfigError,
    duration_to_steps,
    parse_duration,
    parse_layer_ranges,
    resolve_mesh_shape,
)
from ftjax.config.fields import (
    DTYPES,
    FIELDS,
    METRIC_MODES,
    MODEL_TASKS,
    OPTIMIZERS,
    REMAT_POLICIES,
    RULES,
    TASKS,
    TRACKERS,
    remat_policy,
    tracker_names,
)
from ftjax.config.nested import (
    GROUP_DEFAULTS,
    GROUP_FIELDS,
    GROUP_KEYS,
    RESERVED_GROUPS,
    SCHEDULE_DEFAULTS,
    SCHEDULE_FIELDS,
    SCHEDULE_KEYS,
    SCHEDULES,
    group_name,
    validate_schedule,
)
from ftjax.config.readme import markdown_table
from ftjax.config.schema import Field, Rule, set_field, with_overrides
from ftjax.config.schema import get as get_field

__all__ = [
    "DTYPES",
    "FIELDS",
    "GROUP_DEFAULTS",
    "GROUP_FIELDS",
    "GROUP_KEYS",
    "METRIC_MODES",
    "MODEL_TASKS",
    "OPTIMIZERS",
    "RESERVED_GROUPS",
    "RULES",
    "SCHEDULES",
    "SCHEDULE_DEFAULTS",
    "SCHEDULE_FIELDS",
    "SCHEDULE_KEYS",
    "TASKS",
    "TRACKERS",
    "Check",
    "ConfigError",
    "Field",
    "Rule",
    "default_config",
    "duration_to_steps",
    "get_field",
    "group_name",
    "markdown_table",
    "parse_duration",
    "parse_layer_ranges",
    "parse_recipe_arg",
    "resolve_mesh_shape",
    "set_field",
    "tracker_names",
    "validate",
    "validate_schedule",
    "with_overrides",
]


def default_config() -> ml_collections.ConfigDict:
    """Every field ftjax reads, with its default (see `fields.py`, or the README's config reference)."""
    return schema.build(FIELDS)


def validate(c: ml_collections.ConfigDict, section: str = "") -> ml_collections.ConfigDict:
    """Checks every declared field (and named check across fields) that needs neither the model nor the
    data; `section="optim"` checks only `c.optim` (then `c` may be a dict holding only that section).
    Returns the config unchanged; raises ConfigError."""
    schema.check(FIELDS, RULES, c, section)
    return c


def parse_recipe_arg(arg: str | None) -> dict[str, str]:
    """A recipe's `:arg` string, "quick,freeze=4" -> {"quick": "1", "freeze": "4"} (big_vision style)."""
    return dict(a.split("=", 1) if "=" in a else (a, "1") for a in (arg or "").split(",") if a)

"""The optim entries whose values are dicts or pairs: a schedule dict, `optim.groups` and `optim.unfreeze`;
and the fields of `optim.lora` (LORA_FIELDS, spliced into the declaration under "optim.lora.").

A schedule dict's keys are declared once here (SCHEDULE_FIELDS) and serve both `optim.schedule` and every
group's own `schedule`; a group's keys are GROUP_FIELDS. `ftjax.optim` reads the defaults from here too.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ftjax.config.checks import (
    Check,
    above,
    as_tuple,
    at_least,
    check_regex,
    duration,
    in_range,
    one_of,
    parse_duration,
    regex,
    require,
    unless,
)
from ftjax.config.schema import Field, as_dict, get

SCHEDULES = (
    "constant",
    "linear",
    "cosine",
    "warmup_cosine",
    "warmup_linear",
    "warmup_constant",
    "wsd",
    "inverse_sqrt",
    "polynomial",
    "step",
    "one_cycle",
    "stlr",
)
SCHEDULE_FIELDS = (
    Field("type", "warmup_linear", "LR schedule; formulas in `ftjax/schedules.py`", one_of(SCHEDULES)),
    Field(
        "warmup", 0.1, "linear ramp from 0 to the peak LR (schedules with warmup)", duration(), type=object
    ),
    Field(
        "decay",
        1.0,
        "length of the decay phase (wsd: the final decay; step: the interval), clipped to the run's end",
        duration(),
        type=object,
    ),
    Field("min_ratio", 0.0, "final LR as a fraction of the peak LR", in_range(0, 1, "[]")),
    Field("power", 1.0, "polynomial: exponent of the decay", above(0)),
    Field("gamma", 0.1, "step: factor applied to the LR every `decay` steps", in_range(0, 1, "(]")),
    Field("pct_start", 0.3, "one_cycle: fraction of the run spent rising to the peak", in_range(0, 1, "()")),
    Field(
        "cooldown",
        "linear",
        "wsd: shape of the final decay, `linear` or `1-sqrt` (Hägele et al. 2024): P - (P - E) * sqrt(s / D)",
        one_of(("linear", "1-sqrt"), '"linear" or "1-sqrt"'),
    ),
    Field("cut_frac", 0.1, "stlr (ULMFiT): fraction of the run spent rising to the peak", in_range(0, 1, "()")),
    Field("ratio", 32.0, "stlr (ULMFiT): peak LR / lowest LR", at_least(1)),
)
SCHEDULE_KEYS = tuple(f.path for f in SCHEDULE_FIELDS)
# A bare schedule dict (a group's, or a standalone one) takes these for the keys it leaves out; the run's
# optim.schedule fills a group's keys first. Unlike optim.schedule, a bare dict has no warmup by default.
SCHEDULE_DEFAULTS = {**{f.path: f.default for f in SCHEDULE_FIELDS if f.path != "type"}, "warmup": 0}
# optim.lora (ftjax/lora.py): adapters on the targeted nnx.Linear layers; all other params frozen (no state).
LORA_FIELDS = (
    Field(
        "rank",
        0,
        "adapter rank r (0 = LoRA off)",
        Check("an int >= 0 (0 = off)", ok=lambda v: isinstance(v, int) and v >= 0),
    ),
    Field("alpha", 16.0, "the update is scaled by s = alpha / rank (alpha / sqrt(rank) with rslora)", above(0)),
    Field("rslora", False, "rsLoRA (Kalajdzievski 2023): s = alpha / sqrt(rank) instead of alpha / rank"),
    Field("dora", False, "DoRA (Liu et al. 2024): W' = m * (W0 + s A B) / ||W0 + s A B||_c, magnitude m "
      "(one per output, from ||W0||_c) trained with the adapters"),
    Field("lr_ratio", 1.0, "LoRA+ (Hayou et al. 2024): lr of lora_b = lr_ratio x lr of lora_a (1 = plain "
      "LoRA; the paper suggests 16)", above(0)),
    Field("dropout", 0.0, "dropout rate on the adapter's input (training only)", in_range(0, 1, "[)")),
    Field(
        "targets",
        r".*/(query|value|q_proj|v_proj|c_attn|qkv_proj|q_lin|v_lin)",
        'regex fullmatching the module paths that get adapters, or "all-linear": every Linear but the task head '
        "(the default: the query/value projections, or the fused ones of GPT-2 and Phi-3, PEFT's defaults)",
        unless(("all-linear",), regex()),
    ),
    Field(
        "quantize_base",
        "",
        'QLoRA: the frozen base Linears (all but the head) stored as "int8" or "nf4" (block-wise absmax), '
        'dequantised in the step; "" = full precision',
        one_of(("", "int8", "nf4"), '"", "int8" or "nf4"'),
    ),
    Field("quantize_block", 64, "QLoRA: inputs per absmax block of a quantised kernel",
          Check("an even int >= 2", ok=lambda v: isinstance(v, int) and v >= 2 and v % 2 == 0)),
    Field("double_quant", False, "QLoRA: the block scales themselves stored in int8 (one float32 scale per 256)"),
    Field(
        "also_train",
        "auto",
        "params trained besides the adapters (PEFT's modules_to_save): `auto` = "
        'the model\'s head for tasks with a new head (none for causal_lm), "" = none, or a regex',
        unless(("auto", ""), regex()),
    ),
)

RESERVED_GROUPS = ("default", "frozen")  # the group of unmatched params; the label of frozen ones
_NAME_VALID = "a unique identifier (letters, digits, _), not 'default' or 'frozen'"
GROUP_FIELDS = (
    Field(
        "name",
        "group{i}",
        "the group's name in labels, logs and plots ({i}: its index)",
        Check(
            _NAME_VALID,
            ok=lambda v: (
                isinstance(v, str)
                and re.fullmatch(r"[A-Za-z_]\w*", v) is not None
                and v not in RESERVED_GROUPS
            ),
        ),
    ),
    Field("lr_mult", 1.0, "multiplies optim.lr (and the layer-wise decay) for the group", at_least(0)),
    Field(
        "weight_decay",
        None,
        "the group's decoupled weight decay; left out: optim.weight_decay",
        at_least(0),
        type=float,
    ),
    Field("schedule", {}, "a schedule dict overriding optim.schedule key by key", None, type=dict),
    Field(
        "frozen",
        False,
        "True freezes the group (no gradient, no optimizer state)",
        Check("True or False", ok=lambda v: isinstance(v, bool)),
    ),
)
GROUP_KEYS = tuple(f.path for f in GROUP_FIELDS)
GROUP_DEFAULTS = {f.path: f.default for f in GROUP_FIELDS}
_GROUP_VALID = "a (regex, {name, lr_mult, weight_decay, schedule, frozen}) pair"


def validate_schedule(spec: Mapping[str, Any], field: str) -> None:
    """A schedule dict's keys and values, by SCHEDULE_FIELDS; `type` is required."""
    spec = as_dict(spec)
    unknown = set(spec) - set(SCHEDULE_KEYS)
    require(not unknown, field, spec, f"unknown keys {sorted(unknown)}; valid: {SCHEDULE_KEYS}")
    for f in SCHEDULE_FIELDS:
        if f.path in spec or f.path == "type":
            f.check(spec.get(f.path), f"{field}.{f.path}", spec)


def check_schedule_keys(root: Any) -> None:
    """optim.schedule has no keys besides SCHEDULE_KEYS (its values are checked field by field)."""
    spec = as_dict(get(root, "optim.schedule"))
    unknown = set(spec) - set(SCHEDULE_KEYS)
    require(not unknown, "optim.schedule", spec, f"unknown keys {sorted(unknown)}; valid: {SCHEDULE_KEYS}")


def group_name(spec: Mapping[str, Any], i: int) -> str:
    return spec.get("name", GROUP_DEFAULTS["name"].format(i=i))


def _check_group(group: Any, i: int, field: str, names: set[str]) -> dict:
    at = f"{field}[{i}]"
    pair = isinstance(group, (tuple, list)) and len(group) == 2 and hasattr(group[1], "keys")
    require(pair, at, group, _GROUP_VALID)
    check_regex(group[0], f"{at}[0]")
    spec = as_dict(group[1])
    unknown = set(spec) - set(GROUP_KEYS)
    require(not unknown, f"{at}[1]", spec, f"unknown keys {sorted(unknown)}; valid: {GROUP_KEYS}")
    name = group_name(spec, i)
    require(name not in names, f"{at}.name", name, _NAME_VALID)
    names.add(name)
    for f in GROUP_FIELDS:
        if f.check is not None and (f.path in spec or f.path == "name"):
            f.check(name if f.path == "name" else spec[f.path], f"{at}.{f.path}")
    return spec


def check_groups(groups: Any, field: str, root: Any) -> None:
    """Each (regex, spec) pair; a group's schedule is checked merged over optim.schedule."""
    base = as_dict(get(root, "optim.schedule"))
    names = set(RESERVED_GROUPS)
    for i, group in enumerate(as_tuple(groups)):
        spec = _check_group(group, i, field, names)
        if "schedule" in spec:
            validate_schedule({**base, **as_dict(spec["schedule"])}, f"{field}[{i}].schedule")


def check_unfreeze(items: Any, field: str, root: Any) -> None:
    """Each (when, regex) pair: when is a step or "Nep" (checked against the run in ftjax.optim)."""
    for i, item in enumerate(as_tuple(items)):
        at = f"{field}[{i}]"
        pair = isinstance(item, (tuple, list)) and len(item) == 2
        require(pair, at, item, 'a (when, regex) pair; when = step (int) or "Nep"')
        unit, _ = parse_duration(item[0], f"{at}[0]")
        require(unit != "fraction" or isinstance(item[0], str), f"{at}[0]", item[0], "step or Nep")
        check_regex(item[1], f"{at}[1]")

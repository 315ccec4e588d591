"""The error every config check raises, small reusable checks, and the parsers of durations and layer ranges.

A `Check` knows what is valid (one line, shown in the error and the README table) and raises
`ConfigError(field, value, valid)`; the declaration in `ftjax/config/fields.py` attaches one to each field.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable
from typing import Any

from ftjax.errors import UserError


class ConfigError(UserError, ValueError):
    """A config value is invalid; the message names the field, the value and what is valid."""

    def __init__(self, field: str, value: Any, valid: str):
        self.field = field
        super().__init__(f"config.{field}={value!r} is invalid: {valid}")


def require(cond: bool, field: str, value: Any, valid: str) -> None:
    """Raises ConfigError(field, value, valid) unless `cond`."""
    if not cond:
        raise ConfigError(field, value, valid)


@dataclasses.dataclass(frozen=True)
class Check:
    """What is valid for a field, and the test. `ok(value)` for a plain test; `run(value, field, root)` for a
    check that raises its own ConfigError (per-item fields, messages that depend on the value, or reads
    of other fields of the config `root`)."""

    valid: str
    ok: Callable[[Any], bool] | None = None
    run: Callable[[Any, str, Any], None] | None = None

    def __call__(self, value: Any, field: str, root: Any = None) -> None:
        if self.run is not None:
            self.run(value, field, root)
            return
        try:
            good = bool(self.ok(value))
        except (TypeError, ValueError):  # e.g. a string where a number belongs
            good = False
        require(good, field, value, self.valid)


def one_of(choices: Iterable[Any], valid: str | None = None) -> Check:
    choices = tuple(choices)
    return Check(valid or f"one of {choices}", ok=lambda v: v in choices)


def at_least(lo: float, valid: str | None = None) -> Check:
    return Check(valid or f">= {lo}", ok=lambda v: v >= lo)


def above(lo: float, valid: str | None = None) -> Check:
    return Check(valid or f"> {lo}", ok=lambda v: v > lo)


def in_range(lo: float, hi: float, bounds: str = "[)", valid: str | None = None) -> Check:
    """lo..hi with "[" / "(" and "]" / ")" saying whether each end is included (the text in the message)."""
    low_ok = (lambda v: v >= lo) if bounds[0] == "[" else (lambda v: v > lo)
    high_ok = (lambda v: v <= hi) if bounds[1] == "]" else (lambda v: v < hi)
    text = valid or f"in {bounds[0]}{lo:g}, {hi:g}{bounds[1]}"
    return Check(text, ok=lambda v: low_ok(v) and high_ok(v))


def optional(check: Check) -> Check:
    """None or whatever `check` accepts."""
    valid = f"None or {check.valid}"
    if check.ok is not None:
        return Check(valid, ok=lambda v: v is None or check.ok(v))
    return Check(valid, run=lambda v, f, r: None if v is None else check(v, f, r))


def all_of(*checks: Check) -> Check:
    """Each check in turn; the first that fails raises."""

    def run(value, field, root):
        for check in checks:
            check(value, field, root)

    return Check("; ".join(c.valid for c in checks), run=run)


def unless(skip: Iterable[Any], check: Check, valid: str | None = None) -> Check:
    """`check`, except for the special values in `skip` (e.g. "head" or "" where a regex goes)."""
    skip = tuple(skip)
    text = valid or f"{' or '.join(repr(s) for s in skip)} or {check.valid}"
    return Check(text, run=lambda v, f, r: None if v in skip else check(v, f, r))


def check_regex(pattern: Any, field: str) -> None:
    require(isinstance(pattern, str), field, pattern, "must be a regex string")
    try:
        re.compile(pattern)
    except re.error as e:
        raise ConfigError(field, pattern, f"not a valid regex ({e})") from None


def regex() -> Check:
    return Check("a regex (fullmatch on '/'-joined param paths)", run=lambda v, f, r: check_regex(v, f))


def as_tuple(value: Any) -> tuple:
    """A str -> (str,); a list or tuple -> tuple; None -> ()."""
    return (value,) if isinstance(value, str) else tuple(value or ())


def regex_list() -> Check:
    def run(value, field, root):
        for i, pattern in enumerate(as_tuple(value)):
            check_regex(pattern, f"{field}[{i}]")

    return Check("a tuple of regexes", run=run)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ep|epoch|epochs|%)?\s*$")
DURATION_VALID = 'int steps, float fraction in [0, 1], "Nep" epochs or "N%" of the run'


def _parse_duration_str(value: str, field: str) -> tuple[str, float] | None:
    match = _DURATION.match(value)
    if not match:
        return None
    amount, unit = float(match.group(1)), match.group(2)
    if unit is None:
        if "." in match.group(1):  # "0.1" reads like the float 0.1 (a fraction), not 0 steps.
            return parse_duration(amount, field)
        return "steps", amount
    if unit == "%":
        if amount > 100:
            raise ConfigError(field, value, "a percentage of the run must be <= 100%")
        return "fraction", amount / 100.0
    return "epochs", amount


def parse_duration(value: Any, field: str) -> tuple[str, float]:
    """Returns ("steps" | "epochs" | "fraction", amount) for a schedule duration, or raises ConfigError."""
    if isinstance(value, bool):
        raise ConfigError(field, value, DURATION_VALID)
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(field, value, DURATION_VALID)
        return "steps", float(value)
    if isinstance(value, float):
        if not 0.0 <= value <= 1.0 or math.isnan(value):
            raise ConfigError(
                field, value, DURATION_VALID + " (a float above 1 is ambiguous: give int steps)"
            )
        return "fraction", value
    parsed = _parse_duration_str(value, field) if isinstance(value, str) else None
    if parsed is None:
        raise ConfigError(field, value, DURATION_VALID)
    return parsed


def duration() -> Check:
    return Check(DURATION_VALID, run=lambda v, f, r: parse_duration(v, f))


def duration_to_steps(value: Any, field: str, total_steps: int, steps_per_epoch: int) -> int:
    """A schedule duration in optimizer steps; raises ConfigError if it is longer than the run."""
    unit, amount = parse_duration(value, field)
    if unit == "steps":
        steps = int(amount)
    elif unit == "epochs":
        steps = round(amount * steps_per_epoch)
    else:
        steps = round(amount * total_steps)
    if steps > total_steps:
        raise ConfigError(field, value, f"is {steps} steps, longer than the run ({total_steps} steps)")
    return steps


_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")
LAYER_RANGES_VALID = 'comma list of "embeddings", "N" or "A-B" layer ranges'


def parse_layer_ranges(spec: str, field: str) -> tuple[bool, tuple[int, ...]]:
    """ "embeddings,0-7" -> (True, (0, ..., 7)); raises ConfigError on anything else."""
    embeddings, layers = False, []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if part in ("embeddings", "embed", "emb"):
            embeddings = True
            continue
        match = _RANGE.match(part)
        require(match is not None, field, spec, LAYER_RANGES_VALID)
        lo, hi = int(match.group(1)), int(match.group(2) or match.group(1))
        require(lo <= hi, field, spec, f"range {part} has its start after its end")
        layers.extend(range(lo, hi + 1))
    return embeddings, tuple(sorted(set(layers)))


def layer_ranges() -> Check:
    return Check(f'"" or a {LAYER_RANGES_VALID}', run=lambda v, f, r: parse_layer_ranges(v, f) if v else None)


def resolve_mesh_shape(mesh: Any, num_devices: int) -> dict[str, int]:
    """Mesh axis sizes with -1 filled in; raises ConfigError when they don't multiply to num_devices."""
    sizes = {a: mesh[a] for a in ("data", "fsdp", "tensor")}
    fixed = math.prod(v for v in sizes.values() if v != -1)
    for axis, v in sizes.items():
        if v == -1:
            if num_devices % fixed:
                raise ConfigError(f"mesh.{axis}", -1, f"{num_devices} devices are not divisible by {fixed}")
            sizes[axis] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise ConfigError("mesh", sizes, f"axis sizes must multiply to the {num_devices} devices")
    return sizes

"""What a declared config field is (path, default, type, doc, check), and the two walks over a declaration:
building the ConfigDict of defaults and checking a config against it."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import ml_collections
import numpy as np

from ftjax.config.checks import Check, ConfigError


@dataclasses.dataclass(frozen=True)
class Field:
    """One config field, declared once: `validate()`, `default_config()` and the README table read it."""

    path: str  # dotted, e.g. "optim.schedule.warmup" (relative for the entries of a dict, e.g. "warmup")
    default: Any
    doc: str  # one line for the README, with the unit
    check: Check | None = None
    # The ConfigDict type; None: type(default). `object` (a FieldReference) takes values of several types,
    # e.g. a duration that is int steps, a float fraction or a "3ep" string.
    type: type | None = None

    @property
    def field_type(self) -> type:
        return self.type or type(self.default)

    def initial(self) -> Any:
        """The value set in the ConfigDict: the default, a typed placeholder (None) or a FieldReference."""
        if self.default is None:
            return ml_collections.config_dict.placeholder(self.field_type)
        if self.type is object:
            return ml_collections.FieldReference(self.default, field_type=object)
        return self.default

    def validate(self, root: Any, prefix: str = "") -> None:
        if self.check is not None:
            self.check(get(root, self.path), prefix + self.path, root)


@dataclasses.dataclass(frozen=True)
class Rule:
    """A named check across fields (e.g. the batch divisible by the micro-batches); raises ConfigError
    naming `field`. Rules run after every field's own check passed."""

    name: str
    field: str
    valid: str  # one line for the README
    run: Callable[[Any], None]  # (root config) -> None, raises ConfigError


def get(root: Any, path: str) -> Any:
    """root["a"]["b"] for "a.b"; ConfigError naming the field when the config has no such field."""
    value = root
    for key in path.split("."):
        try:
            value = value[key]
        except (KeyError, AttributeError, TypeError):
            raise ConfigError(
                path, None, "missing: not a field of the config (start it from ftjax.config.default_config(); "
                "the README's config reference lists every field)"
            ) from None
    return value


def set_field(root: Any, path: str, value: Any) -> None:
    """root["a"]["b"] = value for "a.b" (numpy scalars as Python values); ConfigError naming the field when
    the config has no such field or the value has the wrong type for it."""
    get(root, path)
    *parents, leaf = path.split(".")
    node = get(root, ".".join(parents)) if parents else root
    if isinstance(value, np.generic):
        value = value.item()
    try:
        node[leaf] = value
    except TypeError as e:
        raise ConfigError(path, value, f"wrong type for this field ({e})") from None


def with_overrides(cfg: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A copy of `cfg` with dotted fields set ({"optim.lr": 1e-4}); ConfigError for a field it does not have."""
    out = copy.deepcopy(cfg)  # keeps typed-`object` fields (warmup: int or float)
    for path, value in overrides.items():
        set_field(out, path, value)
    return out


def as_dict(value: Any) -> dict:
    """A ConfigDict or mapping as a plain dict (FieldReferences resolved)."""
    return value.to_dict() if hasattr(value, "to_dict") else dict(value)


def build(fields: Iterable[Field]) -> ml_collections.ConfigDict:
    """The ConfigDict holding every field's initial value, nested by path."""
    root = ml_collections.ConfigDict()
    for f in fields:
        *parents, leaf = f.path.split(".")
        node = root
        for key in parents:
            if key not in node:
                node[key] = ml_collections.ConfigDict()
            node = node[key]
        node[leaf] = f.initial()
    return root


def check(fields: Iterable[Field], rules: Iterable[Rule], root: Any, section: str = "") -> None:
    """Every field check, then every rule, of the fields under `section` ("" = all); raises ConfigError."""
    prefix = section + "." if section else ""
    for f in fields:
        if f.path.startswith(prefix):
            f.validate(root)
    for rule in rules:
        if rule.field == section or rule.field.startswith(prefix):
            rule.run(root)

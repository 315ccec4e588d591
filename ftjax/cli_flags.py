"""Flag parsing for `python -m ftjax.main` that ends a user's mistake in one line: absl and ml_collections
parse the flags (and import the recipe, and apply `--config.a.b=...` overrides) before `main` runs, and their
own errors are tracebacks. Here a missing or failing recipe, a recipe's own argument check, an override of a
field that does not exist (with the closest names), a value of the wrong type and a bad flag value each
print `ftjax: error: ...` naming the flag and the fix, and exit with status 2 like every other user error."""

from __future__ import annotations

import difflib
import glob
import os
import re
import sys
from typing import NoReturn

from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OVERRIDE = re.compile(r"^--config\.([\w.]+)(?:=(.*))?$")


def recipes() -> list[str]:
    """The recipe files shipped in configs/ (paths as --config takes them, from the repository root)."""
    return sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
                  if not os.path.basename(p).startswith("_"))


def fail(message: str) -> NoReturn:
    """The end of a run a user's input stopped: one line on stderr (what, and the fix), exit status 2."""
    print(f"ftjax: error: {message}", file=sys.stderr)
    sys.exit(2)


def _config_arg(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _last_line(text: str) -> str:
    """The line of an error text that says what happened: the last one (a traceback's exception line), with
    the exception's class dropped where the message speaks for itself."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else text
    return re.sub(r"^(ValueError|KeyError|ConfigError|AssertionError): ", "", last)


def _field_paths() -> list[str]:
    from ftjax.config import FIELDS  # noqa: PLC0415 - only when an override failed

    return [f.path for f in FIELDS]


def unknown_override(argv: list[str]) -> str | None:
    """The first `--config.PATH=...` whose PATH is no declared field, as one line with the closest names
    (called once ml_collections refused an override, so it never second-guesses one that worked)."""
    paths = _field_paths()
    for arg in argv:
        m = _OVERRIDE.match(arg)
        if not m or m.group(1) in paths:
            continue
        path = m.group(1)
        close = difflib.get_close_matches(path, paths, n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(close)}?" if close else (
            "the fields are listed in README.md's config table (python -m ftjax.config --readme)")
        return f"--config.{path}: the config has no field {path!r}; {hint}"
    return None


def parse(argv: list[str]) -> list[str]:
    """absl's flag parsing (app.run's flags_parser) with every user mistake ending as one line, exit 2."""
    config = _config_arg(argv)
    if config is not None:
        path = config.split(":", 1)[0]
        if not os.path.isfile(path):
            listed = ", ".join(recipes()) or "none found"
            fail(f"--config={config}: no recipe file {path!r} (run from the repository root, or give its path); "
                  f"recipes: {listed}")
    try:
        rest = flags.FLAGS(argv)
    except flags.Error as e:  # a bad flag value, an unknown flag, or the recipe raising while it was loaded
        text = str(e)
        header = text.split(": ", 1)[0] if text.startswith("flag --") else ""
        line = _last_line(text)
        if text.startswith("Unknown command line flag"):
            fail(f"{text.splitlines()[0]} (python -m ftjax.main --help lists the flags)")
        fail(f"{header.removeprefix('flag ')}: {line}" if header and line not in text.splitlines()[0] else
              text.splitlines()[0].removeprefix("flag "))
    except (KeyError, AttributeError) as e:  # an override naming no field
        fail(unknown_override(argv) or f"a --config override failed: {_last_line(str(e))}")
    except (TypeError, ValueError) as e:  # an override's value of the wrong type
        bad = next((a for a in argv if _OVERRIDE.match(a)), "--config override")
        fail(f"{bad}: {_last_line(str(e))}")
    if config is not None:
        value = flags.FLAGS["config"].value
        try:
            getattr(value, "train", None)  # ml_collections keeps a recipe's import error until first use
        except OSError as e:
            cause = e.__cause__ or e
            fail(f"--config={config}: the recipe could not be loaded ({_last_line(str(cause))})")
    return rest

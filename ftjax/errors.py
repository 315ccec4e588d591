"""The one base class of the errors a user causes and can fix (a config value, a data file, a model folder, a
workdir, a checkpoint, a flag): `ftjax.main` ends the run with such an error's message, not a traceback."""

from __future__ import annotations


class UserError(Exception):
    """An error whose message names what the user gave (field, file, flag), what was wrong and the fix. Each
    kind subclasses it and a builtin (ValueError, FileNotFoundError ...) that says what sort of mistake it is."""

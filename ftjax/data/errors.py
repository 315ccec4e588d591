"""Errors of the data pipeline: each names the config field (or the file) at fault and how to fix it."""

from __future__ import annotations

from ftjax.errors import UserError


class DataError(UserError, ValueError):
    """Bad data or data config; the message names the `data.*` field or the file and the fix."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A data file, folder or dataset named by the config does not exist."""

"""The README's config reference, rendered from the declaration (`python -m ftjax.config --readme`)."""

from __future__ import annotations

import re
from typing import Any

from ftjax.config.fields import FIELDS, RULES
from ftjax.config.nested import GROUP_FIELDS
from ftjax.config.schema import Field

START = "<!-- config-table:start -->"
END = "<!-- config-table:end -->"
REGENERATE = "python -m ftjax.config --readme"
_SECTIONS = {
    "model": "what to load and how to run it",
    "data": "where examples come from and how they become batches",
    "optim": "the optimizer, LR schedule, weight decay, freezing and LoRA",
    "train": "batch size, run length, evaluation, early stopping, checkpoints, experiment trackers",
    "preference": "preference training (model.task=preference): the pair loss and the pairs' columns",
    "distill": "knowledge distillation from a teacher model run in the same step",
    "forgetting": "catastrophic-forgetting monitors, their reference text and budget",
    "mesh": "device mesh axis sizes",
}


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def format_default(value: Any) -> str:
    """A default as a README cell: strings in backticks (`""` when empty), numbers as written in Python."""
    if isinstance(value, str):
        return f"`{_cell(value)}`" if value else '`""`'
    if isinstance(value, float):
        return re.sub(r"e([+-])0*(\d)", lambda m: "e" + m.group(1).lstrip("+") + m.group(2), repr(value))
    if isinstance(value, (tuple, list, dict)):
        return f"`{_cell(repr(value))}`"
    return str(value)


def _row(path: str, f: Field) -> str:
    valid = [f.check.valid] if f.check is not None else []
    valid += [r.valid for r in RULES if r.field == path]  # the named checks across fields that name it
    valid = _cell("; ".join(valid))
    return f"| `{path}` | {format_default(f.default)} | {valid} | {_cell(f.doc)} |"


def markdown_table() -> str:
    """The config reference: one table per section, one row per field (the group keys under optim.groups),
    then the named checks across fields."""
    lines = [f"<!-- generated from ftjax/config/fields.py; regenerate with: {REGENERATE} -->"]
    for section, what in _SECTIONS.items():
        lines += [
            "",
            f"**{section}**: {what}",
            "",
            "| field | default | valid | meaning |",
            "|---|---|---|---|",
        ]
        for f in FIELDS:
            if f.path.split(".", 1)[0] != section:
                continue
            lines.append(_row(f.path, f))
            if f.path == "optim.groups":
                lines += [_row(f"optim.groups[i].{g.path}", g) for g in GROUP_FIELDS]
    lines += ["", "Checks across fields (`validate()` runs them after the fields):", ""]
    lines += [f"- `{r.name}`: `{r.field}` {_cell(r.valid)}" for r in RULES]
    return "\n".join(lines)


def replace_block(text: str, block: str) -> str:
    """`text` with what lies between the START and END markers replaced by `block`."""
    start, end = text.index(START) + len(START), text.index(END)
    return text[:start] + "\n" + block + "\n" + text[end:]


def readme_block(text: str) -> str:
    """What lies between the markers, without the newlines next to them."""
    return text[text.index(START) + len(START) : text.index(END)].strip("\n")


def update_readme(path: str) -> bool:
    """Rewrites the block of the README at `path`; returns whether it changed."""
    with open(path) as f:
        text = f.read()
    new = replace_block(text, markdown_table())
    if new != text:
        with open(path, "w") as f:
            f.write(new)
    return new != text

"""README.md is the user's reference: its config tables are the declaration's, and it matches .ci/run."""

import os
import re

from ftjax.config import default_config, markdown_table
from ftjax.config.readme import REGENERATE, readme_block

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(path) -> str:
    with open(path) as f:
        return f.read()


def _leaves(cfg, prefix=""):
    for key, value in cfg.items():
        path = f"{prefix}{key}"
        if hasattr(value, "items"):
            yield from _leaves(value, path + ".")
        else:
            yield path


def test_readme_config_tables_are_generated_from_the_declaration():
    readme = _read(os.path.join(REPO, "README.md"))
    assert readme_block(readme) == markdown_table(), (
        f"README.md's config reference is stale: run `{REGENERATE}` from the repository root"
    )


def test_readme_documents_every_config_field():
    readme = _read(os.path.join(REPO, "README.md"))
    missing = []
    for path in _leaves(default_config()):
        section, *_, leaf = path.split(".")
        # A field counts as documented when its full dotted name, or its leaf name in a row of its
        # section's table (e.g. "`data.lm.prompt_field` / `completion_field`"), appears.
        if f"`{path}`" in readme or re.search(rf"`{re.escape(section)}\.[^\n]*\b{re.escape(leaf)}\b", readme):
            continue
        missing.append(path)
    assert not missing, f"README.md does not document: {missing}"


def test_ci_runs_the_readme_test_command():
    readme = _read(os.path.join(REPO, "README.md"))
    commands = re.findall(r"```bash\n#[^\n]*\n([^\n]+)\n```", readme)
    assert len(commands) >= 2 and "pytest" in commands[1]
    ci = _read(os.path.join(REPO, ".ci", "run"))
    assert commands[1] in ci.splitlines()


def test_readme_lists_every_field_the_resume_policy_lets_change():
    from ftjax.workdir import CHANGEABLE

    text = _read(os.path.join(REPO, "README.md"))
    section = text[text.index("**Resume policy.**"):text.index("## The seven hyperparameters")]
    for field, effect in CHANGEABLE.items():
        assert f"| `{field}` | {effect} |" in section, field

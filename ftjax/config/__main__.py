"""`python -m ftjax.config [--readme [PATH]]`: print the config reference, or rewrite README.md's copy of it."""

from __future__ import annotations

import argparse

from ftjax.config.readme import markdown_table, update_readme


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ftjax.config", description=__doc__)
    parser.add_argument(
        "--readme",
        nargs="?",
        const="README.md",
        help="rewrite the config table between the markers of this README (default: ./README.md)",
    )
    args = parser.parse_args(argv)
    if args.readme is None:
        print(markdown_table())
        return
    changed = update_readme(args.readme)
    print(f"{args.readme}: config table {'updated' if changed else 'already up to date'}")


if __name__ == "__main__":
    main()

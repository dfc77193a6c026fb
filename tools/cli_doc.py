"""docs/cli.md, rendered from the click commands themselves so the reference cannot drift.

    python tools/cli_doc.py > docs/cli.md        (tests/apps/test_cli_doc.py checks it is current)
"""

from __future__ import annotations

import click

from ciss.apps.cli import main

HEADER = """# Command-line reference

Generated from `ciss --help` by `python tools/cli_doc.py > docs/cli.md`; a test fails when it is
out of date. Every command prints one line starting with `error:` and exits with code 2 on a
mistake a user can make (paths, names, corrupt files, missing hardware).
"""


def _help(command: click.Command, name: str, parent: click.Context | None = None) -> str:
    ctx = click.Context(command, info_name=name, parent=parent, terminal_width=100, max_content_width=100,
                        **main.context_settings)
    return command.get_help(ctx)


def render() -> str:
    root = click.Context(main, info_name="ciss", **main.context_settings)
    parts = [HEADER, "## ciss\n", "```text", _help(main, "ciss"), "```\n"]
    for name in sorted(main.commands):
        command = main.commands[name]
        parts += [f"## ciss {name}\n", "```text", _help(command, name, root), "```\n"]
        if isinstance(command, click.Group):
            group = click.Context(command, info_name=name, parent=root, **main.context_settings)
            for sub in sorted(command.commands):
                parts += [f"### ciss {name} {sub}\n", "```text", _help(command.commands[sub], sub, group), "```\n"]
    return "\n".join(parts)


if __name__ == "__main__":
    print(render(), end="")

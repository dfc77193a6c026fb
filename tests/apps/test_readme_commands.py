"""Every `ciss` command the README shows parses against the CLI as it is now (flags, choices,
subcommands), so the README cannot drift from the code between runs of `tools/readme_run.py`,
which runs them all; parsing them here takes milliseconds."""

from __future__ import annotations

import shlex

import click
import pytest
from conftest import REPO
from readme_run import readme_commands

from ciss.apps.cli import main


def ciss_commands() -> list[str]:
    commands = []
    for command in readme_commands(REPO / "README.md"):
        if command.text.startswith("ciss "):
            commands.append(command.text[len("ciss "):])
        elif command.text.startswith("torchrun ") and " -- " in command.text:
            commands.append(command.text.split(" -- ", 1)[1])
    return commands


def test_the_readme_shows_commands_of_every_stage():
    names = {shlex.split(c)[0] for c in ciss_commands()}
    assert {"learn", "eval", "runs", "export", "models", "live", "demo"} <= names


@pytest.mark.parametrize("command", ciss_commands())
def test_readme_command_parses(command: str):
    name, *rest = shlex.split(command)
    # The group's settings, as click would apply them: click caches each command's help option from
    # the first context it sees, so a bare context here would change `--help` for later callers.
    root = click.Context(main, info_name="ciss", **main.context_settings)
    cmd = main.get_command(root, name)
    assert cmd is not None, f"README shows `ciss {name}`, which is not a command"
    try:
        cmd.make_context(name, rest, parent=root).close()
    except click.UsageError as e:
        pytest.fail(f"README command `ciss {command}` does not parse: {e.format_message()}")

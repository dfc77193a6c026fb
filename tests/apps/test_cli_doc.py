"""docs/cli.md is the click help of every command, as the code stands."""

from cli_doc import render
from conftest import REPO

from ciss.apps.cli import main


def test_cli_reference_is_current():
    text = render()
    assert all(f"## ciss {name}\n" in text for name in main.commands)
    assert (REPO / "docs" / "cli.md").read_text() == text, \
        "docs/cli.md is out of date: run `python tools/cli_doc.py > docs/cli.md`"

"""docs/cli.md is the click help of every command, as the code stands."""

from conftest import REPO

from ciss.apps.cli import main
from ciss.apps.cli_doc import render


def test_cli_reference_is_current():
    text = render()
    assert all(f"## ciss {name}\n" in text for name in main.commands)
    assert (REPO / "docs" / "cli.md").read_text() == text, \
        "docs/cli.md is out of date: run `python -m ciss.apps.cli_doc > docs/cli.md`"

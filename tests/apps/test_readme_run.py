"""The README runner: what it extracts from a README, and that it judges real commands' exits by the
README's promises (exit 0, or exit 2 where the hardware is absent)."""

from __future__ import annotations

from pathlib import Path

from readme_run import (
    ABSENT,
    LONG,
    RUN,
    Runner,
    main,
    readme_commands,
    report,
)

README = """# t

```bash
make demo   # builds .venv
```

Text with `ciss learn ... --resume` inline, which is not a command.

```bash
# a comment line
echo one \\
    two                      # trailing comment
sleep 0.3 && echo late > late.txt &
echo error: no camera at --camera 0; echo ====; exit 2
```

  ```bash
  exit 3
  ```

```python
print("from python")
```
"""


def _readme(tmp_path: Path) -> Path:
    (tmp_path / "README.md").write_text(README)
    return tmp_path / "README.md"


def test_extracts_commands_in_order_with_blocks_and_background(tmp_path):
    commands = readme_commands(_readme(tmp_path))
    assert [c.text for c in commands] == ["make demo", "echo one two", "sleep 0.3 && echo late > late.txt",
                                          "echo error: no camera at --camera 0; echo ====; exit 2", "exit 3", 'print("from python")\n']
    assert [c.block for c in commands] == [0, 1, 1, 1, 2, 3]
    assert [c.background for c in commands] == [False, False, True, False, False, False]
    assert [c.rule.kind for c in commands] == [LONG, RUN, RUN, ABSENT, RUN, RUN]
    assert commands[-1].python


def test_runs_each_command_and_judges_its_exit(tmp_path):
    commands = readme_commands(_readme(tmp_path))
    outcomes = Runner(tmp_path, tmp_path / "logs", {RUN, ABSENT}, echo=False).run(commands)
    assert [o.ran for o in outcomes] == [False, True, True, True, True, True]
    assert [o.exit_code for o in outcomes[1:]] == [0, 0, 2, 3, 0]
    # exit 2 is what the README promises without a camera; exit 3 of a plain command is a failure
    assert [o.ok for o in outcomes] == [True, True, True, True, False, True]
    assert outcomes[1].last_line == "one two" and outcomes[-1].last_line == "from python"
    assert outcomes[3].last_line == "error: no camera at --camera 0"  # the reason, not a launcher's closing banner
    assert (tmp_path / "late.txt").read_text() == "late\n"  # the background job was waited for
    text = report(outcomes, "# header")
    assert "| 5 | `exit 3` | run | 3 |" in text and "**failed**" in text and "not run" in text


def test_refuses_a_folder_without_a_readme(tmp_path, capsys):
    assert main(["--workdir", str(tmp_path)]) == 2
    assert "has no README.md" in capsys.readouterr().err


def test_exits_1_when_a_command_fails(tmp_path):
    (tmp_path / "README.md").write_text("```bash\necho fine\nfalse\n```\n")
    (tmp_path / ".venv/bin").mkdir(parents=True)
    (tmp_path / ".venv/bin/ciss").touch()
    assert main(["--workdir", str(tmp_path)]) == 1
    assert "| 2 | `false` | run | 1 |" in (tmp_path / "out/readme-run/report.md").read_text()

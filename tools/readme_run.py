"""Runs every command the README shows, as written and in order, and reports what each one did.

    git clone <repo> ../readme-run && cd ../readme-run      # next to ../shared, so its paths resolve
    python3 tools/readme_run.py --long                      # stdlib only: `make demo` builds .venv first

A README drifts silently: a renamed flag, a step that no longer exists, a path that moved. Parsing
catches the first (tests/apps/test_readme_commands.py); only running catches the rest. Commands that
need hardware or data this machine lacks still run, and must fail the way the README promises (one
line, exit code 2); the long ones run with --long; the CamVid study (hours) runs only with --study.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

RUN, LONG, STUDY, ABSENT = "run", "long", "study", "absent here"


@dataclass(frozen=True)
class Rule:
    """How a command matching `pattern` is treated on a machine like this one (2 CPU cores)."""

    pattern: str
    kind: str
    why: str = ""
    exit_codes: tuple[int, ...] = (0,)  # what counts as doing what the README says


# First match wins; everything else is RUN and must exit 0.
RULES = (
    Rule(r"^make (demo|test)$", LONG, "builds .venv from scratch"),
    Rule(r"^ciss demo --data", LONG, "the CamVid demo, about 15 minutes"),
    Rule(r"camvid_protocol\.py", STUDY, "the CamVid study: hours, or seconds where its runs exist (read, not retrained)"),
    Rule(r"export_int8\.py", STUDY, "times the CamVid study's MiB run, which a clone lacks"),
    Rule(r"trainer_speed\.py|gsc_plasticity\.sh", LONG, "a benchmark, minutes"),
    Rule(r"--camera ", ABSENT, "no camera on this machine", (2,)),
    Rule(r"rtsp://", ABSENT, "no RTSP server on this network, no CUDA", (2,)),
    Rule(r"--trt\b", ABSENT, "TensorRT cannot be installed here; the ONNX version is still published", (2,)),
    # torchrun reports its worker's failure with exit code 1
    Rule(r"/data/VOC2012", ABSENT, "Pascal VOC is not on this machine", (1, 2)),
)


@dataclass(frozen=True)
class Command:
    text: str              # as the README shows it, continuation lines joined
    block: int             # index of its code block: background jobs are waited for at the block's end
    background: bool = False
    python: bool = False   # a ```python block, run as one script

    @property
    def shown(self) -> str:
        """One line for the log and the report."""
        return "python block" if self.python else self.text + (" &" if self.background else "")

    @property
    def rule(self) -> Rule:
        for rule in RULES:
            if re.search(rule.pattern, self.text):
                return rule
        return Rule("", RUN)


def readme_commands(readme: Path) -> list[Command]:
    """The shell commands of the README's ```bash blocks and its ```python blocks, in order."""
    commands = []
    blocks = re.findall(r"```(bash|python)\n(.*?)```", readme.read_text(), flags=re.DOTALL)
    for index, (language, body) in enumerate(blocks):
        if language == "python":
            commands.append(Command(body, index, python=True))
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line and not line.startswith("#"):
                background = line.endswith("&")
                text = " ".join(line.removesuffix("&").split())
                commands.append(Command(text, index, background))
    return commands


@dataclass
class Outcome:
    command: Command
    ran: bool
    exit_code: int | None = None
    seconds: float = 0.0
    last_line: str = ""

    @property
    def ok(self) -> bool:
        return not self.ran or self.exit_code in self.command.rule.exit_codes


def _environment(workdir: Path) -> dict[str, str]:
    """`ciss` and `python` are the clone's .venv (made by `make demo`), as they are for a reader."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PATH"] = f"{workdir / '.venv' / 'bin'}{os.pathsep}{env['PATH']}"
    return env


class Runner:
    def __init__(self, workdir: Path, logs: Path, kinds: set[str], echo: bool = True):
        self.workdir, self.logs, self.kinds, self.echo = workdir, logs, kinds, echo
        self.env = _environment(workdir)
        self.jobs: list[tuple[Outcome, subprocess.Popen[bytes], float, Path]] = []

    def _say(self, text: str) -> None:
        if self.echo:
            print(text, flush=True)

    def _start(self, number: int, command: Command) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.logs / f"{number:02d}.log"
        venv_python = self.workdir / ".venv/bin/python"
        python = str(venv_python) if venv_python.exists() else sys.executable
        args = [python, "-c", command.text] if command.python else ["bash", "-c", command.text]
        with open(log, "wb") as out:
            proc = subprocess.Popen(args, cwd=self.workdir, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        return proc, log

    def _finish(self, outcome: Outcome, proc: subprocess.Popen[bytes], started: float, log: Path) -> None:
        outcome.exit_code = proc.wait()
        outcome.seconds = time.monotonic() - started
        lines = [x.strip() for x in log.read_text(errors="replace").splitlines() if x.strip()]
        # a launcher (torchrun) ends with its own banner; the line that says why comes from ciss
        errors = [x for x in lines if x.startswith("error:")] if outcome.exit_code else []
        outcome.last_line = (errors or lines or [""])[-1]
        verdict = "ok" if outcome.ok else "FAILED"
        self._say(f"    -> exit {outcome.exit_code} in {outcome.seconds:.0f}s, {verdict}: {outcome.last_line[:120]}")

    def _wait_background(self) -> None:
        for job in self.jobs:
            self._finish(*job)
        self.jobs.clear()

    def run(self, commands: list[Command]) -> list[Outcome]:
        self.logs.mkdir(parents=True, exist_ok=True)
        outcomes: list[Outcome] = []
        block = None
        for number, command in enumerate(commands, 1):
            if command.block != block:
                self._wait_background()
                block = command.block
            outcome = Outcome(command, ran=command.rule.kind in self.kinds)
            outcomes.append(outcome)
            self._say(f"[{number:02d}] {command.rule.kind}: {command.shown}")
            if not outcome.ran:
                self._say(f"    -> not run ({command.rule.why}; --{command.rule.kind} runs it)")
                continue
            proc, log = self._start(number, command)
            job = (outcome, proc, time.monotonic(), log)
            if command.background:
                self.jobs.append(job)
            else:
                self._finish(*job)
        self._wait_background()
        return outcomes


def report(outcomes: list[Outcome], header: str) -> str:
    rows = [header, "", "| # | command | kind | exit | s | verdict | last line of output |", "|---|---|---|---|---|---|---|"]
    for number, o in enumerate(outcomes, 1):
        text = o.command.shown
        kind = o.command.rule.kind + (f" ({o.command.rule.why})" if o.command.rule.why else "")
        if not o.ran:
            rows.append(f"| {number} | `{text}` | {kind} | | | not run | |")
            continue
        verdict = "ok" if o.ok else "**failed**"
        last = o.last_line.replace("|", "\\|")[:160]
        rows.append(f"| {number} | `{text}` | {kind} | {o.exit_code} | {o.seconds:.0f} | {verdict} | {last} |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path.cwd(), help="a checkout next to ../shared (default: .)")
    parser.add_argument("--long", action="store_true", help="also `make demo`, `make test`, the CamVid demo, benchmarks")
    parser.add_argument("--study", action="store_true", help="also the CamVid study (hours)")
    parser.add_argument("--only", default="", help="run only the commands matching this regular expression")
    parser.add_argument("--out", type=Path, default=Path("out/readme-run"), help="logs and report.md (under workdir)")
    args = parser.parse_args(argv)
    workdir = args.workdir.resolve()
    readme = workdir / "README.md"
    if not readme.is_file():
        print(f"error: {workdir} has no README.md; give a checkout of ciss with --workdir", file=sys.stderr)
        return 2
    kinds = {RUN, ABSENT} | ({LONG} if args.long else set()) | ({STUDY} if args.study else set())
    if LONG not in kinds and not (workdir / ".venv/bin/ciss").exists():
        print(f"error: {workdir} has no .venv; run `make demo` there first, or pass --long", file=sys.stderr)
        return 2
    commands = [c for c in readme_commands(readme) if re.search(args.only, c.text)]
    out = workdir / args.out
    started = time.monotonic()
    outcomes = Runner(workdir, out, kinds).run(commands)
    minutes = (time.monotonic() - started) / 60
    failed = [o for o in outcomes if not o.ok]
    header = (f"# README commands, run as written\n\n`python3 tools/readme_run.py"
              f"{' --long' if args.long else ''}{' --study' if args.study else ''}` in {workdir}, "
              f"{minutes:.0f} min, {len(outcomes) - len(failed)} of {len(outcomes)} as the README says. "
              f"Logs: {args.out}/NN.log.")
    (out / "report.md").write_text(report(outcomes, header))
    print(f"{len(failed)} failed; report: {out / 'report.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

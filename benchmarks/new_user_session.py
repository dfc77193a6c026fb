"""A new user's first session, as the mission types it, in a fresh clone: no --run, --repo or --name.

    python benchmarks/new_user_session.py --out docs/results/new-user-session.md
    python benchmarks/new_user_session.py --iterations 20     # a quick check (each learn stops early)

Clones this checkout's HEAD next to it (so that ../shared/data resolves as it does for the user), then
in the clone, in order: `ciss learn --data ../shared/data/camvid --classes sky,building,road,tree`,
`ciss learn --new-classes car`, `ciss export --trt`, `ciss live --source <clip> --headless` and
`ciss live --camera 0`. Each must end as a user is promised: the two steps and the live run exit 0;
`export --trt` publishes the ONNX version and, where TensorRT is absent, exits 2 with one line saying
so; `live --camera 0` on a machine without a camera exits 2 with one line. It also checks what the
defaults chose (the run under runs/, the model under models/, the version served). The commands run
with this interpreter (--python; the environment `make test` builds) and the clone's own code.
Standard library only.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLIP = "../shared/data/videos/udacity_solidWhiteRight.mp4"


@dataclass
class Step:
    command: str
    exit_codes: tuple[int, ...]
    expect: tuple[str, ...]  # text the output must hold (what the defaults chose, the promised error line)
    why: str = ""


SESSION = (
    Step("ciss learn --data ../shared/data/camvid --classes sky,building,road,tree", (0,),
         ("runs/camvid",), "a new run named after the dataset under runs/"),
    Step("ciss learn --new-classes car", (0,), ("runs/camvid",), "the most recent run"),
    Step("ciss export --trt", (0, 2), ("models/camvid", "TensorRT"),
         "publishes the ONNX version to models/<run>; TensorRT is not installable here"),
    Step(f"ciss live --source {CLIP} --headless", (0,), ("camvid", "version 1"),
         "serves the most recently published model"),
    Step("ciss live --camera 0", (2,), ("camera",), "no camera on this machine: one line, exit 2"),
)


def run(step: Step, clone: Path, python: str, iterations: int) -> dict:
    argv = step.command.split()
    if argv[:2] == ["ciss", "learn"] and iterations:
        argv += ["--iterations", str(iterations)]
    env = dict(os.environ, PYTHONPATH=str(clone))
    start = time.monotonic()
    done = subprocess.run([python, "-m", "ciss.apps.cli", *argv[1:]], cwd=clone, env=env,
                          capture_output=True, text=True)
    wall = time.monotonic() - start
    output = done.stdout + done.stderr
    lines = [line for line in output.splitlines() if line.strip()]
    missing = [text for text in step.expect if text not in output]
    errors = [line for line in lines if line.startswith("error:")]
    ok = done.returncode in step.exit_codes and not missing and (done.returncode != 2 or len(errors) == 1)
    return {"command": " ".join(argv), "code": done.returncode, "wall": wall, "ok": ok, "missing": missing,
            "said": [line for line in lines if any(k in line for k in ("runs/", "models/", "aspect", "of training"))
                     or line.startswith(("error:", "warning:", "serving"))][:6],
            "last": lines[-1] if lines else ""}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python", default=sys.executable, help="interpreter with ciss's dependencies (default: this one)")
    ap.add_argument("--clone", type=Path, default=ROOT.parent / "ciss-new-user",
                    help="where to clone (replaced; must sit next to ../shared)")
    ap.add_argument("--iterations", type=int, default=0, help="stop each learn step after N iterations (quick check)")
    ap.add_argument("--out", type=Path, help="write the report (Markdown) here")
    args = ap.parse_args()
    if args.clone.exists():
        shutil.rmtree(args.clone)
    subprocess.run(["git", "clone", "-q", str(ROOT), str(args.clone)], check=True)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=args.clone, capture_output=True,
                          text=True, check=True).stdout.strip()
    results = []
    for step in SESSION:
        result = run(step, args.clone, args.python, args.iterations)
        results.append(result)
        print(f"{'ok ' if result['ok'] else 'BAD'} exit {result['code']} {result['wall']:7.1f} s  {result['command']}",
              flush=True)
        for line in result["said"]:
            print(f"      {line}")
        if result["missing"]:
            print(f"      missing from the output: {result['missing']}")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from machine import cpu_description

    lines = ["# A new user's first session, in a fresh clone", "",
             f"Commit {head}, {platform.python_version()}, {cpu_description()}; "
             + (f"each learn step stopped after {args.iterations} iterations." if args.iterations
                else "every command exactly as typed, default schedules."), "",
             "| command | exit | expected | wall (s) | what it said |", "|---|---|---|---|---|"]
    for step, r in zip(SESSION, results):
        said = "<br>".join(s.replace("|", "\\|") for s in r["said"]) or r["last"].replace("|", "\\|")
        lines.append(f"| `{r['command']}` | {r['code']} | {'/'.join(map(str, step.exit_codes))}: {step.why} | "
                     f"{r['wall']:.1f} | {said} |")
    lines += ["", "Command: `python benchmarks/new_user_session.py"
              + (f" --iterations {args.iterations}" if args.iterations else "") + "`"]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
    sys.exit(0 if all(r["ok"] for r in results) else 1)


if __name__ == "__main__":
    main()

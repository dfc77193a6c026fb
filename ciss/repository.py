"""The model repository: `models/<name>/<version>/`, each version whole, hashed and never changed.

A version is assembled in a hidden `.staging-<host>-<pid>-*` folder next to the versions, fsynced,
and renamed to the next integer in one step (`ciss.atomic`), so a reader (the live runtime, polling
for new models) sees either a complete version or nothing; the next publish removes staging folders
whose process died. Two exporters racing for the same number both succeed: renaming a folder onto
an existing non-empty one fails on Linux (ENOTEMPTY/EEXIST, see rename(2)), and the loser takes the
next number. Only the standard library and ciss's own plain modules are imported,
because the runtime reads the repository on robots that have no torch.

The repository is the contract between the exporter (which publishes) and the runtime (which reads
and follows it), so it lives in the shared layer and neither side imports the other.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from ciss.atomic import HOST, StagingFolder, remove_dead_staging
from ciss.classmap import ClassMap
from ciss.errors import CissError
from ciss.manifest import MANIFEST, MODEL_FORMAT, InputSpec, ModelManifest, fsync_dir, sha256_file, write_json_atomic

_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
_VERSION = re.compile(r"[1-9][0-9]*")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one stored version."""

    name: str
    version: int
    message: str

    def __str__(self) -> str:
        return f"{self.name}/{self.version}: {self.message}"


def check_name(name: str) -> str:
    """A model name becomes a folder name, so only a plain, visible, portable one is accepted."""
    if not _NAME.fullmatch(name or ""):
        raise CissError(f"invalid model name {name!r}: use letters, digits, '.', '_' and '-', "
                        "not starting with '.' (no path separators)")
    return name


def verify_version(path: Path, root: Path | None = None) -> ModelManifest:
    """The manifest of the version folder `path`, once every file a backend may open is listed with its
    size and sha256 and matches them, and the folder lies inside the repository `root` (by default
    the folder two levels up, as in `<root>/<name>/<version>`).

    The runtime calls this before swapping to a version, so a corrupt copy is refused with one line.
    """
    path = Path(path)
    manifest, problems = _check(path, path.parent.parent if root is None else Path(root))
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise CissError(f"model version {path} is corrupt: {problems[0]}{more}; publish it again")
    assert manifest is not None
    return ModelManifest.from_json(manifest, path / MANIFEST)


def _load_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_bytes())
    except OSError as e:
        raise CissError(f"cannot read {path}: {e.strerror}") from None
    except ValueError as e:  # invalid JSON or UTF-8
        raise CissError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MODEL_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise CissError(f"{path} is not a ciss model manifest (format {found!r})")
    return manifest


def _check(folder: Path, root: Path) -> tuple[dict[str, Any] | None, list[str]]:
    """The manifest (None if unreadable) and what is wrong with the version in `folder` of the
    repository at `root`."""
    real = folder.resolve()
    if not real.is_relative_to(root.resolve()):  # a link to a folder nobody published or hashed here
        return None, [f"{folder} links to {real}, outside the repository {root}"]
    try:
        manifest = _load_manifest(folder)
    except CissError as e:
        return None, [f"unreadable manifest: {e}"]
    problems: list[str] = []
    if _VERSION.fullmatch(folder.name) and manifest.get("version") != int(folder.name):
        problems.append(f"manifest says version {manifest.get('version')!r} but the folder is {folder.name}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return manifest, problems + ["manifest lists no files (each file needs its sha256 and size)"]
    for rel in _used_files(manifest):
        if not isinstance(rel, str) or not _is_relative(rel):
            problems.append(f"{rel!r} is not a file name inside the version folder")
        elif rel not in files:
            problems.append(f"{rel} is used by the model but not listed with its sha256 and size")
    for rel, entry in files.items():
        if not _is_relative(rel):
            problems.append(f"{rel!r} is not a file name inside the version folder")
            continue
        target = folder / rel
        if not target.resolve().is_relative_to(real):
            problems.append(f"{rel} links to {target.resolve()}, outside the version folder")
            continue
        try:
            size = target.stat().st_size
            if size != entry["size"]:
                problems.append(f"{rel} has {size} bytes, the manifest says {entry['size']} (truncated or replaced)")
            elif sha256_file(target) != entry["sha256"]:
                problems.append(f"{rel} does not match its sha256 (corrupt)")
        except FileNotFoundError:
            problems.append(f"{rel} is missing")
        except OSError as e:
            problems.append(f"{rel} cannot be read: {e.strerror}")
        except (KeyError, TypeError):
            problems.append(f"{rel} has no size and sha256 in the manifest")
    return manifest, problems


def _used_files(manifest: dict[str, Any]) -> list[Any]:
    """Every file a backend may open: model.onnx, each ONNX variant, and each engine with its sidecar
    and source graph (malformed entries come back as they are, to be refused)."""
    used: list[Any] = ["model.onnx"]
    variants, engines = manifest.get("variants") or {}, manifest.get("engines") or []
    used += [v.get("file") if isinstance(v, dict) else v for v in (variants.values() if isinstance(variants, dict)
                                                                  else [variants])]
    for e in engines if isinstance(engines, list) else [engines]:
        used += [e.get(k) for k in ("file", "manifest", "onnx") if k in e] if isinstance(e, dict) else [e]
    return used


def member(folder: Path, rel: Any) -> Path:
    """`folder / rel` for a file name a manifest gives; anything that could leave the folder is refused."""
    if not isinstance(rel, str) or not _is_relative(rel):
        raise CissError(f"{rel!r} is not a file name inside the version folder {folder}")
    return Path(folder) / rel


def _is_relative(rel: str) -> bool:
    """True for a plain relative path that stays inside the version folder."""
    p = PurePosixPath(rel)
    return rel not in ("", ".") and "\\" not in rel and str(p) == rel and not p.is_absolute() and ".." not in p.parts


def first_difference(new: ClassMap, old: ClassMap) -> str:
    """Where `new` stops extending `old` (called only when it does not)."""
    for a, b in zip(old, new):
        if b.name != a.name:
            return f"class {a.id} '{a.name}' was renamed to '{b.name}'"
        if b.color != a.color:
            return f"class {a.id} '{a.name}' changed colour from {list(a.color)} to {list(b.color)}"
    gone = old[len(new)]
    return f"class {gone.id} '{gone.name}' was removed"


class ModelRepository:
    """Versions of named models under one root folder; see docs/formats.md, "Model repository"."""

    def __init__(self, root: Path):
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise CissError(f"model repository {self.root} exists and is not a folder")

    def names(self) -> list[str]:
        """Models with at least one readable version."""
        return [n for n in self._name_dirs() if self.versions(n)]

    def versions(self, name: str) -> list[int]:
        """Integer folders with a readable manifest; staging folders and anything else are ignored."""
        found = []
        for v in self._version_dirs(name):
            try:
                _load_manifest(self.root / name / str(v))
            except CissError:
                continue
            found.append(v)
        return found

    def latest(self, name: str) -> int | None:
        versions = self.versions(name)
        return versions[-1] if versions else None

    def path(self, name: str, version: int | None = None) -> Path:
        """The folder of an existing version (the latest when `version` is None)."""
        versions = self.versions(name)
        if not versions:
            raise CissError(f"no model '{name}' in {self.root} (models: {', '.join(self.names()) or 'none'})")
        version = versions[-1] if version is None else version
        if version not in versions:
            raise CissError(f"model '{name}' has no version {version} (versions: {', '.join(map(str, versions))})")
        return self.root / name / str(version)

    def manifest(self, name: str, version: int | None = None) -> ModelManifest:
        """The manifest of a version (the latest when `version` is None), checked and typed."""
        path = self.path(name, version)
        return ModelManifest.from_json(_load_manifest(path), path / MANIFEST)

    def publish(self, name: str, files: Mapping[str, Path], manifest: Mapping[str, Any],
                allow_class_change: bool = False,
                stamp: Callable[[Path, int], Iterable[str]] | None = None) -> int:
        """Copy `files` (path inside the version -> source file) into the next version; return its number.

        `manifest` must hold "classes"; "format", "name", "version", "parent", "created" and "files"
        are filled in here. A class map that does not extend the latest version's is refused unless
        `allow_class_change`, since the runtime keeps class ids and colours stable across swaps.
        `stamp(staging, version)` may rewrite staged files once the number is known (the exporter
        writes it into the ONNX metadata) and returns the paths it wrote, which are hashed again;
        it runs again with the new number whenever another publisher took the number first.
        """
        check_name(name)
        if "classes" not in manifest:
            raise CissError(f"cannot publish '{name}': its manifest has no 'classes'")
        classes = ClassMap.from_json(manifest["classes"])
        for rel, src in files.items():
            if not _is_relative(rel) or rel == MANIFEST:
                raise CissError(f"cannot publish {rel!r}: give a relative path inside the version, not {MANIFEST}")
            if not Path(src).is_file():
                raise CissError(f"cannot publish {rel}: {src} is not a file")
        folder = self.root / name
        try:
            folder.mkdir(parents=True, exist_ok=True)
            remove_dead_staging(folder, HOST)
            with StagingFolder(folder, HOST) as staging:
                listed = {}
                for rel, src in sorted(files.items()):
                    (staging.path / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src, staging.path / rel)
                    listed[rel] = _describe(staging.path / rel)
                candidate = 0
                while True:
                    candidate = max(candidate, self._highest_entry(name)) + 1
                    parent = self.latest(name)
                    if parent is not None and not allow_class_change:
                        self.check_extends(name, parent, classes)
                    for rel in stamp(staging.path, candidate) if stamp else ():
                        listed[rel] = _describe(staging.path / rel)
                    created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
                    header = {"format": MODEL_FORMAT, "name": name, "version": candidate, "parent": parent,
                              "created": created}
                    write_json_atomic(staging.path / MANIFEST,
                                      {**header, **_without(manifest, header), "files": listed})
                    try:
                        staging.publish(folder / str(candidate))
                    except FileExistsError:
                        continue  # another publisher took this number (or it is a stray file): take the next
                    fsync_dir(self.root)  # the model's folder may be new
                    return candidate
        except OSError as e:
            raise _write_error(folder, e) from None

    def check_extends(self, name: str, parent: int, classes: ClassMap) -> None:
        """Refuse `classes` for a version of `name` unless it extends version `parent`'s class map."""
        old = self.manifest(name, parent).classes
        if not classes.is_extension_of(old):
            raise CissError(f"the new version of '{name}' does not extend version {parent}'s classes: "
                            f"{first_difference(classes, old)}; a version may only append classes "
                            "(publish under a new name, or allow it with --allow-class-change)")


    def verify(self, name: str | None = None, version: int | None = None) -> list[Problem]:
        """Re-hash every listed file of every version (or of `name`, or of one version).

        Integer folders whose manifest is present but unreadable are reported, not skipped.
        """
        if name is None:
            if version is not None:
                raise ValueError("verify: a version needs a model name")
            names = self._name_dirs()
        else:
            check_name(name)
            if not self._version_dirs(name):
                raise CissError(f"no model '{name}' in {self.root} (models: {', '.join(self.names()) or 'none'})")
            names = [name]
        problems = []
        for n in names:
            versions = self._version_dirs(n)
            if version is not None:
                if version not in versions:
                    raise CissError(f"model '{n}' has no version {version}")
                versions = [version]
            for v in versions:
                problems += [Problem(n, v, p) for p in _check(self.root / n / str(v), self.root)[1]]
        return problems

    def describe(self, name: str | None = None) -> str:
        """One table per model: what each version holds, for `ciss models`."""
        names = [check_name(name)] if name else self.names()
        if not names:
            raise CissError(f"no models in {self.root}; publish one with `ciss export`")
        blocks = []
        for n in names:
            versions = self.versions(n)
            if not versions:
                raise CissError(f"no model '{n}' in {self.root} (models: {', '.join(self.names()) or 'none'})")
            rows = [["version", "classes", "input", "precisions", "mIoU all/old/new %", "created"]]
            for v in versions:
                m = self.manifest(n, v)
                before = self.manifest(n, m.parent).classes if m.parent in versions else None
                rows.append([str(v), _classes_cell(m.classes, before), _input_cell(m.input),
                             ", ".join(_precisions(m)), "/".join(_pct((m.metrics or {}).get(k))
                                                                 for k in ("miou_all", "miou_old", "miou_new")),
                             m.created])
            widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
            lines = [f"{n}  ({self.root / n})"]
            lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
            blocks.append("\n".join(lines))
        return "\n\n".join(blocks)

    # --- internals ---------------------------------------------------------------------------------
    def _name_dirs(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _NAME.fullmatch(p.name))

    def _version_dirs(self, name: str) -> list[int]:
        """Integer folders holding a manifest.json, readable or not."""
        folder = self.root / check_name(name)
        if not folder.is_dir():
            return []
        return sorted(int(p.name) for p in folder.iterdir()
                      if _VERSION.fullmatch(p.name) and (p / MANIFEST).is_file())

    def _highest_entry(self, name: str) -> int:
        """The largest integer name in use, with or without a manifest, so no number is ever reused."""
        return max((int(p.name) for p in (self.root / name).iterdir() if _VERSION.fullmatch(p.name)), default=0)


def _describe(path: Path) -> dict[str, Any]:
    """A staged file as the manifest lists it."""
    return {"sha256": sha256_file(path), "size": path.stat().st_size}


def _without(manifest: Mapping[str, Any], header: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in manifest.items() if k not in header and k != "files"}


def _write_error(folder: Path, e: OSError) -> CissError:
    return CissError(f"cannot write to {folder}: {e.strerror or e}; check that it is writable and has "
                     "free space (nothing was published)")


def _classes_cell(classes: ClassMap, parent: ClassMap | None) -> str:
    """The class count, and which classes this version added to its parent."""
    if parent is None:
        return str(len(classes))
    if classes.is_extension_of(parent):
        added = classes.names[len(parent):]
        return f"{len(classes)} (+{', '.join(added)})" if added else str(len(classes))
    return f"{len(classes)} (changed)"


def _input_cell(spec: InputSpec | None) -> str:
    if spec is None:
        return "-"
    return "dynamic" if spec.dynamic or not spec.size else f"{spec.size[0]}x{spec.size[1]}"


def _precisions(manifest: ModelManifest) -> list[str]:
    """model.onnx's precision, the ONNX variants, then every TensorRT engine by its tag."""
    found = [manifest.precision] + sorted(manifest.variants)
    return found + [PurePosixPath(str(e.get("file"))).stem for e in manifest.engines]


def _pct(value: Any) -> str:
    return "-" if not isinstance(value, int | float) or math.isnan(value) else f"{100 * value:.1f}"

"""Dataset readers behind one entry point, so the CLI and the step loop never import a reader by name."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable

from ciss.errors import CissError
from ciss.trainer.data.base import SegDataset
from ciss.trainer.registry import Registry

# Imported on first use: each reader pulls in only what it needs. A reader takes (root, split, **options);
# "synthetic" alone takes (split, **options).
READERS: Registry[Callable[..., SegDataset]] = Registry("dataset kind", {
    "folder": "ciss.trainer.data.folder:FolderDataset",
    "voc": "ciss.trainer.data.voc:VOCDataset",
    "ade20k": "ciss.trainer.data.ade20k:ADE20KDataset",
    "cityscapes": "ciss.trainer.data.cityscapes:CityscapesDataset",
    "synthetic": "ciss.trainer.data.synthetic:SyntheticDataset",
})


def open_dataset(kind: str | None, root: Path | str | None, split: str, **options: Any) -> SegDataset:
    """A split of a dataset. No kind: a root means the folder format, no root means synthetic data."""
    kind = kind or ("folder" if root is not None else "synthetic")
    reader = READERS[kind]
    if kind != "synthetic" and root is None:
        raise CissError(f"dataset kind '{kind}' needs the dataset's root folder")
    args = (split,) if kind == "synthetic" else (Path(root), split)  # type: ignore[arg-type]
    try:
        return reader(*args, **options)
    except TypeError as e:
        if options and "unexpected keyword argument" in str(e):
            raise CissError(f"dataset kind '{kind}' does not take options {', '.join(options)}") from e
        raise


def open_splits(cfg: dict[str, Any]) -> tuple[SegDataset, SegDataset]:
    """The train and eval splits that a resolved config's `[data]` table names."""
    d = cfg["data"]
    kind = d["kind"] or None
    root = Path(d["root"]) if d["root"] else None
    return open_dataset(kind, root, d["train_split"], **d["options"]), open_dataset(kind, root, d["eval_split"], **d["options"])


def native_ids(ds: SegDataset, names: Iterable[str]) -> list[int]:
    """The dataset's own class indices of `names`, in their order."""
    index = {n: i for i, n in enumerate(ds.info.class_names)}
    return [index[n] for n in names]

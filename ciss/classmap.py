"""ClassMap: the ordered, append-only vocabulary shared by trainer, exporter and runtime.

A class's id is the model's output channel. Id 0 is background: whatever the model has not been
taught yet. Steps may only append classes, so ids, names and colours of earlier classes never move,
which is what lets the runtime swap to a model with more classes and keep its output stable.
"""

from __future__ import annotations

import colorsys
import json
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from ciss.errors import CissError

BACKGROUND = "background"
IGNORE = 255  # the label of pixels no loss or metric counts (void, padding, unseen classes)


def mask_dtype(num_classes: int) -> str:
    """The numpy dtype of a class-id mask: 8 bits up to 255 classes (so IGNORE stays apart), else 16."""
    return "uint8" if num_classes <= 255 else "uint16"
Color = tuple[int, int, int]


@dataclass(frozen=True)
class ClassInfo:
    id: int
    name: str
    color: Color
    step: int


def default_color(index: int) -> Color:
    """A distinct, deterministic RGB colour for classes that bring none of their own."""
    hue = (index * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.65, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


class ClassMap:
    def __init__(self, classes: Sequence[ClassInfo]):
        classes = tuple(classes)
        if not classes or classes[0].name != BACKGROUND:
            raise CissError("a class map must start with 'background' at id 0")
        for i, c in enumerate(classes):
            if c.id != i:
                raise CissError(f"class map ids must be 0..{len(classes) - 1} in order; got {c.id} at {i}")
        names = [c.name for c in classes]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise CissError(f"duplicate class names in class map: {', '.join(dup)}")
        self.classes = classes

    @classmethod
    def initial(cls, names: Sequence[str], colors: Sequence[Color] | None = None) -> "ClassMap":
        base = ClassMap([ClassInfo(0, BACKGROUND, (0, 0, 0), 0)])
        return base.extend(names, colors, step=0)

    def extend(self, names: Sequence[str], colors: Sequence[Color] | None = None,
               step: int | None = None) -> "ClassMap":
        """A new map with `names` appended as one step."""
        if not names:
            raise CissError("a step must add at least one class")
        step = self.num_steps if step is None else step
        known = set(self.names)
        for n in names:
            if n == BACKGROUND:
                raise CissError("'background' is implicit (id 0) and cannot be learned as a class")
            if n in known:
                raise CissError(f"class '{n}' is already in the class map (id {self.index(n)})")
            known.add(n)
        if len(set(names)) != len(names):
            raise CissError(f"duplicate class names in the new step: {', '.join(names)}")
        colors = list(colors) if colors is not None else [default_color(len(self) + i) for i in range(len(names))]
        added = [ClassInfo(len(self) + i, n, tuple(int(v) for v in colors[i]), step)  # type: ignore[arg-type]
                 for i, n in enumerate(names)]
        return ClassMap(self.classes + tuple(added))

    # --- views -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.classes)

    def __iter__(self):
        return iter(self.classes)

    def __getitem__(self, i: int) -> ClassInfo:
        return self.classes[i]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ClassMap) and self.classes == other.classes

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def colors(self) -> list[Color]:
        return [c.color for c in self.classes]

    @property
    def num_steps(self) -> int:
        return max(c.step for c in self.classes) + 1

    def step_sizes(self) -> list[int]:
        """Classes per step, background counted in step 0: the sizes of the per-step heads."""
        sizes = [0] * self.num_steps
        for c in self.classes:
            sizes[c.step] += 1
        return sizes

    def ids_of_step(self, step: int) -> list[int]:
        return [c.id for c in self.classes if c.step == step and c.name != BACKGROUND]

    def index(self, name: str) -> int:
        for c in self.classes:
            if c.name == name:
                return c.id
        raise CissError(f"unknown class '{name}'; known: {', '.join(self.names[1:])}")

    def until(self, step: int) -> "ClassMap":
        """The map as it was after `step` (classes added later dropped)."""
        return ClassMap([c for c in self.classes if c.step <= step])

    def is_extension_of(self, other: "ClassMap") -> bool:
        """True when every class of `other` keeps its id, name and colour here."""
        return len(self) >= len(other) and all(
            (a.id, a.name, a.color) == (b.id, b.name, b.color) for a, b in zip(self.classes, other.classes))

    # --- serialisation -----------------------------------------------------------------------
    def to_json(self) -> list[dict[str, Any]]:
        return [{"id": c.id, "name": c.name, "color": list(c.color), "step": c.step} for c in self.classes]

    @classmethod
    def from_json(cls, data: Iterable[dict[str, Any]] | str) -> "ClassMap":
        if isinstance(data, str):
            data = json.loads(data)
        try:
            return ClassMap([ClassInfo(int(d["id"]), str(d["name"]), tuple(int(v) for v in d["color"]),  # type: ignore[arg-type]
                                       int(d["step"])) for d in data])
        except (KeyError, TypeError, ValueError) as e:
            raise CissError(f"malformed class map: {e}") from e

    def __repr__(self) -> str:
        return f"ClassMap({', '.join(f'{c.id}:{c.name}@{c.step}' for c in self.classes)})"


# A class whose IoU on the eval split ends below this has not been learned: the model (almost) never
# predicts it, so a user must be told before exporting or watching for it live (issue 14, point 2).
UNLEARNED_IOU = 0.05


def unlearned(classmap: ClassMap, metrics: dict[str, Any] | None) -> list[int]:
    """Ids of the classes the map's last step added whose eval IoU is below UNLEARNED_IOU.

    A class without ground truth in the eval split has no IoU and is not flagged: nothing says it failed.
    """
    per_class = (metrics or {}).get("per_class") or {}
    last = classmap.num_steps - 1
    return [i for i in classmap.ids_of_step(last)
            if per_class.get(classmap[i].name) is not None and per_class[classmap[i].name] < UNLEARNED_IOU]


def unlearned_warning(classmap: ClassMap, metrics: dict[str, Any] | None) -> str | None:
    """The one-line warning for `unlearned` classes, or None when the step learned all it could be judged on."""
    ids = unlearned(classmap, metrics)
    if not ids:
        return None
    per_class = metrics["per_class"]  # type: ignore[index]
    listed = ", ".join(f"{classmap[i].name} (IoU {100 * per_class[classmap[i].name]:.1f}%)" for i in ids)
    return (f"WARNING: step {classmap.num_steps - 1} did not learn {listed} on the eval split; "
            f"a model from it will (almost) never show {'it' if len(ids) == 1 else 'them'}. "
            "Train longer (--epochs or --iterations), raise --lr, or try another --method")

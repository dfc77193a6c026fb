"""A robot loop that acts on one class's pixels, with the model hot-swapping underneath it.

Steers towards the side of the image where `--target` covers more pixels, and stops when it
fills the centre. The class may not exist yet: the loop keeps running and starts acting the frame
after a model version that knows it is published (`ciss export` from a run that learned it).

    python examples/follow_class.py --repo models --name robot --target car --source 0
"""

from __future__ import annotations

import argparse

from ciss.runtime import Result, Segmenter
from ciss.runtime.sources import open_source


def command(result: Result, target: str) -> tuple[str, float]:
    """'left', 'right', 'stop' or 'search' from where the target's pixels are, and their share."""
    if target not in result.classmap.names:
        return "search", 0.0
    hit = result.mask == result.classmap.index(target)
    w = hit.shape[1]
    share = float(hit.mean())
    if hit[:, w // 3: 2 * w // 3].mean() > 0.25:
        return "stop", share
    left, right = hit[:, : w // 2].sum(), hit[:, w // 2:].sum()
    if share < 0.005:
        return "search", share
    return ("left" if left > right else "right"), share


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--target", required=True, help="class name to follow")
    ap.add_argument("--source", default="0", help="camera index, video file, URL or 'synthetic'")
    ap.add_argument("--max-frames", type=int)
    args = ap.parse_args()

    with Segmenter.from_repository(args.repo, args.name, on_swap=lambda old, new: print(f"model v{old} -> v{new}"),
                                   on_error=lambda e: print(f"ignored a bad version: {e}")) as seg, \
            open_source(args.source, log=print) as source:
        frames = 0
        while (frame := source.read()) is not None and frames != args.max_frames:
            result = seg(frame.image)
            action, share = command(result, args.target)
            print(f"frame {frame.index} v{result.version}: {action} "
                  f"({100 * share:.1f}% {args.target}, {result.timings['total']:.0f} ms)")
            frames += 1


if __name__ == "__main__":
    main()

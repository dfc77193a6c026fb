"""Seconds per iteration of the engine with each method against a bare PyTorch loop.

All variants train step 1 of the same run (so MiB and PLOP pay for their frozen old model), on the
same model, data, crop and batch. Each variant runs in its own process (peak memory is per
process) and the variants are interleaved over rounds, so machine noise hits them alike; the
ratios to the bare loop are the numbers to read.

    python benchmarks/trainer_speed.py --model tiny --iters 40 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("bare", "ft", "mib", "plop", "gsc", "idec")


def config_text(model: str, batch: int, crop: int, iters: int, workers: int, data_size: int) -> str:
    # epochs_next is chosen so step 1 runs `iters` iterations over `data_size` images.
    epochs = max(1, -(-iters * batch // data_size))
    return f"""
seed = 0
[model]
preset = "{model}"
[data.options]
size = {data_size}
[train]
batch_size = {batch}
crop = {crop}
epochs = 1
epochs_next = {epochs}
workers = {workers}
log_every = 1
checkpoint_every = 100000
"""


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_engine(run: Path, cfg: Path, method: str, warmup: int) -> dict:
    from ciss.trainer.learn import learn

    learn(run, new_classes=["box", "triangle"], config_file=cfg, method=method, log=lambda s: None)
    records = [json.loads(line) for line in (run / "step-1" / "train_log.jsonl").read_text().splitlines()]
    t = {r["iteration"]: r["elapsed_s"] for r in records}
    last = max(t)
    return {"s_per_it": (t[last] - t[warmup]) / (last - warmup), "iterations": last}


def run_bare(run: Path, cfg: Path, warmup: int) -> dict:
    """The same model, data loader and optimiser in the plainest loop PyTorch allows."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from ciss.trainer.config import TRAINING
    from ciss.trainer.data import open_dataset
    from ciss.trainer.data.tasks import StepData, pad_collate, presence, train_indices, train_lut
    from ciss.trainer.data.transforms import TrainTransform
    from ciss.trainer.distributed import ShardedBatches
    from ciss.trainer.models.norm import freeze_batchnorm
    from ciss.trainer.store import RunStore

    c = TRAINING.resolve(cfg)
    store = RunStore(run)
    model, manifest = store.load(0)
    model.add_step(2, init_from_background=True)
    cmap = store.classmap(0).extend(["box", "triangle"])
    ds = open_dataset(None, None, "train", **c["data"]["options"])
    native = [ds.info.class_names.index(n) for n in ("box", "triangle")]
    idx = train_indices(presence(ds), native, [], "overlap")
    transform = TrainTransform(c["train"]["crop"], manifest.normalisation)
    data = StepData(ds, idx, train_lut(ds.info, cmap, 1), transform, seed=0)
    model.train()
    if c["train"]["freeze_bn_next"]:  # as the engine does at steps > 0
        freeze_batchnorm(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9,
                          weight_decay=1e-4)
    times, it = [], 0
    epochs = c["train"]["epochs_next"]
    t0 = time.perf_counter()
    for epoch in range(epochs):
        loader = DataLoader(data, batch_sampler=ShardedBatches(len(idx), c["train"]["batch_size"], 0, 1, 0, epoch),
                            num_workers=c["train"]["workers"], collate_fn=pad_collate)
        for images, labels in loader:
            loss = F.cross_entropy(model(images), labels, ignore_index=255)
            opt.zero_grad()
            loss.backward()
            opt.step()
            it += 1
            times.append(time.perf_counter() - t0)
    return {"s_per_it": (times[-1] - times[warmup - 1]) / (it - warmup), "iterations": it}


def one(variant: str, base_run: Path, cfg: Path, warmup: int) -> None:
    work = Path(tempfile.mkdtemp(prefix=f"bench-{variant}-"))
    run = work / "run"
    shutil.copytree(base_run, run)
    try:
        result = run_bare(run, cfg, warmup) if variant == "bare" else run_engine(run, cfg, variant, warmup)
        result["peak_mb"] = peak_memory_mb()
        print(json.dumps(result))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--crop", type=int, default=96)
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--base", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--cfg", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        one(args.one, args.base, args.cfg, args.warmup)
        return

    work = Path(tempfile.mkdtemp(prefix="bench-trainer-"))
    try:
        cfg = work / "bench.toml"
        cfg.write_text(config_text(args.model, args.batch_size, args.crop, args.iters, args.workers, 200))
        from ciss.trainer.learn import learn

        print(f"training a base step ({args.model}) ...", file=sys.stderr)
        learn(work / "base", classes=["sky", "grass", "water", "disk"], config_file=cfg, method="ft",
              overrides={"train": {"epochs": 1}}, log=lambda s: None)
        results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        for r in range(args.rounds):
            for v in VARIANTS:
                out = subprocess.run([sys.executable, __file__, "--one", v, "--base", str(work / "base"),
                                      "--cfg", str(cfg), "--warmup", str(args.warmup)],
                                     capture_output=True, text=True, check=True)
                results[v].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"round {r + 1}/{args.rounds} {v}: {results[v][-1]['s_per_it']:.4f} s/it", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"\nmodel {args.model}, batch {args.batch_size}, crop {args.crop}, {args.iters} iterations, "
          f"{args.rounds} rounds, device {device}, torch threads {torch.get_num_threads()}")
    bare = statistics.median(r["s_per_it"] for r in results["bare"])
    print(f"{'variant':<8}{'s/iter':>10}{'x bare':>9}{'peak MB':>10}")
    for v in VARIANTS:
        s = statistics.median(r["s_per_it"] for r in results[v])
        mem = max(r["peak_mb"] for r in results[v])
        print(f"{v:<8}{s:>10.4f}{s / bare:>9.3f}{mem:>10.0f}")


if __name__ == "__main__":
    main()

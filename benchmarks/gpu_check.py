"""One prepared pass over what only an NVIDIA GPU can check, in well under 8 minutes, as one table.

Device time is scarce and the CPU machine cannot run any of it, so every check is here, small and
bounded: a training step with AMP against fp32 (s/iter, peak memory, loss finite); a `torchrun` NCCL
step with one process; `ciss learn` itself on CUDA (under torchrun, AMP; an FT, a GSC and an IDEC step);
the runtime's model under torch on CUDA on the dash-cam clip (FPS, masks against ONNX Runtime on the
CPU); ONNX Runtime's CUDA provider when its libraries load (else the reason); the float16 export
against fp32. A failing check is a row with its reason, not an abort.
Without a CUDA GPU it prints "no CUDA GPU: skipped" and exits 0.

    python benchmarks/gpu_check.py [--clip VIDEO]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

CLIP = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "videos" / "udacity_solidWhiteRight.mp4"
PRESET, CLASSES, SIZE = "mobilenet_v3_large", 12, (360, 480)
Row = tuple[str, str, str]  # check, result, detail


def cuda_problem() -> str | None:
    """Why there is no CUDA GPU to check on, or None."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    return None if torch.cuda.is_available() else "torch sees no CUDA device"


def train_step(amp: bool, steps: int = 10) -> Row:
    """s/iter, peak memory and a finite loss for one optimisation step of the edge preset."""
    import torch

    from ciss.trainer.models import build_model

    torch.manual_seed(0)
    model = build_model(PRESET, [CLASSES]).cuda().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    x = torch.randn(8, 3, *SIZE, device="cuda")
    y = torch.randint(0, CLASSES, (8, *SIZE), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    losses = []
    for i in range(steps + 2):  # two warm-up steps, untimed
        if i == 2:
            torch.cuda.synchronize()
            t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(loss.detach())
    torch.cuda.synchronize()
    s_iter = (time.perf_counter() - t) / steps
    finite = bool(torch.isfinite(torch.stack(losses)).all())
    peak = torch.cuda.max_memory_allocated() / 2**20
    return (f"train step {'AMP fp16' if amp else 'fp32'}", "ok" if finite else "FAIL",
            f"{s_iter:.3f} s/iter, peak {peak:.0f} MiB, loss {'finite' if finite else 'NOT finite'} (batch 8)")


def ddp_worker() -> None:
    """Run by torchrun: one NCCL process, one DDP step, one all_reduce."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("nccl")
    rank = dist.get_rank()
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Conv2d(3, 4, 3).cuda())
    model(torch.randn(2, 3, 16, 16, device="cuda")).sum().backward()
    total = torch.ones(1, device="cuda")
    dist.all_reduce(total)
    print(f"ddp ok rank {rank} world {dist.get_world_size()} sum {total.item():g}")
    dist.destroy_process_group()


def torchrun_step() -> Row:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", __file__,
           "--ddp-worker"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    ok = out.returncode == 0 and "ddp ok" in out.stdout
    detail = (out.stdout.strip().splitlines() or [""])[-1] if ok else (out.stderr.strip().splitlines() or ["?"])[-1]
    return "torchrun NCCL, 1 process", "ok" if ok else "FAIL", detail[:160]


LEARN_CONFIG = """seed = 0
[model]
preset = "tiny"
[data.options]
size = 48
[train]
batch_size = 8
crop = 48
epochs = 2
epochs_next = 2
amp = true
workers = 1
"""
LEARN_STEPS = (["--classes", "sky,grass,water,disk", "--method", "ft"], ["--new-classes", "box", "--method", "gsc"],
               ["--new-classes", "ring", "--method", "idec"])


def learn_on_cuda(work: Path) -> Row:
    """The trainer's own CUDA path (AMP's scaler, the methods' old-model passes), which a bare training
    step does not reach: three steps on the synthetic scenes through torchrun. One process joins no
    process group, so the trainer's DDP over NCCL needs a machine with two GPUs."""
    config = work / "learn.toml"
    config.write_text(LEARN_CONFIG)
    done = []
    for step, args in enumerate(LEARN_STEPS):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m",
               "ciss.apps.cli", "--", "learn", "--run", str(work / "run"), "--config", str(config), "--device", "cuda",
               *args]
        t = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
        if out.returncode != 0:
            return "ciss learn on CUDA", "FAIL", f"{args[-1]}: " + (out.stderr.strip().splitlines() or ["?"])[-1][:140]
        wall = time.perf_counter() - t
        manifest = json.loads((work / "run" / f"step-{step}" / "manifest.json").read_text())
        done.append(f"{args[-1]} {100 * manifest['metrics']['miou_all']:.1f} mIoU in {wall:.0f} s")
    return "ciss learn on CUDA (torchrun, AMP)", "ok", ", ".join(done)


def clip_inputs(clip: Path, n: int) -> list[np.ndarray]:
    """The clip's first `n` frames as network inputs (the exporter's pre-processing, which the
    runtime's matches: resize, RGB, ImageNet normalisation)."""
    import cv2

    from ciss.export.verify import to_input
    from ciss.manifest import IMAGENET
    from ciss.trainer.data.transforms import Normalise

    normalise = Normalise(IMAGENET.mean, IMAGENET.std)
    capture = cv2.VideoCapture(str(clip))
    inputs = []
    while len(inputs) < n and (frame := capture.read()[1]) is not None:
        inputs.append(to_input(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), SIZE, normalise))
    if not inputs:
        raise FileNotFoundError(f"no frames read from {clip} (give the clip with --clip)")
    return inputs


def agreement(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return float(np.mean([np.mean(x == y) for x, y in zip(a, b)]))


def fps_of(run: Callable[[np.ndarray], np.ndarray], inputs: list[np.ndarray]) -> tuple[float, list[np.ndarray]]:
    run(inputs[0])
    t = time.perf_counter()
    masks = [run(x) for x in inputs]
    return len(inputs) / (time.perf_counter() - t), masks


def runtime_checks(work: Path, clip: Path, frames: int) -> list[Row]:
    """torch on CUDA, ONNX Runtime's CUDA provider and the float16 graph, each against ORT on the CPU."""
    import onnxruntime as ort
    import torch

    from ciss.export import onnx as onnx_export
    from ciss.export.tensorrt import to_float16
    from ciss.export.verify import cpu_session
    from ciss.trainer.models import build_model

    torch.manual_seed(0)
    model = build_model(PRESET, [CLASSES]).eval().fused()
    graph = onnx_export.export_logits(model, SIZE, dynamic=False)
    fp32_path, fp16_path = work / "model.onnx", work / "model.fp16.onnx"
    onnx_export.save_checked(onnx_export.add_tail(graph, "mask"), fp32_path)
    to_float16(fp32_path, fp16_path)
    inputs = clip_inputs(clip, frames)
    cpu = cpu_session(str(fp32_path))
    cpu_fps, cpu_masks = fps_of(lambda x: cpu.run(None, {"images": x})[0], inputs)
    rows: list[Row] = [("ORT CPU fp32 (reference)", "ok", f"{cpu_fps:.1f} FPS on {len(inputs)} frames of {clip.name}")]

    cuda_model = model.cuda()
    with torch.no_grad():
        def torch_run(x: np.ndarray) -> np.ndarray:
            return cuda_model(torch.from_numpy(x).cuda()).argmax(1).to(torch.uint8).cpu().numpy()
        fps, masks = fps_of(torch_run, inputs)
    share = agreement(masks, cpu_masks)
    rows.append(("torch CUDA fp32 (the runtime's reference model)", "ok" if share >= 0.995 else "FAIL",
                 f"{fps:.1f} FPS; masks equal to ORT CPU on {100 * share:.3f}% of pixels (need 99.5%)"))

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return [*rows, ("ORT CUDA provider", "skip", "this onnxruntime build has no CUDAExecutionProvider "
                                                     "(onnxruntime-gpu is not installed)")]
    for name, path, need in (("ORT CUDA fp32", fp32_path, 0.995), ("ORT CUDA fp16 export", fp16_path, 0.98)):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            session = ort.InferenceSession(str(path), options, providers=["CUDAExecutionProvider",
                                                                          "CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - ORT raises its own types; the row says which
            rows.append((name, "FAIL", f"{type(e).__name__}: {str(e).splitlines()[0][:140]}"))
            continue
        if session.get_providers()[0] != "CUDAExecutionProvider":
            rows.append((name, "skip", "the CUDA/cuDNN libraries onnxruntime-gpu needs did not load; it fell back "
                                       "to the CPU (LD_LIBRARY_PATH, or pip install onnxruntime-gpu[cuda,cudnn])"))
            continue
        fps, masks = fps_of(lambda x, s=session: s.run(None, {"images": x})[0], inputs)
        share = agreement(masks, cpu_masks)
        rows.append((name, "ok" if share >= need else "FAIL",
                     f"{fps:.1f} FPS; masks equal to ORT CPU fp32 on {100 * share:.3f}% of pixels "
                     f"(need {100 * need:g}%)"))
    return rows


def safely(name: str, check: Callable[[], Any]) -> list[Row]:
    try:
        rows = check()
        return rows if isinstance(rows, list) else [rows]
    except Exception as e:  # noqa: BLE001 - one failed check must not hide the others
        return [(name, "FAIL", f"{type(e).__name__}: {' '.join(str(e).split())[:160]}")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=100, help="clip frames for the runtime checks")
    ap.add_argument("--clip", type=Path, default=CLIP, help="the video the runtime checks read (default: the "
                                                            "dash-cam clip in ../shared/data/videos)")
    ap.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.ddp_worker:
        ddp_worker()
        return 0
    if problem := cuda_problem():
        print(f"no CUDA GPU: skipped ({problem})")
        return 0
    import torch

    started = time.perf_counter()
    rows = [*safely("train step fp32", lambda: train_step(amp=False)),
            *safely("train step AMP fp16", lambda: train_step(amp=True)),
            *safely("torchrun NCCL, 1 process", torchrun_step)]
    with tempfile.TemporaryDirectory(prefix="ciss-gpu-check-") as tmp:
        rows += safely("ciss learn on CUDA", lambda: learn_on_cuda(Path(tmp)))
        rows += safely("runtime on CUDA", lambda: runtime_checks(Path(tmp), args.clip, args.frames))
    print(f"# GPU check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"{time.perf_counter() - started:.0f} s\n")
    print("| check | result | detail |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0 if all(r[1] != "FAIL" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

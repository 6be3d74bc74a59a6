"""One update step of warmtune against a bare PyTorch loop doing the same SGD iterations.

The step is the whole job: lineage lock, reading the stores, loading the current snapshot,
decoding images, holdout evaluation before and after, head growth, λ-replay SGD, and writing
and fsyncing the new snapshot. The bare loop is the same model and batch size, SGD on tensors
already in memory. Both run interleaved in one process, after one untimed warm-up each.

    python -m bench.update_step --arch alexnet --image-size 224 --repeats 3
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from app.datasets import fashion_mnist
from app.model import build_model, select_device
from app.settings import Settings
from app.stores import Stores
from worker.jobs import apply_pending_updates
from worker.trainer import iterations_for


def bare_loop(arch: str, classes: int, image_size: int, iterations: int, batch_size: int, device: torch.device) -> float:
    """Seconds for `iterations` plain SGD steps on one model (built beforehand, not timed)."""
    model = build_model(arch, classes).to(device).train()
    x = torch.randn(batch_size, 3, image_size, image_size, device=device)
    y = torch.randint(classes, (batch_size,), device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9, weight_decay=0.0005)
    start = time.perf_counter()
    for _ in range(iterations):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="alexnet")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--update-size", type=int, default=10, help="|U_t|: images in the timed update set")
    parser.add_argument("--old-per-class", type=int, default=40, help="replay memory: images per initial class")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    device = select_device(args.device)
    home = Path(tempfile.mkdtemp(prefix="warmtune-bench-"))
    settings = Settings(
        home=home,
        arch=args.arch,
        image_size=args.image_size,
        device=str(device),
        seed=0,
        gate_max_old_drop=1.0,  # every step publishes: the timed path includes the snapshot write
    )
    stores = Stores(settings)
    data = fashion_mnist("train")
    rng = random.Random(0)
    initial = data.classes[:4]
    images = [img for c in initial for img in data.take(c, args.old_per_class, rng)]
    labels = [c for c in initial for _ in range(args.old_per_class)]
    stores.samples.add(images, labels)
    apply_pending_updates(settings.model_copy(update={"iterations": "5"}))  # version 1: the replay memory
    iterations = iterations_for(settings.iterations, args.update_size, 0, settings.batch_size)
    print(
        f"update step vs bare loop: {args.arch} at {args.image_size}px on {device}, |U_t| = {args.update_size}, "
        f"{iterations} iterations of batch {settings.batch_size}, {args.repeats} repeats"
    )

    def one_step(label: str) -> float:
        stores.samples.add(data.take(label, args.update_size, rng), [label] * args.update_size)
        start = time.perf_counter()
        [result] = apply_pending_updates(settings)
        assert result.status == "applied", result
        elapsed = time.perf_counter() - start
        parts = ("load", "train", "evaluate", "publish")
        print("    " + ", ".join(f"{p} {result.metrics[p + '_seconds']:.2f}s" for p in parts))
        return elapsed

    # the first timed step of each kind follows an untimed one, as in a long-running worker
    one_step(initial[0])
    bare_loop(args.arch, 5, args.image_size, iterations, settings.batch_size, device)
    steps, bares = [], []
    for i in range(args.repeats):
        bares.append(bare_loop(args.arch, 5, args.image_size, iterations, settings.batch_size, device))
        steps.append(one_step(data.classes[4 + i % 6]))
        print(f"  repeat {i + 1}: warmtune step {steps[-1]:.2f}s, bare loop {bares[-1]:.2f}s")
    step, bare = statistics.median(steps), statistics.median(bares)
    print(f"median: warmtune step {step:.2f}s, bare loop {bare:.2f}s, ratio {step / bare:.2f}x")
    return {"step_seconds": step, "bare_seconds": bare, "ratio": step / bare}


if __name__ == "__main__":
    main()

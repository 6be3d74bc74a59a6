"""Why models answer in channels-last memory on the CPU too: the seconds of a model's forward
passes (no gradient, batches of 256, as worker/trainer.py: predict_logits), of the served model's
(app/serving.py: serving_model, traced and frozen, batches of 32 as /predict's largest) and of
its SGD steps (batches of 64), in contiguous and in channels-last memory, alternating in one process.

    python -m bench.memory_format --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from app.model import build_model
from app.serving import serving_model

RESULTS = Path(__file__).parent / "results"
FORMATS = {"contiguous": torch.contiguous_format, "channels-last": torch.channels_last}


def forward_seconds(model: torch.nn.Module, images: int, image_size: int) -> float:
    """Seconds to answer `images` random images in batches of 256, after one warm-up batch."""
    model.eval()
    with torch.no_grad():
        return batches_seconds(model, torch.randn(images, 3, image_size, image_size), 256)


def served_seconds(model: torch.nn.Module, images: int, image_size: int, memory_format: torch.memory_format) -> float:
    """Seconds for the served model to answer `images` random uint8 images in batches of 32."""
    served = serving_model(model, torch.device("cpu"), image_size, memory_format)
    with torch.inference_mode():
        return batches_seconds(served, torch.randint(0, 256, (images, 3, image_size, image_size), dtype=torch.uint8), 32)


def batches_seconds(model: torch.nn.Module, x: torch.Tensor, batch: int) -> float:
    """Seconds for `model` to answer x in batches, after one warm-up batch."""
    model(x[:batch])
    start = time.perf_counter()
    for lo in range(0, len(x), batch):
        model(x[lo : lo + batch])
    return time.perf_counter() - start


def sgd_seconds(model: torch.nn.Module, steps: int, image_size: int, classes: int) -> float:
    """Seconds per SGD step on batches of 64 random images, after two warm-up steps."""
    model.train()
    x, y = torch.randn(64, 3, image_size, image_size), torch.randint(0, classes, (64,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    step(), step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def measure(arch: str, image_size: int, repeats: int) -> dict:
    """Medians over the repeats, each format's model built afresh from the same weights."""
    torch.manual_seed(0)
    weights = build_model(arch, 10).state_dict()
    seconds: dict[str, dict[str, list[float]]] = {name: {"forward_512": [], "served_512": [], "sgd_step": []} for name in FORMATS}
    for _ in range(repeats):
        for name, memory_format in FORMATS.items():
            model = build_model(arch, 10)
            model.load_state_dict(weights)
            model.to(memory_format=memory_format)
            seconds[name]["forward_512"].append(forward_seconds(model, 512, image_size))
            seconds[name]["served_512"].append(served_seconds(model, 512, image_size, memory_format))
            seconds[name]["sgd_step"].append(sgd_seconds(model, 5, image_size, 10))
    medians = {name: {k: statistics.median(v) for k, v in parts.items()} for name, parts in seconds.items()}
    row = {"arch": arch, "image_size": image_size, "repeats": repeats, "seconds": seconds, "medians": medians}
    for part in ("forward_512", "served_512", "sgd_step"):
        row[f"{part}_speedup"] = medians["contiguous"][part] / medians["channels-last"][part]
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=RESULTS / "memory-format-cpu.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [measure("resnet18", 32, args.repeats), measure("alexnet", 64, args.repeats)]
    for r in rows:
        print(
            f"{r['arch']} @ {r['image_size']} px, channels-last against contiguous: forward {r['forward_512_speedup']:.2f}x as "
            f"fast, served {r['served_512_speedup']:.2f}x, SGD step {r['sgd_step_speedup']:.2f}x (medians of {r['repeats']})"
        )
    args.out.write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()

"""Why the service traces its CPU model: forward passes per second of a model in one thread while
another thread runs Python (as the event loop and the decode threads do), eager against the
traced and frozen model the service serves (app/serving.py: serving_model).

    python -m bench.gil --image-size 32
"""

from __future__ import annotations

import argparse
import threading
import time

import torch

from app.model import build_model
from app.serving import Classifier, serving_model


def forwards_beside_python(model: torch.nn.Module, x: torch.Tensor, seconds: float) -> tuple[float, float]:
    """Forward passes per second in a thread while this one counts in a Python loop, and the
    loop's speed against its speed alone."""
    done, stop = [0], threading.Event()

    def forward_forever() -> None:
        with torch.inference_mode():
            while not stop.is_set():
                model(x)
                done[0] += 1

    def count(for_s: float) -> float:
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < for_s:
            n += 1
        return n / for_s

    alone = count(seconds / 2)
    thread = threading.Thread(target=forward_forever)
    thread.start()
    beside = count(seconds)
    stop.set()
    thread.join()
    return done[0] / seconds, beside / alone


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    device = torch.device("cpu")
    network = build_model(args.arch, 10).eval()
    x = torch.zeros(args.batch, 3, args.image_size, args.image_size, dtype=torch.uint8)
    eager = Classifier(network, channels_last=False).eval()
    for name, model in (("eager", eager), ("traced", serving_model(network, device, args.image_size))):
        rate, python_share = forwards_beside_python(model, x, args.seconds)
        print(
            f"{args.arch} at {args.image_size} px, batch {args.batch}, {name}: {rate:.1f} forward passes/s beside a Python "
            f"thread, which kept {python_share:.2f} of its speed alone"
        )


if __name__ == "__main__":
    main()

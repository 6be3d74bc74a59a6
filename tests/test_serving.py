"""Serving pieces that need no server: resizing across a swap, top-k, sharing the decode threads, the traced model."""

import asyncio
import random
import threading
import time
from pathlib import Path

import pytest
import torch
from imagegen import make_image
from torch import nn

from app import serving
from app.images import to_model_input
from app.metrics import Metrics
from app.model import build_model
from app.serving import ModelServer, ServedModel, forward, resize_to, serving_model, top_predictions
from app.settings import Settings
from app.stores import Stores


def test_requests_prepared_before_a_swap_are_resized_to_the_new_input_size():
    old, new = torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.zeros(1, 3, 16, 16, dtype=torch.uint8)
    batch = torch.cat([resize_to(old, 16), resize_to(new, 16)])
    assert batch.shape == (3, 3, 16, 16) and batch.dtype == torch.uint8


def test_top_k_is_capped_by_the_number_of_classes_and_ordered():
    probs = torch.tensor([[0.1, 0.7, 0.2]])
    [p] = top_predictions(probs, ["a", "b", "c"], k=5)
    assert p.label == "b" and [label for label, _ in p.top_k] == ["b", "c", "a"]


def test_a_request_of_many_images_leaves_decode_threads_to_the_requests_after_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    decoded: list[str] = []
    lock = threading.Lock()

    def slow_decode(data: bytes, image_size: int, max_pixels: int, name: str) -> torch.Tensor:
        time.sleep(0.05)  # long enough that the big request still has images queued when the small one comes
        with lock:
            decoded.append(name)
        return torch.zeros(3, image_size, image_size, dtype=torch.uint8)

    monkeypatch.setattr(serving, "image_to_pixels", slow_decode)
    png = make_image("red", random.Random(0), size=16)
    settings = Settings(home=tmp_path, decode_threads=2)
    server = ModelServer(settings, Stores(settings), Metrics())
    server.current = ServedModel(1, ["a"], 8, nn.Identity(), torch.device("cpu"))

    async def big_then_small() -> int:
        big = asyncio.create_task(server.prepare_all([(f"big {i}", png) for i in range(8)]))
        await asyncio.sleep(0.01)  # the big request's first images are in the pool
        await server.prepare_all([("small", png)])
        done = sum(name.startswith("big") for name in decoded)
        assert (await big).shape == (8, 3, 8, 8)
        return done

    try:
        # Queued all at once, the big request's 8 images would all decode before the small one's.
        assert asyncio.run(big_then_small()) <= 2
    finally:
        server.close()


def test_the_served_cpu_model_is_traced_and_answers_as_the_eager_one():
    torch.manual_seed(0)
    eager = build_model("resnet18", 3).eval()
    for m in eager.modules():  # batch norm statistics away from the identity, so folding them is tested
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    pixels = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    device = torch.device("cpu")
    served = ServedModel(1, ["a", "b", "c"], 32, serving_model(eager, device, 32), device)
    assert isinstance(served.model, torch.jit.ScriptModule)
    expected = torch.softmax(eager(to_model_input(pixels, device)), dim=1)
    assert torch.allclose(forward(served, pixels), expected, atol=1e-4)


def test_requests_in_one_batch_each_get_their_own_top_k(tmp_path: Path):
    class FirstPixel(nn.Module):  # the classes' scores are the first pixel's channels
        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            return pixels[:, :, 0, 0].float().softmax(dim=1)

    def image(*channels: int) -> torch.Tensor:
        pixels = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
        pixels[0, :, 0, 0] = torch.tensor(channels)
        return pixels

    settings = Settings(home=tmp_path)
    server = ModelServer(settings, Stores(settings), Metrics())
    server.current = ServedModel(1, ["a", "b", "c"], 4, FirstPixel(), torch.device("cpu"))

    async def both() -> tuple:
        one = asyncio.ensure_future(server.predict(image(1, 3, 2), top_k=1))
        three = asyncio.ensure_future(server.predict(image(3, 1, 2), top_k=3))
        await asyncio.sleep(0)  # both queued before the forward thread starts: one batch
        server.start()
        return await asyncio.wait_for(one, 30), await asyncio.wait_for(three, 30)

    try:
        (_, [first]), (_, [second]) = asyncio.run(both())
    finally:
        server.close()
    assert first.label == "b" and [label for label, _ in first.top_k] == ["b"]
    assert second.label == "a" and [label for label, _ in second.top_k] == ["a", "c", "b"]
    [histogram] = server.metrics.predict_batch.collect()
    totals = {s.name.rpartition("_")[2]: s.value for s in histogram.samples if s.name.endswith(("_count", "_sum"))}
    assert totals == {"count": 1.0, "sum": 2.0}  # one forward pass of both images

"""Serving: the current model, swapped atomically for a new version, and dynamic micro-batching.

A swap loads the new version beside the old one in a background thread, runs one warm-up batch,
then replaces a single reference. A batch takes that reference when it starts, so work in flight
ends on the version it began with, and every answer names the version that produced it.

The batcher follows Triton's default: when the model is free it takes whatever requests are
queued, up to max_batch_size images, adding no wait when idle (max_batch_wait_ms = 0).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from app.errors import NoModel, VersionUnloadable, WarmtuneError
from app.images import check_pixel_budget, image_to_pixels, normalize, to_device
from app.metrics import Metrics
from app.model import autocast, model_from_state, select_device
from app.settings import Settings
from app.snapshots import SnapshotStore
from app.stores import Stores

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedModel:
    version: int
    classes: list[str]
    image_size: int
    model: nn.Module
    device: torch.device


@dataclass(frozen=True)
class Prediction:
    label: str
    score: float
    top_k: list[tuple[str, float]]

    def first(self, k: int) -> Prediction:
        """The same prediction with only its first k classes."""
        return self if k >= len(self.top_k) else Prediction(self.label, self.score, self.top_k[:k])


class Classifier(nn.Module):
    """uint8 pixels in, class probabilities out: normalisation, network and softmax in one module.

    One module so that on the CPU one traced call does all three: every separate torch call gives
    the GIL up and must take it back, and under load the event loop holds it (each wait up to
    the interpreter's switch interval; the normalisation's six small calls took 14 % of the
    forward thread's time at 32 px, py-spy).
    """

    def __init__(self, model: nn.Module, channels_last: bool) -> None:
        super().__init__()
        self.model = model
        self.channels_last = channels_last

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = normalize(pixels)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x).float().softmax(dim=1)


def serving_model(
    model: nn.Module, device: torch.device, image_size: int, memory_format: torch.memory_format = torch.channels_last
) -> nn.Module:
    """A model prepared for inference on the device: a Classifier of uint8 pixels.

    Channels-last memory by default: on a GPU for the bf16 autocast forward, and on the CPU
    oneDNN's convolutions are faster in it too (bench/memory_format.py).
    On the CPU it is traced and frozen (TorchScript, batch-norm folded into the convolutions):
    a traced forward pass runs without the GIL, where an eager one takes it back between every
    layer, and the service's event loop and decode threads need the GIL too (bench/gil.py).
    """
    channels_last = memory_format == torch.channels_last
    classifier = Classifier(model.to(device, memory_format=memory_format).eval(), channels_last)
    if device.type == "cuda":
        return classifier
    example = torch.zeros(1, 3, image_size, image_size, dtype=torch.uint8)
    # TorchScript is deprecated in favour of torch.compile and torch.export, which compile for
    # tens of seconds per version on a CPU (a swap would wait for it); its warning would be
    # logged at every swap. The tracer also warns that the normalisation's mean and std become
    # constants, which they are.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return torch.jit.freeze(torch.jit.trace(classifier.eval(), example))


def load_version(snapshots: SnapshotStore, version: int, device: torch.device) -> ServedModel:
    """Build a version's model on the device and run one warm-up batch through it."""
    meta = snapshots.meta(version)
    model = serving_model(model_from_state(meta.arch, snapshots.weights(version)), device, meta.image_size)
    served = ServedModel(version, list(meta.classes), meta.image_size, model, device)
    forward(served, torch.zeros(1, 3, meta.image_size, meta.image_size, dtype=torch.uint8))
    return served


@torch.inference_mode()
def forward(served: ServedModel, pixels: torch.Tensor) -> torch.Tensor:
    """Class probabilities for a uint8 (N, 3, S, S) batch, on the CPU."""
    with autocast(served.device):
        probs = served.model(to_device(pixels, served.device))
    # .cpu() of a CPU tensor copies nothing but is a torch call all the same: it gives the GIL up
    # and, under load, waits to take it back.
    return probs if probs.device.type == "cpu" else probs.cpu()


def resize_to(pixels: torch.Tensor, image_size: int) -> torch.Tensor:
    """Pixels prepared for the version before a swap, resized to the one now serving."""
    if pixels.shape[-1] == image_size:
        return pixels
    return F.interpolate(pixels.float(), size=image_size, mode="bilinear").round().to(torch.uint8)


def check_and_decode(image: tuple[str, bytes], image_size: int, max_pixels: int, budget: int) -> torch.Tensor:
    """One image's pixels, after the request's pixel budget is checked from its header."""
    check_pixel_budget([image], max_pixels, budget)
    return image_to_pixels(image[1], image_size, max_pixels, image[0])


def top_predictions(probs: torch.Tensor, classes: list[str], k: int) -> list[Prediction]:
    scores, indices = probs.topk(min(k, len(classes)), dim=1)
    out = []
    for row_scores, row_indices in zip(scores.tolist(), indices.tolist(), strict=True):
        ranked = [(classes[i], s) for i, s in zip(row_indices, row_scores, strict=True)]
        out.append(Prediction(ranked[0][0], ranked[0][1], ranked))
    return out


@dataclass
class _Request:
    pixels: torch.Tensor
    top_k: int
    answer: asyncio.Future[tuple[int, list[Prediction]]]
    loop: asyncio.AbstractEventLoop  # the answer's, to be settled from the forward thread


class ModelServer:
    """The served model of one API process, its swaps and its batched forward passes."""

    def __init__(self, settings: Settings, stores: Stores, metrics: Metrics) -> None:
        self.settings = settings
        self.stores = stores
        self.snapshots = stores.snapshots
        self.metrics = metrics
        self.device = select_device(settings.device)
        self.current: ServedModel | None = None
        self.broken: dict[int, str] = {}  # versions that failed to load, and why
        self.started_at = time.time()
        self._observed: set[str] = set()  # update sets whose label-to-serve time is recorded
        self._swap_lock = asyncio.Lock()
        self._requests: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()  # None: closed
        # One thread runs every forward pass: the model is never used by two batches at once.
        self._forward_thread = threading.Thread(target=self.run_batches, name="forward", daemon=True)
        self._decode_pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode")

    # Swapping --------------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Serve the version the snapshot pointer names, if this process does not already."""
        wanted = await asyncio.to_thread(self.snapshots.current)
        served = self.current.version if self.current else None
        if wanted is None or wanted == served or wanted in self.broken:
            return
        await self.swap(wanted)

    async def swap(self, version: int) -> None:
        """Serve this version; if it fails to load, the old one keeps serving and the failure is remembered."""
        async with self._swap_lock:
            if self.current is not None and self.current.version == version:
                return
            clock = time.perf_counter()
            try:
                served = await asyncio.to_thread(load_version, self.snapshots, version, self.device)
            except Exception as exc:  # any failure keeps the old version serving
                self.broken[version] = f"{type(exc).__name__}: {exc}"
                self.metrics.swap_failures.inc()
                log.exception("could not load version %d; version %s keeps serving", version, self.served_version)
                return
            self.serve(served, time.perf_counter() - clock)

    async def promote(self, version: int) -> None:
        """Make a version current only if it loads: load it, move the pointer, serve it."""
        async with self._swap_lock:
            clock = time.perf_counter()
            try:
                served = await asyncio.to_thread(load_version, self.snapshots, version, self.device)
            except WarmtuneError:  # unknown or pruned: the message says so
                raise
            except Exception as exc:
                raise VersionUnloadable(
                    f"version {version} cannot be loaded ({type(exc).__name__}: {str(exc)[:200]}); "
                    f"version {self.served_version} stays current"
                ) from None
            await asyncio.to_thread(self.snapshots.promote, version)
            self.broken.pop(version, None)
            self.serve(served, time.perf_counter() - clock)

    def serve(self, served: ServedModel, seconds: float) -> None:
        previous = self.served_version
        self.current = served
        meta = self.snapshots.meta(served.version)
        self.metrics.served(served.version, len(served.classes), meta.metrics.get("holdout_after"), seconds)
        self.record_label_to_serve(served.version)
        log.info("now serving version %d (%d classes; was %s), loaded in %.2fs", served.version, len(served.classes), previous, seconds)

    @property
    def served_version(self) -> int | None:
        return self.current.version if self.current else None

    def record_label_to_serve(self, version: int) -> None:
        """Observe, once per update set, the time from storing it to serving a version that includes it."""
        now = time.time()
        unseen = [u for meta in self.snapshots.lineage(version) for u in meta.update_ids if u not in self._observed]
        self._observed.update(unseen)
        for update in self.stores.readable(unseen):
            if update.received_at >= self.started_at:  # sets stored before this process started are not its to time
                self.metrics.update_duration.observe(now - update.received_at)

    # Predicting ------------------------------------------------------------------------------

    async def prepare_all(self, images: list[tuple[str, bytes]]) -> torch.Tensor:
        """Decode and preprocess request images in the decode thread pool, off the event loop."""
        served = self.require_model()
        loop = asyncio.get_running_loop()
        limits = self.settings.max_image_pixels, self.settings.max_request_pixels
        if len(images) == 1:  # the usual request: one hand-off to the pool, not two
            return (await loop.run_in_executor(self._decode_pool, check_and_decode, images[0], served.image_size, *limits))[None]
        await loop.run_in_executor(self._decode_pool, check_pixel_budget, images, *limits)
        # The pool serves images first come, first served: a request that queued all of its images
        # at once would make every later request wait for the last of them. Holding at most half
        # of the threads, it leaves the others to the requests that come after it.
        share = asyncio.Semaphore(max(1, self.settings.decode_threads // 2))

        async def decode(name: str, data: bytes) -> torch.Tensor:
            async with share:
                return await loop.run_in_executor(
                    self._decode_pool, image_to_pixels, data, served.image_size, self.settings.max_image_pixels, name
                )

        return torch.stack(await asyncio.gather(*(decode(name, data) for name, data in images)))

    def require_model(self) -> ServedModel:
        if self.current is None:
            raise NoModel("no model yet: post a first update set to /updates to create version 1")
        return self.current

    async def predict(self, pixels: torch.Tensor, top_k: int) -> tuple[int, list[Prediction]]:
        """Queue a request's images for the forward thread; returns the answering version and predictions."""
        loop = asyncio.get_running_loop()
        answer = loop.create_future()
        self._requests.put(_Request(pixels, top_k, answer, loop))
        return await answer

    def start(self) -> None:
        self._forward_thread.start()

    def run_batches(self) -> None:
        """The forward thread: forever take queued requests, up to max_batch_size images, and run
        them as one batch. It takes the next batch itself as soon as one ends, rather than waiting
        for the event loop to hand it one: the loop is busiest just then, answering the batch
        that ended and reading the requests that follow (bench/predict.py)."""
        while (batch := self.gather_batch()) is not None:
            served = self.current
            try:
                if served is None:  # requests need a model to be prepared, so only after a failed start
                    raise NoModel("no model loaded")
                probs = self.forward_batch(served, torch.cat([resize_to(r.pixels, served.image_size) for r in batch]))
                # One top-k for the whole batch, not one per request: each torch call gives the
                # GIL up and, under load, waits for the event loop to give it back.
                ranked = top_predictions(probs, served.classes, max(r.top_k for r in batch))
                lo, answers = 0, []
                for r in batch:
                    answers.append((served.version, [p.first(r.top_k) for p in ranked[lo : lo + len(r.pixels)]]))
                    lo += len(r.pixels)
            except Exception as exc:
                log.exception("forward pass failed")
                answers = [exc] * len(batch)
            # One hand-off per event loop and batch, not per request: each wakes the loop and
            # takes the GIL.
            by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future, Any]]] = {}
            for r, answer in zip(batch, answers, strict=True):
                by_loop.setdefault(r.loop, []).append((r.answer, answer))
            for loop, settled in by_loop.items():
                with suppress(RuntimeError):  # the loop closed: the server is shutting down
                    loop.call_soon_threadsafe(settle_all, settled)

    def gather_batch(self) -> list[_Request] | None:
        """The next batch: the first queued request (waiting for one), then whatever else is queued
        up to max_batch_size images, waiting up to max_batch_wait_ms for more; None once closed."""
        first = self._requests.get()
        if first is None:
            return None
        batch, size = [first], len(first.pixels)
        deadline = time.monotonic() + self.settings.max_batch_wait_ms / 1000
        while size < self.settings.max_batch_size:
            wait = deadline - time.monotonic()
            try:
                request = self._requests.get(timeout=wait) if wait > 0 else self._requests.get_nowait()
            except queue.Empty:
                break
            if request is None:
                self._requests.put(None)  # close after this batch
                break
            batch.append(request)
            size += len(request.pixels)
        return batch

    def forward_batch(self, served: ServedModel, pixels: torch.Tensor) -> torch.Tensor:
        """Forward in chunks of at most max_batch_size images (one request may bring more)."""
        step = self.settings.max_batch_size
        chunks = []
        for lo in range(0, len(pixels), step):
            chunk = pixels[lo : lo + step]
            self.metrics.predict_batch.observe(len(chunk))
            chunks.append(forward(served, chunk))
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)  # one chunk: no copy, no GIL take-back

    def close(self) -> None:
        self._requests.put(None)
        self._decode_pool.shutdown(wait=False, cancel_futures=True)


def settle_all(settled: list[tuple[asyncio.Future, Any]]) -> None:
    """Give requests their answers, on their event loop, except those whose client has gone away."""
    for answer, outcome in settled:
        if answer.done():
            continue
        if isinstance(outcome, Exception):
            answer.set_exception(outcome)
        else:
            answer.set_result(outcome)

"""The peer for bench/predict.py: LitServe serving the same version of the same model on the same
images, with the service's own decode, preprocessing and forward pass, so that what differs is
the serving stack (LitServe: a uvicorn process parsing requests, an inference worker process
decoding and batching them; warmtune: one process, decode threads and a forward thread).

Images come as LitServe's examples send them, base64 in a JSON body ({"image": ...}): LitServe
0.2.19 hands a request to its worker process by pickling it, and a multipart upload does not
pickle ("Pickling an AuthenticationString object is disallowed").

    python -m bench.litserve_peer --home HOME --port 8001 --max-batch 32 --batch-timeout 0
"""

from __future__ import annotations

import argparse
import base64
from pathlib import Path

import litserve as ls
import torch

from app.images import image_to_pixels
from app.serving import ServedModel, forward, load_version, top_predictions
from app.settings import Settings
from app.snapshots import SnapshotStore


class Classifier(ls.LitAPI):
    def __init__(self, home: str, max_batch_size: int, batch_timeout: float) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path="/predict")
        self.home = home
        self.served: ServedModel | None = None
        self.max_pixels = Settings().max_image_pixels

    def setup(self, device: str) -> None:
        snapshots = SnapshotStore(Path(self.home) / "snapshots")
        self.served = load_version(snapshots, snapshots.current(), torch.device(device))

    def decode_request(self, request: dict) -> torch.Tensor:
        return image_to_pixels(base64.b64decode(request["image"]), self.served.image_size, self.max_pixels)

    def batch(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(inputs)

    def predict(self, pixels: torch.Tensor) -> torch.Tensor:
        return forward(self.served, pixels)

    def unbatch(self, probs: torch.Tensor) -> list[torch.Tensor]:
        return list(probs)

    def encode_response(self, probs: torch.Tensor) -> dict:
        (p,) = top_predictions(probs[None], self.served.classes, 5)
        return {"model_version": self.served.version, "predictions": [{"label": p.label, "score": p.score, "top_k": p.top_k}]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--batch-timeout", type=float, default=0.0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    api = Classifier(args.home, args.max_batch if args.max_batch > 1 else 1, args.batch_timeout)
    server = ls.LitServer(api, accelerator=args.device, workers_per_device=1)
    server.run(host="127.0.0.1", port=args.port, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()

"""The short fine-tune on real images: what it changes in the network."""

from __future__ import annotations

import pytest
import torch
from imagegen import make_set

from app.model import build_model
from app.samples import Sample
from worker.trainer import SampleTensors, TrainConfig, fine_tune


def tensors(counts: dict[str, int], seed: int, index: dict[str, int]) -> SampleTensors:
    images, labels = make_set(counts, seed=seed, size=16)
    return SampleTensors([Sample("u", i, label, data) for i, (data, label) in enumerate(zip(images, labels, strict=True))], index, 16)


@pytest.mark.parametrize("batchnorm", ["train", "frozen"])
def test_frozen_batchnorm_keeps_the_running_statistics_while_the_weights_train(batchnorm):
    index = {"red": 0, "green": 1, "blue": 2}
    old, new = tensors({"red": 8, "green": 8}, 0, index), tensors({"blue": 8}, 1, index)
    model = build_model("resnet18", 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(
        iterations=3, batch_size=8, lr=0.01, momentum=0.9, weight_decay=0.0, replay_lambda=0.0, log_every=100, batchnorm=batchnorm
    )
    fine_tune(model, old, new, cfg, torch.device("cpu"), torch.Generator().manual_seed(0))
    after = model.state_dict()
    running = [k for k in after if k.endswith(("running_mean", "running_var"))]
    weights = [k for k in after if k.endswith("weight")]
    assert running and weights
    moved = [k for k in running if not torch.equal(before[k], after[k])]
    assert (moved == []) == (batchnorm == "frozen")
    assert all(not torch.equal(before[k], after[k]) for k in ("fc.weight", "bn1.weight", "conv1.weight"))

"""Classification models from torchvision's registry: build, load weights, size and grow the head."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from torchvision import models

from app.errors import ModelError

log = logging.getLogger(__name__)


def select_device(name: str = "auto") -> torch.device:
    """auto picks the first CUDA GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast on a GPU; plain float32 on the CPU. Serving and training share it."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _construct(arch: str) -> nn.Module:
    try:
        return models.get_model(arch, weights=None)
    except ValueError as exc:
        raise ModelError(f"unknown architecture {arch!r}: {exc}") from None


def find_head(model: nn.Module) -> str:
    """Name of the classifier: the last nn.Linear of the model."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise ModelError(f"{type(model).__name__} has no nn.Linear classifier to size to the classes")
    return names[-1]


def head_of(model: nn.Module) -> nn.Linear:
    return model.get_submodule(find_head(model))


def replace_head(model: nn.Module, num_classes: int) -> None:
    """Swap the classifier for a freshly initialised one with num_classes outputs."""
    name = find_head(model)
    old = model.get_submodule(name)
    model.set_submodule(name, nn.Linear(old.in_features, num_classes, device=old.weight.device))


def base_state_dict(arch: str, weights: str) -> dict[str, torch.Tensor]:
    """The base weights: torchvision's ImageNet weights (from torch's cache) or a state dict file."""
    if weights == "imagenet":
        try:
            enum = models.get_model_weights(arch).DEFAULT
        except ValueError as exc:
            raise ModelError(f"torchvision has no pretrained weights for {arch!r}: {exc}") from None
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(enum.url).name
        try:
            return enum.get_state_dict(progress=False)
        except OSError as exc:
            raise ModelError(
                f"ImageNet weights for {arch} are neither in torch's cache nor downloadable ({exc}); place them at {cache}"
            ) from None
    path = Path(weights)
    if not path.is_file():
        raise ModelError(f"base weights must be 'none', 'imagenet' or a state dict file; {weights!r} is none of them")
    if path.suffix == ".safetensors":
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def load_base_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load base weights into the body; a head of another size is left out (it is replaced anyway)."""
    head = find_head(model)
    own = model.state_dict()
    head_keys = {f"{head}.weight", f"{head}.bias"}
    state = {k: v for k, v in state.items() if not (k in head_keys and v.shape != own[k].shape)}
    result = model.load_state_dict(state, strict=False)
    missing = set(result.missing_keys) - head_keys
    if missing or result.unexpected_keys:
        raise ModelError(
            f"base weights do not fit {type(model).__name__}: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(result.unexpected_keys)[:5]}"
        )


def build_model(arch: str, num_classes: int, weights: str = "none") -> nn.Module:
    """A registry model with base weights loaded and a new head of num_classes outputs."""
    model = _construct(arch)
    if weights != "none":
        load_base_weights(model, base_state_dict(arch, weights))
    replace_head(model, num_classes)
    return model


def model_from_state(arch: str, state: dict[str, torch.Tensor]) -> nn.Module:
    """Rebuild a model from a full state dict (a snapshot), skipping the random init it would overwrite."""
    with torch.device("meta"):
        model = _construct(arch)
    head = find_head(model)
    model.set_submodule(head, nn.Linear(*reversed(state[f"{head}.weight"].shape), device="meta"))
    model.load_state_dict(state, assign=True)
    if any(t.is_meta for t in model.buffers()):  # a buffer the state dict does not carry
        model = _construct(arch)
        replace_head(model, state[f"{head}.weight"].shape[0])
        model.load_state_dict(state)
    return model


@torch.no_grad()
def grow_head(model: nn.Module, new_classes: int, init: str = "mean", generator: torch.Generator | None = None) -> None:
    """Add outputs for new classes; old rows stay bit-identical.

    init="mean" starts each new row at the mean of the old rows (bias likewise), so a new class
    begins with an average logit: never the winner before training, never far below the rest.
    init="random" uses torch's default Linear init for the new rows.
    """
    if new_classes <= 0:
        return
    name = find_head(model)
    old = model.get_submodule(name)
    grown = nn.Linear(old.in_features, old.out_features + new_classes, device=old.weight.device, dtype=old.weight.dtype)
    n = old.out_features
    grown.weight[:n] = old.weight
    grown.bias[:n] = old.bias
    if init == "mean" and n > 0:
        grown.weight[n:] = old.weight.mean(dim=0, keepdim=True)
        grown.bias[n:] = old.bias.mean()
    elif init == "random" and generator is not None:
        bound = 1 / old.in_features**0.5
        grown.weight[n:].uniform_(-bound, bound, generator=generator)
        grown.bias[n:].uniform_(-bound, bound, generator=generator)
    model.set_submodule(name, grown)

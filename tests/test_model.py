from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torchvision import models

from app.errors import ModelError
from app.model import build_model, find_head, grow_head, head_of, model_from_state


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("arch,head", [("alexnet", "classifier.6"), ("resnet18", "fc"), ("mobilenet_v3_small", "classifier.3")])
def test_build_model_sizes_the_head_to_the_classes(arch, head):
    model = build_model(arch, 3)
    assert find_head(model) == head
    assert logits(model, torch.randn(2, 3, 64, 64)).shape == (2, 3)


def test_unknown_architecture_is_a_model_error():
    with pytest.raises(ModelError, match="unknown architecture 'nonesuch'"):
        build_model("nonesuch", 2)


@pytest.mark.parametrize("init", ["mean", "random"])
def test_growing_the_head_keeps_old_logits_and_adds_new_ones(init):
    torch.manual_seed(0)
    model = build_model("resnet18", 3)
    x = torch.randn(4, 3, 32, 32)
    before = logits(model, x)
    old_weight = head_of(model).weight.clone()

    grow_head(model, 2, init, torch.Generator().manual_seed(1))

    after = logits(model, x)
    assert after.shape == (4, 5)
    assert torch.equal(head_of(model).weight[:3], old_weight)  # bit-identical rows
    assert torch.allclose(after[:, :3], before, atol=1e-5)
    assert torch.all(after[:, 3:].std(dim=0) > 0)  # new outputs respond to the input


def test_mean_init_starts_a_new_class_at_the_mean_old_logit():
    torch.manual_seed(0)
    model = build_model("resnet18", 4)
    x = torch.randn(6, 3, 32, 32)
    old = logits(model, x)
    grow_head(model, 1, "mean")
    new = logits(model, x)[:, 4]
    # not dead on arrival (as likely as an average class), yet never above the best old class
    assert torch.allclose(new, old.mean(dim=1), atol=1e-4)
    assert torch.all(new <= old.max(dim=1).values)


def test_snapshot_state_round_trips_without_random_init():
    torch.manual_seed(0)
    model = build_model("resnet18", 3)
    rebuilt = model_from_state("resnet18", model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(logits(model, x), logits(rebuilt, x))


def imagenet_checkpoint(torch_home: Path, arch: str) -> Path:
    url = models.get_model_weights(arch).DEFAULT.url
    return torch_home / "hub" / "checkpoints" / Path(url).name


def test_imagenet_weights_load_from_torchs_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # nothing may be downloaded
    torch.manual_seed(1)
    reference = models.alexnet()  # stands in for the real ImageNet weights: same shapes, same file place
    path = imagenet_checkpoint(tmp_path, "alexnet")
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)

    model = build_model("alexnet", 5, "imagenet")

    assert torch.equal(model.features[0].weight, reference.features[0].weight)
    assert torch.equal(model.classifier[4].weight, reference.classifier[4].weight)
    assert model.classifier[6].out_features == 5


def test_missing_imagenet_weights_name_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    with pytest.raises(ModelError, match=str(imagenet_checkpoint(tmp_path, "resnet18"))):
        build_model("resnet18", 2, "imagenet")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_base_weights_from_a_state_dict_file_with_another_head(tmp_path, suffix):
    torch.manual_seed(2)
    reference = models.resnet18(num_classes=7)
    path = tmp_path / f"base{suffix}"
    if suffix == ".pt":
        torch.save(reference.state_dict(), path)
    else:
        save_file(reference.state_dict(), path)

    model = build_model("resnet18", 3, str(path))

    assert torch.equal(model.conv1.weight, reference.conv1.weight)
    assert model.fc.out_features == 3


def test_base_weights_of_another_architecture_are_refused(tmp_path):
    path = tmp_path / "other.pt"
    torch.save(models.resnet18().state_dict(), path)
    with pytest.raises(ModelError, match="do not fit"):
        build_model("alexnet", 2, str(path))


def test_base_weights_that_are_not_a_file_are_refused():
    with pytest.raises(ModelError, match="'none', 'imagenet' or a state dict file"):
        build_model("resnet18", 2, "/no/such/file.pt")

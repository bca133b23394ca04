"""Vision models: output shapes, parameter counts against the papers, local pretrained weights."""

import pytest
import torch

import speedup.models.vision as vision
from speedup.data import DataInfo
from speedup.models import MODELS, Classifier


def info(resolution: int = 32, classes: int = 10, channels: int = 3) -> DataInfo:
    return DataInfo(
        kind="image", input_shape=(channels, resolution, resolution), num_classes=classes
    )


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    "name", ["resnet18", "resnet50", "resnet20", "resnet56", "conv2", "conv4", "conv6"]
)
@pytest.mark.parametrize("resolution", [32, 64])
def test_output_shapes(name, resolution):
    torch.manual_seed(0)
    model = MODELS.get(name)(info(resolution, classes=7))
    assert isinstance(model, Classifier) and model.kind == "cnn"
    assert MODELS.get(name).kind == "cnn"
    batch = {"inputs": torch.randn(2, 3, resolution, resolution), "targets": torch.tensor([0, 6])}
    out = model(batch)
    assert out.shape == (2, 7)
    assert torch.isfinite(model.loss(out, batch))


def test_resnet50_has_the_reference_parameter_count():
    assert count(MODELS.get("resnet50")(info(224, classes=1000))) == 25_557_032


@pytest.mark.parametrize(("name", "paper"), [("resnet20", 0.27e6), ("resnet56", 0.85e6)])
def test_cifar_resnets_match_he_et_al_table_6(name, paper):
    # He et al. 2016, Table 6: ResNet-20 0.27M, ResNet-56 0.85M parameters (option A).
    model = MODELS.get(name)(info())
    assert abs(count(model) - paper) / paper < 0.01
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert convs + linears == {"resnet20": 20, "resnet56": 56}[name]  # 6n + 2 layers


def test_cifar_resnet_width_and_conv_shortcut():
    wide = MODELS.get("resnet20")(info(), width=32)
    assert wide.net.fc.in_features == 128
    assert 3.9 < count(wide) / count(MODELS.get("resnet20")(info())) < 4.1
    projected = MODELS.get("resnet20")(info(), shortcut="conv")
    assert count(projected) > count(MODELS.get("resnet20")(info()))  # two 1x1 conv + BN
    with pytest.raises(ValueError, match="option A"):
        MODELS.get("resnet20")(info(), shortcut="pad")


@pytest.mark.parametrize(
    ("name", "conv_weights", "total"),
    # Frankle & Carbin 2019, Figure 2: conv weights 38K / 260K / 1.1M, totals 4.3M / 2.4M;
    # Conv-6's total follows its layer list (see ConvNet's docstring).
    [("conv2", 38e3, 4.3e6), ("conv4", 260e3, 2.4e6), ("conv6", 1.1e6, 2.26e6)],
)
def test_lottery_conv_nets_match_frankle_carbin_figure_2(name, conv_weights, total):
    model = MODELS.get(name)(info())
    convs = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert abs(convs - conv_weights) / conv_weights < 0.05
    assert abs(count(model) - total) / total < 0.03


def test_conv_net_accepts_other_resolutions_at_run_time():
    model = MODELS.get("conv4")(info(32))
    assert model({"inputs": torch.randn(2, 3, 48, 48)}).shape == (2, 10)


def test_torchvision_by_arch_and_single_channel_input():
    model = MODELS.get("torchvision")(info(32, classes=5, channels=1), arch="mobilenet_v3_small")
    assert model({"inputs": torch.randn(2, 1, 32, 32)}).shape == (2, 5)
    gray = MODELS.get("resnet18")(info(32, classes=5, channels=1))
    assert gray.net.conv1.in_channels == 1


def test_torchvision_unknown_arch_lists_close_names():
    with pytest.raises(ValueError, match="efficientnet_b0") as err:
        MODELS.get("torchvision")(info(), arch="eficientnet_b0")
    assert "not a torchvision classifier" in str(err.value)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_pretrained_state_dict_round_trip(tmp_path, suffix):
    torch.manual_seed(1)
    source = MODELS.get("resnet18")(info(32))
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pt":
        torch.save(source.net.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in source.net.state_dict().items()}, str(path))
    torch.manual_seed(2)  # a different random init, overwritten by the file
    loaded = MODELS.get("resnet18")(info(32), pretrained=str(path))
    x = {"inputs": torch.randn(3, 3, 32, 32)}
    source.eval(), loaded.eval()
    assert torch.equal(source(x), loaded(x))


def test_pretrained_from_a_classifier_state_dict_and_new_head(tmp_path):
    torch.manual_seed(0)
    source = MODELS.get("resnet20")(info(classes=100))
    path = tmp_path / "resnet20.pt"
    torch.save(source.state_dict(), path)  # keys prefixed "net."
    same = MODELS.get("resnet20")(info(classes=100), pretrained=str(path))
    assert torch.equal(same.net.fc.weight, source.net.fc.weight)
    # fine-tuning to 10 classes keeps the body and leaves a fresh head
    tuned = MODELS.get("resnet20")(info(classes=10), pretrained=str(path))
    assert torch.equal(tuned.net.stem[0].weight, source.net.stem[0].weight)
    assert tuned.net.fc.weight.shape == (10, 64)


def test_pretrained_that_does_not_fit_is_an_error(tmp_path):
    path = tmp_path / "conv2.pt"
    torch.save(MODELS.get("conv2")(info()).net.state_dict(), path)
    with pytest.raises(ValueError, match="does not fit"):
        MODELS.get("resnet18")(info(), pretrained=str(path))


def test_missing_pretrained_path_says_what_to_put_there(tmp_path):
    missing = str(tmp_path / "nope" / "resnet50.pth")
    with pytest.raises(FileNotFoundError) as err:
        MODELS.get("resnet50")(info(), pretrained=missing)
    assert isinstance(err.value, vision.PretrainedPathError)
    message = str(err.value)
    assert missing in message and "state dict" in message and "model.pretrained" in message

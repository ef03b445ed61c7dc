"""Model registry, HR-CelestialNet against the paper's Table 2, baselines against Table 3, and inference helpers.

Full-resolution shapes at width 1 are checked on the meta device (no compute); real forwards use narrow widths.
"""

from __future__ import annotations

import copy
import functools
import time

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from ray_hrc.models import HRCelestialNet, build_model, count_parameters, fold_batchnorm, list_models, prepare_for_inference, size_mib
from ray_hrc.models import hrcelestialnet as hrcelestialnet_module
from ray_hrc.models.hrcelestialnet import MIN_INPUT_SIDE, feature_shape

pytestmark = pytest.mark.timeout(120)

CHIP = (2048, 4096)
NARROW = 1 / 16

# Table 2, layers 1-22: (output size, trainable parameters of the conv or linear layer, BatchNorm excluded).
# Layer 7 is printed as 128 x 121 x 248, but a 2x2/2 pool of 498 columns gives 249, and layer 8's 247 = 249 - 2:
# the table's 248 is a typo, the network gives 249.
TABLE2 = [
    ((32, 2042, 4090), 1_600),
    ((32, 509, 1021), 0),
    ((64, 503, 1015), 100_416),
    ((64, 250, 506), 0),
    ((128, 246, 502), 204_928),
    ((128, 242, 498), 409_728),
    ((128, 121, 249), 0),
    ((256, 119, 247), 295_168),
    ((256, 117, 245), 590_080),
    ((256, 58, 122), 0),
    ((256, 56, 120), 590_080),
    ((256, 54, 118), 590_080),
    ((256, 27, 59), 0),
    ((512, 25, 57), 1_180_160),
    ((512, 23, 55), 2_359_808),
    ((512, 11, 27), 0),
    ((512, 9, 25), 2_359_808),
    ((512, 7, 23), 2_359_808),
    ((512, 3, 11), 0),
    ((4096,), 69_210_112),
    ((4096,), 16_781_312),
    ((2,), 8_194),
]

# Table 3, model size in MB (= MiB: float32 parameters * 4 / 2**20).
TABLE3_MIB = {"hrcelestialnet": 370.21, "alexnet": 385.42, "vgg": 904.22, "resnet": 42.62}

# A small input each model accepts, and the kwargs that keep its forward cheap on a CPU.
SMALL = {
    "hrcelestialnet": ((MIN_INPUT_SIDE, MIN_INPUT_SIDE), {"width": NARROW, "input_shape": (MIN_INPUT_SIDE, MIN_INPUT_SIDE)}),
    "alexnet": ((64, 128), {}),
    "vgg": ((64, 128), {}),
    "resnet": ((64, 128), {}),
}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


class ReferenceHRCelestialNet(nn.Module):
    """The authors' key layout written out from its description, independently of ray_hrc; channels divided by `div`."""

    def __init__(self, div: int = 1, fc_in: int = 512 * 3 * 11) -> None:
        super().__init__()

        def block(cin: int, cout: int, kernel: int, convs: int, pool: nn.MaxPool2d) -> nn.Sequential:
            layers: list[nn.Module] = []
            for _ in range(convs):
                layers += [nn.Conv2d(cin, cout // div, kernel), nn.BatchNorm2d(cout // div), nn.ReLU()]
                cin = cout // div
            return nn.Sequential(*layers, pool)

        self.conv1 = block(1, 32, 7, 1, nn.MaxPool2d(8, 4))
        self.conv2 = block(32 // div, 64, 7, 1, nn.MaxPool2d(4, 2))
        self.conv3 = block(64 // div, 128, 5, 2, nn.MaxPool2d(2, 2))
        self.conv4 = block(128 // div, 256, 3, 2, nn.MaxPool2d(2, 2))
        self.conv5 = block(256 // div, 256, 3, 2, nn.MaxPool2d(2, 2))
        self.conv6 = block(256 // div, 512, 3, 2, nn.MaxPool2d(2, 2))
        self.conv7 = block(512 // div, 512, 3, 2, nn.MaxPool2d(2, 2))
        self.fc1 = nn.Linear(fc_in, 4096 // div)
        self.fc2 = nn.Linear(4096 // div, 4096 // div)
        self.fc3 = nn.Linear(4096 // div, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in (self.conv1, self.conv2, self.conv3, self.conv4, self.conv5, self.conv6, self.conv7):
            x = block(x)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x.flatten(1))))))


@functools.cache
def _built(name: str) -> nn.Module:
    """Model `name` with its SMALL kwargs, built once (VGG takes seconds to initialise); use copies of it."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return build_model(name, **SMALL[name][1])


def _small_model(name: str) -> tuple[nn.Module, torch.Tensor]:
    """A fresh copy of model `name` and a seeded batch of 2 small inputs (2, 1, H, W) it accepts."""
    shape, _ = SMALL[name]
    return copy.deepcopy(_built(name)), torch.randn(2, 1, *shape)


def _randomise_batchnorm(model: nn.Module) -> None:
    """Non-trivial BatchNorm affine parameters and running stats, so that folding has something to fold."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)


def _biases_before_batchnorm(model: nn.Module) -> set[str]:
    """Names of conv biases directly followed by a BatchNorm2d. In train mode BN subtracts the batch mean, which
    cancels a per-channel constant, so their gradient is zero up to rounding and an SGD step leaves them unchanged."""
    names = set()
    for prefix, module in model.named_modules():
        if isinstance(module, nn.Sequential):
            for i in range(len(module) - 1):
                if isinstance(module[i], nn.Conv2d) and isinstance(module[i + 1], nn.BatchNorm2d) and module[i].bias is not None:
                    names.add(f"{prefix}.{i}.bias" if prefix else f"{i}.bias")
    return names


def test_table2_layer_outputs_and_parameters_at_full_resolution() -> None:
    with torch.device("meta"):
        model = HRCelestialNet().eval()
        x = torch.empty(1, 1, *CHIP)
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.Linear))]
    outputs = []
    for layer in layers:
        layer.register_forward_hook(lambda _m, _i, out: outputs.append(tuple(out.shape[1:])))
    logits = model(x)
    assert logits.shape == (1, 2)
    assert outputs == [size for size, _ in TABLE2]
    assert [count_parameters(layer) for layer in layers] == [params for _, params in TABLE2]
    assert len([m for m in layers if isinstance(m, nn.Conv2d)]) == 12
    assert len([m for m in layers if isinstance(m, nn.MaxPool2d)]) == 7
    assert all(m.padding == (0, 0) for m in layers if isinstance(m, nn.Conv2d))
    assert model.feature_shape == feature_shape(CHIP) == (512, 3, 11)


def test_parameter_count_and_size_match_table3() -> None:
    with torch.device("meta"):
        model = build_model("hrcelestialnet")
    assert count_parameters(model) == 97_048_130  # Table 2's 97,041,282 plus 6,848 BatchNorm weights and biases
    assert round(size_mib(model), 2) == TABLE3_MIB["hrcelestialnet"]


@pytest.mark.parametrize("input_shape", [(MIN_INPUT_SIDE, MIN_INPUT_SIDE), (1500, 2000), CHIP])
def test_feature_shape_arithmetic_matches_forward(input_shape: tuple[int, int]) -> None:
    with torch.device("meta"):
        model = HRCelestialNet(input_shape=input_shape).eval()
        features = model.conv7(
            model.conv6(model.conv5(model.conv4(model.conv3(model.conv2(model.conv1(torch.empty(1, 1, *input_shape)))))))
        )
    assert tuple(features.shape[1:]) == model.feature_shape == feature_shape(input_shape)
    assert model.fc1.in_features == features[0].numel()


def test_reference_state_dict_loads_strict() -> None:
    with torch.device("meta"):
        reference = ReferenceHRCelestialNet()
        model = HRCelestialNet()
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    assert "conv1.0.weight" in model.state_dict() and "conv1.1.running_mean" in model.state_dict() and "conv3.4.bias" in model.state_dict()
    model.load_state_dict(reference.state_dict(), strict=True, assign=True)


def test_reference_weights_give_the_same_logits() -> None:
    reference = ReferenceHRCelestialNet(div=16, fc_in=32 * 1 * 1)  # 1322 x 1322 is the smallest input: conv7 gives 1 x 1
    _randomise_batchnorm(reference)
    model = HRCelestialNet(width=NARROW, input_shape=(MIN_INPUT_SIDE, MIN_INPUT_SIDE))
    model.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 1, MIN_INPUT_SIDE, MIN_INPUT_SIDE)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference.eval()(x))


def test_width_multiplier_runs_at_full_resolution() -> None:
    model = build_model("hrcelestialnet", width=NARROW).eval()
    assert count_parameters(model) < count_parameters(build_model("hrcelestialnet", width=1 / 8)) < 97_048_130 // 20
    assert [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)] == [2, 4, 8, 8, 16, 16, 16, 16, 32, 32, 32, 32]
    assert model.fc1.out_features == 256 and model.feature_shape == (32, 3, 11)
    x = torch.randn(1, 1, *CHIP)  # a genuinely full-resolution chip
    with torch.inference_mode():
        start = time.perf_counter()
        logits = model(x)
        elapsed = time.perf_counter() - start
    assert logits.shape == (1, 2) and torch.isfinite(logits).all()
    assert elapsed < 20, f"width 1/16 forward at 2048 x 4096 took {elapsed:.1f} s; expected well under a second or two on 2 cores"


def test_dct_stem_init_is_the_same_for_every_seed_and_spans_low_frequencies() -> None:
    stems = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = HRCelestialNet(width=1, stem_init="dct", input_shape=(MIN_INPUT_SIDE, MIN_INPUT_SIDE))
        stems.append(model.conv1[0].weight.detach().flatten(1))
        torch.manual_seed(seed)
        other_layers = HRCelestialNet(width=1, input_shape=(MIN_INPUT_SIDE, MIN_INPUT_SIDE))
        torch.testing.assert_close(model.conv2[0].weight, other_layers.conv2[0].weight)  # only conv1 changes
    torch.testing.assert_close(stems[0], stems[1])
    w = stems[0]  # 32 filters of 49 weights
    assert torch.allclose(w[0], w[0].mean().expand(49))  # the first is flat: it sums smooth light
    assert w[1:].sum(dim=1).abs().max() < 1e-6  # the others are zero-sum
    torch.testing.assert_close(w @ w.T, torch.eye(32) / 3, atol=1e-6, rtol=0)  # orthogonal, each of the default init's norm
    with pytest.raises(ValueError, match="stem_init is 'gabor'"):
        HRCelestialNet(stem_init="gabor")


@pytest.mark.parametrize("input_shape", [(MIN_INPUT_SIDE - 1, 4096), (2048, 1000), (224, 448)])
def test_too_small_input_shape_raises(input_shape: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match=f"at least {MIN_INPUT_SIDE}"):
        build_model("hrcelestialnet", input_shape=input_shape)


def test_forward_on_another_size_raises_clearly() -> None:
    model = build_model("hrcelestialnet", width=1 / 64, input_shape=(MIN_INPUT_SIDE, MIN_INPUT_SIDE))
    with pytest.raises(ValueError, match=r"input_shape=\(1322, 1322\)"):
        model(torch.zeros(1, 1, MIN_INPUT_SIDE, MIN_INPUT_SIDE + 8))
    with pytest.raises(ValueError, match=r"expected \(B, 1, 1322, 1322\)"):
        model(torch.zeros(1, 3, MIN_INPUT_SIDE, MIN_INPUT_SIDE))


def test_unknown_model_name_lists_known_names() -> None:
    with pytest.raises(ValueError, match="unknown model 'hrcelestialnet2'") as error:
        build_model("hrcelestialnet2")
    for name in ("alexnet", "hrcelestialnet", "resnet", "vgg"):
        assert name in str(error.value)
    assert list_models() == sorted(SMALL) == sorted(TABLE3_MIB)


@pytest.mark.parametrize("name", sorted(TABLE3_MIB))
def test_model_sizes_match_table3(name: str) -> None:
    with torch.device("meta"):
        model = build_model(name)
    assert round(size_mib(model), 2) == TABLE3_MIB[name]
    assert size_mib(model) == count_parameters(model) * 4 / 2**20


@pytest.mark.parametrize(("name", "pooled"), [("alexnet", (256, 6, 13)), ("vgg", (512, 7, 14)), ("resnet", (512, 1, 2))])
def test_baselines_serve_lcid_and_lcid_resize(name: str, pooled: tuple[int, int, int]) -> None:
    with torch.device("meta"):
        model = build_model(name).eval()
        seen = []
        model.avgpool.register_forward_hook(lambda _m, inputs, out: seen.append((tuple(inputs[0].shape[1:]), tuple(out.shape[1:]))))
        for shape in [(224, 448), CHIP]:
            assert model(torch.empty(1, 1, *shape)).shape == (1, 2)
    resize_in, resize_out = seen[0]
    assert resize_out == seen[1][1] == pooled
    if name != "resnet":  # at 224 x 448 AlexNet's and VGG's feature maps are already the pooled size; ResNet's are 7 x 14
        assert resize_in == pooled


@pytest.mark.parametrize("name", list_models())
def test_model_args_rebuild_the_model(name: str) -> None:
    with torch.device("meta"):
        model = build_model(name, **SMALL[name][1])
        rebuilt = build_model(name, **model.model_args)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", list_models())
def test_contract_forward(name: str) -> None:
    model, x = _small_model(name)
    for mode in (True, False):
        logits = model.train(mode)(x)
        assert logits.shape == (2, 2) and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", list_models())
def test_contract_every_parameter_gets_a_gradient(name: str) -> None:
    model, x = _small_model(name)
    cancelled = _biases_before_batchnorm(model)
    target = torch.tensor([0, 1])
    nn.functional.cross_entropy(model.train()(x), target).backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), param_name
        if param_name not in cancelled:
            assert param.grad.abs().sum() > 0, f"{param_name} got a zero gradient in train mode"
    # In eval mode BatchNorm uses its running stats, so the conv biases before it get a gradient too.
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model.eval()(x), target).backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, f"{param_name} got a zero gradient in eval mode"


@pytest.mark.parametrize("name", list_models())
def test_contract_train_step_changes_weights_eval_forward_does_not(name: str) -> None:
    model, x = _small_model(name)
    cancelled = _biases_before_batchnorm(model)
    before = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    nn.functional.cross_entropy(model.train()(x), torch.tensor([0, 1])).backward()
    optimizer.step()
    after = model.state_dict()
    for key in before:
        if key not in cancelled:
            assert not torch.equal(before[key], after[key]), f"{key} did not change after a train step"

    before = copy.deepcopy(model.state_dict())
    model.eval()(x)
    for key, value in model.state_dict().items():
        assert torch.equal(before[key], value), f"{key} changed after an eval-mode forward"


@pytest.mark.parametrize(("name", "unfolded"), [("hrcelestialnet", 0), ("vgg", 0), ("alexnet", 0), ("resnet", 17)])
def test_fold_batchnorm_gives_the_same_logits(name: str, unfolded: int) -> None:
    model, x = _small_model(name)
    _randomise_batchnorm(model)
    model.train()
    state = copy.deepcopy(model.state_dict())
    folded = fold_batchnorm(model)
    assert model.training and all(torch.equal(v, state[k]) for k, v in model.state_dict().items()), "the original was modified"
    assert not folded.training
    assert sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules()) == unfolded
    with torch.no_grad():
        expected = model.eval()(x)
        torch.testing.assert_close(folded(x), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    if name == "hrcelestialnet":
        assert "conv1.1.running_mean" not in folded.state_dict() and "conv1.0.bias" in folded.state_dict()


def test_prepare_for_inference_gives_the_same_logits() -> None:
    model, x = _small_model("hrcelestialnet")
    _randomise_batchnorm(model)
    prepared = prepare_for_inference(model)
    assert not prepared.training and prepared.conv2.block[0].weight.is_contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected = model.eval()(x)
        tolerance = {"rtol": 1e-4, "atol": 1e-4 * expected.abs().max().item()}
        torch.testing.assert_close(prepared(x), expected, **tolerance)
        torch.testing.assert_close(prepared(x.contiguous(memory_format=torch.channels_last)), expected, **tolerance)
        torch.testing.assert_close(prepare_for_inference(model, channels_last=False, fold_bn=False)(x), expected, **tolerance)


def test_checkpoint_large_gives_the_same_step(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(hrcelestialnet_module, "checkpoint", lambda *a, **k: calls.append(1) or torch_checkpoint(*a, **k))
    plain, x = _small_model("hrcelestialnet")
    checkpointed = copy.deepcopy(plain)
    checkpointed.checkpoint_large = True
    for model in (plain, checkpointed):
        nn.functional.cross_entropy(model.train()(x), torch.tensor([0, 1])).backward()
    assert len(calls) == 3  # conv1..conv3 of the checkpointed model only
    with torch.no_grad():
        checkpointed.eval()(x)
    assert len(calls) == 3  # never outside training
    for (key, a), b in zip(plain.state_dict().items(), checkpointed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=f"{key} differs with checkpoint_large")  # running stats updated once, not twice
    for (key, a), b in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=f"gradient of {key} differs with checkpoint_large")

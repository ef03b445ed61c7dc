"""The forward's precision per machine (bf16 where the CPU multiplies bf16 natively), and bf16 checked against fp32.

The agreement test classifies the same chips with the one predictor (`ChipClassifier`) in both precisions. A model
with seeded random weights puts every chip near p_galaxy 0.5, where any precision agrees; so the last layer is set
from the model's own float32 features to spread the chips' logit margins over about -5..5 (p_galaxy from about 0.01
to 0.99), and the test checks that spread before it compares. The chips are the smallest the model takes,
1322 x 1322, on every machine: on CPUs without native bf16 the bf16 forward is emulated and slow. A second test
holds a trained model (the demo's, `tests/data/demo_checkpoint`) to the issue's 0.01 on full chips.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from ray_hrc.checkpoint import save_checkpoint
from ray_hrc.classify import ClassifyConfig
from ray_hrc.models import build_model, choose_precision, pool_before_relu, prepare_for_inference
from ray_hrc.models.hrcelestialnet import MIN_INPUT_SIDE
from ray_hrc.models.inference import ShiftMaxPool2d, SplitPrecision, cpu_bf16_features, cpu_flags, split_conv
from ray_hrc.predict import ChipClassifier, precision_counts
from ray_hrc.preprocess import NormConfig

SAPPHIRE_RAPIDS = {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8"}
EPYC_ZEN3 = {"avx", "avx2", "fma", "f16c"}
EPYC_ZEN4 = {"avx2", "avx512f", "avx512_bf16", "avx512_vnni"}
NATIVE_BF16 = bool(cpu_bf16_features())
SHAPE = (MIN_INPUT_SIDE, MIN_INPUT_SIDE)
N_CHIPS = 8
P_TOLERANCE = 0.05
"""Largest |p_galaxy(bf16) - p_galaxy(fp32)| allowed. Issue 16 asks for 0.01; this construction (a random network's
features read along their first principal component, margins spread over -5..5) measured 0.038 on an Intel Xeon with
AMX and 0.041 with oneDNN held to AVX2 (DNNL_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2), so 0.01 is not met on it.
The trained model of `test_bf16_classifies_a_trained_model_like_fp32_within_0_01` is held to 0.01."""


@pytest.mark.parametrize(
    ("flags", "expected", "named"),
    [(SAPPHIRE_RAPIDS, "bf16", "amx_bf16, avx512_bf16"), (EPYC_ZEN4, "bf16", "avx512_bf16"), (EPYC_ZEN3, "fp32", "no native bf16")],
)
def test_auto_precision_follows_the_cpu_flags(flags: set[str], expected: str, named: str) -> None:
    choice = choose_precision("auto", "cpu", flags=flags)
    assert choice.name == expected
    assert named in choice.reason
    assert choice.dtype == (torch.bfloat16 if expected == "bf16" else torch.float32)
    assert not choice.autocast  # on CPU bf16 means bf16 weights, not autocast


def test_a_setting_forces_either_precision() -> None:
    assert choose_precision("fp32", "cpu", flags=SAPPHIRE_RAPIDS).name == "fp32"
    forced = choose_precision("bf16", "cpu", flags=EPYC_ZEN3)
    assert forced.name == "bf16" and "set in the configuration" in forced.reason and "no native bf16" in forced.reason
    with pytest.raises(ValueError, match="expected one of"):
        choose_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="precision is 'int4'"):
        ClassifyConfig(precision="int4")


def test_cpu_flags_are_read_from_cpuinfo(tmp_path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse2 avx avx2 fma\n\nprocessor\t: 1\n")
    assert cpu_flags(info) == {"fpu", "sse2", "avx", "avx2", "fma"}
    assert cpu_bf16_features(cpu_flags(info)) == []
    assert cpu_flags(tmp_path / "missing") == set()


@pytest.mark.parametrize(("kernel", "stride"), [(8, 4), (4, 2), (2, 2), (3, 2)])
def test_pool_before_relu_gives_the_same_numbers(kernel: int, stride: int) -> None:
    """ReLU after the pool, and an overlapping pool as two pools, change no output bit (odd sizes included)."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(inplace=True), nn.MaxPool2d(kernel, stride))
    x = torch.randn(2, 1, 45, 38)
    with torch.no_grad():
        expected = block(x)
        rewritten = pool_before_relu(block)
        assert isinstance(rewritten[-1], nn.ReLU)
        if kernel != stride and kernel % stride == 0:
            assert isinstance(rewritten[-2], nn.Sequential)  # the split pool
        assert torch.equal(rewritten(x), expected)


def _chips(n: int, shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Normalised chips, float16 (n, rows, cols): noise plus either one smooth blob or many point sources."""
    rng = np.random.default_rng(seed)
    rows, cols = shape
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    chips = []
    for i in range(n):
        image = rng.normal(0, 1, shape).astype(np.float32)
        if i % 2 == 0:
            cy, cx, sigma = rng.uniform(0.3, 0.7) * rows, rng.uniform(0.3, 0.7) * cols, rng.uniform(0.05, 0.2) * rows
            image += rng.uniform(2, 6) * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * sigma**2))
        else:
            for _ in range(200):
                image[rng.integers(2, rows - 2), rng.integers(2, cols - 2)] += rng.uniform(5, 20)
        chips.append(image)
    return np.stack(chips).astype(np.float16)


@pytest.fixture(scope="module")
def spread_checkpoint(tmp_path_factory):
    """A checkpoint (width 1/16, input `SHAPE`) whose last layer reads the float32 fc2 features of `_chips` along their
    first principal component, scaled so that the chips' logit margins span -5..5; and those chips."""
    torch.manual_seed(0)
    args = {"width": 0.0625, "input_shape": list(SHAPE), "stem_init": "dct"}
    model = build_model("hrcelestialnet", **args).eval()
    chips = _chips(N_CHIPS, SHAPE)
    x = torch.from_numpy(chips.astype(np.float32))[:, None]
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):  # BatchNorm statistics of these very chips, as a trained model has
                m.reset_running_stats()
                m.momentum = None
        model.train()(x)
        model.eval()
        h = x
        for block in model.blocks:
            h = block(h)
        features = torch.relu(model.fc2(torch.relu(model.fc1(torch.flatten(h, 1)))))
        centred = features - features.mean(0)
        direction = torch.linalg.svd(centred, full_matrices=False).Vh[0]  # the direction in which the chips differ most
        margin = centred @ direction
        scale = 5.0 / margin.abs().max()
        model.fc3.weight.copy_(torch.stack([direction, -direction]) * scale / 2)
        model.fc3.bias.copy_(torch.tensor([-1.0, 1.0]) * float(features.mean(0) @ direction) * scale / 2)
    directory = tmp_path_factory.mktemp("spread_checkpoint")
    save_checkpoint(str(directory), {"model_name": "hrcelestialnet", "model_args": args, "model_state": model.state_dict(),
                                     "epoch": 0, "preprocess": NormConfig().to_dict()})  # fmt: skip
    return str(directory), chips


def _batch(chips: np.ndarray) -> dict[str, np.ndarray]:
    n = len(chips)
    return {"uri": np.array([f"chip{i}.fits" for i in range(n)]), "hdu": np.arange(n), "error_class": np.full(n, ""), "image": chips}


def test_bf16_classifies_like_fp32(spread_checkpoint) -> None:
    """Same chips, both precisions, the one predictor: the same labels on every chip, p_galaxy within `P_TOLERANCE`."""
    checkpoint, chips = spread_checkpoint
    fp32 = ChipClassifier(checkpoint, device="cpu", precision="fp32")
    bf16 = ChipClassifier(checkpoint, device="cpu", precision="bf16")
    assert {p.dtype for p in fp32.model.parameters()} == {torch.float32}
    assert any(isinstance(m, SplitPrecision) for m in bf16.model.conv1.modules())  # the stem at float32 accuracy
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    a, b = fp32(_batch(chips)), bf16(_batch(chips))
    spread = np.sort(a["p_galaxy"])
    assert spread[0] < 0.1 and spread[-1] > 0.9, f"the chips' fp32 p_galaxy {spread} do not spread; the comparison would be empty"
    np.testing.assert_array_equal(b["label"], a["label"])
    print(f"max |p_galaxy difference| {np.abs(b['p_galaxy'] - a['p_galaxy']).max():.4f}")
    difference = np.abs(b["p_galaxy"] - a["p_galaxy"])
    assert difference.max() < P_TOLERANCE, f"p_galaxy fp32 {a['p_galaxy']}, bf16 {b['p_galaxy']}"
    assert difference.max() > 0, "bf16 gave bit-identical probabilities: it did not run in bf16"
    assert set(b["precision"]) == {bf16.precision.describe()} and b["precision"][0].startswith("bf16 on cpu")
    assert precision_counts(pd.DataFrame(b)) == {bf16.precision.describe(): N_CHIPS}


def test_auto_precision_on_this_machine(spread_checkpoint) -> None:
    """ "auto" runs bf16 weights exactly where this CPU has AMX or AVX-512 BF16, and says which it found."""
    checkpoint, _ = spread_checkpoint
    auto = ChipClassifier(checkpoint, device="cpu")
    assert auto.precision.name == ("bf16" if NATIVE_BF16 else "fp32")
    assert auto.model.fc1.weight.dtype == auto.precision.dtype
    for feature in cpu_bf16_features():
        assert feature in auto.precision.reason


@pytest.mark.parametrize(("padding", "stride"), [(0, 1), (3, 2)])  # HR-CelestialNet's conv1; ResNet's
def test_split_conv_has_float32_accuracy(padding: int, stride: int) -> None:
    """`split_conv` in bf16 against a float64 convolution, on a faint source over a bright sky (the case bf16 inputs get
    wrong: filters that cancel the sky): its error is float32's order, 2^-16 of the terms, far below plain bf16's."""
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 8, 7, stride=stride, padding=padding).eval()
    with torch.no_grad():
        conv.weight.sub_(conv.weight.mean(dim=(2, 3), keepdim=True))  # zero-sum filters: the sky cancels
        conv.bias.copy_(torch.randn(8) * 30)
    x = 1000 + torch.randn(2, 1, 64, 96)
    exact = torch.nn.functional.conv2d(x.double(), conv.weight.double(), conv.bias.double(), stride, padding)
    scale = torch.nn.functional.conv2d(x.double().abs(), conv.weight.double().abs(), conv.bias.double().abs(), stride, padding)
    split = split_conv(conv, torch.bfloat16)
    assert isinstance(split[0], SplitPrecision) and split[1].weight.dtype == torch.bfloat16
    with torch.inference_mode():
        got = split(x)
        plain = torch.nn.functional.conv2d(x.bfloat16(), conv.weight.bfloat16(), conv.bias.bfloat16(), stride, padding)
    assert got.dtype == torch.bfloat16 and got.shape == exact.shape
    rounding = exact.abs() * 2.0**-8  # the output's own rounding to bf16
    split_error = ((got.double() - exact).abs() - rounding).clamp_min(0) / scale
    plain_error = ((plain.double() - exact).abs() - rounding).clamp_min(0) / scale
    assert split_error.max() < 2.0**-14, split_error.max()
    assert plain_error.max() > 50 * split_error.max(), (plain_error.max(), split_error.max())


@pytest.mark.parametrize("shape", [(1, 32, 9, 1022), (2, 3, 5, 2), (1, 1, 2, 7)])
@pytest.mark.parametrize("kernel", [2, (3, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shift_max_pool_is_max_pool(shape, kernel, dtype) -> None:
    x = torch.randn(shape)
    x.view(-1)[::7] = float("nan")
    x = x.to(dtype).contiguous(memory_format=torch.channels_last)
    k = kernel if isinstance(kernel, tuple) else (kernel, kernel)
    if shape[2] < k[0] or shape[3] < k[1]:
        with pytest.raises(RuntimeError):
            ShiftMaxPool2d(kernel)(x)
        return
    torch.testing.assert_close(ShiftMaxPool2d(kernel)(x), torch.nn.functional.max_pool2d(x, kernel, 1), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("float32_stem", [True, False])
def test_prepared_bf16_model_matches_fp32_on_random_weights(float32_stem: bool) -> None:
    """`prepare_for_inference` in bf16 (folded BatchNorm, pools before ReLUs, channels_last) against the eager model."""
    torch.manual_seed(1)
    model = build_model("hrcelestialnet", width=0.0625, input_shape=[MIN_INPUT_SIDE, MIN_INPUT_SIDE]).eval()
    x = torch.randn(2, 1, MIN_INPUT_SIDE, MIN_INPUT_SIDE)
    prepared = prepare_for_inference(model, dtype=torch.bfloat16, float32_stem=float32_stem)
    stem = prepared.conv1.block  # conv1 runs in row strips (RowStrips) on CPU
    assert isinstance(stem[0][0], SplitPrecision) if float32_stem else stem[0].weight.dtype == torch.bfloat16
    with torch.inference_mode():
        expected = model(x)
        got = prepared((x if float32_stem else x.to(torch.bfloat16)).contiguous(memory_format=torch.channels_last))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=0.05, atol=0.02 * expected.abs().max().item())


@pytest.mark.timeout(600)
def test_evaluate_records_the_precision_it_ran(ray_session, tiny_archive, random_checkpoint, tmp_path) -> None:
    """`evaluate` (through `classify_archive`'s actors) runs the precision it is given and writes it in its metrics and
    the run summary, with the CPU features behind it."""
    import json

    from ray_hrc.evaluate import evaluate_checkpoint
    from ray_hrc.manifest import read_manifest

    metrics = evaluate_checkpoint(random_checkpoint, str(tiny_archive), str(tmp_path / "report"), config=ClassifyConfig(precision="fp32"))
    chips = len(read_manifest(str(tiny_archive)))
    (described,) = metrics["precision"]
    assert described.startswith("fp32 on cpu: set in the configuration; CPU has ") and metrics["precision"][described] == chips
    summary = json.loads((tmp_path / "report" / "catalog" / "summary.json").read_text())
    assert summary["precision"] == metrics["precision"]


@pytest.mark.parametrize("command", ["classify", "evaluate"])
def test_precision_flag_reaches_the_model_stage(command: str) -> None:
    from ray_hrc.cli import _classify_configs, build_parser

    common = ["--checkpoint", "ck", "--out", "o"] + (["--input", "x.fits"] if command == "classify" else ["--manifest", "m.csv"])
    _, stage, _ = _classify_configs(build_parser().parse_args([command, *common, "--precision", "fp32"]))
    assert stage.precision == "fp32"
    _, stage, _ = _classify_configs(build_parser().parse_args([command, *common]))
    assert stage.precision == "auto"
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, *common, "--precision", "fp16"])


def test_cpu_bf16_autocast_training_step() -> None:
    """`train.cpu_bf16`'s path: `train_step` under CPU bf16 autocast keeps float32 weights, changes them, and its loss
    follows the float32 step's."""
    from contextlib import nullcontext

    from ray_hrc.config import load_config
    from ray_hrc.train import train_step

    assert load_config(None, ["train.cpu_bf16=true"]).train.cpu_bf16
    x = torch.from_numpy(_chips(2, SHAPE).astype(np.float32))[:, None]
    y = torch.tensor([0, 1])
    losses = {}
    for name, autocast in (("fp32", nullcontext), ("bf16", lambda: torch.autocast("cpu", dtype=torch.bfloat16))):
        torch.manual_seed(0)
        model = build_model("hrcelestialnet", width=0.0625, input_shape=list(SHAPE), stem_init="dct")
        before = model.fc3.weight.detach().clone()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses[name] = train_step(model, optimizer, x, y, autocast)
        assert model.fc3.weight.dtype == torch.float32 and not torch.equal(model.fc3.weight, before)
    assert np.isfinite(losses["bf16"]) and abs(losses["bf16"] - losses["fp32"]) < 0.05, losses


TRAINED_CHECKPOINT = Path(__file__).parent / "data" / "demo_checkpoint"
"""The demo's `best/` (archive and training seed 0, width 1/16, 6 epochs; the optimizer state dropped: 1.5 MB)."""


def test_bf16_classifies_a_trained_model_like_fp32_within_0_01(tiny_archive) -> None:
    """Issue 16's check on a trained model: every chip of an archive it never saw, full 2048 x 4096 chips, both
    precisions of the one predictor: the same label everywhere and |p_galaxy difference| under 0.01. (Measured on the
    demo's 54 test chips: at most 0.0031.) On CPUs without native bf16 the bf16 forward is emulated: slower, same check."""
    from ray_hrc.chips import Chip, read_fits
    from ray_hrc.manifest import read_manifest
    from ray_hrc.preprocess import normalise

    manifest = read_manifest(str(tiny_archive))
    images = []
    for uri, hdu in zip(manifest["URI"], manifest["HDU Index"], strict=True):
        chip = read_fits(uri, hdus=[int(hdu)])[0]
        assert isinstance(chip, Chip), chip
        images.append(normalise(chip.pixels, chip.amp_bias, NormConfig()))
    chips = np.stack(images)
    fp32 = ChipClassifier(str(TRAINED_CHECKPOINT), device="cpu", precision="fp32")
    bf16 = ChipClassifier(str(TRAINED_CHECKPOINT), device="cpu", precision="bf16")
    a, b = fp32(_batch(chips)), bf16(_batch(chips))
    difference = np.abs(b["p_galaxy"] - a["p_galaxy"])
    print(f"p_galaxy fp32 {np.round(a['p_galaxy'], 4)}; max |difference| {difference.max():.4f}")
    np.testing.assert_array_equal(b["label"], a["label"])
    assert difference.max() < 0.01, f"p_galaxy fp32 {a['p_galaxy']}, bf16 {b['p_galaxy']}"
    assert difference.max() > 0, "bf16 gave bit-identical probabilities: it did not run in bf16"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_stem_in_row_strips_gives_the_same_numbers(dtype, monkeypatch) -> None:
    """`RowStrips` runs conv1 and its pool strip by strip (in cache); the logits are bit-identical to the whole stem's."""
    from ray_hrc.models import inference

    monkeypatch.setattr(inference, "STRIP_BYTES", 2**20)  # many strips, a last one shorter than the others
    model = build_model("hrcelestialnet", width=0.0625, input_shape=[MIN_INPUT_SIDE + 37, MIN_INPUT_SIDE]).eval()
    strips = prepare_for_inference(model, dtype=dtype)
    assert isinstance(strips.conv1, inference.RowStrips) and (strips.conv1.stride, strips.conv1.span) == (4, 14)
    assert isinstance(strips.conv2, inference.RowStrips) and (strips.conv2.stride, strips.conv2.span) == (2, 10)
    whole = prepare_for_inference(model, dtype=dtype)
    for name, child in list(whole.named_children()):
        if isinstance(child, inference.RowStrips):
            setattr(whole, name, child.block)
    x = torch.rand(2, 1, MIN_INPUT_SIDE + 37, MIN_INPUT_SIDE).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        stem_rows = strips.conv1(x).shape[2]
        assert stem_rows == (MIN_INPUT_SIDE + 37 - 14) // 4 + 1
        assert 2**20 // (4 * 2 * MIN_INPUT_SIDE * 2 * 4) < stem_rows  # it did cut the chip into strips
        torch.testing.assert_close(strips(x), whole(x), rtol=0, atol=0)


def test_row_strips_leave_other_stems_alone() -> None:
    from torchvision.models import resnet18

    from ray_hrc.models.inference import RowStrips, _row_geometry

    net = resnet18(num_classes=2)
    net.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    prepared = prepare_for_inference(net)
    assert not any(isinstance(m, RowStrips) for m in prepared.modules())  # stride 2 and padding 3: not row-separable here
    assert _row_geometry(nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.MaxPool2d(2))) is None
    assert _row_geometry(nn.Sequential(nn.Conv2d(1, 2, 5), nn.ReLU(), nn.MaxPool2d(4, 2))) == (2, 8)

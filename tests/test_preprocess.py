"""`normalise` against a plain numpy version of the same maths, the compiled loops against numpy, in-place use. No Ray."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from ray_hrc import kernels
from ray_hrc.preprocess import NormConfig, clip_levels, normalise, preprocess_row, resize

SHAPE = (256, 512)


def reference(pixels: np.ndarray, amp_bias: np.ndarray | None, cfg: NormConfig) -> np.ndarray:
    """The maths written out with numpy over float32 copies: no lookup tables, histograms or compiled loops."""
    n_amps = 1 if amp_bias is None or len(amp_bias) == 0 else len(amp_bias)
    bias = np.zeros(n_amps, np.float32) if amp_bias is None or len(amp_bias) == 0 else np.asarray(amp_bias, np.float32)
    width = pixels.shape[1] // n_amps
    column_bias = np.repeat(bias, width)  # bias of every column
    step = cfg.sample_step
    sample = pixels[::step, ::step].astype(np.float32) - column_bias[::step]
    sample = sample[np.isfinite(sample)]
    lo, hi = np.percentile(sample, [cfg.lo_percentile, cfg.hi_percentile]) if sample.size else (0.0, 1.0)
    if not hi > lo:
        hi = lo + 1.0
    offset = (column_bias + np.float32(lo)).astype(np.float32)
    v = (pixels.astype(np.float32) - offset) * np.float32(1.0 / (hi - lo))
    v = np.nan_to_num(v, nan=0.0, posinf=1.0, neginf=0.0)
    v = np.clip(v, 0.0, 1.0)
    if cfg.stretch == "asinh":
        a = np.float32(cfg.asinh_softening)
        v = np.arcsinh(v * a) * np.float32(1.0 / np.arcsinh(a))
    out = v.astype(cfg.dtype)
    if cfg.resize is not None:
        out = resize(out.astype(np.float32), cfg.resize).astype(cfg.dtype)
    return out


def assert_within_rounding(got: np.ndarray, want: np.ndarray) -> None:
    """Equal up to one step of the output dtype's rounding, and bit-identical almost everywhere."""
    assert got.dtype == want.dtype and got.shape == want.shape
    g, w = got.astype(np.float64), want.astype(np.float64)
    step = np.spacing(np.abs(want).astype(want.dtype)).astype(np.float64)  # one unit in the last place, per pixel
    assert np.all(np.abs(g - w) <= step), float(np.abs(g - w).max())
    assert np.mean(g == w) > 0.999


def raw_chip(seed: int = 0, n_amps: int = 2, shape: tuple[int, int] = SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """uint16 DN: sky plus a few bright sources and saturated pixels on amps with different bias levels."""
    rng = np.random.default_rng(seed)
    bias = rng.uniform(2000, 4000, n_amps).round(1).astype(np.float32)
    sky = rng.gamma(2.0, 40.0, shape) + np.repeat(bias, shape[1] // n_amps)
    sky[rng.integers(0, shape[0], 50), rng.integers(0, shape[1], 50)] = 65535
    return sky.clip(0, 65535).astype(np.uint16), bias


CONFIGS = {
    "asinh": NormConfig(),
    "linear": NormConfig(stretch="linear"),
    "float32": NormConfig(dtype="float32"),
    "resize": NormConfig(resize=(32, 64)),
    "all_pixels": NormConfig(lo_percentile=0.0, hi_percentile=100.0, sample_step=1),
    "soft": NormConfig(asinh_softening=1000.0, lo_percentile=5, hi_percentile=95, sample_step=3),
}


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("n_amps", [1, 2, 4])
def test_raw_chip_matches_numpy_reference(name, n_amps):
    pixels, bias = raw_chip(seed=n_amps, n_amps=n_amps)
    cfg = CONFIGS[name]
    assert_within_rounding(normalise(pixels, bias, cfg), reference(pixels, bias, cfg))


@pytest.mark.parametrize("name", CONFIGS)
def test_calibrated_chip_matches_numpy_reference(name):
    rng = np.random.default_rng(5)
    pixels = rng.normal(20.0, 5.0, SHAPE).astype(np.float32)
    pixels[rng.random(SHAPE) < 0.01] = np.nan
    pixels[0, :3] = (np.inf, -np.inf, 1e6)
    cfg = CONFIGS[name]
    got = normalise(pixels, None, cfg)
    assert_within_rounding(got, reference(pixels, None, cfg))
    assert np.isfinite(got.astype(np.float32)).all()


def test_constant_and_extreme_chips():
    for pixels, bias in [
        (np.full(SHAPE, 7, np.uint16), np.array([7.0, 7.0], np.float32)),  # hi == lo: one DN of range
        (np.zeros(SHAPE, np.uint16), np.array([3000.0], np.float32)),  # everything below the bias
        (np.full(SHAPE, 65535, np.uint16), np.array([0.0], np.float32)),
        (np.random.default_rng(2).integers(0, 65536, SHAPE).astype(np.uint16), np.array([0.0, 100.0], np.float32)),
    ]:
        for cfg in (NormConfig(), NormConfig(stretch="linear", dtype="float32")):
            assert_within_rounding(normalise(pixels, bias, cfg), reference(pixels, bias, cfg))


def test_uint16_clip_levels_equal_np_percentile():
    """The histogram path gives np.percentile's numbers exactly, not just closely."""
    for seed in range(5):
        pixels, bias = raw_chip(seed=seed, n_amps=2)
        for cfg in (NormConfig(), NormConfig(lo_percentile=1.3, hi_percentile=97.1, sample_step=5)):
            step = cfg.sample_step
            sample = pixels[::step, ::step].astype(np.float32) - np.repeat(bias, SHAPE[1] // 2)[::step]
            want = tuple(float(v) for v in np.percentile(sample, [cfg.lo_percentile, cfg.hi_percentile]))
            assert clip_levels(pixels, bias, cfg) == want


def test_any_uint16_layout_in_memory():
    pixels, bias = raw_chip()
    want = normalise(pixels, bias)
    np.testing.assert_array_equal(normalise(pixels.astype(">u2"), bias), want)  # big-endian
    np.testing.assert_array_equal(normalise(np.asfortranarray(pixels), bias), want)
    wide = np.zeros((SHAPE[0], SHAPE[1] * 2), np.uint16)
    wide[:, ::2] = pixels
    np.testing.assert_array_equal(normalise(wide[:, ::2], bias), want)  # a strided view
    readonly = pixels.copy()
    readonly.flags.writeable = False
    np.testing.assert_array_equal(normalise(readonly, bias), want)


def test_normalise_in_place_over_the_pixels():
    pixels, bias = raw_chip()
    want = normalise(pixels, bias)
    buffer = pixels.copy()
    got = normalise(buffer, bias, out=buffer.view(np.float16))
    assert np.shares_memory(got, buffer)
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="in place"):
        calibrated = pixels.astype(np.float32)
        normalise(calibrated, None, NormConfig(dtype="float32"), out=calibrated)
    with pytest.raises(ValueError, match="expected float16"):
        normalise(pixels, bias, out=np.empty(SHAPE, np.float32))


def test_preprocess_row_consumes_writable_pixels_only():
    pixels, bias = raw_chip()
    want = normalise(pixels, bias)
    row = {"uri": "x", "pixels": pixels.copy(), "amp_bias": bias, "error_class": "", "read_ms": 1.0}
    out = preprocess_row(row, NormConfig())
    assert "pixels" not in out and out["preprocess_ms"] >= 1.0
    np.testing.assert_array_equal(out["image"], want)
    assert np.shares_memory(out["image"], row["pixels"])  # no second 16 MiB array per chip
    readonly = pixels.copy()
    readonly.flags.writeable = False  # e.g. a chip read back from Ray's object store
    out = preprocess_row({"uri": "x", "pixels": readonly, "amp_bias": bias, "error_class": ""}, NormConfig())
    np.testing.assert_array_equal(out["image"], want)
    np.testing.assert_array_equal(readonly, pixels)
    for cfg in (NormConfig(dtype="float32"), NormConfig(resize=(32, 64))):  # other shapes or sizes: a new array
        kept = pixels.copy()
        out = preprocess_row({"uri": "x", "pixels": kept, "amp_bias": bias, "error_class": ""}, cfg)
        assert_within_rounding(out["image"], reference(pixels, bias, cfg))


# --- the compiled loops against numpy ----------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["<", ">"])
def test_crop_offset_uint16_is_numpy_join_and_offset(order):
    rng = np.random.default_rng(1)
    physical = rng.integers(0, 65536, (20, 70)).astype(np.uint16)
    stored = (physical.astype(np.int32) - 32768).astype(np.int16).astype(f"{order}i2")
    got = kernels.crop_offset_uint16(stored, [3, 40], 25)
    np.testing.assert_array_equal(got, np.concatenate([physical[:, 3:28], physical[:, 40:65]], axis=1))
    with pytest.raises(ValueError, match="do not fit"):
        kernels.crop_offset_uint16(stored, [50], 25)


@pytest.mark.parametrize("order", ["<", ">"])
def test_offset_uint16_median_is_np_median(order):
    rng = np.random.default_rng(2)
    for rows, cols, spread in [(2048, 24, 5.0), (7, 3, 20000.0), (1, 1, 1.0), (10, 4, 0.0)]:
        physical = rng.normal(3000, spread, (rows, cols + 4)).clip(0, 65535).astype(np.uint16)
        stored = (physical.astype(np.int32) - 32768).astype(np.int16).astype(f"{order}i2")
        assert kernels.offset_uint16_median(stored, 2, 2 + cols) == float(np.median(physical[:, 2 : 2 + cols]))


def test_sample_histograms_and_order_statistics():
    pixels, bias = raw_chip(n_amps=4)
    hist = kernels.sample_histograms(pixels, 3, 4)
    width = SHAPE[1] // 4
    for a in range(4):
        cols = np.arange(0, SHAPE[1], 3)
        sample = pixels[::3, cols[(cols >= a * width) & (cols < (a + 1) * width)]]
        np.testing.assert_array_equal(hist[a], np.bincount(sample.ravel(), minlength=65536))
    sample = np.sort((pixels[::3, ::3].astype(np.float32) - np.repeat(bias, width)[::3]).ravel())
    ranks = [0, 1, 17, sample.size // 2, sample.size - 1]
    np.testing.assert_array_equal(kernels.order_statistics(hist, bias, ranks), sample[ranks])


def test_gather_lut_per_amp():
    pixels, _ = raw_chip(n_amps=2)
    luts = np.random.default_rng(3).integers(0, 2**32, (2, 65536), dtype=np.uint32)
    out = kernels.gather_lut(pixels, luts, np.empty(SHAPE, np.uint32))
    np.testing.assert_array_equal(out[:, :256], luts[0][pixels[:, :256]])
    np.testing.assert_array_equal(out[:, 256:], luts[1][pixels[:, 256:]])


def test_compiles_without_a_cache_directory(caplog):
    """Where numba has nowhere to cache (here: a function without a source file), kernels still compile, in memory."""
    namespace: dict = {}
    exec("def twice(x):\n    return 2 * x\n", namespace)  # noqa: S102 - no file behind it, so no cache locator
    with caplog.at_level(logging.INFO, logger="ray_hrc.kernels"):
        twice = kernels.jit(namespace["twice"])
    assert twice(21) == 42
    assert "compiling in memory" in caplog.text

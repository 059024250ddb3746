"""Segmentation training augmentation: crops keep labels aligned, draws are seeded and independent of each other."""
import numpy as np
import pytest

from heads.segmentation.transforms import SegTrainTransform


def _blocks(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A dark left third labelled 3 and a bright rest labelled 13, with ignore and class-7 stripes inside."""
    mask = np.full((height, width), 13, dtype=np.uint8)
    mask[:, : width // 3] = 3
    image = np.where(mask[..., None] == 3, 30, 220).astype(np.uint8).repeat(3, axis=2)
    mask[::17] = 255
    mask[:, 5::23] = np.where(mask[:, 5::23] == 13, 7, mask[:, 5::23])
    return image, mask


@pytest.mark.parametrize("input_size", [(60, 100), (300, 500)])
def test_augmentation_crops_keeps_labels_and_alignment(input_size):
    transform = SegTrainTransform(crop_size=(128, 192))
    image, mask = _blocks(*input_size)
    for seed in range(25):
        out_image, out_mask = transform(image, mask, seed=seed)
        assert out_image.shape == (128, 192, 3) and out_image.dtype == np.uint8 and out_mask.shape == (128, 192)
        assert set(np.unique(out_mask)) <= {3, 7, 13, 255}
        brightness = out_image.mean(axis=2)
        dark, bright = brightness[out_mask == 3], brightness[out_mask == 13]
        if dark.size > 100 and bright.size > 100:  # colour jitter is monotonic: dark stays darker where aligned
            assert np.percentile(dark, 95) < np.percentile(bright, 5), seed


def test_augmentation_is_reproducible_per_seed():
    transform = SegTrainTransform(crop_size=(64, 96))
    rng = np.random.default_rng(0)
    image, mask = rng.integers(0, 256, (120, 200, 3), dtype=np.uint8), rng.integers(0, 19, (120, 200), dtype=np.uint8)
    first = transform(image, mask, seed=7)
    transform(image, mask)
    transform(image, mask, seed=8)
    again = transform(image, mask, seed=7)
    assert all((a == b).all() for a, b in zip(first, again))
    outputs = {transform(image, mask, seed=seed)[0].tobytes() for seed in range(10)}
    assert len(outputs) == 10


HEIGHT, WIDTH, CROP = 160, 250, (64, 96)


def observed_draws(seeds) -> dict[str, np.ndarray]:
    """What each op drew, read off the outputs of a grey image (colour jitter moves it off 128) whose mask holds each
    pixel's column, then its row: flipping reverses the columns; the span of the crop gives the scale and its first
    row and column the crop offsets."""
    transform = SegTrainTransform(crop_size=CROP)
    image = np.full((HEIGHT, WIDTH, 3), 128, dtype=np.uint8)
    rows, columns = np.indices((HEIGHT, WIDTH), dtype=np.uint8)
    draws = {"scale": [], "top": [], "left": [], "flip": [], "jitter": []}
    for seed in seeds:
        out_image, out_columns = transform(image, columns, seed=seed)
        out_rows = transform(image, rows, seed=seed)[1][:, 0].astype(float)
        out_columns = out_columns[0].astype(float)
        scale = CROP[1] / (out_columns.max() - out_columns.min() + 1)
        draws["scale"].append(scale)
        draws["top"].append(out_rows.min() / (HEIGHT - CROP[0] / scale))  # the crop's edge / its room to move
        draws["left"].append(out_columns.min() / (WIDTH - CROP[1] / scale))
        draws["flip"].append(out_columns[0] > out_columns[-1])
        draws["jitter"].append((out_image != 128).any())
    return {name: np.array(values, dtype=float) for name, values in draws.items()}


def test_draws_are_independent_across_ops():
    """Each op draws its own numbers: the crop offset does not follow the scale, nor colour jitter the flip."""
    draws = observed_draws(range(300))
    assert 0.5 < draws["scale"].min() < 0.6 and 1.8 < draws["scale"].max() < 2.1  # the observer reads the scale
    assert 0.4 < draws["flip"].mean() < 0.6 and 0.7 < draws["jitter"].mean() < 0.9  # p = 0.5 and 0.8
    assert all(draws[name].min() < 0.1 and draws[name].max() > 0.9 for name in ("top", "left"))
    # 300 independent pairs: |correlation| has a standard deviation of about 0.06
    for first, second in [("scale", "top"), ("scale", "left"), ("flip", "jitter")]:
        correlation = np.corrcoef(draws[first], draws[second])[0, 1]
        assert abs(correlation) < 0.2, f"{first} and {second} correlate: {correlation:.3f}"


@pytest.mark.parametrize("crop_size", [(0, 512), (512, 1024, 3), (512,), ("512", 1024), (512.0, 1024), 512])
def test_bad_crop_size_is_one_line_naming_it(crop_size):
    with pytest.raises(ValueError, match=r"^crop_size=.* must be two positive integers \(height, width\)[^\n]*$"):
        SegTrainTransform(crop_size=crop_size)

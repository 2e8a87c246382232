"""data.randaug against NOAH's augmentation as timm 0.5.4 defines it, measured on our transform's outputs; every
expected value is written from timm 0.5.4's source (huggingface/pytorch-image-models at v0.5.4), not read from
the installed timm:
  timm/data/transforms_factory.py:69-122  crop 0.08-1, aspect 3/4-4/3, bicubic; flip 0.5; no colour jitter under
                                          RandAugment (:98-99); fill round(255 * mean) (:85-88); erasing (:120-122)
  timm/data/auto_augment.py:583-600       the 15 "increasing" ops, Invert included
  timm/data/auto_augment.py:338-353       each op applied with probability 0.5 (:339, prob=0.5 from :638), its
                                          magnitude drawn per call from N(9, 0.5) and clipped to [0, 10]
  timm/data/auto_augment.py:647-653       2 ops drawn with replacement
  timm/data/auto_augment.py:178-182, 220-231, 241-250   rotate 30 * m / 10 degrees (27 at m=9), posterize to
                                          4 - int(4 m / 10) bits (1 at m=9), solarize above 256 - int(256 m / 10) (26)
CPU, a few seconds (most of it importing timm)."""
import copy
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import data

IMAGENET = data.NORMS["imagenet"]
INCREASING = ["AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
              "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
              "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"]


@pytest.fixture(scope="module")
def stages():
    return data._noah_transform(224, *IMAGENET, 0.25).transforms  # the very transform randaug applies


@pytest.fixture(autouse=True)
def seeded():
    state = random.getstate(), np.random.get_state()
    random.seed(0), np.random.seed(0)
    yield
    random.setstate(state[0]), np.random.set_state(state[1])


def op(stages, name):
    return next(o for o in stages[2].ops if o.name == name)


def applied(fn, image, n):
    """fn(image) n times -> the outputs (uint8 arrays) that differ from the input."""
    before = np.asarray(image)
    return [a for a in (np.asarray(fn(image)) for _ in range(n)) if not np.array_equal(a, before)]


def test_the_pipeline_is_noahs(stages):
    names = [type(t).__name__ for t in stages]
    assert names[:3] == ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip", "RandAugment"]
    assert names[3] in ("ToTensor", "MaybeToTensor") and names[4:] == ["Normalize", "RandomErasing"]  # no jitter
    crop, flip, ra, _, norm, erase = stages
    assert crop.size == (224, 224) and crop.scale == (0.08, 1.0) and crop.ratio == pytest.approx((3 / 4, 4 / 3))
    assert str(crop.interpolation).lower().endswith("bicubic") and flip.p == 0.5
    assert ra.num_layers == 2 and ra.choice_weights is None and [o.name for o in ra.ops] == INCREASING
    for o in ra.ops:
        assert (o.prob, o.magnitude, o.magnitude_std, o.magnitude_max) == (0.5, 9, 0.5, None), o.name
        assert o.kwargs == dict(fillcolor=(124, 116, 104), resample=Image.BICUBIC), o.name
    assert norm.mean.tolist() == pytest.approx(IMAGENET[0]) and norm.std.tolist() == pytest.approx(IMAGENET[1])
    assert (erase.probability, erase.mode, erase.min_count, erase.max_count) == (0.25, "pixel", 1, 1)
    assert (erase.min_area, erase.max_area) == pytest.approx((0.02, 1 / 3))
    assert [type(t).__name__ for t in data._noah_transform(224, *IMAGENET, 0.0).transforms][-1] == "Normalize"


def bar_angle(a):
    """The angle (degrees) of the bright bar in a rotated copy, from the second moments of its pixels."""
    y, x = np.nonzero(a[..., 0] > 200)
    x, y = x - x.mean(), y - y.mean()
    return math.degrees(0.5 * math.atan2(-2 * (x * y).mean(), (x * x).mean() - (y * y).mean()))


def test_rotate_reaches_27_degrees_half_the_time(stages):
    a = np.zeros((65, 65, 3), np.uint8)
    a[31:34, 8:57] = 255  # a horizontal bar through the centre
    n, out = 400, applied(op(stages, "Rotate"), Image.fromarray(a), 400)
    angles = np.array([bar_angle(o) for o in out])
    assert 0.42 < len(out) / n < 0.58  # applied with probability 0.5
    assert 26 < np.median(abs(angles)) < 28 and abs(angles).max() <= 30.3  # 30 * N(9, 0.5) / 10, clipped at 10
    assert 0.8 < abs(angles).std() < 2.2  # magnitude noise: 3 * 0.5 = 1.5 degrees
    assert 0.35 < (angles > 0).mean() < 0.65  # either direction


@pytest.mark.parametrize("name", ["Rotate", "ShearX", "TranslateXRel", "TranslateYRel"])
def test_the_fill_is_the_mean_pixel(stages, name):
    out = applied(op(stages, name), Image.new("RGB", (64, 64), (255, 255, 255)), 20)
    corners = {tuple(o[i, j]) for o in out for i in (0, -1) for j in (0, -1)}
    assert out and (124, 116, 104) in corners and corners <= {(124, 116, 104), (255, 255, 255)}


def ramp():
    return Image.fromarray(np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2))  # 1 x 256, 0..255


def test_posterize_keeps_one_bit(stages):
    out = applied(op(stages, "PosterizeIncreasing"), ramp(), 200)
    levels = [set(np.unique(o).tolist()) for o in out]
    assert 70 < len(out) < 130
    assert np.mean([s == {0, 128} for s in levels]) > 0.9  # 1 bit: 4 - int(4 * m / 10) for 7.5 <= m < 10
    assert all(s <= {0, 128} for s in levels)  # 0 bits (all black) only when m clips at 10
    image = ramp()  # PIL's posterize for 1-8 bits; 0 bits black, as PIL's lookup table gave it (newer Pillow refuses)
    assert all(np.array_equal(data._posterize(image, b), ImageOps.posterize(image, b)) for b in range(1, 9))
    assert not np.asarray(data._posterize(image, 0)).any()


def test_solarize_threshold_26(stages):
    out = applied(op(stages, "SolarizeIncreasing"), ramp(), 200)
    thresholds = [int(np.argmax(o[0, :, 0] != np.arange(256))) for o in out]  # the first value inverted
    assert 70 < len(out) < 130 and 21 <= np.median(thresholds) <= 31  # 256 - int(256 * 9 / 10) = 26
    assert all(np.array_equal(o[0, t:, 0], 255 - np.arange(t, 256)) for o, t in zip(out, thresholds))


def test_two_ops_drawn_with_replacement_each_applied_half_the_time(stages):
    ra, calls = copy.deepcopy(stages[2]), []
    for o in ra.ops:  # count what is applied: the choice, the gate and the magnitude draw stay timm's
        o.aug_fn = (lambda fn, name: lambda img, *a, **k: calls[-1].append(name) or fn(img, *a, **k))(o.aug_fn, o.name)
    image = Image.fromarray(np.random.randint(0, 256, (16, 16, 3), dtype=np.uint8))
    n = 1500
    for _ in range(n):
        calls.append([])
        ra(image)
    per_image = np.bincount([len(c) for c in calls], minlength=3) / n
    assert per_image == pytest.approx([0.25, 0.5, 0.25], abs=0.05)  # Binomial(2, 1/2)
    counts = {name: sum(c.count(name) for c in calls) for name in INCREASING}
    assert all(60 < v < 145 for v in counts.values()), counts  # 2 * 0.5 / 15 per image each: 100
    assert sum(len(c) == 2 and c[0] == c[1] for c in calls) > 5  # the same op twice: 1 in 60 images


def test_randaug_batches_are_seeded_normalised_and_erased():
    images = torch.randint(0, 256, (3, 3, 40, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    state = random.getstate(), np.random.get_state()[1].copy()
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        runs.append(data.randaug(images, 32, *IMAGENET))
    assert runs[0].shape == (3, 3, 32, 32) and runs[0].dtype == torch.float32 and runs[0].device == images.device
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    assert random.getstate() == state[0] and np.array_equal(np.random.get_state()[1], state[1])  # left as found
    x = runs[0].permute(1, 0, 2, 3).reshape(3, -1)
    assert x.min() > -2.2 and x.max() < 2.7  # (0..1 - mean) / std: ImageNet's range
    one = images[:1]
    torch.manual_seed(3)
    plain = data.randaug(one, 32, *IMAGENET)
    torch.manual_seed(3)
    erased = data.randaug(one, 32, *IMAGENET, reprob=1.0)
    rows, cols = (erased != plain).any(1)[0].nonzero().T  # the erasing comes last: only its rectangle differs
    area = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert len(rows) == area and 0.02 * 32 * 32 - 16 <= area <= 32 * 32 / 3 + 16

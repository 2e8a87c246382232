"""
The data of nanoPETL: an embedded synthetic world that runs offline, the real few-shot datasets in the layouts
people already have, deterministic k-shot sampling, and the transforms as named protocol presets.

    tasks = load_task("synthetic", shots=1, seed=0)                   # the five embedded tasks, a list of Task
    [task] = load_task("vtab1k", "data/vtab-1k", vtab_task="cifar")   # train800val200 -> test (NOAH's VTAB-1k lists)
    x = normalize(augment(task.train.images[i], task.train_aug), task.mean, task.std)   # per batch, any device
run: python data.py --sheet assets/synthetic_world.png   (each set's sizes, and a contact sheet of the world)
In this file: k-shot sampling and load_task, the per-batch transforms, the embedded world; then reading at scale.

The world: 32x32 RGB, each image a pure function of (set, split, class, index, world seed) through a counter-based
hash, never of the batch it is drawn in. A class fixes some attributes and draws the others per image; every image
also varies in position, rotation, scale, colour jitter, cluttered background and pixel noise. Attributes: shape
(circle triangle square hexagon star4 star5 ring frame), pattern (solid stripes checker dots rings waves), colours
(a body/pattern pair of 12 hues: the sources use the 6 even hues, the tasks only the 6 odd ones), size (small
medium large), freq (of the pattern: coarse medium fine), aspect (round long). SyntheticSet(s).describe(c) says more.
  set       classes                                                                        stands in for
  backbone  384 = shape 8 x pattern 6 x colours 4 x size {small, large}: each is needed    ImageNet-21k
  pvp       192 = the backbone's classes in its first 2 colour pairs                        ImageNet-1k
  shape     16 = shape 8 x aspect 2 (long is unseen); medium size (unseen), any pattern      FGVC-Aircraft
  texture   10 = pattern 5 x freq {coarse, fine} (unseen); a large circle, square or hexagon Food-101
  colour    12 = ordered pairs of novel hues; a dotted star5, small or large                 Flowers-102
  species   12 = star4/star5 x stripes/checker/dots x small/large; one novel pair            Oxford Pets
  model     12 = size 3 (medium unseen) x 4 novel pairs; a long striped square               Stanford Cars
Each task has a train pool of 32, a val pool of 16 and a test set of 40 per class; the sources draw without end
(.batch). No resize, crop or augmentation on the world; normalisation 0.5/0.5 ("inception").

Real data (the layouts of LAYOUTS) is read with decode (torchvision.io for 8-bit JPEGs, read_image for the rest) and
brought to img_size by a protocol preset (PROTOCOLS: the official code's resize and crop, as transforms.v2), as uint8:
150,528 bytes per 224 px image (196,608 per 256 px training square), so CoOp's Food-101 test set (30,300) takes
4.6 GB, Flowers-102's (6,149) 0.9 GB. The splits that fit a budget (cache_gb, default NANOPETL_MAX_GB: 8) are decoded
once and kept, val and test once per process for a whole sweep; a split beyond it streams (Stream: a
torch.utils.data.Dataset read by DataLoader workers), so ImageNet-1k (1.28M images, 193 GB as uint8) trains in
bounded memory. load_task prints which split does what. The embedded world stays in memory: it renders 32 px images
at thousands per second on one core, faster than any file could be read, and its pools are a few MB.
"""
import argparse
import ctypes
import hashlib
import itertools
import json
import math
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from tqdm import tqdm

# -----------------------------------------------------------------------------
# names, presets and the two containers

SYNTHETIC_TASKS = ("shape", "texture", "colour", "species", "model")
DATASETS = ("synthetic", "flowers102", "pets", "aircraft", "food101", "cars", "noah-fewshot", "vtab1k", "fgvc-json",
            "imagefolder", "imagenet")
VTAB_TASKS = {  # folder -> classes: the 19 tasks of VTAB-1k (Zhai et al. 2019, arXiv 1910.04867), NOAH's folder names
    "caltech101": 102, "cifar": 100, "dtd": 47, "oxford_flowers102": 102, "oxford_iiit_pet": 37, "svhn": 10,
    "sun397": 397, "patch_camelyon": 2, "eurosat": 10, "resisc45": 45, "diabetic_retinopathy": 5, "clevr_count": 8,
    "clevr_dist": 6, "dmlab": 6, "kitti": 4, "dsprites_loc": 16, "dsprites_ori": 16, "smallnorb_azi": 18,
    "smallnorb_ele": 9}
VTAB_GROUPS = {"natural": ("caltech101", "cifar", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397"),
               "specialized": ("patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy"),
               "structured": ("clevr_count", "clevr_dist", "dmlab", "kitti", "dsprites_loc", "dsprites_ori",
                              "smallnorb_azi", "smallnorb_ele")}
NORMS = {"imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), "inception": ((0.5,) * 3, (0.5,) * 3)}
BILINEAR, BICUBIC = "bilinear", "bicubic"  # torchvision's InterpolationMode values (torchvision is imported
# where it is used: its import costs over a second, and the embedded world never needs it)
PROTOCOLS = {  # name: (resize, side at img_size 224, interpolation, train augmentation); then a centre crop of img_size
    "fgvc": ("shorter", 256, BILINEAR, "crop_flip"),  # VPT: Resize(256) -> RandomCrop(224) + flip / CenterCrop
    "vtab": ("square", 224, BICUBIC, "none"),  # NOAH and VPT on VTAB: Resize((224, 224)), no augmentation
    "noah-fewshot": ("square", 256, BICUBIC, "crop_flip")}  # NOAH: Resize((256, 256)) -> CenterCrop(224) for
# eval; for training we crop + flip, or NOAH's timm RandAugment recipe with --aug randaug (randaug).

class DataError(Exception):
    """A data problem the user can fix; its one message says what is wrong, where, and what to do."""

@dataclass
class Split:  # a split kept in memory; a split read from disk as it is used is a Stream (same labels, len, subset)
    images: torch.Tensor  # (N, 3, H, W) uint8, decoded and transformed once
    labels: torch.Tensor  # (N,) int64 in 0..C-1

    def __len__(self):
        return len(self.labels)

    def subset(self, idx):
        return Split(self.images[idx], self.labels[idx])

@dataclass
class Task:
    name: str
    num_classes: int
    train: Split  # the support set: `shots` per class, or the whole training split
    val: Split  # for model selection: never from test, never train's images (but see _vtab's "final" stage)
    test: Split  # each of the three a Stream instead when load_task streams it (past cache_gb)
    img_size: int  # the side the backbone sees; under crop_flip train is kept larger and augment() crops it
    mean: tuple
    std: tuple
    train_aug: str  # augment(batch, train_aug) per training batch: "none" or "crop_flip"
    meta: dict = field(default_factory=dict)  # what to save with results: source, protocol, split sizes, classes

# -----------------------------------------------------------------------------
# k-shot sampling, and load_task: one entry point for every dataset

def _per_class(labels, num_classes, seed, count, tail=False):
    """count(n) images of each class of n, from the head (tail) of an order seeded by (class, seed) alone."""
    out = []
    for c in range(num_classes):
        idx = (labels == c).nonzero()[:, 0]
        order = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed * 100_003 + c))]
        k = max(0, min(count(len(idx)), len(idx)))
        out.append(order[len(idx) - k:] if tail else order[:k])
    return torch.cat(out).sort().values

def few_shot(labels, shots, seed, names=None):
    """Sorted indices of exactly `shots` images of each class 0..C-1 (C = len(names), else the largest label + 1),
    from per-class torch.Generators: a function of (labels, shots, seed) only, never of the global RNG, so every
    method sees the same support set. The draws nest: the 1-shot set lies inside the 2-shot set of the same seed."""
    labels = torch.as_tensor(labels)
    counts = torch.bincount(labels, minlength=len(names or ()))
    if (counts < shots).any():
        c = int((counts < shots).nonzero()[0])
        raise DataError(f"class {c}{f' ({names[c]})' if names else ''} has {counts[c]} training images, fewer than "
                        f"shots={shots}: use fewer shots or give that class more images")
    return _per_class(labels, len(counts), seed, lambda n: shots)

def _support_set(name, found, names, shots, seed, test_per_class):
    """The k-shot draw on a dataset's index (_index): (train, val, test) as [(path, label)]. train: few_shot's
    support set (the whole split for shots None; noah-fewshot's list as it is); val: the official one, else held out
    from train; test: the whole split, or test_per_class images of each class (a seeded pick)."""
    train, val, test = found["train"], found.get("val"), found["test"]
    labels = torch.tensor([label for _, label in train], dtype=torch.long)
    keep = torch.arange(len(train)) if shots is None or name == "noah-fewshot" else few_shot(labels, shots, seed, names)
    if val is None:  # held out: the tail of each class's seeded order, whose head few_shot takes
        held = _per_class(labels, len(names), seed, lambda n: min(20, max(1, n // 10), n - (shots or 1)), tail=True)
        val, keep = [train[i] for i in held], keep[~torch.isin(keep, held)]
        if not val:  # no accuracy to measure on an empty split
            raise DataError(f"{name}: val would be empty: shots={shots or 'all'} takes every training image of each "
                            f"class into the support set; use fewer shots, or add an official val split")
    train = [train[i] for i in keep.tolist()]
    if test_per_class:
        t = torch.tensor([label for _, label in test], dtype=torch.long)
        test = [test[i] for i in _per_class(t, len(names), seed, lambda n: test_per_class).tolist()]
    return train, val, test

def load_task(name="synthetic", root=None, *, shots=None, seed=0, img_size=None, norm=None, protocol=None,
              vtab_task=None, vtab_stage="final", world_seed=0, download=False, test_per_class=None, cache_gb=None,
              workers=None):
    """A list of Task: the five embedded ones for "synthetic" ("synthetic:<task>" for one), else one read from root.
    shots: None or "all" for the whole training split; K for few_shot(labels, K, seed), or for noah-fewshot the list
    of (K, seed). img_size: None = 32 for the world, 224 for real data. norm: "imagenet" or "inception" (None =
    inception for the world, imagenet for real data as in VPT). protocol: None = vtab for vtab1k, noah-fewshot for
    its lists, fgvc otherwise. With no official val split, val is the seeded tail of each class of train (~10%, 1
    to 20 images; few_shot takes the head). vtab1k: vtab_task ("vtab1k:<task>" also works) and vtab_stage (_vtab).
    Data on disk: the splits whose uint8 images fit cache_gb (default NANOPETL_MAX_GB, max_gb), smallest first, are
    decoded once and kept (Split; val and test memoised for a sweep); the others are a Stream read by `workers`
    loader processes (default_workers()). The choice (_keep_or_stream) is printed, once per process."""
    name, sub, norm, protocol, shots = _options(name, norm, protocol, shots)
    if name == "synthetic":
        names = [sub] if sub else SYNTHETIC_TASKS
        return [_synthetic_task(t, shots, seed, img_size or 32, norm, world_seed) for t in names]
    if root is None:
        raise DataError(f"{name} reads from disk: give its root (--data-root), laid out as {LAYOUTS[name]}")
    root, size = Path(root), img_size or 224
    found, names = _index(name, root, shots, seed, vtab_task or sub, vtab_stage, download)  # read the index
    train, val, test = _support_set(name, found, names, shots, seed, test_per_class)  # draw the k-shot support set
    splits = _keep_or_stream(name, train, val, test, protocol, size, cache_gb, workers)  # keep each, or stream it
    meta = dict(dataset=name, root=str(root), protocol=protocol, norm=norm, shots=shots, seed=seed,
                val="official" if "val" in found else "held out from train", test_per_class=test_per_class,
                sizes=dict(zip(("train", "val", "test"), map(len, splits))), classes=names, **found.get("meta", {}),
                fingerprint=fingerprint(root, [train, val, test], names))
    return [Task(f"vtab1k:{vtab_task or sub}" if name == "vtab1k" else name, len(names), *splits, size,
                 *NORMS[norm], PROTOCOLS[protocol][3], meta)]

def _options(name, norm, protocol, shots):
    """load_task's options checked, and their defaults filled in: (name, sub, norm, protocol, shots)."""
    name, _, sub = name.partition(":")
    norm = norm or ("inception" if name == "synthetic" else "imagenet")
    protocol = protocol or {"vtab1k": "vtab", "noah-fewshot": "noah-fewshot"}.get(name, "fgvc")
    for what, value, valid in (("dataset", name, DATASETS), ("normalisation", norm, NORMS),
                               ("protocol", protocol, PROTOCOLS), ("synthetic task", sub or "shape", SYNTHETIC_TASKS)):
        if value not in valid and (what != "synthetic task" or name == "synthetic"):
            raise DataError(f"unknown {what} {value!r}: choose one of {', '.join(valid)}")
    if shots not in (None, "all") and not (str(shots).isascii() and str(shots).isdigit() and int(shots) > 0):
        raise DataError(f"shots must be a positive integer or 'all', got {shots!r}")
    shots = None if shots in (None, "all") else int(shots)
    return name, sub, norm, protocol, shots

def fingerprint(root, splits, names=()):
    """A short hash of what a task read. Files: the class names and each split's (path relative to root, label, size,
    mtime in ns) by os.stat, bytes unread: a file rewritten in place changes it, a folder moved whole (mtimes kept)
    does not, a copy that drops mtimes (cp without -p) does (its runs run again). Not seen: new content of the same
    size and mtime (which `touch -d` can fake). Rendered splits: their pixels and labels (a new renderer: new task)."""
    h = hashlib.sha1(json.dumps(list(names)).encode())
    for s in splits:
        if isinstance(s, Split):
            h.update(s.images.contiguous().numpy().tobytes()), h.update(s.labels.numpy().tobytes())
        else:  # json.dumps of the whole list, item by item: no copy of a 1.28M-image index as one string
            h.update(b"[")
            for i, (p, y) in enumerate(s):
                try:
                    st = os.stat(p)
                except OSError as e:  # gone (or unreadable) since the index was read
                    raise DataError(f"image {p} went away after the dataset was indexed ({e.strerror or e}): put it "
                                    "back, or drop it from the split, and run again") from None
                item = (os.path.relpath(p, root), y, st.st_size, st.st_mtime_ns)
                h.update((", " * (i > 0) + json.dumps(item)).encode())
            h.update(b"]")
    return h.hexdigest()[:16]

# -----------------------------------------------------------------------------
# the per-batch transforms

def normalize(images, mean, std):
    """uint8 (0..255) or float (0..1) images -> float (x - mean) / std per channel, on the images' device."""
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    mean, std = (torch.tensor(v, device=x.device).view(-1, 1, 1) for v in (mean, std))
    return (x - mean) / std

NOAH_AA = "rand-m9-mstd0.5-inc1"  # NOAH's --aa (ZhangYuanhan-AI/NOAH supernet_train_prompt.py:119)

def randaug(images, size, mean, std, reprob=0.0):
    """NOAH's training transform, by the library that defines it: timm's create_transform(size, is_training=True,
    auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic", re_prob=reprob, re_mode="pixel", re_count=1) as
    NOAH calls it (ZhangYuanhan-AI/NOAH lib/datasets.py:214-223, supernet_train_prompt.py:117-137; it pins timm 0.5.4,
    requirements.txt:2), per image of a uint8 batch (B, C, H, W) on any device -> normalised float (B, C, size, size)
    on that device. In order (timm 0.5.4 timm/data/transforms_factory.py:69-122, auto_augment.py:315-353, 583-653):
      RandomResizedCrop(size, area 0.08-1, aspect 3/4-4/3, bicubic); horizontal flip with probability 1/2;
      RandAugment: 2 ops drawn with replacement from the 15 "increasing" ops (Invert included), each applied with
        probability 1/2 at a magnitude drawn per applied op from N(9, 0.5), clipped to [0, 10] (at 9: rotate 27
        degrees, shear 0.27, translate 40.5% of the side, posterize to 1 bit, solarize above 26, enhance x1.81 or
        x0.19), affine ops bicubic with the mean pixel as fill (round(255 * mean): 124, 116, 104 under ImageNet's);
        no colour jitter (timm drops it under RandAugment);
      ToTensor, Normalize(mean, std); RandomErasing with probability reprob: 2-33% of the area, aspect 0.3-3.3,
        per-pixel normal noise.
    The installed timm builds the same transform for this string (huggingface/pytorch-image-models v1.0.31
    timm/data/transforms_factory.py:182-199, timm/data/auto_augment.py:380-394, 641-658, 742-752, 790-841).
    timm is imported here only, when a run asks for this transform. It draws from python's `random` and numpy's
    global RNG: both are seeded from the global torch RNG on each call and restored after it, so the result is a
    function of the torch seed the caller sets (fewshot seeds it per epoch), and other users of those RNGs see no
    change. The crop is taken from the image as stored (a square under the crop_flip protocols)."""
    import random
    transform, pixels = _noah_transform(size, tuple(mean), tuple(std), float(reprob)), images.cpu()
    saved, seed = (random.getstate(), np.random.get_state()), int(torch.randint(2**31 - 1, ()))
    random.seed(seed), np.random.seed(seed)
    try:
        out = [transform(Image.fromarray(im.permute(1, 2, 0).numpy())) for im in pixels]  # each (C, size, size)
    finally:
        random.setstate(saved[0]), np.random.set_state(saved[1])
    return torch.stack(out).to(images.device)  # (B, C, size, size)

@lru_cache(maxsize=8)
def _noah_transform(size, mean, std, reprob):
    """timm's PIL -> tensor train transform for randaug (a Compose: crop, flip, RandAugment, ToTensor, Normalize,
    RandomErasing when reprob > 0)."""
    try:
        from timm.data import create_transform
    except ImportError:
        raise DataError("--aug randaug is timm's transform, and timm is not installed: pip install -r requirements.txt"
                        ", or choose another --aug") from None
    transform = create_transform(size, is_training=True, color_jitter=0.4, auto_augment=NOAH_AA,
                                 interpolation="bicubic", mean=mean, std=std, re_prob=reprob, re_mode="pixel",
                                 re_count=1)
    for op in next(t for t in transform.transforms if hasattr(t, "ops")).ops:
        if op.name == "PosterizeIncreasing":  # m clipped at 10 (2.3% of its draws) keeps 0 bits: a black image
            op.aug_fn = _posterize  # in the Pillow of timm 0.5.4's day; Pillow 13's posterize refuses 0 bits
    return transform

def _posterize(img, bits, **_):  # timm 0.5.4 auto_augment.py:151-154 on PIL's lookup table, for 0 to 8 bits
    return img if bits >= 8 else img.point([i & ~(2 ** (8 - bits) - 1) for i in range(256)] * len(img.getbands()))

def augment(images, how="none", generator=None, size=None):
    """The random part of a train transform, on a batch (B, C, H, W) on any device: "crop_flip" takes a random
    size x size crop (default 224/256 of the side) and flips it with probability 1/2; "none" centre-crops to `size`
    if given. Under crop_flip, load_task keeps the training images as the centre square of Resize(256) (for 224),
    so this is VPT's RandomCrop(224) except that it never reaches past that square along an image's long side."""
    if how not in ("none", "crop_flip"):
        raise ValueError(f"augment: unknown how={how!r}; use 'none' or 'crop_flip'")
    B, C, H, W = images.shape
    size = size or (round(H * 224 / 256) if how == "crop_flip" else H)
    if how == "none" and size == H == W:
        return images
    rand = lambda hi: torch.randint(0, hi, (B,), generator=generator, device=getattr(generator, "device", None)).cpu()
    top, left = (rand(n - size + 1) if how == "crop_flip" else torch.full((B,), round((n - size) / 2)) for n in (H, W))
    images = torch.stack([im[:, t:t + size, l:l + size] for im, t, l in zip(images, top.tolist(), left.tolist())])
    flip = rand(2).bool().to(images.device)[:, None, None, None] if how == "crop_flip" else None
    return images if flip is None else torch.where(flip, images.flip(-1), images)  # (B, C, size, size)

# -----------------------------------------------------------------------------
# the embedded world: attributes, sets, and a vectorised soft-shape renderer

SHAPES = ("circle", "triangle", "square", "hexagon", "star4", "star5", "ring", "frame")
GEOMETRY = torch.tensor([  # per shape: polygon sides (64 ~ round), star points, star depth, hollow
    [64, 0, 0, 0], [3, 0, 0, 0], [4, 0, 0, 0], [6, 0, 0, 0], [64, 4, .45, 0], [64, 5, .45, 0], [64, 0, 0, 1],
    [4, 0, 0, 1]])
PATTERNS = ("solid", "stripes", "checker", "dots", "rings", "waves")
WAVES = (  # per pattern: > 0 where the second colour shows; x, y, r in the object's frame (px), w = 2 pi / period
    lambda x, y, r, w, p, q: torch.full_like(x, -1.0),
    lambda x, y, r, w, p, q: (w * x + p).sin(),
    lambda x, y, r, w, p, q: (w * x + p).sin() * (w * y + q).sin(),
    lambda x, y, r, w, p, q: (w * x + p).cos() + (w * y + q).cos() - 1,
    lambda x, y, r, w, p, q: (w * r + p).sin(),
    lambda x, y, r, w, p, q: (w * x + 1.5 * (w * y + q).sin() + p).sin())
FREQS, PERIODS = ("coarse", "medium", "fine"), torch.tensor([7.0, 4.6, 3.2])  # pattern period, px
SIZES, RADII = ("small", "medium", "large"), torch.tensor([6.5, 8.5, 10.5])  # object radius, px
ASPECTS, STRETCH = ("round", "long"), torch.tensor([1.0, 1.6])
HUES = ("red", "orange", "yellow", "lime", "green", "spring", "cyan", "azure", "blue", "violet", "magenta", "rose")
SOURCE_COLOURS = ((0, 4), (2, 6), (4, 8), (6, 10))  # even hues only: the tasks' odd hues are the shift
WORLD = {  # set: (attributes crossed into classes, attributes drawn per image; unnamed: medium freq, round)
    "backbone": (dict(shape=range(8), pattern=range(6), colours=SOURCE_COLOURS, size=(0, 2)), {}),
    "pvp": (dict(shape=range(8), pattern=range(6), colours=SOURCE_COLOURS[:2], size=(0, 2)), {}),
    "shape": (dict(shape=range(8), aspect=(0, 1)), dict(pattern=range(6), colours=((1, 5),), size=(1,))),
    "texture": (dict(pattern=range(1, 6), freq=(0, 2)), dict(shape=(0, 2, 3), colours=((3, 7),), size=(2,))),
    "colour": (dict(colours=[(h, (h + d) % 12) for d in (4, 6) for h in range(1, 12, 2)]),
               dict(shape=(5,), pattern=(3,), size=(0, 2))),
    "species": (dict(shape=(4, 5), pattern=(1, 2, 3), size=(0, 2)), dict(colours=((7, 11),))),
    "model": (dict(size=(0, 1, 2), colours=((1, 7), (3, 9), (5, 11), (9, 5))),
              dict(shape=(2,), aspect=(1,), pattern=(1,))),
}
POOLS = dict(train=32, val=16, test=40)  # images per class in each split of a task
_XY = torch.arange(32) + 0.5 - 16  # pixel centres, origin at the image centre

def _hash(x):  # a 32-bit integer mix on int64 tensors; every product stays below 2**63
    for _ in range(2):
        x = ((x >> 16) ^ x) * 0x45D9F3B & 0xFFFFFFFF
    return (x >> 16) ^ x

def _key(*parts):  # chain ints or int tensors, e.g. (world seed, set, split, class, index), into one hash each
    h = torch.zeros((), dtype=torch.long)
    for p in parts:
        h = _hash((h + torch.as_tensor(p, dtype=torch.long) * 0x7FEB352D) & 0xFFFFFFFF)
    return h

def _hsv(h, s, v):  # hue (turns), saturation, value, each (...) -> RGB (..., 3)
    k = (torch.tensor([5.0, 3.0, 1.0]) + 6 * h[..., None]) % 6
    return v[..., None] * (1 - s[..., None] * torch.minimum(k, 4 - k).clamp(0, 1))

def _draw(canvas, u, shape, pattern, period, radius, stretch, hue_a, hue_b):
    """Paint one soft-edged object per image onto canvas (N, 3, 32, 32) in place. u: (N, 13) uniforms for position,
    rotation, scale, pattern phase and colour jitter; the rest are (N,) tensors (hues in 0..12)."""
    R = radius * (0.92 + 0.16 * u[:, 0])
    cx, cy = ((2 * u[:, i] - 1) * (15 - R).clamp(min=1.5) for i in (1, 2))  # the object stays mostly inside
    cos, sin = (f(2 * math.pi * u[:, 3])[:, None, None] for f in (torch.cos, torch.sin))
    dx, dy = _XY - cx[:, None, None], _XY[:, None] - cy[:, None, None]  # (N, 1, 32), (N, 32, 1)
    x, y = (cos * dx + sin * dy) / stretch[:, None, None], cos * dy - sin * dx  # (N, 32, 32) the object's frame
    r, phi = torch.hypot(x, y), torch.atan2(y, x)
    n, k, depth, hollow = (g[:, None, None] for g in GEOMETRY[shape].T)
    edge = torch.cos(math.pi / n) / torch.cos(torch.remainder(phi, 2 * math.pi / n) - math.pi / n)  # n-gon, radius 1
    edge = edge * (1 - depth * torch.sin(k * phi / 2).abs())  # k star points
    d = r - R[:, None, None] * edge  # < 0 inside, roughly in px
    t = 0.25 * R[:, None, None]
    d = torch.where(hollow > 0, (d + t).abs() - t, d)  # ring, frame: a band 2t wide inside the edge
    mask = torch.sigmoid(-2 * d)[:, None]  # (N, 1, 32, 32) anti-aliased coverage
    w = (2 * math.pi / (period * (0.9 + 0.2 * u[:, 4])))[:, None, None]
    p, q = (2 * math.pi * u[:, i, None, None] for i in (5, 6))
    v = torch.empty_like(x)
    for j in pattern.unique().tolist():  # each pattern on its own images only
        i = (pattern == j).nonzero()[:, 0]
        v[i] = WAVES[j](x[i], y[i], r[i], w[i], p[i], q[i])
    share = torch.sigmoid(5 * v)[:, None]  # (N, 1, 32, 32) how much of the second colour
    jitter = lambda h, j: _hsv(h / 12 + 0.04 * (u[:, j] - 0.5), 0.75 + 0.25 * u[:, j + 1], 0.75 + 0.25 * u[:, j + 2])
    a, b = jitter(hue_a, 7)[:, :, None, None], jitter(hue_b, 10)[:, :, None, None]  # (N, 3, 1, 1) jittered colours
    canvas += mask * (a + (b - a) * share - canvas)

@lru_cache(maxsize=4)
def _backgrounds(world_seed, n=1024):
    """n tiles (n, 3, 32, 32) of dim blotches and 2 faint clutter objects; n grey noise tiles (n, 1, 32, 32)."""
    g = torch.Generator().manual_seed(world_seed)
    rand, pick = (lambda *s: torch.rand(*s, generator=g)), (lambda hi: torch.randint(0, hi, (n,), generator=g))
    tint = _hsv(rand(n), 0.1 + 0.3 * rand(n), 0.1 + 0.35 * rand(n))[:, :, None, None]
    tiles = tint * (0.7 + 0.6 * F.interpolate(rand(n, 3, 4, 4), size=32, mode="bilinear"))
    clutter = tiles.clone()
    for _ in range(2):
        _draw(clutter, rand(n, 13), pick(8), pick(6), PERIODS[1].expand(n), 1.5 + 1.5 * rand(n), torch.ones(n),
              12 * rand(n), 12 * rand(n))
    return (tiles + clutter) / 2, 0.12 * (rand(n, 1, 32, 32) - 0.5)

class SyntheticSet:
    """One set of WORLD: its classes, and images as a pure function of (split, class, index, world seed).
    synthetic_source("backbone") stands in for ImageNet-21k, ("pvp") for ImageNet-1k."""

    def __init__(self, name, world_seed=0):
        if name not in WORLD:
            raise DataError(f"unknown synthetic set {name!r}: choose one of {', '.join(WORLD)}")
        crossed, drawn = WORLD[name]
        self.name, self.world_seed = name, world_seed
        drawn = {a: tuple(v) for a, v in {"freq": (1,), "aspect": (0,), **drawn}.items()}
        self.classes = [{**drawn, **{a: (v,) for a, v in zip(crossed, combo)}}
                        for combo in itertools.product(*crossed.values())]
        self.num_classes = len(self.classes)
        self.table = {}  # attribute -> (values (C, most) padded with the first, counts (C,))
        for a in self.classes[0]:
            vals = [[v[0] * 12 + v[1] if a == "colours" else v for v in c[a]] for c in self.classes]  # pair -> one int
            most = max(map(len, vals))
            self.table[a] = torch.tensor([v + v[:1] * (most - len(v)) for v in vals]), torch.tensor([*map(len, vals)])

    def render(self, labels, index, split="train"):
        """uint8 images (N, 3, 32, 32) of classes `labels`, image numbers `index`, in chunks of 2,048."""
        labels, index = torch.as_tensor(labels, dtype=torch.long), torch.as_tensor(index, dtype=torch.long)
        key = _key(self.world_seed, list(WORLD).index(self.name), ("train", "val", "test").index(split), labels, index)
        tiles, noise = _backgrounds(self.world_seed)
        out = []
        for c in range(0, len(labels), 2048):
            y, u = labels[c:c + 2048], (_key(key[c:c + 2048, None], torch.arange(21)) >> 8) / 2**24  # (n, 21) in [0, 1)
            at = {a: values[y, (u[:, 13 + i] * count[y]).long()]  # each attribute, drawn among its class's values
                  for i, (a, (values, count)) in enumerate(self.table.items())}
            canvas = tiles[(u[:, 19] * len(tiles)).long()]  # (n, 3, 32, 32), a copy
            _draw(canvas, u, at["shape"], at["pattern"], PERIODS[at["freq"]], RADII[at["size"]], STRETCH[at["aspect"]],
                  at["colours"] // 12, at["colours"] % 12)
            out.append((canvas + noise[(u[:, 20] * len(noise)).long()]).mul_(255).add_(0.5).clamp_(0, 255).byte())
        return torch.cat(out) if out else torch.empty(0, 3, 32, 32, dtype=torch.uint8)

    def split(self, split="train", per_class=32):
        """Every class x images 0..per_class-1 of one split, as a Split (class-major order)."""
        labels = torch.arange(self.num_classes).repeat_interleave(per_class)
        return Split(self.render(labels, torch.arange(per_class).repeat(self.num_classes), split), labels)

    def batch(self, step, batch_size):
        """Batch `step` of an endless stream: image i = step * batch_size + j has a hashed class and index i."""
        index = torch.arange(step * batch_size, (step + 1) * batch_size)
        labels = _key(self.world_seed, 7, index) % self.num_classes
        return Split(self.render(labels, index), labels)

    def describe(self, c):
        """Class c in words; "|" separates the values drawn per image."""
        words = dict(shape=SHAPES, pattern=PATTERNS, freq=FREQS, size=SIZES, aspect=ASPECTS)
        word = lambda a, v: f"{HUES[v[0]]}/{HUES[v[1]]}" if a == "colours" else words[a][v]
        return " ".join(f"{a}={'|'.join(word(a, v) for v in vs)}" for a, vs in sorted(self.classes[c].items()))

synthetic_source = SyntheticSet  # the contract's name for the pre-training sets: synthetic_source("backbone")

@lru_cache(maxsize=16)
def _world_pools(name, world_seed):  # a task's three pools, rendered once per process
    world = SyntheticSet(name, world_seed)
    return world, {split: world.split(split, n) for split, n in POOLS.items()}

def _synthetic_task(name, shots, seed, img_size, norm, world_seed):
    world, pools = _world_pools(name, world_seed)
    train = pools["train"] if shots is None else pools["train"].subset(few_shot(pools["train"].labels, shots, seed))
    splits = [train, pools["val"], pools["test"]]
    if img_size != 32:  # e.g. for a 224 px backbone: bilinear, as a resize of the real data would be
        splits = [Split(F.interpolate(s.images.float(), size=img_size, mode="bilinear", antialias=True)
                        .round().clamp(0, 255).byte(), s.labels) for s in splits]
    meta = dict(dataset="synthetic", task=name, world_seed=world_seed, shots=shots, seed=seed, norm=norm,
                sizes=dict(zip(("train", "val", "test"), map(len, splits))), fingerprint=fingerprint(None, splits),
                classes=[world.describe(c) for c in range(world.num_classes)])
    return Task(f"synthetic:{name}", world.num_classes, *splits, img_size, *NORMS[norm], "none", meta)

def contact_sheet(path, classes=6, per_class=2, world_seed=0):
    """A PNG, a row per set of WORLD: `per_class` images of `classes` of its classes (a seeded pick), twice the size."""
    from torchvision.utils import make_grid, save_image
    rows = []
    for name in WORLD:
        world = SyntheticSet(name, world_seed)
        cs = torch.randperm(world.num_classes, generator=torch.Generator().manual_seed(0))[:classes].sort().values
        rows.append(world.render(cs.repeat_interleave(per_class), torch.arange(per_class).repeat(classes)))
    big = torch.cat(rows).repeat_interleave(2, -1).repeat_interleave(2, -2)  # (7 * classes * per_class, 3, 64, 64)
    grid = make_grid(big, nrow=classes * per_class, pad_value=255)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_image(grid / 255, path)

# -----------------------------------------------------------------------------
# reading at scale: the real layouts, decoding, streaming, and the memory budget

LAYOUTS = {  # what load_task expects under root, for the message when something is missing
    "flowers102": "flowers-102/{jpg/image_00001.jpg, imagelabels.mat, setid.mat}",
    "pets": "oxford-iiit-pet/{images/<name>.jpg, annotations/trainval.txt, annotations/test.txt}",
    "aircraft": "fgvc-aircraft-2013b/data/{images/<id>.jpg, images_variant_{train,val,test}.txt, variants.txt}",
    "food101": "food-101/{images/<class>/<id>.jpg, meta/train.json, meta/test.json}",
    "cars": "stanford_cars/{cars_train/, cars_test/, devkit/cars_train_annos.mat, devkit/cars_meta.mat, "
            "cars_test_annos_withlabels.mat}",
    "noah-fewshot": "annotations/{train_meta.list.num_shot_<K>.seed_<S>, val_meta.list, test_meta.list} and "
                    "images/<relpath> (<root>/<relpath> when the root path contains 'stanford_cars')",
    "vtab1k": "<task>/{train800,val200,train800val200,test}.txt and <task>/images/...",
    "fgvc-json": "{train,val,test}.json (image path -> class id); images in <root>, <root>/images or <root>/Images",
    "imagefolder": "train/<class>/<image>, test/<class>/<image>, optionally val/<class>/<image>",
    "imagenet": "train/<class>/<image>, val/<class>/<image> (val is the test set)"}
TORCHVISION = {"flowers102": "Flowers102", "pets": "OxfordIIITPet", "aircraft": "FGVCAircraft", "food101": "Food101"}
IMAGE_TYPES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")

def _text(file):
    """An annotation file's text: UTF-8, a byte-order mark dropped; other bytes are one line naming file and line."""
    raw = file.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{file}:{line}: byte 0x{raw[e.start]:02x} is not UTF-8 text: save the file as UTF-8 (e.g. "
                        f"iconv -f latin1 -t utf-8)") from None

def _rows(file):  # (file:line, text) of each non-empty line
    return [(f"{file}:{n}", line.strip()) for n, line in enumerate(_text(file).splitlines(), 1) if line.strip()]

def _mapping(file, valid, shape):
    """A JSON file holding an object whose every value passes valid(); else one line naming the file (and its line
    or entry) and `shape`, what belongs there."""
    try:
        m = json.loads(_text(file))
    except json.JSONDecodeError as e:
        raise DataError(f"{file}:{e.lineno}: not valid JSON ({e.msg}): re-create it") from None
    if not isinstance(m, dict):
        raise DataError(f"{file}: a JSON {type(m).__name__} where {shape} belongs: re-create it")
    if bad := next((k for k, v in m.items() if not valid(v)), None):
        raise DataError(f"{file}: entry {bad!r} holds {json.dumps(m[bad])[:60]}, but {shape} belongs there: fix it")
    return m

def _list(file, base, num_classes=None):
    """'<relpath> <label>' lines (split at the last space) -> [(base / relpath, label)], checked line by line."""
    items = []
    for where, line in _rows(file):
        rel, _, label = line.rpartition(" ")
        classes = f" in 0..{num_classes - 1}" if num_classes else ""
        problem = (f"expected '<relative path> <label>', the label a class number{classes}, not {label!r}"
                   if not rel or not (label.isascii() and label.isdigit()) else
                   f"label {label} is out of range 0..{num_classes - 1}" if num_classes and int(label) >= num_classes
                   else f"image {base / rel} {'is not a regular file' if (base / rel).exists() else 'does not exist'}"
                   if not (base / rel).is_file() else None)
        if problem:
            raise DataError(f"{where}: {problem} in {line!r}: fix the line, or place the file it names")
        items.append((base / rel, int(label)))
    return items

def _torchvision_layout(name, root):
    """The five few-shot datasets, read from the files torchvision's classes read (torchvision/datasets/{flowers102,
    oxford_iiit_pet,fgvc_aircraft,food101,stanford_cars}.py), not through the classes: they keep their paths and
    labels in private attributes (_image_files, _images, _labels, _samples), and the k-shot draw, the held-out val
    and the run's fingerprint need both before any image is decoded. torchvision still downloads them (_read)."""
    from scipy.io import loadmat
    mat = lambda path, key: np.atleast_1d(loadmat(str(path), squeeze_me=True)[key])  # str: a Path hides "not found"
    if name == "flowers102":
        base = root / "flowers-102"
        labels, ids = mat(base / "imagelabels.mat", "labels") - 1, loadmat(str(base / "setid.mat"))  # -> 0..101
        return {s: [(base / "jpg" / f"image_{i:05d}.jpg", int(labels[i - 1])) for i in ids[key].ravel()]
                for s, key in (("train", "trnid"), ("val", "valid"), ("test", "tstid"))}
    if name == "pets":  # "<image> <class 1..37> <species> <breed>"
        base = root / "oxford-iiit-pet"
        return {s: [(base / "images" / f"{r[0]}.jpg", int(r[1]) - 1) for r in
                    (line.split() for _, line in _rows(base / "annotations" / f"{f}.txt") if not line.startswith("#"))]
                for s, f in (("train", "trainval"), ("test", "test"))}
    if name == "aircraft":  # "<image> <variant>", labels in the order of variants.txt
        base = root / "fgvc-aircraft-2013b" / "data"
        names = [line for _, line in _rows(base / "variants.txt")]
        out, label = dict(names=names), {n: c for c, n in enumerate(names)}
        for s in ("train", "val", "test"):
            rows = [(where, *line.split(" ", 1)) for where, line in _rows(base / f"images_variant_{s}.txt")]
            if bad := next((where for where, _, variant in rows if variant not in label), None):
                raise DataError(f"{bad}: a variant that is not in {base / 'variants.txt'}: fix the line")
            out[s] = [(base / "images" / f"{image}.jpg", label[variant]) for _, image, variant in rows]
        return out
    if name == "food101":  # meta/<split>.json: {class: ["class/id", ...]}, labels by sorted class name
        base = root / "food-101"
        meta = {s: _mapping(base / "meta" / f"{s}.json", lambda v: isinstance(v, list) and all(isinstance(x, str)
                for x in v), "an object of class name -> a list of '<class>/<id>'") for s in ("train", "test")}
        names = sorted(meta["train"])
        return dict(names=names, **{s: [(base / "images" / f"{rel}.jpg", c) for c, n in enumerate(names)
                                        for rel in m.get(n, [])] for s, m in meta.items()})
    base = root / "stanford_cars"  # cars: .mat annotations with fname and class 1..196
    read = lambda path, dir: [(base / dir / str(a["fname"]), int(a["class"]) - 1) for a in mat(path, "annotations")]
    return dict(names=[str(n) for n in mat(base / "devkit" / "cars_meta.mat", "class_names")],
                train=read(base / "devkit" / "cars_train_annos.mat", "cars_train"),
                test=read(base / "cars_test_annos_withlabels.mat", "cars_test"))

def _noah(root, shots, seed):
    """NOAH/CoOp few-shot lists (ZhangYuanhan-AI/NOAH, data/few-shot/<dataset>/annotations). The Oxford-Pets 1-shot
    lists name each image twice: we keep one copy, which changes only the epoch length, since every image of such a
    list is doubled alike."""
    if shots is None:
        raise DataError("noah-fewshot reads the list of (shots, seed): give shots (1, 2, 4, 8 or 16) and seed (0-2)")
    ann, base = root / "annotations", root if "stanford_cars" in str(root) else root / "images"  # NOAH's rule
    test = _list(ann / "test_meta.list", base)
    if not test:
        raise DataError(f"{ann / 'test_meta.list'} has no lines: its labels give the class count; re-create it")
    C = 1 + max(label for _, label in test)
    train = _list(ann / f"train_meta.list.num_shot_{shots}.seed_{seed}", base, C)
    unique = list(dict.fromkeys(train))
    return dict(train=unique, val=_list(ann / "val_meta.list", base, C), test=test,
                meta=dict(duplicates_dropped=len(train) - len(unique)))

def _vtab(root, task, shots, stage):
    """VTAB-1k txt lists. Stage "final" (with all shots) trains on train800val200, so val200 lies inside train there:
    choose hyper-parameters in stage "search" (train800, then val200), then report the final stage's test."""
    if task not in VTAB_TASKS or stage not in ("final", "search"):
        raise DataError(f"vtab1k needs vtab_task (fewshot.py --vtab-task) in {', '.join(VTAB_TASKS)} and vtab_stage "
                        f"'final' or 'search'; got {task!r}, {stage!r}")
    base, C = root / task, VTAB_TASKS[task]
    train = "train800val200" if shots is None and stage == "final" else "train800"
    return dict(train=_list(base / f"{train}.txt", base, C), val=_list(base / "val200.txt", base, C),
                test=_list(base / "test.txt", base, C), meta=dict(vtab_task=task, vtab_stage=stage, train_list=train))

def _fgvc_json(root):
    """VPT's json splits; class ids become 0..C-1 by sorted value, from train.json for every split (KMnP/vpt maps
    each split by its own ids, so a class missing from val would shift the others)."""
    maps = {s: _mapping(root / f"{s}.json", lambda v: isinstance(v, (int, str)) and not isinstance(v, bool),
                        "an object of image path -> class id") for s in ("train", "val", "test")}
    ids = {v: c for c, v in enumerate(sorted(set(maps["train"].values())))}
    for s, m in maps.items():
        if bad := next((p for p, v in m.items() if v not in ids), None):
            raise DataError(f"{root / s}.json: {bad!r} has class id {m[bad]}, which train.json never uses")
    first = next(iter(maps["train"]), "")
    images = next((d for d in (root, root / "images", root / "Images") if (d / first).is_file()), root)
    return dict(names=[*map(str, ids)], **{s: [(images / p, ids[v]) for p, v in m.items()] for s, m in maps.items()})

def _images_under(folder):
    """Image files (IMAGE_TYPES) at any depth under folder, sorted: torchvision's ImageFolder walks it too. Hidden
    files and folders (".name") are skipped; symlinked folders are followed, each once (a loop ends)."""
    seen, out = set(), []
    for top, dirs, files in os.walk(folder, onerror=_raise, followlinks=True):
        if (real := os.path.realpath(top)) in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        out += [Path(top, f) for f in files if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_TYPES]
    return sorted(out)

def _raise(error):
    raise error

def _imagefolder(root, name):
    """train/<class>/..., test/<class>/..., maybe val/<class>/...: torchvision's ImageFolder rules (the classes are the
    sorted folder names of train/; images at any depth below them), but hidden folders and files are skipped. With no
    test/, name "imagenet" (ImageNet's train/val layout) tests on val/; "imagefolder" refuses: its val/ is for val."""
    classes = lambda d: {e.name for e in d.iterdir() if e.is_dir() and not e.name.startswith(".")}
    if not (root / "train").is_dir():
        raise FileNotFoundError(2, "not found", str(root / "train"))
    if not (names := sorted(classes(root / "train"))):
        raise DataError(f"{name}: {root / 'train'} holds no class folders; expected {LAYOUTS[name]}")
    out = dict(names=names)
    for s in ("train", "val", "test"):
        if (root / s).is_dir():
            if extra := sorted(classes(root / s) - set(names)):
                raise DataError(f"{root / s}: class folders {extra} are not in {root / 'train'}")
            out[s] = [(f, c) for c, n in enumerate(names) if (root / s / n).is_dir()
                      for f in _images_under(root / s / n)]
    if empty := sorted(set(range(len(names))) - {c for _, c in out["train"]}):
        raise DataError(f"{root / 'train' / names[empty[0]]}: a class folder with no images ({' '.join(IMAGE_TYPES)}): "
                        "add images to it or remove the folder")
    if "test" not in out and "val" in out and name == "imagefolder":
        raise DataError(f"imagefolder: {root} has val/ but no test/: add test/<class>/<image>, or, if val/ is "
                        f"ImageNet's val set, read it as ImageNet's layout, which tests on val/ (--data imagenet)")
    if "test" not in out and "val" not in out:
        raise FileNotFoundError(2, "not found", str(root / ("val" if name == "imagenet" else "test")))
    if "test" not in out:  # ImageNet's layout
        out["test"] = out.pop("val")
    return out

def _read(name, root, shots, seed, task, stage, download):
    try:
        if download and name in TORCHVISION and not (root / LAYOUTS[name].split("/")[0]).exists():
            import torchvision.datasets
            try:
                getattr(torchvision.datasets, TORCHVISION[name])(root, download=True)
            except Exception as e:  # network, server or archive trouble
                raise DataError(f"{name}: torchvision's download into {root} failed ({type(e).__name__}: {e}); "
                                f"fetch it by hand and place {LAYOUTS[name]} under {root}") from None
        return (_noah(root, shots, seed) if name == "noah-fewshot" else _vtab(root, task, shots, stage)
                if name == "vtab1k" else _fgvc_json(root) if name == "fgvc-json" else _imagefolder(root, name)
                if name in ("imagefolder", "imagenet") else _torchvision_layout(name, root))
    except FileNotFoundError as e:
        hint = " Or pass download=True. (fewshot.py --download)" if name in TORCHVISION else (
            " torchvision's StanfordCars download is gone (pytorch/vision#7545): get the files by hand, e.g. from a "
            "Kaggle mirror." if name == "cars" else "")
        raise DataError(f"{name}: {e.filename} not found. Expected under {root}: {LAYOUTS[name]}.{hint}") from None
    except OSError as e:  # a folder or file we may not read, or a file where a folder belongs
        raise DataError(f"{name}: cannot read {e.filename or root}: {e.strerror or e}; check it and its permissions") \
            from None
    except (ValueError, KeyError, IndexError, TypeError) as e:  # a field missing, or not a number where one belongs
        raise DataError(f"{name}: an annotation file under {root} does not read ({type(e).__name__}: {e}); compare it "
                        f"with the layout: {LAYOUTS[name]}") from None

def _index(name, root, shots, seed, task, stage, download):
    """A dataset's index (_read: {train, val when it has one, test: [(path, label)], names, meta}), checked: train
    and test not empty, every label one of the names; -> (index, names)."""
    found = _read(name, root, shots, seed, task, stage, download)
    train, val, test = found["train"], found.get("val"), found["test"]
    for s, items in (("train", train), ("test", test)):
        if not items:
            raise DataError(f"{name}: the {s} split under {root} is empty; expected {LAYOUTS[name]}")
    names = found.get("names") or [str(c) for c in range(1 + max(label for _, label in train + test))]
    if bad := next(((p, y) for p, y in train + (val or []) + test if not 0 <= y < len(names)), None):
        raise DataError(f"{name}: {bad[0]} gets label {bad[1]}, outside 0..{len(names) - 1} (class ids that count "
                        f"from 1 in the annotation become 0-based): fix its annotation under {root}")
    return found, names

MAX_ASPECT = 100  # one side over 100x the other: a strip, not a picture (Resize(256) would make it 25,600+ px long)

def read_image(path):
    """One image file -> an RGB PIL image, as a viewer shows it. The mode rules:
      - EXIF orientation is applied (ImageOps.exif_transpose), unlike torchvision's ImageFolder loader: a photo a
        camera stored sideways is read upright; a file without an orientation tag is unchanged;
      - 16- and 32-bit modes (I;16, I;16B, I, F) are scaled into 0..255 by the first nominal range that holds every
        value (integers 0..65535, as torchvision.io scales 16-bit PNGs; F 0..1, then 0..255), else by the image's own
        min..max (non-finite values read as 0). PIL's convert("RGB") would clip them: a 16-bit image turns white.
        Nominal, not own range: a dark image stays dark, and a flat one is not stretched into noise;
      - transparency (RGBA, LA, PA, or a tRNS entry on P, L or RGB) is composited over white: what lies under alpha 0
        is arbitrary (often black), and white is the page such images are shown on (torchvision's loader drops alpha);
      - every other mode (1, L, P, CMYK, YCbCr) goes through PIL's convert("RGB"); CMYK by its formula, no ICC profile.
    Refused with a DataError naming the file: a path that is not a regular file (checked before opening, as a FIFO
    would block), more pixels than PIL's decompression-bomb limit (Image.MAX_IMAGE_PIXELS), one side over MAX_ASPECT
    times the other, and a file PIL cannot decode."""
    fix = "replace it or drop it from the split"
    if not Path(path).is_file():
        what = "is not a regular file (a FIFO, device or folder)" if os.path.exists(path) else "does not exist"
        raise DataError(f"image {path} {what}: {fix}")
    try:
        with Image.open(path) as im:
            (w, h), limit = im.size, Image.MAX_IMAGE_PIXELS
            if limit and w * h > limit:
                raise DataError(f"image {path} has {w}x{h} = {w * h:,} pixels, past PIL's decompression-bomb limit "
                                f"({limit:,}): if it is a real picture, downscale it; else {fix}")
            if max(w, h) > MAX_ASPECT * min(w, h):
                raise DataError(f"image {path} is {w}x{h} px, one side over {MAX_ASPECT}x the other: no protocol "
                                f"resize makes a picture of it; crop it, or {fix}")
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I", "F") or im.mode.startswith("I;16"):
                a = np.asarray(im, dtype=np.float32)
                a = np.where(np.isfinite(a), a, 0)  # (H, W)
                nominal = ((0, 1), (0, 255)) if im.mode == "F" else ((0, 65535),)
                lo, hi = next(((lo, hi) for lo, hi in nominal if lo <= a.min() and a.max() <= hi), (a.min(), a.max()))
                im = Image.fromarray(np.round((a - lo) * 255 / max(hi - lo, 1e-12)).astype(np.uint8))  # L
            if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
                im = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im.convert("RGBA"))
            return im.convert("RGB")
    except Image.DecompressionBombError as e:  # over twice the limit: PIL refuses at open
        raise DataError(f"image {path}: {str(e).rstrip('.')}: if it is a real picture, downscale it; else {fix}") \
            from None
    except (OSError, ValueError, SyntaxError) as e:  # truncated, not an image, or a mode PIL cannot convert
        raise DataError(f"cannot read image {path}: {e}; {fix}") from None

def decode(path):
    """One image file -> uint8 (3, H, W) with read_image's pixels. 8-bit RGB and grey JPEGs, the bulk of every
    dataset here, go through torchvision.io.decode_jpeg (libjpeg-turbo, EXIF orientation applied): the same pixels
    as read_image (tests/test_stream.py), in less time (tests/bench_data.py). Every other file -- PNG, 16-bit,
    palette, transparency, CMYK, what libjpeg refuses -- goes through read_image, which keeps its mode rules and
    names a bad file in its DataError. The header is read first (PIL, no pixels): a bomb or a strip is refused
    there before any decoding."""
    path = str(path)
    try:
        if os.path.isfile(path):  # a FIFO would block in open(): read_image refuses it
            with Image.open(path) as im:
                (w, h), limit = im.size, Image.MAX_IMAGE_PIXELS
                fast = im.format == "JPEG" and im.mode in ("RGB", "L") and not (limit and w * h > limit) and \
                    max(w, h) <= MAX_ASPECT * min(w, h)
            import torchvision.io
            if fast and hasattr(torchvision.io, "decode_jpeg"):  # deprecated in torchvision 0.29 for TorchCodec
                return torchvision.io.decode_jpeg(torchvision.io.read_file(path), mode=torchvision.io.ImageReadMode.RGB,
                                                  apply_exif_orientation=True)  # (3, H, W)
    except (OSError, ValueError, SyntaxError, RuntimeError, TypeError, Image.DecompressionBombError):
        pass  # truncated, not an image, or refused by libjpeg: read_image says what and where
    return torch.from_numpy(np.array(read_image(path))).permute(2, 0, 1)  # (3, H, W)

def resize_crop(resize, side, interpolation, crop):
    """The fixed part of a protocol (PROTOCOLS), as torchvision.transforms.v2 on uint8 (3, H, W): Resize(side) of the
    shorter side or Resize((side, side)), antialiased, then CenterCrop(crop). Against PIL's resize: at most 1 level
    in 255 apart, 0.002-0.004 on average (bilinear, bicubic; 500x375 JPEG).
    The random crop + flip of training stays on the batch (augment), drawn from a generator the caller seeds: v2's
    random transforms draw from the global RNG, which loader workers and a resumed run do not replay."""
    from torchvision.transforms import v2
    how = v2.InterpolationMode(interpolation)  # "bilinear", "bicubic" (or the enum itself)
    return v2.Compose([v2.Resize(side if resize == "shorter" else [side, side], how, antialias=True),
                       v2.CenterCrop(crop)])

def _decode(items, resize, side, interpolation, crop, desc):
    """[(path, label)] -> Split of uint8 (N, 3, crop, crop): decode, resize_crop; in threads (libjpeg-turbo, torch and
    PIL release the GIL), with a progress bar past 500 images."""
    images, transform = torch.empty(len(items), 3, crop, crop, dtype=torch.uint8), resize_crop(resize, side,
                                                                                              interpolation, crop)

    def one(i):
        images[i] = transform(decode(items[i][0]))  # (3, crop, crop)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # read_image refuses past the limit itself
        with ThreadPoolExecutor(min(8, 2 * (os.cpu_count() or 1))) as pool:
            list(tqdm(pool.map(one, range(len(items))), total=len(items), desc=desc, leave=False,
                      **({"disable": True} if len(items) < 500 else {})))  # else TQDM_DISABLE decides
    return Split(images, torch.tensor([label for _, label in items], dtype=torch.long))

@lru_cache(maxsize=4)
def _decoded(items, resize, side, interpolation, crop, desc):
    """_decode for val and test, memoised: a sweep's runs (methods x shots x seeds) decode them once per process."""
    return _decode(items, resize, side, interpolation, crop, desc)

def cpus():
    """The CPUs this process may use: the most loader workers it may start (--workers), as more only take turns."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

def default_workers():
    """Loader processes per training process: the CPUs this process may use, shared by the processes torchrun started
    on this machine (LOCAL_WORLD_SIZE), one kept for the training loop itself; at most 8."""
    return max(0, min(8, cpus() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")) - 1))

class Stream(torch.utils.data.Dataset):
    """A split read from disk as it is used: item i is (the uint8 image _decode would keep, label i). It holds only
    its index: the paths as one numpy byte array, which forked loader workers share (a list of Python strings would
    be copied into every worker page by page as reference counts touch it: pytorch/pytorch#13246), and the labels.
    Read it through batches(); a bad image becomes one DataError naming it, raised in the training process."""

    def __init__(self, items, resize, side, interpolation, crop, workers=0):
        self.paths = np.array([os.fsencode(p) for p, _ in items], dtype=bytes)  # (N,) fixed-width bytes
        self.labels = torch.tensor([label for _, label in items], dtype=torch.long)
        self.how, self.workers, self._loaders = (resize, side, interpolation, crop), workers, {}
        self.transform = resize_crop(resize, side, interpolation, crop)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused past the limit anyway
                return self.transform(decode(os.fsdecode(self.paths[i]))), int(self.labels[i])
        except DataError as e:  # travels back as data: a worker's exception would arrive wrapped in its traceback
            return str(e)

    def __getstate__(self):  # what a spawned worker receives: the index, not the loaders
        return {**self.__dict__, "_loaders": {}}

    def subset(self, idx):
        return Stream([(os.fsdecode(self.paths[i]), int(self.labels[i])) for i in torch.as_tensor(idx).tolist()],
                      *self.how, self.workers)

    def batches(self, order, batch, skip=0, pin=False):
        """(uint8 images (B, 3, crop, crop), labels (B,)) for the slices of `batch` of `order` (indices), from slice
        `skip` on (a resumed epoch reads nothing it skips). A DataLoader per (batch, pin) is kept: its `workers`
        processes stay up between passes (persistent_workers) and each decodes at most 2 batches ahead
        (prefetch_factor); pin: page-locked batches, so copies to CUDA can be non-blocking. With 0 workers this
        process decodes. The loader has its own generator, so reading never draws from the global RNG."""
        if (batch, pin) not in self._loaders:
            self._loaders[batch, pin] = torch.utils.data.DataLoader(
                self, batch_sampler=_Slices(batch), num_workers=self.workers, collate_fn=_collate, pin_memory=pin,
                persistent_workers=self.workers > 0, prefetch_factor=2 if self.workers else None,
                generator=torch.Generator(), worker_init_fn=_worker_init)
        loader = self._loaders[batch, pin]
        loader.batch_sampler.order, loader.batch_sampler.skip = order, skip
        for item in loader:
            if isinstance(item, str):
                raise DataError(item)
            yield item

class _Slices(torch.utils.data.Sampler):
    """The batch sampler of a Stream's loader: slices of `batch` of `order`, from slice `skip`; set before each pass."""

    def __init__(self, batch):
        self.batch, self.order, self.skip = batch, torch.zeros(0, dtype=torch.long), 0

    def __iter__(self):
        for i in range(self.skip * self.batch, len(self.order), self.batch):
            yield self.order[i:i + self.batch].tolist()

    def __len__(self):
        return max(0, math.ceil(len(self.order) / self.batch) - self.skip)

def _collate(items):  # [(image, label) or an error line] -> [images, labels] (in shared memory in a worker), or
    return next((x for x in items if isinstance(x, str)), None) or torch.utils.data.default_collate(items)  # the line

def _worker_init(worker):
    """In each loader worker: glibc's malloc raises its mmap threshold after a large buffer is freed, so later decode
    buffers (5.8 MB for a 2-megapixel JPEG) come from the heap and fragment it, and a worker grew by ~100 MB over
    2,400 such images (tests/bench_data.py); a fixed 1 MB threshold hands every large buffer back. Elsewhere: no-op."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass

@lru_cache(maxsize=4)
def _streamed(items, resize, side, interpolation, crop, workers):
    """A Stream of val or test, memoised as _decoded is: every run of a sweep reads it through the same workers."""
    return Stream(items, resize, side, interpolation, crop, workers)

_SAID = set()

def _say(line):  # once per process: a sweep loads the same splits for every shots and seed
    if line not in _SAID:
        _SAID.add(line)
        tqdm.write(line)

def _need(ok, message):
    if not ok:
        raise DataError(message)


def check_flags(dataset, data_root, download, vtab_task, shots):
    """--data a known name, and the flags that go with it (--data-root, --download, --vtab-task): one DataError."""
    name, _, sub = dataset.partition(":")
    _need(name in DATASETS, f"unknown dataset {name!r} (--data): choose one of {', '.join(DATASETS)}")
    _need(name != "synthetic" or not sub or sub in SYNTHETIC_TASKS, f"unknown synthetic task {sub!r} (--data "
          f"synthetic:<task>): choose one of {', '.join(SYNTHETIC_TASKS)}, or --data synthetic for all")
    _need(name != "synthetic" or data_root is None, f"--data-root is for data on disk; the embedded --data "
          f"{dataset} has none: drop it")
    _need(not download or name in TORCHVISION, f"--download fetches {', '.join(TORCHVISION)} through "
          f"torchvision, not --data {dataset}: drop it")
    _need(vtab_task is None or name == "vtab1k", f"--vtab-task is for --data vtab1k, not --data {dataset}: drop it")
    if name != "synthetic":
        _need(data_root is not None, f"--data {name} reads from disk: give its root (--data-root), laid out as "
              f"{LAYOUTS[name]}")
        _need(download or Path(data_root).is_dir(), f"--data-root {data_root} does not exist (or is not a "
              f"folder): give the folder that holds {LAYOUTS[name]}")
    task = vtab_task or sub
    _need(name != "vtab1k" or task in VTAB_TASKS, (f"--vtab-task {task!r} is not a VTAB-1k task folder: choose"
          if task else "--data vtab1k needs --vtab-task <folder>,") + f" one of {', '.join(VTAB_TASKS)}")
    _need(name != "noah-fewshot" or None not in shots, "--data noah-fewshot reads the list file of each shots and "
          "seed: give --shots from 1,2,4,8,16, not all")


GPU_KEPT = {}  # id of a kept split's images -> (that tensor, its copy on the GPU): made once per process


def on_device(split, device, share=0.25):
    """A split kept in memory, copied to the GPU once per process when it takes at most `share` of the free memory
    there (every run of a sweep then evaluates it without a copy); else, or off CUDA, or streamed, as it is."""
    if device.type != "cuda" or not isinstance(split, Split) or split.images.device.type == "cuda":
        return split
    key = id(split.images)
    if key not in GPU_KEPT and split.images.nbytes <= share * torch.cuda.mem_get_info(device)[0]:
        GPU_KEPT[key] = split.images, Split(split.images.to(device), split.labels.to(device))
    return GPU_KEPT[key][1] if key in GPU_KEPT else split


WAIT_WINDOW = 50  # steps over which the bar's images/s and data wait are measured


class Progress:
    """What the training bar shows beside the loss, over the last WAIT_WINDOW steps: images/s (over all ranks) and
    `wait`, the fraction of the time the loop waited for its next batch; once, a warning when a split read from disk
    kept the loop waiting more than half the time (the loader, not the model, sets the pace)."""

    def __init__(self, split, world, rank):
        self.split, self.world, self.rank, self.warned = split, world, rank, False
        self.start, self.waited, self.images, self.steps = time.perf_counter(), 0.0, 0, 0

    def timed(self, batches):
        """The batches, timing how long each next() took."""
        it = iter(batches)
        while True:
            t0 = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            self.waited += time.perf_counter() - t0
            yield item

    def step(self, images):
        """Count a step of `images` images; the figures to show, over the window so far."""
        self.images, self.steps = self.images + images, self.steps + 1
        seconds = max(time.perf_counter() - self.start, 1e-9)
        wait = self.waited / seconds
        shown = {"img/s": f"{self.images * self.world / seconds:,.0f}", "wait": f"{wait:.0%}"}
        if self.steps == WAIT_WINDOW:  # the window is full: judge it, and start the next
            if wait > 0.5 and isinstance(self.split, Stream) and self.rank == 0 and not self.warned:
                self.warned = True
                tqdm.write(f"warning: the loader is the bottleneck: the last {self.steps} steps waited for data "
                           f"{wait:.0%} of the time, with {self.split.workers} loader workers; give it more "
                           "(--workers), or keep the split in memory (--cache-gb) if it fits")
            self.start, self.waited, self.images, self.steps = time.perf_counter(), 0.0, 0, 0
        return shown


def vtab_averages(acc):
    """The two VTAB-1k averages in use, from {task folder: top-1}: the mean of the three group means (NOAH's table;
    Natural 7, Specialized 4, Structured 8) and the plain mean of the 19 tasks (V-PETL Bench), labelled; with tasks
    missing, the means of the complete groups and which tasks are missing."""
    groups = {g: [acc[t] for t in ts if t in acc] for g, ts in VTAB_GROUPS.items()}
    means = {g: sum(v) / len(v) for g, v in groups.items() if len(v) == len(VTAB_GROUPS[g])}
    shown = ", ".join(f"{g} {m:.2f}" for g, m in means.items())
    if len(means) == 3:
        return (f"VTAB-1k: mean of the 3 group means {sum(means.values()) / 3:.2f} (NOAH's), mean of the 19 tasks "
                f"{sum(acc[t] for ts in VTAB_GROUPS.values() for t in ts) / 19:.2f} (V-PETL Bench's); {shown}")
    missing = [t for ts in VTAB_GROUPS.values() for t in ts if t not in acc]
    return f"VTAB-1k: complete groups: {shown or 'none'}; missing {len(missing)} of 19: {', '.join(missing)}"


def max_gb():
    """NANOPETL_MAX_GB (default 8, inf for no limit): the GB of decoded uint8 images load_task keeps in memory when
    no cache_gb is given (--cache-gb); splits past it stream. A value that is not a positive number is a DataError
    naming it (fewshot.check() calls this before any work)."""
    value = os.environ.get("NANOPETL_MAX_GB", "8")
    try:
        limit = float(value)
    except ValueError:
        limit = math.nan
    if not limit > 0:  # nan, zero, negative
        raise DataError(f"NANOPETL_MAX_GB={value!r} is not a positive number of GB: set it to e.g. 8 (the default), "
                        f"or unset it")
    return limit

def _keep_or_stream(name, train, val, test, protocol, size, cache_gb, workers):
    """train, val, test as [(path, label)] -> [Split or Stream of each], brought to `size` by `protocol`: the splits
    whose uint8 images fit cache_gb (default NANOPETL_MAX_GB, max_gb), smallest first, are decoded once and kept (val
    and test memoised for a sweep); the others stream through `workers` loader processes (default_workers()). The
    choice is printed, once per process."""
    resize, side, interpolation, train_aug = PROTOCOLS[protocol]
    side = round(side * size / 224)
    plan = (("train", train, side if train_aug == "crop_flip" else size), ("val", val, size), ("test", test, size))
    budget, workers = max_gb() if cache_gb is None else cache_gb, default_workers() if workers is None else workers
    kept, left = set(), budget * 1e9
    for s, items, crop in sorted(plan, key=lambda p: len(p[1]) * p[2]**2):  # the smallest first: most splits kept
        if 3 * len(items) * crop**2 <= left:
            kept.add(s)
            left -= 3 * len(items) * crop**2
    _say(f"{name}: " + "; ".join(f"{s} {len(items):,} images ({3 * len(items) * crop**2 / 1e9:.2g} GB as uint8) " + (
        "decoded once, kept in memory" if s in kept else f"streamed from disk by {workers} loader workers")
        for s, items, crop in plan) + f" (--cache-gb {budget:g} GB)")
    return [(_decode(items, resize, side, interpolation, crop, f"{name} {s}") if s == "train" else
             _decoded(tuple(items), resize, side, interpolation, crop, f"{name} {s}")) if s in kept else
            Stream(items, resize, side, interpolation, crop, workers) if s == "train" else
            _streamed(tuple(items), resize, side, interpolation, crop, workers) for s, items, crop in plan]

# python data.py: each set's sizes and a contact sheet

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Print the embedded world's sets and write a contact sheet of it.")
    ap.add_argument("--sheet", default="synthetic_world.png", help="where to write the contact sheet (PNG)")
    path = ap.parse_args().sheet
    print(f"{'set':9} {'classes':>7}  {'images per class':24}  class 0")
    for name in WORLD:
        world = SyntheticSet(name)
        sizes = "{}/{}/{} train/val/test".format(*POOLS.values()) if name in SYNTHETIC_TASKS else "endless (.batch)"
        print(f"{name:9} {world.num_classes:7}  {sizes:24}  {world.describe(0)}")
    try:
        contact_sheet(path)
    except (OSError, ValueError) as e:  # a folder we may not write, a full disk, a name that is not .png or .jpg
        raise SystemExit(f"error: cannot write the contact sheet {path} (--sheet): {getattr(e, 'strerror', None) or e}"
                         f"; choose another path, a .png") from None
    print(f"contact sheet: {path} ({os.path.getsize(path) / 1e3:.0f} kB)")

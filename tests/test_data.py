"""data.py: the embedded world (sizes, determinism, disjointness), k-shot sampling, the transforms, every real
layout on tiny fixtures written here (8x8 JPEGs), and the one-message DataError of each bad input. No network."""
import hashlib
import json
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat

import data
from data import DataError, few_shot, load_task

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"shape": 16, "texture": 10, "colour": 12, "species": 12, "model": 12}


def digest(t):
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def run(code):  # a fresh interpreter, so nothing (RNG state, caches) is shared with this one
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.split()


def jpeg(path, value=0, size=(8, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, 255 - value, 128)).save(path, "JPEG")
    return path


def lines(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{r}\n" for r in rows))


# -----------------------------------------------------------------------------
# the embedded world

def test_world_sets_have_their_sizes():
    tasks = load_task("synthetic")
    assert [t.name for t in tasks] == [f"synthetic:{n}" for n in data.SYNTHETIC_TASKS]
    for t in tasks:
        C = SIZES[t.name.split(":")[1]]
        assert t.num_classes == C and (t.img_size, t.train_aug, t.mean, t.std) == (32, "none", (0.5,) * 3, (0.5,) * 3)
        for split, per_class in (("train", 32), ("val", 16), ("test", 40)):
            s = getattr(t, split)
            assert s.images.shape == (C * per_class, 3, 32, 32) and s.images.dtype == torch.uint8
            assert torch.bincount(s.labels, minlength=C).tolist() == [per_class] * C
    assert data.synthetic_source("backbone").num_classes == 384 and data.synthetic_source("pvp").num_classes == 192
    [one] = load_task("synthetic:colour", shots=4, img_size=64)
    assert one.train.images.shape == (12 * 4, 3, 64, 64) and one.test.images.shape[-1] == 64


def test_world_is_deterministic_and_independent_of_the_batch():
    world = data.SyntheticSet("species")
    labels, index = torch.tensor([3, 0, 7, 7, 11]), torch.tensor([5, 0, 1, 2, 30])
    full = world.render(labels, index, "test")
    assert torch.equal(full, world.render(labels, index, "test"))
    assert torch.equal(full[2:4], world.render(labels[2:4], index[2:4], "test"))  # not a function of the batch
    assert not torch.equal(full, world.render(labels, index, "val"))
    assert not torch.equal(full, data.SyntheticSet("species", world_seed=1).render(labels, index, "test"))
    src = data.synthetic_source("pvp")
    a, b = src.batch(3, 64), src.batch(4, 64)
    assert torch.equal(a.images, src.batch(3, 64).images) and not torch.equal(a.images, b.images)
    assert a.labels.max() < 192 and len(a.labels.unique()) > 40  # hashed classes, spread out
    code = ("import data, hashlib; f = lambda t: hashlib.sha256(t.numpy().tobytes()).hexdigest()\n"
            "print(f(data.SyntheticSet('species').render([3, 0, 7, 7, 11], [5, 0, 1, 2, 30], 'test')))\n"
            "print(f(data.synthetic_source('backbone').batch(2, 16).images))")
    assert run(code) == [digest(full), digest(data.synthetic_source("backbone").batch(2, 16).images)]


def test_world_tasks_are_disjoint_from_the_sources_and_their_splits_from_each_other():
    pvp, backbone = data.SyntheticSet("pvp"), data.SyntheticSet("backbone")
    source_hues = {h for c in backbone.classes for pair in c["colours"] for h in pair}
    assert source_hues == {0, 2, 4, 6, 8, 10}
    pvp_classes = {pvp.describe(c) for c in range(pvp.num_classes)}
    assert pvp_classes <= {backbone.describe(c) for c in range(backbone.num_classes)}  # a subset, as IN-1k of IN-21k
    for name in data.SYNTHETIC_TASKS:
        world = data.SyntheticSet(name)
        assert all(h % 2 == 1 for c in world.classes for pair in c["colours"] for h in pair)  # novel colours only
        assert not {world.describe(c) for c in range(world.num_classes)} & pvp_classes
        [t] = load_task(f"synthetic:{name}")
        rows = [set(map(digest, s.images)) for s in (t.train, t.val, t.test)]
        assert sum(map(len, rows)) == len(t.train) + len(t.val) + len(t.test)  # no image twice, within or across
        assert not (rows[0] & rows[1] or rows[0] & rows[2] or rows[1] & rows[2])


def test_every_backbone_attribute_is_needed():
    """The backbone's classes cross every attribute, so no single one (e.g. colour) names a class."""
    world = data.SyntheticSet("backbone")
    combos = {tuple(sorted(c.items())) for c in world.classes}
    for c in world.classes:
        for attr, values in data.WORLD["backbone"][0].items():
            others = [v for v in values if (v,) != c[attr]]
            assert others and all(tuple(sorted({**c, attr: (v,)}.items())) in combos for v in others)

# -----------------------------------------------------------------------------
# k-shot sampling and transforms


def test_few_shot_is_exact_sorted_nested_and_ignores_the_global_rng():
    labels = torch.arange(7).repeat_interleave(torch.tensor([5, 9, 16, 20, 6, 30, 16]))[torch.randperm(102)]
    torch.manual_seed(123)
    a = few_shot(labels, 4, seed=1)
    torch.manual_seed(999), torch.rand(1000), np.random.seed(5)
    assert torch.equal(a, few_shot(labels, 4, seed=1))
    assert torch.bincount(labels[a]).tolist() == [4] * 7 and torch.equal(a, a.sort().values)
    assert set(few_shot(labels, 2, seed=1).tolist()) <= set(a.tolist())  # nested across shots
    assert not torch.equal(a, few_shot(labels, 4, seed=2))
    code = f"import torch, data; print(*data.few_shot(torch.tensor({labels.tolist()}), 4, seed=1).tolist())"
    assert run(code) == [str(i) for i in a.tolist()]


def test_few_shot_names_the_short_class():
    with pytest.raises(DataError, match=r"class 2 \(tulip\) has 3 training images, fewer than shots=4"):
        few_shot(torch.tensor([0] * 5 + [1] * 5 + [2] * 3), 4, 0, names=["rose", "daisy", "tulip"])
    with pytest.raises(DataError, match="class 1 has 0 training images"):
        few_shot(torch.tensor([0, 0, 2, 2]), 1, 0)


def test_normalize_and_augment():
    x = torch.randint(0, 256, (4, 3, 10, 10), dtype=torch.uint8)
    z = data.normalize(x, (0.5, 0.4, 0.3), (0.5, 0.2, 0.1))
    assert torch.allclose(z, data.normalize(x.float() / 255, (0.5, 0.4, 0.3), (0.5, 0.2, 0.1)))
    assert torch.allclose(z[:, 1], (x[:, 1] / 255 - 0.4) / 0.2)
    assert torch.equal(data.augment(x, "none"), x) and torch.equal(data.augment(x, "none", size=6), x[:, :, 2:8, 2:8])
    g = lambda: torch.Generator().manual_seed(0)
    y = data.augment(x, "crop_flip", g(), size=6)
    assert y.shape == (4, 3, 6, 6) and torch.equal(y, data.augment(x, "crop_flip", g(), size=6))
    for crop, im in zip(y, x):  # each crop is a window of its image, maybe flipped
        windows = [im[:, i:i + 6, j:j + 6] for i in range(5) for j in range(5)]
        assert any(torch.equal(crop, w) or torch.equal(crop, w.flip(-1)) for w in windows)
    assert data.augment(torch.zeros(2, 3, 256, 256), "crop_flip").shape == (2, 3, 224, 224)
    with pytest.raises(ValueError, match="unknown how"):
        data.augment(x, "mixup")

# -----------------------------------------------------------------------------
# decoding: each image mode read as a viewer shows it (data.read_image)


def pixels(path):
    return np.asarray(data.read_image(path)).astype(int)  # (H, W, 3)


def test_read_image_scales_16_and_32_bit_modes(tmp_path):
    ramp = np.linspace(0, 65535, 256).reshape(16, 16)
    Image.fromarray(ramp.astype(np.uint16)).save(tmp_path / "i16.png")  # PIL reads it as I;16
    Image.frombytes("I;16B", (16, 16), ramp.astype(">u2").tobytes()).save(tmp_path / "i16b.tif")
    Image.fromarray((ramp / 4).astype(np.int32)).save(tmp_path / "i.tif")  # I, within 0..65535: a dim image stays dim
    Image.fromarray((ramp / 65535).astype(np.float32)).save(tmp_path / "f.tif")  # F in 0..1
    modes = [Image.open(tmp_path / f).mode for f in ("i16.png", "i16b.tif", "i.tif", "f.tif")]
    assert modes == ["I;16", "I;16B", "I", "F"]
    want = np.round(np.linspace(0, 255, 256)).reshape(16, 16)
    for f in ("i16.png", "i16b.tif", "f.tif"):
        x = pixels(tmp_path / f)
        assert (x == x[..., :1]).all() and np.abs(x[..., 0] - want).max() <= 1, f  # grey, the whole ramp: no clipping
    assert np.abs(pixels(tmp_path / "i.tif")[..., 0] - want / 4).max() <= 1
    wide = np.linspace(-1000, 200000, 256).reshape(16, 16)  # past the nominal range: the image's own min..max
    Image.fromarray(wide.astype(np.int32)).save(tmp_path / "wide.tif")
    Image.fromarray(wide.astype(np.float32)).save(tmp_path / "widef.tif")
    for f in ("wide.tif", "widef.tif"):
        assert np.abs(pixels(tmp_path / f)[..., 0] - want).max() <= 1, f
    Image.fromarray((ramp / 65535 * 200).astype(np.float32)).save(tmp_path / "f255.tif")  # F in 0..255 (200 at most)
    assert np.abs(pixels(tmp_path / "f255.tif")[..., 0] - want * 200 / 255).max() <= 1
    nan = (ramp / 65535).astype(np.float32)
    nan[0, :4] = [np.nan, np.inf, -np.inf, 0.5]
    Image.fromarray(nan).save(tmp_path / "nan.tif")
    assert pixels(tmp_path / "nan.tif")[0, :4, 0].tolist() == [0, 0, 0, 128]  # non-finite values read as 0


def test_read_image_composites_transparency_over_white(tmp_path):
    p = Image.new("P", (4, 4), 0)
    p.putpalette([0, 0, 0, 200, 10, 10])  # index 0: black, but transparent
    p.putpixel((1, 1), 1)
    p.save(tmp_path / "p.png", transparency=0)
    x = pixels(tmp_path / "p.png")
    assert x[1, 1].tolist() == [200, 10, 10] and (x[0] == 255).all()
    rgba = Image.new("RGBA", (3, 1), (0, 0, 0, 0))  # clear, half and opaque
    rgba.putpixel((1, 0), (0, 0, 0, 128)), rgba.putpixel((2, 0), (10, 20, 30, 255))
    rgba.save(tmp_path / "rgba.png")
    assert pixels(tmp_path / "rgba.png")[0].tolist() == [[255] * 3, [127] * 3, [10, 20, 30]]
    Image.new("LA", (2, 2), (0, 0)).save(tmp_path / "la.png")
    assert (pixels(tmp_path / "la.png") == 255).all()
    Image.new("RGB", (2, 2), (1, 2, 3)).save(tmp_path / "key.png", transparency=(1, 2, 3))  # RGB with a tRNS colour
    assert (pixels(tmp_path / "key.png") == 255).all()


def test_read_image_cmyk_grey_and_exif_orientation(tmp_path):
    cmyk = Image.new("CMYK", (2, 1), (0, 0, 0, 0))
    cmyk.putpixel((1, 0), (255, 0, 0, 0))  # paper white, pure cyan
    cmyk.save(tmp_path / "c.tif")
    assert pixels(tmp_path / "c.tif")[0].tolist() == [[255, 255, 255], [0, 255, 255]]
    Image.new("1", (2, 2), 1).save(tmp_path / "bw.png")
    assert (pixels(tmp_path / "bw.png") == 255).all()
    im = Image.new("RGB", (16, 8), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 8, 8))  # left half red, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation 6: a viewer turns it 90 degrees clockwise
    im.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    x = data.read_image(tmp_path / "rot.jpg")
    assert x.size == (8, 16)  # upright: 8 wide, 16 tall, the red half on top
    a = np.asarray(x).astype(int)
    assert a[4, 4, 0] > 200 > a[4, 4, 2] and a[12, 4, 2] > 200 > a[12, 4, 0]
    im.save(tmp_path / "plain.jpg", quality=95)  # no tag: unchanged
    assert data.read_image(tmp_path / "plain.jpg").size == (16, 8)


def test_read_image_refuses_fifo_bomb_and_strip(tmp_path):
    os.mkfifo(tmp_path / "fifo.jpg")
    caught = []
    t = threading.Thread(target=lambda: caught.append(pytest.raises(DataError, data.read_image, tmp_path / "fifo.jpg")),
                         daemon=True)  # opening a FIFO would block until a writer comes: it must not be opened
    t.start(), t.join(60)
    assert not t.is_alive() and "fifo.jpg is not a regular file (a FIFO" in str(caught[0].value)
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(DataError, match="dir.png is not a regular file"):
        data.read_image(tmp_path / "dir.png")
    with pytest.raises(DataError, match="none.png does not exist"):
        data.read_image(tmp_path / "none.png")
    Image.new("L", (60000, 1)).save(tmp_path / "strip.png")  # Resize(256) would make it 15.4 M x 256 px, 11.8 GB
    with pytest.raises(DataError, match=r"strip\.png is 60000x1 px, one side over 100x the other"):
        data.read_image(tmp_path / "strip.png")
    Image.new("L", (300, 3)).save(tmp_path / "ok.png")  # 1:100 is still read
    assert data.read_image(tmp_path / "ok.png").size == (300, 3)
    limit = Image.MAX_IMAGE_PIXELS  # 89,478,485: PIL warns past it and refuses past twice it
    Image.new("1", (10_000, 9_000)).save(tmp_path / "bomb.png")  # 90 M pixels in an 11 kB file
    Image.new("1", (20_000, 10_000)).save(tmp_path / "bomb2.png")
    bomb = rf"bomb\.png has 10000x9000 = 90,000,000 pixels, past PIL's decompression-bomb limit \({limit:,}\)"
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(DataError, match=bomb):
        data.read_image(tmp_path / "bomb.png")  # alone, PIL's warning shows too; load_task's decoding silences it
    with pytest.raises(DataError, match=r"bomb2\.png: Image size \(200000000 pixels\) exceeds limit"):
        data.read_image(tmp_path / "bomb2.png")
    jpeg(tmp_path / "train" / "a" / "0.jpg"), jpeg(tmp_path / "test" / "a" / "0.jpg")
    Image.new("1", (10_000, 9_000)).save(tmp_path / "train" / "a" / "1.png")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(DataError, match="1.png has 10000x9000"):
            load_task("imagefolder", tmp_path, img_size=16)
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]  # one line, not PIL's too

# -----------------------------------------------------------------------------
# real layouts, each on a few 8x8 JPEGs


def test_noah_lists_with_the_pets_duplicates_and_the_cars_rule(tmp_path):
    root = tmp_path / "oxford-pets"
    names = [f"{b}_{i}.jpg" for b in ("Abyssinian", "Bengal", "Birman") for i in range(4)]
    for n in names:
        jpeg(root / "images" / n)
    ann = root / "annotations"
    one_shot = [f"{names[0]} 0", f"{names[4]} 1", f"{names[8]} 2"]
    lines(ann / "train_meta.list.num_shot_1.seed_0", one_shot + one_shot)  # Oxford-Pets: every image twice
    lines(ann / "val_meta.list", [f"{names[1]} 0", f"{names[5]} 1", f"{names[9]} 2"])
    lines(ann / "test_meta.list", [f"{n} {i // 4}" for i, n in enumerate(names) if i % 4 > 1])
    [t] = load_task("noah-fewshot", root, shots=1, seed=0, img_size=16)
    assert (t.num_classes, len(t.train), len(t.val), len(t.test)) == (3, 3, 3, 6)
    assert t.train.labels.tolist() == [0, 1, 2] and t.meta["duplicates_dropped"] == 3
    assert t.test.labels.tolist() == [0, 0, 1, 1, 2, 2] and t.meta["protocol"] == "noah-fewshot"
    assert t.train.images.shape[-1] == 18 and t.test.images.shape[-1] == 16  # Resize((256, 256)) scaled, crop 16
    cars = tmp_path / "data" / "stanford_cars"  # NOAH's rule: <root>/<relpath> when the root names stanford_cars
    jpeg(cars / "cars_train" / "00001.jpg"), jpeg(cars / "cars_test" / "00002.jpg")
    for f in ("train_meta.list.num_shot_1.seed_2", "val_meta.list"):
        lines(cars / "annotations" / f, ["cars_train/00001.jpg 0"])
    lines(cars / "annotations" / "test_meta.list", ["cars_test/00002.jpg 0"])
    [c] = load_task("noah-fewshot", cars, shots=1, seed=2, img_size=16)
    assert (len(c.train), len(c.test)) == (1, 1)
    with pytest.raises(DataError, match="give shots"):
        load_task("noah-fewshot", root)


def test_noah_and_vtab_bad_lines_name_file_and_line(tmp_path):
    root = tmp_path / "flowers"
    jpeg(root / "images" / "a.jpg")
    ann = root / "annotations"
    lines(ann / "test_meta.list", ["a.jpg 0", "a.jpg 1"])
    lines(ann / "val_meta.list", ["a.jpg 0"])
    lines(ann / "train_meta.list.num_shot_1.seed_0", ["a.jpg 0", "missing.jpg 1"])
    with pytest.raises(DataError, match=r"num_shot_1\.seed_0:2: image .*missing\.jpg does not exist"):
        load_task("noah-fewshot", root, shots=1)
    lines(ann / "train_meta.list.num_shot_1.seed_0", ["a.jpg 0", "a.jpg 5"])
    with pytest.raises(DataError, match=r"num_shot_1\.seed_0:2: label 5 is out of range 0\.\.1"):
        load_task("noah-fewshot", root, shots=1)
    lines(ann / "train_meta.list.num_shot_1.seed_0", ["a.jpg zero"])
    with pytest.raises(DataError, match=r"seed_0:1: expected '<relative path> <label>'"):
        load_task("noah-fewshot", root, shots=1)
    with pytest.raises(DataError, match="train_meta.list.num_shot_2.seed_0 not found"):
        load_task("noah-fewshot", root, shots=2)


def vtab(root, task="kitti", per_class=2):
    base = root / task
    for split in ("train800", "val200", "train800val200", "test"):
        rows = [f"images/{split}/{c}{i}.jpg {c}" for c in range(data.VTAB_TASKS[task]) for i in range(per_class)]
        for r in rows:
            jpeg(base / r.split()[0])
        lines(base / f"{split}.txt", rows)
    return base


def test_vtab1k_final_and_search_stages(tmp_path):
    base = vtab(tmp_path)
    lines(base / "train800val200.txt", (base / "train800.txt").read_text().split("\n")[:-1] +
          (base / "val200.txt").read_text().split("\n")[:-1])
    [t] = load_task("vtab1k", tmp_path, vtab_task="kitti", img_size=16)
    assert (t.name, t.num_classes, len(t.train), len(t.val), len(t.test)) == ("vtab1k:kitti", 4, 16, 8, 8)
    assert t.train_aug == "none" and t.train.images.shape[-1] == 16 and t.meta["train_list"] == "train800val200"
    [s] = load_task("vtab1k:kitti", tmp_path, vtab_stage="search", img_size=16)
    assert (len(s.train), s.meta["train_list"]) == (8, "train800")
    [k] = load_task("vtab1k:kitti", tmp_path, shots=1, img_size=16)
    assert torch.bincount(k.train.labels).tolist() == [1] * 4 and k.meta["train_list"] == "train800"
    lines(base / "test.txt", ["images/test/00.jpg 0", "images/test/01.jpg 4"])
    with pytest.raises(DataError, match=r"test\.txt:2: label 4 is out of range 0\.\.3"):
        load_task("vtab1k:kitti", tmp_path)
    with pytest.raises(DataError, match="vtab_task .* in caltech101, cifar"):
        load_task("vtab1k", tmp_path)


def test_fgvc_json_remaps_ids_and_finds_the_image_root(tmp_path):
    for name in ("a", "b", "c", "d"):
        jpeg(tmp_path / "Images" / f"{name}.jpg")
    for split, m in (("train", {"a.jpg": 17, "b.jpg": 5}), ("val", {"c.jpg": 17}), ("test", {"d.jpg": 5, "a.jpg": 17})):
        (tmp_path / f"{split}.json").write_text(json.dumps(m))
    [t] = load_task("fgvc-json", tmp_path, img_size=16)
    assert t.num_classes == 2 and t.meta["classes"] == ["5", "17"]
    assert t.train.labels.tolist() == [1, 0] and t.val.labels.tolist() == [1] and t.test.labels.tolist() == [0, 1]
    assert t.train.images.shape[-1] == 18 and t.train_aug == "crop_flip"  # fgvc: a 256/224 square for crop_flip
    (tmp_path / "val.json").write_text(json.dumps({"c.jpg": 3}))
    with pytest.raises(DataError, match=r"val\.json: 'c\.jpg' has class id 3, which train\.json never uses"):
        load_task("fgvc-json", tmp_path)
    (tmp_path / "val.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_task("fgvc-json", tmp_path)


def test_imagefolder_with_and_without_val_and_imagenet(tmp_path):
    for split, n in (("train", 12), ("test", 3)):
        for c in ("cat", "dog"):
            for i in range(n):
                jpeg(tmp_path / split / c / f"{i}.jpg", value=20 * i, size=(12, 8))  # not square: shorter side
    [t] = load_task("imagefolder", tmp_path, shots=4, seed=3, img_size=16)
    assert t.meta["classes"] == ["cat", "dog"] and t.meta["val"] == "held out from train"
    assert torch.bincount(t.train.labels).tolist() == [4, 4] and torch.bincount(t.val.labels).tolist() == [1, 1]
    assert not set(map(digest, t.train.images)) & set(map(digest, t.val.images))  # val is outside the support set
    [a] = load_task("imagefolder", tmp_path, img_size=16)  # all shots: val still held out
    assert (len(a.train), len(a.val), len(a.test)) == (22, 2, 6)
    for c in ("cat", "dog"):
        jpeg(tmp_path / "val" / c / "v.png")
    [v] = load_task("imagefolder", tmp_path, shots=2, img_size=16)
    assert v.meta["val"] == "official" and (len(v.train), len(v.val)) == (4, 2)
    for c in ("cat", "dog"):
        for f in (tmp_path / "test" / c).iterdir():
            f.unlink()
        (tmp_path / "test" / c).rmdir()
    (tmp_path / "test").rmdir()
    [i] = load_task("imagenet", tmp_path, shots=1, img_size=16)  # ImageNet's train/val: val is the test set
    assert (len(i.train), len(i.test), i.meta["val"]) == (2, 2, "held out from train")
    jpeg(tmp_path / "val" / "bird" / "x.jpg")
    with pytest.raises(DataError, match=r"class folders \['bird'\] are not in"):
        load_task("imagenet", tmp_path, shots=1)


def test_imagefolder_follows_torchvision_rules(tmp_path):
    """Classes are train/'s folders, hidden ones not; images at any depth (torchvision's ImageFolder walks), hidden
    files and folders skipped, a symlink loop walked once; val/ without test/ is a test set only under imagenet."""
    for c in ("cat", "dog"):
        for i in range(3):
            jpeg(tmp_path / "train" / c / f"{i}.jpg")
        jpeg(tmp_path / "val" / c / "v.jpg")
    for junk in ("train/.ipynb_checkpoints/x.jpg", "val/.ipynb_checkpoints/x.jpg", "train/cat/.DS_Store",
                 "train/dog/.hidden/y.jpg"):  # a hidden folder (not a class), a hidden file, one inside a class
        (tmp_path / junk).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / junk).write_bytes(b"not an image")
    (tmp_path / "train" / "cat" / "._0.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS's companions
    jpeg(tmp_path / "train" / "dog" / "2019" / "a" / "deep.png")  # nested: found
    (tmp_path / "train" / "dog" / "2019" / "loop").symlink_to(tmp_path / "train" / "dog")  # a cycle: walked once
    with pytest.raises(DataError, match=r"imagefolder: .* has val/ but no test/: add test/<class>/<image>, or, .*"
                                        r"\(--data imagenet\)"):
        load_task("imagefolder", tmp_path, img_size=16)
    [t] = load_task("imagenet", tmp_path, img_size=16)  # ImageNet's layout: val/ is the test set
    assert t.meta["classes"] == ["cat", "dog"] and (len(t.train) + len(t.val), len(t.test)) == (7, 2)
    jpeg(tmp_path / "test" / "cat" / "t.jpg"), jpeg(tmp_path / "test" / "dog" / "t.jpg")
    [f] = load_task("imagefolder", tmp_path, img_size=16)
    assert (len(f.train), len(f.val), len(f.test), f.meta["val"]) == (7, 2, 2, "official")
    found = [f.name for f in data._images_under(tmp_path / "train" / "dog")]
    assert found == ["0.jpg", "1.jpg", "2.jpg", "deep.png"]  # by path, as torchvision's walk; the loop adds none
    with pytest.raises(DataError, match=r"imagenet: .*/none/val not found"):
        (tmp_path / "none" / "train" / "a").mkdir(parents=True), jpeg(tmp_path / "none" / "train" / "a" / "0.jpg")
        load_task("imagenet", tmp_path / "none")
    (tmp_path / "flat" / "train").mkdir(parents=True), jpeg(tmp_path / "flat" / "train" / "0.jpg")
    with pytest.raises(DataError, match=r"imagefolder: .*flat/train holds no class folders; expected train/<class>/"):
        load_task("imagefolder", tmp_path / "flat")


def test_annotation_files_wrong_shape_bom_and_encoding(tmp_path):
    for name in ("a", "b"):
        jpeg(tmp_path / "images" / f"{name}.jpg")
    for split in ("train", "val", "test"):  # with a byte-order mark, as Windows' Notepad saves UTF-8: read alike
        (tmp_path / f"{split}.json").write_bytes(b"\xef\xbb\xbf" + json.dumps({"a.jpg": 0, "b.jpg": 1}).encode())
    [t] = load_task("fgvc-json", tmp_path, img_size=16)
    assert t.train.labels.tolist() == [0, 1]
    (tmp_path / "train.json").write_text(json.dumps([["a.jpg", 0], ["b.jpg", 1]]))
    with pytest.raises(DataError, match=r"train\.json: a JSON list where an object of image path -> class id belongs"):
        load_task("fgvc-json", tmp_path)
    (tmp_path / "train.json").write_text(json.dumps({"a.jpg": 0, "b.jpg": [1]}))
    with pytest.raises(DataError, match=r"train\.json: entry 'b\.jpg' holds \[1\], but an object of image path"):
        load_task("fgvc-json", tmp_path)
    (tmp_path / "train.json").write_text('{"a.jpg": 0,\n "b.jpg" 1}')
    with pytest.raises(DataError, match=r"train\.json:2: not valid JSON \(Expecting ':' delimiter\)"):
        load_task("fgvc-json", tmp_path)
    (tmp_path / "train.json").write_bytes('{"a.jpg": 0,\n "café.jpg": 1}'.encode("latin-1"))
    with pytest.raises(DataError, match=r"train\.json:2: byte 0xe9 is not UTF-8 text: save the file as UTF-8"):
        load_task("fgvc-json", tmp_path)
    meta = tmp_path / "food-101" / "meta"
    meta.mkdir(parents=True)
    (meta / "train.json").write_text(json.dumps(["ramen/1"]))
    with pytest.raises(DataError, match=r"meta/train\.json: a JSON list where an object of class name -> a list"):
        load_task("food101", tmp_path)
    (meta / "train.json").write_text(json.dumps({"ramen": "ramen/1"}))
    with pytest.raises(DataError, match=r"meta/train\.json: entry 'ramen' holds \"ramen/1\", but an object of class"):
        load_task("food101", tmp_path)
    ann = tmp_path / "annotations"  # NOAH's lists: a BOM is dropped, latin-1 names file and line
    ann.mkdir()
    for f in ("test_meta.list", "val_meta.list", "train_meta.list.num_shot_1.seed_0"):
        (ann / f).write_bytes("\ufeffa.jpg 0\nb.jpg 1\n".encode("utf-8"))
    [n] = load_task("noah-fewshot", tmp_path, shots=1, img_size=16)
    assert n.test.labels.tolist() == [0, 1]
    (ann / "test_meta.list").write_bytes("a.jpg 0\nb.jpg 1\ncafé.jpg 1\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"test_meta\.list:3: byte 0xe9 is not UTF-8 text"):
        load_task("noah-fewshot", tmp_path, shots=1)
    os.mkfifo(tmp_path / "images" / "c.jpg")  # named by a list: refused there, never opened
    (ann / "test_meta.list").write_text("a.jpg 0\nc.jpg 1\n")
    with pytest.raises(DataError, match=r"test_meta\.list:2: image .*c\.jpg is not a regular file"):
        load_task("noah-fewshot", tmp_path, shots=1)


def test_torchvision_layouts(tmp_path):
    f = tmp_path / "flowers-102"  # Flowers102: .mat labels 1..C, image ids 1..N
    for i in range(1, 7):
        jpeg(f / "jpg" / f"image_{i:05d}.jpg")
    savemat(f / "imagelabels.mat", {"labels": np.array([[1, 2, 3, 1, 2, 3]])})
    savemat(f / "setid.mat", {"trnid": np.array([[1, 2, 3]]), "valid": np.array([[4]]), "tstid": np.array([[5, 6]])})
    [t] = load_task("flowers102", tmp_path, img_size=16)
    assert (t.num_classes, t.train.labels.tolist(), t.val.labels.tolist(), t.test.labels.tolist()) == \
        (3, [0, 1, 2], [0], [1, 2])
    p = tmp_path / "oxford-iiit-pet"  # Pets: "<image> <class 1..37> <species> <breed>"
    rows = [f"{b}_{i} {c + 1} 1 {c + 1}" for c, b in enumerate(("Abyssinian", "beagle")) for i in range(3)]
    for r in rows:
        jpeg(p / "images" / f"{r.split()[0]}.jpg")
    lines(p / "annotations" / "trainval.txt", ["#Image CLASS-ID SPECIES BREED ID"] + rows)
    lines(p / "annotations" / "test.txt", rows[:1] + rows[3:4])
    [t] = load_task("pets", tmp_path, shots=2, img_size=16)
    assert (t.num_classes, len(t.train), len(t.val), t.test.labels.tolist()) == (2, 4, 2, [0, 1])
    a = tmp_path / "fgvc-aircraft-2013b" / "data"  # Aircraft: labels by variants.txt, names may hold spaces
    lines(a / "variants.txt", ["707-320", "Cessna 172"])
    for s, ids in (("train", "1 2"), ("val", "3"), ("test", "4")):
        lines(a / f"images_variant_{s}.txt", [f"{i} {'Cessna 172' if i in '24' else '707-320'}" for i in ids.split()])
    for i in "1234":
        jpeg(a / "images" / f"{i}.jpg")
    [t] = load_task("aircraft", tmp_path, img_size=16)
    assert t.meta["classes"] == ["707-320", "Cessna 172"] and t.train.labels.tolist() == [0, 1]
    lines(a / "images_variant_test.txt", ["4 Cessna 999"])
    with pytest.raises(DataError, match=r"images_variant_test\.txt:1: a variant that is not in .*variants\.txt"):
        load_task("aircraft", tmp_path)
    fo = tmp_path / "food-101"  # Food-101: meta/<split>.json, labels by sorted class name
    (fo / "meta").mkdir(parents=True)
    (fo / "meta" / "train.json").write_text(json.dumps({"ramen": ["ramen/1", "ramen/2"],
                                                        "apple_pie": ["apple_pie/3", "apple_pie/4"]}))
    (fo / "meta" / "test.json").write_text(json.dumps({"ramen": ["ramen/5"]}))
    for rel in ("ramen/1", "ramen/2", "apple_pie/3", "apple_pie/4", "ramen/5"):
        jpeg(fo / "images" / f"{rel}.jpg")
    [t] = load_task("food101", tmp_path, shots=1, img_size=16)
    assert t.meta["classes"] == ["apple_pie", "ramen"] and t.test.labels.tolist() == [1] and len(t.val) == 2


def test_stanford_cars_layout_and_its_message(tmp_path):
    with pytest.raises(DataError, match=r"cars: .*cars_meta\.mat not found.*stanford_cars/.*pytorch/vision#7545"):
        load_task("cars", tmp_path)
    c = tmp_path / "stanford_cars"
    annos = lambda rows: np.array(rows, dtype=[("fname", object), ("class", object)])
    (c / "devkit").mkdir(parents=True)
    savemat(c / "devkit" / "cars_meta.mat", {"class_names": np.array(["AM General Hummer", "Audi R8"], dtype=object)})
    savemat(c / "devkit" / "cars_train_annos.mat",
            {"annotations": annos([("00001.jpg", 1), ("00002.jpg", 2), ("00003.jpg", 2)])})
    savemat(c / "cars_test_annos_withlabels.mat", {"annotations": annos([("00004.jpg", 2)])})
    for i in (1, 2, 3):
        jpeg(c / "cars_train" / f"0000{i}.jpg")
    jpeg(c / "cars_test" / "00004.jpg")
    [t] = load_task("cars", tmp_path, img_size=16)
    assert t.meta["classes"] == ["AM General Hummer", "Audi R8"] and t.test.labels.tolist() == [1]
    assert sorted(t.train.labels.tolist() + t.val.labels.tolist()) == [0, 1, 1]

# -----------------------------------------------------------------------------
# bad input: one DataError whose message says what and where


def test_bad_input_messages(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'cifar': choose one of synthetic, flowers102, pets"):
        load_task("cifar")
    with pytest.raises(DataError, match="unknown synthetic task 'birds': choose one of shape, texture"):
        load_task("synthetic:birds")
    with pytest.raises(DataError, match="shots must be a positive integer or 'all'"):
        load_task("synthetic", shots=0)
    with pytest.raises(DataError, match="pets reads from disk: give its root .*oxford-iiit-pet/"):
        load_task("pets")
    with pytest.raises(DataError, match=r"flowers102: .*nowhere/flowers-102/imagelabels\.mat not found\. Expected "
                                        r"under .*nowhere: flowers-102/\{jpg/.*\. Or pass download=True\."):
        load_task("flowers102", tmp_path / "nowhere")
    for c, n in (("cat", 4), ("dog", 2)):
        for i in range(n):
            jpeg(tmp_path / "f" / "train" / c / f"{i}.jpg")
        jpeg(tmp_path / "f" / "test" / c / "t.jpg")
    with pytest.raises(DataError, match=r"class 1 \(dog\) has 2 training images, fewer than shots=3"):
        load_task("imagefolder", tmp_path / "f", shots=3)
    cat = tmp_path / "f" / "train" / "cat"
    (cat / "0.jpg").write_bytes((cat / "1.jpg").read_bytes()[:60])
    with pytest.raises(DataError, match=r"cannot read image .*cat/0\.jpg"):  # truncated
        load_task("imagefolder", tmp_path / "f", img_size=16)


def test_memory_limit_and_test_subset(tmp_path, monkeypatch):
    for split, n in (("train", 3), ("test", 5)):
        for c in ("a", "b"):
            for i in range(n):
                jpeg(tmp_path / split / c / f"{i}.jpg")
    monkeypatch.setenv("NANOPETL_MAX_GB", "1e-6")  # 1 kB: nothing fits, every split streams
    [t] = load_task("imagefolder", tmp_path, img_size=16, workers=0)
    assert all(isinstance(s, data.Stream) for s in (t.train, t.val, t.test))
    [t] = load_task("imagefolder", tmp_path, img_size=16, workers=0, cache_gb=5.5e-6)  # val 2 x 768 B + train 4 x 972 B
    assert isinstance(t.val, data.Split) and isinstance(t.train, data.Split) and isinstance(t.test, data.Stream)
    for bad in ("lots", "0", "-2", "nan", ""):
        monkeypatch.setenv("NANOPETL_MAX_GB", bad)
        with pytest.raises(DataError, match=f"NANOPETL_MAX_GB='{bad}' is not a positive number"):
            load_task("imagefolder", tmp_path, img_size=16)
    monkeypatch.setenv("NANOPETL_MAX_GB", "inf")
    assert data.max_gb() == float("inf")
    monkeypatch.delenv("NANOPETL_MAX_GB")
    assert data.max_gb() == 8
    [t] = load_task("imagefolder", tmp_path, img_size=16, test_per_class=2)
    assert torch.bincount(t.test.labels).tolist() == [2, 2] and t.meta["test_per_class"] == 2


def test_download_failure_is_a_clear_message(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise RuntimeError("no network")
    monkeypatch.setattr(torchvision.datasets, "Flowers102", offline)  # never reaches the real download
    with pytest.raises(DataError, match=r"flowers102: torchvision's download into .* failed "
                                        r"\(RuntimeError: no network\); fetch it by hand and place flowers-102/"):
        load_task("flowers102", tmp_path, download=True)

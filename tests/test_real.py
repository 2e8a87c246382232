"""The real path, offline: tiny fixtures in each on-disk layout data.py reads, a small random ViT saved in each
checkpoint format (Google .npz, timm, torchvision), and fewshot.py / pvp_pretrain.py run through their command
lines on them. The runs must take the class count and normalisation from the data, not from the embedded world."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from timm.models.vision_transformer import VisionTransformer

import data
import fewshot
import pvp_pretrain
from fixtures import randomize, to_google_npz, to_torchvision

CLASSES = ("cat", "dog", "eel")


def jpeg(path, rng, size=(40, 50)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path


def write_layout(root, layout, rng):
    """A few JPEGs per class in one of data.py's layouts; returns (data name, extra flags)."""
    if layout == "imagefolder":
        for split, n in (("train", 6), ("test", 3)):
            for c in CLASSES:
                for i in range(n):
                    jpeg(root / split / c / f"{i}.jpg", rng)
        return "imagefolder", []
    if layout == "noah-fewshot":
        lists = {"train_meta.list.num_shot_2.seed_0": 2, "val_meta.list": 2, "test_meta.list": 3}
        for name, n in lists.items():
            rows = [f"{c}_{name[:4]}_{i}.jpg {k}" for k, c in enumerate(CLASSES) for i in range(n)]
            for row in rows:
                jpeg(root / "images" / row.split()[0], rng)
            (root / "annotations").mkdir(parents=True, exist_ok=True)
            (root / "annotations" / name).write_text("\n".join(rows) + "\n")
        return "noah-fewshot", []
    if layout == "vtab1k":
        for split, n in (("train800", 3), ("val200", 2), ("train800val200", 5), ("test", 3)):
            rows = [f"images/{split}/{k}_{i}.jpg {k}" for k in range(4) for i in range(n)]  # kitti: 4 classes
            for row in rows:
                jpeg(root / "kitti" / row.split()[0], rng)
            (root / "kitti" / f"{split}.txt").write_text("\n".join(rows) + "\n")
        return "vtab1k", ["--vtab-task", "kitti", "--shots", "all"]
    if layout == "fgvc-json":  # class ids 10, 20, 30 become 0, 1, 2
        for split, n in (("train", 4), ("val", 2), ("test", 3)):
            m = {f"images/{c}/{split}{i}.jpg": 10 * (k + 1) for k, c in enumerate(CLASSES) for i in range(n)}
            for rel in m:
                jpeg(root / rel, rng)
            (root / f"{split}.json").write_text(json.dumps(m))
        return "fgvc-json", []
    if layout == "flowers102":  # torchvision's layout: .mat labels 1..C, image ids 1..N, and the split ids
        from scipy.io import savemat
        base, labels = root / "flowers-102", [1 + i % 3 for i in range(18)]
        for i in range(1, 19):
            jpeg(base / "jpg" / f"image_{i:05d}.jpg", rng)
        savemat(base / "imagelabels.mat", {"labels": np.array([labels])})
        savemat(base / "setid.mat", {"trnid": np.array([list(range(1, 10))]), "valid": np.array([[10, 11, 12]]),
                                     "tstid": np.array([list(range(13, 19))])})
        return "flowers102", []
    raise ValueError(layout)


def write_weights(path, fmt, seed=0):
    """A random vit_synthetic-shaped ViT saved the way Google, timm or torchvision ship weights."""
    torch.manual_seed(seed)
    ref = randomize(VisionTransformer(img_size=32, patch_size=8, embed_dim=128, depth=6, num_heads=4, num_classes=0),
                    std=0.02)
    sd = ref.state_dict()
    if fmt == "npz":
        to_google_npz(sd, path, heads=4)
    else:
        torch.save(sd if fmt == "timm" else to_torchvision(sd), path)
    return path


@pytest.mark.parametrize("layout, fmt", [("imagefolder", "npz"), ("noah-fewshot", "timm"), ("vtab1k", "torchvision"),
                                         ("fgvc-json", "npz"), ("flowers102", "timm")])
def test_fewshot_cli_on_each_layout_and_checkpoint_format(tmp_path, layout, fmt):
    rng = np.random.default_rng(0)
    name, extra = write_layout(tmp_path / "data", layout, rng)
    weights = write_weights(tmp_path / f"vit.{'npz' if fmt == 'npz' else 'pth'}", fmt)
    argv = ["--weights", str(weights), "--arch", "vit_synthetic", "--data", name, "--data-root", str(tmp_path / "data"),
            "--method", "linear,vpt,lora", "--seeds", "0", "--epochs", "2", "--out", str(tmp_path / "out"), *extra]
    if "--shots" not in argv:
        argv += ["--shots", "2"]
    assert fewshot.main(argv) == 0
    records = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    classes = 4 if layout == "vtab1k" else 3
    assert [r["method"] for r in records] == ["linear", "vpt", "lora"]
    for r in records:
        assert r["status"] == "ok" and r["num_classes"] == classes and r["dataset"].startswith(name)
        assert tuple(r["mean"]) == data.NORMS["imagenet"][0]  # real data: ImageNet statistics, not the world's 0.5
        assert r["sizes"]["train"] == (20 if layout == "vtab1k" else 2 * classes)  # vtab: train800val200, all of it
        assert r["sizes"]["test"] == (6 if layout == "flowers102" else 3 * classes)


def test_resolution_follows_the_flag_and_the_checkpoint_is_resampled(tmp_path):
    rng = np.random.default_rng(1)
    name, _ = write_layout(tmp_path / "data", "imagefolder", rng)
    weights = write_weights(tmp_path / "vit.npz", "npz")
    argv = ["--weights", str(weights), "--arch", "vit_synthetic", "--img-size", "48", "--data", name, "--data-root",
            str(tmp_path / "data"), "--method", "vpt", "--shots", "1", "--seeds", "0", "--epochs", "1", "--out",
            str(tmp_path / "out")]
    assert fewshot.main(argv) == 0
    [r] = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert r["status"] == "ok" and r["protocol"]["img_size"] == 48
    [task] = data.load_task(name, tmp_path / "data", shots=1, img_size=48)
    assert task.test.images.shape[-2:] == (48, 48)


def test_pvp_pretrain_on_a_folder_source_then_fewshot_from_it(tmp_path):
    rng = np.random.default_rng(2)
    write_layout(tmp_path / "source", "imagefolder", rng)
    name, _ = write_layout(tmp_path / "target", "fgvc-json", rng)
    weights = write_weights(tmp_path / "vit.pth", "timm")
    ckpt = tmp_path / "pvp.safetensors"
    assert pvp_pretrain.main(["--weights", str(weights), "--arch", "vit_synthetic", "--data", "imagefolder",
                              "--data-root", str(tmp_path / "source"), "--epochs", "1", "--batch", "8",
                              "--out", str(ckpt)]) == 0
    argv = ["--weights", str(weights), "--arch", "vit_synthetic", "--pvp-init", str(ckpt), "--data", name,
            "--data-root", str(tmp_path / "target"), "--method", "pvp", "--shots", "2", "--seeds", "0",
            "--epochs", "1", "--out", str(tmp_path / "out")]
    assert fewshot.main(argv) == 0
    [r] = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert r["status"] == "ok" and r["num_classes"] == 3


def test_vtab_grid_searches_on_train800_and_runs_the_choice_on_train800val200(tmp_path, monkeypatch):
    name, extra = write_layout(tmp_path / "data", "vtab1k", np.random.default_rng(3))
    weights = write_weights(tmp_path / "vit.npz", "npz")
    seen, real = [], fewshot.search
    monkeypatch.setattr(fewshot, "search", lambda m, task, *a: seen.append(len(task.train)) or real(m, task, *a))
    argv = ["--weights", str(weights), "--arch", "vit_synthetic", "--data", name, "--data-root", str(tmp_path / "data"),
            "--method", "linear", "--seeds", "0", "--epochs", "1", "--grid", "--grid-lr", "0.1,0.01", "--grid-wd", "0",
            "--out", str(tmp_path / "out"), *extra]
    assert fewshot.main(argv) == 0
    [r] = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert seen == [12] and r["sizes"]["train"] == 20  # search: train800 (3 x 4); final: train800val200 (5 x 4)
    assert len(r["grid"]) == 2 and r["chosen"]["lr"] in (0.1, 0.01) and r["status"] == "ok"

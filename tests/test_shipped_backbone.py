"""The embedded backbone shipped in assets/: it loads into vit_synthetic, its weights have the hash its header
records, the header tells how it was made (the command, the recipe, the source accuracy), and that command still
runs, at a micro scale, through the command line."""
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import plumbing
import vit

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import build_backbone  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def test_shipped_backbone_loads_and_has_its_recorded_hash():
    meta = plumbing.header(plumbing.SHIPPED_BACKBONE)
    model = vit.load_pretrained(vit.vit_synthetic(num_classes=0), plumbing.SHIPPED_BACKBONE, verbose=False)
    assert meta["preset"] == "vit_synthetic" and len(meta["weights_hash"]) == 16
    assert plumbing.weights_hash(model) == meta["weights_hash"]
    assert plumbing.weights_hash(plumbing.load_backbone(None)[0]) == meta["weights_hash"]  # what plumbing.py uses
    tensors = load_file(plumbing.SHIPPED_BACKBONE)  # the whole model, its 384-class source head too
    assert tensors["head.weight"].shape == (384, 128) and all(v.dtype == torch.float32 for v in tensors.values())


def test_shipped_header_holds_the_command_recipe_and_accuracy():
    meta = plumbing.header(plumbing.SHIPPED_BACKBONE)
    assert meta["command"] == build_backbone.command(build_backbone.parse(shlex.split(meta["command"])[2:]))
    args = build_backbone.parse(shlex.split(meta["command"])[2:])  # the command spells out every recipe value ...
    assert {k: getattr(args, k) for k in build_backbone.RECIPE} == meta["recipe"]
    defaults = build_backbone.parse([])  # ... and they are today's defaults: the command alone rebuilds it
    assert {k: getattr(defaults, k) for k in build_backbone.RECIPE} == meta["recipe"]
    assert meta["source"]["source"] == "backbone" and meta["source"]["per_class"] == meta["recipe"]["per_class"]
    assert 0 < meta["source_top1"] <= 100 and meta["epochs"] == meta["recipe"]["epochs"]


def test_a_damaged_shipped_backbone_is_refused(tmp_path, monkeypatch):
    tensors = load_file(plumbing.SHIPPED_BACKBONE)
    tensors["blocks.0.norm1.bias"][0] += 1.0
    meta = json.dumps(plumbing.header(plumbing.SHIPPED_BACKBONE))
    save_file(tensors, tmp_path / "vit_synthetic.safetensors", metadata={"nanopetl": meta})
    monkeypatch.setattr(plumbing, "SHIPPED_BACKBONE", tmp_path / "vit_synthetic.safetensors")
    with pytest.raises(vit.CheckpointError, match="header records"):
        plumbing.load_backbone(None)


def test_the_build_command_runs_at_micro_scale(tmp_path):
    out = tmp_path / "bb.safetensors"
    flags = ["--per-class", "2", "--epochs", "1", "--batch", "64", "--lr", "0.002", "--seed", "3"]
    r = subprocess.run([sys.executable, "tools/build_backbone.py", *flags, "--out", str(out)], cwd=ROOT,
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"wrote {out}" in r.stdout and list(tmp_path.iterdir()) == [out]  # no resume file left behind
    meta = plumbing.header(out)
    model = vit.load_pretrained(vit.vit_synthetic(num_classes=0), out, verbose=False)
    assert meta["weights_hash"] == plumbing.weights_hash(model) != plumbing.header(
        plumbing.SHIPPED_BACKBONE)["weights_hash"]
    assert meta["recipe"] | dict(per_class=2, epochs=1, batch=64, lr=0.002, seed=3) == meta["recipe"]
    assert meta["command"].startswith("python tools/build_backbone.py --per-class 2 --epochs 1 --lr 0.002 ")
    assert meta["source"]["per_class"] == 2 and 0 <= meta["source_top1"] <= 100


def test_the_prompt_cosine_script_runs_on_it(tmp_path):
    """tests/bench_prompt_cosine.py (PVP's mechanism, README) on the shipped backbone, with a micro PVP module: with 0
    random prompts VPT is the plain ViT, so its cosine to the unprompted feature must print as 1.000."""
    module = tmp_path / "pvp.safetensors"
    r = subprocess.run([sys.executable, "pvp_pretrain.py", "--weights", str(plumbing.SHIPPED_BACKBONE), "--arch",
                        "vit_synthetic", "--per-class", "1", "--epochs", "1", "--out", str(module)], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "tests/bench_prompt_cosine.py", "--tasks", "shape", "--seeds", "0",
                        "--prompts", "0", "--pvp-init", str(module)], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    [row] = [line for line in r.stdout.splitlines() if line.startswith("| shape |")]
    cells = row.split("|")
    assert cells[3].strip().startswith("1.000 ") and -1 <= float(cells[4].split()[0]) <= 1


def test_the_shipped_backbone_hash_is_pinned_in_the_code(tmp_path, monkeypatch):
    """A replacement of the shipped file is refused whatever its header says: without a header, or with its own
    hash in it (a rebuilt or foreign backbone put in assets/), it must be restored with git checkout."""
    torch.manual_seed(5)
    pinned = plumbing.PINNED[ROOT / "assets" / "vit_synthetic.safetensors"]
    assert pinned == plumbing.header(ROOT / "assets" / "vit_synthetic.safetensors")["weights_hash"]
    other = {k: v.contiguous() for k, v in vit.vit_synthetic(num_classes=0).state_dict().items()}
    model = vit.load_pretrained(vit.vit_synthetic(num_classes=0), other, verbose=False)
    for name, meta in (("bare", None), ("own-hash", {"nanopetl": json.dumps({"weights_hash": plumbing.weights_hash(
            model)})})):
        path = tmp_path / f"{name}.safetensors"
        save_file(other, path, metadata=meta)
        monkeypatch.setattr(plumbing, "SHIPPED_BACKBONE", path)
        monkeypatch.setattr(plumbing, "PINNED", {path.resolve(): pinned})
        with pytest.raises(vit.CheckpointError, match=r"git checkout assets/vit_synthetic.safetensors"):
            plumbing.load_backbone(None)

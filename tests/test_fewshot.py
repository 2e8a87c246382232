"""fewshot.py and pvp_pretrain.py end to end on a micro world: a random vit_synthetic backbone saved to disk,
one embedded task, one shot, one seed, one epoch, so each run takes a second or two."""
import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import data
import fewshot
import plumbing
import pvp_pretrain
import vit
from fixtures import randomize, save_backbone

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A backbone file and a PVP module checkpoint pre-trained on it (2 images per source class, 1 epoch)."""
    d = tmp_path_factory.mktemp("world")
    bb = save_backbone(d / "backbone.safetensors", seed=0)
    ckpt = d / "pvp.safetensors"
    assert pvp_pretrain.main(["--weights", str(bb), "--arch", "vit_synthetic", "--per-class", "2", "--epochs", "1",
                              "--out", str(ckpt)]) == 0
    return dict(dir=d, backbone=bb, pvp=ckpt)


def args(world, out, *extra):
    return ["--weights", str(world["backbone"]), "--arch", "vit_synthetic", "--pvp-init", str(world["pvp"]),
            "--data", "synthetic:shape", "--shots", "1", "--seeds", "0", "--epochs", "2", "--out", str(out), *extra]


def lines(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def cli(script, *argv):
    return subprocess.run([sys.executable, script, *argv], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300)


def test_every_method_writes_a_results_line_summary_and_plot(world, tmp_path):
    assert fewshot.main(args(world, tmp_path, "--method", "all", "--plot")) == 0
    records = lines(tmp_path)
    assert [r["method"] for r in records] == list(fewshot.METHODS)
    for r in records:
        assert r["status"] == "ok" and 0 <= r["test_top1"] <= 100 and 0 <= r["val_top1"] <= 100, r
        assert r["shots"] == 1 and r["seed"] == 0 and r["dataset"] == "synthetic:shape" and r["num_classes"] == 16
        assert r["sizes"]["train"] == 16 and r["sizes"]["test"] > 0 and r["protocol"]["lr"] == 5e-3
        assert r["trainable"] > 0 and r["seconds"] > 0
    trainable = {r["method"]: r["trainable"] for r in records}
    assert trainable["linear"] == 128 * 16 + 16  # the head alone
    assert trainable["full"] == records[0]["backbone_params"] + trainable["linear"]
    assert trainable["pvp"] == trainable["vpt"]  # a VPT-deep module of the same size, re-headed
    summary = (tmp_path / "summary.md").read_text()
    assert all(f"| {m} | 1 |" in summary for m in fewshot.METHODS if m != "pvp") and "| pvp(vpt) | 1 |" in summary
    assert (tmp_path / "accuracy_vs_shots.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_skips_finished_runs(world, tmp_path, monkeypatch):
    assert fewshot.main(args(world, tmp_path, "--method", "linear,vpt")) == 0
    monkeypatch.setattr(fewshot, "run_one", lambda *a, **k: pytest.fail("a finished run was run again"))
    assert fewshot.main(args(world, tmp_path, "--method", "linear,vpt")) == 0
    assert len(lines(tmp_path)) == 2
    monkeypatch.undo()
    assert fewshot.main(args(world, tmp_path, "--method", "linear", "--lr", "1e-3")) == 0  # a new protocol runs anew
    assert len(lines(tmp_path)) == 3


def test_ctrl_c_keeps_finished_runs(world, tmp_path, monkeypatch):
    real, calls = fewshot.run_one, []

    def interrupt_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(fewshot, "run_one", interrupt_second)
    assert fewshot.main(args(world, tmp_path, "--method", "linear,vpt,lora")) == 130
    assert [r["method"] for r in lines(tmp_path)] == ["linear"]


def test_nan_loss_fails_that_run_and_the_sweep_goes_on(world, tmp_path, monkeypatch):
    class Exploding(fewshot.LinearProbe):  # a probe whose logits turn NaN at the second step
        steps = 0

        def forward(self, images):
            Exploding.steps += self.training
            return super().forward(images) * (float("nan") if self.training and Exploding.steps > 1 else 1.0)

    monkeypatch.setitem(fewshot.METHODS, "exploding", Exploding)
    assert fewshot.main(args(world, tmp_path, "--method", "exploding,linear")) == 0
    records = lines(tmp_path)
    assert [(r["method"], r["status"]) for r in records] == [("exploding", "failed"), ("linear", "ok")]
    assert "the loss became nan at step 1" in records[0]["error"] and "lower the learning rate" in records[0]["error"]


def test_head_init_prototype_is_a_nearest_class_mean_classifier(world):
    [task] = data.load_task("synthetic:shape", shots=1, seed=0)
    model = fewshot.LinearProbe(vit.load_pretrained(vit.vit_synthetic(num_classes=0), world["backbone"], verbose=False),
                                num_classes=task.num_classes)
    fewshot.init_head(model, task.train, task, torch.device("cpu"), "prototype")
    with torch.no_grad():
        feats = torch.nn.functional.normalize(
            model.features(data.normalize(task.train.images, task.mean, task.std)), dim=-1)
        torch.testing.assert_close(model.head.weight[task.train.labels], feats)  # 1 shot: the mean is the image
        assert model.head.bias.abs().max() == 0 and torch.allclose(model.head.weight.norm(dim=-1), torch.ones(16))
    assert fewshot.evaluate(model, task.train, task, torch.device("cpu")) == 100.0  # each image nearest its own class
    fewshot.init_head(model, task.train, task, torch.device("cpu"), "zero")
    assert model.head.weight.abs().max() == 0


class BiasOnly(nn.Module):
    """A course-assignment method defined outside the method files: BitFit-style, only the backbone's biases train."""
    name = "bias"

    def __init__(self, backbone, *, num_classes):
        super().__init__()
        self.vit, self.config = backbone.requires_grad_(False).eval(), {}
        for n, p in self.vit.named_parameters():
            p.requires_grad_(n.endswith(".bias"))
        self.head = nn.Linear(backbone.dim, num_classes)

    def features(self, images):
        return self.vit.features(images)

    def forward(self, images):
        return self.head(self.features(images))


def test_a_new_method_is_one_registry_line(world, tmp_path, monkeypatch):
    monkeypatch.setitem(fewshot.METHODS, "bias", BiasOnly)
    assert fewshot.main(args(world, tmp_path, "--method", "bias")) == 0
    [r] = lines(tmp_path)
    biases = sum(p.numel() for n, p in vit.vit_synthetic(num_classes=0).named_parameters() if n.endswith(".bias"))
    assert r["status"] == "ok" and r["trainable"] == biases + 128 * 16 + 16


def test_pvp_checkpoint_from_another_backbone_is_refused(world, tmp_path):
    other = save_backbone(tmp_path / "other.safetensors", seed=1)
    a = args(world, tmp_path / "out", "--method", "pvp")
    a[a.index(str(world["backbone"]))] = str(other)
    r = cli("fewshot.py", *a)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "pre-trained on backbone" in r.stderr and "pvp_pretrain.py --weights" in r.stderr


@pytest.mark.parametrize("argv, needle", [
    (["--data", "nosuch"], "unknown dataset 'nosuch'"),
    (["--data", "vtab1k"], "give its root (--data-root)"),
    (["--data", "imagefolder", "--data-root", "/nonexistent/folder"], "/nonexistent/folder"),
    (["--method", "prompt-magic"], "unknown method prompt-magic"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--weights", "/nonexistent/weights.npz"], "no checkpoint file at /nonexistent/weights.npz"),
])
def test_bad_arguments_give_one_clear_message(world, tmp_path, argv, needle):
    a = args(world, tmp_path, "--method", "linear")
    for flag, value in zip(argv[::2], argv[1::2]):
        if flag in a:
            a[a.index(flag) + 1] = value
        else:
            a += [flag, value]
    r = cli("fewshot.py", *a)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert needle in r.stderr, r.stderr


def test_module_checkpoint_is_safetensors_with_its_story(world):
    meta = json.loads(__import__("safetensors").safe_open(world["pvp"], "pt").metadata()["nanopetl"])
    assert meta["method"] == "vpt" and meta["config"]["deep"] is True and meta["source"] == "synthetic"
    assert meta["backbone_hash"] == plumbing.weights_hash(
        vit.load_pretrained(vit.vit_synthetic(num_classes=0), world["backbone"], verbose=False))
    assert 0 <= meta["source_top1"] <= 100 and meta["epochs"] == 1
    assert set(load_file(world["pvp"])) == {"prompts"}  # the module only: no source head, no backbone


def test_weights_hash_tracks_backbone_not_head():
    a = randomize(vit.vit_synthetic(num_classes=3), std=0.1)
    b = randomize(vit.vit_synthetic(num_classes=5), std=0.1)
    with torch.no_grad():
        b.head.weight.zero_()
    same = {k: v for k, v in a.state_dict().items() if not k.startswith("head.")}
    b.load_state_dict({**same, "head.weight": b.head.weight, "head.bias": b.head.bias})
    assert plumbing.weights_hash(a) == plumbing.weights_hash(b)
    with torch.no_grad():
        b.blocks[0].norm1.bias.add_(1e-3)
    assert plumbing.weights_hash(a) != plumbing.weights_hash(b)


def test_embedded_backbone_and_pvp_are_built_once_then_reused(tmp_path, monkeypatch):
    """The main job's path with no --weights and no --pvp-init, at a micro budget: both pieces are built, cached,
    and the next run reuses them."""
    monkeypatch.setattr(plumbing, "CHECKPOINTS", tmp_path / "checkpoints")
    monkeypatch.setattr(plumbing, "SHIPPED_BACKBONE", tmp_path / "not-shipped.safetensors")
    monkeypatch.setattr(plumbing, "EMBEDDED_BUILD", ["--per-class", "2", "--epochs", "1", "--device", "cpu"])
    argv = ["--method", "pvp", "--shots", "1", "--seeds", "0", "--data", "synthetic:shape", "--epochs", "1",
            "--out", str(tmp_path / "out")]
    assert fewshot.main(argv) == 0
    built = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert built == ["pvp_vpt_vit_synthetic.safetensors", "vit_synthetic.safetensors"]
    [r] = lines(tmp_path / "out")
    assert r["status"] == "ok" and r["backbone"] == "vit_synthetic" and r["protocol"]["max_steps"] == 100
    monkeypatch.setattr(plumbing, "pretrain_once", lambda *a, **k: pytest.fail("a cached piece was built again"))
    assert fewshot.main([*argv[:-1], str(tmp_path / "again")]) == 0


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not installed")
def test_torchrun_sweep_shards_runs_and_rank0_writes_the_table(world, tmp_path):
    single, ranks = tmp_path / "single", tmp_path / "ranks"
    sweep = lambda out: args(world, out, "--method", "linear,vpt", "--seeds", "0,1")
    r = subprocess.Popen(["torchrun", "--nproc_per_node=2", "--standalone", "fewshot.py", *sweep(ranks)],
                         cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert fewshot.main(sweep(single)) == 0  # in this process, while the ranks run
    r.stdout, r.stderr = r.communicate(timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    keys = [rec["key"] for rec in lines(ranks)]
    assert len(keys) == len(set(keys)) == 4  # 2 methods x 2 seeds, each run once, on one rank or the other
    assert set(keys) == {rec["key"] for rec in lines(single)}
    rows = [row for row in (ranks / "summary.md").read_text().splitlines() if row.startswith("| vpt |")]
    assert r.stdout.count("saved: ") == 1 and len(rows) == 1 and "| 2 x 1 |" in rows[0]  # both seeds in its row
    by_key = {rec["key"]: rec for rec in lines(single)}
    assert all(rec["test_top1"] == by_key[rec["key"]]["test_top1"] for rec in lines(ranks))  # same numbers either way


class PixelProbe(nn.Module):
    """A linear classifier on 4x4-pooled pixels: colour classes are learnable from it, so lr matters on val."""
    name = "pixels"

    def __init__(self, backbone, *, num_classes):
        super().__init__()
        self.vit, self.config = backbone.requires_grad_(False), {}
        self.head = nn.Linear(48, num_classes)

    def features(self, images):
        return torch.nn.functional.adaptive_avg_pool2d(images, 4).flatten(1)  # (B, 3*4*4)

    def forward(self, images):
        return self.head(self.features(images))


def test_grid_picks_the_lr_that_wins_on_val_and_records_it(world, tmp_path, monkeypatch):
    monkeypatch.setitem(fewshot.METHODS, "pixels", PixelProbe)
    a = args(world, tmp_path, "--method", "pixels", "--shots", "4", "--seeds", "0,1", "--epochs", "20",
             "--grid", "--grid-lr", "1e-9,5e-2", "--grid-wd", "0,0.1")
    a[a.index("synthetic:shape")] = "synthetic:colour"
    assert fewshot.main(a) == 0
    records = lines(tmp_path)
    assert len(records) == 2 and all(r["status"] == "ok" for r in records)
    grid = records[0]["grid"]
    assert [g[:2] for g in grid] == [[1e-9, 0.0], [1e-9, 0.1], [5e-2, 0.0], [5e-2, 0.1]]
    assert min(g[2] for g in grid[2:]) > max(g[2] for g in grid[:2]) + 10  # lr 1e-9 leaves the zero head untrained
    best = max(grid, key=lambda g: (g[2], -g[0]))
    assert best[0] == 5e-2 and records[0]["chosen"] == dict(lr=best[0], wd=best[1]) == records[1]["chosen"]
    assert all("test_top1" in r for r in records) and records[0]["protocol"]["grid"] is True


def test_training_counts_its_own_steps_with_progress_bars_disabled(monkeypatch):
    """The step (lr schedule, max-steps stop) once came from the tqdm bar, which stays at 0 under TQDM_DISABLE=1."""
    torch.manual_seed(0)
    backbone = vit.vit_synthetic(num_classes=0)
    [task] = data.load_task("synthetic:shape", shots=1, seed=0)
    cfg = fewshot.parse(["--weights", "x", "--max-steps", "20", "--method", "vpt"])
    seen = []
    real = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step",
                        lambda self, *a: (seen.append(self.param_groups[0]["lr"]), real(self, *a))[1])
    shown, _ = fewshot.fit("vpt", task, backbone, cfg, torch.device("cpu"), seed=0)
    monkeypatch.setattr(fewshot, "tqdm", functools.partial(fewshot.tqdm, disable=True))  # as TQDM_DISABLE=1 does
    hidden, _ = fewshot.fit("vpt", task, backbone, cfg, torch.device("cpu"), seed=0)
    assert len(seen) == 40 and seen[:20] == seen[20:] and seen[0] < seen[1]  # 20 steps each, the same warmup + cosine
    torch.testing.assert_close(hidden.prompts, shown.prompts, atol=0, rtol=0)


def test_a_run_claimed_by_another_sweep_is_skipped_and_reported(world, tmp_path, capsys):
    assert fewshot.main(args(world, tmp_path, "--method", "linear,vpt")) == 0
    first = lines(tmp_path)
    (tmp_path / "results.jsonl").unlink()
    held = plumbing.claim(tmp_path, first[0]["key"])  # as another sweep on this --out training that run would
    assert held is not None and plumbing.claim(tmp_path, first[0]["key"]) is None
    capsys.readouterr()
    assert fewshot.main(args(world, tmp_path, "--method", "linear,vpt")) == 0
    assert [r["method"] for r in lines(tmp_path)] == ["vpt"]
    assert "1 runs are not in" in capsys.readouterr().err
    held.close()  # the other sweep ends: the claim is free again
    assert fewshot.main(args(world, tmp_path, "--method", "linear,vpt")) == 0
    assert sorted(r["method"] for r in lines(tmp_path)) == ["linear", "vpt"]

"""The streaming data path: data.Stream read by DataLoader workers gives the images and labels the
in-memory path gives; the ranks' shards are disjoint and cover a split; pre-training killed mid-epoch and resumed
ends with the module weights of an uninterrupted run (one process, and two ranks under torchrun); a sweep split over
--shard jobs runs every planned run once; the bar warns when the loader sets the pace. Micro sizes throughout."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import data
import fewshot
import plumbing
import pvp_pretrain
import vit

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
CPU = torch.device("cpu")


def photo(rng, h, w):  # smooth colour blobs with noise: a JPEG that compresses like a photo
    smooth = np.kron(rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3)), np.ones((8, 8, 1)))[:h, :w]
    return (smooth + rng.normal(0, 12, smooth.shape)).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An imagefolder with every kind of file decode() sorts: RGB, grey, EXIF-rotated and CMYK JPEGs, a PNG with
    transparency, a 16-bit PNG, a palette GIF, at odd sizes."""
    root, rng = tmp_path_factory.mktemp("stream"), np.random.default_rng(0)
    for split, n in (("train", 4), ("test", 2)):
        for c, name in enumerate(("ant", "bee")):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(photo(rng, 30 + 3 * i, 41 + 5 * c)).save(d / f"rgb{i}.jpg", quality=90)
            Image.fromarray(photo(rng, 33, 29)[..., 0]).save(d / "grey.jpg")
            rotated = Image.fromarray(photo(rng, 24, 40))
            exif = rotated.getexif()
            exif[0x0112] = 6  # stored sideways: read upright
            rotated.save(d / "exif.jpg", exif=exif.tobytes())
            Image.fromarray(photo(rng, 28, 28)).convert("CMYK").save(d / "cmyk.jpg")
            Image.fromarray(np.dstack([photo(rng, 20, 26), rng.integers(0, 256, (20, 26, 1), dtype=np.uint8)])
                            ).save(d / "alpha.png")
            Image.fromarray(rng.integers(0, 65535, (22, 22), dtype=np.uint16)).save(d / "deep.png")
            Image.fromarray(photo(rng, 25, 31)).convert("P").save(d / "palette.gif")
    return root


def stop_workers(task):
    """Shut a task's loader workers down now. A Stream and its persistent DataLoader refer to each other, so left to
    the cycle collector their queues are finalised first and torch then waits its 5 s timeout for each worker, in
    whichever later test the collector happens to run; dropped here, the loader goes at once, its workers with it."""
    for split in (task.train, task.val, task.test):
        if isinstance(split, data.Stream):
            split._loaders.clear()


def all_batches(split, task, train, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    return [(x.clone(), y.clone()) for x, y in fewshot.batches(split, task, CPU, 5, train=train, generator=g, **kw)]


def test_decode_keeps_read_image_pixels(folder):
    """torchvision.io's JPEG decode and PIL's read_image agree exactly; the rest is read_image itself."""
    files = sorted(folder.rglob("*.*"))
    assert {f.suffix for f in files} == {".jpg", ".png", ".gif"}
    for f in files:
        want = torch.from_numpy(np.array(data.read_image(f))).permute(2, 0, 1)
        assert torch.equal(data.decode(f), want), f


@pytest.mark.parametrize("workers", [0, 1])
def test_stream_gives_the_images_and_labels_of_the_in_memory_path(folder, workers):
    [kept] = data.load_task("imagefolder", folder, shots=2, seed=0, img_size=16)
    [streamed] = data.load_task("imagefolder", folder, shots=2, seed=0, img_size=16, cache_gb=0, workers=workers)
    assert isinstance(kept.test, data.Split) and isinstance(streamed.test, data.Stream)
    assert kept.meta["fingerprint"] == streamed.meta["fingerprint"]
    for s in ("train", "val", "test"):
        a, b = getattr(kept, s), getattr(streamed, s)
        assert torch.equal(a.labels, b.labels) and len(a) == len(b)
        assert torch.equal(a.images, torch.stack([b[i][0] for i in range(len(b))]))  # pixel-exact, item by item
        for train in (False, True):  # and as batches: the same order, crops and flips from the same generator
            for (x, y), (u, v) in zip(all_batches(a, kept, train), all_batches(b, streamed, train), strict=True):
                assert torch.equal(x, u) and torch.equal(y, v)
    stop_workers(streamed)


def test_a_stream_resumed_mid_epoch_reads_only_what_is_left(folder):
    [task] = data.load_task("imagefolder", folder, img_size=16, cache_gb=0, workers=0)
    whole = all_batches(task.train, task, True, seed=3)
    g = torch.Generator().manual_seed(3)
    it = fewshot.batches(task.train, task, CPU, 5, train=True, generator=g)
    next(it), next(it)
    state, read = g.get_state(), []
    real = data.decode
    try:
        data.decode = lambda p: read.append(p) or real(p)
        rest = all_batches(task.train, task, True, seed=3, skip=2, state=state)
    finally:
        data.decode = real
    assert len(rest) == len(whole) - 2 and all(torch.equal(a[0], b[0]) for a, b in zip(rest, whole[2:]))
    assert len(read) == len(task.train) - 10  # the two skipped batches were never decoded


@pytest.mark.parametrize("n,world", [(11, 2), (12, 3), (2, 3)])
def test_rank_shards_are_disjoint_cover_the_split_and_are_equally_long(n, world):
    split = data.Split(torch.zeros(n, 3, 4, 4, dtype=torch.uint8), torch.arange(n))  # label = index
    task = data.Task("t", n, split, split, split, 4, (0.5,) * 3, (0.5,) * 3, "none")
    shards = [torch.cat([y for _, y in all_batches(split, task, True, rank=r, world=world)]).tolist()
              for r in range(world)]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == -(-n // world)
    seen = sum(shards, [])
    assert set(seen) == set(range(n)) and len(seen) - n == -n % world  # every image; repeats only the padding
    assert all(len(set(s)) == len(s) for s in shards)


def test_a_bad_image_in_a_stream_is_one_error_naming_it(folder, tmp_path):
    shutil.copytree(folder, tmp_path / "f")
    bad = tmp_path / "f" / "test" / "bee" / "rgb1.jpg"
    bad.write_bytes(bad.read_bytes()[:80])
    [task] = data.load_task("imagefolder", tmp_path / "f", img_size=16, cache_gb=0, workers=1)
    with pytest.raises(data.DataError) as e:
        fewshot.evaluate(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(2)), task.test, task, CPU)
    said = str(e.value)
    del e  # its traceback holds the loader (a local of the reading generator): let it go, then stop the workers
    stop_workers(task)
    assert said.startswith(f"cannot read image {bad}") and "\n" not in said


def test_the_bar_warns_when_the_loader_sets_the_pace(folder, monkeypatch, capsys):
    [task] = data.load_task("imagefolder", folder, img_size=16, cache_gb=0, workers=0)
    real = data.decode
    monkeypatch.setattr(data, "decode", lambda p: __import__("time").sleep(0.02) or real(p))
    monkeypatch.setattr(data, "WAIT_WINDOW", 3)
    cfg = fewshot.Config(batch=2, epochs=1, max_steps=4)
    fewshot.train(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 2)), task.train, task, cfg,
                  CPU, seed=0)
    out = capsys.readouterr().out
    assert out.count("warning: the loader is the bottleneck") == 1 and "0 loader workers" in out and "--workers" in out

# -----------------------------------------------------------------------------
# pre-training killed mid-epoch, then resumed: the weights of an uninterrupted run


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    path = tmp_path_factory.mktemp("bb") / "bb.safetensors"
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in vit.vit_synthetic(num_classes=0).state_dict().items()}, path)
    return path


# SIGKILL this process right after the second resume file it writes (a mid-epoch checkpoint with --save-every 2 and
# more than 4 steps per epoch): steps after it are lost, as in a real kill
KILL_AFTER_SECOND_SAVE = """
import os, signal, plumbing
real, saves = plumbing.atomic, []
def atomic(write, path):
    real(write, path)
    saves.extend([path] * str(path).endswith('.resume'))
    if len(saves) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
plumbing.atomic = atomic
"""


def pretrain_argv(backbone, out, *extra):
    return ["--weights", str(backbone), "--arch", "vit_synthetic", "--per-class", "1", "--batch", "16", "--epochs", "2",
            "--save-every", "2", "--device", "cpu", "--out", str(out), *extra]


def start_pretrain(backbone, out, *extra, ranks=1, hook=None):
    """pvp_pretrain.py in a process of its own (ranks=1) or under torchrun, with `hook` run first in each."""
    run = ["torchrun", f"--nproc_per_node={ranks}", "--standalone", "--no-python"] if ranks > 1 else []
    argv = ["pvp_pretrain.py", *pretrain_argv(backbone, out, *extra)]
    script = [sys.executable, "-c", f"{hook or ''}\nimport runpy, sys\nsys.argv = {argv!r}\n"
              f"runpy.run_path({str(ROOT / 'pvp_pretrain.py')!r}, run_name='__main__')"]
    return subprocess.Popen(run + script, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc):
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def pretrain(backbone, out, *extra, ranks=1, hook=None):
    return finish(start_pretrain(backbone, out, *extra, ranks=ranks, hook=hook))


@pytest.mark.parametrize("ranks", [1, pytest.param(2, marks=pytest.mark.skipif(
    shutil.which("torchrun") is None, reason="torchrun is not installed"))])
def test_pretraining_killed_mid_epoch_resumes_to_the_same_weights(backbone, tmp_path, ranks, capsys):
    """192 source images, batch 16: 12 steps per epoch on one rank, 6 on each of two; a checkpoint every 2 steps;
    killed after the one at step 4, resumed there. One rank runs in this process but for the killed run. At 16 px
    (the backbone's positions resampled, as --img-size does): a resume is exact at any size, and 4 patches cost less."""
    whole, cut, px = tmp_path / "whole" / "m.safetensors", tmp_path / "cut.safetensors", ("--img-size", "16")
    killed = start_pretrain(backbone, cut, *px, ranks=ranks, hook=KILL_AFTER_SECOND_SAVE)  # beside the whole run
    if ranks == 1:
        assert pvp_pretrain.main(pretrain_argv(backbone, whole, *px)) == 0
    else:
        r = pretrain(backbone, whole, *px, ranks=ranks)
        assert r.returncode == 0 and r.stdout.count("wrote ") == 1, r.stderr[-2000:]  # only rank 0 writes
        assert list(whole.parent.iterdir()) == [whole]  # no resume, lock or temporary file left
    r = finish(killed)
    resume = Path(str(cut) + ".resume")
    assert r.returncode != 0 and resume.exists() and not cut.exists(), r.stderr[-2000:]
    position = torch.load(resume, weights_only=True)["position"]
    assert (position["epoch"], position["batch"], position["step"]) == (0, 4, 4)  # mid-epoch
    if ranks == 1:
        capsys.readouterr()
        assert pvp_pretrain.main(pretrain_argv(backbone, cut, *px, "--resume")) == 0
        out = capsys.readouterr().out
    else:
        r = pretrain(backbone, cut, *px, "--resume", ranks=ranks)
        assert r.returncode == 0, r.stderr[-2000:]
        out = r.stdout
    assert f"resuming {cut} at step 4 (epoch 1 of 2, 4 batches into it)" in out
    a, b = load_file(whole), load_file(cut)
    assert a.keys() == b.keys() == {"prompts"} and all(torch.equal(a[k], b[k]) for k in a)
    assert not resume.exists()

# -----------------------------------------------------------------------------
# a sweep split over independent jobs


def test_two_shards_run_every_planned_run_once_and_either_writes_the_whole_table(backbone, tmp_path):
    argv = lambda out, *extra: ["--weights", str(backbone), "--arch", "vit_synthetic", "--data", "synthetic:shape",
                                "--method", "linear,vpt", "--shots", "1", "--seeds", "0,1", "--epochs", "1", "--device",
                                "cpu", "--out", str(out), *extra]
    shards = [subprocess.Popen([sys.executable, "fewshot.py", *argv(tmp_path / "shards", "--shard", f"{i}/2")],
                               cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for i in range(2)]
    assert fewshot.main(argv(tmp_path / "single")) == 0
    ends = [p.communicate(timeout=300) for p in shards]
    assert all(p.returncode == 0 for p in shards), [e[-2000:] for _, e in ends]
    rows = lambda out: [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    keys = [r["key"] for r in rows(tmp_path / "shards")]
    assert len(keys) == len(set(keys)) == 4 and set(keys) == {r["key"] for r in rows(tmp_path / "single")}
    assert len(list((tmp_path / "shards" / ".claims").iterdir())) == 4  # each run claimed, as a plain sweep does
    table = lambda out: [line.rsplit("|", 2)[0] for line in (out / "summary.md").read_text().splitlines()]  # no s/run
    for i in range(2):  # either shard, run again once both are done: the full table, as one process writes it
        assert fewshot.main(argv(tmp_path / "shards", "--shard", f"{i}/2")) == 0
        assert table(tmp_path / "shards") == table(tmp_path / "single")
    assert len(rows(tmp_path / "shards")) == 4  # nothing ran twice


def test_a_shard_that_is_done_says_how_many_runs_are_missing(backbone, tmp_path, capsys):
    argv = ["--weights", str(backbone), "--arch", "vit_synthetic", "--data", "synthetic:shape", "--method", "linear",
            "--shots", "1", "--seeds", "0,1", "--epochs", "1", "--device", "cpu", "--out", str(tmp_path),
            "--shard", "1/2"]
    assert fewshot.main(argv) == 0
    assert [json.loads(line)["seed"] for line in (tmp_path / "results.jsonl").read_text().splitlines()] == [1]
    assert "1 of the 2 planned runs are not in" in capsys.readouterr().err


def test_pretrain_max_steps_and_img_size(backbone, tmp_path, monkeypatch):
    out, steps, sides = tmp_path / "m.safetensors", [], []
    real = fewshot.batches

    def batches(split, task, *a, **k):
        for x, y in real(split, task, *a, **k):
            sides.append(x.shape[-1])
            yield x, y
    monkeypatch.setattr(fewshot, "batches", batches)
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, real=torch.optim.AdamW.step: (
        steps.append(1), real(self, *a))[1])
    assert pvp_pretrain.main(pretrain_argv(backbone, out, "--max-steps", "3", "--img-size", "16")) == 0
    meta = json.loads(__import__("safetensors").safe_open(out, "pt").metadata()["nanopetl"])
    assert len(steps) == 3 and meta["max_steps"] == 3 and meta["recipe"]["img_size"] == 16 and set(sides) == {16}

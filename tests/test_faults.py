"""The fault matrix: every bad input and fault a user can cause, one row of CASES each.

A row is Case(name, setup, argv, code, says): setup(w) makes files in the row's own tmp folder, argv runs
fewshot.py (or pvp_pretrain.py) on a micro budget with a tiny random vit_synthetic backbone saved once, and then:
  - the exit status is `code`;
  - a failure prints exactly ONE line starting with "error:" on stderr (argparse's own "<prog>: error:" for a flag
    it cannot parse, exit 2), holding every string of `says` (what went wrong, where, what to do), and never a
    Python traceback; a success or an interrupt (0, 130) holds `says` somewhere in its output;
  - `then(w, result)`, where given, checks that nothing already finished was lost: the results.jsonl lines written
    before the fault are intact, and the same command run again skips them.
Rows marked cli, and every row with a hook (python run in the process before the script: an injected fault) or a
`during` (signals, a second sweep), spawn a real `python fewshot.py ...` process (memory capped at 8 GB), with
NANOPETL_CACHE in tmp, cwd in tmp, one thread. The other rows execute the same file as __main__ in this process
(runpy: the same argv parsing, the same error handling and exit status, without importing torch again), so the
file runs in about a minute on one thread. Most rows are refused by check() before any work.
Decisions written down here:
  - more shots than a class has: refused, naming the class and both counts (no silent "take them all"); the runs
    of smaller shots in the same sweep are done first and kept;
  - shots that leave no image of the training split for val (imagefolder, no val/): refused, naming the split;
  - --pvp-init without pvp in --method: a warning, the sweep runs (one flag set kept across sweeps is harmless);
  - a NaN loss: that run is recorded as failed with the message, the sweep goes on, exit 0; a re-run skips the
    failed record too (the run is deterministic): change --lr, which is a new protocol, to run it again;
  - a line torn by a failed write (a full disk): the sweep stops with one message; the re-run skips the torn line,
    runs that run again and appends it on a line of its own (plumbing.finished / append);
  - a results.jsonl that is not a plain file (e.g. a symlink to /dev/full): refused, as it cannot be read whole;
  - Ctrl-C: exit 130, finished runs kept; SIGKILL during pre-training: --resume goes on from the last epoch.
"""
import io
import json
import os
import re
import resource
import runpy
import signal
import subprocess
import sys
import time
import traceback
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from safetensors.torch import save_file

import fewshot
import plumbing
import pvp_pretrain
import vit
import vpt

ROOT = Path(__file__).resolve().parents[1]

# -----------------------------------------------------------------------------
# the world every row shares: backbones, a module checkpoint, and checkpoint files that must be refused


class Payload:
    """Unpickling this runs code (it touches a marker file): a loader that executes it has failed."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def save_backbone(path, seed, **shape):
    torch.manual_seed(seed)
    model = vit.ViT(**{**dict(img_size=32, patch_size=8, dim=128, depth=6, heads=4), **shape}, num_classes=0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return model


def cut(src, dst):  # the first half of a file, as an interrupted copy or download leaves it
    dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    return dst


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults")
    bb = save_backbone(d / "bb.safetensors", seed=0)
    save_backbone(d / "other.safetensors", seed=1)  # same shape, other weights
    save_backbone(d / "narrow.safetensors", seed=0, dim=64, heads=2)  # another ViT's shape
    module = vpt.VPT(bb, num_classes=3, num_prompts=10, deep=True)  # a PVP checkpoint made on bb (not trained)
    plumbing.save_module(module, d / "pvp.safetensors", dict(
        method="vpt", config=module.config, backbone="vit_synthetic:bb.safetensors",
        backbone_hash=plumbing.weights_hash(bb), source="none", source_classes=3, epochs=0, source_top1=0.0, seed=0))
    torch.save(bb.state_dict(), d / "bb.pth")
    np.savez(d / "bb.npz", **{k: v.numpy() for k, v in bb.state_dict().items()})
    cut(d / "bb.safetensors", d / "cut.safetensors"), cut(d / "bb.pth", d / "cut.pth"), cut(d / "bb.npz", d / "cut.npz")
    cut(d / "pvp.safetensors", d / "cut_pvp.safetensors")
    rng = np.random.default_rng(0)
    (d / "random.safetensors").write_bytes(rng.bytes(4096)), (d / "random.bin").write_bytes(rng.bytes(4096))
    torch.save(torch.zeros(3), d / "tensor.pth")  # plain tensors, but not a state dict
    torch.save({"model": bb.state_dict(), "config": Payload(d / "EXECUTED")}, d / "pickled.pth")
    torch.save(nn.Linear(2, 2), d / "module.pth")  # a whole nn.Module: needs pickle
    np.savez(d / "objects.npz", cls_token=np.array([{"a": 1}], dtype=object))
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    return dict(dir=d, bb=d / "bb.safetensors", other=d / "other.safetensors", pvp=d / "pvp.safetensors",
                jpeg=buf.getvalue())


@pytest.fixture
def w(world, tmp_path, monkeypatch):
    """What a row's argv, setup and checks see: the world's files, and tmp, out, data in the row's own folder."""
    return SimpleNamespace(**world, tmp=tmp_path, out=tmp_path / "out", data=tmp_path / "data", mp=monkeypatch,
                           ro=Path("/sys/nanopetl-faults") if os.geteuid() == 0 else tmp_path / "ro")

# -----------------------------------------------------------------------------
# data layouts on a few 8x8 JPEGs, and ways to break them

CLASSES = ("cat", "dog", "eel")


def jpeg(path, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (value, 255 - value, 128)).save(path, "JPEG")
    return path


def imagefolder(w, per_class=3, empty=None):
    for c in CLASSES:
        for i in range(per_class if c != empty else 0):
            jpeg(w.data / "train" / c / f"{i}.jpg", 40 * i)
        (w.data / "train" / c).mkdir(parents=True, exist_ok=True)
        for i in range(2):
            jpeg(w.data / "test" / c / f"{i}.jpg", 20 * i)


def write_lines(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{r}\n" for r in rows))


def noah(w, bad_train_label=None):
    for i, c in enumerate(CLASSES):
        jpeg(w.data / "images" / f"{c}.jpg", 60 * i)
    rows = [f"{c}.jpg {i}" for i, c in enumerate(CLASSES)]
    write_lines(w.data / "annotations" / "test_meta.list", rows)
    write_lines(w.data / "annotations" / "val_meta.list", rows)
    train = rows + ([f"cat.jpg {bad_train_label}"] if bad_train_label is not None else [])
    write_lines(w.data / "annotations" / "train_meta.list.num_shot_1.seed_0", train)


def vtab(w, bad_test_label=None):
    base = w.data / "kitti"
    for split in ("train800", "val200", "train800val200", "test"):
        rows = [f"images/{split}/{k}.jpg {k}" for k in range(4)]  # kitti: 4 classes
        for r in rows:
            jpeg(base / r.split()[0], 50 * int(r[-1]))
        write_lines(base / f"{split}.txt", rows + ([f"images/test/0.jpg {bad_test_label}"]
                                                   if split == "test" and bad_test_label is not None else []))


def pets(w, label="2"):
    rows = [f"{b}_{i} {c + 1} 1 {c + 1}" for c, b in enumerate(("Abyssinian", "beagle")) for i in range(3)]
    for r in rows:
        jpeg(w.data / "oxford-iiit-pet" / "images" / f"{r.split()[0]}.jpg")
    rows[-1] = f"beagle_2 {label} 1 2"
    write_lines(w.data / "oxford-iiit-pet" / "annotations" / "trainval.txt", rows)
    write_lines(w.data / "oxford-iiit-pet" / "annotations" / "test.txt", rows[:1] + rows[3:4])


def break_image(rel, how):
    def setup(w):
        imagefolder(w)
        path = w.data / rel
        path.write_bytes(b"\xff\xd8 this is not a JPEG " * 20 if how == "garbage" else w.jpeg[: len(w.jpeg) // 2])
    return setup


# images, layouts and annotation files as users have them (data.py)
def image_in(rel, make):
    """The imagefolder fixture with one more image at rel, made by make() (a PIL image)."""
    def setup(w):
        imagefolder(w)
        make().save(w.data / rel)
    return setup


def hidden_junk(w):
    """What notebooks and macOS leave in a tree: hidden folders and files, none of them an image PIL can read."""
    imagefolder(w)
    for junk in ("train/.ipynb_checkpoints/0.jpg", "test/.ipynb_checkpoints/0.jpg", "train/cat/._0.jpg",
                 "test/dog/.trash/1.jpg"):
        (w.data / junk).parent.mkdir(parents=True, exist_ok=True)
        (w.data / junk).write_bytes(b"\x00\x05\x16\x07 not an image")


def nested(w):  # one class's images only in sub-folders, as torchvision's ImageFolder finds them
    imagefolder(w)
    for f in sorted((w.data / "train" / "eel").iterdir()):
        (w.data / "train" / "eel" / "2019" / f"batch{f.stem}").mkdir(parents=True)
        f.rename(w.data / "train" / "eel" / "2019" / f"batch{f.stem}" / f.name)


def val_not_test(w):  # ImageNet's layout: train/ and val/
    imagefolder(w)
    (w.data / "test").rename(w.data / "val")


def fgvc_json(w, train=None, bom=False):
    rows = {f"{c}.jpg": i for i, c in enumerate(CLASSES)}
    for name in rows:
        jpeg(w.data / "images" / name)
    for split in ("train", "val", "test"):
        text = json.dumps(train if split == "train" and train is not None else rows)
        (w.data / f"{split}.json").write_bytes(b"\xef\xbb\xbf" * bom + text.encode())


def latin1_line(rel, line, setup):
    """setup(w), then one more line in the list file at rel, in latin-1 (an editor's legacy encoding)."""
    def make(w):
        setup(w)
        with open(w.data / rel, "ab") as f:
            f.write(line.encode("latin-1"))
    return make


def classes_are(n):
    def then(w, r):
        [row] = rows_of(w)
        assert row["status"] == "ok" and row["num_classes"] == n, row
    return then


def dev_full(w):
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    w.out.mkdir()
    (w.out / "results.jsonl").symlink_to("/dev/full")


def torn_results(w):
    """What a write cut short leaves: two finished runs, the second line only half written, no newline."""
    assert fewshot.main(fill(fs(method="linear,vpt"), w)) == 0
    first, second = (w.out / "results.jsonl").read_text().splitlines()
    (w.out / "results.jsonl").write_text(first + "\n" + second[: len(second) // 2])


def torn_then(w, r):
    """The torn run is run again and appended on a line of its own; the intact line before it is untouched."""
    lines = (w.out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 3 and [x["method"] for x in rows_of(w)] == ["linear", "vpt"] and torn_lines(w) == [lines[1]]


def file_at(name):
    return lambda w: w.tmp.joinpath(name).write_text("a file, not a folder\n")


def not_writable(w):
    if os.geteuid() != 0:  # root writes anywhere: then /sys, which refuses even root
        w.ro.mkdir(mode=0o555)


def rows_of(w):
    """The records of results.jsonl; a line torn by a failed write is skipped, as plumbing.finished skips it."""
    rows = []
    for line in (w.out / "results.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def torn_lines(w):
    return [line for line in (w.out / "results.jsonl").read_text().splitlines() if not line.startswith("{") or
            not line.endswith("}")]

WORKER_KILLED = """
import os, signal, torch.utils.data, data
read = data.Stream.__getitem__
def killed_in_2_shots(self, i):  # the memory killer, played: a worker reading the 2-shot training set dies
    if torch.utils.data.get_worker_info() and len(self) == 6 and "/train/" in os.fsdecode(self.paths[i]):
        os.kill(os.getpid(), signal.SIGKILL)
    return read(self, i)
data.Stream.__getitem__ = killed_in_2_shots
"""


def one_shot_runs_kept(w, r):
    """bad-image-in-a-stream: with --cache-gb 0 every split streams, so the image (cat/0.jpg: seed 0's 2-shot set
    adds it to the 1-shot one, and holds out cat/1.jpg for val) is read only by the 2-shot runs; the 1-shot runs
    finished before it and are kept."""
    assert [(x["method"], x["shots"], x["status"]) for x in rows_of(w)] == [("linear", 1, "ok"), ("vpt", 1, "ok")]


# -----------------------------------------------------------------------------
# argv builders: the micro budget, with flags replaced (None drops a flag, True is a switch)

FEWSHOT = dict(weights="{bb}", arch="vit_synthetic", data="synthetic:shape", shots="1", seeds="0", epochs="1",
               max_steps="2", method="linear", device="cpu", out="{out}")
PRETRAIN = dict(weights="{bb}", arch="vit_synthetic", per_class="2", epochs="1", batch="128", device="cpu",
                out="{tmp}/m.safetensors")


def argv(base, **flags):
    out = []
    for k, v in {**base, **flags}.items():
        if v not in (None, False):
            out += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return out


def fs(**flags):
    return argv(FEWSHOT, **flags)


def pp(**flags):
    return argv(PRETRAIN, **flags)


def fill(items, w):
    return [str(a).format(**vars(w)) for a in items]

# -----------------------------------------------------------------------------
# running a row: a real process, or the script's __main__ in this process


@dataclass
class Result:
    code: int
    out: str
    err: str


def env(w):
    keep = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR")}
    return {**keep, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "NANOPETL_CACHE": str(w.tmp / "cache"),
            "CUDA_VISIBLE_DEVICES": ""}  # CPU rows; a CUDA context would not fit the 8 GB address-space cap


def at_most_8gb():  # a fault that reads without end (e.g. /dev/full) fails alone instead of filling the machine
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a suite started in the background ignores SIGINT: not the child


def spawn(script, args, w, hook=None, tag="p", extra_env=None):
    """A real process (stdout, stderr to files: a full pipe cannot stall it); a hook runs first, in its __main__."""
    cmd = [sys.executable, str(ROOT / script), *args] if hook is None else [sys.executable, "-c", (
        f"{hook}\nimport runpy, sys\nsys.argv = {[script, *args]!r}\n"
        f"runpy.run_path({str(ROOT / script)!r}, run_name='__main__')")]
    out, err = (open(w.tmp / f"{tag}.{s}", "w+") for s in ("out", "err"))
    proc = subprocess.Popen(cmd, cwd=w.tmp, env={**env(w), **(extra_env or {})}, stdout=out, stderr=err, text=True,
                            preexec_fn=at_most_8gb)
    proc.files = out, err
    return proc


def finish(proc, timeout=180):
    proc.wait(timeout=timeout)
    out, err = (f.seek(0) or f.read() for f in proc.files)
    [f.close() for f in proc.files]
    return Result(proc.returncode, out, err)


def in_process(script, args):
    """runpy executes the file as __main__; SystemExit becomes the exit status the interpreter would give it, and
    an exception that escapes is printed as the interpreter would print it (so 'Traceback' shows)."""
    out, err, saved = io.StringIO(), io.StringIO(), sys.argv
    sys.argv = [script, *args]
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                runpy.run_path(str(ROOT / script), run_name="__main__")
                code = 0
            except SystemExit as e:
                code = (0 if e.code is None else e.code if isinstance(e.code, int)
                        else print(e.code, file=sys.stderr) or 1)
            except BaseException:
                traceback.print_exc()
                code = 1
    finally:
        sys.argv = saved
    return Result(code, out.getvalue(), err.getvalue())


def wait_for(cond, proc, what, timeout=120):
    deadline = time.time() + timeout
    while not cond():
        assert proc.poll() is None, f"the process ended ({proc.returncode}) before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def has_lines(path, n=1):
    return lambda: path.is_file() and path.read_text().count("\n") >= n

# -----------------------------------------------------------------------------
# what a row checks after the fault: the finished runs are kept, and a re-run skips them


def rerun_skips(**over):
    """The same command (argv fs(**over)) run again: every line already there is kept byte for byte and not run
    again; runs missing are run. Then every planned key is there once."""
    def then(w, r):
        before = (w.out / "results.jsonl").read_bytes()
        done = {x["key"] for x in rows_of(w)}
        real, ran = fewshot.run_one, []

        def run_one(name, task, *a, **k):
            ran.append(name)
            return real(name, task, *a, **k)
        w.mp.setattr(fewshot, "run_one", run_one)
        assert fewshot.main(fill(fs(**over), w)) == 0
        after = (w.out / "results.jsonl").read_bytes()
        assert after.startswith(before)  # nothing finished was lost or rewritten
        keys = [r["key"] for r in rows_of(w)]
        assert len(keys) == len(set(keys)) and len(ran) == len(keys) - len(done)
    return then


def kept_and_rerun(n_before, **over):
    def then(w, r):
        rows = rows_of(w)
        assert len(rows) == n_before and all(r["status"] == "ok" for r in rows)
        rerun_skips(**over)(w, r)
    return then


def one_ok_run(w, r):
    assert [x["status"] for x in rows_of(w)] == ["ok"]


def untouched(w, r):
    """Refused before any work: no results file was written."""
    assert not (w.out / "results.jsonl").exists()


def interrupt_after_first_line(sig):
    def during(proc, w):
        wait_for(has_lines(w.out / "results.jsonl"), proc, "the first results line")
        proc.send_signal(sig)
    return during


def ctrl_c_then(w, r):
    rows = rows_of(w)
    assert 1 <= len(rows) < 4 and all(r["status"] == "ok" for r in rows) and not torn_lines(w)
    rerun_skips(method="linear,vpt,lora,full")(w, r)
    assert len(rows_of(w)) == 4


def nan_then(w, r):
    rows = rows_of(w)
    assert [(x["method"], x["status"]) for x in rows] == [("linear", "failed"), ("vpt", "ok")]
    assert "the loss became nan at step 0" in rows[0]["error"] and "--lr" in rows[0]["error"]
    rerun_skips(method="linear,vpt")(w, r)  # the failed record counts as done: a new --lr runs it again


# The disk fills up once the first run is on it: a file-size limit (ulimit -f) 200 bytes past the end of
# results.jsonl makes the kernel write 200 bytes of the second line, then refuse the rest (EFBIG, as ENOSPC on a full
# disk): a real torn line. (A symlink to /dev/full cannot stand in: a sweep reads results.jsonl whole, and
# /dev/full has no end; check() now refuses a results.jsonl that is not a plain file.)
DISK_FULL = """
import os, resource
real, calls = os.fsync, []
def fsync(fd):
    real(fd)
    calls.append(fd)
    if len(calls) == 1:
        resource.setrlimit(resource.RLIMIT_FSIZE, (os.fstat(fd).st_size + 200, resource.RLIM_INFINITY))
os.fsync = fsync
"""


def disk_full_then(w, r):
    [row] = rows_of(w)
    assert row["method"] == "linear" and row["status"] == "ok" and len(torn_lines(w)) == 1
    rerun_skips(method="linear,vpt")(w, r)  # space freed: the same command finishes the sweep
    assert [x["method"] for x in rows_of(w)] == ["linear", "vpt"]


NAN_AT_FIRST_STEP = """
import torch.nn.functional as F
real, calls = F.cross_entropy, []
def cross_entropy(*a, **k):  # the first run's first step goes NaN
    calls.append(1)
    return real(*a, **k) * (float("nan") if len(calls) == 1 else 1.0)
F.cross_entropy = cross_entropy
"""


def second_sweep(proc, w):
    """A second sweep on the same --out, started at once; overlapping plans (both run vpt)."""
    other = spawn("fewshot.py", fill(fs(method="vpt,lora"), w), w, tag="second")
    r = finish(other)
    assert r.code == 0 and "Traceback" not in r.err, r.err[-3000:]


def shard_twin_and_plain_sweep(proc, w):
    """The same --shard job started again, and a plain sweep, on the same --out at once."""
    others = [spawn("fewshot.py", fill(a, w), w, tag=t) for t, a in (
        ("twin", fs(method="linear,vpt", shard="0/2")), ("plain", fs(method="linear,vpt")))]
    for r in map(finish, others):
        assert r.code == 0 and "Traceback" not in r.err, r.err[-3000:]


def each_run_once(w, r):
    rows = [json.loads(line) for line in (w.out / "results.jsonl").read_text().splitlines()]
    assert sorted(x["method"] for x in rows) == ["linear", "vpt"] and all(x["status"] == "ok" for x in rows), rows


def two_sweeps_then(w, r):
    lines = (w.out / "results.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]  # every line is whole JSON: no interleaving
    assert {x["method"] for x in rows} == {"linear", "vpt", "lora"} and all(x["status"] == "ok" for x in rows)
    keys = [x["key"] for x in rows]
    assert len(set(keys)) == 3  # every planned run: linear, vpt, lora
    if hasattr(plumbing, "claim"):  # ONLY with fewshot's per-run claim: no run is done twice
        assert len(keys) == 3, keys


def killed_pretrain_then(w, r):
    out, resume = w.tmp / "m.safetensors", w.tmp / "m.safetensors.resume"
    assert resume.exists() and not out.exists(), "the run finished before it could be killed"
    assert pvp_pretrain.main(fill(pp(per_class="4", epochs="3", resume=True), w)) == 0
    assert out.exists() and not resume.exists()
    assert json.loads(__import__("safetensors").safe_open(out, "pt").metadata()["nanopetl"])["epochs"] == 3


def interrupted_pretrain_then(w, r):
    assert (w.tmp / "m.safetensors.resume").exists() and not (w.tmp / "m.safetensors").exists()


def not_executed(w, r):
    assert not (w.dir / "EXECUTED").exists(), "the pickled payload ran"


def foreign_resume(w):
    torch.save(dict(model={"prompts": torch.zeros(1, 2, 3)}, optimizer={}, epoch=0), w.tmp / "m.safetensors.resume")


def pickled_resume(w):
    torch.save(dict(model=Payload(w.dir / "EXECUTED"), optimizer={}, epoch=0), w.tmp / "m.safetensors.resume")


def module_with(w, name, header=None, tensors=None):
    """A copy of the world's PVP checkpoint with its header edited (header(meta) -> meta) or its tensors replaced."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(w.pvp, "pt") as f:
        meta = json.loads(f.metadata()["nanopetl"])
    t = load_file(w.pvp)
    save_file(tensors(t) if tensors else t, w.tmp / name,
              metadata={"nanopetl": json.dumps(header(meta) if header else meta)})


def without(key):
    return lambda meta: {k: v for k, v in meta.items() if k != key}


def with_nan(t):
    t["prompts"][0, 0, :3] = float("nan")
    return t


def other_recipe_resume(w):
    """The resume file of a run at another --lr: the same flags otherwise."""
    args = pvp_pretrain.parse(fill(pp(lr="0.1"), w))
    torch.save(dict(model={}, optimizer={}, epoch=0, recipe=json.dumps(pvp_pretrain.recipe(args, "h", {}))),
               w.tmp / "m.safetensors.resume")


def no_resume_mentioned(w, r):
    assert "--resume" not in r.err and not (w.tmp / "m.safetensors.resume").exists()
    assert "cannot write {}/m.safetensors.resume:".format(w.tmp) in r.err  # the file it wrote, not a temporary one


FIRST_RESUME_WRITE_FAILS = """
import errno, torch
def save(obj, f, *a, **k):
    raise OSError(errno.ENOSPC, "No space left on device", str(f))
torch.save = save
"""

RESULTS_UNREADABLE = """
import errno, pathlib
real = pathlib.Path.read_bytes
def read_bytes(self):
    if self.name == "results.jsonl":
        raise PermissionError(errno.EACCES, "Permission denied", str(self))
    return real(self)
pathlib.Path.read_bytes = read_bytes
"""


def results_exist(w):
    w.out.mkdir()
    (w.out / "results.jsonl").write_text("")


def second_pretrain(proc, w):
    """A second pvp_pretrain.py on the same --out, once the first holds the lock: it waits, then reuses."""
    wait_for(lambda: (w.tmp / "m.safetensors.lock").exists(), proc, "the first one's lock")
    r = finish(spawn("pvp_pretrain.py", fill(pp(per_class="16"), w), w, tag="second"))
    assert r.code == 0 and "waiting: another process is building" in r.out and "reusing it" in r.out, r.err[-2000:]
    assert not (w.tmp / "m.safetensors.lock").exists() or proc.poll() is None


def broken_lines(w):
    assert fewshot.main(fill(fs(method="linear"), w)) == 0
    good = (w.out / "results.jsonl").read_text()
    (w.out / "results.jsonl").write_text(good + "not json\n" + json.dumps({"key": 1}) + "\n")


def broken_lines_then(w, r):
    assert [x["method"] for x in rows_of(w) if "status" in x] == ["linear", "vpt"]  # linear kept, vpt run

# -----------------------------------------------------------------------------
# the table


@dataclass
class Case:
    name: str
    setup: Callable  # setup(w): files in the row's tmp folder (None: nothing)
    argv: list  # "{bb}", "{out}", "{data}", "{tmp}", ... are w's paths
    code: int  # the exit status (negative: killed by that signal)
    says: tuple  # what the one message holds
    script: str = "fewshot.py"
    cli: bool = False  # a real process even without hook or during
    hook: str = None  # python run in the real process before the script: an injected fault
    during: Callable = None  # during(proc, w): acts on the running real process
    then: Callable = untouched  # then(w, result): what is kept, and the re-run
    env: dict = None  # environment variables of the real process ("{tmp}" and the like filled in)


IF = dict(data="imagefolder", data_root="{data}")  # flags for the imagefolder fixture
CASES = [
    # --- missing or wrong paths
    Case("data-root-missing", None, fs(**IF), 1, ("--data-root", "{data}", "does not exist"), cli=True),
    Case("weights-missing", None, fs(weights="{tmp}/none.safetensors"), 1,
         ("--weights", "no checkpoint file at {tmp}/none.safetensors", "vit_b16_in21k")),
    Case("pvp-init-missing", None, fs(method="pvp", pvp_init="{tmp}/none.safetensors"), 1,
         ("--pvp-init", "no module checkpoint at {tmp}/none.safetensors", "pvp_pretrain.py")),
    Case("out-is-a-file", file_at("file"), fs(out="{tmp}/file"), 1, ("--out {tmp}/file", "not a folder")),
    Case("out-under-a-file", file_at("file"), fs(out="{tmp}/file/sub"), 1, ("--out {tmp}/file/sub", "cannot create"),
         cli=True),
    Case("out-not-writable", not_writable, fs(out="{ro}/out"), 1, ("--out {ro}/out", "cannot create")),
    Case("results-not-a-file", dev_full, fs(), 1, ("{out}/results.jsonl", "not a regular file"),
         cli=True, then=None),  # cli: memory-capped, should /dev/full ever be read
    Case("results-torn-line", torn_results, fs(method="linear,vpt"), 0, ("saved:",), then=torn_then),
    # --- wrong layouts
    Case("flowers102-on-an-imagefolder", imagefolder, fs(data="flowers102", data_root="{data}"), 1,
         ("flowers102", "{data}/flowers-102/imagelabels.mat not found", "--download")),
    Case("vtab1k-without-task-folder", lambda w: w.data.mkdir(), fs(data="vtab1k", data_root="{data}",
                                                                  vtab_task="kitti"), 1,
         ("{data}/kitti/train800.txt not found", "<task>/{{train800")),
    Case("vtab1k-without-vtab-task", lambda w: w.data.mkdir(), fs(data="vtab1k", data_root="{data}"), 1,
         ("--data vtab1k needs --vtab-task", "kitti")),
    Case("vtab1k-unknown-task", lambda w: w.data.mkdir(), fs(data="vtab1k", data_root="{data}", vtab_task="cifar10"),
         1, ("--vtab-task 'cifar10'", "cifar,")),
    Case("noah-without-list-files", lambda w: jpeg(w.data / "images" / "a.jpg"),
         fs(data="noah-fewshot", data_root="{data}"), 1,
         ("{data}/annotations/test_meta.list not found", "train_meta.list.num_shot_<K>")),
    Case("noah-shots-all", noah, fs(data="noah-fewshot", data_root="{data}", shots="all"), 1,
         ("noah-fewshot", "--shots", "1,2,4,8,16")),
    # --- empty classes, unreadable images
    Case("empty-class-folder", lambda w: imagefolder(w, empty="eel"), fs(**IF), 1,
         ("{data}/train/eel", "no images", "remove the folder")),
    Case("garbage-jpg", break_image("test/cat/0.jpg", "garbage"), fs(**IF), 1,
         ("cannot read image {data}/test/cat/0.jpg", "replace it"), cli=True),
    Case("truncated-jpg", break_image("test/dog/1.jpg", "truncated"), fs(**IF), 1,
         ("cannot read image {data}/test/dog/1.jpg", "truncated", "replace it")),
    # --- labels out of range or not labels
    Case("noah-label-too-big", lambda w: noah(w, bad_train_label=3), fs(data="noah-fewshot", data_root="{data}"), 1,
         ("train_meta.list.num_shot_1.seed_0:4", "label 3 is out of range 0..2", "fix the line")),
    Case("noah-label-negative", lambda w: noah(w, bad_train_label=-1), fs(data="noah-fewshot", data_root="{data}"), 1,
         ("train_meta.list.num_shot_1.seed_0:4", "'-1'", "0..2")),
    Case("vtab-label-not-a-number", lambda w: vtab(w, bad_test_label="car"),
         fs(data="vtab1k", data_root="{data}", vtab_task="kitti"), 1, ("{data}/kitti/test.txt:5", "'car'")),
    Case("pets-label-zero", lambda w: pets(w, label="0"), fs(data="pets", data_root="{data}"), 1,
         ("pets", "label -1", "beagle_2.jpg", "0..1")),
    Case("pets-label-not-a-number", lambda w: pets(w, label="two"), fs(data="pets", data_root="{data}"), 1,
         ("pets", "{data}", "'two'", "oxford-iiit-pet/")),
    # --- shots against what the data has
    Case("more-shots-than-a-class-has", imagefolder, fs(shots="1,16", **IF), 1,
         ("class 0 (cat) has 3 training images, fewer than shots=16", "use fewer shots"), cli=True,
         then=kept_and_rerun(1, shots="1", **IF)),
    Case("shots-leave-no-val", imagefolder, fs(shots="3", **IF), 1,
         ("imagefolder", "val", "empty", "shots=3", "fewer shots"), cli=True),
    # --- unknown names
    Case("unknown-method", None, fs(method="linear,prompt-magic"), 1, ("unknown method prompt-magic", "lora")),
    Case("unknown-dataset", None, fs(data="cifar"), 1, ("unknown dataset 'cifar'", "--data", "imagefolder")),
    Case("unknown-synthetic-task", None, fs(data="synthetic:birds"), 1, ("'birds'", "texture")),
    Case("unknown-arch", None, fs(arch="vit_huge"), 1, ("--arch vit_huge", "vit_small_patch16")),
    Case("unknown-optimizer", None, fs(optimizer="adam"), 1, ("--optimizer adam", "adamw")),
    Case("unknown-aug", None, fs(aug="mixup"), 1, ("--aug mixup", "crop_flip")),
    Case("unknown-head-init", None, fs(head_init="ones"), 1, ("--head-init ones", "prototype")),
    Case("unknown-device", None, fs(device="tpu"), 1, ("--device tpu", "cpu")),
    Case("flag-not-a-number", None, fs(epochs="ten"), 2, ("--epochs", "invalid int value: 'ten'"), cli=True),
    # --- contradictory or out-of-range flags
    Case("vtab-task-without-vtab1k", None, fs(vtab_task="kitti"), 1, ("--vtab-task", "--data vtab1k")),
    Case("download-with-synthetic", None, fs(download=True), 1, ("--download", "flowers102")),
    Case("download-with-imagefolder", imagefolder, fs(download=True, **IF), 1, ("--download", "imagefolder")),
    Case("data-root-with-synthetic", None, fs(data_root="{tmp}"), 1, ("--data-root", "synthetic")),
    Case("pvp-init-without-pvp", None, fs(pvp_init="{pvp}"), 0, ("warning: --pvp-init", "it is ignored"),
         then=one_ok_run),
    Case("pvp-with-weights-no-pvp-init", None, fs(method="linear,pvp"), 1,
         ("--pvp-init", "pvp_pretrain.py --weights")),
    Case("amp-on-cpu", None, fs(amp=True), 1, ("--amp", "cpu", "drop --amp")),
    Case("grid-empty", None, fs(grid=True, grid_lr=""), 1, ("--grid-lr", "''")),
    Case("grid-lr-without-grid", None, fs(grid_lr="0.1,0.01"), 1, ("--grid-lr", "--grid")),
    Case("shots-zero", None, fs(shots="0"), 1, ("--shots", "'0'", "all")),
    Case("shots-negative", None, fs(shots="1,-2"), 1, ("--shots", "'1,-2'")),
    Case("shots-not-numbers", None, fs(shots="one"), 1, ("--shots", "'one'")),
    Case("seeds-not-integers", None, fs(seeds="0,1.5"), 1, ("--seeds", "'0,1.5'"), cli=True),
    Case("batch-zero", None, fs(batch="0"), 1, ("--batch", "at least 1", "0")),
    Case("epochs-zero", None, fs(epochs="0"), 1, ("--epochs", "at least 1")),
    Case("max-steps-negative", None, fs(max_steps="-5"), 1, ("--max-steps", "at least 1")),
    Case("prune-tokens-one", None, fs(prune_tokens="1"), 1, ("--prune-tokens", "[0, 1)", "1.0")),
    Case("prune-segments-negative", None, fs(prune_segments="-0.1"), 1, ("--prune-segments", "[0, 1)")),
    Case("lr-negative", None, fs(lr="-1"), 1, ("--lr must be a positive number",)),
    Case("lr-overflows", None, fs(lr="1e38"), 1, ("--lr", "1e+38", "at most")),
    Case("wd-negative", None, fs(wd="-0.1"), 1, ("--wd", "-0.1")),
    Case("warmup-above-one", None, fs(warmup="1.5"), 1, ("--warmup", "[0, 1]")),
    Case("prompts-zero", None, fs(prompts="0"), 1, ("--prompts", "at least 1")),
    Case("img-size-not-a-patch-multiple", None, fs(img_size="30"), 1, ("--img-size 30", "multiple of 8")),
    # --- checkpoints of the wrong shape, kind or backbone; pickles; corrupt files
    Case("weights-of-another-shape", None, fs(weights="{dir}/narrow.safetensors"), 1,
         ("narrow.safetensors", "shape mismatch", "--arch"), cli=True),
    Case("module-given-as-weights", None, fs(weights="{pvp}"), 1, ("{pvp}", "module checkpoint", "--pvp-init")),
    Case("backbone-given-as-pvp-init", None, fs(method="pvp", pvp_init="{bb}"), 1,
         ("{bb}", "module header", "--weights")),
    Case("pvp-from-another-backbone", None, fs(method="pvp", pvp_init="{pvp}", weights="{other}"), 1,
         ("pre-trained on backbone", "pvp_pretrain.py --weights")),
    Case("pickled-weights", None, fs(weights="{dir}/pickled.pth"), 1, ("pickled.pth", "Pickled objects", "refused"),
         cli=True, then=not_executed),
    Case("pickled-module-weights", None, fs(weights="{dir}/module.pth"), 1, ("module.pth", "Pickled objects")),
    Case("object-array-npz", None, fs(weights="{dir}/objects.npz"), 1, ("objects.npz", "object arrays")),
    Case("pickled-pvp-init", None, fs(method="pvp", pvp_init="{dir}/pickled.pth"), 1,
         ("pickled.pth", "not a readable module checkpoint"), then=not_executed),
    Case("tensor-not-a-state-dict", None, fs(weights="{dir}/tensor.pth"), 1, ("tensor.pth", "not a state dict")),
    Case("truncated-safetensors", None, fs(weights="{dir}/cut.safetensors"), 1,
         ("cut.safetensors", "not a readable checkpoint"), cli=True),
    Case("truncated-pth", None, fs(weights="{dir}/cut.pth"), 1, ("cut.pth", "not a readable checkpoint")),
    Case("truncated-npz", None, fs(weights="{dir}/cut.npz"), 1, ("cut.npz", "not a readable checkpoint")),
    Case("random-bytes-safetensors", None, fs(weights="{dir}/random.safetensors"), 1,
         ("random.safetensors", "not a readable checkpoint")),
    Case("random-bytes-bin", None, fs(weights="{dir}/random.bin"), 1, ("random.bin", "not a readable checkpoint")),
    Case("truncated-pvp-init", None, fs(method="pvp", pvp_init="{dir}/cut_pvp.safetensors"), 1,
         ("cut_pvp.safetensors", "not a readable module checkpoint")),
    # --- faults during a sweep: what finished is kept
    Case("nan-loss", None, fs(method="linear,vpt"), 0, ("failed: linear", "the loss became nan"),
         hook=NAN_AT_FIRST_STEP, then=nan_then),
    Case("disk-full", None, fs(method="linear,vpt"), 1,
         ("{out}/results.jsonl", "File too large", "kept", "free some space", "run the same command again"),
         hook=DISK_FULL, then=disk_full_then),
    Case("ctrl-c", None, fs(method="linear,vpt,lora,full"), 130,
         ("interrupted: every finished run is in {out}/results.jsonl", "run the same command again"),
         during=interrupt_after_first_line(signal.SIGINT), then=ctrl_c_then),
    Case("two-sweeps-one-out", None, fs(method="linear,vpt"), 0, ("saved:",), during=second_sweep,
         then=two_sweeps_then),
    Case("shard-twice-beside-a-sweep", None, fs(method="linear,vpt", shard="0/2"), 0, ("saved:",),
         during=shard_twin_and_plain_sweep, then=each_run_once),
    # --- pvp_pretrain.py
    Case("pretrain-killed-then-resume", None, pp(per_class="4", epochs="3"), -signal.SIGKILL, (),
         script="pvp_pretrain.py", during=lambda proc, w: (wait_for(
             lambda: (w.tmp / "m.safetensors.resume").exists(), proc, "the first epoch's resume file"), proc.kill()),
         then=killed_pretrain_then),
    Case("pretrain-ctrl-c", None, pp(per_class="4", epochs="3"), 130, ("interrupted", "--resume"),
         script="pvp_pretrain.py", during=lambda proc, w: (wait_for(
             lambda: (w.tmp / "m.safetensors.resume").exists(), proc, "the first epoch's resume file"),
             proc.send_signal(signal.SIGINT)), then=interrupted_pretrain_then),
    Case("pretrain-epochs-zero", None, pp(epochs="0"), 1, ("--epochs", "at least 1"), script="pvp_pretrain.py"),
    Case("pretrain-batch-zero", None, pp(batch="0"), 1, ("--batch", "at least 1"), script="pvp_pretrain.py"),
    Case("pretrain-per-class-zero", None, pp(per_class="0"), 1, ("--per-class", "at least 1"),
         script="pvp_pretrain.py"),
    Case("pretrain-lr-zero", None, pp(lr="0"), 1, ("--lr", "positive"), script="pvp_pretrain.py"),
    Case("pretrain-out-is-a-folder", None, pp(out="{tmp}"), 1, ("--out {tmp}", "a folder", ".safetensors"),
         script="pvp_pretrain.py"),
    Case("pretrain-amp-on-cpu", None, pp(amp=True), 1, ("--amp", "cpu"), script="pvp_pretrain.py"),
    Case("pretrain-data-root-with-synthetic", None, pp(data_root="{tmp}"), 1, ("--data-root", "synthetic"),
         script="pvp_pretrain.py"),
    Case("backbone-build-epochs-zero", None, ["--epochs", "0", "--out", "{tmp}/bb.safetensors"], 1,
         ("--epochs", "at least 1"), script="tools/build_backbone.py"),
    Case("pretrain-weights-missing", None, pp(weights="{tmp}/none.pth"), 1, ("no checkpoint file at {tmp}/none.pth",),
         script="pvp_pretrain.py"),
    Case("pretrain-unknown-method", None, pp(method="prompt-magic"), 1, ("--method prompt-magic", "lora"),
         script="pvp_pretrain.py"),
    Case("pretrain-resume-of-another-config", foreign_resume, pp(resume=True), 1,
         ("{tmp}/m.safetensors.resume", "another", "delete it"), script="pvp_pretrain.py", cli=True),
    Case("pretrain-pickled-resume", pickled_resume, pp(resume=True), 1,
         ("{tmp}/m.safetensors.resume", "Pickled objects", "delete it"), script="pvp_pretrain.py",
         then=not_executed),
    # --- run identity, options, flags and environment, resume and writes
    Case("device-xpu", None, fs(device="xpu"), 1, ("--device xpu", "cpu, cuda or mps")),
    Case("device-meta", None, fs(device="meta"), 1, ("--device meta", "cpu, cuda or mps")),
    Case("device-cuda-absent", None, fs(device="cuda:1"), 1, ("--device cuda:1", "no CUDA here")),
    Case("seed-beyond-64-bits", None, fs(seeds=str(2**64)), 1, ("--seeds", "18446744073709551616", "4294967295")),
    Case("seed-negative", None, fs(seeds="-1"), 1, ("--seeds", "'-1'", "from 0")),
    Case("img-size-huge", None, fs(img_size="100000"), 1, ("--img-size", "100000", "1024")),
    Case("cache-is-a-file", file_at("cachefile"), fs(), 1, ("NANOPETL_CACHE={tmp}/cachefile", "folder"),
         env=dict(NANOPETL_CACHE="{tmp}/cachefile")),
    Case("stray-local-rank", None, fs(), 1, ("LOCAL_RANK=0", "MASTER_ADDR", "torchrun", "unset LOCAL_RANK"),
         env=dict(LOCAL_RANK="0")),
    Case("opt-taken-by-no-method", None, fs(method="vpt,lora", opt="bottleneck=8"), 1,
         ("--opt bottleneck", "none of --method vpt,lora", "vpt takes num_prompts")),
    Case("opt-not-name-value", None, fs(method="vpt", opt="dropout"), 1, ("--opt 'dropout'", "NAME=VALUE")),
    Case("opt-value-refused", None, fs(method="e2vpt", opt="segments=7"), 1, ("--method e2vpt", "segments=7")),
    Case("opt-against-its-flag", None, fs(method="vpt", prompts="5", opt="num_prompts=6"), 1,
         ("--prompts 5", "--opt num_prompts=6", "disagree")),
    Case("flag-no-method-takes", None, fs(method="vpt", rank="4"), 0, ("warning: --rank is ignored",), then=one_ok_run),
    Case("pvp-with-other-prompts", None, fs(method="vpt,pvp", pvp_init="{pvp}", prompts="100"), 1,
         ("{pvp}", "num_prompts=10", "num_prompts=100", "like with like")),
    Case("module-header-missing-field", lambda w: module_with(w, "nohash.safetensors", without("backbone_hash")),
         fs(method="pvp", pvp_init="{tmp}/nohash.safetensors"), 1, ("nohash.safetensors", "header", "backbone_hash")),
    Case("module-header-wrong-type", lambda w: module_with(w, "cfg.safetensors", lambda m: {**m, "config": [10]}),
         fs(method="pvp", pvp_init="{tmp}/cfg.safetensors"), 1, ("cfg.safetensors", "config (list, not dict)")),
    Case("module-header-unknown-option", lambda w: module_with(w, "opt.safetensors", lambda m: {
        **m, "config": {**m["config"], "bottleneck": 8}}), fs(method="pvp", pvp_init="{tmp}/opt.safetensors"), 1,
         ("opt.safetensors", "['bottleneck']", "vpt does not take")),
    Case("module-extra-tensor", lambda w: module_with(w, "x.safetensors", tensors=lambda t: {**t, "adapter": 1 + t[
        "prompts"][0]}), fs(method="linear,pvp", pvp_init="{tmp}/x.safetensors"), 1,
         ("x.safetensors", "not the vpt module its header describes", "unexpected adapter")),
    Case("module-tensor-missing", lambda w: module_with(w, "x.safetensors", tensors=lambda t: {"p": t["prompts"]}),
         fs(method="linear,pvp", pvp_init="{tmp}/x.safetensors"), 1, ("missing prompts", "unexpected p")),
    Case("module-config-against-its-tensors", lambda w: module_with(w, "x.safetensors", lambda m: {
        **m, "config": {**m["config"], "num_prompts": 7}}), fs(method="linear,pvp", pvp_init="{tmp}/x.safetensors"), 1,
         ("x.safetensors", "shape of prompts", "expected (6, 7, 128)")),
    Case("module-option-of-another-kind", lambda w: module_with(w, "x.safetensors", lambda m: {
        **m, "config": {**m["config"], "deep": 2}}), fs(method="linear,pvp", pvp_init="{tmp}/x.safetensors"), 1,
         ("x.safetensors", "header is damaged", "deep is True or False", "got 2")),
    Case("module-option-refused", lambda w: module_with(w, "x.safetensors", lambda m: {
        **m, "config": {**m["config"], "init": "magic"}}), fs(method="linear,pvp", pvp_init="{tmp}/x.safetensors"), 1,
         ("x.safetensors", "config", "is refused")),
    Case("module-tensor-of-another-dtype", lambda w: module_with(w, "x.safetensors", tensors=lambda t: {
        "prompts": t["prompts"].int()}), fs(method="linear,pvp", pvp_init="{tmp}/x.safetensors"), 1,
         ("x.safetensors", "prompts holds torch.int32, not torch.float32")),
    Case("module-of-a-method-without-one", lambda w: module_with(w, "x.safetensors", lambda m: {
        **m, "method": "linear", "config": {}}, tensors=lambda t: {}), fs(method="pvp", pvp_init="{tmp}/x.safetensors"),
         1, ("x.safetensors", "linear has only a head, not a module beside a frozen backbone")),
    Case("pvp-batch-past-memory", None, fs(method="pvp", pvp_init="{pvp}", batch="100000000"), 1,
         ("--batch 100000000", "one training step of pvp", "lower --batch")),
    Case("prompts-past-int64", None, fs(method="vpt", prompts="99999999999999999999999999"), 1,
         ("--method vpt", "Overflow", "change the option")),
    Case("rank-past-world-size", None, fs(), 1, ("RANK=2 with WORLD_SIZE=2", "0 to WORLD_SIZE - 1"), env=dict(
        LOCAL_RANK="0", RANK="2", WORLD_SIZE="2", MASTER_ADDR="localhost", MASTER_PORT="29500")),
    Case("prompts-past-memory", None, fs(method="linear,vpt", prompts="1000000000"), 1,
         ("--method vpt", "trainable parameters need at least", "GB to train, more than the", "--prompts")),
    Case("batch-past-memory", None, fs(method="linear,lora", batch="100000000"), 1,
         ("--batch 100000000", "one training step of lora keeps at least", "lower --batch")),
    Case("pretrain-batch-past-memory", None, pp(batch="100000000"), 1, ("--batch 100000000", "lower --batch"),
         script="pvp_pretrain.py"),
    Case("module-with-nan", lambda w: module_with(w, "nan.safetensors", tensors=with_nan),
         fs(method="linear,pvp", pvp_init="{tmp}/nan.safetensors"), 1, ("nan.safetensors", "prompts", "3 NaN")),
    Case("results-unreadable", results_exist, fs(), 1, ("cannot read {out}/results.jsonl", "Permission denied",
                                                        "--out"), hook=RESULTS_UNREADABLE, then=None),
    Case("sigterm", None, fs(method="linear,vpt,lora,full"), 130,
         ("interrupted: every finished run is in {out}/results.jsonl", "run the same command again"),
         during=interrupt_after_first_line(signal.SIGTERM), then=ctrl_c_then),
    Case("pretrain-resume-of-another-recipe", other_recipe_resume, pp(resume=True), 1,
         ("{tmp}/m.safetensors.resume", "another run", "lr 0.1 there", "delete it"), script="pvp_pretrain.py"),
    Case("pretrain-out-not-writable", not_writable, pp(out="{ro}/m.safetensors"), 1,
         ("--out {ro}/m.safetensors", "cannot write"), script="pvp_pretrain.py"),
    Case("pretrain-disk-full-before-any-epoch", None, pp(), 1, ("No space left", "No epoch had been saved"),
         script="pvp_pretrain.py", hook=FIRST_RESUME_WRITE_FAILS, then=no_resume_mentioned),
    Case("pretrain-full-finetune", None, pp(method="full"), 1, ("--method full", "trains the backbone"),
         script="pvp_pretrain.py"),
    Case("pretrain-per-class-with-data-on-disk", imagefolder, pp(data="imagefolder", data_root="{data}"), 1,
         ("--per-class", "--data imagefolder", "drop it"), script="pvp_pretrain.py"),
    Case("pretrain-resume-without-file", None, pp(resume=True), 0,
         ("no resume file at {tmp}/m.safetensors.resume", "from scratch"), script="pvp_pretrain.py", then=None),
    Case("two-pretrains-one-out", None, pp(per_class="16"), 0, ("wrote",), script="pvp_pretrain.py",
         during=second_pretrain, then=None),
    Case("results-with-broken-lines", broken_lines, fs(method="linear,vpt"), 0,
         ("warning: {out}/results.jsonl: skipped 2 line(s)", "(line 2, 3)", "saved:"), then=broken_lines_then),
    Case("opt-of-the-wrong-kind", None, fs(method="vpt", opt="deep=2"), 1,
         ("vpt's option deep is True or False", "got 2")),
    Case("opt-not-a-finite-number", None, fs(method="vpt", opt="dropout=nan"), 1, ("--method vpt", "dropout", "nan")),
    Case("opt-out-of-range", None, fs(method="vpt", opt="num_prompts=-1"), 1, ("--method vpt", "num_prompts >= 0")),
    Case("opt-lora-alpha-negative", None, fs(method="lora", opt="alpha=-1"), 1, ("--method lora", "alpha", "-1")),
    Case("opt-named-option-nobody-takes", None, fs(method="vpt", opt="rank=4"), 1,
         ("--opt rank", "none of --method vpt")),
    Case("method-list-with-an-empty-name", None, fs(method="vpt,,lora"), 1, ("--method 'vpt,,lora'", "empty name")),
    Case("method-all-in-a-list", None, fs(method="all,pvp"), 1, ("'all' stands alone",)),
    Case("seeds-twice", None, fs(seeds="1,1"), 1, ("--seeds 1,1", "twice")),
    Case("seeds-not-ascii-digits", None, fs(seeds="1_0"), 1, ("--seeds", "'1_0'")),
    Case("device-cpu-with-an-index", None, fs(device="cpu:1"), 1, ("--device cpu:1", "only CUDA devices are numbered")),
    Case("master-port-not-a-number", None, fs(), 1, ("MASTER_PORT=notaport", "whole numbers"), env=dict(
        LOCAL_RANK="0", RANK="0", WORLD_SIZE="1", MASTER_ADDR="localhost", MASTER_PORT="notaport")),
    Case("cache-under-a-file", file_at("cachefile"), fs(), 1, ("NANOPETL_CACHE={tmp}/cachefile/sub", "under, a file"),
         env=dict(NANOPETL_CACHE="{tmp}/cachefile/sub")),
    Case("pretrain-lr-huge", None, pp(lr="1e38"), 1, ("--lr", "at most 10000"), script="pvp_pretrain.py"),
    Case("pretrain-method-pvp", None, pp(method="pvp"), 1, ("--method pvp", "choose one of vpt-shallow, vpt, e2vpt"),
         script="pvp_pretrain.py"),
    Case("pretrain-linear", None, pp(method="linear"), 1, ("--method linear", "only a head"), script="pvp_pretrain.py"),
    Case("pretrain-opt-unknown", None, pp(method="lora", opt="bottleneck=8"), 1, ("--method lora", "bottleneck"),
         script="pvp_pretrain.py"),
    Case("vpt-script-bad-argument", None, ["--bogus"], 2, ("unrecognized arguments: --bogus",), script="vpt.py",
         then=None),
    Case("lora-script-bad-argument", None, ["--rank", "4"], 2, ("unrecognized arguments",), script="lora.py",
         then=None),
    Case("e2vpt-script-bad-argument", None, ["x"], 2, ("unrecognized arguments",), script="e2vpt.py", then=None),
    # --- data.py: images, layouts, annotations ---
    Case("fifo-in-class-folder", lambda w: imagefolder(w) or os.mkfifo(w.data / "test" / "dog" / "pipe.jpg"), fs(**IF),
         1, ("image {data}/test/dog/pipe.jpg is not a regular file (a FIFO", "replace it"), cli=True),  # cli: timeout
    Case("image-60000x1", image_in("test/cat/strip.png", lambda: Image.new("L", (60000, 1))), fs(**IF), 1,
         ("image {data}/test/cat/strip.png is 60000x1 px", "over 100x the other"), cli=True),  # cli: memory-capped
    Case("decompression-bomb", image_in("test/eel/bomb.png", lambda: Image.new("1", (10_000, 9_000))), fs(**IF), 1,
         ("image {data}/test/eel/bomb.png has 10000x9000 = 90,000,000 pixels", "decompression-bomb limit",
          "downscale it")),
    Case("hidden-folders-and-files-skipped", hidden_junk, fs(**IF), 0, ("saved:",), then=classes_are(3)),
    Case("nested-images-found", nested, fs(**IF), 0, ("saved:",), then=classes_are(3)),
    Case("val-without-test-imagefolder", val_not_test, fs(**IF), 1,
         ("imagefolder: {data} has val/ but no test/", "add test/<class>/<image>", "--data imagenet")),
    Case("val-without-test-imagenet", val_not_test, fs(data="imagenet", data_root="{data}"), 0, ("saved:",),
         then=classes_are(3)),
    Case("fgvc-json-a-list", lambda w: fgvc_json(w, train=[["cat.jpg", 0], ["dog.jpg", 1]]),
         fs(data="fgvc-json", data_root="{data}"), 1,
         ("{data}/train.json: a JSON list where an object of image path -> class id belongs",)),
    Case("fgvc-json-with-bom", lambda w: fgvc_json(w, bom=True), fs(data="fgvc-json", data_root="{data}"), 0,
         ("saved:",), then=classes_are(3)),
    Case("noah-list-latin-1", latin1_line("annotations/test_meta.list", "caf\xe9.jpg 0\n", noah),
         fs(data="noah-fewshot", data_root="{data}"), 1,
         ("{data}/annotations/test_meta.list:4: byte 0xe9 is not UTF-8 text", "save the file as UTF-8")),
    Case("vtab-list-latin-1", latin1_line("kitti/test.txt", "images/test/\xe9t\xe9.jpg 0\n", vtab),
         fs(data="vtab1k", data_root="{data}", vtab_task="kitti"), 1, ("{data}/kitti/test.txt:5: byte 0xe9",)),
    Case("max-gb-not-a-number", lambda w: imagefolder(w) or w.mp.setenv("NANOPETL_MAX_GB", "8GB"), fs(**IF), 1,
         ("NANOPETL_MAX_GB='8GB' is not a positive number",)),
    Case("max-gb-not-a-number-synthetic", None, fs(), 1, ("NANOPETL_MAX_GB='-3' is not a positive number",),
         env=dict(NANOPETL_MAX_GB="-3")),
    Case("over-max-gb", lambda w: imagefolder(w) or w.mp.setenv("NANOPETL_MAX_GB", "1e-9"), fs(**IF), 0,  # streams
         ("test 6 images", "streamed from disk", "(--cache-gb 1e-09 GB)", "saved:"), then=one_ok_run),
    Case("data-script-bad-flag", None, ["--bogus"], 2, ("unrecognized arguments: --bogus",), script="data.py"),
    Case("data-script-sheet-not-writable", not_writable, ["--sheet", "{ro}/sheet.png"], 1,
         ("cannot write the contact sheet {ro}/sheet.png (--sheet)", "choose another path"), script="data.py"),
    # --- vit.py: loader faults
    Case("weights-with-nan", lambda w: edited(w, "nan", "blocks.2.mlp.fc1.weight", lambda v: poisoned(v, nan=2, inf=1)),
         fs(weights="{tmp}/nan.safetensors"), 1,
         ("{tmp}/nan.safetensors", "blocks.2.mlp.fc1.weight holds 2 NaN and 1 infinite", "earlier checkpoint")),
    Case("weights-integer-tensor", lambda w: edited(w, "int", "pos_embed", lambda v: (v * 100).long()),
         fs(weights="{tmp}/int.safetensors"), 1, ("{tmp}/int.safetensors", "pos_embed (int64)", "not floating point")),
    Case("weights-pos-embed-without-a-grid", lambda w: edited(w, "pos7", "pos_embed", lambda v: v[:, :7]),
         fs(weights="{tmp}/pos7.safetensors"), 1, ("{tmp}/pos7.safetensors", "pos_embed has 7 positions")),
    Case("weights-pos-embed-2d-without-cls", lambda w: edited(w, "pos2d", "pos_embed", lambda v: v[0, 1:]),
         fs(weights="{tmp}/pos2d.safetensors"), 0, ("pos_embed given a zero CLS position", "saved:"), then=one_ok_run),
    Case("named-weights-placed-by-hand-wrong", lambda w: (w.tmp / "cache").mkdir() or (
        w.tmp / "cache" / "ViT-B_16.npz").write_bytes(b"not the published file"), fs(weights="vit_b16_in21k"), 1,
         ("{tmp}/cache/ViT-B_16.npz", "does not start with d9715d", "Delete it"), cli=True),  # cli: NANOPETL_CACHE
    Case("vit-py-unknown-flag", None, ["--bogus"], 2, ("unrecognized arguments: --bogus",), script="vit.py"),
    Case("vit-py-unknown-preset", None, ["--preset", "vit_huge"], 2, ("--preset", "invalid choice: 'vit_huge'"),
         script="vit.py"),
    Case("vit-py-weights-with-inf", lambda w: edited(w, "inf", "norm.bias", lambda v: poisoned(v, inf=128)),
         ["--preset", "vit_synthetic", "--weights", "{tmp}/inf.safetensors"], 1,
         ("{tmp}/inf.safetensors", "norm.bias holds 0 NaN and 128 infinite"), script="vit.py"),
    # --- streaming: a bad image mid-stream, shards, workers ---
    Case("bad-image-in-a-stream", break_image("train/cat/0.jpg", "truncated"),
         fs(**IF, method="linear,vpt", shots="1,2", cache_gb="0", workers="1"), 1,
         ("cannot read image {data}/train/cat/0.jpg", "truncated", "replace it or drop it"), then=one_shot_runs_kept,
         cli=True),  # a real process: loader workers left in this one would cost the next row seconds to shut down
    Case("loader-worker-killed", imagefolder, fs(**IF, method="linear,vpt", shots="1,2", cache_gb="0", workers="1"), 1,
         ("a data loader worker died", "exited unexpectedly", "memory ran out", "kept in {out}/results.jsonl",
          "fewer --workers", "run the same command again"), hook=WORKER_KILLED, then=one_shot_runs_kept),
    Case("workers-past-the-cpus", None, fs(workers="100000"), 1, ("--workers must be 0 to", "the CPUs", "got 100000")),
    Case("shard-out-of-range", None, fs(shard="2/2"), 1, ("--shard 2/2", "0 <= i < n", "--shard 0/4")),
    Case("workers-negative", None, fs(workers="-1"), 1, ("--workers must be 0", "got -1")),
    Case("pretrain-save-every-negative", None, pp(save_every="-1"), 1, ("--save-every must be at least 0, got -1",),
         script="pvp_pretrain.py"),
]


def edited(w, name, key, change):  # vit.py's rows (called when a row runs)
    """The rows' tiny backbone saved as {tmp}/<name>.safetensors, with tensor `key` replaced by change(a copy)."""
    from safetensors.torch import load_file
    sd = load_file(w.bb)
    save_file({**sd, key: change(sd[key].clone()).contiguous()}, w.tmp / f"{name}.safetensors")


def poisoned(v, nan=0, inf=0):
    """v with its first `nan` values NaN and the next `inf` infinite."""
    v.view(-1)[:nan], v.view(-1)[nan:nan + inf] = float("nan"), float("inf")
    return v


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_fault(case, w):
    if case.setup:
        case.setup(w)
    args = fill(case.argv, w)
    if case.cli or case.hook or case.during or case.env:
        proc = spawn(case.script, args, w, case.hook,
                     extra_env={k: fill([v], w)[0] for k, v in (case.env or {}).items()})
        if case.during:
            case.during(proc, w)
        r = finish(proc)
    else:
        r = in_process(case.script, args)
    shown = f"exit {r.code}\n--- stderr (tail)\n{r.err[-3000:]}\n--- stdout (tail)\n{r.out[-1500:]}"
    assert r.code == case.code, shown
    assert "Traceback" not in r.err, shown
    says = fill(case.says, w)
    if case.code in (0, 130):  # not an error: the message is in the output
        assert not any(line.startswith("error:") for line in r.err.splitlines()), shown
        assert all(s in r.out + r.err for s in says), shown
    elif case.code > 0:  # exactly one error line, which says it all
        errors = [line for line in re.split(r"[\r\n]", r.err) if re.match(r"(\S+: )?error:", line)]
        assert len(errors) == 1, shown
        missing = [s for s in says if s not in errors[0]]
        assert not missing, f"{missing} not in the message\n{errors[0]}"
    if case.then:
        case.then(w, r)


def test_ctrl_c_rows_hold_when_the_suite_ignores_sigint(world, tmp_path, monkeypatch):
    """A suite started from a background shell inherits SIGINT ignored; the row's child must still get Ctrl-C."""
    [case] = [c for c in CASES if c.name == "ctrl-c"]
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        test_fault(case, SimpleNamespace(**world, tmp=tmp_path, out=tmp_path / "out", data=tmp_path / "data",
                                         mp=monkeypatch, ro=tmp_path / "ro"))
    finally:
        signal.signal(signal.SIGINT, previous)

"""Every number a sweep prints belongs to the command that printed it: a results line's key covers
what made it, a shared --out never hands back another run's numbers, and builders of one checkpoint take turns.
Each test drives fewshot.main / pvp_pretrain.main with argv, as the command line does."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import fewshot
import plumbing
import pvp_pretrain
import vit
from fixtures import WAITING, first_then_second, save_backbone

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
ENV.pop("LOCAL_RANK", None)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A backbone and two module checkpoints made on it (VPT-deep and LoRA, one epoch on 2 images per class)."""
    d = tmp_path_factory.mktemp("identity")
    bb = save_backbone(d / "bb.safetensors", seed=0)
    for method in ("vpt", "lora"):
        assert pvp_pretrain.main(["--weights", str(bb), "--arch", "vit_synthetic", "--per-class", "2", "--epochs", "1",
                                  "--method", method, "--out", str(d / f"{method}.safetensors")]) == 0
    return d


def sweep(world, out, *extra, weights=None):
    """fewshot.py at a micro budget; flags in `extra` come last, so they override (argparse keeps the last)."""
    return fewshot.main(["--weights", str(weights or world / "bb.safetensors"), "--arch", "vit_synthetic", "--data",
                         "synthetic:shape", "--shots", "1", "--seeds", "0", "--max-steps", "2", "--method", "linear",
                         "--out", str(out), *extra])


def records(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_another_synthetic_task_on_one_out_prints_only_its_table(world, tmp_path, capsys):
    assert sweep(world, tmp_path, "--data", "synthetic:shape") == 0
    assert sweep(world, tmp_path, "--data", "synthetic:texture") == 0
    assert [r["dataset"] for r in records(tmp_path)] == ["synthetic:shape", "synthetic:texture"]
    summary = (tmp_path / "summary.md").read_text()
    assert summary.startswith("synthetic:texture") and summary.count("| linear | 1 |") == 1
    [texture] = [r for r in records(tmp_path) if r["dataset"] == "synthetic:texture"]
    assert f"| linear | 1 | {texture['test_top1']:.2f} |" in summary  # texture's number, not the mean with shape


def image_folder(root, seed):
    g = torch.Generator().manual_seed(seed)
    for split, n in (("train", 4), ("test", 2)):
        for c in ("a", "b"):
            for i in range(n):
                (root / split / c).mkdir(parents=True, exist_ok=True)
                pixels = torch.randint(0, 256, (16, 16, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")
    return root


def test_two_image_folders_on_one_out_both_run(world, tmp_path):
    one, two = image_folder(tmp_path / "one", 0), image_folder(tmp_path / "two", 1)
    for root in (one, two):
        assert sweep(world, tmp_path / "out", "--data", "imagefolder", "--data-root", str(root),
                     "--img-size", "32") == 0
    rs = records(tmp_path / "out")
    assert len(rs) == 2 and rs[0]["key"] != rs[1]["key"]
    assert {r["identity"]["data"]["root"] for r in rs} == {str(one.resolve()), str(two.resolve())}


def test_a_replaced_weights_file_runs_again(world, tmp_path):
    path = save_backbone(tmp_path / "bb.safetensors", seed=0)
    assert sweep(world, tmp_path / "out", weights=path) == 0
    assert sweep(world, tmp_path / "out", weights=path) == 0  # the same file: skipped
    save_backbone(path, seed=1)  # same path, other weights
    assert sweep(world, tmp_path / "out", weights=path) == 0
    rs = records(tmp_path / "out")
    assert len(rs) == 2 and rs[0]["identity"]["backbone"] != rs[1]["identity"]["backbone"]


def test_two_pvp_modules_both_run_and_the_table_tells_them_apart(world, tmp_path):
    for module in ("vpt", "lora"):
        assert sweep(world, tmp_path, "--method", "pvp", "--pvp-init", str(world / f"{module}.safetensors")) == 0
        assert f"| pvp({module}) | 1 |" in (tmp_path / "summary.md").read_text()
    rs = records(tmp_path)
    assert [r["row"] for r in rs] == ["pvp(vpt)", "pvp(lora)"] and rs[0]["key"] != rs[1]["key"]
    assert rs[1]["identity"]["options"]["config"]["rank"] == 8 and rs[1]["pvp_init"].endswith("lora.safetensors")


def test_a_changed_option_runs_again_and_an_unrelated_one_does_not(world, tmp_path):
    assert sweep(world, tmp_path, "--method", "vpt", "--prompts", "10") == 0
    assert sweep(world, tmp_path, "--method", "vpt", "--prompts", "5") == 0
    assert sweep(world, tmp_path, "--method", "vpt", "--prompts", "5", "--rank", "4") == 0  # vpt takes no rank
    rs = records(tmp_path)
    assert [r["config"]["num_prompts"] for r in rs] == [10, 5]
    assert sweep(world, tmp_path, "--method", "vpt", "--opt", "dropout=0.0", "--prompts", "5") == 0
    assert records(tmp_path)[-1]["config"] == dict(num_prompts=5, deep=True, dropout=0.0, init="vpt")


def test_results_lines_that_are_not_whole_records_are_skipped_with_one_warning(world, tmp_path, capsys):
    assert sweep(world, tmp_path, "--method", "linear,vpt") == 0
    good = (tmp_path / "results.jsonl").read_text().splitlines()
    broken = dict(json.loads(good[1]), test_top1="high")  # a field of the wrong type: that run runs again
    (tmp_path / "results.jsonl").write_text("\n".join([good[0], "not json", "[1, 2]", '{"key": "x"}',
                                                        json.dumps(broken), "\xff\xfe"]) + "\n")
    capsys.readouterr()
    assert sweep(world, tmp_path, "--method", "linear,vpt") == 0
    err = capsys.readouterr().err
    assert "skipped 5 line(s)" in err and "line 2, 3, 4, 5, 6" in err and "Traceback" not in err
    assert (tmp_path / "summary.md").read_text().count("| 1 |") == 2  # both rows: the good line and the re-run


def test_pretrain_resume_refuses_another_recipe_and_says_when_it_starts_fresh(world, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    base = ["--weights", str(world / "bb.safetensors"), "--arch", "vit_synthetic", "--per-class", "2",
            "--out", str(out)]
    assert pvp_pretrain.main([*base, "--epochs", "1", "--resume"]) == 0
    assert "no resume file" in capsys.readouterr().out
    state = dict(model={}, optimizer={}, epoch=0, recipe=json.dumps(dict(pvp_pretrain.recipe(
        pvp_pretrain.parse([*base, "--epochs", "1", "--lr", "0.1"]), "h", {}))))
    torch.save(state, str(out) + ".resume")
    with pytest.raises(vit.CheckpointError, match=r"another run .*lr 0.1 there, 0.005 here.*delete it"):
        pvp_pretrain.main([*base, "--epochs", "1", "--resume"])


def spawn_pretrain(world, out, *extra):
    argv = ["--weights", str(world / "bb.safetensors"), "--arch", "vit_synthetic", "--per-class", "4", "--epochs", "2",
            "--device", "cpu", "--out", str(out), *extra]
    return subprocess.Popen([sys.executable, str(ROOT / "pvp_pretrain.py"), *argv], cwd=ROOT, text=True,
                            env={**ENV, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_two_pretrainings_of_one_out_take_turns_and_the_second_reuses(world, tmp_path):
    """Started at once, the first takes the lock and the second waits for it (first_then_second), however small
    the pre-training."""
    out = tmp_path / "m.safetensors"
    first, second, said = first_then_second(str(out) + ".lock", lambda i: spawn_pretrain(
        world, out, "--per-class", "1", "--epochs", "1"))
    (o1, e1), (o2, e2) = first.communicate(timeout=300), second.communicate(timeout=300)
    o1, o2 = said[0] + o1, said[1] + o2
    assert WAITING in o2, o2[-2000:] + e2[-2000:]
    assert first.returncode == second.returncode == 0, e1[-2000:] + e2[-2000:]
    assert o1.count("wrote ") + o2.count("wrote ") == 1 and "reusing it" in o1 + o2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]  # no temporary or lock file left


def test_two_sweeps_on_a_fresh_checkout_build_the_embedded_pieces_once(world, tmp_path):
    code = (f"import sys, fewshot, plumbing; from pathlib import Path\n"
            f"plumbing.CHECKPOINTS = Path({str(tmp_path / 'checkpoints')!r})\n"
            f"plumbing.SHIPPED_BACKBONE = Path({str(world / 'bb.safetensors')!r})\n"
            f"plumbing.EMBEDDED_BUILD = ['--per-class', '1', '--epochs', '1', '--device', 'cpu']\n"
            f"sys.exit(fewshot.main(['--method', 'pvp', '--data', 'synthetic:shape', '--shots', '1', '--seeds', '0', "
            f"'--max-steps', '2', '--out', sys.argv[1]]))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / f"out{i}")], cwd=ROOT, env=ENV, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in (1, 2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    said = "".join(o for o, _ in outs)
    assert said.count("wrote ") == 1  # built once: the other found it built, or waited for it and reused it
    assert said.count("building the embedded PVP prompts") == 1 or "reusing it" in said
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["pvp_vpt_vit_synthetic.safetensors"]


def test_an_interrupted_embedded_build_resumes_on_the_next_run(world, tmp_path, monkeypatch, capfd):
    path = tmp_path / "checkpoints" / "pvp_vpt_vit_synthetic.safetensors"
    monkeypatch.setattr(plumbing, "CHECKPOINTS", tmp_path / "checkpoints")
    monkeypatch.setattr(plumbing, "SHIPPED_BACKBONE", world / "bb.safetensors")
    monkeypatch.setattr(plumbing, "EMBEDDED_BUILD", ["--per-class", "1", "--epochs", "3", "--device", "cpu"])
    # the build fewshot would start, then killed after epoch 1
    proc = spawn_pretrain(world, path, "--per-class", "1", "--epochs", "3")
    resume, deadline = Path(str(path) + ".resume"), time.time() + 120
    while not resume.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL), proc.communicate()
    assert resume.exists() and not path.exists(), "the build finished before it could be killed"
    backbone, _ = plumbing.load_backbone(None)
    assert plumbing.embedded_pvp(backbone, fewshot.METHODS) == path and path.exists()
    assert "resuming" in capfd.readouterr().out

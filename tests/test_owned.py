"""A runner writes only what it owns: no output follows a link planted in --out, and a builder's --out that holds a
file it did not write (or a link, or a device) is refused with one line and left byte for byte as it was."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures import WAITING, first_then_second, save_backbone

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bb(tmp_path_factory):
    return save_backbone(tmp_path_factory.mktemp("owned") / "bb.safetensors", seed=0)


def run(script, *argv, cwd):
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HOME": str(cwd)}
    return subprocess.run([sys.executable, str(ROOT / script), *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def one_line_refusal(r, *says):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error:"), r.stderr[-2000:]
    assert all(s in lines[0] for s in says) and "Traceback" not in r.stderr


@pytest.mark.parametrize("name", ["results.jsonl", "summary.md", "accuracy_vs_shots.png", ".claims"])
def test_a_link_planted_in_out_is_refused_and_its_target_untouched(bb, tmp_path, name):
    import fewshot
    import plumbing
    target = tmp_path / "precious.txt"
    target.write_bytes(b"somebody else's file\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / name).symlink_to(target)
    with pytest.raises(plumbing.UsageError, match=f"{name} is a link"):
        fewshot.main(["--weights", str(bb), "--arch", "vit_synthetic", "--data", "synthetic:shape", "--shots", "1",
                      "--seeds", "0", "--max-steps", "2", "--method", "linear", "--out", str(out), "--plot"])
    assert target.read_bytes() == b"somebody else's file\n" and sorted(p.name for p in out.iterdir()) == [name]


def test_a_planted_results_link_ends_the_command_in_one_line(bb, tmp_path):
    target = tmp_path / "precious.txt"
    target.write_bytes(b"somebody else's file\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.jsonl").symlink_to(target)
    r = run("fewshot.py", "--weights", str(bb), "--arch", "vit_synthetic", "--data", "synthetic:shape", "--shots", "1",
            "--seeds", "0", "--max-steps", "2", "--method", "linear", "--out", str(tmp_path / "out"), cwd=tmp_path)
    one_line_refusal(r, "results.jsonl", "link")
    assert target.read_bytes() == b"somebody else's file\n"


@pytest.mark.parametrize("kind", ["text", "link-to-text", "device"])
def test_pretrain_out_that_is_not_its_checkpoint_is_refused_and_left_as_it_was(bb, tmp_path, kind):
    import plumbing
    import pvp_pretrain
    other = tmp_path / "notes.txt"
    other.write_bytes(b"not a checkpoint\n")
    out = {"text": other, "device": Path("/dev/null")}.get(kind, tmp_path / "link.safetensors")
    if kind == "link-to-text":
        out.symlink_to(other)
    with pytest.raises(plumbing.UsageError, match="not a checkpoint this command wrote"):
        pvp_pretrain.main(["--weights", str(bb), "--arch", "vit_synthetic", "--per-class", "1", "--epochs", "1",
                           "--device", "cpu", "--out", str(out)])
    assert other.read_bytes() == b"not a checkpoint\n" and (kind != "link-to-text" or out.is_symlink())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["notes.txt"] + ["link.safetensors"] * (
        kind == "link-to-text"))  # no lock, resume or temporary file left either


def test_the_backbone_builder_refuses_a_foreign_out_too(tmp_path):
    other = tmp_path / "weights.safetensors"
    other.write_bytes(os.urandom(64))
    before = other.read_bytes()
    r = run("tools/build_backbone.py", "--per-class", "1", "--epochs", "1", "--out", str(other), cwd=tmp_path)
    one_line_refusal(r, str(other), "not a checkpoint this command wrote")
    assert other.read_bytes() == before


def test_written_files_follow_the_umask(tmp_path):
    import plumbing
    for mask, mode in ((0o022, 0o644), (0o077, 0o600), (0o002, 0o664)):
        before = os.umask(mask)
        try:
            plumbing.atomic(lambda p: Path(p).write_text("x"), tmp_path / f"f{mask:o}")
        finally:
            os.umask(before)
        assert (tmp_path / f"f{mask:o}").stat().st_mode & 0o777 == mode


def test_torchs_writer_on_a_full_disk_ends_in_one_line(tmp_path, monkeypatch):
    import shutil

    import torch

    import plumbing

    def full_disk(p):
        raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(100, 100, 0))
    with pytest.raises(OSError) as e:
        plumbing.atomic(lambda p: full_disk(p) or torch.save({}, p), tmp_path / "m.resume")
    line = plumbing.os_error_line(e.value, "the last checkpoint is kept")
    assert "m.resume" in line and "free some space" in line and "\n" not in line
    assert list(tmp_path.iterdir()) == []  # no temporary file left


def test_two_pretrainings_with_other_recipes_on_one_out_never_both_write(bb, tmp_path):
    """Started at once, the first takes the lock and the second waits for it (first_then_second), however small
    the first's pre-training."""
    out = tmp_path / "m.safetensors"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HOME": str(tmp_path),
           "PYTHONUNBUFFERED": "1"}
    argv = lambda n: [sys.executable, str(ROOT / "pvp_pretrain.py"), "--weights", str(bb), "--arch",  # noqa: E731
                      "vit_synthetic", "--per-class", n, "--epochs", "1", "--out", str(out)]
    first, second, said = first_then_second(str(out) + ".lock", lambda i: subprocess.Popen(
        argv(["1", "8"][i]), cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    (o1, e1), (o2, e2) = first.communicate(timeout=300), second.communicate(timeout=300)
    o1, o2 = said[0] + o1, said[1] + o2
    assert WAITING in o2, o2[-2000:] + e2[-2000:]
    assert first.returncode == 0 and "wrote " in o1, e1[-2000:]
    assert second.returncode == 1 and "wrote " not in o2 and "another recipe" in e2 and "Traceback" not in e2, e2


def test_tqdm_disable_is_obeyed_by_every_bar(tmp_path):
    """Decoding a split of 500 images or more shows a bar, unless TQDM_DISABLE=1 says no bar at all."""
    from PIL import Image
    Image.new("RGB", (8, 8), (10, 200, 30)).save(tmp_path / "a.png")
    code = (f"import data; data._decode([({str(tmp_path / 'a.png')!r}, 0)] * 500, 8, 8, 'bilinear', 8, 'decoding')")
    for disabled in ("1", None):
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"} | (
            {"TQDM_DISABLE": disabled} if disabled else {})
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and ("decoding" in r.stderr) == (disabled is None), r.stderr[-1000:]


@pytest.mark.parametrize("text", ["²", "٣", "1²"])
def test_digits_int_would_misread_are_refused_with_one_line(text, tmp_path):
    import data
    import fewshot
    import plumbing
    cfg = fewshot.parse(["--shard", f"{text}/4", "--out", str(tmp_path / "out")])
    with pytest.raises(plumbing.UsageError, match="--shard"):
        plumbing.check_sweep(cfg, fewshot.METHODS, fewshot.RECIPES, fewshot.FLAGS, fewshot.method_options)
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "list.txt").write_text(f"a.png {text}\n", encoding="utf-8")
    with pytest.raises(data.DataError, match="the label a class number"):
        data._list(tmp_path / "list.txt", tmp_path)

"""A runner writes only what it owns: no output follows a link planted in --out, and a builder's --out that holds a
file it did not write (or a link, or a device) is refused with one line and left byte for byte as it was."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures import save_backbone

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
    target = tmp_path / "precious.txt"
    target.write_bytes(b"somebody else's file\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / name).symlink_to(target)
    r = run("fewshot.py", "--weights", str(bb), "--arch", "vit_synthetic", "--data", "synthetic:shape", "--shots", "1",
            "--seeds", "0", "--max-steps", "2", "--method", "linear", "--out", str(out), "--plot", cwd=tmp_path)
    one_line_refusal(r, name, "link")
    assert target.read_bytes() == b"somebody else's file\n"


@pytest.mark.parametrize("kind", ["text", "link-to-text", "device"])
def test_pretrain_out_that_is_not_its_checkpoint_is_refused_and_left_as_it_was(bb, tmp_path, kind):
    other = tmp_path / "notes.txt"
    other.write_bytes(b"not a checkpoint\n")
    out = {"text": other, "device": Path("/dev/null")}.get(kind, tmp_path / "link.safetensors")
    if kind == "link-to-text":
        out.symlink_to(other)
    r = run("pvp_pretrain.py", "--weights", str(bb), "--arch", "vit_synthetic", "--per-class", "1", "--epochs", "1",
            "--out", str(out), cwd=tmp_path)
    one_line_refusal(r, str(out), "not a checkpoint this command wrote")
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

"""No stale number: a run's key holds the code it ran (each project source by its syntax tree), so an edit of a method
file runs its runs again and says why, an edit of a comment does not, a line written before code was keyed runs again
with that reason, and option values that mean the same are one run."""
import json
import os
import shutil
from pathlib import Path

import pytest

import fewshot
import plumbing
from fixtures import run_copy, save_backbone

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bb(tmp_path_factory):
    return save_backbone(tmp_path_factory.mktemp("stale") / "bb.safetensors", seed=0)


def argv(bb, out, *extra):
    return ["--weights", str(bb), "--arch", "vit_synthetic", "--data", "synthetic:shape", "--shots", "1", "--seeds",
            "0", "--max-steps", "2", "--method", "vpt", "--device", "cpu", "--out", str(out), *extra]


def lines(out):
    return (Path(out) / "results.jsonl").read_text().splitlines()


@pytest.mark.slow
def test_an_edited_method_file_runs_again_and_says_why_a_comment_does_not(bb, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for f in ROOT.glob("*.py"):
        shutil.copy(f, repo / f.name)
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo), "HOME": str(tmp_path),
           "TQDM_DISABLE": "1"}
    run = lambda: run_copy(repo, "fewshot.py", *argv(bb, tmp_path / "out"), env=env)  # noqa: E731 (repo's own modules)
    first = run()
    assert first.returncode == 0 and len(lines(tmp_path / "out")) == 1, first.stderr[-2000:]
    vpt = (repo / "vpt.py").read_text()
    (repo / "vpt.py").write_text(vpt + "\n# a comment, and blank lines, are not code\n\n")
    again = run()
    assert again.returncode == 0 and len(lines(tmp_path / "out")) == 1 and "re-running" not in again.stderr
    (repo / "vpt.py").write_text(vpt.replace("self.num_prompts, self.deep = num_prompts, deep",
                                             "self.num_prompts, self.deep = num_prompts, bool(deep)"))
    edited = run()
    assert edited.returncode == 0 and len(lines(tmp_path / "out")) == 2, edited.stderr[-2000:]
    assert "the code changed since its line in results.jsonl (vpt.py): re-running it" in edited.stderr
    old, new = (json.loads(x)["identity"]["code"] for x in lines(tmp_path / "out"))
    assert {f for f in old if old[f] != new[f]} == {"vpt.py"} and {"fewshot.py", "plumbing.py", "vit.py",
                                                                     "data.py", "vpt.py"} == set(old)


def test_a_line_written_before_code_was_keyed_runs_again_with_that_reason(bb, tmp_path, capsys):
    assert fewshot.main(argv(bb, tmp_path)) == 0
    [line] = lines(tmp_path)
    r = json.loads(line)
    del r["identity"]["code"], r["identity"]["run"]  # as a line written before the key held the code
    r["key"] = r["key"].rsplit("|", 1)[0] + "|0123456789abcdef"
    (tmp_path / "results.jsonl").write_text(json.dumps(r) + "\n")
    capsys.readouterr()
    assert fewshot.main(argv(bb, tmp_path)) == 0
    assert "written before the code was keyed: re-running" in capsys.readouterr().err and len(lines(tmp_path)) == 2


def test_option_values_that_mean_the_same_are_one_run(bb, tmp_path):
    assert fewshot.main(argv(bb, tmp_path, "--opt", "dropout=0")) == 0
    assert fewshot.main(argv(bb, tmp_path, "--opt", "dropout=0.0")) == 0
    assert len(lines(tmp_path)) == 1
    assert fewshot.main(argv(bb, tmp_path, "--opt", "dropout=0.05")) == 0
    assert len(lines(tmp_path)) == 2


def test_the_key_holds_the_code_and_where_it_ran(bb, tmp_path):
    assert fewshot.main(argv(bb, tmp_path)) == 0
    identity = json.loads(lines(tmp_path)[0])["identity"]
    assert set(identity["code"]) == {"fewshot.py", "plumbing.py", "vit.py", "data.py", "vpt.py"}
    assert identity["run"]["device"] == "cpu" and identity["run"]["torch"] and os.sep not in identity["code"]["vpt.py"]


def test_a_one_item_list_option_is_a_list(tmp_path):
    cfg = fewshot.parse(["--method", "lora", "--opt", "targets=qkv", "--out", str(tmp_path)])
    assert fewshot.method_options("lora", cfg)["targets"] == ["qkv"]
    methods, _, _, configs = plumbing.check_sweep(cfg, fewshot.METHODS, fewshot.RECIPES, fewshot.FLAGS,
                                                  fewshot.method_options)
    assert configs["lora"]["targets"] == ("qkv",) or list(configs["lora"]["targets"]) == ["qkv"]

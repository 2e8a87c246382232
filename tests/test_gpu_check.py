"""tests/gpu_check.py, the one command for a GPU machine, run here at micro size on the CPU (--tiny) so every line of
it runs in CI and cannot rot before the GPU run it exists for. Its CUDA-only checks must say "skipped" with the
reason on a CPU, never "pass"; a check that raises must be reported as failed, with exit code 1, and the results
of the other checks kept (--only reruns some)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fewshot

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ["parity", "train", "speed", "data", "torchrun", "e2e"]
CUDA_ONLY = ["parity", "speed", "torchrun"]  # on a CPU they run their code, and say it proves nothing about CUDA


def gpu_check(tmp, *argv):
    env = {**os.environ, "NANOPETL_CACHE": str(tmp / "cache"), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "tests" / "gpu_check.py"), "--tiny", "--out", str(tmp / "out"),
                           *argv], cwd=tmp, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_check")
    return tmp, gpu_check(tmp)


def report(tmp):
    return json.loads((tmp / "out" / "gpu_check.json").read_text())


def test_every_check_passes_or_is_skipped_with_its_reason(tiny):
    tmp, r = tiny
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    checks = report(tmp)["checks"]
    assert list(checks) == CHECKS
    for name, c in checks.items():
        assert c["status"] in ("pass", "skipped") and c["rows"] and c["figure"], (name, c)
        assert all(row["status"] in ("pass", "skipped") for row in c["rows"]), (name, c["rows"])
    for name in CUDA_ONLY:
        assert checks[name]["status"] == "skipped" and "not CUDA" in checks[name]["detail"], checks[name]
    assert all(checks[name]["status"] == "pass" for name in ("train", "data", "e2e"))
    for name in ("parity", "train"):  # every registered method, by the registry
        assert [row["name"] for row in checks[name]["rows"]] == list(fewshot.METHODS)
    assert checks["speed"]["figures"]["model_rates"]["train"] > 0 and checks["data"]["figures"]["model_train"] > 0
    assert "tiny" in checks["e2e"]["detail"]  # says the main job ran on a random backbone, not the embedded build
    assert {p.name for p in (tmp / "out" / "logs").iterdir()} >= {"e2e-main_job.log", "torchrun-sweep.log"}


def test_the_table_lists_every_check_and_is_printed(tiny):
    tmp, r = tiny
    md = (tmp / "out" / "gpu_check.md").read_text()
    checks = report(tmp)["checks"]
    for name in CHECKS:
        row = f"| **{name}** | {checks[name]['status']} |"
        assert row in md and row in r.stdout, name
    assert "| check | status | figure | detail |" in md


def test_a_failing_check_is_reported_failed_and_the_others_are_kept(tiny):
    tmp, _ = tiny
    before = report(tmp)["checks"]
    r = gpu_check(tmp, "--only", "parity,train", "--inject-fail", "parity", "--budget-s", "0")
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    checks = report(tmp)["checks"]
    assert checks["parity"]["status"] == "fail" and "injected failure" in checks["parity"]["detail"]
    assert "Traceback" in checks["parity"]["traceback"]
    assert checks["train"]["status"] == "skipped" and "budget" in checks["train"]["detail"]  # 0 s left for it
    for name in ("speed", "data", "torchrun", "e2e"):  # not rerun: kept as they were
        assert checks[name] == before[name]
    assert "| **parity** | fail |" in (tmp / "out" / "gpu_check.md").read_text()
    assert "failed: parity" in r.stderr


def test_one_check_alone_runs_and_reports(tmp_path):
    """The quick lane's look at the acceptance script: --only train, every registered method trains a few steps."""
    r = gpu_check(tmp_path, "--only", "train")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    train = report(tmp_path)["checks"]["train"]
    assert train["status"] == "pass" and [row["name"] for row in train["rows"]] == list(fewshot.METHODS)

"""torchrun's set-up is bounded: ranks that cannot find each other end with one line within NANOPETL_SETUP_TIMEOUT.

The variables torchrun would set are given by hand, so each case is one or two plain processes, started together.
"""
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import plumbing

ROOT = Path(__file__).resolve().parents[1]
WAIT = 3  # NANOPETL_SETUP_TIMEOUT in these tests, seconds


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(tmp, tag, rank, world, port, script="fewshot.py", addr="127.0.0.1"):
    args = (["--method", "linear", "--shots", "1", "--seeds", "0", "--data", "synthetic:shape", "--out", str(tmp / tag)]
            if script == "fewshot.py" else ["--out", str(tmp / f"{tag}.safetensors")])
    env = {**os.environ, "LOCAL_RANK": "0", "RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": addr,
           "MASTER_PORT": str(port), "NANOPETL_SETUP_TIMEOUT": str(WAIT), "NANOPETL_CACHE": str(tmp / "cache"),
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / script), *args, "--device", "cpu"], cwd=tmp, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_ranks_that_cannot_meet_end_with_one_line_within_the_timeout(tmp_path):
    started = time.time()
    refused = subprocess.run([sys.executable, str(ROOT / "fewshot.py"), "--shots", "0"], capture_output=True)
    startup = time.time() - started  # python, torch and the project imported: what every case below pays first
    assert refused.returncode == 1
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0)), taken.listen()
    no_one, unheard, world = free_port(), free_port(), free_port()
    cases = {  # name: [(process, what its line holds)]
        "no other rank joins": [(start(tmp_path, "a", 0, 2, no_one), "rank 0 of WORLD_SIZE 2")],
        "nobody at MASTER_PORT": [(start(tmp_path, "b", 1, 2, unheard, "pvp_pretrain.py"), "rank 1 of WORLD_SIZE 2")],
        "port in use": [(start(tmp_path, "c", 0, 1, taken.getsockname()[1]), "address already in use")],
        "WORLD_SIZE disagrees": [(start(tmp_path, "d", 0, 2, world), "rank 0 of WORLD_SIZE 2"),
                                 (start(tmp_path, "e", 1, 3, world), "rank 1 of WORLD_SIZE 3")],
    }
    try:
        for name, procs in cases.items():
            for proc, holds in procs:
                out, err = proc.communicate(timeout=startup * 4 + WAIT + 60)  # a hang fails here
                elapsed = time.time() - started
                lines = err.strip().splitlines()
                assert proc.returncode == 1 and len(lines) == 1, (name, err[-2000:])
                assert lines[0].startswith(f"error: torchrun set-up failed within {WAIT} s") and holds in lines[0], (
                    name, lines)
                assert "MASTER_ADDR, MASTER_PORT and WORLD_SIZE" in lines[0] and "NANOPETL_SETUP_TIMEOUT" in lines[0]
                assert "Traceback" not in err and not list((tmp_path / "a").glob("results.jsonl"))
        # five processes started together on a few cores: each takes a few start-ups, then at most the timeout
        assert elapsed < 4 * startup + WAIT + 10, (elapsed, startup)
    finally:
        taken.close()
        for procs in cases.values():
            for proc, _ in procs:
                proc.kill()


@pytest.mark.parametrize("value", ["0", "-5", "soon", "1e9", "nan", "٣"])
def test_a_setup_timeout_that_is_not_a_number_of_seconds_is_refused(value, monkeypatch):
    monkeypatch.setenv("NANOPETL_SETUP_TIMEOUT", value)
    with pytest.raises(plumbing.UsageError, match="NANOPETL_SETUP_TIMEOUT=.*a number in .0, 86400.; unset it for 60"):
        plumbing.setup_seconds()
    monkeypatch.setenv("NANOPETL_SETUP_TIMEOUT", "2.5")
    assert plumbing.setup_seconds() == 2.5

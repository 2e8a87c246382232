"""Every script nobody runs in a test otherwise keeps running: each tests/bench_*.py (found by its name, so a new one
is picked up) in its --micro mode, which runs the bench's own code path at a tiny size, must exit 0 and print tables
whose every row holds a number (no empty row, no nan); the embedded-backbone builder and data.py's contact sheet
must write their files. Each runs as a user would: a subprocess from the repository root, one thread, no progress
bars, temporary files and caches in the test's own folder, no network."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHES = sorted(p.name for p in (ROOT / "tests").glob("bench_*.py"))
QUICK = {"bench_token_scores.py", "bench_prompt_cosine.py"}  # a few seconds; the others (and new ones) are slow
TIMEOUT = 180


def run(tmp, *argv):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           "NANOPETL_CACHE": str(tmp / "cache"), "TMPDIR": str(tmp)}
    r = subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=TIMEOUT)
    assert r.returncode == 0, f"{' '.join(map(str, argv))} exited with {r.returncode}:\n{r.stdout[-3000:]}\n" \
                              f"{r.stderr[-3000:]}"
    return r

# -----------------------------------------------------------------------------
# a printed markdown table: every row must hold a number


SEPARATOR = re.compile(r"^\|(\s*:?-+:?\s*\|)+$")
NUMBER = re.compile(r"^[-+]?(\d[\d,]*(\.\d*)?|\.\d+)(e[-+]?\d+)?(?![\w.])", re.IGNORECASE)
NOT_A_NUMBER = re.compile(r"(?<![\w.])[-+]?(nan|inf|infinity)(?![\w.])", re.IGNORECASE)


def cells(line):
    return [c.strip() for c in line.strip().strip("|").split("|")]


def table_rows(text):
    """[(header cells, row cells)] of every markdown table in `text`; a row outside a table is an error."""
    lines, rows, header = text.splitlines(), [], None
    for i, line in enumerate(lines):
        if not line.startswith("|"):
            header = None
        elif SEPARATOR.match(line.strip()):
            assert header is not None, f"a table separator without a header: {line!r}"
        elif i + 1 < len(lines) and SEPARATOR.match(lines[i + 1].strip()):
            header = cells(line)
        else:
            assert header is not None, f"a table row outside a table: {line!r}"
            rows.append((header, cells(line)))
    return rows


def check_tables(text):
    """Every row: as many cells as its header, not empty, some cell a number, no nan or inf. Returns the rows."""
    rows = table_rows(text)
    assert rows, "no table row printed"
    for header, row in rows:
        line = "| " + " | ".join(row) + " |"
        assert len(row) == len(header), f"{len(row)} cells under a header of {len(header)}: {line}"
        assert any(row), f"an empty row: {line}"
        assert not any(NOT_A_NUMBER.search(c) for c in row), f"nan or inf in a row: {line}"
        assert any(NUMBER.match(c) for c in row), f"a row without a number: {line}"
    return rows


def test_the_table_check_rejects_what_it_must():
    good = "text\n| what | n |\n|---|---|\n| a | 1,234.5 |\n| b | 3e-05 (x) |\n"
    assert len(check_tables(good)) == 2
    for bad in ("| what | n |\n|---|---|\n| a | nan |", "| what | n |\n|---|---|\n| a | -inf |",
                "| what | n |\n|---|---|\n|  |  |", "| what | n |\n|---|---|\n| a | none |",
                "| what | n |\n|---|---|\n| a |", "nothing printed", "| a | 1 |"):
        with pytest.raises(AssertionError):
            check_tables(bad)

# -----------------------------------------------------------------------------
# the scripts


def test_every_bench_has_a_micro_mode():
    assert BENCHES and all("--micro" in (ROOT / "tests" / b).read_text() for b in BENCHES)


@pytest.mark.parametrize("bench", [b if b in QUICK else pytest.param(b, marks=pytest.mark.slow) for b in BENCHES])
def test_a_bench_runs_in_its_micro_mode(bench, tmp_path):
    r = run(tmp_path, ROOT / "tests" / bench, "--micro")
    check_tables(r.stdout)


@pytest.mark.slow
def test_the_embedded_backbone_builder_runs(tmp_path):
    out = tmp_path / "bb.safetensors"
    run(tmp_path, ROOT / "tools" / "build_backbone.py", "--per-class", "2", "--epochs", "1", "--out", out,
        "--device", "cpu")
    assert out.stat().st_size > 0


def test_the_contact_sheet_is_written(tmp_path):
    sheet = tmp_path / "sheet.png"
    r = run(tmp_path, ROOT / "data.py", "--sheet", sheet)
    assert sheet.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(sheet) in r.stdout

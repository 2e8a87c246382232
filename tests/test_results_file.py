"""The results file is read strictly: a record whose accuracy is not a finite number, or whose count is a bool, is
never tabled (skipped with a warning naming its line, and its run runs again); two records of one run with different
numbers stop the sweep with one line naming both lines; torchrun's variables are ASCII digits or refused."""
import json

import pytest

import plumbing


def record(key="vpt|t|1|0|abc", **over):
    return dict(key=key, method="vpt", status="ok", seconds=1.0, val_top1=40.0, test_top1=41.0, trainable=10) | over


def write(path, *records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_a_non_finite_or_non_number_accuracy_is_never_tabled(tmp_path, capsys):
    path = write(tmp_path / "results.jsonl", record("a"), '{"key": "b", "method": "vpt", "status": "ok", "seconds": 1, '
                 '"val_top1": NaN, "test_top1": 1.0, "trainable": 3}', record("c", trainable=True),
                 record("d", test_top1="41"), record("e", test_top1=float("inf")))
    assert set(plumbing.finished(path, warn=True)) == {"a"}
    assert "skipped 4 line(s)" in capsys.readouterr().err


def test_two_records_of_one_run_with_different_numbers_are_refused_naming_both_lines(tmp_path):
    path = write(tmp_path / "results.jsonl", record(), record("other"), record(test_top1=12.5))
    with pytest.raises(plumbing.UsageError, match=r"lines 1 and 3 hold one run \(vpt\|t\|1\|0\|abc\)"):
        plumbing.finished(path)
    write(path, record(), record())  # the same numbers twice: one run, kept once
    assert list(plumbing.finished(path)) == ["vpt|t|1|0|abc"]


@pytest.mark.parametrize("port", ["²", "٣", "12a", "-1"])
def test_torchrun_variables_that_int_would_misread_are_refused(port, monkeypatch):
    for k, v in dict(LOCAL_RANK="0", RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port).items():
        monkeypatch.setenv(k, v)
    with pytest.raises(plumbing.UsageError, match="MASTER_PORT"):
        plumbing.check_environment()

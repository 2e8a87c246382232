"""A dataset changed in place is a new dataset: data.fingerprint takes each file's size and mtime (os.stat), so an
image rewritten under its own name, or only touched, changes the run key and the sweep runs it again, saying why;
a folder moved whole (mtimes kept) keeps its fingerprint. The tiny image folder, backbone and subprocess runner are
tests/test_faults.py's: the first two sweeps run fewshot.py as __main__ in this process (as test_faults runs most
rows: the same argv parsing, exit status and output, without importing torch again), the third as a real process."""
import os
import shutil
from types import SimpleNamespace

import pytest
from PIL import Image

import data
from test_faults import IF, fill, finish, fs, imagefolder, in_process, save_backbone, spawn

SECOND = 1_000_000_000  # ns


def fp(root):
    """The fingerprint load_task records for the imagefolder at root (what run_identity keys the run by)."""
    return data.load_task("imagefolder", root, shots=1, img_size=32)[0].meta["fingerprint"]


def stamps(root):
    return {p.relative_to(root): p.stat().st_mtime_ns for p in root.rglob("*.jpg")}


def test_a_file_changed_in_place_changes_the_fingerprint_and_a_moved_folder_does_not(tmp_path):
    w = SimpleNamespace(data=tmp_path / "data")
    imagefolder(w)
    image, before = w.data / "test" / "cat" / "0.jpg", fp(w.data)
    assert fp(w.data) == before  # nothing changed
    mtime = image.stat().st_mtime_ns
    os.utime(image, ns=(mtime, mtime + SECOND))  # only touched
    assert fp(w.data) not in (before, None)
    os.utime(image, ns=(mtime, mtime))
    assert fp(w.data) == before  # the same stats again
    Image.new("RGB", (8, 8), (255, 0, 0)).save(image, "JPEG")  # new bytes, same name
    os.utime(image, ns=(mtime, mtime + 2 * SECOND))
    changed = fp(w.data)
    assert changed != before
    kept = stamps(w.data)
    moved = tmp_path / "elsewhere" / "data"
    shutil.copytree(w.data, moved, copy_function=shutil.copy)  # cp without -p: new mtimes, a new dataset
    assert fp(moved) != changed
    for rel, ns in kept.items():  # the mtimes put back: the same relative paths and stats, another root
        os.utime(moved / rel, ns=(ns, ns))
    assert fp(moved) == changed
    os.rename(moved, tmp_path / "renamed")  # a move keeps mtimes
    assert fp(tmp_path / "renamed") == changed


def test_what_the_fingerprint_does_not_see_and_a_file_gone_before_it(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"abcd")
    items, st = [(tmp_path / "a.jpg", 0)], (tmp_path / "a.jpg").stat()
    before = data.fingerprint(tmp_path, [items], ["a"])
    (tmp_path / "a.jpg").write_bytes(b"wxyz")  # same size, and the mtime put back (as `touch -d` could)
    os.utime(tmp_path / "a.jpg", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert data.fingerprint(tmp_path, [items], ["a"]) == before  # documented: the bytes are not read
    (tmp_path / "a.jpg").unlink()
    with pytest.raises(data.DataError) as e:
        data.fingerprint(tmp_path, [items], ["a"])
    assert "\n" not in str(e.value) and f"image {tmp_path / 'a.jpg'} went away" in str(e.value)


def test_an_image_rewritten_in_place_runs_again_through_the_cli_and_the_sweep_says_why(tmp_path):
    w = SimpleNamespace(tmp=tmp_path, out=tmp_path / "out", data=tmp_path / "data", bb=tmp_path / "bb.safetensors")
    save_backbone(w.bb, seed=0)
    imagefolder(w)
    results, args = w.out / "results.jsonl", fill(fs(**IF), w)

    def sweep(real_process=False):
        r = finish(spawn("fewshot.py", args, w)) if real_process else in_process("fewshot.py", args)
        assert r.code == 0, r.err
        return r, results.read_text().splitlines()
    _, lines = sweep()
    assert len(lines) == 1
    r, again = sweep()
    assert again == lines and "re-running" not in r.err + r.out  # nothing trained
    image = w.data / "test" / "cat" / "0.jpg"
    mtime = image.stat().st_mtime_ns
    Image.new("RGB", (8, 8), (255, 0, 0)).save(image, "JPEG")  # other pixels under the same name
    os.utime(image, ns=(mtime, mtime + SECOND))  # a new mtime, whatever the file system's clock resolution
    r, after = sweep(real_process=True)
    assert after[:1] == lines and len(after) == 2  # the old line kept, the run ran again
    assert ("linear|imagefolder|1|0: its data changed since its line in results.jsonl (files read, their labels, "
            "sizes or mtimes): re-running it") in r.err

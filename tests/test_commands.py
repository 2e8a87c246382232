"""Every command the README and docs/ show is one its tool accepts: each is parsed by the script's own argparse
parser (in a child process whose parse_args stops right after parsing, so nothing trains), and the project's
runners' commands also pass their flag checks (ranges, choices, method and recipe names) in this process.
docs/assignments.md is left out: its commands name methods a student has yet to write."""
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import fewshot
import plumbing
import pvp_pretrain

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "assignments.md")]
PLACEHOLDER = re.compile(r"\.\.\.|\$|<|\[|\bLR\b|\bSOURCE\b|\bS\b")  # a shape of a command, not one to parse
SCRIPT = re.compile(r"^(?:torchrun(?: --[\w-]+=\S+)* )?(?:python )?((?:tests/|tools/)?[\w]+\.py)\b(.*)$")
SHOWN_TO_FAIL = {"python vpt.py --bogus"}  # the fault table's example of a flag argparse refuses


def commands():
    """(page, command) for each shell command in a code block or an inline code span of the pages."""
    found = []
    for page in PAGES:
        text = page.read_text()
        blocks = re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text, flags=re.S)
        lines = [line for b in blocks for line in b.replace("\\\n", " ").splitlines()]
        lines += re.findall(r"`((?:python|torchrun) [^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
        for line in lines:
            line = re.sub(r"\s+#.*$", "", line.strip())
            for part in re.split(r"\s*(?:&&|;)\s*", line):
                if re.match(r"(?:python|torchrun) ", part) and part not in SHOWN_TO_FAIL and not PLACEHOLDER.search(
                        part) and SCRIPT.match(part.replace("python ", "", 1) if part.startswith("python") else part):
                    found.append((page.name, part))
    return found


CHECK_PARSE = """
import argparse, json, runpy, sys
real, failed = argparse.ArgumentParser.parse_args, []
class Parsed(Exception):
    pass
def parse_args(self, args=None, namespace=None):
    real(self, args, namespace)
    raise Parsed
argparse.ArgumentParser.parse_args = parse_args
for script, folder, argv in json.loads(sys.argv[1]):
    sys.argv, sys.path[:0] = [script, *argv], [folder]
    try:
        runpy.run_path(script, run_name="__main__")
        failed.append([script, argv, "ran without parsing its command line"])
    except Parsed:
        pass
    except SystemExit as e:
        failed.append([script, argv, f"exit {e.code}"])
    del sys.path[0]
print(json.dumps(failed))
"""


def test_the_pages_show_commands():
    found = commands()
    assert any("fewshot.py --method pvp --shots 1" in c for _, c in found) and len(found) > 20


def split(command):
    words = shlex.split(command)
    i = next(j for j, w in enumerate(words) if w.endswith(".py"))
    return words[i], words[i + 1:]


@pytest.mark.parametrize("page, command", [pc for pc in commands() if split(pc[1])[0] in ("fewshot.py",
                                                                                             "pvp_pretrain.py")])
def test_each_runner_command_passes_the_flag_checks(page, command):
    script, argv = split(command)
    if script == "fewshot.py":
        cfg = fewshot.parse(argv)
        plumbing.check_flags(cfg)
        methods = list(fewshot.METHODS) if cfg.method == "all" else cfg.method.split(",")
        assert set(methods) <= set(fewshot.METHODS) and cfg.recipe in fewshot.RECIPES, f"{page}: {command}"
    else:
        args = pvp_pretrain.parse(argv)
        plumbing.check_flags(pvp_pretrain.Pretrain(**{k: v for k, v in vars(args).items() if k != "given"}))
        assert args.method in fewshot.METHODS, f"{page}: {command}"


@pytest.mark.slow
def test_each_command_is_accepted_by_its_tool():
    """One child process parses every command with its script's own parser (one torch import for all of them)."""
    found = commands()
    for page, command in found:
        assert (ROOT / split(command)[0]).is_file(), f"{page}: {command}: no such script"
    todo = [[str(ROOT / split(c)[0]), str((ROOT / split(c)[0]).parent), split(c)[1]] for _, c in found]
    r = subprocess.run([sys.executable, "-c", CHECK_PARSE, json.dumps(todo)], cwd=ROOT, capture_output=True,
                       text=True, timeout=600, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",
                                                   "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    failed = json.loads(r.stdout.strip().splitlines()[-1])
    assert not failed, f"commands their tools refuse: {failed}\n{r.stderr[-2000:]}"


def test_the_parse_check_reports_a_refused_command():
    todo = [[str(ROOT / "vpt.py"), str(ROOT), ["--bogus"]], [str(ROOT / "fewshot.py"), str(ROOT), ["--shots", "1"]]]
    r = subprocess.run([sys.executable, "-c", CHECK_PARSE, json.dumps(todo)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",
                                                   "OMP_NUM_THREADS": "1"})
    failed = json.loads(r.stdout.strip().splitlines()[-1])
    assert [f[0].rsplit("/", 1)[-1] for f in failed] == ["vpt.py"] and failed[0][2] == "exit 2"

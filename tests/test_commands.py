"""Every command the README and docs/ show is one its tool accepts: each is parsed by the script's own argparse
parser (in a child process whose parse_args stops right after parsing, so nothing trains), and the project's
runners' commands also pass their flag checks (ranges, choices, method and recipe names) in this process.
docs/assignments.md is left out: its commands name methods a student has yet to write."""
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
import argparse, runpy, sys
real = argparse.ArgumentParser.parse_args
def parse_args(self, args=None, namespace=None):
    real(self, args, namespace)
    raise SystemExit(0)
argparse.ArgumentParser.parse_args = parse_args
sys.argv = {argv!r}
sys.path.insert(0, {folder!r})
runpy.run_path({script!r}, run_name="__main__")
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
@pytest.mark.parametrize("page, command", commands(), ids=lambda x: x[:60] if isinstance(x, str) else x)
def test_each_command_is_accepted_by_its_tool(page, command):
    script, argv = split(command)
    assert (ROOT / script).is_file(), f"{page}: {command}: no {script}"
    r = subprocess.run([sys.executable, "-c", CHECK_PARSE.format(argv=[script, *argv], script=str(ROOT / script),
                                                                          folder=str((ROOT / script).parent))],
                       cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, f"{page}: {command}: {r.stderr[-1500:]}"

"""Every printed hint is a command the tool accepts. The runners' and their modules' message strings (constants and
f-strings read with ast, each {...} as {}; a runner's module docstring is its --help) hold hints: `python X.py ...`,
`X.py --flag`, `--flag [value]`, NANOPETL_ names. Each X.py exists, each flag is one of the script named before it
(else of one that can print the message), each command and `--flag value` is parsed by that script's own parser, each
NANOPETL_ name is read by the code. Another tool's command is listed in FOREIGN with why. About 2 seconds."""
import argparse
import ast
import contextlib
import io
import re
import sys
from pathlib import Path

import fewshot
import plumbing
import pvp_pretrain

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import build_backbone  # noqa: E402

FILES = ("fewshot.py", "pvp_pretrain.py", "tools/build_backbone.py", "plumbing.py", "data.py", "vit.py")
RUNNERS = {"fewshot.py": (fewshot.Config, fewshot.parse), "pvp_pretrain.py": (pvp_pretrain.Pretrain,
           pvp_pretrain.parse), "tools/build_backbone.py": (build_backbone.Build, build_backbone.parse)}
ALONE = ("pvp_pretrain.py", "tools/build_backbone.py")  # imported by no runner; the other four files by all three
FOREIGN = {  # another tool's command, quoted as that tool takes it
    "torchrun --nproc_per_node=8": "torchrun's processes per node, before the runner it starts (the runners' --help)",
    "iconv -f latin1 -t utf-8": "iconv's from- and to-encodings (data.py: a list file that is not UTF-8)",
    "pip install -r requirements.txt": "pip's requirements file (data.py: --aug randaug without timm installed)"}
NOT_MESSAGES = {  # (file, assigned name): why its strings are not hints
    ("fewshot.py", "VPT_SOLVER"): "where KMnP/vpt's code sets each value (file:line), a citation, not a command",
    ("fewshot.py", "RECIPES"): "the same for NOAH and E2VPT, quoting their scripts' own flags (--batch-size, --aa)"}
PLACEHOLDERS = {"<this backbone>": "vit_b16_in21k", "<the backbone>": "vit_b16_in21k", "<path>": "runs/m.safetensors",
                "<task>": "shape", "<folder>": "caltech101", "NAME=VALUE": "dropout=0.0", "NAME": "lora",
                "PATH": "w.safetensors", "N": "4", "{}": "1"}  # {}: a value the message formats in
SCRIPT = re.compile(r"(?<![\w/.-])((?:python|torchrun) )?((?:[\w-]+/)*[\w-]+\.py)(?![\w:])")
FLAG = re.compile(r"(?<![\w{}/.-])--?[A-Za-z][\w-]*(?<!-)")
BARE = re.compile(r"(.*?(?:\.\.\.)?)[.,;:)]*$")  # a word without the punctuation after it (an ellipsis kept)


def own_parser(path):  # the parser data.py's and vit.py's __main__ build, from its add_argument calls' literals
    ap = argparse.ArgumentParser(prog=path)
    for n in ast.walk(ast.parse((ROOT / path).read_text())):
        if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "add_argument":
            ap.add_argument(*map(ast.literal_eval, n.args), **{k.arg: k.value.value for k in n.keywords
                                                                 if isinstance(k.value, ast.Constant)})
    return ap


PARSERS = {**{s: (plumbing.parser(cls, ""), parse) for s, (cls, parse) in RUNNERS.items()},
           **{s: (p, p.parse_args) for s in ("data.py", "vit.py") for p in [own_parser(s)]}}
ACTIONS = {s: p._option_string_actions for s, (p, _) in PARSERS.items()}  # flag -> what it is to the script


def refused(script, argv):  # None if `script`'s own parse takes argv, else argparse's complaint
    with contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            PARSERS[script][1](argv)
        except SystemExit:
            return re.sub(r"^.*?error: ", "", (err.getvalue().strip().splitlines() or ["refused"])[-1])


def messages(path, source):  # (text, the scripts that can print it) of each message string of a file
    tree, skip, own = ast.parse(source), set(), {}
    for n in ast.walk(tree):
        if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and ast.get_docstring(n, False):
            doc = id(n.body[0].value)  # a runner's module docstring is its --help; the others are printed nowhere
            own.update({doc: (path,)}) if isinstance(n, ast.Module) and path in RUNNERS else skip.add(doc)
        if isinstance(n, ast.Assign) and any((path, getattr(t, "id", "")) in NOT_MESSAGES for t in n.targets):
            skip |= {id(m) for m in ast.walk(n.value)}
        if isinstance(n, ast.JoinedStr):
            skip |= {id(m) for v in n.values for m in ast.walk(v)}
        if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test) and path in ("data.py", "vit.py"):
            own |= {id(m): (path,) for m in ast.walk(n)}  # printed by that script's own command line
    for n in (n for n in ast.walk(tree) if id(n) not in skip and isinstance(n, (ast.Constant, ast.JoinedStr))):
        text = n.value if isinstance(n, ast.Constant) else "".join(
            v.value if isinstance(v, ast.Constant) else "{}" for v in n.values)
        if isinstance(text, str):
            yield text, own.get(id(n), (path,) if path in ALONE else tuple(RUNNERS))


def problems(path, source, found=None):
    """What is wrong with the hints of one file's messages; `found` collects the FOREIGN commands met."""
    out, found = [], set() if found is None else found
    read = re.findall(r"environ(?:\.get)?[\[(]\"(NANOPETL_\w+)\"", "".join((ROOT / f).read_text() for f in FILES))
    for text, owners in messages(path, source):
        where = f"{path}: {text[:90]!r}"
        found |= {cmd for cmd in FOREIGN if cmd in text}
        for cmd in FOREIGN:  # `torchrun X.py ...` stays a command of X.py
            text = text.replace(cmd, cmd.split()[0])
        for key, value in PLACEHOLDERS.items():
            text = re.sub(rf"(?<![\w<]){re.escape(key)}(?![\w>])", value, text)
        out += [f"{where}: {v} is read nowhere" for v in re.findall(r"NANOPETL_\w+", text) if v not in read]
        for m in reversed(list(SCRIPT.finditer(text))):  # `[python] X.py --flag value ...`, to where it stops
            script, argv, want, end = m.group(2), [], False, m.end()
            out += [f"{where}: {script} is no file of the repository"] * (not (ROOT / script).is_file())
            for tok in re.finditer(r"\S+", text[m.end():]):
                word, flags = BARE.match(tok.group())[1], ACTIONS.get(script, {})
                if FLAG.fullmatch(word):
                    out += [] if word in flags else [f"{where}: {script} has no flag {word}"]
                    argv, want = (argv + [word], flags[word].nargs != 0) if word in flags else (argv, False)
                elif want and word and not word.startswith(("(", "#")):
                    argv, want = argv + [word], False
                elif word != "...":
                    break
                end = m.end() + tok.end()
                if word != tok.group():
                    break
            argv = argv[:-1] if want and not m.group(1) else argv  # `X.py --flag` points at it; `python X.py` runs
            if (argv or m.group(1)) and script in PARSERS and (why := refused(script, argv)):
                out.append(f"{where}: {script} {' '.join(argv)}: {why}")
            text = text[:m.start()] + " " + text[end:]
        for m in FLAG.finditer(text):  # a flag outside a command: one of a script that prints the message
            flag, nxt = m.group(), re.match(r"\s(\S+)", text[m.end():])
            has = [s for s in owners if flag in ACTIONS[s]]
            out += [] if has else [f"{where}: {flag} is a flag of none of {', '.join(owners)}"]
            value = nxt and BARE.match(nxt.group(1))[1]
            if has and value and not value.startswith(("(", "-")) and (re.search(r"\)\W*$", nxt.group(1)) or re.search(
                    r"[\d/=,:.]", value)):  # `--flag value`, `(--flag value)`; not `--flag is ...`
                argv = [[flag, value] if ACTIONS[s][flag].nargs != 0 else [flag] for s in has]
                if all(why := refused(s, a) for s, a in zip(has, argv)):
                    out.append(f"{where}: {flag} {value}: {why}")
    return out


def test_every_hint_is_one_its_tool_accepts():
    found = set()
    wrong = [w for path in FILES for w in problems(path, (ROOT / path).read_text(), found)]
    seen = sum(bool(FLAG.search(t)) for p in FILES for t, _ in messages(p, (ROOT / p).read_text()))
    assert seen > 80, f"only {seen} messages hold a flag: is the scanner blind?"
    assert not wrong, "wrong hints:\n" + "\n".join(wrong)
    assert found == set(FOREIGN), f"FOREIGN lists commands no message quotes: {set(FOREIGN) - found}"


def test_the_left_out_strings_are_still_there():
    assert all(re.search(rf"^{n} = ", (ROOT / p).read_text(), re.M) for p, n in NOT_MESSAGES), "drop the gone ones"


def test_a_wrong_hint_is_reported():
    got = problems("plumbing.py", '''need(ok, f"--shots {k}: --no-such-flag, or python fewshot.py --shots 1 --bogus")
need(ok, "make one with python nope.py; (--lr fast); (--pvp-init ...); pvp_pretrain.py --grid")
need(ok, "python tools/build_backbone.py --epochs two; NANOPETL_NOTHING=1; --shard 0/4, --data-root PATH")
need(ok, f"{path}: run python pvp_pretrain.py --weights")''')
    for wrong in ("--no-such-flag is a flag of none", "fewshot.py has no flag --bogus", "nope.py is no file",
                  "--lr fast: argument --lr: invalid float", "pvp_pretrain.py has no flag --grid",
                  "--epochs two: argument --epochs: invalid int", "NANOPETL_NOTHING is read nowhere",
                  "pvp_pretrain.py --weights: argument --weights: expected one argument"):
        assert sum(wrong in p for p in got) == 1, (wrong, got)
    assert len(got) == 8, got  # --shots 1, --pvp-init ..., --shard 0/4, --data-root PATH are right

"""
Nothing here is a paper's idea; read fewshot.py instead.

What both runners (fewshot.py, pvp_pretrain.py) need around the lesson: flags and their checks, one-line errors and
exits, devices and torchrun, module and resume files, the run key and the results file, claims and locks, the
embedded pieces built on demand, the table and the plot. It imports no runner and no method file: the runners pass
in what it must know (the registry of methods, the recipes, their Config class) as values.
"""
import argparse
import ast
import copy
import functools
import dataclasses
import datetime
import errno
import fcntl
import hashlib
import inspect
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from safetensors.torch import load_file, safe_open, save_file
from tqdm import tqdm

import data
import vit as vitlib

HERE = Path(__file__).resolve().parent
CHECKPOINTS = HERE / "checkpoints"  # built pieces, git-ignored
SHIPPED_BACKBONE = HERE / "assets" / "vit_synthetic.safetensors"  # the embedded backbone, in the repository
PINNED = {SHIPPED_BACKBONE: "76093464596a5922"}  # its weights hash: a replacement, header or not, is refused
EMBEDDED_BUILD = []  # extra pvp_pretrain.py flags for the embedded builds (the tests shrink them)
MAX_SEED, MAX_IMG = 2**32 - 1, 1024  # seeds feed torch generators; past 1024 px a ViT-B/16 step needs > 100 GB
LR_MAX = 1e4  # above it a run only diverges, or overflows AdamW's float32 step (from ~1e37) with a traceback

# -----------------------------------------------------------------------------
# errors and exits: one line, no traceback, and what was finished is kept


class UsageError(Exception):
    """A flag or file the user can fix; reported as one line, no traceback."""


class Diverged(Exception):
    """The loss became NaN or infinite."""


def need(ok, message):
    if not ok:
        raise UsageError(message)


def say(message):
    """One message on stderr, on a line of its own below any progress bar left open (which it closes)."""
    for bar in list(getattr(tqdm, "_instances", [])):
        bar.close()
    print(message, file=sys.stderr)


def fail(message, code=1):
    """Exit with one message on stderr (say)."""
    say(message)
    sys.exit(code)


def os_error_line(e, kept):
    """One line for an OSError that reached the top: what failed on which file, and what to do about that errno."""
    what = f"{e.filename}: {e.strerror or e}" if e.filename else str(e)
    if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return f"error: cannot write {what}. {kept}: free some space and run the same command again"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"error: not allowed: {what}. {kept}: fix the permissions (or choose other paths) and run it again"
    return f"error: {what}. {kept}"


def terminate_as_interrupt():
    """SIGTERM (a scheduler ending a job) ends the run like Ctrl-C: finished work is kept and said so."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, interrupt)


def run_script(main, interrupted, kept):
    """A runner's __main__: main() as the exit status; a user's mistake, an interrupt or a failed read or write
    outside main's own handlers ends in one line. interrupted, kept: callables giving those lines' endings."""
    terminate_as_interrupt()
    try:
        sys.exit(main())
    except (UsageError, data.DataError, vitlib.CheckpointError) as e:
        fail(f"error: {e}")
    except KeyboardInterrupt:
        fail(interrupted(), 130)
    except OSError as e:
        fail(os_error_line(e, kept()))
    except RuntimeError as e:  # torch's DataLoader: a worker that died (the kernel's out-of-memory killer, mostly)
        if "DataLoader worker" not in str(e):
            raise
        fail(f"error: a data loader worker died ({vitlib.error_line(e)}), most likely killed when memory ran out: "
             f"give it fewer --workers (or a smaller --batch or --cache-gb). {kept()}" +
             "; then run the same command again" * ("--resume" not in kept()))

# -----------------------------------------------------------------------------
# flags: a dataclass's fields with their help and their ranges, checked once for both runners


def like(cls, name, default, help=None):
    """A field with the check of `cls`'s field `name` (so pvp_pretrain.py's --lr is checked as fewshot.py's)."""
    meta = cls.__dataclass_fields__[name].metadata
    return flag(default, help or meta["help"], meta["ok"], meta["what"], meta["choices"])


def flag(default, help, ok=None, what=None, choices=None):
    """A Config field: its default, --help text, and the check (ok(value, cfg), described as `what`, which may name
    other fields as {lr:g}, and {cpus}) or the choices it must pass. None passes unless the default is not None."""
    return dataclasses.field(default=default, metadata=dict(help=help, ok=ok, what=what, choices=choices))


def parser(cls, description, given_only=False):
    """The command line of dataclass `cls`. given_only: flags not on the command line are left out (no defaults)."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 **({"argument_default": argparse.SUPPRESS} if given_only else {}))
    for f in dataclasses.fields(cls):
        name, default = "--" + f.name.replace("_", "-"), {} if given_only else {"default": f.default}
        if f.type is bool:
            ap.add_argument(name, action=argparse.BooleanOptionalAction, help=f.metadata["help"], **default)
        elif f.type is list:
            ap.add_argument(name, action="append", metavar="NAME=VALUE", help=f.metadata["help"])
        else:
            ap.add_argument(name, type=f.type, help=f.metadata["help"] + f" (default: {f.default})", **default)
    return ap


def check_flags(cfg):
    """Every field's range and choices, as its metadata states them: one UsageError naming the flag."""
    for f in dataclasses.fields(cfg):
        value, name, meta = getattr(cfg, f.name), "--" + f.name.replace("_", "-"), f.metadata
        if value is None and f.default is None:
            continue
        if meta.get("choices"):
            choices = ", ".join(c for c in meta["choices"] if c)
            need(value in meta["choices"], f"{name} {value}: choose one of {choices}")
        if meta.get("ok"):
            need(meta["ok"](value, cfg), f"{name} must be {meta['what'].format(**vars(cfg), cpus=data.cpus())}, got "
                 f"{value}")


def listed(flag_name, text, kind, ok, what):
    """A comma list of `kind`, each ok(value), none twice: the values, or one UsageError."""
    try:
        values = [kind(v) if kind is not int or re.fullmatch(r"-?[0-9]+", v.strip()) else None
                  for v in text.split(",")]
    except ValueError:
        values = []
    need(values and None not in values and all(map(ok, values)), f"{flag_name} must be {what}, got {text!r}")
    need(len(set(values)) == len(values), f"{flag_name} {text} names a value twice: give each once")
    return values


def given_options(cfg, named):
    """{option: value} the user set: --opt NAME=VALUE (a Python/JSON literal, a comma list, or a word), and the
    named flags (`named`: flag -> (option, default)), e.g. --prompts for num_prompts."""
    out = {}
    for item in cfg.opt or []:
        name, eq, text = item.partition("=")
        need(eq and name.isidentifier(), f"--opt {item!r}: write NAME=VALUE, e.g. --opt dropout=0.0")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            try:
                value = float(text)  # nan, inf: a number, refused below as not finite
            except ValueError:
                value = text.split(",") if "," in text else text
        need(repr(out.get(name, value)) == repr(value), f"--opt {name} is given twice, as {out.get(name)!r} and "
             f"{value!r}")
        out[name] = value
    for flag_name, (name, _) in named.items():
        if getattr(cfg, flag_name, None) is not None:
            need(out.get(name, getattr(cfg, flag_name)) == getattr(cfg, flag_name), f"--{flag_name.replace('_', '-')} "
                 f"{getattr(cfg, flag_name)} and --opt {name}={out.get(name)!r} disagree: give one")
            out[name] = getattr(cfg, flag_name)
    return out


def fit_options(given, takes):
    """The given options a method takes ({option: default}), each in its default's kind where the command line could
    not tell: a one-item list option given as a word (--opt targets=qkv) is the list ['qkv']."""
    return {k: [v] if isinstance(takes[k], (tuple, list)) and isinstance(v, str) else v
            for k, v in given.items() if k in takes}


def check_type(method, name, value, default):
    """An option's value of the kind its default is (bool, whole number, finite number, list): one UsageError."""
    kinds = [(bool, lambda v: isinstance(v, bool), "True or False"),
             (int, lambda v: isinstance(v, int) and not isinstance(v, bool), "a whole number"),
             (float, lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
              "a finite number"),
             ((tuple, list), lambda v: isinstance(v, (tuple, list)), "a list (on the command line: NAME=a,b)")]
    for kind, ok, what in kinds:
        if isinstance(default, kind):
            need(ok(value), f"{method}'s option {name} is {what} (its default is {default!r}), got {value!r}")
            return


def arch_of(weights, arch):
    """The preset a backbone is built with: the embedded one, a named weight's own, or --arch."""
    return "vit_synthetic" if weights is None else vitlib.PRETRAINED.get(weights, {}).get("preset", arch)


def check_backbone_flags(cfg):
    """--img-size a multiple of the backbone's patch, --weights a file or a name; returns the preset."""
    arch = arch_of(cfg.weights, cfg.arch)
    patch = getattr(vitlib.PRESETS[arch], "keywords", {}).get("patch_size") or 1
    need(not cfg.img_size or cfg.img_size % patch == 0,
         f"--img-size {cfg.img_size} must be a multiple of {patch}, the patch size of {arch}")
    need(cfg.weights is None or cfg.weights in vitlib.PRETRAINED or Path(cfg.weights).is_file(),
         f"--weights: no checkpoint file at {cfg.weights}, and not one of the named weights "
         f"{', '.join(vitlib.PRETRAINED)}")
    return arch

# -----------------------------------------------------------------------------
# devices, the environment, torchrun


def pick_device(name):
    if name != "auto":
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu")


def check_device(flag_name, name, amp=False):
    """A torch device this machine runs (cpu, cuda[:n] with that GPU, mps), or one UsageError naming the flag."""
    try:
        device = pick_device(name)
    except RuntimeError:
        raise UsageError(f"{flag_name} {name}: not a torch device; use auto, cpu, cuda, cuda:<n> or mps") from None
    need(device.type in ("cpu", "cuda", "mps"), f"{flag_name} {name}: nanoPETL runs on cpu, cuda or mps, not "
         f"{device.type}; use auto, cpu, cuda, cuda:<n> or mps")
    need(device.type == "cuda" or device.index is None, f"{flag_name} {name}: only CUDA devices are numbered; use "
         f"{device.type}")
    for kind, there in (("cuda", torch.cuda.is_available()), ("mps", torch.backends.mps.is_available())):
        need(device.type != kind or there, f"{flag_name} {name}: no {kind.upper()} here; use cpu or auto")
    need(device.type != "cuda" or (device.index or 0) < torch.cuda.device_count(), f"{flag_name} {name}: this "
         f"machine has {torch.cuda.device_count()} GPU(s), numbered from 0")
    need(not amp or device.type == "cuda", f"--amp is bf16 autocast on CUDA, and this run is on {device.type}: "
         "drop --amp")
    return device


def check_environment():
    """The environment variables nanoPETL reads, checked before any work: one UsageError each."""
    data.max_gb()  # NANOPETL_MAX_GB: data.py reads and checks its own
    cache = os.environ.get("NANOPETL_CACHE")
    need(not cache or not any(p.exists() and not p.is_dir() for p in (Path(cache), *Path(cache).parents)),
         f"NANOPETL_CACHE={cache} is, or lies under, a file: it must name the folder for downloaded weights; unset it "
         "or point it at a folder")
    if "LOCAL_RANK" in os.environ:  # torchrun sets all of these; a stray LOCAL_RANK alone would hang in init
        torchrun = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
        missing = [k for k in torchrun if k not in os.environ]
        bad = [k for k in torchrun if k != "MASTER_ADDR" and not re.fullmatch(r"[0-9]+", os.environ.get(k, "0"))]
        need(not missing, f"LOCAL_RANK={os.environ['LOCAL_RANK']} is set, but {', '.join(missing)} "
             f"{'is' if len(missing) == 1 else 'are'} not: run under torchrun, or unset LOCAL_RANK")
        need(not bad, f"{', '.join(f'{k}={os.environ[k]}' for k in bad)}: torchrun's variables are whole numbers "
             "from 0; run under torchrun, or unset them")
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        need(rank < world, f"RANK={rank} with WORLD_SIZE={world}: the ranks are 0 to WORLD_SIZE - 1; run under "
             "torchrun, or unset them")
        setup_seconds()


def init_distributed(device):
    """(rank, world size, device). Under torchrun: join the group (NCCL on CUDA, gloo on CPU), one GPU per rank."""
    if "LOCAL_RANK" not in os.environ:
        return 0, 1, pick_device(device)
    cuda, local = torch.cuda.is_available() and device in ("auto", "cuda"), int(os.environ["LOCAL_RANK"])
    wait, env = setup_seconds(), {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    line = (f"torchrun set-up failed within {wait:g} s (rank {env['RANK']} of WORLD_SIZE {env['WORLD_SIZE']} at "
            f"{env['MASTER_ADDR']}:{env['MASTER_PORT']}{{}}): every rank needs the same MASTER_ADDR, MASTER_PORT and "
            "WORLD_SIZE, a reachable address and a free port; NANOPETL_SETUP_TIMEOUT=<seconds> waits longer")
    try:  # every rank joins within `wait` seconds, or one line says what to check; torch's retries stay unprinted
        with quiet_stderr() as stderr, deadline(wait, lambda: os.write(stderr, f"error: {line.format('')}\n".encode())):
            dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=wait))
            if cuda:
                torch.cuda.set_device(local)
            dist.barrier(device_ids=[local] if cuda else None)  # (NCCL connects here)
    except (RuntimeError, ValueError) as e:  # torch's DistError, DistNetworkError, DistStoreError are RuntimeErrors
        raise UsageError(line.format(f": {vitlib.error_line(e)}")) from None
    dist.set_timeout(datetime.timedelta(days=7))  # from here a rank may wait long for another's runs
    return dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local}") if cuda else pick_device(device)


def setup_seconds():
    """NANOPETL_SETUP_TIMEOUT: the seconds torchrun's ranks have to find each other (default 60)."""
    value = os.environ.get("NANOPETL_SETUP_TIMEOUT", "60")
    try:
        seconds = float(value) if value.isascii() else math.nan
    except ValueError:
        seconds = math.nan
    need(0 < seconds <= 86400, f"NANOPETL_SETUP_TIMEOUT={value!r}: the seconds torchrun's ranks have to find each "
         "other, a number in (0, 86400]; unset it for 60")
    return seconds


class quiet_stderr:
    """Standard error's file descriptor (so C++ logs too) goes nowhere in the block; `as`: a copy of the real one."""
    def __enter__(self):
        sys.stderr.flush()
        self.saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2), os.close(null)
        return self.saved

    def __exit__(self, *exc):
        os.dup2(self.saved, 2), os.close(self.saved)


class deadline:
    """A block that must end within `seconds`: past it, say() runs and the process exits with status 1 (a call
    blocked in C++, such as a rank waiting for others, cannot be interrupted any other way)."""
    def __init__(self, seconds, say):
        import threading
        self.timer = threading.Timer(seconds, lambda: (say(), os._exit(1)))
        self.timer.daemon = True

    def __enter__(self):
        self.timer.start()

    def __exit__(self, *exc):
        self.timer.cancel()


def autocast(device, amp):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda")


def rng_state(device):
    """The global RNG states that a step draws from (dropout): the CPU's, and the device's on CUDA."""
    return [torch.get_rng_state()] + ([torch.cuda.get_rng_state(device)] if torch.device(device).type == "cuda" else [])


def set_rng_state(states, device):
    torch.set_rng_state(states[0])
    if torch.device(device).type == "cuda" and len(states) > 1:
        torch.cuda.set_rng_state(states[1], device)


# -----------------------------------------------------------------------------
# files: atomic writes, content hashes, the module contract and its checkpoints, resume files, locks


def atomic(write, path):
    """write(tmp) then rename: a kill leaves the old file or the new one, never half of one. The temporary name is
    unique, so two writers never write into one temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask())  # as open() would make it: mkstemp's file is the owner's alone
        os.replace(tmp, path)
    except OSError as e:  # name the file being written, not its temporary twin
        raise OSError(e.errno, e.strerror, str(path)) from None
    except RuntimeError as e:  # torch's writer reports a full disk so, not as an OSError
        full = shutil.disk_usage(path.parent).free < 1 << 20
        raise OSError(errno.ENOSPC if full else errno.EIO, vitlib.error_line(e), str(path)) from None
    finally:
        Path(tmp).unlink(missing_ok=True)


def umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def tensors_hash(tensors):
    """A short fingerprint of a dict of tensors by content: each name and its values as float32, in name order (the
    hash module checkpoints and the shipped backbone's header have always recorded)."""
    h = hashlib.sha256()
    for k, v in sorted(tensors.items()):
        h.update(k.encode()), h.update(v.detach().cpu().float().numpy().tobytes())
    return h.hexdigest()[:16]


def count(params):
    return sum(p.numel() for p in params)


def weights_hash(model):
    """A backbone's fingerprint by content, head excluded (a module checkpoint records it; so does every run)."""
    return tensors_hash({k: v for k, v in model.state_dict().items() if not k.startswith("head.")})


def _own(model, head):
    """The method's module, live: its trainable parameters and its buffers outside the backbone (`vit.`)."""
    mine = {n for n, p in model.named_parameters() if p.requires_grad}
    mine |= {n for n, _ in model.named_buffers() if not n.startswith("vit.")}
    return {k: v for k, v in model.state_dict(keep_vars=True).items()
            if k in mine and (head or not k.startswith("head."))}


def module_state_dict(model, head=True):
    """A method's module as detached CPU copies, by state_dict name: e.g. VPT's `prompts`, E2VPT's prompts and masks,
    LoRA's A and B (the same whether merged or not: merging edits only frozen weights), and the head (head=False:
    without it; PVP does not reuse the source head)."""
    return {k: v.detach().cpu().clone() for k, v in _own(model, head).items()}


def misfits(model, sd, head=True):
    """What keeps `sd` from being the module of `model`: missing and unexpected tensors, other shapes and dtypes."""
    own, sd = _own(model, head), {k: v for k, v in sd.items() if head or not k.startswith("head.")}
    return ([f"missing {k}" for k in own if k not in sd] + [f"unexpected {k}" for k in sd if k not in own] +
            [f"shape of {k}: got {tuple(v.shape)}, expected {tuple(own[k].shape)}"
             for k, v in sd.items() if k in own and v.shape != own[k].shape] +
            [f"{k} holds {v.dtype}, not {own[k].dtype}" for k, v in sd.items() if k in own and v.dtype != own[k].dtype])


def load_module_state_dict(model, sd, head=True):
    """Copy `sd` into the module's tensors; every one must be there with its shape, or ValueError says which and
    nothing is copied. head=False leaves the head alone and ignores head.* entries of `sd`. A merged model (LoRA) is
    unmerged, loaded and merged again; a method's loaded() hook runs last (E2VPT: the loaded prompts are its rewind
    point)."""
    own, sd = _own(model, head), {k: v for k, v in sd.items() if head or not k.startswith("head.")}
    if problems := misfits(model, sd, head):
        raise ValueError(f"{getattr(model, 'name', type(model).__name__)} module state dict does not fit (config "
                         f"{getattr(model, 'config', None)}): " + "; ".join(problems))
    merged = getattr(model, "merged", False)
    if merged:
        model.unmerge()
    with torch.no_grad():
        for k, v in sd.items():
            own[k].copy_(v)
    if merged:
        model.merge()
    if hasattr(model, "loaded"):
        model.loaded()
    return model


def save_module(model, path, meta):
    """A module checkpoint: .safetensors (loading it runs no code), the module without its head, `meta` as JSON."""
    tensors = {k: v.contiguous() for k, v in module_state_dict(model, head=False).items()}
    atomic(lambda p: save_file(tensors, p, metadata={"nanopetl": json.dumps(meta)}), path)


MODULE_HEADER = dict(method=str, config=dict, backbone=str, backbone_hash=str)  # what a module header must hold


def options_of(build):
    """{option: default} of a registry entry: its keyword-only arguments, num_classes aside."""
    return {n: p.default for n, p in inspect.signature(build).parameters.items()
            if p.kind == p.KEYWORD_ONLY and n != "num_classes"}


def module_header(path, registry):
    """The checked header of a module checkpoint (reads no tensors): refused with one line naming what is wrong."""
    path = Path(path)
    try:
        with safe_open(path, "pt") as f:
            meta = json.loads((f.metadata() or {}).get("nanopetl", "null"))
    except Exception as e:  # safetensors reports truncation and foreign files in several exception types
        raise vitlib.CheckpointError(f"{path}: not a readable module checkpoint ({vitlib.error_line(e)}); make one "
                                     "with python pvp_pretrain.py") from None
    if not isinstance(meta, dict) or "method" not in meta:
        raise vitlib.CheckpointError(f"{path}: a .safetensors file without nanoPETL's module header (a backbone? "
                                     "that goes to --weights); make a module checkpoint with python pvp_pretrain.py "
                                     "--weights <the backbone>")
    bad = [f"{k} ({type(meta.get(k)).__name__}, not {t.__name__})" for k, t in MODULE_HEADER.items()
           if not isinstance(meta.get(k), t)]
    kinds = [m for m in registry if m != "pvp"]
    if not bad and meta["method"] not in kinds:
        bad = [f"method {meta['method']!r} (not one of {', '.join(kinds)})"]
    if not bad and (extra := set(meta["config"]) - set(options_of(registry[meta["method"]]))):
        bad = [f"config options {sorted(extra)} that {meta['method']} does not take"]
    for k, v in (meta["config"] if not bad else {}).items():  # each option of the kind its default is
        try:
            check_type(meta["method"], k, v, options_of(registry[meta["method"]])[k])
        except UsageError as e:
            bad.append(str(e))
    if bad:
        raise vitlib.CheckpointError(f"{path}: its nanoPETL header is damaged or from another version: " +
                                     "; ".join(bad) + ". Pre-train it again with python pvp_pretrain.py")
    return meta


def read_module(path, backbone, registry, sizes=None):
    """(meta, tensors) of a module checkpoint, refused unless it was made on this very backbone, is the module its
    header describes, and is finite. sizes=(cfg, device): and unless a training step of it fits (check_size)."""
    meta = module_header(path, registry)
    try:
        tensors = load_file(path)
    except Exception as e:
        raise vitlib.CheckpointError(f"{path}: not a readable module checkpoint ({vitlib.error_line(e)}); make one "
                                     "with python pvp_pretrain.py") from None
    if meta["backbone_hash"] != weights_hash(backbone):
        raise vitlib.CheckpointError(
            f"{path} was pre-trained on backbone {meta['backbone']} (weights {meta['backbone_hash']}), not on this one "
            f"(weights {weights_hash(backbone)}): pre-train it on this backbone with pvp_pretrain.py --weights")
    try:  # its tensors are the module its header describes: tried on a weightless copy of the backbone
        frozen = list((skeleton := ghost(backbone)).parameters())
        model = registry[meta["method"]](skeleton, num_classes=2, **meta["config"])
        why = not_beside_frozen(model, frozen)
        problems = [f"{meta['method']} {why}, not a module beside a frozen backbone"] if why else misfits(
            model, tensors, False)
    except (TypeError, ValueError, RuntimeError) as e:
        problems = [f"its {meta['method']} config {meta['config']} is refused ({vitlib.error_line(e)})"]
    if problems:
        raise vitlib.CheckpointError(f"{path}: its tensors are not the {meta['method']} module its header describes ("
                                     f"{'; '.join(problems[:3])}{'; ...' * (len(problems) > 3)}): damaged or edited; "
                                     "pre-train it again with python pvp_pretrain.py")
    vitlib.check_finite(tensors, path)
    if sizes:
        check_size("pvp", model, sizes[0].batch, sizes[0].img_size or backbone.img_size, sizes[1], sizes[0].amp)
    return meta, tensors


def not_beside_frozen(model, backbone_params):
    """Why `model` is no module beside a frozen backbone ("trains the backbone", "has only a head"), or None."""
    if any(p.requires_grad for p in backbone_params):
        return "trains the backbone"
    if not any(p.requires_grad for n, p in model.named_parameters() if not n.startswith("head.")):
        return "has only a head"


def ghost(model):
    """A copy of `model` on the 'meta' device: every shape, no memory and no values (to try a build on)."""
    memo = {id(t): nn.Parameter(torch.empty_like(t, device="meta"), t.requires_grad) if isinstance(t, nn.Parameter)
            else torch.empty_like(t, device="meta") for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


def header(path):
    """The nanoPETL JSON header of a .safetensors file ({} when it has none)."""
    with safe_open(path, "pt") as f:
        return json.loads((f.metadata() or {}).get("nanopetl", "{}"))


def read_resume(path, wanted):
    """(model tensors, optimizer state, position) from a resume file, refused unless it records the recipe `wanted`.
    The position is the training loop's (epoch, batch, step, and mid-epoch the generator and RNG states)."""
    import pickle

    def refuse(e):
        why = ("Pickled objects are refused, since loading them can run code" if isinstance(e, pickle.UnpicklingError)
               else "Written by another version of nanoPETL, or damaged")
        return vitlib.CheckpointError(f"{path}: not the resume file of this run ({vitlib.error_line(e)}). {why}: "
                                      "delete it to start over")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        theirs = json.loads(state["recipe"])
    except (pickle.UnpicklingError, RuntimeError, ValueError, KeyError, TypeError, EOFError, OSError) as e:
        raise refuse(e) from None
    if differ := [f"{k} {theirs.get(k)!r} there, {v!r} here" for k, v in wanted.items() if theirs.get(k) != v]:
        raise vitlib.CheckpointError(f"{path}: the resume file of another run ({'; '.join(differ)}): delete it to "
                                     "start over, or re-run with the flags that wrote it")
    try:
        position = state["position"]
        position["epoch"], position["batch"], position["step"]  # noqa: B018 (each must be there)
        return state["model"], state["optimizer"], position
    except (KeyError, TypeError) as e:
        raise refuse(e) from None


def write_resume(path, tensors, opt, position, wanted):
    atomic(lambda p: torch.save(dict(model=tensors, optimizer=opt.state_dict(), position=position,
                                     recipe=json.dumps(wanted)), p), path)


def locked(path):
    """An open file holding the exclusive lock <path>.lock (waits, and says so, while another process holds it)."""
    lock = Path(str(path) + ".lock")
    while True:
        f = open(lock, "a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting: another process is building {path}")
            fcntl.flock(f, fcntl.LOCK_EX)
        if lock.exists() and os.stat(lock).st_ino == os.fstat(f.fileno()).st_ino:  # not a lock file its holder removed
            return f
        f.close()


def unlock(path, lock):
    if lock:
        Path(str(path) + ".lock").unlink(missing_ok=True)  # while held: a waiter sees it gone and takes a new one
        lock.close()


def check_own(out, kind):
    """--out of a builder may be replaced only when it is a regular file (not a link) whose nanoPETL header holds
    `kind` (a module's "method", a backbone's "preset"): a file it did not write is left as it is."""
    if not (out.exists() or out.is_symlink()):
        return
    try:
        ours = out.is_file() and not out.is_symlink() and kind in header(out)
    except Exception:  # not a .safetensors file at all
        ours = False
    need(ours, f"--out {out} exists and is not a checkpoint this command wrote (a link, a device, or another file): "
         "it is left as it is; give another --out, or move it away")


def check_writable(out):
    """--out's folder exists (made if needed) and takes a file: found before training, not after."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.", suffix=".write-test"):
            pass  # a name of its own: ranks under torchrun check at once
    except OSError as e:
        raise UsageError(f"--out {out}: cannot write in {out.parent} ({e.strerror or e}): give a path in a "
                         "folder you can write to") from None

# -----------------------------------------------------------------------------
# the backbone, and the embedded pieces built on demand (by running a command, whose progress shows)


def load_backbone(weights, arch="vit_base_patch16", img_size=None):
    """(ViT without head, its name): `weights` (a PRETRAINED name or a path), or with None the embedded backbone."""
    if weights is None:  # checked against the weight hash its header records: a damaged file is refused
        path = embedded_backbone()
        model = vitlib.load_pretrained(vitlib.vit_synthetic(num_classes=0), path, verbose=False).eval()
        pinned = PINNED.get(Path(path).resolve())  # the shipped file's hash is the code's, not its header's
        recorded = pinned or header(path).get("weights_hash")
        if recorded is not None and recorded != weights_hash(model):
            raise vitlib.CheckpointError(f"{path}: its weights hash to {weights_hash(model)}, not to the {recorded} "
                                         "its header records (damaged or replaced?): " + (
                                             "restore it (git checkout assets/vit_synthetic.safetensors)" if pinned else
                                             "delete it, and the next run builds it again"))
        return model, "vit_synthetic"
    arch = vitlib.PRETRAINED.get(weights, {}).get("preset", arch)
    model = vitlib.PRESETS[arch](num_classes=0, **({"img_size": img_size} if img_size else {}))
    return vitlib.load_pretrained(model, weights).eval(), f"{arch}:{Path(weights).name}"


def pretrain_once(path, script, argv, what):
    """Build a missing piece by running `script` (its progress shows here), which locks `path`, so two sweeps
    starting at once build it once; --resume goes on from an interrupted build's last epoch."""
    print(f"building {what} once; cached at {path}")
    cmd = [sys.executable, str(HERE / script), *argv, "--out", str(path), "--resume"]
    if (code := subprocess.run(cmd).returncode) != 0:
        raise KeyboardInterrupt if code == 130 else UsageError(
            f"building {what} failed ({' '.join(cmd[1:])} exited with {code}; its message is above)")
    return path


def embedded_backbone():
    """The path of the shipped embedded backbone (assets/, made by tools/build_backbone.py with the recipe its header
    records), or of one built by that command under checkpoints/ when the shipped file is gone."""
    if SHIPPED_BACKBONE.exists():
        return SHIPPED_BACKBONE
    path = CHECKPOINTS / "vit_synthetic.safetensors"
    return path if path.exists() else pretrain_once(path, "tools/build_backbone.py", EMBEDDED_BUILD, "the embedded "
                                                    f"backbone ({SHIPPED_BACKBONE} is gone; git checkout restores it)")


def embedded_pvp(backbone, registry):
    """The embedded PVP prompts (VPT-deep pre-trained on the synthetic PVP source), built when missing, or again when
    they were made on another backbone or by other code."""
    path = CHECKPOINTS / "pvp_vpt_vit_synthetic.safetensors"
    try:
        meta = module_header(path, registry) if path.exists() else None
        stale = meta and (meta["backbone_hash"] != weights_hash(backbone) or meta.get("recipe", {}).get("code") !=
                          code_of(registry["vpt"], files=(*RUNS, "pvp_pretrain.py")))
    except vitlib.CheckpointError:
        stale = True
    if not path.exists() or stale:
        pretrain_once(path, "pvp_pretrain.py", ["--weights", str(embedded_backbone()), "--arch", "vit_synthetic",
                                                *EMBEDDED_BUILD], "the embedded PVP prompts" +
                      " (the backbone or the code changed)" * bool(stale))
    return path

# -----------------------------------------------------------------------------
# the checks a sweep makes before any work


def check_sweep(cfg, registry, recipes, named, method_options):
    """Refuse what cannot work before any time is spent: one UsageError naming the flag and what to do. `registry`,
    `recipes`, `named` (flag -> option) and method_options(name, cfg) are fewshot.py's. Returns (methods, shots,
    seeds, {method: its options as its constructor resolves them})."""
    methods = list(registry) if cfg.method.strip() == "all" else [m.strip() for m in cfg.method.split(",")]
    need(all(methods), f"--method {cfg.method!r} has an empty name: a comma list of names, e.g. linear,vpt")
    need("all" not in methods, f"--method {cfg.method}: 'all' stands alone (it means every method)")
    unknown = [m for m in methods if m not in registry]
    need(not unknown, f"unknown method {', '.join(unknown)}: choose from {', '.join(registry)}, or all")
    need(len(set(methods)) == len(methods), f"--method {cfg.method} names a method twice")
    need(0 < cfg.lr <= LR_MAX, f"--lr must be a positive number, at most {LR_MAX:g}, got {cfg.lr}")
    shots = [None] if cfg.shots == "all" else listed("--shots", cfg.shots, int, lambda k: k >= 1,
                                                     "'all' or a comma list of whole numbers from 1 up")
    seeds = listed("--seeds", cfg.seeds, int, lambda s: 0 <= s <= MAX_SEED,
                   f"a comma list of whole numbers from 0 to {MAX_SEED}")
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    need(cfg.grid or (cfg.grid_lr, cfg.grid_wd) == (defaults["grid_lr"], defaults["grid_wd"]),
         "--grid-lr and --grid-wd are the grid that --grid searches: add --grid, or drop them")
    listed("--grid-lr", cfg.grid_lr, float, lambda v: 0 < v <= LR_MAX, f"a comma list of lrs in (0, {LR_MAX:g}]")
    listed("--grid-wd", cfg.grid_wd, float, lambda v: 0 <= v < math.inf, "a comma list of weight decays >= 0")
    check_flags(cfg)
    listed("--prune-grid", cfg.prune_grid, float, lambda v: 0 <= v < 1, "a comma list of fractions in [0, 1)")
    need(cfg.reprob == 0 or cfg.aug == "randaug", "--reprob is random erasing inside --aug randaug: "
         "add --aug randaug, or drop --reprob")
    need(cfg.recipe in recipes, f"--recipe {cfg.recipe}: choose one of {', '.join(recipes)}")
    data.check_flags(cfg.data, cfg.data_root, cfg.download, cfg.vtab_task, shots)
    arch = check_backbone_flags(cfg)
    if cfg.pvp_init and "pvp" not in methods:  # harmless (one flag set for many sweeps), but maybe a slip: say so
        print(f"warning: --pvp-init is where --method pvp starts, and --method {cfg.method} has no pvp: it is ignored",
              file=sys.stderr)
    need(cfg.pvp_init is None or Path(cfg.pvp_init).is_file(), f"--pvp-init: no module checkpoint at {cfg.pvp_init}; "
         "make one with python pvp_pretrain.py --weights <this backbone> --out <path>")
    need("pvp" not in methods or cfg.pvp_init or cfg.weights is None, "--method pvp with --weights needs --pvp-init: a "
         "module checkpoint pre-trained on that backbone (python pvp_pretrain.py --weights ...)")
    i, _, n = (cfg.shard or "0/1").partition("/")
    need(re.fullmatch(r"[0-9]+/[0-9]+", cfg.shard or "0/1") and int(i) < int(n), f"--shard {cfg.shard}: write i/n "
         "with 0 <= i < n, e.g. --shard 0/4 ... --shard 3/4 for four jobs")
    check_device("--device", cfg.device, cfg.amp)
    check_environment()
    configs = check_options(cfg, methods, arch, registry, named, method_options)  # and their sizes on --device
    check_out_folder(Path(cfg.out))
    return methods, shots, seeds, configs


def check_out_folder(out):
    """--out: a folder we can write, whose results.jsonl (if any) is a plain file."""
    results = out / "results.jsonl"
    need(not out.exists() or out.is_dir(), f"--out {out} is a file, not a folder: give a folder for results.jsonl")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {out}: cannot create that folder ({e.strerror}): give one you can write to") from None
    need(os.access(out, os.W_OK), f"--out {out}: cannot write in that folder: give one you can write to")
    need(not results.exists() or results.is_file(), f"{results} is not a regular file (a re-run reads it whole): "
         "move it away, or give another --out")
    links = [p.name for p in (results, out / "summary.md", out / "accuracy_vs_shots.png", out / ".claims")
             if p.is_symlink()]
    need(not links, f"--out {out}: {', '.join(links)} {'is a link' if len(links) == 1 else 'are links'}, and a sweep "
         "writes only files of its own, never through a link: move it away, or give another --out")


def check_options(cfg, methods, arch, registry, named, method_options):
    """Method options: each given one taken by some chosen method, each value one its constructor accepts (tried on
    a weightless 'meta' copy of the backbone, then its sizes: check_size), and none that contradicts a pvp module's."""
    given = given_options(cfg, named)
    builders = [m for m in methods if m != "pvp"]
    takers = {k: [m for m in builders if k in options_of(registry[m])] for k in given}
    if "pvp" in methods and cfg.pvp_init:  # the module's options are its checkpoint's: a flag may not differ
        meta = module_header(cfg.pvp_init, registry)
        clash = {k: (v, meta["config"][k]) for k, v in given.items() if k in meta["config"] and meta["config"][k] != v}
        need(not clash, f"--pvp-init {cfg.pvp_init} holds a {meta['method']} module with " + ", ".join(
            f"{k}={theirs!r}" for k, (_, theirs) in clash.items()) + ", and this command asks for " + ", ".join(
            f"{k}={mine!r}" for k, (mine, _) in clash.items()) + ": pvp keeps its module's options, so compare like "
            "with like (drop the flag, or pre-train a module with it: pvp_pretrain.py)")
        takers = {k: ms + ["pvp"] * (k in meta["config"]) for k, ms in takers.items()}
    for k, ms in takers.items():
        flag_name = next((f"--{f.replace('_', '-')}" for f, (o, _) in named.items() if o == k and getattr(cfg, f) is not
                          None), f"--opt {k}")
        if not ms and flag_name.startswith("--opt"):
            raise UsageError(f"{flag_name}: none of --method {','.join(methods)} takes it; " + "; ".join(
                f"{m} takes {', '.join(options_of(registry[m])) or 'no options'}" for m in builders))
        if not ms:  # a named option (--prompts, --rank, ...) set once for many sweeps: a warning
            print(f"warning: {flag_name} is ignored: none of --method {','.join(methods)} takes {k}", file=sys.stderr)
    for m in builders:
        for k, v in method_options(m, cfg).items():
            check_type(m, k, v, options_of(registry[m])[k])
    configs = {}
    if not builders:  # pvp alone: its options are its checkpoint's (and a first meta build costs about a second)
        return configs
    with torch.device("meta"):  # no memory, no weights: the constructors check their own arguments
        skeleton = vitlib.PRESETS[arch](num_classes=0, **({"img_size": cfg.img_size} if cfg.img_size else {}))
        for m in builders:
            try:
                model = registry[m](copy.deepcopy(skeleton), num_classes=2, **method_options(m, cfg))
            except (TypeError, ValueError) as e:
                raise UsageError(f"--method {m}: {vitlib.error_line(e)}; change the option (--opt NAME=VALUE or its "
                                 "flag)") from None
            configs[m] = model.config
            check_size(m, model, cfg.batch, cfg.img_size or skeleton.img_size, cfg.device, cfg.amp)
    return configs  # as the constructors resolve them (defaults filled in): what a run's key holds


def memory_of(device):
    """Bytes of memory on --device: a GPU's own, or the machine's RAM shared by the ranks torchrun started on it."""
    device = pick_device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device.index or int(os.environ.get("LOCAL_RANK", "0"))).total_memory
    if device.type == "mps":
        return torch.mps.recommended_max_memory()
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def check_size(name, model, batch, img_size, device, amp):
    """Refuse, from arithmetic on a weightless build and before any data loads, what `device` cannot hold. Both
    figures are lower bounds: 16 bytes per trainable parameter (its value, gradient and AdamW's two moments) and, for
    a module trained through the ViT, 8 activations of tokens x dim per block and image kept for the backward pass."""
    have, gb, device = memory_of(device), lambda b: f"{b / 1e9:,.1f} GB", pick_device(device)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    module = 16 * sum(trainable.values())
    need(module < have, f"--method {name} with {json.dumps(model.config)}: {sum(trainable.values()):,} trainable "
         f"parameters need at least {gb(module)} to train, more than the {gb(have)} of {device}: choose smaller "
         "options (--prompts, --kv-prompts, --rank, --opt)")
    if all(n.startswith("head.") for n in trainable):
        return  # the linear probe: nothing back-propagates through the ViT
    vit, prompts = model.vit, model.config.get("num_prompts", 0)
    tokens = 1 + (img_size // vit.patch_size) ** 2 + prompts
    step = module + batch * len(vit.blocks) * tokens * vit.dim * 8 * (2 if amp else 4)
    of_them = f" ({prompts} of them prompts)" * bool(prompts)
    need(step < have, f"--batch {batch}: one training step of {name} keeps at least {gb(step)} ({batch} images x "
         f"{len(vit.blocks)} blocks x {tokens} tokens{of_them} x {vit.dim} dims x 8 activations), more than the "
         f"{gb(have)} of {device}: lower --batch" + " or --prompts" * (2 * prompts > tokens))

# -----------------------------------------------------------------------------
# a run's key, the results file (lines appended under a lock, read back whatever is in it), claims


RUNS = ("fewshot.py", "plumbing.py", "vit.py", "data.py")  # the sources every run executes, besides its method's


@functools.lru_cache(maxsize=None)
def source_hash(path):
    """A source file by what it executes: its syntax tree (comments and blank lines are not in it; docstrings are)."""
    return hashlib.sha256(ast.dump(ast.parse(Path(path).read_text())).encode()).hexdigest()[:16]


def code_of(*builds, files=RUNS):
    """{file: source_hash} of `files` (in the project folder) and of the files defining the registry entries
    `builds` (a class, a function, or a functools.partial of one): the code a run's numbers come from."""
    paths = [HERE / f for f in files] + [Path(inspect.getsourcefile(getattr(b, "func", b))) for b in builds]
    return {p.name: source_hash(str(p)) for p in sorted(set(paths))}


def normal(value):
    """A value as a key holds it: JSON's kinds, a whole float as an int (--opt init_std=0 and 0.0 are one run)."""
    if isinstance(value, dict):
        return {k: normal(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [normal(v) for v in value]
    return int(value) if isinstance(value, float) and value.is_integer() else value


def why_again(identity, done):
    """Why a run whose key is not in the results file runs although a line for the same run is there: its code
    changed (which files), its data changed (the fingerprint), it runs elsewhere, or the line was written before code
    was keyed; else None."""
    def same(i):  # the identity but for the code, what built a pvp module, the data's fingerprint, and where it ran
        i = {k: v for k, v in normal(i).items() if k not in ("code", "run")}
        return i | dict(options={k: v for k, v in i["options"].items() if k != "built_by"},
                        data={**i["data"], "fingerprint": None})
    mine = same(identity)
    for r in reversed(done.values()):  # the newest line for the run says what changed since
        theirs = r.get("identity")
        if isinstance(theirs, dict) and same(theirs) == mine:
            if "code" not in theirs:
                return "its line in results.jsonl was written before the code was keyed"
            changed = sorted(f for f in {*identity["code"], *theirs["code"]}
                             if identity["code"].get(f) != theirs["code"].get(f))
            if changed or identity["options"] != normal(theirs["options"]):
                return f"the code changed since its line in results.jsonl ({', '.join(changed) or 'its module'})"
            if theirs["data"]["fingerprint"] != identity["data"]["fingerprint"]:
                return "its data changed since its line in results.jsonl (files read, their labels, sizes or mtimes)"
            return f"its line in results.jsonl ran elsewhere ({theirs.get('run')}, now {identity['run']})"
    return None


def estimate(done, total, t0):
    """After the first of `total` trainings (started at t0): what it took, and about what all of them will."""
    if done == 1:
        took = time.time() - t0
        tqdm.write(f"the first training took {took:.0f} s: about {total * took / 60:.0f} min for all {total}")


def say_why(key, identity, done, said):
    """Say once per reason why a run runs again (why_again), on a line of its own above the bars."""
    if (why := why_again(identity, done)) and why not in said:
        said.add(why)
        tqdm.write(f"{key.rsplit('|', 1)[0]}: {why}: re-running it (and every run like it)", file=sys.stderr)


def module_identity(meta, tensors):
    """What a pvp run's key holds of its module: type, options, content, and the code that built it."""
    return dict(method=meta["method"], config=meta["config"], hash=tensors_hash(tensors),
                built_by=meta.get("recipe", {}).get("code"))


def run_identity(name, task, cfg, backbone_hash, options, device, protocol, build):
    """Everything that determines a run's numbers, as JSON: the method and its options (pvp: its module's type, options,
    content and code), the data (name, root, fingerprint of the files or pixels read), task, shots, seed, `protocol`
    with the image size, normalisation and augmentation as resolved, the backbone's weights by content, the code
    (code_of `build`), and where it ran. Paths are not in it: a moved file is the same run, a replaced one is not."""
    m = task.meta
    return normal(dict(method=name, options=options, data=dict(
        dataset=task.name, root=m.get("root") and str(Path(m["root"]).resolve()), fingerprint=m["fingerprint"]),
        shots=m["shots"] or "all", seed=m["seed"], protocol=protocol | dict(
            img_size=task.img_size, mean=task.mean, std=task.std, aug=task.train_aug), backbone=backbone_hash,
        code=code_of(build), run=dict(device=device.type, torch=torch.__version__, compile=cfg.compile)))


def run_key(identity):
    """method|task|shots|seed|hash of the run's identity (everything that determines its numbers): readable in
    front, exact behind."""
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return f"{label(identity['method'], identity['options'])}|{identity['data']['dataset']}|{identity['shots']}|" \
           f"{identity['seed']}|{digest}"


def label(name, options):
    """The table's row name: pvp says which module it starts from, pvp(vpt) or pvp(lora)."""
    return f"pvp({options['method']})" if name == "pvp" else name


REQUIRED = dict(key=str, method=str, status=str, seconds=(int, float))
REQUIRED_OK = dict(test_top1=(int, float), val_top1=(int, float), trainable=int)


def append(path, record):
    """One JSON line, appended under an exclusive lock and flushed to disk: sweeps sharing --out never interleave.
    A line torn by an earlier failed write is ended first, so it cannot swallow this one."""
    try:
        with open(path, "ab+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX)
            except OSError:  # a file system without flock (some NFS, Lustre; --shard): still one O_APPEND write
                pass
            end = f.seek(0, os.SEEK_END)
            torn = end > 0 and f.seek(end - 1) == end - 1 and f.read(1) != b"\n"
            f.write(b"\n" * torn + json.dumps(record).encode() + b"\n")
            f.flush(), os.fsync(f.fileno())
    except OSError as e:  # e.g. the disk is full
        raise UsageError(f"cannot write {path}: {e.strerror or e}. The runs finished before this one are kept there; "
                         f"free some space (or pass another --out) and run the same command again") from None


def finished(path, warn=False):
    """{key: record} of the well-formed lines of a results file. A line that is not JSON, not an object or lacks a
    field (a write cut short, an edit by hand) is skipped, so its run runs again; warn=True says which lines."""
    if not path.exists():
        return {}
    if not path.is_file():  # a FIFO or a device would be read forever
        raise UsageError(f"{path} is not a regular file (a re-run reads it whole): move it away, or give another --out")
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except OSError as e:
        raise UsageError(f"cannot read {path} ({e.strerror or e}), the results of earlier runs in --out: fix its "
                         "permissions, or give another --out") from None
    records, bad, at = {}, [], {}
    numbers = lambda r: [r.get(k) for k in ("status", "val_top1", "test_top1")]  # noqa: E731
    for n, line in enumerate(text.splitlines(), 1):
        try:
            r = json.loads(line)
        except ValueError:
            r = None
        need_ok = REQUIRED | (REQUIRED_OK if isinstance(r, dict) and r.get("status") == "ok" else {})
        if isinstance(r, dict) and all(isinstance(r.get(k), t) and not isinstance(r.get(k), bool) and
                                       (not isinstance(r.get(k), float) or math.isfinite(r[k])) for k, t in
                                       need_ok.items()):  # a bool is no number, and NaN no accuracy
            need(r["key"] not in records or numbers(records[r["key"]]) == numbers(r), f"{path}: lines "
                 f"{at.get(r['key'])} and {n} hold one run ({r['key']}) with different numbers: keep the right line, "
                 "delete the other, and run the same command again")
            records[r["key"]], at[r["key"]] = r, n
        elif line.strip():
            bad.append(n)
    if warn and bad:
        shown = ", ".join(map(str, bad[:10])) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        print(f"warning: {path}: skipped {len(bad)} line(s) that are not whole results lines (line {shown}); their "
              "runs, if planned, run again", file=sys.stderr)
    return records


def claim(out, key):
    """An open file holding an exclusive lock for run `key` while it trains, or None if another process holds it:
    two sweeps on one --out split the work instead of repeating it. The OS drops the lock if the process dies."""
    d = out / ".claims"
    d.mkdir(exist_ok=True)
    f = open(d / hashlib.sha1(key.encode()).hexdigest()[:16], "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return f
    except BlockingIOError:
        f.close()
        return None


def say_missing(missing, planned, results, shards):
    """After a sweep: why some planned runs are not in the results file yet."""
    if missing and shards > 1:
        print(f"{len(missing)} of the {len(planned)} planned runs are not in {results} yet: other shards' (--shard "
              f"i/{shards}), or runs another job on this --out is training; when every job has finished, run any of "
              "them again (or this command without --shard) for the full table", file=sys.stderr)
    elif missing:
        print(f"{len(missing)} runs are not in {results} yet: another sweep on {results.parent} is running them; when "
              "it ends, run this command again for the full table", file=sys.stderr)

# -----------------------------------------------------------------------------
# the table and the plot


def cells(records, rows):
    """{(row, shots): (per-seed test top-1 averaged over tasks, the runs)} over the finished runs."""
    out = {}
    for m in rows:
        for k in sorted({r["shots"] for r in records if r["row"] == m}, key=lambda s: (s == "all", s)):
            rs = [r for r in records if r["row"] == m and r["shots"] == k and r["status"] == "ok"]
            per_seed = [[r["test_top1"] for r in rs if r["seed"] == s] for s in sorted({r["seed"] for r in rs})]
            if rs:
                out[m, k] = torch.tensor([sum(a) / len(a) for a in per_seed]), rs
    return out


def summarize(records, rows, backbone_params):
    """Markdown: method x shots, test top-1 as mean ± std over seeds of the mean over tasks."""
    lines = ["| method | shots | test top-1 (%) | seeds x tasks | trainable params | % of backbone | s / run |",
             "|---|---|---|---|---|---|---|"]
    for (m, k), (acc, rs) in cells(records, rows).items():
        spread = f" ± {acc.std().item():.2f}" if len(acc) > 1 else ""
        p = sum(r["trainable"] for r in rs) / len(rs)
        lines.append(f"| {m} | {k} | {acc.mean():.2f}{spread} | {len(acc)} x {len(rs) // len(acc)} | {p:,.0f} | "
                     f"{100 * p / backbone_params:.3f} | {sum(r['seconds'] for r in rs) / len(rs):.1f} |")
    return "\n".join(lines)


def plot(records, rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    table = cells(records, rows)
    for m in rows:
        points = [(k, acc.mean().item(), acc.std().item() if len(acc) > 1 else 0.0)
                  for (mm, k), (acc, _) in table.items() if mm == m and k != "all"]
        if points:
            shots, mean, std = map(torch.tensor, zip(*points))
            ax.plot(shots, mean, marker="o", label=m)
            ax.fill_between(shots, mean - std, mean + std, alpha=0.15)
    ax.set(xscale="log", xlabel="shots per class", ylabel="test top-1 (%)",
           title="few-shot accuracy (mean ± std over seeds)")
    ax.set_xticks([1, 2, 4, 8, 16], ["1", "2", "4", "8", "16"])
    ax.grid(alpha=0.3), ax.legend(fontsize=8)
    fig.tight_layout(), fig.savefig(path, dpi=120)


def record(key, m, identity, task, k, s, cfg, backbone_name, backbone_params, device):
    """A results line before its numbers: what ran, on what, how (the numbers and seconds are added after the run)."""
    return dict(key=key, method=m, row=label(m, identity["options"]), dataset=task.name, shots=k or "all", seed=s,
                identity=identity, backbone=backbone_name, weights=cfg.weights,
                pvp_init=cfg.pvp_init if m == "pvp" else None, protocol=identity["protocol"], recipe=cfg.recipe,
                mean=task.mean, std=task.std, train_aug=task.train_aug,
                sizes=dict(train=len(task.train), val=len(task.val), test=len(task.test)),
                num_classes=task.num_classes, backbone_params=backbone_params, compiled=cfg.compile, device=str(device))


def vtab_lines(done, records):
    """For each row of this command's VTAB-1k runs, both VTAB-1k averages (data.vtab_averages) over the tasks in the
    results file that ran like it (method, options, shots, protocol, backbone), each task's mean over its seeds."""
    like = lambda r: json.dumps([r["identity"].get(k) for k in ("method", "options", "shots", "protocol", "backbone")],
                                sort_keys=True)  # noqa: E731
    vtab = [r for r in done.values() if r.get("status") == "ok" and str(r.get("dataset")).startswith("vtab1k:") and
            isinstance(r.get("identity"), dict)]
    for kind in dict.fromkeys(like(r) for r in records if r in vtab):
        per_task = {}
        for r in (r for r in vtab if like(r) == kind):
            per_task.setdefault(r["dataset"].split(":", 1)[1], []).append(r["test_top1"])
        row = next(r["row"] for r in vtab if like(r) == kind)
        print(f"{row}: " + data.vtab_averages({t: sum(v) / len(v) for t, v in per_task.items()}))


def write_table(cfg, methods, planned, backbone_name, backbone_hash, backbone_params):
    """After the sweep: print the table of this command's runs (what the results file holds of `planned`, with what
    other ranks or sweeps on this --out wrote), save it as summary.md, and the plot with --plot."""
    out = Path(cfg.out)
    results = out / "results.jsonl"
    done = finished(results)
    say_missing([key for key in planned if key not in done], planned, results, int((cfg.shard or "0/1").split("/")[1]))
    records = [done[key] for key in dict.fromkeys(planned) if key in done]  # this command's runs, nothing else
    rows = list(dict.fromkeys(r["row"] for r in records))
    table = summarize(records, rows, backbone_params)
    if failed := sum(r["status"] != "ok" for r in records):
        print(f"{failed} runs failed (their lines in {results} say why); the table leaves them out", file=sys.stderr)
    print(table)
    vtab_lines(done, records)
    if cfg.weights is None and "pvp" in methods and not {"linear", "vpt"} <= set(methods):  # what to put beside pvp
        print(f"How to read it: PVP's claim is against the same prompts started at random and the linear probe; "
              f"run them on the same tasks: the same command with --method linear,vpt,{cfg.method} (docs/results.md "
              "has every method at 1-16 shots)")
    try:
        (out / "summary.md").write_text(f"{cfg.data}, backbone {backbone_name} (weights {backbone_hash})\n\n{table}\n")
        print(f"saved: {results}, {out / 'summary.md'}")
        if cfg.plot:
            plot(records, rows, out / "accuracy_vs_shots.png")
            print(f"saved: {out / 'accuracy_vs_shots.png'}")
    except OSError as e:
        raise UsageError(f"cannot write {e.filename or out}: {e.strerror or e}. Every run is kept in {results}; free "
                         f"some space and run the same command again to write the table") from None

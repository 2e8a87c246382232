"""
One prepared command that checks a GPU machine, for the minutes one is lent: the CUDA path of nanoPETL (bf16
autocast, non-blocking copies, NCCL, torch.compile, memory at ViT-B/16 size) and figures worth keeping.

    python tests/gpu_check.py --out runs/gpu_check               # on the GPU machine, within --budget-s (420)
    python tests/gpu_check.py --out runs/gpu_check --only speed,data   # rerun some: the others' results are kept
    python tests/gpu_check.py --out /tmp/gc --tiny               # the same code at micro size on the CPU (CI)

Six checks, each pass / fail / skipped with its figure, one row per method or case below it:
  parity    every method of fewshot.METHODS (pvp from a module pre-trained here by pvp_pretrain.pretrain) at
            ViT-B/16 size, random weights: logits on the device in fp32 with TF32 off against the CPU, to 1e-4;
            bf16 autocast against fp32 on the device: top-1 agreement on a batch and the largest logit difference
  train     every method trains a few steps through fewshot.train, in bf16 autocast (--amp) on CUDA: finite loss,
            frozen tensors bit-identical, trained ones moved, peak memory; then fewshot.run_one (fit: E2VPT's prune
            and rewind, LoRA's merge; evaluate in bf16) on an embedded task
  speed     ViT-B/16 forward and a VPT-deep training step in bf16 at batch 128: ours against timm's
            VisionTransformer with the same weights, in one process (images/s, ours/timm, share of the card's bf16
            peak counted from FLOPs), eager and under torch.compile (compiled in a child process with a timeout)
  data      the path that feeds the GPU: JPEG decode as data.load_task does it (data.decode), fewshot.batches to the
            device, and torchvision's ImageFolder + DataLoader with the machine's workers: is the loader the bottleneck?
  torchrun  a sweep (fewshot.py) and a pre-training (pvp_pretrain.py) under torchrun: 2 processes over NCCL with 2+
            GPUs, else 1 process; on the CPU over gloo (2 processes, 1 with --tiny)
  e2e       the main job, `python fewshot.py --method pvp --shots 1` (building the embedded backbone and prompts
            first, within its time, when checkpoints/ lacks them), and a micro run on a real layout (an imagefolder
            of JPEGs, a random ViT saved as a timm checkpoint), each timed
A check that cannot run here (no CUDA, one GPU, no timm) is "skipped" with the reason, never "pass"; on the CPU the
CUDA-only checks still run their code and say so. A check that raises is "fail" with its error line (the traceback
goes to the JSON) and the next one runs. --budget-s is shared out: each check gets its part of what is left, a
check that cannot fit is skipped, child processes are killed at their share. --tiny runs the same code on the CPU
at vit_synthetic size, torch.compile with the "eager" backend (the main job uses a random backbone and a micro
module there, not the embedded build); --tiny --device cuda is a quick smoke test on a GPU.
Results: <out>/gpu_check.json (rewritten after every row, so a kill keeps what was measured), <out>/gpu_check.md
(the table, also printed), <out>/logs/ (each child process's output). Exit 0 only if nothing failed.
"""
import argparse
import copy
import dataclasses
import datetime
import faulthandler
import importlib.metadata
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # progress is this script's own lines; bars would only fill the logs
os.environ.setdefault("PYTHONUNBUFFERED", "1")  # and the child processes', as they happen
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the flat project files import as modules

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import data  # noqa: E402
import fewshot  # noqa: E402
import plumbing  # noqa: E402
import pvp_pretrain  # noqa: E402
import vit as vitlib  # noqa: E402
import vpt  # noqa: E402

# -----------------------------------------------------------------------------
# sizes, thresholds, the card's peak

SIZES = {  # the real case (ViT-B/16 at 224 px) and --tiny (vit_synthetic, seconds on a CPU)
    "full": dict(arch="vit_base_patch16", parity_batch=8, agree_batch=64, train_batch=32, shots=2, eval_images=64,
                 steps=3, speed_batch=128, seconds=2.0, compile_backend="inductor", classes=8, per_class=40,
                 jpeg=(500, 375), loader_batch=64, max_steps=5, pretrain_batch=64, methods=("linear", "vpt", "pvp"),
                 seeds=(0, 1)),
    "tiny": dict(arch="vit_synthetic", parity_batch=4, agree_batch=4, train_batch=4, shots=1, eval_images=16,
                 steps=2, speed_batch=4, seconds=0.2, compile_backend="eager", classes=2, per_class=8,
                 jpeg=(64, 48), loader_batch=8, max_steps=2, pretrain_batch=64, methods=("vpt", "pvp"), seeds=(0,)),
}
FP32_TOL = 1e-4  # device against CPU, fp32 with TF32 off: |a - b| <= tol + tol * |b|
BF16_AGREE, BF16_REL = 0.9, 0.05  # bf16 autocast vs fp32: top-1 agreement at least; max |diff| / max |logit| at most
SPEED_RATIO = 0.9  # ours/timm images/s below this fails: the from-scratch ViT must not cost speed
PROMPTS = 10  # VPT-deep prompts per layer in the speed check (fewshot.py's --prompts default)
PEAK_BF16 = [  # (name contains, dense bf16 tensor TFLOP/s): NVIDIA's datasheets, half their with-sparsity figures
    ("H200 NVL", 835), ("H100 NVL", 835), ("H100 PCIe", 756), ("H200", 989), ("H100", 989), ("H800", 989),
    ("A100", 312), ("L40S", 362), ("L4", 121)]
CHECKS = ("parity", "train", "speed", "data", "torchrun", "e2e")
SHARE = dict(parity=0.10, train=0.14, speed=0.30, data=0.06, torchrun=0.12, e2e=0.28)  # of the budget left
LEAST = dict(parity=20, train=30, speed=30, data=10, torchrun=30, e2e=45)  # seconds a check needs at full size


class Skip(Exception):
    """The whole check cannot run here; its message is the reason."""


def say(msg):
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


T0 = time.time()

# -----------------------------------------------------------------------------
# the results: rows of (status, figure, detail), JSON rewritten after every row


class Report:
    """checks[name] = {status, figure, detail, seconds, rows: [{name, status, figure, detail}], figures: {...}}."""

    def __init__(self, out, meta, keep=None):
        self.out, self.meta = Path(out), meta
        self.checks = {k: v for k, v in (keep or {}).items() if k in CHECKS}
        self.out.mkdir(parents=True, exist_ok=True)

    def begin(self, name):
        self.checks[name] = dict(status="running", figure="", detail="", seconds=0.0, rows=[], figures={},
                                 mode=self.meta["mode"], device=self.meta["device"], at=now())
        self.write()
        return self.checks[name]

    def row(self, check, name, status, figure, detail=""):
        self.checks[check]["rows"].append(dict(name=name, status=status, figure=figure, detail=detail))
        say(f"{check} · {name}: {status.upper()}  {figure}{'  (' + detail + ')' if detail else ''}")
        self.write()

    def write(self):
        """Both files, each written whole to a temporary name and renamed: a kill leaves the last complete one."""
        self.meta["wall_s"] = round(time.time() - T0, 1)
        for name, text in (("gpu_check.json", json.dumps(dict(self.meta, checks=self.checks), indent=1)),
                           ("gpu_check.md", self.markdown())):
            tmp = self.out / (name + ".tmp")
            tmp.write_text(text + "\n")
            os.replace(tmp, self.out / name)

    def table(self):
        cell = lambda s: str(s).replace("|", "/").replace("\n", " ")
        rows = ["| check | status | figure | detail |", "|---|---|---|---|"]
        for name in CHECKS:
            if c := self.checks.get(name):
                rows.append(f"| **{name}** | {c['status']} | {cell(c['figure'])} | {cell(c['detail'])} |")
                rows += [f"| {name} · {cell(r['name'])} | {r['status']} | {cell(r['figure'])} | {cell(r['detail'])} |"
                         for r in c["rows"]]
        return "\n".join(rows)

    def markdown(self):
        m = self.meta
        return (f"# nanoPETL GPU check\n\n{m['started']} · {m['device_name']} ({m['device']}, {m['gpus']} GPU visible)"
                f" · torch {m['torch']} (CUDA {m['cuda']}) · timm {m['timm']} · {m['cpus']} CPUs · git {m['git']}"
                f" · {m['mode']} sizes · {m['wall_s']:.0f} s of a {m['budget_s']:.0f} s budget\n\n{self.table()}\n")


def now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def verdict(rows):
    """A check's status from its rows: fail if one failed, pass if all passed, else skipped."""
    statuses = {r["status"] for r in rows}
    return "fail" if "fail" in statuses else "pass" if statuses == {"pass"} else "skipped"

# -----------------------------------------------------------------------------
# what the checks share: the device, a random backbone, its files, a pre-trained module, a task


class Context:
    def __init__(self, args, report, work):
        self.args, self.report, self.work = args, report, Path(work)
        self.size = SIZES["tiny" if args.tiny else "full"]
        self.device = plumbing.pick_device(args.device)
        self.cuda = self.device.type == "cuda"
        self.check, self.deadline = None, math.inf
        self.rates = {}  # model images/s measured by `speed`, read by `data`
        self._backbone = self._file = self._module = self._task = None

    # a row of the running check; a CUDA-only result on another device is "skipped", never "pass" nor "fail" (a
    # shared CPU's timings say nothing about a GPU's); its figure is still reported
    def row(self, name, ok, figure, detail="", cuda_only=False):
        status = "skipped" if cuda_only and not self.cuda else "pass" if ok else "fail"
        if status == "skipped":
            detail = f"not CUDA: ran on {self.device.type}, which says nothing about CUDA{'; ' * bool(detail)}{detail}"
        self.report.row(self.check, name, status, figure, detail)
        return ok

    def skip_row(self, name, why):
        self.report.row(self.check, name, "skipped", "", why)

    def left(self):
        return self.deadline - time.time()

    def out_of_time(self, name):
        """True (with a skipped row) when the check's share of the budget is spent."""
        if self.left() > 0:
            return False
        self.skip_row(name, f"budget: this check's share ran out ({self.args.budget_s:.0f} s in all)")
        return True

    @property
    def arch(self):
        return self.size["arch"]

    def backbone(self):
        """A random ViT of the check's preset (no head), in eval mode on the CPU; every tensor random (biases and
        the CLS token too, which start at zero), so a path that drops one shows in the logits."""
        if self._backbone is None:
            torch.manual_seed(0)
            model = vitlib.PRESETS[self.arch](num_classes=0).eval()
            g = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for p in model.parameters():
                    if not p.any():
                        p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            self._backbone = model
        return self._backbone

    def backbone_file(self):
        """The backbone as a .safetensors file, for --weights."""
        if self._file is None:
            self._file = self.work / "backbone.safetensors"
            save_file({k: v.contiguous() for k, v in self.backbone().state_dict().items()}, self._file)
        return self._file

    def module(self):
        """A VPT-deep module pre-trained on the backbone by pvp_pretrain's own code at a micro budget (1 image per
        source class, 1 epoch): the checkpoint `pvp` is built from."""
        if self._module is None:
            path, t = self.work / "pvp_module.safetensors", time.time()
            argv = ["--per-class", "1", "--epochs", "1", "--batch", str(self.size["pretrain_batch"]), "--device",
                    str(self.device), "--out", str(path)] + ["--amp"] * self.cuda
            pvp_pretrain.pretrain(pvp_pretrain.parse(argv), copy.deepcopy(self.backbone()), f"{self.arch}:random")
            say(f"pvp module pre-trained on the random {self.arch} in {time.time() - t:.1f}s: {path.name}")
            self._module = path
        return self._module

    def config(self, **kw):
        """The few-shot protocol at the check's size, amp on CUDA."""
        return fewshot.Config(pvp_init=str(self.module()), max_steps=self.size["steps"], batch=self.size["train_batch"],
                              amp=self.cuda, device=str(self.device), **kw)

    def task(self):
        """synthetic:shape at the backbone's input size, val and test cut to eval_images each."""
        if self._task is None:
            [task] = data.load_task("synthetic:shape", shots=self.size["shots"], seed=0,
                                    img_size=self.backbone().img_size)
            cut = lambda s: s.subset(torch.randperm(len(s), generator=torch.Generator().manual_seed(0))
                                     [:self.size["eval_images"]])
            self._task = dataclasses.replace(task, val=cut(task.val), test=cut(task.test))
        return self._task


def timm_vit():
    """timm's VisionTransformer class, or None without timm (requirements.txt lists it); imported
    when needed, as it takes seconds."""
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:
        return None
    return VisionTransformer


def registry():
    """Every method, by name: the one registry fewshot.py runs (a new method is checked by being in it)."""
    return list(fewshot.METHODS)


def build(name, backbone, num_classes, cfg):
    """Method `name` around a fresh copy of `backbone`, as fewshot.fit builds it."""
    return fewshot.build(name, copy.deepcopy(backbone), num_classes, cfg)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class tf32_off:
    """fp32 matmuls and convolutions in full fp32 on CUDA (no TF32), restored on exit."""

    def __enter__(self):
        self.saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved


def bf16(device):
    """bf16 autocast on CUDA (as plumbing.autocast with --amp); fp32 elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

# -----------------------------------------------------------------------------
# 1. parity


def randomize_zeros(model, seed=2):
    """Draw every tensor of `model` that starts at zero (heads, LoRA's B): rows of unit norm for matrices (logits
    of order 1), 0.02 for vectors; so each method's own path shows in its logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                std = p.shape[1] ** -0.5 if p.ndim == 2 else 0.02
                p.copy_(torch.randn(p.shape, generator=g) * std)


def check_parity(ctx):
    size, dev = ctx.size, ctx.device
    backbone, cfg = ctx.backbone(), ctx.config()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(size["parity_batch"], 3, backbone.img_size, backbone.img_size, generator=g)
    xa = torch.randn(size["agree_batch"], 3, backbone.img_size, backbone.img_size, generator=g).to(dev)
    worst = 0.0
    for name in registry():
        if ctx.out_of_time(name):
            continue
        torch.manual_seed(0)
        model = build(name, backbone, 10, cfg).eval()
        randomize_zeros(model)
        with torch.no_grad():
            ref = model(x)  # fp32 on the CPU
        model.to(dev)
        with torch.no_grad(), tf32_off():
            got = model(x.to(dev)).float().cpu()
            fp = model(xa).float()
            with bf16(dev):
                half = model(xa).float()
        diff = (got - ref).abs().max().item()
        ok32 = bool(((got - ref).abs() <= FP32_TOL + FP32_TOL * ref.abs()).all())
        agree = (half.argmax(-1) == fp.argmax(-1)).float().mean().item()
        hdiff, scale = (half - fp).abs().max().item(), fp.abs().max().item()
        worst = max(worst, diff)
        ctx.row(name, ok32 and agree >= BF16_AGREE and hdiff <= BF16_REL * scale,
                f"fp32 max Δ {diff:.1e}; bf16 top-1 agree {100 * agree:.1f}%, max Δ {hdiff:.3f} "
                f"({100 * hdiff / scale:.1f}% of max logit)",
                f"{dev.type} vs cpu, batch {len(x)} (fp32) and {len(xa)} (bf16)", cuda_only=True)
        del model
    ctx.report.checks["parity"]["figures"]["fp32_max_diff"] = worst
    return (f"{len(registry())} methods at {ctx.arch}; fp32 worst max Δ {worst:.1e} (tol {FP32_TOL:g})",
            f"pass: fp32 within {FP32_TOL:g} abs + rel; bf16 agree >= {100 * BF16_AGREE:.0f}%, max Δ <= "
            f"{100 * BF16_REL:.0f}% of max logit; random weights, TF32 off")

# -----------------------------------------------------------------------------
# 2. train


def check_train(ctx):
    dev, task, backbone = ctx.device, ctx.task(), ctx.backbone()
    cfg = ctx.config()
    peaks = []
    for name in registry():
        if ctx.out_of_time(name):
            continue
        t = time.time()
        if ctx.cuda:
            torch.cuda.empty_cache(), torch.cuda.reset_peak_memory_stats(dev)
        torch.manual_seed(0)
        model = build(name, backbone, task.num_classes, cfg).to(dev)
        keep = lambda want: {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()
                             if p.requires_grad == want}  # copies on the CPU: not in the peak below
        frozen, trained = keep(False), keep(True)
        fewshot.train(model, task.train, task, cfg, dev, seed=0, desc=name)  # the one loop, autocast when amp
        peak = torch.cuda.max_memory_allocated(dev) / 2**30 if ctx.cuda else None
        x, y = next(fewshot.batches(task.train, task, dev, cfg.batch, train=False))
        with torch.no_grad(), plumbing.autocast(dev, cfg.amp):
            loss = F.cross_entropy(model.eval()(x).float(), y).item()
        params = dict(model.named_parameters())
        untouched = all(torch.equal(params[n].cpu(), v) for n, v in frozen.items())
        moved = any(not torch.equal(params[n].cpu(), v) for n, v in trained.items())
        del model, frozen, trained, params
        out = fewshot.run_one(name, task, backbone, cfg, dev, seed=0)  # fit (prune/rewind, merge) + evaluate
        ok = math.isfinite(loss) and untouched and moved and all(0 <= out[k] <= 100 for k in ("val_top1", "test_top1"))
        peaks.append(peak or 0.0)
        ctx.row(name, ok, f"loss {loss:.3f}; frozen {'untouched' if untouched else 'CHANGED'}; trained "
                f"{'moved' if moved else 'DID NOT MOVE'}; peak {f'{peak:.2f} GiB' if ctx.cuda else 'n/a (CPU)'}",
                f"{cfg.max_steps} steps at batch {min(cfg.batch, len(task.train))}, "
                f"{'bf16 autocast' if cfg.amp else 'fp32 (amp is CUDA-only)'}; run_one val {out['val_top1']:.1f}% "
                f"test {out['test_top1']:.1f}% ({len(task.val)}/{len(task.test)} images); {time.time() - t:.1f}s")
    ctx.report.checks["train"]["figures"]["peak_gib"] = max(peaks, default=0.0)
    return (f"{len(peaks)} methods at {ctx.arch}, peak {max(peaks, default=0):.2f} GiB" if ctx.cuda else
            f"{len(peaks)} methods at {ctx.arch}, peak n/a (CPU)",
            f"{task.name}, {len(task.train)} images, fewshot.train + fewshot.run_one")

# -----------------------------------------------------------------------------
# 3. speed: ours against timm, same weights, same process


def vit_flops(model, prompts=0):
    """Forward FLOPs per image of a standard ViT (every token through every block; multiply-add = 2): per block
    24 N D^2 (qkv 6, proj 2, MLP 16) + 4 N^2 D (scores and mix), N = 1 + prompts + patches; plus the patch
    embedding. Ours skips most of the last block's arithmetic (only CLS is read): counted as the same work, so the
    share of peak compares the two models on the same useful work."""
    d, p, n_patch = model.dim, model.patch_size, (model.img_size // model.patch_size) ** 2
    n = 1 + prompts + n_patch
    return len(model.blocks) * (24 * n * d * d + 4 * n * n * d) + 2 * n_patch * 3 * p * p * d


def peak_flops(device):
    """(FLOP/s, how it was found): the datasheet's dense bf16 figure for a known card, else a measured matmul."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    for key, tflops in PEAK_BF16:
        if key in name:
            return tflops * 1e12, f"{name}: {tflops} TFLOP/s dense bf16 (datasheet)"
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (512, torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    sync(device)
    t, reps = time.perf_counter(), 10
    for _ in range(reps):
        a @ b
    sync(device)
    rate = 2 * n**3 * reps / (time.perf_counter() - t)
    return rate, f"{name}: not in the table, measured {n}x{n} {str(dtype)[6:]} matmul {rate / 1e12:.3g} TFLOP/s"


def to_timm(model):
    """timm's VisionTransformer (no head) holding `model`'s weights: the patch Linear becomes timm's conv kernel."""
    p, d = model.patch_size, model.dim
    ref = timm_vit()(img_size=model.img_size, patch_size=p, embed_dim=d, depth=len(model.blocks),
                            num_heads=model.blocks[0].attn.heads, num_classes=0)
    sd = dict(model.state_dict())
    sd["patch_embed.proj.weight"] = sd["patch_embed.proj.weight"].reshape(d, 3, p, p)  # patches flatten as (c p1 p2)
    ref.load_state_dict(sd, strict=True)
    return ref.eval()


class TimmVPT(nn.Module):
    """VPT-deep written over timm's blocks, holding the same prompts and head as a vpt.VPT: prompts between CLS and
    the patches, replaced before every block (vpt.py's docstring has the equations)."""

    def __init__(self, ref, ours):
        super().__init__()
        self.ref = ref.requires_grad_(False).eval()
        self.prompts, self.head = nn.Parameter(ours.prompts.detach().clone()), copy.deepcopy(ours.head)
        self.dropout = nn.Dropout(ours.dropout.p)

    def train(self, mode=True):
        super().train(mode)
        self.ref.eval()
        return self

    def forward(self, images):
        x = self.ref._pos_embed(self.ref.patch_embed(images))  # (B, 1+N, D), CLS first, position added
        b, p = x.shape[0], self.prompts.shape[1]
        for i, blk in enumerate(self.ref.blocks):
            patches = x[:, 1:] if i == 0 else x[:, 1 + p:]
            x = blk(torch.cat([x[:, :1], self.dropout(self.prompts[i].expand(b, -1, -1)), patches], dim=1))
        return self.head(self.ref.norm(x)[:, 0])


def rates(fns, batch, device, seconds, deadline):
    """Images/s of each fn, the median over repeats taken in turn (drift hits all alike), after 2 warm-up calls
    (where torch.compile compiles); each repeat runs enough calls for ~50 ms."""
    for f in fns:
        f(), f()
    sync(device)
    calls = []
    for f in fns:
        t = time.perf_counter()
        f(), sync(device)
        calls.append(max(1, int(0.05 / max(time.perf_counter() - t, 1e-6))))
    times = [[] for _ in fns]
    stop = min(time.time() + seconds, deadline)
    while len(times[0]) < 3 or time.time() < stop:
        for f, k, ts in zip(fns, calls, times):
            t = time.perf_counter()
            for _ in range(k):
                f()
            sync(device)
            ts.append((time.perf_counter() - t) / k)
    return [batch / statistics.median(ts) for ts in times]


def speed_rows(ctx, compiled):
    """[(pass, ours img/s, timm img/s or None, FLOPs per image)] for the forward and the VPT-deep training step."""
    dev, size = ctx.device, ctx.size
    ours = copy.deepcopy(ctx.backbone()).requires_grad_(False).to(dev)
    ref = to_timm(ctx.backbone()).requires_grad_(False).to(dev) if timm_vit() else None
    wrap = (lambda m: torch.compile(m, backend=size["compile_backend"])) if compiled else (lambda m: m)
    b, side = size["speed_batch"], ours.img_size
    x = torch.randn(b, 3, side, side, device=dev)
    y = torch.randint(0, 10, (b,), device=dev)
    out = []

    def forward(m):
        net = wrap(m)

        def call():
            with torch.inference_mode(), bf16(dev):
                net(x)
        return call

    fns = [forward(ours)] + ([forward(ref)] if ref is not None else [])
    r = rates(fns, b, dev, size["seconds"], ctx.deadline)
    out.append(("forward", r[0], r[1] if ref is not None else None, vit_flops(ours)))
    torch.manual_seed(0)
    vp = vpt.VPT(ours, num_classes=10, num_prompts=PROMPTS).to(dev)
    randomize_zeros(vp)
    models = [vp] + ([TimmVPT(ref, vp).to(dev)] if ref is not None else [])

    def step(m):
        net, opt = wrap(m.train()), torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)

        def call():
            with bf16(dev):
                loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return call

    r = rates([step(m) for m in models], b, dev, size["seconds"], ctx.deadline)
    out.append(("VPT-deep train step", r[0], r[1] if ref is not None else None, 2 * vit_flops(ours, PROMPTS)))
    return out


def check_speed(ctx):
    dev, size = ctx.device, ctx.size
    peak, peak_how = peak_flops(dev)
    figures = ctx.report.checks["speed"]["figures"]
    figures["peak_flops"], figures["peak"] = peak, peak_how
    if timm_vit():  # the two timed models compute the same thing: their logits, fp32, TF32 off
        ours, ref = copy.deepcopy(ctx.backbone()).to(dev), to_timm(ctx.backbone()).to(dev)
        x = torch.randn(2, 3, ours.img_size, ours.img_size, device=dev)
        with torch.no_grad(), tf32_off():
            d_vit = (ours(x) - ref(x)).abs().max().item()
            vp = vpt.VPT(copy.deepcopy(ours), num_classes=10, num_prompts=PROMPTS).eval()
            randomize_zeros(vp)
            d_vpt = (vp.to(dev)(x) - TimmVPT(ref, vp).to(dev).eval()(x)).abs().max().item()
        ctx.row("same function as timm", max(d_vit, d_vpt) <= FP32_TOL, f"ViT max Δ {d_vit:.1e}, VPT-deep max Δ "
                f"{d_vpt:.1e}", "fp32, TF32 off: the timed models compute the same logits")
    else:
        ctx.skip_row("same function as timm", "timm is not installed (pip install timm)")
    best = {}
    for compiled in (False, True):
        mode = f"torch.compile ({size['compile_backend']})" if compiled else "eager"
        if ctx.out_of_time(mode):
            continue
        if compiled:  # in a child process: a slow or crashing compile is killed at the share, not the whole run
            got = worker(ctx, "speed")
            if got is None:
                continue
            measured = [tuple(r) for r in got]
        else:
            measured = speed_rows(ctx, compiled=False)
        for what, o, t, flops in measured:
            key = f"{'train' if 'train' in what else 'forward'}_{'compiled' if compiled else 'eager'}"
            figures[key] = dict(ours=o, timm=t, flops_per_image=flops)
            best[key.split("_")[0]] = max(best.get(key.split("_")[0], 0), o)
            share = f"{100 * o * flops / peak:.0f}% of peak"
            fig = f"ours {o:,.0f} img/s" + (f", timm {t:,.0f} (ours/timm {o / t:.2f})" if t else "") + f"; {share}"
            detail = f"batch {size['speed_batch']}, {'bf16 autocast' if ctx.cuda else 'fp32'}"
            if t:
                ctx.row(f"{what}, {mode}", o / t >= SPEED_RATIO, fig, detail, cuda_only=True)
            else:
                ctx.report.row("speed", f"{what}, {mode}", "skipped", fig, detail + "; timm is not installed: no ratio")
    ctx.rates.update(best)
    figures["model_rates"] = best
    return (f"{ctx.arch} batch {size['speed_batch']}: " + ", ".join(f"{k} {v:,.0f} img/s" for k, v in best.items()),
            f"peak {peak_how}; FLOPs counted as a standard ViT's (train step: 2x forward, frozen weights); "
            f"fail if ours/timm < {SPEED_RATIO}")


def worker(ctx, what):
    """Run `what` in a child process (this file, --worker), within the check's share; its result, or None with a
    failed row saying why."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", what, "--out", str(ctx.report.out),
           "--device", str(ctx.device), "--budget-s", str(max(5, ctx.left()))] + ["--tiny"] * ctx.args.tiny
    code, secs, log = launch(ctx, f"{ctx.check}-{what}-worker", cmd, ctx.left())
    lines = [line for line in log.read_text().splitlines() if line.startswith("RESULT ")]
    if code == 0 and lines:
        return json.loads(lines[-1][len("RESULT "):])
    ctx.row(f"{what} in a child process", False, ended(ctx, code, secs), f"{last_error(log)}; log: {log.name}")
    return None


def ended(ctx, code, secs):
    """How a child process that did not succeed ended."""
    if code is None:
        return (f"timed out after {secs:.0f}s, its share of --budget-s {ctx.args.budget_s:.0f}: rerun with --only "
                f"{ctx.check} and a larger --budget-s to tell slow from stuck")
    return f"exit {code} after {secs:.0f}s"

# -----------------------------------------------------------------------------
# 4. the data path


def write_jpegs(root, classes, per_class, size, seed=0):
    """An imagefolder of smooth noisy JPEGs (camera-like to a decoder): train/<class>/ and test/<class>/, 4:1."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        for i in range(per_class):
            split = "test" if i % 5 == 4 else "train"
            small = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
            noisy = np.asarray(small, dtype=np.int16) + rng.integers(-12, 13, (size[1], size[0], 3))
            path = root / split / f"c{c}" / f"{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(path, quality=90)
    return root


def read_rgb(path):
    """torchvision.io's decode (libjpeg-turbo) to uint8 (3, H, W) RGB; a module function, so workers can pickle it."""
    from torchvision.io import ImageReadMode, decode_image, read_file
    return decode_image(read_file(path), mode=ImageReadMode.RGB)


def check_data(ctx):
    dev, size = ctx.device, ctx.size
    side = ctx.backbone().img_size
    root = write_jpegs(ctx.work / "jpegs", size["classes"], size["per_class"], size["jpeg"])
    n = size["classes"] * size["per_class"]
    figures = ctx.report.checks["data"]["figures"]
    workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    # the kept path: data.load_task decodes every split once (data.decode: torchvision.io for 8-bit JPEGs, threads)
    t = time.time()
    [task] = data.load_task("imagefolder", root, shots=None, seed=0, img_size=side)
    decode = n / (time.time() - t)
    figures["load_task"] = decode
    ctx.row("data.load_task decode", len(task.train) + len(task.val) + len(task.test) == n,
            f"{decode:,.0f} img/s", f"{n} JPEGs {size['jpeg'][0]}x{size['jpeg'][1]} -> {side} px, torchvision.io "
            f"decode in {min(8, 2 * (os.cpu_count() or 1))} threads, once per split")
    # then every training batch: fewshot.batches (index, copy to the device, crop + flip, normalise)
    g, seen, t = torch.Generator().manual_seed(0), 0, time.time()
    while seen < 4 * len(task.train) or time.time() - t < size["seconds"]:
        for xb, _ in fewshot.batches(task.train, task, dev, 64, train=True, generator=g):
            seen += len(xb)
    sync(dev)
    feed = seen / (time.time() - t)
    figures["batches"] = feed
    ctx.row("fewshot.batches from memory", True, f"{feed:,.0f} img/s", f"to {dev.type}, batch 64, crop + flip")
    # streaming, as every peer feeds a GPU: torchvision ImageFolder + DataLoader workers, pinned, non-blocking
    from torchvision import datasets
    from torchvision.transforms import v2
    ds = datasets.ImageFolder(root / "train", loader=read_rgb,
                              transform=v2.Compose([v2.Resize(round(side * 256 / 224), antialias=True),
                                                    v2.CenterCrop(side)]))
    batch = size["loader_batch"]
    ds.samples *= math.ceil(4 * workers * batch / len(ds))  # 4 batches per worker and epoch; decoding a file again
    # costs what the first time did (it is in the page cache either way, as a dataset read from a fast disk would be)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, pin_memory=ctx.cuda,
                                         persistent_workers=True)
    epochs, seen, t = 0, 0, None
    while epochs < 2 or time.time() - t < size["seconds"]:
        for xb, _ in loader:
            xb = data.normalize(xb.to(dev, non_blocking=True), *data.NORMS["imagenet"])
            seen += len(xb) if t else 0
        epochs += 1
        if t is None:  # the first epoch starts the workers: time the later ones
            sync(dev)
            t = time.time()
    sync(dev)
    stream = seen / (time.time() - t)
    figures["dataloader"], figures["workers"] = stream, workers
    del loader
    ctx.row(f"DataLoader, {workers} workers", True, f"{stream:,.0f} img/s",
            f"batch {batch}{', pinned' * ctx.cuda}: torchvision ImageFolder, torchvision.io decode, transforms.v2 "
            "resize + centre crop, normalised on the device: the reference a DataLoader path in data.py should "
            "match, or beat")
    # against the model
    model = ctx.rates.get("train") or prior(ctx, "speed", "model_rates", {}).get("train")
    if not model:
        return (f"decode {decode:,.0f}, stream {stream:,.0f} img/s ({workers} workers); model rate unknown",
                "run the speed check for the model's images/s")
    figures["model_train"] = model
    need = math.ceil(workers * model / stream)
    stream_says = (f"loader-bound: {workers} workers give {stream:,.0f} img/s, the model takes {model:,.0f}; about "
                   f"{need} workers would keep up" if stream < model else
                   f"not the bottleneck: {stream / model:.1f}x the model's {model:,.0f} img/s")
    return (f"stream {stream:,.0f} img/s vs model {model:,.0f} img/s (VPT-deep step, fastest mode): "
            f"{'LOADER-BOUND' if stream < model else 'model-bound'}",
            f"streaming: {stream_says}. Few-shot decodes once ({decode:,.0f} img/s) and then feeds "
            f"{feed:,.0f} img/s from memory: {'loader' if feed < model else 'model'}-bound")


def prior(ctx, check, key, default):
    """A figure of `check` from an earlier run in the same --out (kept by --only)."""
    return ctx.report.checks.get(check, {}).get("figures", {}).get(key, default)

# -----------------------------------------------------------------------------
# 5 and 6: child processes (torchrun, the CLI), each with a log and a timeout


def env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}


def launch(ctx, name, cmd, timeout):
    """(exit code, or None when killed at `timeout`; seconds; log path): `cmd` in ROOT, in its own process group
    (torchrun's workers too), its output in <out>/logs/<name>.log."""
    log = ctx.report.out / "logs" / f"{name}.log"
    log.parent.mkdir(exist_ok=True)
    say(f"{ctx.check} · {name}: {' '.join(map(str, cmd))} (timeout {timeout:.0f}s)")
    t = time.time()
    with open(log, "w") as f:
        f.write(" ".join(map(str, cmd)) + "\n")
        f.flush()
        proc = subprocess.Popen(list(map(str, cmd)), cwd=ROOT, env=env(), stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            code = proc.wait(timeout=max(1, timeout))
        except (subprocess.TimeoutExpired, KeyboardInterrupt) as e:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if isinstance(e, KeyboardInterrupt):
                raise
            code = None
    return code, time.time() - t, log


def last_error(log):
    """The child's last line that names an error, else its last line (the log's first line is the command)."""
    lines = [line.strip() for line in log.read_text().splitlines()[1:] if line.strip()]
    hits = [line for line in lines if "error" in line.lower() or "Error" in line]
    return (hits or lines or ["no output"])[-1][:300]


def results(out):
    path = Path(out) / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run_row(ctx, name, log, cmd, verify, share=1.0, note="", cuda_only=False):
    """Run `cmd` (log: <out>/logs/<check>-<log>.log) within `share` of the check's time left; a row that passes
    when it exits 0 and verify(its output) gives (ok, figure). Returns its seconds, or None."""
    if ctx.out_of_time(name):
        return None
    code, secs, path = launch(ctx, f"{ctx.check}-{log}", cmd, ctx.left() * share)
    ctx.report.checks[ctx.check]["figures"][log + "_s"] = round(secs, 1)
    if code != 0:
        ctx.row(name, False, ended(ctx, code, secs), f"{last_error(path)}; log: {path.name}{note}")
        return None
    ok, figure = verify(path.read_text())
    ctx.row(name, ok, f"{secs:.1f}s; {figure}", f"log: {path.name}{note}", cuda_only=cuda_only)
    return secs


def check_torchrun(ctx):
    gpus = torch.cuda.device_count() if ctx.cuda else 0
    procs = 2 if gpus >= 2 or not (ctx.cuda or ctx.args.tiny) else 1  # --tiny: 1 (tests/test_fewshot.py runs 2)
    backend = "nccl" if ctx.cuda else "gloo"
    dev = "cuda" if ctx.cuda else str(ctx.device)
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
    common = ["--weights", ctx.backbone_file(), "--arch", ctx.arch, "--device", dev] + ["--amp"] * ctx.cuda
    sweep, methods, seeds = ctx.work / "torchrun_sweep", ctx.size["methods"], ctx.size["seeds"]

    def sweep_ok(text):
        got = results(sweep)
        keys = {r["key"] for r in got}
        ok = len(got) == len(keys) == len(methods) * len(seeds) and all(r["status"] == "ok" for r in got)
        return ok and text.count("saved: ") == 1, f"{len(keys)} runs over {procs} ranks, each once; rank 0 wrote the " \
                                                  "table"

    t1 = run_row(ctx, f"fewshot.py sweep, {procs} processes ({backend})", "sweep", run + [
        "fewshot.py", *common, "--pvp-init", ctx.module(), "--data", "synthetic:shape", "--method", ",".join(methods),
        "--shots", "1", "--seeds", ",".join(map(str, seeds)), "--max-steps", ctx.size["max_steps"], "--out", sweep],
        sweep_ok, share=0.5, cuda_only=True)
    ckpt = ctx.work / "torchrun_pvp.safetensors"
    t2 = run_row(ctx, f"pvp_pretrain.py, {procs} processes ({backend})", "pretrain", run + [
        "pvp_pretrain.py", *common, "--per-class", "1", "--epochs", "1", "--batch", ctx.size["pretrain_batch"],
        "--out", ckpt], lambda text: (ckpt.exists() and text.count("wrote ") == 1, "one checkpoint, written by rank 0"),
        cuda_only=True)
    if procs < 2:
        ctx.skip_row("2 processes", f"{gpus} GPU visible: NCCL between 2 ranks needs 2 GPUs" if ctx.cuda else
                     "--tiny runs 1 process")
    took = lambda t: "-" if t is None else f"{t:.0f}s"
    return (f"{procs} process{'es' * (procs > 1)} over {backend}: sweep {took(t1)}, pre-training {took(t2)}",
            f"{gpus} GPU visible; python -m torch.distributed.run --standalone")


def check_e2e(ctx):
    dev, size, tiny = str(ctx.device), ctx.size, ctx.args.tiny
    main = ctx.work / "main_job"
    if tiny:  # building the embedded backbone takes minutes on a CPU: a random one and a micro module instead
        cmd = [sys.executable, "fewshot.py", "--method", "pvp", "--shots", "1", "--seeds", "0", "--data",
               "synthetic:shape", "--max-steps", size["max_steps"], "--weights", ctx.backbone_file(), "--arch",
               ctx.arch, "--pvp-init", ctx.module(), "--device", dev, "--out", main]
        how = "tiny: a random backbone (--weights) and a micro module (--pvp-init), not the embedded build"
    else:
        cmd = [sys.executable, "fewshot.py", "--method", "pvp", "--shots", "1", "--device", dev, "--out", main]
        built = [p.name for p in (plumbing.embedded_backbone() if plumbing.SHIPPED_BACKBONE.exists() else
                                  plumbing.CHECKPOINTS / "vit_synthetic.safetensors",
                                  plumbing.CHECKPOINTS / "pvp_vpt_vit_synthetic.safetensors") if not p.exists()]
        how = f"builds {' and '.join(built)} first, inside the time" if built else "embedded pieces already built"

    def main_ok(text):
        got = results(main)
        ok = bool(got) and all(r["status"] == "ok" for r in got)
        mean = sum(r.get("test_top1", 0) for r in got) / max(1, len(got))
        return ok, f"{len(got)} runs ok, mean test top-1 {mean:.2f}%"

    t1 = run_row(ctx, "main job: fewshot.py --method pvp --shots 1", "main_job", cmd, main_ok, share=0.7,
                 note=f"; {how}")
    # a real layout: an imagefolder of small JPEGs and a random ViT saved as a timm checkpoint (.pth, timm names)
    root = write_jpegs(ctx.work / "layout", 3, 10, (40, 50), seed=1)
    ckpt = ctx.work / "timm_vit.pth"
    torch.save((to_timm(ctx.backbone()) if timm_vit() else ctx.backbone()).state_dict(), ckpt)
    real = ctx.work / "real_layout"
    methods = ["linear", "vpt", "pvp"]

    def real_ok(text):
        got = results(real)
        ok = len(got) == len(methods) and all(r["status"] == "ok" and r["num_classes"] == 3 for r in got)
        return ok, f"{len(got)} runs ok ({', '.join(methods)}), 3 classes read from the folders"

    t2 = run_row(ctx, "real layout: imagefolder + timm checkpoint", "real_layout", [
        sys.executable, "fewshot.py", "--weights", ckpt, "--arch", ctx.arch, "--pvp-init", ctx.module(), "--data",
        "imagefolder", "--data-root", root, "--method", ",".join(methods), "--shots", "1", "--seeds", "0",
        "--max-steps", size["max_steps"], "--device", dev, "--out", real] + ["--amp"] * ctx.cuda, real_ok)
    took = lambda t: "-" if t is None else f"{t:.0f}s"
    return f"main job {took(t1)}, real layout {took(t2)}, on {dev}", how

# -----------------------------------------------------------------------------
# the run: budget, order, failures caught one by one


FUNCTIONS = dict(parity=check_parity, train=check_train, speed=check_speed, data=check_data, torchrun=check_torchrun,
                 e2e=check_e2e)


def run_check(ctx, name, todo):
    """Run check `name` within its share of the budget left; any exception becomes a failed check."""
    rep, args = ctx.report, ctx.args
    left = args.budget_s - (time.time() - T0)
    share = left * SHARE[name] / sum(SHARE[k] for k in todo)
    need = 1 if args.tiny else LEAST[name]
    entry = rep.begin(name)
    ctx.check, ctx.deadline, t = name, time.time() + share, time.time()
    say(f"== {name} (share {share:.0f}s of {left:.0f}s left)")
    try:
        if args.inject_fail == name:
            raise RuntimeError(f"injected failure (--inject-fail {name})")
        if left < need:
            raise Skip(f"budget: {left:.0f}s left of {args.budget_s:.0f}s, this check needs about {need}s")
        figure, detail = FUNCTIONS[name](ctx)
        entry.update(status=verdict(entry["rows"]) if entry["rows"] else "pass", figure=figure, detail=detail)
        if entry["status"] == "skipped":
            why = sorted({r["detail"].split(";")[0] for r in entry["rows"] if r["status"] == "skipped"})
            entry["detail"] = f"skipped: {', '.join(why)}; {detail}"
    except Skip as e:
        entry.update(status="skipped", detail=str(e))
    except Exception as e:  # noqa: BLE001 -- a failing check is recorded, and the next one runs
        entry.update(status="fail", detail=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:400],
                     traceback=traceback.format_exc())
        print(traceback.format_exc(), file=sys.stderr, flush=True)
    finally:
        if ctx.cuda:
            torch.cuda.empty_cache()
        entry["seconds"] = round(time.time() - t, 1)
        rep.write()
    say(f"== {name}: {entry['status'].upper()} in {entry['seconds']:.1f}s  {entry['figure']}")


def version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def interrupted(signum, frame):
    raise KeyboardInterrupt


def meta(args, device):
    cuda = device.type == "cuda"
    try:
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        git = None
    return dict(started=now(), mode="tiny" if args.tiny else "full", device=str(device),
                device_name=torch.cuda.get_device_name(device) if cuda else "cpu",
                gpus=torch.cuda.device_count() if torch.cuda.is_available() else 0, torch=torch.__version__,
                cuda=torch.version.cuda, timm=version("timm"), cpus=os.cpu_count(), git=git,
                budget_s=args.budget_s, argv=sys.argv[1:], wall_s=0.0)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for gpu_check.json, gpu_check.md and logs/")
    ap.add_argument("--budget-s", type=float, default=420, help="wall-clock seconds for all checks (default: 420)")
    ap.add_argument("--tiny", action="store_true", help="micro sizes (vit_synthetic, batch 4, 2 steps); device cpu")
    ap.add_argument("--device", default=None, help="a torch device (default: cuda if present, cpu with --tiny)")
    ap.add_argument("--only", default=None, help=f"comma list of checks to (re)run, of {', '.join(CHECKS)}; the "
                    "others' results in --out are kept")
    ap.add_argument("--inject-fail", default=None, choices=CHECKS, help="make this check raise (tests the reporting)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # a child process of the speed check
    args = ap.parse_args(argv)
    args.device = args.device or ("cpu" if args.tiny else "auto")
    only = args.only.split(",") if args.only else list(CHECKS)
    if unknown := [c for c in only if c not in CHECKS]:
        ap.error(f"--only: unknown check {', '.join(unknown)}; choose from {', '.join(CHECKS)}")
    args.only = [c for c in CHECKS if c in only]
    return args


def main(argv=None):
    args = parse(argv)
    sys.stdout.reconfigure(line_buffering=True)  # the project's own prints too, in order with ours, even into a pipe
    device = plumbing.pick_device(args.device)
    if args.worker:  # the compiled half of `speed`, in a process of its own; prints one RESULT line
        with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
            ctx = Context(args, Report(Path(work) / "report", meta(args, device)), work)
            ctx.check, ctx.deadline = "speed", time.time() + args.budget_s
            print("RESULT " + json.dumps(speed_rows(ctx, compiled=True)), flush=True)
        return 0
    signal.signal(signal.SIGTERM, interrupted)  # a kill: save what was measured, then exit
    faulthandler.dump_traceback_later(args.budget_s + 300, exit=False)  # a hang past the budget shows where it is
    out = Path(args.out)
    keep = {}
    if args.only != list(CHECKS) and (out / "gpu_check.json").exists():  # --only: the other checks' results stay
        try:
            keep = json.loads((out / "gpu_check.json").read_text()).get("checks", {})
        except (json.JSONDecodeError, AttributeError):
            print(f"warning: {out / 'gpu_check.json'} does not read as this script's results: starting afresh",
                  file=sys.stderr)
    report = Report(out, meta(args, device), keep)
    say(f"nanoPETL GPU check: {', '.join(args.only)} on {report.meta['device_name']} ({device}), "
        f"{report.meta['mode']} sizes, budget {args.budget_s:.0f}s -> {out}")
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        ctx = Context(args, report, work)
        try:
            for i, name in enumerate(args.only):
                run_check(ctx, name, args.only[i:])
        except KeyboardInterrupt:
            entry = report.checks.get(ctx.check, {})
            if entry.get("status") == "running":
                entry.update(status="fail", detail=f"interrupted after {time.time() - T0:.0f}s; its rows so far are "
                                                   "kept")
            report.write()
            print(f"interrupted: what was measured is in {out / 'gpu_check.json'}", file=sys.stderr)
            return 130
    faulthandler.cancel_dump_traceback_later()
    report.write()
    print("\n" + report.table() + f"\n\nwall {report.meta['wall_s']:.0f}s of a {args.budget_s:.0f}s budget; saved: "
          f"{out / 'gpu_check.json'}, {out / 'gpu_check.md'}", flush=True)
    failed = [k for k in args.only if report.checks[k]["status"] == "fail"]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

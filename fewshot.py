"""
Few-shot evaluation of PETuning methods: methods x datasets x shots x seeds, one results line per run.

    python fewshot.py --method pvp --shots 1                # the main job: offline, on the embedded world
    python fewshot.py --method all --plot                   # every method, shots 1..16, seeds 0..2, and the figure
    python fewshot.py --weights vit_b16_in21k --data noah-fewshot --data-root data/oxford-flowers102 --method vpt
    python fewshot.py --weights vit_b16_in21k --data vtab1k --data-root data/vtab-1k --vtab-task dtd --shots all \
        --grid --optimizer sgd --lr-scale --method vpt          # VPT's protocol: lr x wd on train800 -> val200
    python fewshot.py --method vpt,lora --opt dropout=0.0   # a method's own constructor options, by name
    torchrun --nproc_per_node=8 fewshot.py ...              # a sweep over 8 GPUs: each rank takes every 8th run
    python fewshot.py --shard 0/4 ...                       # job 0 of 4 sharing only --out (a SLURM array task)
With no --weights the embedded backbone is used, and `pvp` with no --pvp-init the embedded PVP prompts, which are
pre-trained first (by running pvp_pretrain.py) when missing and cached under checkpoints/.

Protocol (printed at start and saved in every line): NOAH's few-shot recipe (ZhangYuanhan-AI/NOAH,
configs/*/few-shot/*.sh) -- AdamW, lr 5e-3 with no batch scaling, wd 1e-4, batch 64, 100 epochs, 10 warmup then
cosine -- without its RandAugment, mixup and cutmix; the crop + flip of the data's protocol instead. The embedded
world caps training at --max-steps (see EMBEDDED) so a sweep fits a CPU. One recipe for every method, except `full`
(lr x 0.1: full fine-tuning at a prompt's lr wrecks the backbone; VPT's paper also tunes it separately) and
`linear`, whose frozen backbone runs once: its head trains on the features of the centre-cropped support set (no
crop + flip), as linear probes do. Runs report the last step: test is never used to select anything; val is
measured and saved for choosing hyper-parameters. Evaluation runs in bf16 autocast on CUDA (--amp adds it to
training).

A method is a class in the METHODS registry; its keyword-only constructor options are its options (--opt
NAME=VALUE, and --prompts, --kv-prompts, --rank for the built-in ones). `pvp` builds the module type its checkpoint
records, with that checkpoint's options, and follows that type's recipe (an E2VPT module is pruned and rewound).
Output in --out: results.jsonl (one line per run, appended and flushed as it finishes), summary.md, and with --plot
accuracy_vs_shots.png. A line's key covers everything that makes its numbers (see run_identity): a re-run of the
same command skips what is done, and a changed dataset, backbone file, module checkpoint or option runs anew. The
table shows exactly this command's runs. This file also holds the one training loop and the module checkpoint
format that pvp_pretrain.py imports.
"""
import argparse
import ast
import copy
import dataclasses
import datetime
import errno
import fcntl
import functools
import hashlib
import inspect
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, safe_open, save_file
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import e2vpt
import lora
import vit as vitlib
import vpt

HERE = Path(__file__).resolve().parent
CHECKPOINTS = HERE / "checkpoints"  # built pieces, git-ignored
SHIPPED_BACKBONE = HERE / "assets" / "vit_synthetic.safetensors"  # the embedded backbone, in the repository

# -----------------------------------------------------------------------------
# the protocol: every knob a flag, printed and saved


@dataclass
class Config:
    method: str = field(default="pvp", metadata={"help": "a name, a comma list, or 'all' (see METHODS)"})
    shots: str = field(default="1,2,4,8,16", metadata={"help": "comma list of K per class, or 'all' (whole train split)"})
    seeds: str = field(default="0,1,2", metadata={"help": "comma list of seeds: support set and initialisation"})
    data: str = field(default="synthetic", metadata={"help": f"one of {', '.join(data.DATASETS)}; synthetic:<task> for one"})
    data_root: str = field(default=None, metadata={"help": "where the dataset lies on disk"})
    download: bool = field(default=False, metadata={"help": "let torchvision download flowers102/pets/aircraft/food101"})
    vtab_task: str = field(default=None, metadata={"help": "the VTAB-1k task folder (with --data vtab1k)"})
    weights: str = field(default=None, metadata={"help": "a vit.PRETRAINED name or a checkpoint path; none = embedded"})
    arch: str = field(default="vit_base_patch16", metadata={"help": f"preset for --weights: {', '.join(vitlib.PRESETS)}"})
    pvp_init: str = field(default=None, metadata={"help": "module checkpoint for `pvp` (none = the embedded one)"})
    opt: list = field(default=None, metadata={"help": "NAME=VALUE, a method's constructor option (repeat the flag for "
                                                      "more); each goes to the methods that take it"})
    optimizer: str = field(default="adamw", metadata={"help": "adamw (NOAH) or sgd (VPT: momentum 0.9)"})
    lr: float = field(default=5e-3, metadata={"help": "base learning rate"})
    grid: bool = field(default=False, metadata={"help": "choose lr x wd on val first (vtab1k: train800 -> val200), "
                                                        "then run the choice on every seed"})
    grid_lr: str = field(default="50,25,10,5,2.5,1,0.5,0.25,0.1,0.05",
                         metadata={"help": "--grid's learning rates (VPT's, for --optimizer sgd --lr-scale)"})
    grid_wd: str = field(default="0.01,0.001,0.0001,0", metadata={"help": "--grid's weight decays (VPT's)"})
    lr_scale: bool = field(default=False, metadata={"help": "multiply lr by batch/256 (VPT's rule)"})
    wd: float = field(default=1e-4, metadata={"help": "weight decay (none on biases and norms)"})
    epochs: int = field(default=100, metadata={"help": "passes over the support set"})
    max_steps: int = field(default=None, metadata={"help": "cap on optimiser steps (embedded default: EMBEDDED)"})
    warmup: float = field(default=0.1, metadata={"help": "fraction of steps of linear warmup before the cosine"})
    batch: int = field(default=64, metadata={"help": "batch size (at most the support-set size)"})
    norm: str = field(default=None, metadata={"help": "imagenet or inception (0.5/0.5); default per data"})
    aug: str = field(default=None, metadata={"help": "none, crop_flip, or randaug (RandomResizedCrop 0.08-1, flip, "
                                                     "RandAugment 2 ops at 9, random erasing); default per data"})
    img_size: int = field(default=None, metadata={"help": "input side; default: the backbone's"})
    head_init: str = field(default="zero", metadata={"help": "zero; prototype: the support set's normalised class "
                                                            "means; trunc_normal (std 0.02, NOAH); kaiming (VPT)"})
    recipe: str = field(default="nanopetl", metadata={"help": "a paper's whole protocol: nanopetl, noah, vpt, e2vpt "
                                                              "(RECIPES); explicit flags override it"})
    schedule: str = field(default="step", metadata={"help": "step (warmup then cosine per step), epoch (VPT: per "
                                                            "epoch, epoch 0 at lr 0), timm (NOAH: timm's cosine)"})
    warmup_lr: float = field(default=None, metadata={"help": "lr at the first warmup step (timm's warmup-lr; default: "
                                                             "the ramp (t+1)/warmup)"})
    min_lr: float = field(default=0.0, metadata={"help": "lr floor of the cosine"})
    label_smoothing: float = field(default=0.0, metadata={"help": "label smoothing of the cross-entropy"})
    mixup: float = field(default=0.0, metadata={"help": "MixUp alpha (0: off); with --cutmix, one of the two per batch"})
    cutmix: float = field(default=0.0, metadata={"help": "CutMix alpha (0: off)"})
    reprob: float = field(default=0.0, metadata={"help": "random-erasing probability per image (with --aug randaug)"})
    drop_path: float = field(default=0.0, metadata={"help": "stochastic depth in the frozen backbone while training "
                                                            "(timm's rule: 0 at block 0 up to this at the last)"})
    drop_last: bool = field(default=False, metadata={"help": "drop each epoch's last incomplete batch"})
    prune: str = field(default="nanopetl", metadata={"help": "E2VPT pruning: nanopetl (|grad| scores, the fractions "
                                                             "below, rewind to the start), official (signed scores, "
                                                             "fractions chosen on val over --prune-grid, fresh "
                                                             "rewind), none"})
    prune_grid: str = field(default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9",
                            metadata={"help": "--prune official's fractions, tried for tokens x segments"})
    prompts: int = field(default=None, metadata={"help": "prompt tokens per layer, num_prompts (vpt, e2vpt; default 10; "
                                                         "NOAH: 100)"})
    kv_prompts: int = field(default=None, metadata={"help": "E2VPT key-value prompts per layer, num_kv_prompts (default 5)"})
    prune_tokens: float = field(default=0.5, metadata={"help": "E2VPT: fraction of visual prompt tokens pruned"})
    prune_segments: float = field(default=0.25, metadata={"help": "E2VPT: fraction of each token's segments pruned"})
    rank: int = field(default=None, metadata={"help": "LoRA rank (default 8; alpha = rank unless --opt alpha=...)"})
    device: str = field(default="auto", metadata={"help": "auto (cuda -> mps -> cpu), or cpu, cuda, cuda:<n>, mps"})
    amp: bool = field(default=False, metadata={"help": "bf16 autocast in training too (CUDA only; eval always uses it)"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model for training and evaluation"})
    # --- issue 13: data path
    workers: int = field(default=None, metadata={"help": "loader processes per training process for splits streamed "
                                                         "from disk (default: its CPUs - 1, at most 8)"})
    cache_gb: float = field(default=None, metadata={"help": "GB of decoded images kept in memory, smallest split first; "
                                                           "the rest stream from disk (default: NANOPETL_MAX_GB, 8)"})
    shard: str = field(default=None, metadata={"help": "i/n: run only the planned runs whose index %% n == i, for n "
                                                      "independent jobs on one --out (no locks); any writes the table"})
    out: str = field(default="runs/fewshot", metadata={"help": "output folder"})
    plot: bool = field(default=False, metadata={"help": "write accuracy_vs_shots.png"})


# The embedded world's departures from NOAH. Chosen on its val pools (seed 0, shots 1 and 16, linear/vpt/lora):
# lr 5e-3 beat 1e-3 and 2e-2, and 100 steps beat 50 and tied 200 (README, "How the embedded defaults were chosen").
EMBEDDED = dict(max_steps=100, norm="inception")
# what trains a run: in every line's protocol and key (img_size, norm and aug are added as resolved per task)
PROTOCOL = ("optimizer", "lr", "lr_scale", "wd", "epochs", "max_steps", "warmup", "batch", "head_init", "amp", "grid",
            "grid_lr", "grid_wd", "schedule", "warmup_lr", "min_lr", "label_smoothing", "mixup", "cutmix", "reprob",
            "drop_path", "drop_last", "prune", "prune_tokens", "prune_segments", "prune_grid")
PRUNING = ("prune", "prune_tokens", "prune_segments", "prune_grid")  # in the key only of methods that prune

# The papers' protocols. Each value: (value, where the official code sets it). `options` are methods' constructor
# options. Explicit flags override; whatever is not named keeps Config's default (nanopetl's).
NOAH = "ZhangYuanhan-AI/NOAH "  # few-shot: configs/{VPT,LoRA}/few-shot/slurm_train_*_few-shot.sh -> supernet_train_prompt.py
VPT = "KMnP/vpt "
E2VPT = "ChengHan111/E2VPT "
VPT_SOLVER = {  # KMnP/vpt's training, which ChengHan111/E2VPT (a fork) keeps
    "optimizer": ("sgd", VPT + "configs/base-prompt.yaml:14 (momentum 0.9, src/configs/config.py:91)"),
    "lr_scale": (True, VPT + "tune_fgvc.py:31 (lr / 256 * batch)"),
    "grid": (True, VPT + "tune_fgvc.py:72-90 (lr x wd, chosen on val)"),
    "wd": (1e-4, VPT + "configs/base-prompt.yaml:16"),
    "batch": (128, VPT + "configs/base-prompt.yaml:25"),
    "epochs": (100, VPT + "configs/base-prompt.yaml:19"),
    "warmup": (0.1, VPT + "configs/base-prompt.yaml:18 (10 of 100 epochs)"),
    "schedule": ("epoch", VPT + "src/engine/trainer.py:221 (scheduler.step() per epoch), "
                                "src/solver/lr_scheduler.py:56-64 (epoch 0 at lr 0)"),
    "head_init": ("kaiming", VPT + "src/models/mlp.py:53-57, src/models/vit_models.py:164 (Kaiming-normal "
                                   "fan_out, bias -log(99))")}
RECIPES = {
    "nanopetl": {},  # Config's defaults: NOAH's optimiser and schedule without its augmentation (module docstring)
    "noah": {
        "optimizer": ("adamw", NOAH + "supernet_train_prompt.py:74 (--opt adamw)"),
        "lr": (5e-3, NOAH + "configs/VPT/few-shot/slurm_train_vpt_few-shot.sh:22 (LR in 0.005)"),
        "wd": (1e-4, NOAH + "configs/VPT/few-shot/slurm_train_vpt_few-shot.sh:12 (WEIGHT_DECAY=0.0001)"),
        "batch": (64, NOAH + "configs/VPT/few-shot/slurm_train_vpt_few-shot.sh:39 (--batch-size=64)"),
        "epochs": (100, NOAH + "configs/VPT/few-shot/slurm_train_vpt_few-shot.sh:39 (--epochs=100)"),
        "warmup": (0.1, NOAH + "supernet_train_prompt.py:107 (--warmup-epochs 10, of 100)"),
        "schedule": ("timm", NOAH + "supernet_train_prompt.py:88,367 (--sched cosine, timm's create_scheduler)"),
        "warmup_lr": (1e-6, NOAH + "supernet_train_prompt.py:98 (--warmup-lr)"),
        "min_lr": (1e-5, NOAH + "supernet_train_prompt.py:100 (--min-lr)"),
        "label_smoothing": (0.1, NOAH + "supernet_train_prompt.py:122 (--smoothing)"),
        "mixup": (0.8, NOAH + "supernet_train_prompt.py:143,294 (--mixup, timm Mixup, switch prob 0.5 at :151)"),
        "cutmix": (1.0, NOAH + "supernet_train_prompt.py:145 (--cutmix)"),
        "aug": ("randaug", NOAH + "lib/datasets.py:214 (timm create_transform, --aa rand-m9-mstd0.5-inc1 at "
                                  "supernet_train_prompt.py:119, RandomResizedCrop scale 0.08-1, flip)"),
        "reprob": (0.25, NOAH + "supernet_train_prompt.py:133 (--reprob)"),
        "drop_path": (0.1, NOAH + "supernet_train_prompt.py:59,305 (--drop-path; the model trains in train mode, "
                                  "supernet_engine_prompt.py:57)"),
        "drop_last": (True, NOAH + "supernet_train_prompt.py:280"),
        "head_init": ("trunc_normal", NOAH + "model/supernet_vision_transformer_timm.py:686 (_init_vit_weights)"),
        "options": ({"vpt": dict(dropout=0.1), "lora": dict(targets=["qkv"], dropout=0.1, alpha=None)},
                    NOAH + "supernet_train_prompt.py:207-208 (prompt and LoRA dropout 0.1); "
                           "model/supernet_vision_transformer_timm.py:224-228,277-281 (one A, one B over the fused "
                           "qkv, no scaling)")},
    "vpt": {**VPT_SOLVER,
            "options": ({"vpt": dict(dropout=0.0)}, VPT + "src/configs/config.py:74 (PROMPT.DROPOUT 0.0)")},
    "e2vpt": {**VPT_SOLVER,  # a fork of KMnP/vpt: its solver, E2VPT's batch, prompt settings and pruning
              "batch": (64, E2VPT + "configs/base-prompt.yaml:25"),
              "prune": ("official", E2VPT + "src/configs/config.py:192-202 (mask percents 10-90, at least 1 token "
                                            "and 4 pieces), src/engine/trainer.py:359-470 (signed gradient scores)"),
              "options": ({"e2vpt": dict(dropout=0.0)}, E2VPT + "src/configs/config.py:185 (P_VK.DROPOUT 0.0)")},
}


def parser(given_only=False):
    """The command line of Config. given_only: flags not on the command line are left out (no defaults)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 **({"argument_default": argparse.SUPPRESS} if given_only else {}))
    for f in dataclasses.fields(Config):
        flag, default = "--" + f.name.replace("_", "-"), {} if given_only else {"default": f.default}
        if f.type is bool:
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, help=f.metadata["help"], **default)
        elif f.type is list:
            ap.add_argument(flag, action="append", metavar="NAME=VALUE", help=f.metadata["help"])
        else:
            ap.add_argument(flag, type=f.type, help=f.metadata["help"] + f" (default: {f.default})", **default)
    return ap


def parse(argv=None):
    """Config from the command line: Config's defaults, then the recipe's values, then the flags given."""
    given = vars(parser(given_only=True).parse_args(argv))
    recipe = RECIPES.get(given.get("recipe", Config.recipe), {})  # an unknown name: check() says so
    cfg = Config(**{**vars(parser().parse_args(argv)), **{k: v for k, (v, _) in recipe.items() if k != "options"},
                    **given})
    if cfg.weights is None and cfg.data.startswith("synthetic"):
        cfg = dataclasses.replace(cfg, **{k: v for k, v in EMBEDDED.items() if getattr(cfg, k) is None})
    return cfg


class UsageError(Exception):
    """A flag or file the user can fix; reported as one line, no traceback."""


def need(ok, message):
    if not ok:
        raise UsageError(message)


def fail(message, code=1):
    """Exit with one message on stderr, on a line of its own below any progress bar left open."""
    for bar in list(getattr(tqdm, "_instances", [])):
        bar.close()
    print(message, file=sys.stderr)
    sys.exit(code)


class Diverged(Exception):
    """The loss became NaN or infinite."""

# -----------------------------------------------------------------------------
# the methods: two baselines that are not a paper of their own, and the registry


class LinearProbe(nn.Module):
    """The frozen backbone (in eval mode) and a new linear head on its final-norm CLS token."""
    name, trains_backbone = "linear", False

    def __init__(self, vit, *, num_classes):
        super().__init__()
        self.vit, self.config = vit.requires_grad_(self.trains_backbone), {}
        self.head = nn.Linear(vit.dim, num_classes)
        nn.init.zeros_(self.head.weight), nn.init.zeros_(self.head.bias)

    def train(self, mode=True):
        super().train(mode)
        self.vit.train(mode and self.trains_backbone)
        return self

    def features(self, images):
        return self.vit.features(images)

    def forward(self, images):
        return self.head(self.features(images))

    def module_state_dict(self, head=True):
        mine = self.state_dict() if self.trains_backbone else self.head.state_dict(prefix="head.")
        return {k: v.detach().cpu().clone() for k, v in mine.items() if head or not k.startswith("head.")}

    def load_module_state_dict(self, sd, head=True):
        """Copy `sd` into the tensors module_state_dict names; each must be there with its shape, or ValueError."""
        names = self.module_state_dict(head)
        own = {k: v for k, v in self.state_dict(keep_vars=True).items() if k in names}
        sd = {k: v for k, v in sd.items() if head or not k.startswith("head.")}
        if problems := sorted(set(own) ^ set(sd)) + [k for k in own if k in sd and own[k].shape != sd[k].shape]:
            raise ValueError(f"{self.name} module state dict does not fit: missing, unexpected or reshaped {problems}")
        with torch.no_grad():
            for k, v in sd.items():
                own[k].copy_(v)
        return self

    @classmethod
    def trainable_count(cls, vit, num_classes):
        """The head's (dim+1) * classes, plus every backbone weight when it trains (full)."""
        return (vit.dim + 1) * num_classes + cls.trains_backbone * sum(p.numel() for p in vit.parameters())


class FullFinetune(LinearProbe):
    """Every backbone weight trains, with the new head."""
    name, trains_backbone = "full", True


def pvp(vit, *, num_classes, checkpoint):
    """PVP (Song et al. 2023, arXiv 2304.13639): the module pre-trained by pvp_pretrain.py, on `vit` (the backbone
    it was pre-trained on), with a fresh head of num_classes: the type and options its checkpoint records."""
    meta, tensors = read_module(checkpoint, vit)
    model = METHODS[meta["method"]](vit, num_classes=num_classes, **meta["config"])
    model.load_module_state_dict(tensors, head=False)  # the source head is not reused
    return model


# name -> a class (or function) building the method around a frozen ViT: build(vit, *, num_classes, **options).
# Its keyword-only arguments with defaults are the method's options (--opt NAME=VALUE). A new method: one file,
# `import` it above, and one entry here (two lines in all); it then runs in fewshot.py and pvp_pretrain.py.
METHODS = {
    "linear": LinearProbe,
    "full": FullFinetune,
    "vpt-shallow": functools.partial(vpt.VPT, deep=False),
    "vpt": vpt.VPT,
    "e2vpt": e2vpt.E2VPT,
    "lora": lora.LoRA,
    "pvp": pvp,
}
LR_FACTOR = {"full": 0.1}
FLAGS = {"prompts": ("num_prompts", 10), "kv_prompts": ("num_kv_prompts", 5), "rank": ("rank", 8)}  # flag -> option


def options_of(build):
    """{option: default} of a registry entry: its keyword-only arguments, num_classes aside."""
    return {n: p.default for n, p in inspect.signature(build).parameters.items()
            if p.kind == p.KEYWORD_ONLY and n != "num_classes"}


def given_options(cfg):
    """{option: value} the user set: --opt NAME=VALUE (a Python/JSON literal, a comma list, or a word), and the
    named flags --prompts, --kv-prompts, --rank."""
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
    for flag, (name, _) in FLAGS.items():
        if getattr(cfg, flag) is not None:
            need(out.get(name, getattr(cfg, flag)) == getattr(cfg, flag), f"--{flag.replace('_', '-')} "
                 f"{getattr(cfg, flag)} and --opt {name}={out.get(name)!r} disagree: give one")
            out[name] = getattr(cfg, flag)
    return out


def check_type(method, name, value, default):
    """An option's value of the kind its default is (bool, whole number, finite number, list): one UsageError."""
    kinds = [(bool, lambda v: isinstance(v, bool), "True or False"),
             (int, lambda v: isinstance(v, int) and not isinstance(v, bool), "a whole number"),
             (float, lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
              "a finite number"),
             ((tuple, list), lambda v: isinstance(v, (tuple, list)), "a list, e.g. ('q','v')")]
    for kind, ok, what in kinds:
        if isinstance(default, kind):
            need(ok(value), f"{method}'s option {name} is {what} (its default is {default!r}), got {value!r}")
            return


def method_options(name, cfg):
    """The options method `name` is built with: its defaults, nanoPETL's defaults for the named flags, then what
    the user gave (only those it takes). `pvp`: only the checkpoint, whose module brings its own options."""
    takes = options_of(METHODS[name])
    if name == "pvp":
        return dict(checkpoint=cfg.pvp_init)
    recipe = RECIPES.get(getattr(cfg, "recipe", None), {}).get("options", ({}, ""))[0].get(name, {})  # none in pretraining
    return {**takes, **{o: d for o, d in FLAGS.values() if o in takes}, **recipe,
            **{k: v for k, v in given_options(cfg).items() if k in takes}}


def build(name, vit, num_classes, cfg):
    """The method `name` around `vit` (which it freezes and may wrap in place)."""
    return METHODS[name](vit, num_classes=num_classes, **method_options(name, cfg))

# -----------------------------------------------------------------------------
# module checkpoints (PVP): .safetensors with a JSON header, written atomically


def atomic(write, path):
    """write(tmp) then rename: a kill leaves the old file or the new one, never half of one. The temporary name is
    unique, so two writers never write into one temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:  # name the file being written, not its temporary twin
        raise OSError(e.errno, e.strerror, str(path)) from None
    finally:
        Path(tmp).unlink(missing_ok=True)


def tensors_hash(tensors):
    """A short fingerprint of a dict of tensors by content: each name and its values as float32, in name order (the
    hash module checkpoints and the shipped backbone's header have always recorded)."""
    h = hashlib.sha256()
    for k, v in sorted(tensors.items()):
        h.update(k.encode()), h.update(v.detach().cpu().float().numpy().tobytes())
    return h.hexdigest()[:16]


def weights_hash(model):
    """A backbone's fingerprint by content, head excluded (a module checkpoint records it; so does every run)."""
    return tensors_hash({k: v for k, v in model.state_dict().items() if not k.startswith("head.")})


def save_module(model, path, meta):
    tensors = {k: v.contiguous() for k, v in model.module_state_dict(head=False).items()}
    atomic(lambda p: save_file(tensors, p, metadata={"nanopetl": json.dumps(meta)}), path)


MODULE_HEADER = dict(method=str, config=dict, backbone=str, backbone_hash=str)  # what a module header must hold


def module_header(path):
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
    kinds = [m for m in METHODS if m != "pvp"]
    if not bad and meta["method"] not in kinds:
        bad = [f"method {meta['method']!r} (not one of {', '.join(kinds)})"]
    if not bad and (extra := set(meta["config"]) - set(options_of(METHODS[meta["method"]]))):
        bad = [f"config options {sorted(extra)} that {meta['method']} does not take"]
    if bad:
        raise vitlib.CheckpointError(f"{path}: its nanoPETL header is damaged or from another version: " +
                                     "; ".join(bad) + ". Pre-train it again with python pvp_pretrain.py")
    return meta


def read_module(path, backbone):
    """(meta, tensors) of a module checkpoint, refused unless it was made on this very backbone and is finite."""
    meta = module_header(path)
    try:
        tensors = load_file(path)
    except Exception as e:
        raise vitlib.CheckpointError(f"{path}: not a readable module checkpoint ({vitlib.error_line(e)}); make one "
                                     "with python pvp_pretrain.py") from None
    if meta["backbone_hash"] != weights_hash(backbone):
        raise vitlib.CheckpointError(
            f"{path} was pre-trained on backbone {meta['backbone']} (weights {meta['backbone_hash']}), not on this one "
            f"(weights {weights_hash(backbone)}): pre-train it on this backbone with pvp_pretrain.py --weights")
    vitlib.check_finite(tensors, path)
    return meta, tensors

# -----------------------------------------------------------------------------
# the one training loop (pvp_pretrain.py uses it too), evaluation, and the head initialisation


def batches(split, task, device, batch, *, train, generator=None, rank=0, world=1, skip=0, state=None, drop_last=False,
            reprob=0.0):
    """Normalised image batches on `device`: augmented when training (task.train_aug), centre-cropped otherwise. The
    order (drawn from `generator` when training) is padded with its own head to a multiple of `world` and rank takes
    every world-th index, as torch's DistributedSampler does: the shards are disjoint (but for at most world-1
    repeats), cover the split, and are equally long, so every rank takes as many steps. skip: start at this rank's
    batch `skip`; state: `generator`'s state after it (a resumed epoch); drop_last: no incomplete last batch. A
    data.Stream is read by its loader workers (pinned on CUDA); a split of float features (the linear probe's) is
    batched as it is. Under --aug randaug each image is transformed alone (data.randaug, with reprob)."""
    n = len(split)
    order = torch.randperm(n, generator=generator) if train else torch.arange(n)
    order = torch.cat([order, order[:-n % world]])[rank::world]  # (ceil(n / world),)
    order = order[:len(order) // batch * batch] if drop_last else order
    if state is not None:
        generator.set_state(state)
    if isinstance(split, data.Stream):
        source = split.batches(order, batch, skip, pin=torch.device(device).type == "cuda")
    else:
        source = ((split.images[idx], split.labels[idx]) for idx in (order[i:i + batch] for i in
                                                                     range(skip * batch, len(order), batch)))
    for images, labels in source:
        x = images.to(device, non_blocking=True)
        if x.dtype == torch.uint8:
            how = task.train_aug if train else "none"
            if how == "randaug":  # per image: its random draws come from the global generator, seeded per epoch
                x = data.randaug(x, task.img_size, task.mean, task.std, reprob)
            else:
                x = data.normalize(data.augment(x, how, generator=generator, size=task.img_size), task.mean, task.std)
        yield x, labels.to(device, non_blocking=True)


WAIT_WINDOW = 50  # steps over which the bar's images/s and data wait are measured


class Progress:
    """What the training bar shows beside the loss, over the last WAIT_WINDOW steps: images/s (over all ranks) and
    `wait`, the fraction of the time the loop waited for its next batch; once, a warning when a split read from disk
    kept the loop waiting more than half the time (the loader, not the model, sets the pace)."""

    def __init__(self, split, world, rank):
        self.split, self.world, self.rank, self.warned = split, world, rank, False
        self.start, self.waited, self.images, self.steps = time.perf_counter(), 0.0, 0, 0

    def timed(self, batches):
        """The batches, timing how long each next() took."""
        it = iter(batches)
        while True:
            t0 = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            self.waited += time.perf_counter() - t0
            yield item

    def step(self, images):
        """Count a step of `images` images; the figures to show, over the window so far."""
        self.images, self.steps = self.images + images, self.steps + 1
        seconds = max(time.perf_counter() - self.start, 1e-9)
        wait = self.waited / seconds
        shown = {"img/s": f"{self.images * self.world / seconds:,.0f}", "wait": f"{wait:.0%}"}
        if self.steps == WAIT_WINDOW:  # the window is full: judge it, and start the next
            if wait > 0.5 and isinstance(self.split, data.Stream) and self.rank == 0 and not self.warned:
                self.warned = True
                tqdm.write(f"warning: the loader is the bottleneck: the last {self.steps} steps waited for data "
                           f"{wait:.0%} of the time, with {self.split.workers} loader workers; give it more "
                           "(--workers), or keep the split in memory (--cache-gb) if it fits")
            self.start, self.waited, self.images, self.steps = time.perf_counter(), 0.0, 0, 0
        return shown


GPU_KEPT = {}  # id of a kept split's images -> (that tensor, its copy on the GPU): made once per process


def on_device(split, device, share=0.25):
    """A split kept in memory, copied to the GPU once per process when it takes at most `share` of the free memory
    there (every run of a sweep then evaluates it without a copy); else, or off CUDA, or streamed, as it is."""
    if device.type != "cuda" or not isinstance(split, data.Split) or split.images.device.type == "cuda":
        return split
    key = id(split.images)
    if key not in GPU_KEPT and split.images.nbytes <= share * torch.cuda.mem_get_info(device)[0]:
        GPU_KEPT[key] = split.images, data.Split(split.images.to(device), split.labels.to(device))
    return GPU_KEPT[key][1] if key in GPU_KEPT else split


def autocast(device, amp):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda")


def learning_rate(cfg, base, t, epoch, total, epochs):
    """The lr at step t of `total` (in epoch `epoch` of `epochs`): linear warmup over the first cfg.warmup of the
    schedule, then cosine down to cfg.min_lr. schedule "step" counts steps; "epoch" (VPT, src/solver/lr_scheduler.py)
    counts epochs, so epoch 0 runs at lr 0 and the cosine starts after warmup; "timm" (NOAH: timm's
    CosineLRScheduler) counts epochs and runs the cosine over all of them, the warmup laid over its start.
    warmup_lr None: the ramp starts at base/warmup steps (step) or 0 (epoch); else at warmup_lr."""
    pos, span = (t, total) if cfg.schedule == "step" else (epoch, epochs)
    warm = int(cfg.warmup * span)
    if pos < warm:
        start = cfg.warmup_lr
        return base * (pos + (cfg.schedule == "step")) / warm if start is None else start + (base - start) * pos / warm
    t0 = 0 if cfg.schedule == "timm" else warm
    return cfg.min_lr + (base - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * (pos - t0) / max(1, span - t0)))


def mixer(cfg, num_classes):
    """MixUp and/or CutMix on a batch (soft targets), one of them per batch when both are on (timm's Mixup with
    switch prob 0.5, as NOAH), or None."""
    if not (cfg.mixup or cfg.cutmix):
        return None
    from torchvision.transforms import v2  # here: its import costs over a second, and most runs mix nothing
    mixes = [m(alpha=a, num_classes=num_classes) for m, a in ((v2.MixUp, cfg.mixup), (v2.CutMix, cfg.cutmix)) if a > 0]
    return None if not mixes else mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)


def train(model, split, task, cfg, device, *, seed, lr=None, desc="train", start=None, opt_state=None, on_save=None,
          save_every=0, distributed=False):
    """AdamW or SGD with warmup then cosine (learning_rate); `epochs` passes capped at `max_steps` steps. The loss is
    cross-entropy with cfg.label_smoothing, on MixUp/CutMix soft targets when they are on (images only: the linear
    probe's features are not mixed); cfg.drop_path turns on the frozen backbone's stochastic depth while it trains.
    Each epoch reseeds from (seed, epoch). on_save(position, opt) is called after every epoch and every `save_every`
    steps; the position holds the epoch, the batches done in it, the step, and mid-epoch the order's generator and
    the RNG states, so a run resumed from it (start=position, opt_state) replays exactly, mid-epoch too.
    distributed=True (pvp_pretrain under torchrun): one model over all ranks, DDP averaging the gradients."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed and dist.is_initialized() else (0, 1)
    net = DDP(model) if world > 1 else torch.compile(model) if cfg.compile else model
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in params if p.ndim > 1], weight_decay=cfg.wd),
              dict(params=[p for p in params if p.ndim <= 1], weight_decay=0.0)]  # no decay on biases (VPT)
    lr = (lr or cfg.lr) * (min(cfg.batch, len(split)) / 256 if cfg.lr_scale else 1)
    opt = torch.optim.AdamW(groups, lr=lr) if cfg.optimizer == "adamw" else torch.optim.SGD(groups, lr=lr, momentum=0.9)
    if opt_state:
        opt.load_state_dict(opt_state)
    batch = min(cfg.batch, len(split))
    per_rank = math.ceil(len(split) / world)  # batches() pads the order to a multiple of world
    per_epoch = (per_rank // batch if cfg.drop_last else math.ceil(per_rank / batch)) or 1
    total = min(cfg.epochs * per_epoch, cfg.max_steps or float("inf"))
    epochs, mix = math.ceil(total / per_epoch), mixer(cfg, task.num_classes)
    model.train()
    restore = drop_path_on(model, cfg.drop_path)
    t = start["step"] if start else 0  # the step; not the bar's count, which stays 0 under TQDM_DISABLE=1
    bar = tqdm(total=total, initial=t, desc=desc, leave=False, dynamic_ncols=True)
    progress = Progress(split, world, rank)
    for epoch in range(start["epoch"] if start else 0, epochs):
        torch.manual_seed(seed * 100_003 + epoch)  # dropout draws
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)  # order and augmentation
        done, at = (start["batch"], start) if start and start["epoch"] == epoch and start["batch"] else (0, None)
        if at:  # resumed mid-epoch: the RNG as it was after batch `done`
            set_rng_state(at["rng"], device)
        for x, y in progress.timed(batches(split, task, device, batch, train=True, generator=g, rank=rank, world=world,
                                           skip=done, state=at and at["generator"], drop_last=cfg.drop_last,
                                           reprob=cfg.reprob)):
            if t >= total:
                break
            for group in opt.param_groups:
                group["lr"] = learning_rate(cfg, lr, t, epoch, total, epochs)
            if mix and x.ndim == 4:
                x, y = mix(x, y)  # y: (B, classes) soft targets
            with autocast(device, cfg.amp):
                loss = F.cross_entropy(net(x), y, label_smoothing=cfg.label_smoothing)
            if not torch.isfinite(loss):
                bar.close()
                raise Diverged(f"the loss became {loss.item()} at step {t} of {desc}; lower the learning rate (--lr)")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            t, done = t + 1, done + 1
            bar.update(), bar.set_postfix(loss=f"{loss.item():.3f}", **progress.step(len(x)), refresh=False)
            if on_save and save_every and t % save_every == 0 and done < per_epoch:  # mid-epoch; its end saves below
                on_save(dict(epoch=epoch, batch=done, step=t, generator=g.get_state(), rng=rng_state(device)), opt)
        if on_save:
            on_save(dict(epoch=epoch + 1, batch=0, step=t), opt)
    bar.close()
    restore()
    return model


def drop_path_on(model, rate):
    """Stochastic depth in the frozen backbone while it trains, as NOAH trains its whole model in train mode: each
    vit.ViT inside `model` gets rate * i / (depth - 1) at block i (timm's rule), its blocks in train mode (the ViT
    has no dropout, so that changes only this). Returns a function that puts back what was. rate 0: nothing."""
    saved = [(blk, blk.drop_path, blk.training) for m in model.modules() if isinstance(m, vitlib.ViT) and rate
             for blk in m.blocks]
    for m in (m for m in model.modules() if isinstance(m, vitlib.ViT) and rate):
        for i, blk in enumerate(m.blocks):
            blk.drop_path = rate * i / max(len(m.blocks) - 1, 1)
            blk.train()

    def restore():
        for blk, r, mode in saved:
            blk.drop_path = r
            blk.train(mode)
    return restore


def rng_state(device):
    """The global RNG states that a step draws from (dropout): the CPU's, and the device's on CUDA."""
    return [torch.get_rng_state()] + ([torch.cuda.get_rng_state(device)] if torch.device(device).type == "cuda" else [])


def set_rng_state(states, device):
    torch.set_rng_state(states[0])
    if torch.device(device).type == "cuda" and len(states) > 1:
        torch.cuda.set_rng_state(states[1], device)


@torch.inference_mode()
def evaluate(model, split, task, device, batch=256, compile=False):
    """Top-1 accuracy (%) of `model` on `split`, in eval mode, in bf16 on CUDA."""
    net = torch.compile(model.eval()) if compile else model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    for x, y in batches(split, task, device, batch, train=False):
        with autocast(device, True):
            correct += (net(x).argmax(-1) == y).sum()  # summed on the device: no sync per batch
    return 100.0 * correct.item() / len(split)


@torch.no_grad()
def features(model, split, task, device, batch=256):
    """Split of the model's features of `split` (centre-cropped, not augmented), in fp32, on the CPU."""
    model.eval()
    feats = [model.features(x).float().cpu() for x, _ in batches(split, task, device, batch, train=False)]
    return data.Split(torch.cat(feats), split.labels)


@torch.inference_mode()
def init_head(model, split, task, device, how):
    """zero: the head starts at 0. prototype: row c is the support set's mean feature of class c, L2-normalised
    (each feature normalised first), bias 0 -- a nearest-class-mean classifier by dot product. trunc_normal: std
    0.02, bias 0 (timm's, NOAH's). kaiming: Kaiming-normal (fan_out), bias -log(99), a 1% prior (VPT's MLP head)."""
    nn.init.zeros_(model.head.weight), nn.init.zeros_(model.head.bias)
    if how == "trunc_normal":
        nn.init.trunc_normal_(model.head.weight, std=0.02)
    if how == "kaiming":
        nn.init.kaiming_normal_(model.head.weight, a=0, mode="fan_out"), nn.init.constant_(model.head.bias, -math.log(99))
    if how == "prototype":
        model.eval()
        feats = torch.cat([F.normalize(model.features(x).float(), dim=-1) for x, _ in batches(split, task, device, 256, train=False)])
        means = torch.zeros_like(model.head.weight).index_add_(0, split.labels.to(device), feats)
        model.head.weight.copy_(F.normalize(means, dim=-1))


def count(params):
    return sum(p.numel() for p in params)

# -----------------------------------------------------------------------------
# one run: fit, evaluate, and --grid's search


def run_one(name, task, backbone, cfg, device, seed, test=True):
    """Train method `name` on task.train (fit), then top-1 on val (and test): the record's numbers."""
    model, out = fit(name, task, backbone, cfg, device, seed)
    out["val_top1"] = evaluate(model, task.val, task, device, compile=cfg.compile)
    return out | (dict(test_top1=evaluate(model, task.test, task, device, compile=cfg.compile)) if test else {})


def fit(name, task, backbone, cfg, device, seed):
    """(the trained model ready for inference, {trainable, config, ...}): a fresh copy of `backbone` wrapped by the
    method. The recipe follows what the module can do, so `pvp` follows its module's: pruning (E2VPT), merging (LoRA)."""
    torch.manual_seed(seed)
    model = build(name, copy.deepcopy(backbone), task.num_classes, cfg).to(device)
    lr = cfg.lr * LR_FACTOR.get(name, 1.0)
    init_head(model, task.train, task, device, cfg.head_init)
    out = dict(trainable=count(p for p in model.parameters() if p.requires_grad), config=model.config)
    if type(model) is LinearProbe:  # the backbone is frozen and deterministic: its features once, then the head alone
        train(model.head, features(model, task.train, task, device), task, cfg, device, seed=seed, lr=lr,
              desc=f"{name} {task.name}")
    else:
        train(model, task.train, task, cfg, device, seed=seed, lr=lr, desc=f"{name} {task.name}")
    if prunes(model) and cfg.prune != "none":  # E2VPT Sec. 3.3: train, score, prune, rewind, train again
        model, out["pruned"], out["prune_grid"] = prune_and_retrain(name, model, task, cfg, device, seed, lr)
    if hasattr(model, "merge"):  # LoRA: fold B·A into the frozen weights, zero-overhead inference
        model.merge()
    return model.eval(), out


def prune_and_retrain(name, model, task, cfg, device, seed, lr):
    """(the retrained model, what it kept, the [token, segment, val] grid or None). --prune nanopetl: |grad| scores
    (a token by its segments', see e2vpt.importance), --prune-tokens x --prune-segments, rewind to the starting
    values. official (ChengHan111/E2VPT src/engine/trainer.py:359-470): signed scores, the token mask's own, every
    pair of --prune-grid tried and the best on val kept (ties: the first, least pruned), a fresh random rewind. A
    pvp module always rewinds to its pre-trained values: a fresh draw would throw PVP away."""
    official = cfg.prune == "official"
    scores = model.importance(batches(task.train, task, device, min(cfg.batch, len(task.train)), train=False),
                              signed=official, token_from="mask" if official else "segments")
    fractions = [float(f) for f in cfg.prune_grid.split(",")]
    pairs = [(a, b) for a in fractions for b in fractions] if official else [(cfg.prune_tokens, cfg.prune_segments)]
    best, grid = None, []
    for tokens, segments in pairs:
        m = copy.deepcopy(model) if len(pairs) > 1 else model
        kept = m.prune(tokens, segments, scores)
        m.rewind(fresh=official and name != "pvp")
        init_head(m, task.train, task, device, cfg.head_init)
        train(m, task.train, task, cfg, device, seed=seed, lr=lr, desc=f"{name} {task.name} pruned {tokens}/{segments}")
        if len(pairs) > 1:  # chosen on val, never on test
            grid.append([tokens, segments, evaluate(m, task.val, task, device)])
        if best is None or grid[-1][2] > best[2]:
            best = (m, dict(kept, fractions=[tokens, segments]), grid[-1][2] if grid else None)
    return best[0], best[1], grid or None


def prunes(model_or_class):
    return all(hasattr(model_or_class, a) for a in ("importance", "prune", "rewind"))


def search(name, task, backbone, cfg, device, seed):
    """--grid: train at every lr x wd, score on task.val at the last step (test is never touched); keep the best,
    ties to the smaller lr (VPT's rule). Returns the config with that lr and wd, and the grid as [lr, wd, val]."""
    grid = [[lr, wd, run_one(name, task, backbone, dataclasses.replace(cfg, lr=lr, wd=wd), device, seed,
                             test=False)["val_top1"]]
            for lr in map(float, cfg.grid_lr.split(",")) for wd in map(float, cfg.grid_wd.split(","))]
    lr, wd, _ = max(grid, key=lambda g: (g[2], -g[0]))
    return dataclasses.replace(cfg, lr=lr, wd=wd), grid


def search_task(cfg, task, shots, seed, backbone):
    """Where --grid trains and selects: VTAB-1k's train800 -> val200; any other task's support set -> its val."""
    if not task.name.startswith("vtab1k"):
        return task
    [search] = data.load_task(cfg.data, cfg.data_root, shots=shots, seed=seed, vtab_stage="search", norm=cfg.norm,
                              img_size=cfg.img_size or backbone.img_size, vtab_task=cfg.vtab_task)
    return search

# -----------------------------------------------------------------------------
# the backbone and the embedded pieces


def load_backbone(weights, arch="vit_base_patch16", img_size=None):
    """(ViT without head, its name): `weights` (a PRETRAINED name or a path), or with None the embedded backbone."""
    if weights is None:  # checked against the weight hash its header records: a damaged file is refused
        path = embedded_backbone()
        model = vitlib.load_pretrained(vitlib.vit_synthetic(num_classes=0), path, verbose=False).eval()
        with safe_open(path, "pt") as f:
            recorded = json.loads((f.metadata() or {}).get("nanopetl", "{}")).get("weights_hash")
        if recorded not in (None, weights_hash(model)):
            raise vitlib.CheckpointError(f"{path}: its weights hash to {weights_hash(model)}, not to the {recorded} its "
                                         "header records (damaged?): restore it (git checkout), or rebuild it with "
                                         "python pvp_pretrain.py --backbone")
        return model, "vit_synthetic"
    arch = vitlib.PRETRAINED.get(weights, {}).get("preset", arch)
    model = vitlib.PRESETS[arch](num_classes=0, **({"img_size": img_size} if img_size else {}))
    return vitlib.load_pretrained(model, weights).eval(), f"{arch}:{Path(weights).name}"


def pretrain_once(path, argv, what):
    """Build a missing piece by running pvp_pretrain.py (its progress shows here). It locks `path`, so two sweeps
    starting at once build it once; --resume goes on from an interrupted build's last epoch."""
    print(f"building {what} once; cached at {path}")
    cmd = [sys.executable, str(HERE / "pvp_pretrain.py"), *argv, "--out", str(path), "--resume"]
    if (code := subprocess.run(cmd).returncode) != 0:
        raise KeyboardInterrupt if code == 130 else UsageError(
            f"building {what} failed ({' '.join(cmd[1:])} exited with {code}; its message is above)")
    return path


def embedded_backbone():
    """The path of the shipped embedded backbone (assets/, made by `pvp_pretrain.py --backbone` with the recipe its
    header records), or of one built by that command under checkpoints/ when the shipped file is gone."""
    if SHIPPED_BACKBONE.exists():
        return SHIPPED_BACKBONE
    path = CHECKPOINTS / "vit_synthetic.safetensors"
    return path if path.exists() else pretrain_once(path, ["--backbone", *EMBEDDED_BUILD], "the embedded backbone "
                                                    f"({SHIPPED_BACKBONE} is gone; git checkout restores it)")


EMBEDDED_BUILD = []  # extra pvp_pretrain.py flags for the embedded builds (the tests shrink them)


def embedded_pvp(backbone):
    """The embedded PVP prompts (VPT-deep pre-trained on the synthetic PVP source), built when missing or when they
    were made on another backbone."""
    path = CHECKPOINTS / "pvp_vpt_vit_synthetic.safetensors"
    try:
        stale = path.exists() and module_header(path)["backbone_hash"] != weights_hash(backbone)
    except vitlib.CheckpointError:
        stale = True
    if not path.exists() or stale:
        pretrain_once(path, ["--weights", str(embedded_backbone()), "--arch", "vit_synthetic", *EMBEDDED_BUILD],
                      "the embedded PVP prompts" + " (the backbone changed)" * stale)
    return path

# -----------------------------------------------------------------------------
# what makes a run: its identity, its key, its label


def run_identity(name, task, cfg, backbone_hash, options):
    """Everything that determines a run's numbers, as JSON: the method and its resolved options (for pvp: the module
    type, options and content hash; else the options as its constructor resolved them), the data (name, resolved root, fingerprint of the files or pixels read), the
    task, shots and seed, the protocol with image size, normalisation and augmentation as resolved, and the
    backbone's weights by content. Paths are not part of it: a moved file is the same run, a replaced one is not."""
    cls = METHODS[options["method"]] if name == "pvp" else METHODS[name]
    protocol = {k: getattr(cfg, k) for k in PROTOCOL if k not in PRUNING or prunes(cls)}
    m = task.meta
    return dict(method=name, options=options, data=dict(
        dataset=task.name, root=m.get("root") and str(Path(m["root"]).resolve()), fingerprint=m["fingerprint"]),
        shots=m["shots"] or "all", seed=m["seed"], protocol=protocol | dict(
            img_size=task.img_size, mean=task.mean, std=task.std, aug=task.train_aug), backbone=backbone_hash)


def run_key(identity):
    """method|task|shots|seed|hash: readable in front, exact behind."""
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return f"{label(identity['method'], identity['options'])}|{identity['data']['dataset']}|{identity['shots']}|" \
           f"{identity['seed']}|{digest}"


def label(name, options):
    """The table's row name: pvp says which module it starts from, pvp(vpt) or pvp(lora)."""
    return f"pvp({options['method']})" if name == "pvp" else name

# -----------------------------------------------------------------------------
# the results file: lines appended under a lock, read back whatever is in it, runs claimed while they train


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
    records, bad = {}, []
    for n, line in enumerate(text.splitlines(), 1):
        try:
            r = json.loads(line)
        except ValueError:
            r = None
        need_ok = REQUIRED | (REQUIRED_OK if isinstance(r, dict) and r.get("status") == "ok" else {})
        if isinstance(r, dict) and all(isinstance(r.get(k), t) for k, t in need_ok.items()):
            records[r["key"]] = r
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
    ax.set(xscale="log", xlabel="shots per class", ylabel="test top-1 (%)", title="few-shot accuracy (mean ± std over seeds)")
    ax.set_xticks([1, 2, 4, 8, 16], ["1", "2", "4", "8", "16"])
    ax.grid(alpha=0.3), ax.legend(fontsize=8)
    fig.tight_layout(), fig.savefig(path, dpi=120)

# -----------------------------------------------------------------------------
# devices, torchrun, and the checks made before any work


def pick_device(name):
    if name != "auto":
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu")


def check_device(flag, name):
    """A torch device this machine runs (cpu, cuda[:n] with that GPU, mps), or one UsageError naming the flag."""
    try:
        device = pick_device(name)
    except RuntimeError:
        raise UsageError(f"{flag} {name}: not a torch device; use auto, cpu, cuda, cuda:<n> or mps") from None
    need(device.type in ("cpu", "cuda", "mps"), f"{flag} {name}: nanoPETL runs on cpu, cuda or mps, not "
         f"{device.type}; use auto, cpu, cuda, cuda:<n> or mps")
    need(device.type == "cuda" or device.index is None, f"{flag} {name}: only CUDA devices are numbered; use "
         f"{device.type}")
    for kind, there in (("cuda", torch.cuda.is_available()), ("mps", torch.backends.mps.is_available())):
        need(device.type != kind or there, f"{flag} {name}: no {kind.upper()} here; use cpu or auto")
    need(device.type != "cuda" or (device.index or 0) < torch.cuda.device_count(), f"{flag} {name}: this machine has "
         f"{torch.cuda.device_count()} GPU(s), numbered from 0")
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
        bad = [k for k in torchrun if k != "MASTER_ADDR" and not os.environ.get(k, "0").isdigit()]
        need(not missing, f"LOCAL_RANK={os.environ['LOCAL_RANK']} is set, but {', '.join(missing)} "
             f"{'is' if len(missing) == 1 else 'are'} not: run under torchrun, or unset LOCAL_RANK")
        need(not bad, f"{', '.join(f'{k}={os.environ[k]}' for k in bad)}: torchrun's variables are whole numbers; "
             "run under torchrun, or unset them")


def init_distributed(device):
    """(rank, world size, device). Under torchrun: join the group (NCCL on CUDA, gloo on CPU), one GPU per rank."""
    if "LOCAL_RANK" not in os.environ:
        return 0, 1, pick_device(device)
    cuda, local = torch.cuda.is_available() and device in ("auto", "cuda"), int(os.environ["LOCAL_RANK"])
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(days=7))  # ranks wait at the end
    if cuda:
        torch.cuda.set_device(local)
    return dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local}") if cuda else pick_device(device)


MAX_SEED, MAX_IMG = 2**32 - 1, 1024  # seeds feed torch generators; past 1024 px a ViT-B/16 step needs > 100 GB


def check(cfg):
    """Refuse what cannot work before any time is spent: one UsageError naming the flag and what to do.
    Returns (methods, shots, seeds, {method: its options as resolved})."""
    def listed(flag, text, kind, ok, what):  # a comma list of `kind`, each ok(value), none twice
        try:
            values = [kind(v) if kind is not int or re.fullmatch(r"-?[0-9]+", v.strip()) else None
                      for v in text.split(",")]
        except ValueError:
            values = []
        need(values and None not in values and all(map(ok, values)), f"{flag} must be {what}, got {text!r}")
        need(len(set(values)) == len(values), f"{flag} {text} names a value twice: give each once")
        return values

    methods = list(METHODS) if cfg.method.strip() == "all" else [m.strip() for m in cfg.method.split(",")]
    need(all(methods), f"--method {cfg.method!r} has an empty name: a comma list of names, e.g. linear,vpt")
    need("all" not in methods, f"--method {cfg.method}: 'all' stands alone (it means every method)")
    unknown = [m for m in methods if m not in METHODS]
    need(not unknown, f"unknown method {', '.join(unknown)}: choose from {', '.join(METHODS)}, or all")
    need(len(set(methods)) == len(methods), f"--method {cfg.method} names a method twice")
    lr_max = 1e4  # above it a run only diverges, or overflows AdamW's float32 step (from ~1e37) with a traceback
    need(0 < cfg.lr <= lr_max, f"--lr must be a positive number, at most {lr_max:g}, got {cfg.lr}")
    shots = [None] if cfg.shots == "all" else listed("--shots", cfg.shots, int, lambda k: k >= 1,
                                                     "'all' or a comma list of whole numbers from 1 up")
    seeds = listed("--seeds", cfg.seeds, int, lambda s: 0 <= s <= MAX_SEED,
                   f"a comma list of whole numbers from 0 to {MAX_SEED}")
    need(cfg.grid or (cfg.grid_lr, cfg.grid_wd) == (Config.grid_lr, Config.grid_wd),
         "--grid-lr and --grid-wd are the grid that --grid searches: add --grid, or drop them")
    listed("--grid-lr", cfg.grid_lr, float, lambda v: 0 < v <= lr_max, f"a comma list of lrs in (0, {lr_max:g}]")
    listed("--grid-wd", cfg.grid_wd, float, lambda v: 0 <= v < math.inf, "a comma list of weight decays >= 0")
    for flag, ok, what in (
            ("--wd", cfg.wd >= 0 and math.isfinite(cfg.wd), "a number >= 0"), ("--batch", cfg.batch >= 1, "at least 1"),
            ("--epochs", cfg.epochs >= 1, "at least 1"), ("--warmup", 0 <= cfg.warmup <= 1, "a fraction in [0, 1]"),
            ("--max-steps", cfg.max_steps is None or cfg.max_steps >= 1, "at least 1 (leave it out for no cap)"),
            ("--prune-tokens", 0 <= cfg.prune_tokens < 1, "a fraction in [0, 1)"),
            ("--prune-segments", 0 <= cfg.prune_segments < 1, "a fraction in [0, 1)"),
            ("--prompts", cfg.prompts is None or cfg.prompts >= 1, "at least 1"),
            ("--kv-prompts", cfg.kv_prompts is None or cfg.kv_prompts >= 0, "at least 0"),
            ("--rank", cfg.rank is None or cfg.rank >= 1, "at least 1"),
            ("--img-size", cfg.img_size is None or 1 <= cfg.img_size <= MAX_IMG, f"from 1 to {MAX_IMG}"),
            ("--warmup-lr", cfg.warmup_lr is None or 0 <= cfg.warmup_lr <= cfg.lr, f"a number from 0 to --lr "
                                                                                   f"({cfg.lr:g})"),
            ("--min-lr", 0 <= cfg.min_lr <= cfg.lr, f"a number from 0 to --lr ({cfg.lr:g})"),
            ("--label-smoothing", 0 <= cfg.label_smoothing < 1, "a fraction in [0, 1)"),
            ("--mixup", 0 <= cfg.mixup <= 100, "an alpha >= 0 (0: off)"), ("--cutmix", 0 <= cfg.cutmix <= 100,
                                                                            "an alpha >= 0 (0: off)"),
            ("--reprob", 0 <= cfg.reprob <= 1, "a probability in [0, 1]"),
            ("--drop-path", 0 <= cfg.drop_path < 1, "a rate in [0, 1)")):
        need(ok, f"{flag} must be {what}, got {getattr(cfg, flag[2:].replace('-', '_'))}")
    listed("--prune-grid", cfg.prune_grid, float, lambda v: 0 <= v < 1, "a comma list of fractions in [0, 1)")
    need(cfg.reprob == 0 or cfg.aug == "randaug", "--reprob is random erasing inside --aug randaug: "
         "add --aug randaug, or drop --reprob")
    for flag, value, choices in (("--optimizer", cfg.optimizer, ("adamw", "sgd")), ("--recipe", cfg.recipe, RECIPES),
                                 ("--aug", cfg.aug, (None, "none", "crop_flip", "randaug")),
                                 ("--schedule", cfg.schedule, ("step", "epoch", "timm")),
                                 ("--prune", cfg.prune, ("nanopetl", "official", "none")),
                                 ("--head-init", cfg.head_init, ("zero", "prototype", "trunc_normal", "kaiming")),
                                 ("--norm", cfg.norm, (None, *data.NORMS)), ("--arch", cfg.arch, tuple(vitlib.PRESETS))):
        need(value in choices, f"{flag} {value}: choose one of {', '.join(c for c in choices if c)}")
    arch = "vit_synthetic" if cfg.weights is None else vitlib.PRETRAINED.get(cfg.weights, {}).get("preset", cfg.arch)
    patch = getattr(vitlib.PRESETS[arch], "keywords", {}).get("patch_size") or 1
    need(not cfg.img_size or cfg.img_size % patch == 0,
         f"--img-size {cfg.img_size} must be a multiple of {patch}, the patch size of {arch}")
    # the data: a known name, and the flags that go with it
    name, _, sub = cfg.data.partition(":")
    need(name in data.DATASETS, f"unknown dataset {name!r} (--data): choose one of {', '.join(data.DATASETS)}")
    need(name != "synthetic" or not sub or sub in data.SYNTHETIC_TASKS, f"unknown synthetic task {sub!r} (--data "
         f"synthetic:<task>): choose one of {', '.join(data.SYNTHETIC_TASKS)}, or --data synthetic for all")
    need(name != "synthetic" or cfg.data_root is None, f"--data-root is for data on disk; the embedded --data {cfg.data} "
         "has none: drop it")
    need(not cfg.download or name in data.TORCHVISION, f"--download fetches {', '.join(data.TORCHVISION)} through "
         f"torchvision, not --data {cfg.data}: drop it")
    need(cfg.vtab_task is None or name == "vtab1k", f"--vtab-task is for --data vtab1k, not --data {cfg.data}: drop it")
    if name != "synthetic":
        need(cfg.data_root is not None, f"--data {name} reads from disk: give its root (--data-root), laid out as "
             f"{data.LAYOUTS[name]}")
        need(cfg.download or Path(cfg.data_root).is_dir(), f"--data-root {cfg.data_root} does not exist (or is not a "
             f"folder): give the folder that holds {data.LAYOUTS[name]}")
    task = cfg.vtab_task or sub
    need(name != "vtab1k" or task in data.VTAB_TASKS, (f"--vtab-task {task!r} is not a VTAB-1k task folder: choose"
         if task else "--data vtab1k needs --vtab-task <folder>,") + f" one of {', '.join(data.VTAB_TASKS)}")
    need(name != "noah-fewshot" or None not in shots, "--data noah-fewshot reads the list file of each shots and seed: "
         "give --shots from 1,2,4,8,16, not all")
    # the checkpoints
    need(cfg.weights is None or cfg.weights in vitlib.PRETRAINED or Path(cfg.weights).is_file(),
         f"--weights: no checkpoint file at {cfg.weights}, and not one of the named weights "
         f"{', '.join(vitlib.PRETRAINED)}")
    if cfg.pvp_init and "pvp" not in methods:  # harmless (one flag set for many sweeps), but maybe a slip: say so
        print(f"warning: --pvp-init is where --method pvp starts, and --method {cfg.method} has no pvp: it is ignored",
              file=sys.stderr)
    need(cfg.pvp_init is None or Path(cfg.pvp_init).is_file(), f"--pvp-init: no module checkpoint at {cfg.pvp_init}; "
         "make one with python pvp_pretrain.py --weights <this backbone> --out <path>")
    need("pvp" not in methods or cfg.pvp_init or cfg.weights is None, "--method pvp with --weights needs --pvp-init: a "
         "module checkpoint pre-trained on that backbone (python pvp_pretrain.py --weights ...)")
    configs = check_options(cfg, methods, arch)
    # --- issue 13: the data path's flags
    need(cfg.workers is None or cfg.workers >= 0, f"--workers must be 0 (load in this process) or more, got {cfg.workers}")
    need(cfg.cache_gb is None or cfg.cache_gb >= 0, f"--cache-gb must be a number of GB >= 0 (0: stream every split "
         f"from disk), got {cfg.cache_gb}")
    i, slash, n = (cfg.shard or "0/1").partition("/")
    need(slash and i.isdigit() and n.isdigit() and int(i) < int(n), f"--shard {cfg.shard}: write i/n with 0 <= i < n, "
         "e.g. --shard 0/4 ... --shard 3/4 for four jobs")
    # the device and the environment
    device = check_device("--device", cfg.device)
    need(not cfg.amp or device.type == "cuda", f"--amp is bf16 autocast on CUDA, and this run is on {device.type}: "
         "drop --amp")
    check_environment()
    # --out: a folder we can write, whose results.jsonl (if any) is a plain file
    out, results = Path(cfg.out), Path(cfg.out) / "results.jsonl"
    need(not out.exists() or out.is_dir(), f"--out {out} is a file, not a folder: give a folder for results.jsonl")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {out}: cannot create that folder ({e.strerror}): give one you can write to") from None
    need(os.access(out, os.W_OK), f"--out {out}: cannot write in that folder: give one you can write to")
    need(not results.exists() or results.is_file(), f"{results} is not a regular file (a re-run reads it whole): "
         "move it away, or give another --out")
    return methods, shots, seeds, configs


def check_options(cfg, methods, arch):
    """Method options: each given one taken by some chosen method, each value one its constructor accepts (tried on
    a weightless 'meta' copy of the backbone), and none that contradicts a pvp module's own."""
    given = given_options(cfg)
    builders = [m for m in methods if m != "pvp"]
    takers = {k: [m for m in builders if k in options_of(METHODS[m])] for k in given}
    if "pvp" in methods and cfg.pvp_init:  # the module's options are its checkpoint's: a flag may not differ
        meta = module_header(cfg.pvp_init)
        clash = {k: (v, meta["config"][k]) for k, v in given.items() if k in meta["config"] and meta["config"][k] != v}
        need(not clash, f"--pvp-init {cfg.pvp_init} holds a {meta['method']} module with " + ", ".join(
            f"{k}={theirs!r}" for k, (_, theirs) in clash.items()) + ", and this command asks for " + ", ".join(
            f"{k}={mine!r}" for k, (mine, _) in clash.items()) + ": pvp keeps its module's options, so compare like "
            "with like (drop the flag, or pre-train a module with it: pvp_pretrain.py)")
        takers = {k: ms + ["pvp"] * (k in meta["config"]) for k, ms in takers.items()}
    for k, ms in takers.items():
        flag = next((f"--{f.replace('_', '-')}" for f, (o, _) in FLAGS.items() if o == k and getattr(cfg, f) is not
                     None), f"--opt {k}")
        if not ms and flag.startswith("--opt"):
            raise UsageError(f"{flag}: none of --method {','.join(methods)} takes it; " + "; ".join(
                f"{m} takes {', '.join(options_of(METHODS[m])) or 'no options'}" for m in builders))
        if not ms:  # a named option (--prompts, --rank, ...) set once for many sweeps: a warning
            print(f"warning: {flag} is ignored: none of --method {','.join(methods)} takes {k}", file=sys.stderr)
    for m in builders:
        for k, v in method_options(m, cfg).items():
            check_type(m, k, v, options_of(METHODS[m])[k])
    configs = {}
    if not builders:  # pvp alone: its options are its checkpoint's (and a first meta build costs about a second)
        return configs
    with torch.device("meta"):  # no memory, no weights: the constructors check their own arguments
        skeleton = vitlib.PRESETS[arch](num_classes=0, **({"img_size": cfg.img_size} if cfg.img_size else {}))
        for m in builders:
            try:
                configs[m] = METHODS[m](copy.deepcopy(skeleton), num_classes=2, **method_options(m, cfg)).config
            except (TypeError, ValueError) as e:
                raise UsageError(f"--method {m}: {e}; change the option (--opt NAME=VALUE or its flag)") from None
    return configs  # as the constructors resolve them (defaults filled in): what a run's key holds

# -----------------------------------------------------------------------------
# the sweep


def main(argv=None):
    cfg = parse(argv)
    methods, shots, seeds, configs = check(cfg)
    rank, world, device = init_distributed(cfg.device)  # under torchrun each rank takes every world-th run
    out = Path(cfg.out)  # check() made it
    backbone, backbone_name = load_backbone(cfg.weights, cfg.arch, cfg.img_size)
    backbone_params, backbone_hash = count(backbone.parameters()), weights_hash(backbone)
    module = None
    if "pvp" in methods:  # its module, read and checked once before any run
        cfg = dataclasses.replace(cfg, pvp_init=str(cfg.pvp_init or embedded_pvp(backbone)))
        meta, tensors = read_module(cfg.pvp_init, backbone)
        module = dict(method=meta["method"], config=meta["config"], hash=tensors_hash(tensors))
    print(f"nanoPETL few-shot: {', '.join(methods)} on {cfg.data} x shots {cfg.shots} x seeds {cfg.seeds}, "
          f"backbone {backbone_name} ({backbone_params:,} params, weights {backbone_hash}) on {device}"
          f"{' (torch.compile)' * cfg.compile}\nprotocol (recipe {cfg.recipe}): "
          f"{json.dumps({k: getattr(cfg, k) for k in PROTOCOL})}\n"
          "options: " + "; ".join(f"{m} {json.dumps(module if m == 'pvp' else method_options(m, cfg))}" for m in methods))
    results = out / "results.jsonl"
    done = finished(results, warn=rank == 0)
    plan = [(k, s) for k in shots for s in seeds]
    total = len(plan) * len(methods) * (5 if cfg.data == "synthetic" else 1)
    chosen = {}  # --grid: (method, task, shots) -> (config, grid)
    shard, shards = map(int, (cfg.shard or "0/1").split("/"))  # --shard i/n: this job runs index % n == i
    bar, n, planned = tqdm(total=total, desc="runs" if world == 1 else f"runs of rank {rank}", dynamic_ncols=True), -1, []
    try:
        for k, s in plan:
            tasks = data.load_task(cfg.data, cfg.data_root, shots=k, seed=s, img_size=cfg.img_size or backbone.img_size,
                                   norm=cfg.norm, vtab_task=cfg.vtab_task, download=cfg.download,
                                   cache_gb=cfg.cache_gb, workers=cfg.workers)
            for task in tasks:
                task.train_aug = cfg.aug or task.train_aug
                task.val, task.test = on_device(task.val, device), on_device(task.test, device)
                for m in methods:
                    identity = run_identity(m, task, cfg, backbone_hash, module if m == "pvp" else configs[m])
                    key, n = run_key(identity), n + 1
                    planned.append(key)
                    if key in done or n % shards != shard or n // shards % world != rank:
                        bar.update()
                        continue
                    lock = claim(out, key) if shards == 1 else None  # --shard: the jobs' runs are disjoint, no locks
                    if shards == 1 and (lock is None or key in (done := done | finished(results))):  # another sweep
                        lock and lock.close()  # has it or did it
                        bar.update()
                        continue
                    bar.set_description(f"{m} {task.name} {k or 'all'}-shot seed {s}")
                    t0 = time.time()
                    record = dict(key=key, method=m, row=label(m, identity["options"]), dataset=task.name,
                                  shots=k or "all", seed=s, identity=identity, backbone=backbone_name,
                                  weights=cfg.weights, pvp_init=cfg.pvp_init if m == "pvp" else None,
                                  protocol=identity["protocol"], recipe=cfg.recipe, mean=task.mean, std=task.std,
                                  train_aug=task.train_aug,
                                  sizes=dict(train=len(task.train), val=len(task.val), test=len(task.test)),
                                  num_classes=task.num_classes, backbone_params=backbone_params, compiled=cfg.compile,
                                  device=str(device))
                    try:
                        run_cfg = cfg
                        if cfg.grid:  # once per method, task and shots, on the first seed's support set
                            if (m, task.name, k) not in chosen:
                                chosen[m, task.name, k] = search(m, search_task(cfg, task, k, s, backbone), backbone,
                                                                 cfg, device, s)
                            run_cfg, grid = chosen[m, task.name, k]
                            record |= dict(grid=grid, chosen=dict(lr=run_cfg.lr, wd=run_cfg.wd))
                        record |= run_one(m, task, backbone, run_cfg, device, s) | dict(status="ok")
                    except Diverged as e:
                        tqdm.write(f"failed: {m} on {task.name}, {k}-shot, seed {s}: {e}")
                        record |= dict(status="failed", error=str(e))
                    record["seconds"] = round(time.time() - t0, 2)
                    append(results, record)
                    done[key] = record
                    lock and lock.close()
                    bar.update()
    except KeyboardInterrupt:
        bar.close()
        print(f"\ninterrupted: every finished run is in {results}; run the same command again to go on",
              file=sys.stderr)
        return 130
    bar.close()
    if world > 1:  # rank 0 waits for every rank, then reads the merged file and writes the table once
        dist.barrier()
        if rank != 0:
            return 0
    done = finished(results)  # with what other ranks, or another sweep on this --out, wrote
    if (missing := [key for key in planned if key not in done]) and shards > 1:
        print(f"{len(missing)} of the {len(planned)} planned runs are not in {results} yet: other shards' (--shard "
              f"i/{shards}); when every shard has finished, run any of them again (or this command without --shard) for "
              "the full table", file=sys.stderr)
    elif missing:
        print(f"{len(missing)} runs are not in {results} yet: another sweep on {out} is running them; when it ends, "
              "run this command again for the full table", file=sys.stderr)
    records = [done[key] for key in dict.fromkeys(planned) if key in done]  # this command's runs, nothing else
    rows = list(dict.fromkeys(r["row"] for r in records))
    table = summarize(records, rows, backbone_params)
    if failed := sum(r["status"] != "ok" for r in records):
        print(f"{failed} runs failed (their lines in {results} say why); the table leaves them out", file=sys.stderr)
    print(table)
    if cfg.weights is None and not {"linear", "vpt"} <= set(methods):  # the main job: say what to put beside it
        print(f"How to read it: PVP's claim is against the same prompts started at random and the linear probe; "
              f"run them on the same tasks with: python fewshot.py --method linear,vpt,{cfg.method} --shots {cfg.shots} "
              f"--seeds {cfg.seeds} (the README's 'Embedded results' has every method at 1-16 shots)")
    try:
        (out / "summary.md").write_text(f"{cfg.data}, backbone {backbone_name} (weights {backbone_hash})\n\n{table}\n")
        print(f"saved: {results}, {out / 'summary.md'}")
        if cfg.plot:
            plot(records, rows, out / "accuracy_vs_shots.png")
            print(f"saved: {out / 'accuracy_vs_shots.png'}")
    except OSError as e:
        raise UsageError(f"cannot write {e.filename or out}: {e.strerror or e}. Every run is kept in {results}; free "
                         f"some space and run the same command again to write the table") from None
    return 0


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


if __name__ == "__main__":
    results = Path(parse().out) / "results.jsonl"  # for the messages below (a flag argparse cannot read exits here)
    terminate_as_interrupt()
    try:
        sys.exit(main())
    except (UsageError, data.DataError, vitlib.CheckpointError) as e:
        fail(f"error: {e}")
    except KeyboardInterrupt:  # outside the sweep's own handler: loading, or writing the table
        fail(f"interrupted: every run finished so far is in {results}; run the same command again to go on", 130)
    except OSError as e:  # a read or write that failed outside the places that name their own file
        fail(os_error_line(e, f"The runs finished before it are kept in {results}"))

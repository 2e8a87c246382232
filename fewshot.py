"""
Few-shot evaluation of PETuning methods: methods x datasets x shots x seeds, one results line per run.

    python fewshot.py --method pvp --shots 1                # the main job: offline, on the embedded world
    python fewshot.py --method all --plot                   # every method, shots 1..16, seeds 0..2, and the figure
    torchrun --nproc_per_node=8 fewshot.py --weights vit_b16_in21k ...   # real weights, a sweep over 8 GPUs
With no --weights the embedded backbone is used, and `pvp` with no --pvp-init the embedded PVP prompts (pre-trained
by pvp_pretrain.py when missing, cached under checkpoints/).

Read it in run order: the protocol (Config, RECIPES) -> the methods (METHODS) -> the training loop (train) ->
evaluation -> one run (fit, run_one, search) -> the sweep -> main. The default recipe (nanopetl) is NOAH's few-shot
recipe (ZhangYuanhan-AI/NOAH, configs/*/few-shot/*.sh) without its augmentation and regularisers (docs/recipes.md
lists every difference); `full` trains at lr x 0.1, `linear` its head on frozen features. Runs report the last step:
test never selects anything. Output in --out: results.jsonl (a line per run, keyed by all that makes its numbers: a
re-run skips what is done), summary.md, the plot. Checks, files and keys live in plumbing.py, no paper's idea.
"""
import copy
import dataclasses
import functools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import e2vpt
import lora
import plumbing
import vit as vitlib
import vpt
from plumbing import Diverged, flag

# -----------------------------------------------------------------------------
# the protocol: every knob a flag, printed and saved

AT_LEAST_1 = dict(ok=lambda v, c: v >= 1, what="at least 1")
FRACTION = dict(ok=lambda v, c: 0 <= v < 1, what="a fraction in [0, 1)")
ALPHA = dict(ok=lambda v, c: 0 <= v <= 100, what="an alpha >= 0 (0: off)")
UP_TO_LR = dict(ok=lambda v, c: 0 <= v <= c.lr, what="a number from 0 to --lr ({lr:g})")
NORMS = (None, *data.NORMS)  # (inside Config, `data` is a field)


@dataclass
class Config:
    method: str = flag("pvp", "a name, a comma list, or 'all' (see METHODS)")
    shots: str = flag("1,2,4,8,16", "comma list of K per class, or 'all' (whole train split)")
    seeds: str = flag("0,1,2", "comma list of seeds: support set and initialisation")
    data: str = flag("synthetic", f"one of {', '.join(data.DATASETS)}; synthetic:<task> for one")
    data_root: str = flag(None, "where the dataset lies on disk (runs keyed by each file's path, label, size, mtime)")
    download: bool = flag(False, "let torchvision download flowers102/pets/aircraft/food101")
    vtab_task: str = flag(None, "the VTAB-1k task folder (with --data vtab1k)")
    weights: str = flag(None, "a vit.PRETRAINED name or a checkpoint path; none = embedded")
    arch: str = flag("vit_base_patch16", f"preset for --weights: {', '.join(vitlib.PRESETS)}",
                     choices=tuple(vitlib.PRESETS))
    pvp_init: str = flag(None, "module checkpoint for `pvp` (none = the embedded one)")
    opt: list = flag(None, "NAME=VALUE, a method's constructor option (repeat for more), for the methods taking it")
    optimizer: str = flag("adamw", "adamw (NOAH) or sgd (VPT: momentum 0.9)", choices=("adamw", "sgd"))
    lr: float = flag(5e-3, "base learning rate", ok=lambda v, c: 0 < v <= plumbing.LR_MAX,
                     what=f"a positive number, at most {plumbing.LR_MAX:g}")
    grid: bool = flag(False, "choose lr x wd on val first (vtab1k: train800 -> val200), then run it on every seed")
    grid_lr: str = flag("50,25,10,5,2.5,1,0.5,0.25,0.1,0.05", "--grid's learning rates (VPT's)")
    grid_wd: str = flag("0.01,0.001,0.0001,0", "--grid's weight decays (VPT's)")
    lr_scale: bool = flag(False, "multiply lr by batch/256 (VPT's rule)")
    wd: float = flag(1e-4, "weight decay (none on biases and norms)", ok=lambda v, c: v >= 0 and math.isfinite(v),
                     what="a number >= 0")
    epochs: int = flag(100, "passes over the support set", **AT_LEAST_1)
    max_steps: int = flag(None, "cap on optimiser steps", ok=lambda v, c: v >= 1, what="at least 1 (no flag: no cap)")
    warmup: float = flag(0.1, "fraction of steps of warmup", ok=lambda v, c: 0 <= v <= 1, what="a fraction in [0, 1]")
    batch: int = flag(64, "batch size (at most the support-set size)", **AT_LEAST_1)
    norm: str = flag(None, "imagenet or inception (0.5/0.5); default per data", choices=NORMS)
    aug: str = flag(None, "none, crop_flip, or randaug (RandomResizedCrop 0.08-1, flip, RandAugment 2 ops at 9, "
                          "random erasing); default per data", choices=(None, "none", "crop_flip", "randaug"))
    img_size: int = flag(None, "input side; default: the backbone's", ok=lambda v, c: 1 <= v <= plumbing.MAX_IMG,
                         what=f"from 1 to {plumbing.MAX_IMG}")
    head_init: str = flag("zero", "zero; prototype (the support set's normalised class means); trunc_normal (NOAH); "
                                  "kaiming (VPT)", choices=("zero", "prototype", "trunc_normal", "kaiming"))
    recipe: str = flag("nanopetl", "a paper's protocol: nanopetl, noah, vpt, e2vpt (RECIPES); flags override it")
    schedule: str = flag("step", "step (warmup then cosine per step), epoch (VPT: per epoch, epoch 0 at lr 0), timm "
                                 "(NOAH: timm's cosine)", choices=("step", "epoch", "timm"))
    warmup_lr: float = flag(None, "first warmup lr (timm's warmup-lr; default: the ramp (t+1)/warmup)", **UP_TO_LR)
    min_lr: float = flag(0.0, "lr floor of the cosine", **UP_TO_LR)
    label_smoothing: float = flag(0.0, "label smoothing of the cross-entropy", **FRACTION)
    mixup: float = flag(0.0, "MixUp alpha (0: off); with --cutmix, one of the two per batch", **ALPHA)
    cutmix: float = flag(0.0, "CutMix alpha (0: off)", **ALPHA)
    reprob: float = flag(0.0, "random-erasing probability per image (with --aug randaug)", ok=lambda v, c: 0 <= v <= 1,
                         what="a probability in [0, 1]")
    drop_path: float = flag(0.0, "stochastic depth in the frozen backbone while training (timm's rule: 0 at block 0 "
                                 "up to this at the last)", ok=lambda v, c: 0 <= v < 1, what="a rate in [0, 1)")
    drop_last: bool = flag(False, "drop each epoch's last incomplete batch")
    prune: str = flag("nanopetl", "E2VPT pruning: nanopetl (|grad| scores, the fractions below, rewind to the start), "
                                  "official (signed scores, fractions chosen on val over --prune-grid, fresh rewind), "
                                  "none", choices=("nanopetl", "official", "none"))
    prune_grid: str = flag("0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9", "--prune official's fractions (tokens x segments)")
    prompts: int = flag(None, "prompt tokens per layer, num_prompts (vpt, e2vpt; default 10; NOAH: 100)", **AT_LEAST_1)
    kv_prompts: int = flag(None, "E2VPT key-value prompts per layer, num_kv_prompts (default 5)",
                           ok=lambda v, c: v >= 0, what="at least 0")
    prune_tokens: float = flag(0.5, "E2VPT: fraction of visual prompt tokens pruned", **FRACTION)
    prune_segments: float = flag(0.25, "E2VPT: fraction of each token's segments pruned", **FRACTION)
    rank: int = flag(None, "LoRA rank (default 8; alpha = rank unless --opt alpha=...)", **AT_LEAST_1)
    device: str = flag("auto", "auto (cuda -> mps -> cpu), or cpu, cuda, cuda:<n>, mps")
    amp: bool = flag(False, "bf16 autocast in training (CUDA only)")
    eval_dtype: str = flag("bf16", "evaluation on CUDA: bf16, or fp32 (the papers')", choices=("bf16", "fp32"))
    compile: bool = flag(False, "torch.compile the model for training and evaluation")
    workers: int = flag(None, "loader processes for streamed splits, up to this process's CPUs (default: CPUs-1, <=8)",
                        ok=lambda v, c: 0 <= v <= data.cpus(), what="0 to {cpus}, the CPUs this process may use")
    cache_gb: float = flag(None, "GB of decoded images kept in memory; the rest stream (default: NANOPETL_MAX_GB, 8)",
                           ok=lambda v, c: v >= 0, what="a number of GB >= 0 (0: stream every split from disk)")
    shard: str = flag(None, "i/n: run the planned runs whose index %% n == i, one of n jobs on one --out")
    out: str = flag("runs/fewshot", "output folder")
    plot: bool = flag(False, "write accuracy_vs_shots.png")


# The embedded world's departures from NOAH, chosen on its val pools (docs/results.md: how the defaults were chosen)
EMBEDDED = dict(max_steps=100, norm="inception")
# what trains a run: in every line's protocol and key (img_size, norm and aug are added as resolved per task)
PROTOCOL = ("optimizer", "lr", "lr_scale", "wd", "epochs", "max_steps", "warmup", "batch", "head_init", "amp", "grid",
            "grid_lr", "grid_wd", "schedule", "warmup_lr", "min_lr", "label_smoothing", "mixup", "cutmix", "reprob",
            "drop_path", "drop_last", "prune", "prune_tokens", "prune_segments", "prune_grid", "eval_dtype")
PRUNING = ("prune", "prune_tokens", "prune_segments", "prune_grid")  # in the key only of methods that prune

# The papers' protocols. Each value: (value, where the official code sets it). `options` are methods' constructor
# options. Explicit flags override; whatever is not named keeps Config's default (nanopetl's).
NOAH = "ZhangYuanhan-AI/NOAH "  # configs/{VPT,LoRA}/few-shot/slurm_train_*_few-shot.sh -> supernet_train_prompt.py
VPT = "KMnP/vpt "
E2VPT = "ChengHan111/E2VPT "
VPT_SOLVER = {  # KMnP/vpt's training, which ChengHan111/E2VPT (a fork) keeps
    "optimizer": ("sgd", VPT + "configs/base-prompt.yaml:14 (momentum 0.9, src/configs/config.py:91)"),
    "lr_scale": (True, VPT + "tune_fgvc.py:31 (lr / 256 * batch)"),
    "grid": (True, VPT + "tune_vtab.py:245-251 (lr x wd), 48-78 (val at the last epoch, ties to the smaller lr)"),
    "wd": (1e-4, VPT + "configs/base-prompt.yaml:16"),
    "batch": (128, VPT + "configs/base-prompt.yaml:25"),
    "epochs": (100, VPT + "configs/base-prompt.yaml:19"),
    "warmup": (0.1, VPT + "configs/base-prompt.yaml:18 (10 of 100 epochs)"),
    "schedule": ("epoch", VPT + "src/engine/trainer.py:221 (scheduler.step() per epoch), "
                                "src/solver/lr_scheduler.py:56-64 (epoch 0 at lr 0)"),
    "head_init": ("kaiming", VPT + "src/models/mlp.py:53-57, src/models/vit_models.py:164 (Kaiming-normal "
                                   "fan_out, bias -log(99))"),
    "eval_dtype": ("fp32", VPT + "src/engine/trainer.py (no autocast or half anywhere in src/)")}
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
        "aug": ("randaug", NOAH + "lib/datasets.py:214-223 (timm 0.5.4's create_transform: --aa rand-m9-mstd0.5-inc1 "
                                  "at supernet_train_prompt.py:119, bicubic :123; RandomResizedCrop 0.08-1, flip)"),
        "reprob": (0.25, NOAH + "supernet_train_prompt.py:133 (--reprob)"),
        "drop_path": (0.1, NOAH + "supernet_train_prompt.py:59,305 (--drop-path; the model trains in train mode, "
                                  "supernet_engine_prompt.py:57)"),
        "drop_last": (True, NOAH + "supernet_train_prompt.py:280"),
        "eval_dtype": ("fp32", NOAH + "supernet_train_prompt.py:428 (amp False), supernet_engine_prompt.py:170-172"),
        "head_init": ("trunc_normal", NOAH + "supernet_train_prompt.py:551-555 (reset_classifier: std 0.02, bias 0)"),
        "options": ({"vpt": dict(dropout=0.1, init="xavier"), "lora": dict(targets=["qkv"], dropout=0.1, alpha=None)},
                    NOAH + "supernet_train_prompt.py:207-208 (prompt and LoRA dropout 0.1); model/supernet_vision_"
                           "transformer_timm.py:316-319 (prompts xavier_uniform_ per block), 224-228,277-281 (one A, "
                           "one B over the fused qkv, no scaling)")},
    "vpt": {**VPT_SOLVER,
            "options": ({"vpt": dict(dropout=0.0)}, VPT + "src/configs/config.py:74 (PROMPT.DROPOUT 0.0)")},
    "e2vpt": {**VPT_SOLVER,  # a fork of KMnP/vpt: its solver, E2VPT's batch, prompt settings and pruning
              "batch": (64, E2VPT + "configs/base-prompt.yaml:25"),
              "prune": ("official", E2VPT + "src/configs/config.py:192-202 (mask percents 10-90, at least 1 token "
                                            "and 4 pieces), src/engine/trainer.py:359-470 (signed gradient scores)"),
              "options": ({"e2vpt": dict(dropout=0.1)}, E2VPT + "command.txt:63-119 (DROPOUT_P 0.1, the visual "
                                                                 "prompts' dropout of src/configs/config.py:180)")},
}


def parse(argv=None):
    """Config from the command line: Config's defaults, then the recipe's values, then the flags given."""
    given = vars(plumbing.parser(Config, __doc__, given_only=True).parse_args(argv))
    recipe = RECIPES.get(given.get("recipe", Config.recipe), {})  # an unknown name: the checks say so
    cfg = Config(**{**vars(plumbing.parser(Config, __doc__).parse_args(argv)),
                    **{k: v for k, (v, _) in recipe.items() if k != "options"}, **given})
    if cfg.weights is None and cfg.data.startswith("synthetic"):
        cfg = dataclasses.replace(cfg, **{k: v for k, v in EMBEDDED.items() if getattr(cfg, k) is None})
    return cfg

# -----------------------------------------------------------------------------
# the methods: two baselines that are not a paper of their own, PVP, and the registry


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
    meta, tensors = plumbing.read_module(checkpoint, vit, METHODS)
    model = METHODS[meta["method"]](vit, num_classes=num_classes, **meta["config"])
    return plumbing.load_module_state_dict(model, tensors, head=False)  # the source head is not reused


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
LR_FACTOR = {"full": 0.1}  # full fine-tuning at a prompt's lr wrecks the backbone (VPT tunes it separately too)
FLAGS = {"prompts": ("num_prompts", 10), "kv_prompts": ("num_kv_prompts", 5), "rank": ("rank", 8)}  # flag -> option


def method_options(name, cfg):
    """The options method `name` is built with: its defaults, nanoPETL's defaults for the named flags, then the
    recipe's, then what the user gave (only those it takes). `pvp`: only the checkpoint, whose module brings its
    own options."""
    takes = plumbing.options_of(METHODS[name])
    if name == "pvp":
        return dict(checkpoint=cfg.pvp_init)
    recipe = RECIPES.get(getattr(cfg, "recipe", None), {}).get("options", ({}, ""))[0].get(name, {})
    return {**takes, **{o: d for o, d in FLAGS.values() if o in takes}, **recipe,
            **plumbing.fit_options(plumbing.given_options(cfg, FLAGS), takes)}


def build(name, vit, num_classes, cfg):
    """The method `name` around `vit` (which it freezes and may wrap in place)."""
    return METHODS[name](vit, num_classes=num_classes, **method_options(name, cfg))

# -----------------------------------------------------------------------------
# the one training loop (pvp_pretrain.py uses it too)


def batches(split, task, device, batch, *, train, generator=None, rank=0, world=1, skip=0, state=None, drop_last=False,
            reprob=0.0):
    """Normalised image batches on `device`: augmented when training (task.train_aug), centre-cropped otherwise. Rank
    takes every world-th index of the order, padded to a multiple of world (as torch's DistributedSampler). skip,
    state: start at this rank's batch `skip`, `generator` in `state` (a resumed epoch). A data.Stream is read by its
    loader workers; a split of float features (the linear probe's) is batched as it is."""
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


def learning_rate(cfg, base, t, epoch, total, epochs):
    """The lr at step t of `total` (in epoch `epoch` of `epochs`): linear warmup over the first cfg.warmup of the
    schedule, then cosine down to cfg.min_lr. schedule "step" counts steps; "epoch" (VPT, src/solver/lr_scheduler.py)
    counts epochs, so epoch 0 runs at lr 0 and the cosine starts after warmup; "timm" (NOAH: timm's
    CosineLRScheduler) counts epochs and runs the cosine over all of them, the warmup laid over its start, on NOAH's
    clock: stepped after each epoch (supernet_train_prompt.py:414), so epoch e runs at the lr of e-1 (0 and 1 alike).
    warmup_lr None: the ramp starts at base/warmup steps (step) or 0 (epoch); else at warmup_lr."""
    pos, span = (t, total) if cfg.schedule == "step" else (max(epoch - (cfg.schedule == "timm"), 0), epochs)
    warm = int(cfg.warmup * span)
    if pos < warm:
        start = cfg.warmup_lr
        return base * (pos + (cfg.schedule == "step")) / warm if start is None else start + (base - start) * pos / warm
    t0 = 0 if cfg.schedule == "timm" else warm
    return cfg.min_lr + (base - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * (pos - t0) / max(1, span - t0)))


def mixer(cfg, num_classes):
    """MixUp and/or CutMix (soft targets), one of them per batch when both are on (NOAH: timm's, switch prob 0.5)."""
    if not (cfg.mixup or cfg.cutmix):
        return None
    from torchvision.transforms import v2  # here: its import costs over a second, and most runs mix nothing
    mixes = [m(alpha=a, num_classes=num_classes) for m, a in ((v2.MixUp, cfg.mixup), (v2.CutMix, cfg.cutmix)) if a > 0]
    return None if not mixes else mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)


def train(model, split, task, cfg, device, *, seed, lr=None, desc="train", start=None, opt_state=None, on_save=None,
          save_every=0, distributed=False):
    """AdamW or SGD with warmup then cosine (learning_rate); `epochs` passes capped at `max_steps` steps. The loss is
    cross-entropy with cfg.label_smoothing, on MixUp/CutMix soft targets when they are on (images only);
    cfg.drop_path turns on the frozen backbone's stochastic depth. Each epoch reseeds from (seed, epoch).
    on_save(position, opt) runs after every epoch and every `save_every` steps: resumed from it (start=position,
    opt_state), a run replays exactly. distributed=True (pvp_pretrain under torchrun): DDP over all ranks."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed and dist.is_initialized() else (0, 1)
    net = DDP(model) if world > 1 else torch.compile(model) if cfg.compile else model
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in params if p.ndim > 1], weight_decay=cfg.wd),
              dict(params=[p for p in params if p.ndim <= 1], weight_decay=0.0)]  # no decay on biases (VPT)
    lr = (lr or cfg.lr) * (cfg.batch / 256 if cfg.lr_scale else 1)  # the configured batch (VPT: tune_fgvc.py:31)
    opt = (torch.optim.AdamW(groups, lr=lr) if cfg.optimizer == "adamw" else
           torch.optim.SGD(groups, lr=lr, momentum=0.9))
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
    progress = data.Progress(split, world, rank)
    for epoch in range(start["epoch"] if start else 0, epochs):
        torch.manual_seed(seed * 100_003 + epoch)  # dropout draws
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)  # order and augmentation
        done, at = (start["batch"], start) if start and start["epoch"] == epoch and start["batch"] else (0, None)
        if at:  # resumed mid-epoch: the RNG as it was after batch `done`
            plumbing.set_rng_state(at["rng"], device)
        for x, y in progress.timed(batches(split, task, device, batch, train=True, generator=g, rank=rank, world=world,
                                           skip=done, state=at and at["generator"], drop_last=cfg.drop_last,
                                           reprob=cfg.reprob)):
            if t >= total:
                break
            for group in opt.param_groups:
                group["lr"] = learning_rate(cfg, lr, t, epoch, total, epochs)
            if mix and x.ndim == 4:
                x, y = mix(x, y)  # y: (B, classes) soft targets
            with plumbing.autocast(device, cfg.amp):
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
                on_save(dict(epoch=epoch, batch=done, step=t, generator=g.get_state(), rng=plumbing.rng_state(device)),
                        opt)
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

# -----------------------------------------------------------------------------
# evaluation, and the head's initialisation


@torch.inference_mode()
def evaluate(model, split, task, device, batch=256, compile=False, bf16=True):
    """Top-1 accuracy (%) of `model` on `split`, in eval mode, in bf16 on CUDA unless bf16=False (--eval-dtype)."""
    net = torch.compile(model.eval()) if compile else model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    for x, y in batches(split, task, device, batch, train=False):
        with plumbing.autocast(device, bf16):
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
    """zero: the head starts at 0. prototype: row c is the support set's mean normalised feature of class c,
    normalised (a nearest-class-mean classifier by dot product). trunc_normal: std 0.02, bias 0 (timm's, NOAH's).
    kaiming: Kaiming-normal (fan_out), bias -log(99), a 1% prior (VPT's MLP head)."""
    nn.init.zeros_(model.head.weight), nn.init.zeros_(model.head.bias)
    if how == "trunc_normal":
        nn.init.trunc_normal_(model.head.weight, std=0.02)
    if how == "kaiming":
        nn.init.kaiming_normal_(model.head.weight, a=0, mode="fan_out")
        nn.init.constant_(model.head.bias, -math.log(99))
    if how == "prototype":
        model.eval()
        feats = torch.cat([F.normalize(model.features(x).float(), dim=-1)
                           for x, _ in batches(split, task, device, 256, train=False)])
        means = torch.zeros_like(model.head.weight).index_add_(0, split.labels.to(device), feats)
        model.head.weight.copy_(F.normalize(means, dim=-1))


# -----------------------------------------------------------------------------
# one run: fit, evaluate, and --grid's search


def run_one(name, task, backbone, cfg, device, seed, test=True, masks=None):
    """Train method `name` on task.train (fit), then top-1 on val (and test): the record's numbers."""
    model, out = fit(name, task, backbone, cfg, device, seed, masks)
    top1 = functools.partial(evaluate, task=task, device=device, compile=cfg.compile, bf16=cfg.eval_dtype == "bf16")
    return out | dict(val_top1=top1(model, task.val)) | (dict(test_top1=top1(model, task.test)) if test else {})


def fit(name, task, backbone, cfg, device, seed, masks=None):
    """(the trained model, {trainable, config, ...}): a fresh copy of `backbone` wrapped by the method. `pvp` follows
    its module's recipe: pruning (E2VPT), merging (LoRA). masks: E2VPT's searched (token, segment) masks, set from the
    start, trained once (the official final runs)."""
    torch.manual_seed(seed)
    model = build(name, copy.deepcopy(backbone), task.num_classes, cfg).to(device)
    if masks is not None:
        model.token_mask.copy_(masks[0]), model.segment_mask.copy_(masks[1]), model.rewind(fresh=name != "pvp")
    lr = cfg.lr * LR_FACTOR.get(name, 1.0)
    init_head(model, task.train, task, device, cfg.head_init)
    out = dict(trainable=plumbing.count(p for p in model.parameters() if p.requires_grad), config=model.config)
    if type(model) is LinearProbe:  # the backbone is frozen and deterministic: its features once, then the head alone
        train(model.head, features(model, task.train, task, device), task, cfg, device, seed=seed, lr=lr,
              desc=f"{name} {task.name}")
    else:
        train(model, task.train, task, cfg, device, seed=seed, lr=lr, desc=f"{name} {task.name}")
    if prunes(model) and cfg.prune != "none" and model.config["num_prompts"] and masks is None:  # E2VPT Sec. 3.3
        model, out["pruned"], out["prune_grid"] = prune_and_retrain(name, model, task, cfg, device, seed, lr)
    if hasattr(model, "merge"):  # LoRA: fold B·A into the frozen weights, zero-overhead inference
        model.merge()
    return model.eval(), out


def prune_and_retrain(name, model, task, cfg, device, seed, lr):
    """(the retrained model, what it kept, the [token, segment, val] grid or None). --prune nanopetl: |grad| scores (a
    token by its segments'), --prune-tokens x --prune-segments, rewind to the start. official (ChengHan111/E2VPT
    src/engine/trainer.py:359-470): signed scores, the token mask's own, every pair of --prune-grid tried and the best
    on val kept, a fresh random rewind. A pvp module rewinds to its pre-trained values (a fresh draw drops PVP)."""
    official = cfg.prune == "official"
    scores = model.importance(batches(task.train, task, device, min(cfg.batch, len(task.train)), train=False),
                              signed=official, token_from="mask" if official else "segments")
    fractions = [float(f) for f in cfg.prune_grid.split(",")]
    pairs = [(a, b) for a in fractions for b in fractions] if official else [(cfg.prune_tokens, cfg.prune_segments)]
    best, grid = None, []
    for tokens, segments in pairs:
        m = copy.deepcopy(model) if len(pairs) > 1 else model
        kept = m.prune(tokens, segments, scores)
        if any(g[3:] == [kept["tokens"], kept["segments"]] for g in grid):
            continue  # the masks of a pair tried before (E2VPT: 72 of the 81 pairs differ)
        m.rewind(fresh=official and name != "pvp")
        init_head(m, task.train, task, device, cfg.head_init)
        train(m, task.train, task, cfg, device, seed=seed, lr=lr, desc=f"{name} {task.name} pruned {tokens}/{segments}")
        if len(pairs) > 1:  # chosen on val, never on test
            grid.append([tokens, segments, evaluate(m, task.val, task, device, bf16=cfg.eval_dtype == "bf16"),
                         kept["tokens"], kept["segments"]])
        if best is None or (grid[-1][2], -kept["tokens"]) > (best[2], -best[1]["tokens"]):  # ties: more pruned
            best = (m, dict(kept, fractions=[tokens, segments]), grid[-1][2] if grid else None)
    return best[0], best[1], grid or None


def prunes(model_or_class):  # E2VPT's hooks: train, score, prune, rewind, train again
    return all(hasattr(model_or_class, a) for a in ("importance", "prune", "rewind"))


def search(name, task, backbone, cfg, device, seed):
    """--grid: each lr x wd trained, scored on task.val at the last step (never test); the best kept, ties to the
    smaller lr (VPT). --prune official as E2VPT's tune_vtab_PruningRewind_CVK.py:555-625: lr x wd unpruned, then the
    pair grid at the choice (prune_and_retrain), whose masks each seed trains once. Returns (config, grid, masks)."""
    points = [(lr, wd) for lr in map(float, cfg.grid_lr.split(",")) for wd in map(float, cfg.grid_wd.split(","))]
    pairs = cfg.prune == "official" and prunes(METHODS[name]) and len(cfg.prune_grid.split(",")) ** 2
    n, plain, grid, t0 = len(points) + (pairs and 1 + pairs), dataclasses.replace(cfg, prune="none"), [], time.time()
    tqdm.write(f"--grid {name} on {task.name}: {len(points)} lr x wd trainings" + f", then 1 and at most {pairs} "
               "pair trainings (pairs of equal masks train once)" * bool(pairs) + ", then one per seed")
    for lr, wd in points:
        grid.append([lr, wd, run_one(name, task, backbone, dataclasses.replace(plain if pairs else cfg, lr=lr, wd=wd),
                                     device, seed, test=False)["val_top1"]])
        plumbing.estimate(len(grid), n, t0)
    lr, wd, _ = max(grid, key=lambda g: (g[2], -g[0]))
    chosen = dataclasses.replace(cfg, lr=lr, wd=wd)
    model, out = fit(name, task, backbone, chosen, device, seed) if pairs else (None, None)
    return chosen, grid, pairs and (model.token_mask, model.segment_mask, out["pruned"], out["prune_grid"]) or None


def search_task(cfg, task, shots, seed, backbone):
    """Where --grid trains and selects: VTAB-1k's train800 -> val200; any other task's support set -> its val."""
    if not task.name.startswith("vtab1k"):
        return task
    [search] = data.load_task(cfg.data, cfg.data_root, shots=shots, seed=seed, vtab_stage="search", norm=cfg.norm,
                              img_size=cfg.img_size or backbone.img_size, vtab_task=cfg.vtab_task)
    return search

# -----------------------------------------------------------------------------
# the sweep: every run's identity, the runs not done yet, one results line each


def protocol_of(name, options, cfg):
    """(what of the protocol trains run `name`, the registry entry whose code runs): pruning only for what prunes."""
    build = METHODS[options["method"]] if name == "pvp" else METHODS[name]
    return {k: getattr(cfg, k) for k in PROTOCOL if k not in PRUNING or prunes(build)}, build


def one(record, m, task, k, s, cfg, backbone, device, chosen):
    """Run `m` on `task` (k shots, seed s) into `record`: its numbers, or why it failed. --grid searches once per
    method, task and shots, on the first seed's support set, and every seed runs the choice."""
    try:
        run_cfg, masks = cfg, None
        if cfg.grid:
            if (m, task.name, k) not in chosen:
                chosen[m, task.name, k] = search(m, search_task(cfg, task, k, s, backbone), backbone, cfg, device, s)
            run_cfg, grid, masks = chosen[m, task.name, k]
            record |= dict(grid=grid, chosen=dict(lr=run_cfg.lr, wd=run_cfg.wd) | (masks and dict(
                pruned=masks[2], prune_grid=masks[3]) or {}))
        record |= run_one(m, task, backbone, run_cfg, device, s, masks=masks) | dict(status="ok")
    except Diverged as e:
        tqdm.write(f"failed: {m} on {task.name}, {k}-shot, seed {s}: {e}")
        record |= dict(status="failed", error=str(e))
    return record


def sweep(cfg, plan, methods, configs, module, backbone, backbone_name, device, rank, world):
    """Run every planned run not in --out's results.jsonl yet; append its line as it finishes. Sweeps on one --out split
    the runs (a claim each); --shard i/n and ranks take every n-th. Returns the planned keys."""
    out, backbone_params = Path(cfg.out), plumbing.count(backbone.parameters())
    backbone_hash = plumbing.weights_hash(backbone)
    results = out / "results.jsonl"
    done = plumbing.finished(results, warn=rank == 0)
    chosen, planned, n, said = {}, [], -1, set()  # --grid: (method, task, shots) -> (config, grid)
    shard, shards = map(int, (cfg.shard or "0/1").split("/"))  # --shard i/n: this job runs index % n == i
    total = len(plan) * len(methods) * (5 if cfg.data == "synthetic" else 1)
    bar = tqdm(total=total, desc="runs" if world == 1 else f"runs of rank {rank}", dynamic_ncols=True)
    for k, s in plan:
        tasks = data.load_task(cfg.data, cfg.data_root, shots=k, seed=s, img_size=cfg.img_size or backbone.img_size,
                               norm=cfg.norm, vtab_task=cfg.vtab_task, download=cfg.download, cache_gb=cfg.cache_gb,
                               workers=cfg.workers)
        for task in tasks:
            task.train_aug = cfg.aug or task.train_aug
            task.val, task.test = data.on_device(task.val, device), data.on_device(task.test, device)
            for m in methods:
                options = module if m == "pvp" else configs[m]
                identity = plumbing.run_identity(m, task, cfg, backbone_hash, options, device, *protocol_of(m, options,
                                                                                                             cfg))
                key, n = plumbing.run_key(identity), n + 1
                planned.append(key)
                if key in done or n % shards != shard or n // shards % world != rank:
                    bar.update()
                    continue
                lock = plumbing.claim(out, key)  # None: another sweep or shard on --out is training it
                if lock is None or key in (done := done | plumbing.finished(results)):
                    lock and lock.close()  # another sweep has it or did it
                    bar.update()
                    continue
                plumbing.say_why(key, identity, done, said)
                bar.set_description(f"{m} {task.name} {k or 'all'}-shot seed {s}")
                t0 = time.time()
                record = plumbing.record(key, m, identity, task, k, s, cfg, backbone_name, backbone_params, device)
                one(record, m, task, k, s, cfg, backbone, device, chosen)
                record["seconds"] = round(time.time() - t0, 2)
                plumbing.append(results, record)
                done[key] = record
                lock.close()
                bar.update()
    bar.close()
    return planned


def main(argv=None):
    cfg = parse(argv)
    methods, shots, seeds, configs = plumbing.check_sweep(cfg, METHODS, RECIPES, FLAGS, method_options)
    rank, world, device = plumbing.init_distributed(cfg.device)  # under torchrun each rank takes every world-th run
    backbone, backbone_name = plumbing.load_backbone(cfg.weights, cfg.arch, cfg.img_size)
    backbone_params, backbone_hash = plumbing.count(backbone.parameters()), plumbing.weights_hash(backbone)
    module = None
    if "pvp" in methods:  # its module, read and checked once before any run
        cfg = dataclasses.replace(cfg, pvp_init=str(cfg.pvp_init or plumbing.embedded_pvp(backbone, METHODS)))
        meta, tensors = plumbing.read_module(cfg.pvp_init, backbone, METHODS, sizes=(cfg, device))
        module = plumbing.module_identity(meta, tensors)
    print(f"nanoPETL few-shot: {', '.join(methods)} on {cfg.data} x shots {cfg.shots} x seeds {cfg.seeds}, "
          f"backbone {backbone_name} ({backbone_params:,} params, weights {backbone_hash}) on {device}"
          f"{' (torch.compile)' * cfg.compile}\nprotocol (recipe {cfg.recipe}): "
          f"{json.dumps({k: getattr(cfg, k) for k in PROTOCOL})}\noptions: " +
          "; ".join(f"{m} {json.dumps(module if m == 'pvp' else method_options(m, cfg))}" for m in methods))
    try:
        planned = sweep(cfg, [(k, s) for k in shots for s in seeds], methods, configs, module, backbone,
                        backbone_name, device, rank, world)
    except KeyboardInterrupt:
        plumbing.say(f"\ninterrupted: every finished run is in {Path(cfg.out) / 'results.jsonl'}; run the same "
                     "command again to go on")
        return 130
    if world > 1:  # rank 0 waits for every rank, then reads the merged file and writes the table once
        dist.barrier()
        if rank != 0:
            return 0
    plumbing.write_table(cfg, methods, planned, backbone_name, backbone_hash, backbone_params)
    return 0


if __name__ == "__main__":
    results = Path(parse().out) / "results.jsonl"  # for the messages below (a flag argparse cannot read exits here)
    plumbing.run_script(main, lambda: f"interrupted: every run finished so far is in {results}; run the same "
                        "command again to go on", lambda: f"The runs finished before it are kept in {results}")

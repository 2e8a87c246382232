"""
PVP: pre-train the PETuning module, then start few-shot tuning from it (Song et al., "PVP: Pre-trained Visual
Parameter-Efficient Tuning", arXiv 2304.13639). The paper's claim: VPT and LoRA do poorly with 1-2 images per class
because their modules start from random values; pre-training the modules on a large source task, backbone frozen,
fixes that. Stage 1 is this file (pretrain); stage 2 is fewshot.py --method pvp (fewshot.pvp builds the method from
the checkpoint, with a fresh head, and tunes it with the same recipe as a random start).

The paper publishes no code, and leaves open which module, source, objective and schedule it used. This file chooses:
  module       VPT-deep (the paper names VPT and LoRA); --method NAME pre-trains any method of fewshot.METHODS that
               has a module besides its head and keeps the backbone frozen (vpt-shallow, e2vpt, lora, or a new one)
  source       the embedded PVP source (192 classes, a stand-in for ImageNet-1k), or --data imagenet --data-root
  objective    supervised cross-entropy through a source head on the final-norm CLS token, backbone frozen, in eval
  schedule     AdamW, warmup + cosine over --epochs passes of --per-class images per class (fewshot.train's loop);
               the paper publishes no pre-training schedule. For --data imagenet the defaults are IMAGENET's, ours
  head         the source head is discarded: the checkpoint holds the module's tensors only
The checkpoint is a .safetensors file (loading it runs no code) whose header records the module type and options,
the backbone's name and weight hash (fewshot.py refuses a checkpoint made on another backbone), the source, the
recipe and the final source accuracy. <out>.resume is written after every epoch and every --save-every steps, so
--resume goes on exactly where a killed run stopped (mid-epoch and under torchrun too).
    python pvp_pretrain.py                            # -> checkpoints/pvp_vpt_vit_synthetic.safetensors
    python pvp_pretrain.py --method lora --rank 4     # any registered method, with its options (--opt NAME=VALUE)
    torchrun --nproc_per_node=8 pvp_pretrain.py --weights vit_b16_in21k --data imagenet --data-root /data/imagenet
fewshot.py runs the first command by itself when its file is missing. The embedded backbone is not PVP: it is built
by tools/build_backbone.py.
"""
import argparse
import contextlib
import io
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import data
import fewshot
import plumbing
import vit as vitlib
from plumbing import flag, like, need

PVP = dict(per_class=64, epochs=2, lr=5e-3, wd=1e-4, batch=128)  # ~25k image-steps: 2 epochs tie 3 on val
# --data imagenet (ImageNet-1k, 1.28M images). PVP's paper gives no schedule, so this is ours: 10 epochs (12.8M
# image-steps; ~1e18 FLOPs at ~74 GFLOPs per frozen-backbone VPT-deep step, under an hour on one 8-GPU node by
# docs/scale.md's estimate) with the embedded recipe's lr, wd and batch per rank, a checkpoint every 500 steps.
IMAGENET = dict(epochs=10, lr=5e-3, wd=1e-4, batch=128, save_every=500)
C = fewshot.Config


@dataclass
class Pretrain:
    method: str = flag("vpt", "the module to pre-train: a method of fewshot.METHODS with a module beside a frozen "
                              "backbone, e.g. vpt (default: deep), vpt-shallow, e2vpt, lora")
    opt: list = like(C, "opt", None, "an option of the method's constructor (repeat for more), as in fewshot.py")
    prompts: int = like(C, "prompts", None)
    kv_prompts: int = like(C, "kv_prompts", None)
    rank: int = like(C, "rank", None)
    weights: str = like(C, "weights", None)
    arch: str = like(C, "arch", "vit_base_patch16")
    data: str = flag(None, "source: synthetic (default), imagenet, or any fewshot.py dataset name")
    data_root: str = like(C, "data_root", None)
    norm: str = flag("imagenet", "normalisation for data from disk: imagenet or inception",
                     choices=tuple(fewshot.NORMS[1:]))
    per_class: int = flag(None, "embedded source: images per class drawn (default: 64)", ok=lambda v, c: v >= 1,
                          what="at least 1")
    epochs: int = like(C, "epochs", None, "passes over the source (default: 2; imagenet: 10)")
    max_steps: int = like(C, "max_steps", None, "stop after this many optimiser steps (the schedule spans them)")
    save_every: int = flag(None, "write <out>.resume every N steps too, not only after each epoch (default: 0; "
                                 "imagenet: 500)", ok=lambda v, c: v >= 0, what="at least 0")
    img_size: int = like(C, "img_size", None)
    workers: int = like(C, "workers", None)
    cache_gb: float = like(C, "cache_gb", None)
    lr: float = like(C, "lr", None, "learning rate (default: 5e-3)")
    wd: float = like(C, "wd", None, "weight decay (default: 1e-4)")
    batch: int = like(C, "batch", None, "batch size per process (default: 128)")
    warmup: float = like(C, "warmup", 0.05)
    optimizer: str = like(C, "optimizer", "adamw")
    seed: int = flag(0, "seed of the module's initialisation and of the data order",
                     ok=lambda v, c: 0 <= v <= plumbing.MAX_SEED, what=f"a whole number from 0 to {plumbing.MAX_SEED}")
    device: str = like(C, "device", "auto")
    amp: bool = like(C, "amp", False)
    out: str = flag(None, "checkpoint path (default: checkpoints/pvp_<method>_<backbone>.safetensors)")
    resume: bool = flag(False, "continue from <out>.resume, written after every epoch and every --save-every steps")

# -----------------------------------------------------------------------------
# pre-training the module, through fewshot.train


def source_task(args, img_size):
    """The source as a data.Task: the embedded PVP source drawn once (at 32 px, resized bilinearly to img_size as
    fewshot.py's embedded tasks are), or a dataset from disk (streamed past --cache-gb)."""
    if args.data == "synthetic":
        world = data.synthetic_source("pvp")
        train, val = world.split("train", args.per_class), world.split("val", 8)
        if img_size != 32:
            train, val = (data.Split(torch.nn.functional.interpolate(s.images.float(), size=img_size, mode="bilinear",
                          antialias=True).round().clamp(0, 255).byte(), s.labels) for s in (train, val))
        mean, std = data.NORMS["inception"]
        return data.Task(args.data, world.num_classes, train, val, val, img_size, mean, std, "none",
                         dict(source=world.name, per_class=args.per_class))
    [task] = data.load_task(args.data, args.data_root, img_size=img_size, norm=args.norm, cache_gb=args.cache_gb,
                            workers=args.workers)
    return task


def recipe(args, backbone_hash, config):
    """What makes the checkpoint: a resume file or a checkpoint built with another recipe is not this run's."""
    return json.loads(json.dumps(dict(  # as JSON gives it back: tuples are lists
        method=args.method, config=config, backbone_hash=backbone_hash, source=args.data,
        data_root=args.data_root and str(Path(args.data_root).resolve()),
        per_class=args.per_class if args.data.startswith("synthetic") else None,
        norm=args.norm, seed=args.seed, epochs=args.epochs, lr=args.lr, wd=args.wd, batch=args.batch,
        warmup=args.warmup, optimizer=args.optimizer, amp=args.amp, max_steps=args.max_steps, img_size=args.img_size,
        code=plumbing.code_of(fewshot.METHODS[args.method], files=(*plumbing.RUNS, "pvp_pretrain.py")))))


def pretrain(args, backbone, backbone_name):
    """Train the module of args.method on the source, `backbone` frozen; write the module checkpoint."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    device = plumbing.pick_device(args.device)
    task = source_task(args, args.img_size or backbone.img_size)
    backbone_hash = plumbing.weights_hash(backbone)  # before LoRA wraps its layers
    torch.manual_seed(args.seed)  # the module's initialisation
    model = fewshot.build(args.method, backbone, task.num_classes, args).to(device)
    wanted = recipe(args, backbone_hash, model.config)
    cfg = fewshot.Config(lr=args.lr, wd=args.wd, batch=args.batch, epochs=args.epochs, warmup=args.warmup,
                         optimizer=args.optimizer, amp=args.amp, max_steps=args.max_steps or 0)
    resume, start, opt_state = Path(str(args.out) + ".resume"), None, None
    if args.resume and resume.exists():
        tensors, opt_state, start = plumbing.read_resume(resume, wanted)
        plumbing.load_module_state_dict(model, tensors)
        print(f"resuming {args.out} at step {start['step']} (epoch {start['epoch'] + 1} of {args.epochs}, "
              f"{start['batch']} batches into it)")
    elif args.resume:
        print(f"no resume file at {resume}: starting {args.out} from scratch")

    def on_save(position, opt):
        if rank == 0:
            plumbing.write_resume(resume, plumbing.module_state_dict(model), opt, position, wanted)

    t0 = time.time()
    fewshot.train(model, task.train, task, cfg, device, seed=args.seed, desc=f"pre-training {Path(args.out).name}",
                  start=start, opt_state=opt_state, on_save=on_save, save_every=args.save_every, distributed=True)
    acc = fewshot.evaluate(model, task.val, task, device)
    if rank == 0:
        plumbing.save_module(model, args.out, dict(
            recipe=wanted, source=task.name, source_classes=task.num_classes, epochs=args.epochs,
            max_steps=args.max_steps, source_top1=acc, seed=args.seed, method=args.method, config=model.config,
            backbone=backbone_name, backbone_hash=backbone_hash))
        resume.unlink(missing_ok=True)
        print(f"wrote {args.out}: source val top-1 {acc:.2f}% after {args.epochs} epochs"
              f"{f' (at most {args.max_steps} steps)' * bool(args.max_steps)}, {time.time() - t0:.0f}s")
    return model


def built_meanwhile(path, before, args, backbone):
    """What another process wrote at `path` while we waited for the lock: "this recipe", "another recipe", or None."""
    try:
        now = path.stat()
    except FileNotFoundError:
        return None
    if before is not None and (now.st_ino, now.st_mtime_ns) == (before.st_ino, before.st_mtime_ns):
        return None  # the file we were asked to rebuild
    try:
        theirs = plumbing.header(path).get("recipe")
    except Exception:
        return None
    return "this recipe" if theirs == recipe(args, plumbing.weights_hash(backbone), config_of(args)) else \
        "another recipe"

# -----------------------------------------------------------------------------
# the command line


def parse(argv=None):
    """The flags, with what was left unset taken from PVP (or, for --data imagenet, IMAGENET)."""
    args = plumbing.parser(Pretrain, __doc__).parse_args(argv)
    args.given = set(vars(plumbing.parser(Pretrain, __doc__, given_only=True).parse_args(argv)))
    for k, v in {**PVP, "save_every": 0, **(IMAGENET if args.data == "imagenet" else {})}.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.data = args.data or "synthetic"
    return args


def check(args):
    """Refuse flags that cannot work before any time is spent: one UsageError naming the flag."""
    plumbing.check_flags(Pretrain(**{k: v for k, v in vars(args).items() if k != "given"}))
    if args.method not in fewshot.METHODS or args.method == "pvp":  # (listing the choices builds every method)
        raise plumbing.UsageError(f"--method {args.method}: not a method to pre-train; choose one of "
                                  f"{', '.join(pretrainable(args))}")
    need(args.data == "synthetic" or args.data in data.DATASETS[1:], f"unknown source --data {args.data}: choose "
         f"synthetic or one of {', '.join(data.DATASETS[1:])}")
    need(args.data_root is None or args.data != "synthetic", "--data-root is for a source on disk (--data imagenet, "
         "imagefolder, ...); the embedded --data synthetic has none: drop it")
    need(args.data == "synthetic" or "per_class" not in args.given, f"--per-class draws the embedded source; --data "
         f"{args.data} trains on every image of its train split: drop it")
    need(args.data == "synthetic" or (args.data_root and Path(args.data_root).is_dir()),
         f"--data {args.data} reads from disk: give an existing folder as --data-root")
    plumbing.check_backbone_flags(args)
    plumbing.check_device("--device", args.device, args.amp)
    plumbing.check_environment()
    config_of(args, check_module=True)
    need(args.out is None or not Path(args.out).is_dir(), f"--out {args.out} is a folder: give the checkpoint's file "
         f"name, e.g. {Path(args.out or '.') / 'pvp.safetensors'}")


def config_of(args, check_module=False):
    """The module's config as its constructor resolves it, from a weightless 'meta' build (no memory, no weights);
    check_module: refuse a method with no module besides its head, or one that trains the backbone."""
    with torch.device("meta"):
        skeleton = vitlib.PRESETS[plumbing.arch_of(args.weights, args.arch)](num_classes=0)
        frozen = list(skeleton.parameters())
        try:
            model = fewshot.build(args.method, skeleton, 2, args)
        except (TypeError, ValueError) as e:
            raise plumbing.UsageError(f"--method {args.method}: {vitlib.error_line(e)}; change the option") from None
    takes = plumbing.options_of(fewshot.METHODS[args.method])
    for k in plumbing.given_options(args, fewshot.FLAGS).keys() - takes.keys() if check_module else ():
        named = next((f"--{f.replace('_', '-')}" for f, (o, _) in fewshot.FLAGS.items() if o == k), None)
        need(named, f"--opt {k}: --method {args.method} does not take it; it takes {', '.join(takes) or 'no options'}")
        print(f"warning: {named} is ignored: --method {args.method} does not take {k}", file=sys.stderr)
    why = check_module and plumbing.not_beside_frozen(model, frozen)
    need(not why, f"--method {args.method}: PVP pre-trains a module beside a frozen backbone, and {args.method} {why}")
    if check_module:  # under torchrun each rank's step holds its share of --batch
        plumbing.check_size(args.method, model, max(1, args.batch // int(os.environ.get("WORLD_SIZE", "1"))),
                            args.img_size or skeleton.img_size, args.device, args.amp)
    return model.config


def pretrainable(args):
    """The registered methods PVP can pre-train: a module beside a frozen backbone (config_of's check)."""
    def ok(m):
        try:  # (quietly: a flag that method does not take is not this command's warning)
            with contextlib.redirect_stderr(io.StringIO()):
                return config_of(argparse.Namespace(**{**vars(args), "method": m, "opt": None}), check_module=True) or 1
        except plumbing.UsageError:
            return False
    return [m for m in fewshot.METHODS if m != "pvp" and ok(m)]


def main(argv=None):
    args = parse(argv)
    check(args)
    rank, world, device = plumbing.init_distributed(args.device)  # under torchrun: DDP, one device per rank
    args.device = str(device)
    backbone, name = plumbing.load_backbone(args.weights, args.arch, args.img_size)
    if args.out is None:  # e.g. checkpoints/pvp_vpt_vit_synthetic.safetensors, checkpoints/pvp_vpt_ViT-B_16.safetensors
        args.out = str(plumbing.CHECKPOINTS / f"pvp_{args.method}_{Path(name.split(':')[-1]).stem}") + ".safetensors"
    out = Path(args.out)
    plumbing.check_own(out, "method")
    plumbing.check_writable(out)
    before = out.stat() if out.exists() else None
    lock = plumbing.locked(out) if world == 1 else None  # under torchrun the launch is deliberate: every rank trains
    try:
        meanwhile = lock and built_meanwhile(out, before, args, backbone)
        need(meanwhile != "another recipe", f"{out} was written meanwhile by another process with another recipe: it "
             "is left as it is; give this command another --out")
        if meanwhile:
            print(f"{out} was built meanwhile by another process with this recipe: reusing it")
            return 0
        pretrain(args, backbone, name)
    except KeyboardInterrupt:
        resume = Path(str(args.out) + ".resume")
        print("\ninterrupted: " + (f"{resume} holds the last checkpoint; run the same command with --resume to go "
              "on" if resume.exists() else "no checkpoint had been written; run the same command again"),
              file=sys.stderr)
        return 130
    finally:
        plumbing.unlock(out, lock)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def kept():
    """What a failed write keeps, for the one-line error."""
    resume = Path(f"{parse(sys.argv[1:]).out}.resume")
    return (f"{resume} keeps the last checkpoint: fix it, then run the same command with --resume"
            if resume.exists() and parse(sys.argv[1:]).out else "No epoch had been saved")


if __name__ == "__main__":
    plumbing.run_script(main, lambda: "interrupted", kept)

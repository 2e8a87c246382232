"""
PVP: pre-train the PETuning module, then start few-shot tuning from it (Song et al., "PVP: Pre-trained Visual
Parameter-Efficient Tuning", arXiv 2304.13639). The paper's claim: VPT and LoRA do poorly with 1-2 images per class
because their modules start from random values; pre-training the modules on a large source task, backbone frozen,
fixes that.

The paper publishes no code, and leaves open which module, source, objective and schedule it used. This file chooses:
  module       VPT-deep (the paper names VPT and LoRA); --method NAME pre-trains any method of fewshot.METHODS that
               has a module besides its head and keeps the backbone frozen (vpt-shallow, e2vpt, lora, or a new one)
  source       the embedded PVP source (192 classes, a stand-in for ImageNet-1k), or --data imagenet --data-root
  objective    supervised cross-entropy through a source head on the final-norm CLS token, backbone frozen, in eval
  schedule     AdamW, warmup + cosine over --epochs passes of --per-class images per class (fewshot.train's loop);
               the paper publishes no pre-training schedule (epochs, lr, batch: unknown). For --data imagenet the
               defaults are IMAGENET's, a choice of ours: see there
  head         the source head is discarded: the checkpoint holds the module's tensors only; downstream starts a
               fresh head (fewshot.py --method pvp) and every module tensor stays trainable, same recipe as random init
The checkpoint is a .safetensors file (loading it runs no code) whose header records the module type and options,
the backbone's name and weight hash (fewshot.py refuses a checkpoint made on another backbone), the source, the
recipe and the final source accuracy. A resume file (<out>.resume) is written atomically after every epoch and every
--save-every steps, with the position in the epoch (batches done, the order's generator, the RNG): a kill loses at
most that many steps, and --resume goes on from there exactly as the uninterrupted run would have, mid-epoch and
under torchrun too. It records the recipe: --resume goes on only with the run that wrote it. A source on disk larger
than --cache-gb streams through DataLoader workers (--workers; data.Stream), in memory that does not grow with it.
Two processes building one --out take turns (a lock beside it): the second reuses what the first built when the
recipe is the same.

The embedded backbone (the stand-in for the ImageNet-21k ViT-B/16) is trained here too, from scratch, and shipped:
assets/vit_synthetic.safetensors was made by the first command below (its header records the command with every
recipe value, the source accuracy and the weight hash; assets/vit_synthetic.log is its log).
    python pvp_pretrain.py --backbone                 # -> checkpoints/vit_synthetic.safetensors, seeded (BACKBONE)
    python pvp_pretrain.py                            # -> checkpoints/pvp_vpt_vit_synthetic.safetensors
    python pvp_pretrain.py --method lora --rank 4     # any registered method, with its options (--opt NAME=VALUE)
    torchrun --nproc_per_node=8 pvp_pretrain.py --weights vit_b16_in21k --data imagenet --data-root /data/imagenet
    (the same) --max-steps 200 --save-every 50        # a first look: 200 steps, a checkpoint every 50
fewshot.py loads the shipped backbone (it runs the first command only if that file is gone) and runs the second by
itself (as a command) when its file is missing.
"""
import argparse
import fcntl
import json
import math
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

import data
import fewshot
import vit as vitlib

need = fewshot.need
BACKBONE = dict(per_class=1024, epochs=3, lr=1e-3, wd=0.05, batch=64)  # 1.18M image-steps: assets/vit_synthetic.*
BACKBONE_RECIPE = ("per_class", "epochs", "lr", "wd", "batch", "warmup", "optimizer", "seed")  # what its header records
PVP = dict(per_class=64, epochs=2, lr=5e-3, wd=1e-4, batch=128)  # ~25k image-steps: 2 epochs tie 3 on val (README)
# --data imagenet (ImageNet-1k, 1.28M images). PVP's paper gives no schedule, so this is ours, not yet run at this
# scale: 10 epochs (12.8M image-steps, 350x the embedded recipe's; ~1e18 FLOPs at ~74 GFLOPs per frozen-backbone
# VPT-deep step, under an hour on one 8-GPU node by the README's estimate) with the embedded recipe's lr, wd and
# batch per rank (x8 GPUs: 1,024 per step, ~1,250 steps per epoch), a checkpoint every 500 steps (a kill loses
# minutes), and its warmup of 5% (half an epoch). Check the choice on the source val top-1 it prints.
IMAGENET = dict(epochs=10, lr=5e-3, wd=1e-4, batch=128, save_every=500)

# -----------------------------------------------------------------------------
# pre-training: the backbone (embedded world only) and the modules, both through fewshot.train


def source_task(args, img_size):
    """The source as a data.Task: the embedded PVP (or backbone) source drawn once (at 32 px, resized bilinearly to
    img_size as fewshot.py's embedded tasks are), or a dataset from disk (streamed past --cache-gb)."""
    if args.data in ("synthetic", "synthetic-backbone"):
        world = data.synthetic_source("backbone" if args.data == "synthetic-backbone" else "pvp")
        train, val = world.split("train", args.per_class), world.split("val", 8)
        if img_size != 32:
            train, val = (data.Split(torch.nn.functional.interpolate(s.images.float(), size=img_size, mode="bilinear",
                          antialias=True).round().clamp(0, 255).byte(), s.labels) for s in (train, val))
        mean, std = data.NORMS["inception"]
        return data.Task(f"{args.data}", world.num_classes, train, val, val, img_size, mean, std, "none",
                         dict(source=world.name, per_class=args.per_class))
    [task] = data.load_task(args.data, args.data_root, img_size=img_size, norm=args.norm, cache_gb=args.cache_gb,
                            workers=args.workers)
    return task


def backbone_command(args):
    """The command that rebuilds this backbone, every recipe value spelled out (defaults may change; this may not)."""
    return "python pvp_pretrain.py --backbone " + " ".join(
        f"--{k.replace('_', '-')} {getattr(args, k):g}" if isinstance(getattr(args, k), float) else
        f"--{k.replace('_', '-')} {getattr(args, k)}" for k in BACKBONE_RECIPE)


def header(path):
    """The nanoPETL JSON header of a .safetensors file: a backbone's recipe, command, accuracy and weight hash."""
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        return json.loads((f.metadata() or {}).get("nanopetl", "{}"))


def recipe(args, backbone_hash, config):
    """What makes the checkpoint: a resume file or a checkpoint built with another recipe is not this run's."""
    return json.loads(json.dumps(dict(  # as JSON gives it back: tuples are lists
        method="backbone" if args.backbone else args.method, config=config, backbone_hash=backbone_hash,
        source=args.data, data_root=args.data_root and str(Path(args.data_root).resolve()),
        per_class=args.per_class if args.data.startswith("synthetic") else None,
        norm=args.norm, seed=args.seed, epochs=args.epochs, lr=args.lr, wd=args.wd, batch=args.batch,
        warmup=args.warmup, optimizer=args.optimizer, amp=args.amp, max_steps=args.max_steps, img_size=args.img_size)))


def read_resume(path, wanted):
    """(model tensors, optimizer state, position) from <out>.resume, refused unless it records this recipe. The
    position is fewshot.train's (epoch, batch, step, and mid-epoch the generator and RNG states)."""
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


def pretrain(args, backbone=None, backbone_name="vit_synthetic"):
    """Train a module (or, with args.backbone, the embedded ViT itself) on the source; write the checkpoint."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    device = fewshot.pick_device(args.device)
    task = source_task(args, args.img_size or (backbone.img_size if backbone is not None else 32))
    backbone_hash = fewshot.weights_hash(backbone) if backbone is not None else None  # before LoRA wraps its layers
    torch.manual_seed(args.seed)  # the module's (or backbone's) initialisation
    if args.backbone:
        model = vitlib.vit_synthetic(num_classes=task.num_classes)
    else:
        model = fewshot.build(args.method, backbone, task.num_classes, args)
    model.to(device)
    wanted = recipe(args, backbone_hash, getattr(model, "config", None))
    cfg = fewshot.Config(lr=args.lr, wd=args.wd, batch=args.batch, epochs=args.epochs, warmup=args.warmup,
                         optimizer=args.optimizer, amp=args.amp, max_steps=args.max_steps or 0)
    resume, start, opt_state = Path(str(args.out) + ".resume"), None, None
    if args.resume and resume.exists():
        tensors, opt_state, start = read_resume(resume, wanted)
        model.load_state_dict(tensors) if args.backbone else model.load_module_state_dict(tensors)
        print(f"resuming {args.out} at step {start['step']} (epoch {start['epoch'] + 1} of {args.epochs}, "
              f"{start['batch']} batches into it)")
    elif args.resume:
        print(f"no resume file at {resume}: starting {args.out} from scratch")

    def on_save(position, opt):
        if rank == 0:
            tensors = model.state_dict() if args.backbone else model.module_state_dict()
            state = dict(model=tensors, optimizer=opt.state_dict(), position=position, recipe=json.dumps(wanted))
            fewshot.atomic(lambda p: torch.save(state, p), resume)

    t0 = time.time()
    fewshot.train(model, task.train, task, cfg, device, seed=args.seed, desc=f"pre-training {Path(args.out).name}",
                  start=start, opt_state=opt_state, on_save=on_save, save_every=args.save_every, distributed=True)
    acc = fewshot.evaluate(model, task.val, task, device)
    if rank == 0:
        meta = dict(recipe=wanted, source=task.name, source_classes=task.num_classes, epochs=args.epochs,
                    max_steps=args.max_steps, source_top1=acc, seed=args.seed)
        if args.backbone:  # the header tells its whole story: the command that rebuilds it, its accuracy, its hash
            sd = {k: v.contiguous() for k, v in model.cpu().state_dict().items()}
            meta |= dict(preset="vit_synthetic", source=task.meta, source_top1=round(acc, 2), command=backbone_command(
                args), weights_hash=fewshot.weights_hash(model), recipe={k: getattr(args, k) for k in BACKBONE_RECIPE},
                seconds=round(time.time() - t0), torch=torch.__version__, device=str(device))
            fewshot.atomic(lambda p: save_file(sd, p, metadata={"nanopetl": json.dumps(meta)}), args.out)
        else:
            fewshot.save_module(model, args.out, meta | dict(method=args.method, config=model.config,
                                                             backbone=backbone_name, backbone_hash=backbone_hash))
        resume.unlink(missing_ok=True)
        print(f"wrote {args.out}: source val top-1 {acc:.2f}% after {args.epochs} epochs"
              f"{f' (at most {args.max_steps} steps)' * bool(args.max_steps)}, {time.time() - t0:.0f}s")
    return model

# -----------------------------------------------------------------------------
# one builder per --out: a lock beside it, and reuse of what another process built meanwhile


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


def built_meanwhile(path, before, args, backbone):
    """True when another process wrote `path` while we waited for the lock, with the recipe we would use."""
    try:
        now = path.stat()
    except FileNotFoundError:
        return False
    if before is not None and (now.st_ino, now.st_mtime_ns) == (before.st_ino, before.st_mtime_ns):
        return False  # the file we were asked to rebuild
    try:
        theirs = header(path).get("recipe")
    except Exception:
        return False
    if args.backbone:  # a backbone's header records its recipe values (BACKBONE_RECIPE)
        return theirs == {k: getattr(args, k) for k in BACKBONE_RECIPE}
    return theirs == recipe(args, fewshot.weights_hash(backbone) if backbone is not None else None, config_of(args))

# -----------------------------------------------------------------------------
# the command line


def parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", action="store_true", help="train the embedded backbone from scratch instead of a module")
    ap.add_argument("--method", default="vpt", help="the module to pre-train: a method of fewshot.METHODS with a "
                                                    "module beside a frozen backbone, e.g. vpt (default: deep), "
                                                    "vpt-shallow, e2vpt, lora")
    ap.add_argument("--opt", action="append", metavar="NAME=VALUE", help="an option of the method's constructor "
                                                                         "(repeat for more), as in fewshot.py")
    ap.add_argument("--prompts", type=int, default=None, help="prompt tokens per layer (vpt, e2vpt; default 10)")
    ap.add_argument("--kv-prompts", type=int, default=None, help="E2VPT key-value prompts per layer (default 5)")
    ap.add_argument("--rank", type=int, default=None, help="LoRA rank (default 8)")
    ap.add_argument("--weights", default=None, help="backbone: a vit.PRETRAINED name or a path (default: the embedded one)")
    ap.add_argument("--arch", default="vit_base_patch16", choices=list(vitlib.PRESETS), help="preset for --weights")
    ap.add_argument("--data", default=None, help="source: synthetic (default), imagenet, or any fewshot.py dataset name")
    ap.add_argument("--data-root", default=None, help="where --data lies on disk")
    ap.add_argument("--norm", default="imagenet", help="normalisation for data from disk: imagenet or inception")
    ap.add_argument("--per-class", type=int, default=None, help="embedded source: images per class drawn")
    ap.add_argument("--epochs", type=int, default=None, help="passes over the source (default: 2; imagenet: 10)")
    ap.add_argument("--max-steps", type=int, default=None, help="stop after this many optimiser steps (the schedule "
                                                               "spans them); default: no cap")
    ap.add_argument("--save-every", type=int, default=None, help="write <out>.resume every N steps too, not only after "
                                                                "each epoch (default: 0, epochs only; imagenet: 500)")
    ap.add_argument("--img-size", type=int, default=None, help="input side (default: the backbone's), as in fewshot.py")
    ap.add_argument("--workers", type=int, default=None, help="loader processes per rank for a source streamed from "
                                                             "disk (default: its CPUs - 1, at most 8)")
    ap.add_argument("--cache-gb", type=float, default=None, help="GB of decoded source images kept in memory; a "
                                                                 "larger split streams (default: NANOPETL_MAX_GB, 8)")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--wd", type=float, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--warmup", type=float, default=0.05, help="fraction of steps of linear warmup")
    ap.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:<n> or mps")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
    ap.add_argument("--out", default=None, help="checkpoint path (default: checkpoints/pvp_<method>_<backbone>.safetensors)")
    ap.add_argument("--resume", action="store_true", help="continue from <out>.resume, written after every epoch and "
                                                         "every --save-every steps")
    return ap


def parse(argv):
    """The flags, with what was left unset taken from BACKBONE or PVP."""
    args = parser().parse_args(argv)
    args.given = {k for k, v in vars(args).items() if v is not None}  # what the command line set
    for k, v in {**(BACKBONE if args.backbone else PVP), "save_every": 0,
                 **(IMAGENET if args.data == "imagenet" else {})}.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.data = args.data or ("synthetic-backbone" if args.backbone else "synthetic")
    return args


def check(args):
    """Refuse flags that cannot work before any time is spent: one fewshot.UsageError naming the flag."""
    need(not (args.backbone and args.weights), "--backbone trains the embedded ViT from scratch; it takes no --weights")
    need(not (args.backbone and args.img_size), "--backbone trains the embedded ViT at 32 px; --img-size is for "
         "pre-training a module on a backbone: drop it")
    need(args.method in fewshot.METHODS and args.method != "pvp", f"--method {args.method}: not a method to pre-train;"
         f" choose one of {', '.join(pretrainable(args))}")
    for flag in ("epochs", "batch", "per_class"):
        need(getattr(args, flag) >= 1, f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    for flag, low in (("max_steps", 1), ("save_every", 0), ("workers", 0), ("cache_gb", 0), ("img_size", 1)):
        need(getattr(args, flag) is None or getattr(args, flag) >= low, f"--{flag.replace('_', '-')} must be at least "
             f"{low}, got {getattr(args, flag)}")
    for flag, low in (("prompts", 1), ("rank", 1), ("kv_prompts", 0)):
        need(getattr(args, flag) is None or getattr(args, flag) >= low,
             f"--{flag.replace('_', '-')} must be at least {low}, got {getattr(args, flag)}")
    arch = "vit_synthetic" if args.weights is None else vitlib.PRETRAINED.get(args.weights, {}).get("preset", args.arch)
    patch = getattr(vitlib.PRESETS[arch], "keywords", {}).get("patch_size") or 1
    need(not args.img_size or args.img_size % patch == 0, f"--img-size {args.img_size} must be a multiple of {patch}, "
         f"the patch size of {arch}")
    need(0 < args.lr <= 1e4, f"--lr must be a positive number, at most 10000, got {args.lr}")
    need(args.wd >= 0 and math.isfinite(args.wd), f"--wd must be a number >= 0, got {args.wd}")
    need(0 <= args.warmup <= 1, f"--warmup must be a fraction in [0, 1], got {args.warmup}")
    need(0 <= args.seed <= fewshot.MAX_SEED, f"--seed must be a whole number from 0 to {fewshot.MAX_SEED}, got {args.seed}")
    need(args.norm in data.NORMS, f"--norm {args.norm}: choose one of {', '.join(data.NORMS)}")
    need(args.data in ("synthetic", "synthetic-backbone") or args.data in data.DATASETS[1:], f"unknown source --data "
         f"{args.data}: choose synthetic or one of {', '.join(data.DATASETS[1:])}")
    need(args.data_root is None or not args.data.startswith("synthetic"), f"--data-root is for a source on disk "
         f"(--data imagenet, imagefolder, ...); the embedded --data {args.data} has none: drop it")
    need(args.data.startswith("synthetic") or "per_class" not in args.given, f"--per-class draws the embedded "
         f"source; --data {args.data} trains on every image of its train split: drop it")
    need(args.data.startswith("synthetic") or (args.data_root and Path(args.data_root).is_dir()),
         f"--data {args.data} reads from disk: give an existing folder as --data-root")
    need(args.weights is None or args.weights in vitlib.PRETRAINED or Path(args.weights).is_file(),
         f"--weights: no checkpoint file at {args.weights}, and not one of the named weights "
         f"{', '.join(vitlib.PRETRAINED)}")
    device = fewshot.check_device("--device", args.device)
    need(not args.amp or device.type == "cuda", f"--amp is bf16 autocast on CUDA, and this run is on {device.type}: "
         "drop --amp")
    fewshot.check_environment()
    if not args.backbone:  # the options, and whether the method has a module to pre-train at all
        config_of(args, check_module=True)
    need(args.out is None or not Path(args.out).is_dir(), f"--out {args.out} is a folder: give the checkpoint's file "
         f"name, e.g. {Path(args.out or '.') / 'pvp.safetensors'}")


def config_of(args, check_module=False):
    """The module's config as its constructor resolves it, from a weightless 'meta' build (no memory, no weights);
    check_module: refuse a method with no module besides its head, or one that trains the backbone."""
    arch = "vit_synthetic" if args.weights is None else vitlib.PRETRAINED.get(args.weights, {}).get("preset", args.arch)
    with torch.device("meta"):
        skeleton = vitlib.PRESETS[arch](num_classes=0)
        frozen = list(skeleton.parameters())
        try:
            model = fewshot.build(args.method, skeleton, 2, args)
        except (TypeError, ValueError) as e:
            raise fewshot.UsageError(f"--method {args.method}: {e}; change the option") from None
    takes = fewshot.options_of(fewshot.METHODS[args.method])
    for k in fewshot.given_options(args).keys() - takes.keys() if check_module else ():
        flag = next((f"--{f.replace('_', '-')}" for f, (o, _) in fewshot.FLAGS.items() if o == k), None)
        need(flag, f"--opt {k}: --method {args.method} does not take it; it takes {', '.join(takes) or 'no options'}")
        print(f"warning: {flag} is ignored: --method {args.method} does not take {k}", file=sys.stderr)
    own = [n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")]
    need(not check_module or (own and not any(p.requires_grad for p in frozen)), f"--method {args.method}: PVP "
         f"pre-trains a module beside a frozen backbone, and {args.method} " +
         ("trains the backbone" if own else "has only a head"))
    return model.config


def pretrainable(args):
    """The registered methods PVP can pre-train: a module beside a frozen backbone (config_of's check)."""
    def ok(m):
        try:
            return config_of(argparse.Namespace(**{**vars(args), "method": m, "opt": None}), check_module=True) or True
        except fewshot.UsageError:
            return False
    return [m for m in fewshot.METHODS if m != "pvp" and ok(m)]


def check_writable(out):
    """--out's folder exists (made if needed) and takes a file: found before training, not after."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.", suffix=".write-test"):
            pass  # a name of its own: ranks under torchrun check at once
    except OSError as e:
        raise fewshot.UsageError(f"--out {out}: cannot write in {out.parent} ({e.strerror or e}): give a path in a "
                                 "folder you can write to") from None


def main(argv=None):
    args = parse(argv)
    check(args)
    rank, world, device = fewshot.init_distributed(args.device)  # under torchrun: DDP, one device per rank
    args.device = str(device)
    backbone, name = (None, None) if args.backbone else fewshot.load_backbone(args.weights, args.arch,
                                                                                        args.img_size)
    if args.out is None:  # checkpoints/vit_synthetic.safetensors, or e.g. checkpoints/pvp_vpt_ViT-B_16.safetensors
        stem = "vit_synthetic" if args.backbone else f"pvp_{args.method}_{Path(name.split(':')[-1]).stem}"
        args.out = str(fewshot.CHECKPOINTS / stem) + ".safetensors"
    out = Path(args.out)
    check_writable(out)
    before = out.stat() if out.exists() else None
    lock = locked(out) if world == 1 else None  # under torchrun the launch is deliberate: every rank trains
    try:
        if lock and built_meanwhile(out, before, args, backbone):
            print(f"{out} was built meanwhile by another process with this recipe: reusing it")
            return 0
        pretrain(args, backbone, name)
    except KeyboardInterrupt:
        resume = Path(str(args.out) + ".resume")
        print("\ninterrupted: " + (f"{resume} holds the last checkpoint; run the same command with --resume to go "
              "on" if resume.exists() else "no checkpoint had been written; run the same command again"), file=sys.stderr)
        return 130
    finally:
        if lock:
            Path(str(out) + ".lock").unlink(missing_ok=True)  # while held: a waiter sees it gone and takes a new one
            lock.close()
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    fewshot.terminate_as_interrupt()
    try:
        sys.exit(main())
    except (fewshot.UsageError, data.DataError, vitlib.CheckpointError) as e:
        fewshot.fail(f"error: {e}")
    except OSError as e:  # a full disk or a folder we may not write, while saving the checkpoint or its resume file
        out = parse(sys.argv[1:]).out
        resume = Path(f"{out}.resume") if out else None
        fewshot.fail(fewshot.os_error_line(e, f"{resume} keeps the last checkpoint: fix it, then run the same "
                                              "command with --resume" if resume and resume.exists() else
                                              "No epoch had been saved"))

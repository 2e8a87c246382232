"""
PVP: pre-train the PETuning module, then start few-shot tuning from it (Song et al., "PVP: Pre-trained Visual
Parameter-Efficient Tuning", arXiv 2304.13639). The paper's claim: VPT and LoRA do poorly with 1-2 images per class because their modules start
from random values; pre-training the modules on a large source task, backbone frozen, fixes that.

What the paper leaves open (no code is public; methods.md 5) and what this file chooses:
  module       VPT-deep (the paper names VPT and LoRA); --method e2vpt or lora to pre-train those instead
  source       the embedded PVP source (192 classes, a stand-in for ImageNet-1k), or --data imagenet --data-root
  objective    supervised cross-entropy through a source head on the final-norm CLS token, backbone frozen, in eval
  schedule     AdamW, warmup + cosine over --epochs passes of --per-class images per class (same loop as fewshot.py)
  head         the source head is discarded: the checkpoint holds the module's tensors only; downstream starts a
               fresh head (fewshot.py --method pvp) and every module tensor stays trainable, same recipe as random init
The checkpoint is a .safetensors file (loading it runs no code) whose header records the module type and config,
the backbone's name and weight hash (fewshot.py refuses a checkpoint made on another backbone), the source, the
epochs and the final source accuracy. A resume file is written atomically after every epoch: --resume goes on.

The embedded backbone (the stand-in for the ImageNet-21k ViT-B/16) is trained here too, from scratch, and shipped:
assets/vit_synthetic.safetensors was made by the first command below (its header records the command with every
recipe value, the source accuracy and the weight hash; assets/vit_synthetic.log is its log).
    python pvp_pretrain.py --backbone                 # -> checkpoints/vit_synthetic.safetensors, seeded (BACKBONE)
    python pvp_pretrain.py                            # -> checkpoints/pvp_vpt_vit_synthetic.safetensors
    torchrun --nproc_per_node=8 pvp_pretrain.py --weights vit_b16_in21k --data imagenet --data-root /data/imagenet
fewshot.py loads the shipped backbone (it builds one only if that file is gone) and runs the second command by
itself when its file is missing.
"""
import argparse
import hashlib
import json
import math
import os
import pickle
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, safe_open, save_file

import data
import e2vpt
import fewshot
import lora
import vit as vitlib
import vpt

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"  # git-ignored
SHIPPED = Path(__file__).resolve().parent / "assets" / "vit_synthetic.safetensors"  # the embedded backbone, in git
MODULES = {"vpt": vpt.VPT, "vpt-shallow": vpt.VPT, "e2vpt": e2vpt.E2VPT, "lora": lora.LoRA}
BACKBONE = dict(per_class=512, epochs=2, lr=1e-3, wd=0.05, batch=64)  # 393k image-steps: assets/vit_synthetic.*
BACKBONE_RECIPE = ("per_class", "epochs", "lr", "wd", "batch", "warmup", "optimizer", "seed")  # what its header records
BACKBONE_MINUTES = "about 25 minutes"  # 1,519 s with other jobs on the cores (assets/vit_synthetic.log)
PVP = dict(per_class=64, epochs=3, lr=5e-3, wd=1e-4, batch=128)  # ~37k image-steps

# -----------------------------------------------------------------------------
# module checkpoints: .safetensors with a JSON header, written atomically


def atomic(write, path):
    """write(tmp) then rename: a kill leaves the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def weights_hash(model):
    """A short fingerprint of a backbone's weights, head excluded: a module checkpoint records it."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        if not k.startswith("head."):
            h.update(k.encode()), h.update(v.detach().cpu().float().numpy().tobytes())
    return h.hexdigest()[:16]


def save_module(model, path, meta):
    tensors = {k: v.contiguous() for k, v in model.module_state_dict(head=False).items()}
    atomic(lambda p: save_file(tensors, p, metadata={"nanopetl": json.dumps(meta)}), path)


def read_module(path, backbone):
    """(meta, tensors) of a module checkpoint, refused unless it was made on this very backbone."""
    path = Path(path)
    try:
        with safe_open(path, "pt") as f:
            meta = json.loads((f.metadata() or {}).get("nanopetl", "null"))
        tensors = load_file(path)
    except Exception as e:  # safetensors reports truncation and foreign files in several exception types
        raise vitlib.CheckpointError(f"{path}: not a readable module checkpoint ({e}); make one with "
                                     "python pvp_pretrain.py") from None
    if not meta or meta.get("method") not in MODULES:
        raise vitlib.CheckpointError(f"{path}: a .safetensors file without nanoPETL's module header (a backbone? "
                                     "that goes to --weights); make a module checkpoint with python pvp_pretrain.py "
                                     "--weights <the backbone>")
    if meta["backbone_hash"] != weights_hash(backbone):
        raise vitlib.CheckpointError(
            f"{path} was pre-trained on backbone {meta['backbone']} (weights {meta['backbone_hash']}), not on this one "
            f"(weights {weights_hash(backbone)}): pre-train it on this backbone with pvp_pretrain.py --weights")
    return meta, tensors


def load_module(path, backbone, num_classes):
    """The pre-trained module on `backbone`, with a fresh head of num_classes."""
    meta, tensors = read_module(path, backbone)
    model = MODULES[meta["method"]](backbone, num_classes=num_classes, **meta["config"])
    model.load_module_state_dict(tensors, head=False)
    return model

# -----------------------------------------------------------------------------
# pre-training: the backbone (embedded world only) and the modules, both through fewshot.train


def source_task(args, img_size):
    """The source as a data.Task: the embedded PVP (or backbone) source drawn once, or a dataset from disk."""
    if args.data in ("synthetic", "synthetic-backbone"):
        world = data.synthetic_source("backbone" if args.data == "synthetic-backbone" else "pvp")
        train, val = world.split("train", args.per_class), world.split("val", 8)
        mean, std = data.NORMS["inception"]
        return data.Task(f"{args.data}", world.num_classes, train, val, val, 32, mean, std, "none",
                         dict(source=world.name, per_class=args.per_class))
    [task] = data.load_task(args.data, args.data_root, img_size=img_size, norm=args.norm)
    return task


def pretrain(args, backbone=None, backbone_name="vit_synthetic"):
    """Train a module (or, with args.backbone, the embedded ViT itself) on the source; write the checkpoint."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    device = fewshot.pick_device(args.device)
    task = source_task(args, backbone.img_size if backbone is not None else 32)
    backbone_hash = weights_hash(backbone) if backbone is not None else None  # before LoRA wraps its layers
    torch.manual_seed(args.seed)  # the module's (or backbone's) initialisation
    if args.backbone:
        model = vitlib.vit_synthetic(num_classes=task.num_classes)
    else:
        model = MODULES[args.method](backbone, num_classes=task.num_classes, **module_config(args))
    model.to(device)
    cfg = fewshot.Config(lr=args.lr, wd=args.wd, batch=args.batch, epochs=args.epochs, warmup=args.warmup,
                         optimizer=args.optimizer, amp=args.amp, max_steps=0)
    resume, start, opt_state = Path(str(args.out) + ".resume"), 0, None
    if args.resume and resume.exists():
        try:
            state = torch.load(resume, map_location="cpu", weights_only=True)
            model.load_state_dict(state["model"]) if args.backbone else model.load_module_state_dict(state["model"])
            start, opt_state = state["epoch"] + 1, state["optimizer"]
        except (pickle.UnpicklingError, RuntimeError, ValueError, KeyError, TypeError, EOFError) as e:
            why = ("Pickled objects are refused, since loading them can run code" if isinstance(e, pickle.UnpicklingError)
                   else "Written by another run (another --method, --prompts, --rank or backbone), or damaged")
            raise vitlib.CheckpointError(f"{resume}: not the resume file of this run ({vitlib.error_line(e)}). {why}: "
                                         "delete it to start over, or re-run with the flags that wrote it") from None
        print(f"resuming {args.out} after epoch {start} of {args.epochs}")

    def on_epoch(epoch, opt):
        if rank == 0:
            tensors = model.state_dict() if args.backbone else model.module_state_dict()
            atomic(lambda p: torch.save(dict(model=tensors, optimizer=opt.state_dict(), epoch=epoch), p), resume)

    t0 = time.time()
    fewshot.train(model, task.train, task, cfg, device, seed=args.seed, desc=f"pre-training {Path(args.out).name}",
                  start_epoch=start, opt_state=opt_state, on_epoch=on_epoch, distributed=True)
    acc = fewshot.evaluate(model, task.val, task, device)
    if rank == 0:
        if args.backbone:  # the header tells its whole story: the command that rebuilds it, its accuracy, its hash
            sd = {k: v.contiguous() for k, v in model.cpu().state_dict().items()}
            meta = dict(preset="vit_synthetic", source=task.meta, epochs=args.epochs, source_top1=round(acc, 2),
                        weights_hash=weights_hash(model), command=backbone_command(args),
                        recipe={k: getattr(args, k) for k in BACKBONE_RECIPE}, seconds=round(time.time() - t0),
                        torch=torch.__version__, device=str(device))
            atomic(lambda p: save_file(sd, p, metadata={"nanopetl": json.dumps(meta)}), args.out)
        else:
            save_module(model, args.out, dict(
                method=args.method, config=model.config, backbone=backbone_name,
                backbone_hash=backbone_hash, source=task.name, source_classes=task.num_classes,
                epochs=args.epochs, source_top1=acc, seed=args.seed))
        resume.unlink(missing_ok=True)
        print(f"wrote {args.out}: source val top-1 {acc:.2f}% after {args.epochs} epochs, {time.time() - t0:.0f}s")
    return model


def module_config(args):
    """The constructor arguments of args.method from the flags."""
    if args.method == "e2vpt":
        return dict(num_prompts=args.prompts, num_kv_prompts=args.kv_prompts)
    if args.method == "lora":
        return dict(rank=args.rank, alpha=args.rank)
    return dict(num_prompts=args.prompts, deep=args.method == "vpt")

# -----------------------------------------------------------------------------
# what fewshot.py calls when the embedded pieces are missing


def backbone_header(path):
    """The JSON header of an embedded backbone file (its recipe, command, source accuracy and weight hash)."""
    with safe_open(path, "pt") as f:
        return json.loads((f.metadata() or {}).get("nanopetl", "{}"))


def backbone_command(args):
    """The command that rebuilds this backbone, every recipe value spelled out (defaults may change; this may not)."""
    return "python pvp_pretrain.py --backbone " + " ".join(
        f"--{k.replace('_', '-')} {getattr(args, k):g}" if isinstance(getattr(args, k), float) else
        f"--{k.replace('_', '-')} {getattr(args, k)}" for k in BACKBONE_RECIPE)


def embedded_backbone():
    """The shipped embedded backbone (SHIPPED, checked against the weight hash in its header); if that file is gone,
    one built here by `pvp_pretrain.py --backbone` and cached under checkpoints/."""
    path = SHIPPED if SHIPPED.exists() else CHECKPOINTS / "vit_synthetic.safetensors"
    if not path.exists():
        print(f"{SHIPPED} is missing (git checkout -- {SHIPPED.relative_to(SHIPPED.parents[1])} restores it): building "
              f"the embedded backbone once with its recipe, {BACKBONE_MINUTES} on a 2-core CPU; cached at {path}")
        pretrain(parse(["--backbone", "--out", str(path)]))
    model = vitlib.load_pretrained(vitlib.vit_synthetic(num_classes=0), path, verbose=False).eval()
    recorded = backbone_header(path).get("weights_hash")
    if recorded and recorded != weights_hash(model):
        raise vitlib.CheckpointError(f"{path}: its weights hash to {weights_hash(model)}, not to the {recorded} its "
                                     "header records (damaged?): restore it (git checkout) or rebuild it with "
                                     "python pvp_pretrain.py --backbone")
    return model


def embedded_pvp(backbone):
    path = CHECKPOINTS / "pvp_vpt_vit_synthetic.safetensors"
    stale = path.exists() and json.loads(safe_open(path, "pt").metadata()["nanopetl"])["backbone_hash"] != weights_hash(backbone)
    if not path.exists() or stale:
        print(f"building the embedded PVP prompts once{' (the backbone changed)' if stale else ''}: VPT-deep pre-trained on "
              f"the synthetic PVP source (about 1-2 minutes on a 2-core CPU); cached at {path}")
        pretrain(parse(["--out", str(path)]), backbone)
    return path


def parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", action="store_true", help="train the embedded backbone from scratch instead of a module")
    ap.add_argument("--method", default="vpt", choices=list(MODULES), help="the module to pre-train (default: vpt, deep)")
    ap.add_argument("--prompts", type=int, default=10, help="prompt tokens per layer (vpt, e2vpt)")
    ap.add_argument("--kv-prompts", type=int, default=5, help="E2VPT key-value prompts per layer")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank")
    ap.add_argument("--weights", default=None, help="backbone: a vit.PRETRAINED name or a path (default: the embedded one)")
    ap.add_argument("--arch", default="vit_base_patch16", choices=list(vitlib.PRESETS), help="preset for --weights")
    ap.add_argument("--data", default=None, help="source: synthetic (default), imagenet, or any fewshot.py dataset name")
    ap.add_argument("--data-root", default=None, help="where --data lies on disk")
    ap.add_argument("--norm", default="imagenet", help="normalisation for data from disk: imagenet or inception")
    ap.add_argument("--per-class", type=int, default=None, help="embedded source: images per class drawn")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--wd", type=float, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--warmup", type=float, default=0.05, help="fraction of steps of linear warmup")
    ap.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
    ap.add_argument("--out", default=None, help="checkpoint path (default: checkpoints/pvp_<method>_<backbone>.safetensors)")
    ap.add_argument("--resume", action="store_true", help="continue from <out>.resume, written after every epoch")
    return ap


def parse(argv):
    """The flags, with what was left unset taken from BACKBONE or PVP."""
    args = parser().parse_args(argv)
    for k, v in (BACKBONE if args.backbone else PVP).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.data = args.data or ("synthetic-backbone" if args.backbone else "synthetic")
    return args


def check(args):
    """Refuse flags that cannot work before any time is spent: one fewshot.UsageError naming the flag."""
    need = fewshot.need
    need(not (args.backbone and args.weights), "--backbone trains the embedded ViT from scratch; it takes no --weights")
    for flag in ("epochs", "batch", "per_class", "prompts", "rank"):
        need(getattr(args, flag) >= 1, f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    need(args.kv_prompts >= 0, f"--kv-prompts must be at least 0, got {args.kv_prompts}")
    need(0 < args.lr and math.isfinite(args.lr), f"--lr must be a positive number, got {args.lr}")
    need(args.wd >= 0 and math.isfinite(args.wd), f"--wd must be a number >= 0, got {args.wd}")
    need(0 <= args.warmup <= 1, f"--warmup must be a fraction in [0, 1], got {args.warmup}")
    need(args.data_root is None or not args.data.startswith("synthetic"), f"--data-root is for a source on disk "
         f"(--data imagenet, imagefolder, ...); the embedded --data {args.data} has none: drop it")
    need(args.out is None or not Path(args.out).is_dir(), f"--out {args.out} is a folder: give the checkpoint's file "
         f"name, e.g. {Path(args.out or '.') / 'pvp.safetensors'}")
    try:
        device = fewshot.pick_device(args.device)
    except RuntimeError:
        raise fewshot.UsageError(f"--device {args.device}: not a torch device; use auto, cpu, cuda or mps") from None
    need(not args.amp or device.type == "cuda", f"--amp is bf16 autocast on CUDA, and this run is on {device.type}: "
         "drop --amp")


def main(argv=None):
    args = parse(argv)
    check(args)
    args.device = str(fewshot.init_distributed(args.device)[2])  # under torchrun: DDP, one device per rank
    backbone, name = (None, None) if args.backbone else fewshot.load_backbone(args.weights, args.arch)
    if args.out is None:  # checkpoints/vit_synthetic.safetensors, or e.g. checkpoints/pvp_vpt_ViT-B_16.safetensors
        args.out = CHECKPOINTS / ("vit_synthetic" if args.backbone else f"pvp_{args.method}_{Path(name.split(':')[-1]).stem}")
        args.out = str(args.out) + ".safetensors"
    try:
        pretrain(args, backbone, name)
    except KeyboardInterrupt:
        resume = Path(str(args.out) + ".resume")
        print("\ninterrupted: " + (f"{resume} holds the last finished epoch; run the same command with --resume to go "
              "on" if resume.exists() else "no epoch had finished; run the same command again"), file=sys.stderr)
        return 130
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    fail = fewshot.fail
    try:
        sys.exit(main())
    except (fewshot.UsageError, data.DataError, vitlib.CheckpointError) as e:
        fail(f"error: {e}")
    except OSError as e:  # a full disk or a folder we may not write, while saving the checkpoint or its resume file
        fail(f"error: cannot write {e.filename or 'the checkpoint'}: {e.strerror or e}. The resume file beside the "
             "checkpoint (<out>.resume) keeps the last epoch saved: free some space, then run the same command with "
             "--resume")

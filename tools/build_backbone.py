"""
Build the embedded backbone: the stand-in for the ImageNet-21k ViT-B/16, trained from scratch on the embedded world's
broad synthetic source (384 classes), so the embedded few-shot runs start from a good feature extractor.

    python tools/build_backbone.py          # -> checkpoints/vit_synthetic.safetensors, seeded; about 27 min on 2 cores

assets/vit_synthetic.safetensors was made by this command with the defaults below (BACKBONE); its header records the
command with every recipe value, the source accuracy (89.71%) and the weight hash, and assets/vit_synthetic.log is its
log. The same command on the same torch build rebuilds it bit for bit. It trains through fewshot.train, the loop every
run uses: vit_synthetic with a 384-class head, AdamW, warmup then cosine, supervised cross-entropy.
"""
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the flat project files import as modules

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import data  # noqa: E402
import fewshot  # noqa: E402
import plumbing  # noqa: E402
import vit as vitlib  # noqa: E402
from plumbing import flag, like  # noqa: E402

C = fewshot.Config
BACKBONE = dict(per_class=1024, epochs=3, lr=1e-3, wd=0.05, batch=64)  # 1.18M image-steps


@dataclass
class Build:
    per_class: int = flag(BACKBONE["per_class"], "source images per class", ok=lambda v, c: v >= 1, what="at least 1")
    epochs: int = like(C, "epochs", BACKBONE["epochs"], "passes over the source")
    lr: float = like(C, "lr", BACKBONE["lr"])
    wd: float = like(C, "wd", BACKBONE["wd"])
    batch: int = like(C, "batch", BACKBONE["batch"])
    warmup: float = like(C, "warmup", 0.05)
    optimizer: str = like(C, "optimizer", "adamw")
    seed: int = flag(0, "seed of the initialisation and the data order", ok=lambda v, c: 0 <= v <= plumbing.MAX_SEED,
                     what=f"a whole number from 0 to {plumbing.MAX_SEED}")
    device: str = like(C, "device", "auto")
    out: str = flag(str(plumbing.CHECKPOINTS / "vit_synthetic.safetensors"), "where the backbone is written")
    resume: bool = flag(False, "continue from <out>.resume, written after every epoch")


RECIPE = ("per_class", "epochs", "lr", "wd", "batch", "warmup", "optimizer", "seed")  # what the header records


def command(args):
    """The command that rebuilds this backbone, every recipe value spelled out (defaults may change; this may not)."""
    return "python tools/build_backbone.py " + " ".join(
        f"--{k.replace('_', '-')} {getattr(args, k):g}" if isinstance(getattr(args, k), float) else
        f"--{k.replace('_', '-')} {getattr(args, k)}" for k in RECIPE)


def build(args):
    """Train vit_synthetic on the backbone source; write it with its story in the header."""
    device = plumbing.pick_device(args.device)
    world = data.synthetic_source("backbone")
    train, val = world.split("train", args.per_class), world.split("val", 8)
    mean, std = data.NORMS["inception"]
    task = data.Task("synthetic-backbone", world.num_classes, train, val, val, 32, mean, std, "none",
                     dict(source=world.name, per_class=args.per_class))
    torch.manual_seed(args.seed)  # the initialisation
    model = vitlib.vit_synthetic(num_classes=task.num_classes).to(device)
    wanted = dict(method="backbone", config=None, backbone_hash=None, source="synthetic-backbone", data_root=None,
                  per_class=args.per_class, norm="imagenet", seed=args.seed, epochs=args.epochs, lr=args.lr,
                  wd=args.wd, batch=args.batch, warmup=args.warmup, optimizer=args.optimizer, amp=False,
                  max_steps=None, img_size=None)
    cfg = fewshot.Config(lr=args.lr, wd=args.wd, batch=args.batch, epochs=args.epochs, warmup=args.warmup,
                         optimizer=args.optimizer, max_steps=0)
    resume, start, opt_state = Path(args.out + ".resume"), None, None
    if args.resume and resume.exists():
        tensors, opt_state, start = plumbing.read_resume(resume, wanted)
        model.load_state_dict(tensors)
        print(f"resuming {args.out} at step {start['step']} (epoch {start['epoch'] + 1} of {args.epochs})")
    t0 = time.time()
    fewshot.train(model, task.train, task, cfg, device, seed=args.seed, desc=f"pre-training {Path(args.out).name}",
                  start=start, opt_state=opt_state, save_every=0,
                  on_save=lambda at, opt: plumbing.write_resume(resume, model.state_dict(), opt, at, wanted))
    acc = fewshot.evaluate(model, task.val, task, device)
    sd = {k: v.contiguous() for k, v in model.cpu().state_dict().items()}
    meta = dict(recipe={k: getattr(args, k) for k in RECIPE}, source_classes=task.num_classes, epochs=args.epochs,
                max_steps=None, source_top1=round(acc, 2), seed=args.seed, preset="vit_synthetic", source=task.meta,
                command=command(args), weights_hash=plumbing.weights_hash(model), seconds=round(time.time() - t0),
                torch=torch.__version__, device=str(device))
    plumbing.atomic(lambda p: save_file(sd, p, metadata={"nanopetl": json.dumps(meta)}), args.out)
    resume.unlink(missing_ok=True)
    print(f"wrote {args.out}: source val top-1 {acc:.2f}% after {args.epochs} epochs, {time.time() - t0:.0f}s")


def parse(argv=None):
    return plumbing.parser(Build, __doc__).parse_args(argv)


def main(argv=None):
    args = parse(argv)
    plumbing.check_flags(Build(**vars(args)))
    plumbing.check_device("--device", args.device)
    out = Path(args.out)
    plumbing.need(not out.is_dir(), f"--out {out} is a folder: give the backbone's file name")
    plumbing.check_own(out, "preset")
    plumbing.check_writable(out)
    before, lock = out.stat() if out.exists() else None, plumbing.locked(out)
    try:
        now = out.stat() if out.exists() else None
        if now and (before is None or (now.st_ino, now.st_mtime_ns) != (before.st_ino, before.st_mtime_ns)) and \
                plumbing.header(out).get("recipe") == {k: getattr(args, k) for k in RECIPE}:
            print(f"{out} was built meanwhile by another process with this recipe: reusing it")
            return 0
        build(args)
    except KeyboardInterrupt:
        print(f"\ninterrupted: run the same command with --resume to go on from {args.out}.resume", file=sys.stderr)
        return 130
    finally:
        plumbing.unlock(out, lock)
    return 0


if __name__ == "__main__":
    plumbing.run_script(main, lambda: "interrupted", lambda: "Run the same command with --resume to go on")

"""Speed of vit.ViT against timm's VisionTransformer, same weights, same input, same process.

Rows: forward (inference) and forward+backward with every weight frozen and the gradient flowing to the input
(the PETuning case: prompts sit in the input, the backbone is frozen). Prints img/s for each and ours/timm
(> 1 means ours is faster), the median over repeats (at least --repeats, and until a row has taken --seconds:
a few repeats of a 25 ms forward are noise), timm and ours interleaved so drift hits both alike.
run: python tests/bench_vit.py [--repeats 7] [--seconds 10] [--threads 2]
     python tests/bench_vit.py --micro      # the same rows on a tiny ViT, 1 repeat (seconds; for the tests)
"""
import functools
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import vit  # noqa: E402

CONFIGS = {  # name: (ours, timm kwargs, batch)
    "vit_synthetic 32px": (vit.vit_synthetic, dict(img_size=32, patch_size=8, embed_dim=128, depth=6, num_heads=4),
                           128),
    "ViT-S/16 224px": (vit.vit_small_patch16, dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6),
                       16),
    "ViT-B/16 224px": (vit.vit_base_patch16, dict(img_size=224, patch_size=16, embed_dim=768, depth=12,
                                                  num_heads=12), 8),
}
MICRO = {"micro ViT 32px": (functools.partial(vit.ViT, img_size=32, patch_size=8, dim=32, depth=2, heads=4),
                            dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4), 4)}


def step(model, x, backward):
    if not backward:
        with torch.inference_mode():
            model(x)
        return
    x = x.detach().requires_grad_(True)
    model(x).sum().backward()


def seconds(model, x, backward):
    t = time.perf_counter()
    step(model, x, backward)
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--seconds", type=float, default=10.0, help="keep repeating a row until both took this long")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--only", default="", help="run only configs whose name contains this")
    ap.add_argument("--micro", action="store_true", help="a tiny ViT only, 1 repeat, no minimum time")
    args = ap.parse_args()
    if args.micro:
        args.repeats, args.seconds = 1, 0.0
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, fp32 CPU, median of at least {args.repeats} "
          f"repeats and {args.seconds:.0f} s per row")
    print("| model | pass | batch | ours img/s | timm img/s | ours/timm |\n|---|---|---|---|---|---|")
    for name, (preset, kw, batch) in (MICRO if args.micro else CONFIGS).items():
        if args.only not in name:
            continue
        ref = VisionTransformer(**kw, num_classes=1000).eval()
        ours = vit.load_pretrained(preset(num_classes=1000), ref.state_dict(), verbose=False).eval()
        for m in (ref, ours):
            m.requires_grad_(False)
        x = torch.randn(batch, 3, kw["img_size"], kw["img_size"])
        for backward in (False, True):
            for m in (ref, ours):  # warm-up
                step(m, x, backward)
            t_ref, t_ours = [], []
            while len(t_ref) < args.repeats or sum(t_ref) + sum(t_ours) < args.seconds:  # fast rows get more repeats
                t_ref.append(seconds(ref, x, backward))
                t_ours.append(seconds(ours, x, backward))
            r, o = statistics.median(t_ref), statistics.median(t_ours)
            print(f"| {name} | {'fwd+bwd (frozen)' if backward else 'forward'} | {batch} | {batch / o:.1f} | "
                  f"{batch / r:.1f} | {r / o:.3f} |", flush=True)


if __name__ == "__main__":
    main()

"""E2VPT's token scores are LayerNorm noise: the mean |dL/d mask| of the token mask against the segment mask, on a
random ViT (dim 64, depth 4, 8 visual prompts, 16 images), at LayerNorm eps 1e-6 (ViT-B/16's) and 1e-12.
    python tests/bench_token_scores.py
    python tests/bench_token_scores.py --micro    # the same rows on dim 32, depth 2, 4 images (for the tests)
A token mask scales a whole prompt token; the next block's LayerNorm undoes a scale and the token's own output row
is dropped at the next layer, so only eps (and float rounding) is left of its gradient."""
import argparse
import sys
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import e2vpt  # noqa: E402
import vit  # noqa: E402
from fixtures import randomize  # noqa: E402

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--micro", action="store_true", help="a smaller ViT and batch, the same rows")
    args = ap.parse_args()
    dim, depth, images = (32, 2, 4) if args.micro else (64, 4, 16)
    print(f"random ViT dim {dim}, depth {depth}, 8 visual prompts, {images} images")
    print("| LayerNorm eps | token mask mean abs grad | segment mask mean abs grad |\n|---|---|---|")
    for eps in (1e-6, 1e-12):
        torch.manual_seed(0)
        backbone = randomize(vit.ViT(img_size=32, patch_size=8, dim=dim, depth=depth, heads=4, num_classes=0),
                             std=0.2)
        for m in backbone.modules():
            if isinstance(m, nn.LayerNorm):
                m.eps = eps
                m.weight.data.add_(1.0)
        model = e2vpt.E2VPT(backbone.eval(), num_classes=5, num_prompts=8, num_kv_prompts=2)
        nn.init.normal_(model.head.weight, std=0.5)
        scores = model.importance([(torch.randn(images, 3, 32, 32), torch.randint(0, 5, (images,)))],
                                  token_from="mask")
        print(f"| {eps:g} | {scores['token'].mean():.3g} | {scores['segment'].mean():.3g} |")

"""
LoRA: a trainable low-rank update beside chosen frozen projections of a ViT's attention.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022, arXiv 2106.09685, Sec. 4.1, Eq. 3:
    h = W_0 x + dW x = W_0 x + (alpha / r) * B A x,   A (r x d_in), B (d_out x r), W_0 frozen
A ~ Kaiming-uniform(a=sqrt(5)) (loralib, peft), B = 0, so the model equals the backbone at step 0. Sec. 7.1:
W_q and W_v together (the default here). ViT stores q, k, v as one fused qkv Linear(D, 3D), rows q | k | v: each
target gets its own (A, B) pair added to its D-row slice of the output (loralib's MergedLinear), the other slices
untouched.
"proj" adapts the attention's output projection. "qkv" is NOAH's reading (ZhangYuanhan-AI/NOAH,
model/supernet_vision_transformer_timm.py:224-228, 277-281): ONE pair over the whole fused projection, A (r x D)
and B (3D x r), so q, k and v are all adapted through a shared A; NOAH applies no scaling (alpha = rank here) and
dropout 0.1 (fewshot.py --recipe noah). Optional dropout on the LoRA input (not on the frozen path).
merge() folds (alpha/r) B A into the frozen weights for zero-overhead inference; unmerge() takes it back out.

Trained: every A and B (named *.lora_A.<target>, *.lora_B.<target>) and a new linear head on the final-norm CLS.
    trainable = depth * r * sum over targets of (dim + rows) + (dim+1)*classes,  rows = dim (q, k, v, proj), 3*dim (qkv)
    ViT-B/16, r=8 on q and v: 12 * 8 * 2 * (768 + 768) = 294,912 (0.34% of 85.8M); on qkv: 12 * 8 * 4 * 768 = 294,912
run: python fewshot.py --method lora --shots 16      (python lora.py: parameter counts and a tiny forward)

LoRA(vit) replaces vit.blocks[i].attn.qkv (and .proj) *in place* by a LoRALinear holding the original layer
as `.base`, so the wrapped ViT's keys become blocks.i.attn.qkv.base.weight/.bias (+ .lora_A.q, ...). Load
pretrained weights before wrapping: vit.load_pretrained on a wrapped ViT is refused by its strict key check
(nothing is renamed back behind your back). One ViT per LoRA: wrapping twice is refused.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from vit import ViT, vit_base_patch16

# -----------------------------------------------------------------------------
# a frozen Linear plus low-rank updates on slices of its output


class LoRALinear(nn.Module):
    """base(x), plus scale * B_t A_t dropout(x) on the output slice of each target t.

    The output of `base` is split into len(parts) equal slices named by `parts` (("q", "k", "v") for the
    fused qkv, ("proj",) for the output projection); `targets` names the adapted slices."""

    def __init__(self, base, parts, targets, rank, alpha, dropout):
        super().__init__()
        self.base, self.parts, self.scale, self.merged = base, tuple(parts), alpha / rank, False
        like = dict(device=base.weight.device, dtype=base.weight.dtype)
        rows = base.out_features // len(parts)
        self.lora_A = nn.ParameterDict({t: nn.Parameter(torch.empty(rank, base.in_features, **like))
                                        for t in targets})  # each (r, d_in)
        self.lora_B = nn.ParameterDict({t: nn.Parameter(torch.zeros(rows, rank, **like)) for t in targets})  # (rows, r)
        for a in self.lora_A.values():
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # U(-1/sqrt(d_in), 1/sqrt(d_in)), as nn.Linear's weights
        self.dropout = nn.Dropout(dropout)

    def delta(self, t):
        """The weight update of slice t: (rows, d_in)."""
        return self.scale * self.lora_B[t] @ self.lora_A[t]

    def forward(self, x):
        out = self.base(x)  # (B, N, out)
        if self.merged:  # the update is already inside base.weight
            return out
        h = self.dropout(x)
        slices = list(out.chunk(len(self.parts), dim=-1))  # len(parts) x (B, N, rows)
        for i, t in enumerate(self.parts):
            if t in self.lora_A:
                low = F.linear(h, self.lora_A[t])  # (B, N, r)
                slices[i] = slices[i] + self.scale * F.linear(low, self.lora_B[t])  # (B, N, rows)
        return torch.cat(slices, dim=-1)  # (B, N, out)

    @torch.no_grad()
    def merge(self, sign=1):
        """W[slice t] += sign * scale * B_t A_t for every target (sign=-1 takes it back out)."""
        rows = self.base.out_features // len(self.parts)
        for i, t in enumerate(self.parts):
            if t in self.lora_A:
                self.base.weight[i * rows:(i + 1) * rows] += sign * self.delta(t)
        self.merged = sign > 0


# -----------------------------------------------------------------------------
# the method


class LoRA(nn.Module):
    """LoRA on a frozen `vit.ViT`, which it freezes and wraps in place (see the module docstring for key names).

    targets: a subset of {"q", "k", "v", "proj"}, or "qkv"; alpha defaults to rank (scale 1). The head is
    nn.Linear(dim, num_classes) initialised to zeros (weight and bias): the runner sets its own initialisation
    (fewshot.py --head-init). The ViT's head is unused."""

    name = "lora"
    TARGETS = ("q", "k", "v", "proj", "qkv")

    def __init__(self, vit, *, num_classes, rank=8, alpha=None, targets=("q", "v"), dropout=0.0):
        super().__init__()
        targets, alpha = tuple(targets), rank if alpha is None else alpha  # alpha = rank: scale 1 (peft's default)
        if not targets or len(set(targets)) != len(targets) or not set(targets) <= set(self.TARGETS) or rank < 1 or \
                ("qkv" in targets and set(targets) & {"q", "k", "v"}):
            raise ValueError(f"LoRA needs rank >= 1 and distinct targets from {self.TARGETS} (qkv, the whole fused "
                             f"projection, not with q, k or v); got rank={rank}, targets={targets}")
        if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and 0 < alpha < math.inf and
                isinstance(dropout, (int, float)) and 0 <= dropout < 1):
            raise ValueError(f"LoRA needs a positive, finite alpha and a dropout in [0, 1); got {alpha!r}, {dropout!r}")
        if any(isinstance(m, LoRALinear) for m in vit.modules()):
            raise ValueError("this ViT is already wrapped by a LoRA: build a fresh ViT for each LoRA")
        self.config = dict(rank=rank, alpha=alpha, targets=targets, dropout=dropout)
        self.vit = vit.requires_grad_(False).eval()  # frozen before wrapping, so only A and B are trainable
        qkv = [t for t in targets if t != "proj"]
        for blk in vit.blocks:
            if qkv:  # slices q | k | v of the fused output, or all of it as one part ("qkv")
                parts = ("qkv",) if qkv == ["qkv"] else ("q", "k", "v")
                blk.attn.qkv = LoRALinear(blk.attn.qkv, parts, qkv, rank, alpha, dropout)
            if "proj" in targets:
                blk.attn.proj = LoRALinear(blk.attn.proj, ("proj",), ["proj"], rank, alpha, dropout)
        self.head = nn.Linear(vit.dim, num_classes, device=vit.cls_token.device, dtype=vit.cls_token.dtype)
        nn.init.zeros_(self.head.weight), nn.init.zeros_(self.head.bias)
        self.train()  # new LoRALinear modules start in train mode: put the backbone back in eval

    def adapters(self):
        return [m for m in self.vit.modules() if isinstance(m, LoRALinear)]

    @property
    def merged(self):
        return all(m.merged for m in self.adapters())

    def train(self, mode=True):
        if mode and self.merged:
            raise RuntimeError("LoRA is merged: call unmerge() before training (merged, A and B get no gradient)")
        super().train(mode)
        self.vit.eval()  # the frozen backbone never leaves eval mode ...
        for m in self.adapters():
            m.dropout.train(mode)  # ... but the LoRA dropout inside it follows the method's mode
        return self

    def merge(self):
        """Fold every update into its frozen weight (inference only). A no-op when already merged."""
        for m in self.adapters():
            if not m.merged:
                m.merge(+1)
        return self

    def unmerge(self):
        """Subtract the updates again (exact up to float rounding, ~1e-7). A no-op when not merged."""
        for m in self.adapters():
            if m.merged:
                m.merge(-1)
        return self

    def features(self, images):
        """The final-norm CLS token: (B, D). The ViT's own loop; the LoRA layers sit inside its blocks."""
        return self.vit.features(images)  # (B, D)

    def forward(self, images):
        return self.head(self.features(images))  # (B, num_classes)

    # -------------------------------------------------------------------------
    # what is trained (and saved, by plumbing.module_state_dict): A, B and the head, never a backbone weight

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    @staticmethod
    def trainable_count(vit, num_classes, *, rank, alpha, targets, dropout):
        """The formula of the docstring: depth * r * sum of (dim + rows) over targets + (dim+1) * classes."""
        rows = sum(3 * vit.dim if t == "qkv" else vit.dim for t in targets)
        return len(vit.blocks) * rank * (len(targets) * vit.dim + rows) + (vit.dim + 1) * num_classes


# -----------------------------------------------------------------------------

if __name__ == "__main__":  # parameter counts on ViT-B/16 and a forward of a tiny random ViT; takes no arguments
    import argparse
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    with torch.device("meta"):  # counting needs no memory
        base = vit_base_patch16(num_classes=0)
    backbone = sum(p.numel() for p in base.parameters())
    model = LoRA(base, num_classes=100, rank=8, targets=("q", "v"))
    total = sum(p.numel() for p in model.trainable_parameters())
    head = sum(p.numel() for p in model.head.parameters())
    for label, n in (("without head", total - head), ("with a 100-class head", total)):
        print(f"lora r=8 q,v on ViT-B/16 {label:22s} trainable: {n:>9,} = {n / 1e6:.2f}M / "
              f"{backbone / 1e6:.1f}M ({100 * n / backbone:.2f}%)")
    torch.manual_seed(0)
    tiny = ViT(img_size=32, patch_size=8, dim=32, depth=2, heads=4, num_classes=0)
    model = LoRA(tiny, num_classes=10, rank=4).eval()
    images = torch.randn(4, 3, 32, 32)
    print(f"tiny random ViT + LoRA: images {tuple(images.shape)} -> logits {tuple(model(images).shape)}")

"""
VPT: learnable prompt tokens in the input sequence of a frozen ViT.

Jia et al., "Visual Prompt Tuning", ECCV 2022, arXiv 2203.12119, Sec. 3.2 (code: KMnP/vpt):
    shallow (Eq. 4-6): [x_1, Z_1, E_1] = L_1([x_0, P, E_0]);  [x_i, Z_i, E_i] = L_i([x_{i-1}, Z_{i-1}, E_{i-1}])
    deep    (Eq. 7-8): [x_i, _, E_i] = L_i([x_{i-1}, P_{i-1}, E_{i-1}])   (layer i's prompt outputs are dropped
                       and the next layer's prompts take their slots: the sequence stays 1+p+N long)
    y = Head(LN(x_L))
Prompts sit between CLS and the patches, after the position embedding, so they carry no position. Init
(init="vpt") U(-v, v), v = sqrt(6 / (3*patch^2 + dim)) (0.0625 on ViT-B/16: Xavier for a flattened RGB patch -> dim
map; KMnP/vpt src/models/vit_prompt/vit.py:57-62, 70); init="xavier" is NOAH's: xavier_uniform_ on each layer's
(1, p, dim) tensor, U(-a, a), a = sqrt(6 / (dim * (p + 1))) (0.0088 at p=100 on ViT-B/16; ZhangYuanhan-AI/NOAH
model/supernet_vision_transformer_timm.py:316-319 per block, 449-451 the input prompts);
dropout on the prompts at every insertion (0.1 deep, 0.0 shallow); the backbone is frozen and stays in eval mode.

Trained: the prompts, stored as one (layers, p, dim) tensor `prompts` (layers = depth for deep, 1 for shallow),
and a new linear head on the final-norm CLS token.
    trainable = p*dim (shallow) or depth*p*dim (deep) + (dim+1)*classes
    ViT-B/16, p=50: deep 460,800 (0.54% of 85.8M), shallow 38,400 (0.04%), plus the head
run: python fewshot.py --method vpt --shots 16       (python vpt.py: parameter counts and a tiny forward)
"""
import math

import torch
import torch.nn as nn

from vit import ViT, vit_base_patch16

# -----------------------------------------------------------------------------
# the method


class VPT(nn.Module):
    """VPT-deep (deep=True) or VPT-shallow around a frozen `vit.ViT`, which it freezes in place.

    The head is nn.Linear(dim, num_classes) initialised to zeros (weight and bias): the runner sets its own
    initialisation (fewshot.py --head-init). The ViT's own head is not used."""

    name = "vpt"

    def __init__(self, vit, *, num_classes, num_prompts=50, deep=True, dropout=None, init="vpt"):
        super().__init__()
        dropout = (0.1 if deep else 0.0) if dropout is None else dropout  # the paper's / demo.ipynb's defaults
        if not (isinstance(num_prompts, int) and num_prompts >= 0 and isinstance(dropout, (int, float)) and
                0 <= dropout < 1 and init in ("vpt", "xavier")):  # 0 prompts: the plain ViT (a check, not a method)
            raise ValueError(f"VPT needs num_prompts >= 0, dropout in [0, 1) and init 'vpt' or 'xavier'; got "
                             f"{num_prompts!r}, {dropout!r}, {init!r}")
        self.config = dict(num_prompts=num_prompts, deep=deep, dropout=dropout, init=init)
        self.name = "vpt" if deep else "vpt-shallow"
        self.vit = vit.requires_grad_(False).eval()
        self.num_prompts, self.deep = num_prompts, deep
        like = dict(device=vit.cls_token.device, dtype=vit.cls_token.dtype)
        layers = len(vit.blocks) if deep else 1
        self.prompts = nn.Parameter(torch.empty(layers, num_prompts, vit.dim, **like))  # (layers, p, D)
        v = math.sqrt(6.0 / (3 * vit.patch_size**2 + vit.dim))  # fan_in of a flattened RGB patch + fan_out
        if init == "vpt":
            nn.init.uniform_(self.prompts, -v, v)
        else:  # NOAH's: each layer's (1, p, D) drawn on its own, fan_in p*D, fan_out D
            with torch.no_grad():
                for i in range(layers if num_prompts else 0):  # (p = 0: nothing to draw)
                    nn.init.xavier_uniform_(self.prompts[i:i + 1])
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(vit.dim, num_classes, **like)
        nn.init.zeros_(self.head.weight), nn.init.zeros_(self.head.bias)

    def train(self, mode=True):
        super().train(mode)  # prompt dropout follows the mode ...
        self.vit.eval()  # ... the frozen backbone never leaves eval mode
        return self

    def features(self, images):
        """The final-norm CLS token after prompting: (B, D)."""
        x = self.vit.embed(images)  # (B, 1+N, D): CLS first, position already added
        b, p = x.shape[0], self.num_prompts
        for i, blk in enumerate(self.vit.blocks):
            if i == 0 or self.deep:
                prompts = self.dropout(self.prompts[i].expand(b, -1, -1))  # (B, p, D), a dropout mask per image
                patches = x[:, 1:] if i == 0 else x[:, 1 + p:]  # (B, N, D): the previous prompt outputs are dropped
                x = torch.cat([x[:, :1], prompts, patches], dim=1)  # (B, 1+p+N, D)
            x = blk(x, cls_only=i == len(self.vit.blocks) - 1)  # the last block: the CLS row alone
        return self.vit.norm(x)[:, 0]  # (B, D)

    def forward(self, images):
        return self.head(self.features(images))  # (B, num_classes)

    # -------------------------------------------------------------------------
    # what is trained (and saved, by plumbing.module_state_dict): the prompts and the head, never the backbone

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    @staticmethod
    def trainable_count(vit, num_classes, *, num_prompts, deep, dropout, init="vpt"):
        """The formula of the docstring: (depth if deep else 1) * p * dim, plus the head's (dim+1) * classes."""
        return (len(vit.blocks) if deep else 1) * num_prompts * vit.dim + (vit.dim + 1) * num_classes


# -----------------------------------------------------------------------------

if __name__ == "__main__":  # parameter counts on ViT-B/16 and a forward of a tiny random ViT; takes no arguments
    import argparse
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    with torch.device("meta"):  # counting needs no memory
        base = vit_base_patch16(num_classes=0)
    backbone = sum(p.numel() for p in base.parameters())
    for deep in (True, False):
        model = VPT(base, num_classes=100, num_prompts=50, deep=deep)
        head = sum(p.numel() for p in model.head.parameters())
        for label, n in (("without head", sum(p.numel() for p in model.trainable_parameters()) - head),
                         ("with a 100-class head", sum(p.numel() for p in model.trainable_parameters()))):
            print(f"{model.name:12s} p=50 on ViT-B/16 {label:22s} trainable: {n:>9,} = {n / 1e6:.2f}M / "
                  f"{backbone / 1e6:.1f}M ({100 * n / backbone:.2f}%)")
    torch.manual_seed(0)
    tiny = ViT(img_size=32, patch_size=8, dim=32, depth=2, heads=4, num_classes=0)
    model = VPT(tiny, num_classes=10, num_prompts=5).eval()
    images = torch.randn(4, 3, 32, 32)
    print(f"tiny random ViT + VPT-deep: images {tuple(images.shape)} -> logits {tuple(model(images).shape)}")

"""
E2VPT: visual prompts and key-value prompts in a frozen ViT, then pruning of the visual prompts and rewinding.

Han et al., "E2VPT: An Effective and Efficient Approach for Visual Prompt Tuning", ICCV 2023, arXiv 2307.13770
(code: ChengHan111/E2VPT). Sec. 3.2, effective prompting:
    visual prompts as VPT-deep:  Z_1 = L_1(P_I^1, E),  Z_i = L_i(P_I^i, Z_{i-1})   (overwritten at every layer)
    key-value prompts, per layer, after the K and V projections, no query prompts:
        MSA = concat_h softmax(Q_h K'_h^T / sqrt(d)) V'_h,   K' = concat(P_K, K),  V' = concat(P_V, V)
Sec. 3.3, efficient prompting: a token mask rho (P) and a segment mask (P x R, R equal segments per token) on
the visual prompts; importance S = E_x |dL(x)/d rho| (signed=True: the official code's signed mean of the
gradient); prune the lowest scores; rewind the surviving prompts and retrain (the lottery-ticket reading;
fresh=True: the official code's fresh re-initialisation). Call order for a runner (fewshot.py):
    train -> scores = model.importance(batches, loss_fn) -> model.prune(token_frac, segment_frac, scores)
          -> model.rewind() -> a new optimizer -> train
Choices (paper over code): masks are 0/1 buffers, not trained; segments are contiguous blocks of dim/R dims (the
code tiles them: segment j = dims j, j+R, ... via repeat(1, 48)); one mask pair for all layers (as the code). A
pruned token leaves the sequence (the code keeps a zero vector, which still attends through LayerNorm's bias).

Trained: visual prompts `prompts` (depth, P, dim); key-value prompts `kv_prompts` (depth, heads, T, head_dim),
one tensor for K and V (shared_kv=False: `key_prompts` and `value_prompts`); a new linear head.
    trainable = depth*P*dim + depth*T*dim (x2 when not shared) + (dim+1)*classes
    ViT-B/16, P=10, T=5: 92,160 + 46,080 = 138,240 (0.16% of 85.8M), plus the head
P=0: key-value prompts alone (an ablation of the paper); importance, prune and rewind then have no visual prompt
to act on: scores and counts are empty, and rewind resets the key-value prompts.
run: python fewshot.py --method e2vpt --shots 16     (python e2vpt.py: parameter counts and a tiny forward)
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import repeat

from vit import ViT, vit_base_patch16

# -----------------------------------------------------------------------------
# the method


class E2VPT(nn.Module):
    """E2VPT around a frozen `vit.ViT`, which it freezes in place.

    The head is nn.Linear(dim, num_classes) initialised to zeros (weight and bias): the runner sets its own
    initialisation (fewshot.py --head-init). The ViT's own head is not used."""

    name = "e2vpt"

    def __init__(self, vit, *, num_classes, num_prompts=10, num_kv_prompts=5, segments=16, shared_kv=True,
                 dropout=0.1):
        super().__init__()
        if segments < 1 or vit.dim % segments or num_prompts < 0 or num_kv_prompts < 0:
            raise ValueError(f"E2VPT needs num_prompts >= 0, num_kv_prompts >= 0 and segments dividing dim {vit.dim}; "
                             f"got {num_prompts}, {num_kv_prompts}, segments={segments}")
        self.config = dict(num_prompts=num_prompts, num_kv_prompts=num_kv_prompts, segments=segments,
                           shared_kv=shared_kv, dropout=dropout)
        self.vit, self.segments, self.shared_kv = vit.requires_grad_(False).eval(), segments, shared_kv
        like = dict(device=vit.cls_token.device, dtype=vit.cls_token.dtype)
        depth, heads = len(vit.blocks), vit.blocks[0].attn.heads
        self.prompts = nn.Parameter(torch.empty(depth, num_prompts, vit.dim, **like))  # (L, P, D)
        kv = lambda: nn.Parameter(torch.empty(depth, heads, num_kv_prompts, vit.dim // heads, **like))  # (L, h, T, d)
        self.prompt_names = ["prompts"] + (["kv_prompts"] if shared_kv else ["key_prompts", "value_prompts"])
        for name in self.prompt_names[1:]:
            setattr(self, name, kv())
        self.register_buffer("token_mask", torch.ones(num_prompts, **like))  # (P,): 1 kept, 0 pruned
        self.register_buffer("segment_mask", torch.ones(num_prompts, segments, **like))  # (P, R)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(vit.dim, num_classes, **like)
        nn.init.zeros_(self.head.weight), nn.init.zeros_(self.head.bias)
        self.reset_prompts()
        self.initial = self.prompt_snapshot()  # the rewind point (a plain dict: kept where it was made)
        self.scores = None  # the last importance() result

    @torch.no_grad()
    def reset_prompts(self):
        """Random init: visual U(-v, v) as VPT; key-value Kaiming-uniform per layer (the code's ORIGIN_INIT=2)."""
        v = math.sqrt(6.0 / (3 * self.vit.patch_size**2 + self.vit.dim))  # 0.0625 on ViT-B/16
        self.prompts.uniform_(-v, v)
        for name in self.prompt_names[1:] if self.config["num_kv_prompts"] else []:  # T=0: nothing to draw
            for layer in getattr(self, name):  # (heads, T, head_dim): fan_in = T*head_dim, bound sqrt(6/(T*head_dim))
                nn.init.kaiming_uniform_(layer, a=0, mode="fan_in", nonlinearity="leaky_relu")

    def prompt_snapshot(self):
        return {name: getattr(self, name).detach().clone() for name in self.prompt_names}

    def train(self, mode=True):
        super().train(mode)  # prompt dropout follows the mode ...
        self.vit.eval()  # ... the frozen backbone never leaves eval mode
        return self

    # -------------------------------------------------------------------------
    # forward: kept visual prompts into the sequence, key-value prompts into every attention

    def prompt_mask(self):
        """(P, D): token mask times segment mask; segment r covers the contiguous dims [r*D/R, (r+1)*D/R)."""
        seg = repeat(self.segment_mask, "p r -> p (r s)", s=self.vit.dim // self.segments)  # (P, D)
        return self.token_mask[:, None] * seg  # (P, D)

    def kv_prompt(self, i):
        """Layer i's (key prompt, value prompt), each (heads, T, head_dim): the same tensor twice when shared."""
        if self.shared_kv:
            return self.kv_prompts[i], self.kv_prompts[i]
        return self.key_prompts[i], self.value_prompts[i]

    def features(self, images):
        """The final-norm CLS token after prompting: (B, D)."""
        # the mask multiplies (so pruned segments are 0 and the masks get a gradient in importance()), and pruned
        # tokens are dropped: the sequence is 1+P'+N long, P' = kept tokens
        prompts = (self.prompts * self.prompt_mask())[:, self.token_mask > 0]  # (L, P', D)
        x = self.vit.embed(images)  # (B, 1+N, D)
        b, p = x.shape[0], prompts.shape[1]
        for i, blk in enumerate(self.vit.blocks):
            tokens = self.dropout(prompts[i].expand(b, -1, -1))  # (B, P', D)
            patches = x[:, 1:] if i == 0 else x[:, 1 + p:]  # (B, N, D): the previous prompt outputs are dropped
            x = torch.cat([x[:, :1], tokens, patches], dim=1)  # (B, 1+P'+N, D)
            last = i == len(self.vit.blocks) - 1  # the last block computes the CLS row alone
            x = blk(x, kv_prompt=self.kv_prompt(i), cls_only=last)  # keys and values (B, h, T+1+P'+N, d) inside
        return self.vit.norm(x)[:, 0]  # (B, D)

    def forward(self, images):
        return self.head(self.features(images))  # (B, num_classes)

    # -------------------------------------------------------------------------
    # efficient prompting: importance -> prune -> rewind

    def importance(self, batches, loss_fn=F.cross_entropy, signed=False, token_from="segments"):
        """Scores {"token": (P,), "segment": (P, R)}: the mean over `batches` (an iterable of (images, labels) on
        the model's device) of |dL/d mask| with L = loss_fn(logits, labels), or of the signed gradient when
        signed=True. Per batch, of the batch-mean loss (batches of one image give the paper's E_x exactly). Eval
        mode (no dropout), as the code; the parameters' .grad is left untouched. Also stored as self.scores.
        token_from "segments": a token scores the sum of its segments' (default); "mask": its own mask's gradient
        (paper, code), which is noise: the next LayerNorm undoes a scale of the whole token up to eps, and its own
        row is dropped at the next layer (~1e-4 against ~0.1: python tests/bench_token_scores.py)."""
        masks, was_training = (self.token_mask, self.segment_mask), self.training
        totals, n = [torch.zeros_like(m) for m in masks], 0
        if not len(self.token_mask):  # key-value prompts alone: no visual prompt to score, no pass over the data
            self.scores = {"token": totals[0], "segment": totals[1]}
            return self.scores
        self.eval()
        try:
            with torch.enable_grad():
                for m in masks:
                    m.requires_grad_(True)
                for images, labels in batches:
                    grads = torch.autograd.grad(loss_fn(self(images), labels), masks)
                    for total, g in zip(totals, grads):
                        total += g if signed else g.abs()
                    n += 1
        finally:
            for m in masks:
                m.requires_grad_(False)
            self.train(was_training)
        if n == 0:
            raise ValueError("importance() got no batches")
        segment = totals[1] / n
        self.scores = {"token": segment.sum(1) if token_from == "segments" else totals[0] / n, "segment": segment}
        return self.scores

    @torch.no_grad()
    def prune(self, token_frac, segment_frac, scores=None):
        """Prune floor(token_frac*P) tokens, lowest scores first, then in every token the floor(segment_frac*R)
        lowest-scoring segments (the same count per token, as the code). At least one token and max(1, R//4)
        segments per token are kept. Masks only go 1 -> 0: pruned entries count first, so the fractions are
        totals. The pruned prompt entries are set to 0. Returns the counts that remain (all 0 when P = 0)."""
        scores = self.scores if scores is None else scores
        P, R = self.segment_mask.shape
        if scores is None or scores["token"].shape != (P,) or scores["segment"].shape != (P, R):
            raise ValueError(f"prune() needs scores {{'token': ({P},), 'segment': ({P}, {R})}} from importance()")
        if not (0 <= token_frac <= 1 and 0 <= segment_frac <= 1):
            raise ValueError(f"fractions must be in [0, 1], got {token_frac}, {segment_frac}")
        n_tokens = min(int(P * token_frac + 1e-9), max(P - 1, 0))
        n_segments = min(int(R * segment_frac + 1e-9), R - max(1, R // 4))
        token_scores = scores["token"].to(self.token_mask).masked_fill(self.token_mask == 0, -math.inf)  # (P,)
        self.token_mask[token_scores.sort(stable=True).indices[:n_tokens]] = 0
        seg_scores = scores["segment"].to(self.segment_mask).masked_fill(self.segment_mask == 0, -math.inf)  # (P, R)
        self.segment_mask.scatter_(1, seg_scores.sort(dim=1, stable=True).indices[:, :n_segments], 0.0)
        self.prompts.mul_(self.prompt_mask())  # (L, P, D) * (P, D)
        kept = self.segment_mask[self.token_mask > 0].sum(1)  # (P',): segments kept per kept token
        return dict(tokens=len(kept), segments=int(kept.min()) if len(kept) else 0,
                    visual_parameters=len(self.vit.blocks) * int(self.prompt_mask().sum()))

    @torch.no_grad()
    def rewind(self, fresh=False):
        """Reset the visual and key-value prompts to their initial values: those at construction, or at the last
        load (e.g. PVP's pre-trained prompts). fresh=True draws a new random init instead, like
        the code, which rebuilds the model. Pruned entries are set to 0 and stay 0 (the forward masks them, so
        their gradient is 0). The head is left alone: re-initialise it as the runner's --head-init does (the code
        rebuilds it too). Start a new optimizer afterwards: old moments would move the rewound values."""
        if fresh:
            self.reset_prompts()
        else:
            for name in self.prompt_names:
                getattr(self, name).copy_(self.initial[name])
        self.prompts.mul_(self.prompt_mask())  # (L, P, D) * (P, D)
        return self

    # -------------------------------------------------------------------------
    # what is trained: prompts and the head (saved with the masks, its buffers, by plumbing.module_state_dict)

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    @staticmethod
    def trainable_count(vit, num_classes, *, num_prompts, num_kv_prompts, segments, shared_kv, dropout):
        """The formula of the docstring: depth*P*dim + depth*T*dim (x2 when not shared) + (dim+1)*classes."""
        prompts = num_prompts + num_kv_prompts * (2 - shared_kv)  # visual, and K/V (one tensor when shared)
        return len(vit.blocks) * vit.dim * prompts + (vit.dim + 1) * num_classes

    def loaded(self):
        """After the generic load (plumbing.load_module_state_dict): the loaded prompts are the rewind point (PVP's
        pre-trained prompts, not a random draw)."""
        self.initial = self.prompt_snapshot()


# -----------------------------------------------------------------------------

if __name__ == "__main__":  # parameter counts on ViT-B/16 and a forward of a tiny random ViT; takes no arguments
    import argparse
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    with torch.device("meta"):  # counting needs no memory
        base = vit_base_patch16(num_classes=0)
    backbone = sum(p.numel() for p in base.parameters())
    for shared in (True, False):
        model = E2VPT(base, num_classes=100, num_prompts=10, num_kv_prompts=5, shared_kv=shared)
        total, head = (sum(p.numel() for p in ps) for ps in (model.trainable_parameters(), model.head.parameters()))
        for label, n in (("without head", total - head), ("with a 100-class head", total)):
            print(f"e2vpt P=10 T=5 {'shared' if shared else 'separate':8s} K/V on ViT-B/16 {label:22s} trainable: "
                  f"{n:>9,} = {n / 1e6:.2f}M / {backbone / 1e6:.1f}M ({100 * n / backbone:.2f}%)")
    torch.manual_seed(0)
    tiny = ViT(img_size=32, patch_size=8, dim=32, depth=2, heads=4, num_classes=0)
    model = E2VPT(tiny, num_classes=10, num_prompts=4, num_kv_prompts=2).eval()
    nn.init.normal_(model.head.weight)  # a zero head gives zero importance
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    print(f"tiny random ViT + E2VPT: images {tuple(images.shape)} -> logits {tuple(model(images).shape)}")
    scores = model.importance([(images, labels)], F.cross_entropy)
    print(f"after prune(0.5, 0.5): {model.prune(0.5, 0.5, scores)}; logits {tuple(model.rewind()(images).shape)}")

"""Speed and memory of one few-shot run, ours (fewshot.fit + fewshot.evaluate) against a reference written the
way peers write it (timm's VisionTransformer with the same weights, a plain training loop), same process.

For each method, each side trains once on the same support set with the same protocol (the same fewshot.Config:
AdamW, lr, wd, warmup + cosine, batch, steps, data order) and then scores the test split. The sides run
interleaved (ours, ref, ref, ours, ...: the order flips every repeat so drift hits both alike); a time is the
minimum over --repeats, a memory peak the median. The table's ratios are ours / reference time: below 1 means ours
is faster.

Settings:
  world  the embedded world: data.load_task("synthetic:shape", shots=--shots, seed=0) (32 px, 16 classes), a
         seeded random vit_synthetic backbone, the embedded protocol (fewshot.parse: 100 steps, batch min(64, support
         set): 16 at the default 1 shot, the main job's; --shots 4 or more gives batch 64; lr 5e-3).
  vitb   ViT-B/16 at 224 px, random weights, a task of 4 classes x 2 shots of random uint8 images (8 train, batch
         8, --vitb-steps steps), 32 test images, imagenet normalisation, train_aug "none" (both sides then do the
         same arithmetic: no random crops to match).
What the references do (the classes below): linear (head only, the frozen backbone runs every step), full (all
weights, lr x fewshot.LR_FACTOR), vpt-shallow / vpt (prompts spliced between CLS and patches around timm's blocks,
the KMnP/vpt way), lora (LoRA-ViT's wrapper on the fused qkv: qkv(x) plus the q and v deltas added in place;
evaluated UNmerged, as peers do), e2vpt (visual prompts + key-value prompts in a rewritten timm attention; train,
importance = |dL/d mask| over the support set, prune, rewind, train again; pruned prompt tokens stay in the
sequence as masked zeros, as the official code keeps them; ours drops them). pvp is vpt-deep with loaded prompts:
not timed separately (the vpt row is its cost).
Before timing, each reference is checked against ours on the same images (same weights, prompts / LoRA factors
copied from ours): features within --tol, or the script stops.

Memory: on CPU, the process RSS sampled every 5 ms by a thread, peak minus the value at the phase start (after
gc and malloc_trim, so memory freed by an earlier phase is returned first); "train" includes the fresh copy of the
backbone that both sides make (ViT-B/16: 344 MB). On CUDA: torch.cuda.max_memory_allocated minus the allocation
at the phase start.
The --peak section: the best fp32 torch.mm GFLOP/s at 1024/2048/4096, and the fraction of it that a ViT-B/16
forward (ours, batch 8) and a VPT-deep training step (batch 8, 10 prompts, frozen backbone) reach, their FLOPs
counted from the shapes.

run: python tests/bench_fewshot.py [--threads N] [--repeats R] [--setting world|vitb|both] [--methods ...]
                                   [--compile] [--device cpu] [--peak | --no-peak]
     python tests/bench_fewshot.py --micro    # every section on the same code path at a tiny size (seconds): both
                                              # settings (vitb on a tiny ViT), 2 steps, 1 repeat, 64 test images,
                                              # and the peak section on small matmuls and a tiny ViT
"""
import argparse
import copy
import ctypes
import dataclasses
import datetime
import functools
import gc
import math
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import timm
from timm.models.vision_transformer import VisionTransformer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import fewshot  # noqa: E402
import vit as vitlib  # noqa: E402
import vpt as vptlib  # noqa: E402
from tqdm import tqdm  # noqa: E402

DEVNULL = open(os.devnull, "w")
fewshot.tqdm = functools.partial(tqdm, file=DEVNULL)  # ours' progress bars: drawn as in a real run, not shown

METHODS = ("linear", "full", "vpt-shallow", "vpt", "e2vpt", "lora")


def log(*a):
    print(*a, file=sys.stderr, flush=True)

# -----------------------------------------------------------------------------
# measuring: time and peak memory of a phase


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


LIBC, PAGE = _libc(), os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes():
    try:
        import psutil
        return psutil.Process().memory_info().rss
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE


class Phase:
    """with Phase(device) as ph: ...  -> ph.seconds, ph.mb (peak memory increase over the phase)."""

    def __init__(self, device):
        self.device, self.cuda = device, device.type == "cuda"

    def __enter__(self):
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            if LIBC is not None and hasattr(LIBC, "malloc_trim"):
                LIBC.malloc_trim(0)  # give freed heap pages back, so the baseline is the live set
            self.base = self.peak = rss_bytes()
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        self.t0 = time.perf_counter()
        return self

    def _sample(self):
        while not self.stop.wait(0.005):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self.seconds = time.perf_counter() - self.t0
        if self.cuda:
            self.mb = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        else:
            self.stop.set()
            self.thread.join()
            self.mb = (max(self.peak, rss_bytes()) - self.base) / 2**20
        return False

# -----------------------------------------------------------------------------
# the reference: timm's ViT with our weights, and the methods written the way their repos / peers write them


def timm_twin(backbone):
    """timm VisionTransformer of the same shape as our `vit.ViT`, holding the same weights (no head)."""
    blk = backbone.blocks[0]
    ref = VisionTransformer(img_size=backbone.img_size, patch_size=backbone.patch_size, embed_dim=backbone.dim,
                            depth=len(backbone.blocks), num_heads=blk.attn.heads,
                            mlp_ratio=blk.mlp.fc1.out_features / backbone.dim, qkv_bias=True, class_token=True,
                            global_pool="token", num_classes=0, weight_init="skip")
    sd = {k: v.clone() for k, v in backbone.state_dict().items() if not k.startswith("head.")}
    p = backbone.patch_size
    # ours: Linear over patches flattened as (c p1 p2); timm: Conv2d (D, C, p, p) -- the same numbers reshaped
    sd["patch_embed.proj.weight"] = sd["patch_embed.proj.weight"].reshape(backbone.dim, -1, p, p)
    ref.load_state_dict(sd, strict=True)
    return ref.eval()


def zero_head(head):
    nn.init.zeros_(head.weight), nn.init.zeros_(head.bias)
    return head


class RefPlain(nn.Module):
    """linear / full: the timm model with a new head (reset_classifier), model(x) every step."""

    def __init__(self, vit, num_classes, train_backbone):
        super().__init__()
        self.vit = vit
        vit.reset_classifier(num_classes)
        zero_head(vit.head)
        for n, p in vit.named_parameters():
            p.requires_grad = train_backbone or n.startswith("head.")

    def features(self, x):
        return self.vit.forward_head(self.vit.forward_features(x), pre_logits=True)

    def forward(self, x):
        return self.vit(x)


def embed(vit, x):
    """timm's forward_features up to the blocks: patches, CLS, position."""
    return vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))


class RefVPT(nn.Module):
    """VPT (KMnP/vpt's incorporate_prompt / forward_deep_prompt around timm's blocks)."""

    def __init__(self, vit, num_classes, num_prompts, deep):
        super().__init__()
        self.vit, self.deep, self.p = vit.requires_grad_(False), deep, num_prompts
        dim, patch = vit.embed_dim, vit.patch_embed.patch_size
        val = math.sqrt(6.0 / float(3 * patch[0] * patch[1] + dim))
        self.prompts = nn.Parameter(torch.zeros(len(vit.blocks) if deep else 1, num_prompts, dim))
        nn.init.uniform_(self.prompts, -val, val)
        self.prompt_dropout = nn.Dropout(0.1 if deep else 0.0)
        self.head = zero_head(nn.Linear(dim, num_classes))

    def features(self, x):
        x = embed(self.vit, x)
        B = x.shape[0]
        x = torch.cat([x[:, :1], self.prompt_dropout(self.prompts[0].expand(B, -1, -1)), x[:, 1:]], dim=1)
        for i, blk in enumerate(self.vit.blocks):
            if i > 0 and self.deep:  # the previous layer's prompt outputs are replaced by this layer's prompts
                x = torch.cat([x[:, :1], self.prompt_dropout(self.prompts[i].expand(B, -1, -1)), x[:, 1 + self.p:]], 1)
            x = blk(x)
        return self.vit.norm(x)[:, 0]

    def forward(self, x):
        return self.head(self.features(x))


class LoRAqkv(nn.Module):
    """LoRA-ViT's _LoRA_qkv: the frozen fused qkv plus B_q A_q x and B_v A_v x added to its q and v slices."""

    def __init__(self, qkv, rank, alpha):
        super().__init__()
        self.qkv, self.dim, self.scale = qkv, qkv.in_features, alpha / rank
        self.a_q = nn.Linear(self.dim, rank, bias=False)  # default init = Kaiming-uniform(a=sqrt(5)), as LoRA's
        self.a_v = nn.Linear(self.dim, rank, bias=False)
        self.b_q = nn.utils.skip_init(nn.Linear, rank, self.dim, bias=False)
        self.b_v = nn.utils.skip_init(nn.Linear, rank, self.dim, bias=False)
        nn.init.zeros_(self.b_q.weight), nn.init.zeros_(self.b_v.weight)

    def forward(self, x):
        qkv = self.qkv(x)  # (B, N, 3D)
        qkv[:, :, :self.dim] += self.scale * self.b_q(self.a_q(x))
        qkv[:, :, -self.dim:] += self.scale * self.b_v(self.a_v(x))
        return qkv


class RefLoRA(nn.Module):
    def __init__(self, vit, num_classes, rank, alpha):
        super().__init__()
        self.vit = vit.requires_grad_(False)
        for blk in vit.blocks:
            blk.attn.qkv = LoRAqkv(blk.attn.qkv, rank, alpha)
        vit.reset_classifier(num_classes)
        zero_head(vit.head)

    def features(self, x):
        return self.vit.forward_head(self.vit.forward_features(x), pre_logits=True)

    def forward(self, x):
        return self.vit(x)


def kv_attention(attn, x, kv):
    """timm Attention.forward with E2VPT's key-value prompts (heads, T, head_dim) put before K and V."""
    B, N, C = x.shape
    q, k, v = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    pk = kv.expand(B, -1, -1, -1)
    k, v = torch.cat([pk, k], dim=2), torch.cat([pk, v], dim=2)  # shared key/value prompts
    x = F.scaled_dot_product_attention(q, k, v)
    return attn.proj(x.transpose(1, 2).reshape(B, N, C))


class RefE2VPT(nn.Module):
    """E2VPT after the official code: VPT-deep visual prompts with a token mask and a segment mask multiplied in
    (pruned tokens stay in the sequence as zeros), shared key-value prompts per layer, dropout 0.1 on the prompts."""

    def __init__(self, vit, num_classes, num_prompts, num_kv, segments=16):
        super().__init__()
        self.vit, self.p, self.segments = vit.requires_grad_(False), num_prompts, segments
        depth, dim, heads = len(vit.blocks), vit.embed_dim, vit.blocks[0].attn.num_heads
        self.head = zero_head(nn.Linear(dim, num_classes))
        self.prompts = nn.Parameter(torch.empty(depth, num_prompts, dim))
        val = math.sqrt(6.0 / float(3 * vit.patch_embed.patch_size[0] ** 2 + dim))
        nn.init.uniform_(self.prompts, -val, val)
        self.kv_prompts = nn.Parameter(torch.empty(depth, heads, num_kv, dim // heads))
        for layer in self.kv_prompts.data:
            nn.init.kaiming_uniform_(layer, a=0, mode="fan_in", nonlinearity="leaky_relu")
        self.register_buffer("token_mask", torch.ones(num_prompts))
        self.register_buffer("segment_mask", torch.ones(num_prompts, segments))
        self.prompt_dropout = nn.Dropout(0.1)
        self.register_buffer("initial_prompts", self.prompts.detach().clone(), persistent=False)  # rewind point
        self.register_buffer("initial_kv", self.kv_prompts.detach().clone(), persistent=False)

    def mask(self):
        return self.token_mask[:, None] * self.segment_mask.repeat_interleave(self.vit.embed_dim // self.segments, 1)

    def features(self, x):
        x, prompts = embed(self.vit, x), self.prompts * self.mask()
        B = x.shape[0]
        for i, blk in enumerate(self.vit.blocks):
            tokens = self.prompt_dropout(prompts[i].expand(B, -1, -1))
            x = torch.cat([x[:, :1], tokens, x[:, 1:] if i == 0 else x[:, 1 + self.p:]], dim=1)
            x = x + kv_attention(blk.attn, blk.norm1(x), self.kv_prompts[i])
            x = x + blk.mlp(blk.norm2(x))
        return self.vit.norm(x)[:, 0]

    def forward(self, x):
        return self.head(self.features(x))

    def importance(self, loader):
        self.eval()
        masks = [self.token_mask.requires_grad_(), self.segment_mask.requires_grad_()]
        total = [torch.zeros_like(m) for m in masks]
        for n, (x, y) in enumerate(loader, 1):
            for t, g in zip(total, torch.autograd.grad(F.cross_entropy(self(x), y), masks)):
                t += g.abs()
        for m in masks:
            m.requires_grad_(False)
        return [t / n for t in total]

    @torch.no_grad()
    def prune(self, scores, token_frac, segment_frac):
        P, R = self.segment_mask.shape
        self.token_mask[scores[0].argsort()[:int(P * token_frac)]] = 0
        self.segment_mask.scatter_(1, scores[1].argsort(dim=1)[:, :int(R * segment_frac)], 0.0)

    @torch.no_grad()
    def rewind(self):
        self.prompts.copy_(self.initial_prompts * self.mask()), self.kv_prompts.copy_(self.initial_kv)
        zero_head(self.head)


def ref_build(name, template, num_classes, cfg, device):
    """(model, lr) for method `name`: a fresh copy of the timm backbone, wrapped, with the options ours is built
    with (fewshot.method_options: the flags' defaults resolved, e.g. num_prompts 10 when --prompts is not given)."""
    vit, opts = copy.deepcopy(template), fewshot.method_options(name, cfg)
    if name in ("linear", "full"):
        model = RefPlain(vit, num_classes, train_backbone=name == "full")
    elif name in ("vpt", "vpt-shallow"):
        model = RefVPT(vit, num_classes, opts["num_prompts"], deep=name == "vpt")
    elif name == "lora":
        model = RefLoRA(vit, num_classes, opts["rank"], opts["rank"] if opts["alpha"] is None else opts["alpha"])
    elif name == "e2vpt":
        model = RefE2VPT(vit, num_classes, opts["num_prompts"], opts["num_kv_prompts"], opts["segments"])
    else:
        raise ValueError(name)
    return model.to(device), cfg.lr * fewshot.LR_FACTOR.get(name, 1.0)


def ref_loader(split, task, device, batch, generator=None):
    """Batches of normalised images: shuffled by `generator` when given (the same draw as ours), else in order."""
    order = torch.randperm(len(split), generator=generator) if generator is not None else torch.arange(len(split))
    mean = torch.tensor(task.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(task.std, device=device).view(1, -1, 1, 1)
    for i in range(0, len(split), batch):
        idx = order[i:i + batch]
        x = split.images[idx].to(device).float() / 255
        yield (x - mean) / std, split.labels[idx].to(device)


def ref_train(model, task, cfg, lr, seed, device):
    """A plain loop: AdamW (no decay on biases / norms), LambdaLR warmup + cosine, cfg's steps and batch."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([dict(params=[p for p in params if p.ndim > 1], weight_decay=cfg.wd),
                             dict(params=[p for p in params if p.ndim <= 1], weight_decay=0.0)], lr=lr)
    n, batch = len(task.train), min(cfg.batch, len(task.train))
    per_epoch = math.ceil(n / batch)
    total = min(cfg.epochs * per_epoch, cfg.max_steps or float("inf"))
    warm = int(cfg.warmup * total)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: (t + 1) / warm if t < warm else
                                              0.5 * (1 + math.cos(math.pi * (t - warm) / max(1, total - warm))))
    net = torch.compile(model) if getattr(cfg, "compile", False) else model
    model.train()
    step = 0
    for epoch in range(math.ceil(total / per_epoch)):
        torch.manual_seed(seed * 100_003 + epoch)
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        for x, y in ref_loader(task.train, task, device, batch, g):
            if step >= total:
                break
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
    return model


def ref_fit(name, task, template, cfg, device, seed):
    torch.manual_seed(seed)
    model, lr = ref_build(name, template, task.num_classes, cfg, device)
    ref_train(model, task, cfg, lr, seed, device)
    if name == "e2vpt":  # train -> importance -> prune -> rewind -> train again
        scores = model.importance(ref_loader(task.train, task, device, min(cfg.batch, len(task.train))))
        model.prune(scores, cfg.prune_tokens, cfg.prune_segments)
        model.rewind()
        ref_train(model, task, cfg, lr, seed, device)
    return model.eval()


def ref_evaluate(model, split, task, device, cfg, batch=256):
    model.eval()
    net = torch.compile(model) if getattr(cfg, "compile", False) else model
    correct = 0
    with torch.no_grad():
        for x, y in ref_loader(split, task, device, batch):
            correct += (net(x).argmax(-1) == y).sum().item()
    return 100.0 * correct / len(split)

# -----------------------------------------------------------------------------
# ours: the project's code path


def ours_evaluate(model, split, task, device, cfg):
    return fewshot.evaluate(model, split, task, device, compile=cfg.compile)


def with_compile(cfg, on):
    """cfg with compile=on; the reference reads the same cfg.compile."""
    return dataclasses.replace(cfg, compile=on)

# -----------------------------------------------------------------------------
# correctness of the references: same weights, same prompts / factors -> same features


def check_references(methods, task, backbone, template, cfg, device, tol):
    """Features of ours vs the reference on the same images, eval mode; stops the script on a mismatch."""
    torch.manual_seed(123)
    x = data.normalize(task.train.images[:2], task.mean, task.std).to(device)
    lines, seen = [], set()
    for name in methods:
        kind = "linear/full" if name in ("linear", "full") else name
        if kind in seen:
            continue
        seen.add(kind)
        ours = fewshot.build(name, copy.deepcopy(backbone), task.num_classes, cfg).to(device).eval()
        ref, _ = ref_build(name, template, task.num_classes, cfg, device)
        ref.eval()
        with torch.no_grad():
            if name in ("vpt", "vpt-shallow"):
                ref.prompts.copy_(ours.prompts)
            elif name == "lora":
                g = torch.Generator().manual_seed(1)
                for a in ours.adapters():  # B starts at 0: make the update visible
                    for t in a.lora_B:
                        a.lora_B[t].copy_(torch.randn(a.lora_B[t].shape, generator=g) * 0.05)
                for a, blk in zip(ours.adapters(), ref.vit.blocks):
                    w = blk.attn.qkv
                    w.a_q.weight.copy_(a.lora_A["q"]), w.b_q.weight.copy_(a.lora_B["q"])
                    w.a_v.weight.copy_(a.lora_A["v"]), w.b_v.weight.copy_(a.lora_B["v"])
            elif name == "e2vpt":
                ref.prompts.copy_(ours.prompts)
                ref.kv_prompts.copy_(torch.stack([ours.kv_prompt(i)[0] for i in range(len(ours.vit.blocks))]))
            a, b = ours.features(x), ref.features(x)
            diff = (a - b).abs().max().item()
            extra = ""
            if name == "lora":  # ours evaluates merged: that must agree with the unmerged reference too
                ours.merge()
                merged = (ours.features(x) - b).abs().max().item()
                diff, extra = max(diff, merged), f" (merged: {merged:.1e})"
        if not diff <= tol:
            sys.exit(f"reference check FAILED: {kind}: ours vs reference features differ by {diff:.2e} > {tol:g}")
        lines.append(f"reference check: ok  {kind}: max |ours - ref| = {diff:.1e}{extra}")
        if name == "lora":
            with torch.no_grad():  # a non-zero update must change the features, else the check proves nothing
                if (b - fewshot.build("linear", copy.deepcopy(backbone), task.num_classes, cfg).to(device)
                        .eval().features(x)).abs().max().item() < 1e-4:
                    sys.exit("reference check FAILED: lora: the LoRA update did not change the features")
    return lines

# -----------------------------------------------------------------------------
# the settings


def world_setting(args):
    [task] = data.load_task("synthetic:shape", shots=args.shots, seed=0)
    torch.manual_seed(0)
    backbone = vitlib.vit_synthetic(num_classes=0).eval()
    argv = ["--data", "synthetic:shape"] + (["--max-steps", str(args.max_steps)] if args.max_steps else [])
    if args.micro:  # the same run on fewer test images
        task = dataclasses.replace(task, test=task.test.subset(torch.arange(min(64, len(task.test)))))
    note = (f"world: synthetic:shape, {args.shots}-shot ({len(task.train)} train, {len(task.test)} test images, "
            f"{task.num_classes} classes, 32 px), random vit_synthetic (seed 0)")
    return "world", task, backbone, fewshot.parse(argv), note


def vitb_setting(args):
    g = torch.Generator().manual_seed(0)
    classes, shots, n_test = 4, 2, args.vitb_test
    side = backbone_side = MICRO_VIT["img_size"] if args.micro else 224
    img = lambda n: torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=g)
    train = data.Split(img(classes * shots), torch.arange(classes).repeat_interleave(shots))
    test = data.Split(img(n_test), torch.arange(n_test) % classes)
    task = data.Task(f"random-{side}", classes, train, test, test, backbone_side, *data.NORMS["imagenet"], "none",
                     dict(note="random uint8 images"))
    torch.manual_seed(0)
    backbone = (vitlib.vit_base_patch16(num_classes=0) if not args.micro else vitlib.ViT(**MICRO_VIT, num_classes=0))
    backbone.eval()
    cfg = fewshot.parse(["--batch", str(classes * shots), "--max-steps", str(args.vitb_steps), "--norm", "imagenet",
                         "--aug", "none", "--data", "random"])
    note = (f"vitb: {'ViT-B/16 224 px' if not args.micro else f'micro ViT {MICRO_VIT}'}, random weights (seed 0); "
            f"{classes} classes x {shots} shots of random uint8 "
            f"images, batch {classes * shots}, {args.vitb_steps} steps, {n_test} test images, imagenet norm, "
            "train_aug none")
    return "vitb", task, backbone, cfg, note


def bench_setting(setting, args, device):
    label, task, backbone, cfg, note = setting
    cfg = with_compile(cfg, args.compile)
    n = len(task.train)
    steps = min(cfg.epochs * math.ceil(n / min(cfg.batch, n)), cfg.max_steps or float("inf"))
    log(f"[{label}] building the timm twin and checking the references ...")
    print(f"\n{note}\nprotocol (both sides): optimizer {cfg.optimizer}, lr {cfg.lr} "
          f"(full x{fewshot.LR_FACTOR.get('full')}), "
          f"wd {cfg.wd}, batch {min(cfg.batch, n)}, {steps} steps (max_steps {cfg.max_steps}, epochs {cfg.epochs}), "
          f"warmup {cfg.warmup}, head_init {cfg.head_init}, compile {getattr(cfg, 'compile', False)}; options: "
          + "; ".join(f"{m} {fewshot.method_options(m, cfg)}" for m in args.methods if m not in ("linear", "full")))
    template = timm_twin(backbone).to(device)
    for line in check_references(args.methods, task, backbone, template, cfg, device, args.tol):
        print(line, flush=True)
    rows = []
    for name in args.methods:
        res = {side: dict(train=[], eval=[], mtrain=[], meval=[]) for side in ("ours", "ref")}
        for r in range(args.repeats):
            for side in (("ours", "ref") if r % 2 == 0 else ("ref", "ours")):
                log(f"[{label}] {name}: repeat {r + 1}/{args.repeats}, {side} ...")
                with Phase(device) as ph:
                    model = (fewshot.fit(name, task, backbone, cfg, device, 0)[0] if side == "ours"
                             else ref_fit(name, task, template, cfg, device, 0))
                res[side]["train"].append(ph.seconds), res[side]["mtrain"].append(ph.mb)
                with Phase(device) as ph:
                    acc = (ours_evaluate(model, task.test, task, device, cfg) if side == "ours"
                           else ref_evaluate(model, task.test, task, device, cfg))
                res[side]["eval"].append(ph.seconds), res[side]["meval"].append(ph.mb)
                res[side]["top1"] = acc
                log(f"    train {res[side]['train'][-1]:.2f} s, eval {ph.seconds:.2f} s, top-1 {acc:.2f}")
                del model
        o, f = res["ours"], res["ref"]
        mem = lambda s: f"{statistics.median(s['mtrain']):.0f} / {statistics.median(s['meval']):.0f}"
        noisy = lambda phase: " *" if max(max(s[phase]) / min(s[phase]) for s in (o, f)) > 1 + NOISY else ""
        rows.append(f"| {name} | {label} | {min(o['train']):.2f} | {min(f['train']):.2f} | "
                    f"{min(o['train']) / min(f['train']):.2f}{noisy('train')} | {min(o['eval']):.3f} | "
                    f"{min(f['eval']):.3f} | {min(o['eval']) / min(f['eval']):.2f}{noisy('eval')} | {mem(o)} | "
                    f"{mem(f)} | {o['top1']:.2f} | {f['top1']:.2f} |")
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


NOISY = 0.2  # a ratio gets " *" when a side's repeats spread more than this (max / min - 1)
HEADER = ("| method | setting | ours train s | ref train s | train ratio ours/ref (<1: ours faster) | ours eval s | "
          "ref eval s | eval ratio ours/ref (<1: ours faster) | ours peak MB train / eval | ref peak MB train / eval | "
          "ours top-1 | ref top-1 |\n|---|---|---|---|---|---|---|---|---|---|---|---|")

# -----------------------------------------------------------------------------
# the hardware peak, and how close a ViT-B/16 forward and a VPT-deep step come to it


def vit_flops(tokens, dim, depth, mlp_ratio, patches, patch_dim, cls_only=True):
    """Forward FLOPs (2 x multiply-adds) of one image, head excluded, split into (patch embed, the blocks'
    Linear layers, the blocks' attention matmuls). cls_only: as ours computes it (vit.Block(cls_only=True) in the
    last block): the fused qkv over every token, then only the CLS row queries and goes through proj and the MLP."""
    rows = (depth - 1) * tokens + (1 if cls_only else tokens)  # token rows through proj, fc1, fc2 and as queries
    patch = 2 * patches * patch_dim * dim
    linear = 2 * (depth * tokens * 3 * dim * dim + rows * (dim * dim + 2 * dim * int(dim * mlp_ratio)))
    attention = 2 * 2 * rows * tokens * dim  # q.k^T and attn.v: queries x keys x head_dim x heads MACs each
    return patch, linear, attention


def best_of(fn, n):
    fn()  # warm-up
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


MICRO_VIT = dict(img_size=32, patch_size=8, dim=32, depth=2, heads=4)  # --micro's ViT (vitb and peak)


def peak_section(device, threads, micro=False):
    log("[peak] matmul ...")
    rows, best = [], 0.0
    sizes = (64, 128, 256) if micro else (1024, 2048, 4096)
    for n in sizes:
        a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
        out = torch.empty(n, n, device=device)
        sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        s = best_of(lambda: (torch.mm(a, b, out=out), sync()), 5 if n < sizes[-1] else 2)
        gf = 2 * n**3 / s / 1e9
        best = max(best, gf)
        rows.append((f"torch.mm {n}x{n} fp32", 2 * n**3 / 1e9, s, gf))
        del a, b, out
    log("[peak] ViT forward, VPT-deep step ...")
    torch.manual_seed(0)
    model = (vitlib.ViT(**MICRO_VIT, num_classes=0) if micro else vitlib.vit_base_patch16(num_classes=0))
    model = model.to(device).eval()
    side, patch, dim, depth = model.img_size, model.patch_size, model.dim, len(model.blocks)
    n, label = (side // patch) ** 2, "micro ViT" if micro else "ViT-B/16"
    B, P = 8, 10
    x = torch.randn(B, 3, side, side, device=device)

    def forward():
        with torch.inference_mode():
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    patch_f, lin, attn = vit_flops(1 + n, dim, depth, 4.0, n, 3 * patch * patch)
    flops = B * (patch_f + lin + attn)
    s = best_of(forward, 3)
    rows.append((f"{label} forward, ours, batch {B}, {1 + n} tokens", flops / 1e9, s, flops / s / 1e9))

    prompted = vptlib.VPT(model, num_classes=10, num_prompts=P, deep=True).to(device)
    nn.init.normal_(prompted.head.weight, std=0.02)
    opt = torch.optim.AdamW([p for p in prompted.parameters() if p.requires_grad], lr=1e-3)
    y = torch.arange(B, device=device) % 10
    prompted.train()

    def train_step():
        loss = F.cross_entropy(prompted(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    # VPT-deep, frozen backbone, N' = 1 + P + 196 tokens. Forward: patch + lin(N') + attn(N').
    # Backward: a frozen Linear y = x W^T + b needs only dx = dy W (as many FLOPs as its forward; no dW matmul);
    # each attention matmul needs the gradient of both its inputs, which are activations: q.k^T -> dq = dS k,
    # dk = dS^T q; attn.v -> d(attn) = dO v^T, dv = attn^T dO: twice its forward. The patch embedding gets no
    # backward (its input is the images, its weight frozen; the prompts join after it). Prompt and head gradients
    # are slices / a (dim x classes) product: not counted. So a step = patch + 2 lin(N') + 3 attn(N'), about
    # 2x the forward (a flash-attention backward that recomputes q.k^T does more work than counted here).
    patch_f, lin, attn = vit_flops(1 + P + n, dim, depth, 4.0, n, 3 * patch * patch)
    flops = B * (patch_f + 2 * lin + 3 * attn)
    s = best_of(train_step, 2)
    rows.append((f"VPT-deep train step, ours, batch {B}, P={P} ({1 + P + n} tokens)", flops / 1e9, s, flops / s / 1e9))
    full = sum(vit_flops(1 + n, dim, depth, 4.0, n, 3 * patch * patch, cls_only=False)) / sum(
        vit_flops(1 + n, dim, depth, 4.0, n, 3 * patch * patch))
    print(f"\n## the peak of this machine ({threads} threads, fp32, {device})\n\nFLOPs are those ours computes: "
          f"its last block runs only the CLS row after qkv (a ViT that runs every row there does {full - 1:.1%} "
          "more).\n\n"
          "| what | GFLOP | seconds (best) | GFLOP/s | fraction of the best torch.mm |\n|---|---|---|---|---|")
    for what, g, s, gf in rows:
        print(f"| {what} | {g:.{1 if g >= 1 else 4}f} | {s:.{3 if s >= 1e-3 else 6}f} | {gf:.1f} | {gf / best:.2f} |")

# -----------------------------------------------------------------------------


def machine():
    name = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            name = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), name)
    except OSError:
        pass
    return f"{name or 'unknown CPU'} ({platform.machine()}, {os.cpu_count()} logical CPUs)"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch.set_num_threads")
    ap.add_argument("--repeats", type=int, default=3, help="runs per side and method (time: min; memory: median)")
    ap.add_argument("--setting", choices=("world", "vitb", "both"), default="world",
                    help="world (default; about 4 min at 1 thread and 3 repeats), vitb (ViT-B/16, a few images: "
                         "several minutes per repeat at 1 thread), or both")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), help=f"any of {', '.join(METHODS)} (pvp: see vpt)")
    ap.add_argument("--shots", type=int, default=1,
                    help="world: shots per class (1, the main job's: 16 images, batch 16; 4 or more: batch 64)")
    ap.add_argument("--max-steps", type=int, default=None, help="world: override the protocol's 100 steps")
    ap.add_argument("--vitb-steps", type=int, default=4, help="vitb: training steps")
    ap.add_argument("--vitb-test", type=int, default=32, help="vitb: test images")
    ap.add_argument("--compile", action="store_true", help="torch.compile on both sides (ours: fewshot's cfg.compile)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tol", type=float, default=1e-4, help="reference check: max |ours - ref| of the features")
    ap.add_argument("--peak", action=argparse.BooleanOptionalAction, default=None,
                    help="--peak: only the peak section; --no-peak: skip it (default: run it after the table)")
    ap.add_argument("--micro", action="store_true", help="every section at a tiny size, for the tests: --setting both "
                    "(vitb on a tiny ViT), --max-steps 2, --vitb-steps 2, --vitb-test 8, --repeats 1, 64 world test "
                    "images, small matmuls")
    args = ap.parse_args()
    if args.micro:
        args.setting, args.max_steps, args.vitb_steps, args.vitb_test, args.repeats = "both", 2, 2, 8, 1
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    methods = [m for arg in args.methods for m in arg.split(",") if m]
    unknown = [m for m in methods if m not in METHODS + ("pvp",)]
    if unknown:
        ap.error(f"unknown method(s) {', '.join(unknown)}: choose from {', '.join(METHODS)}")
    args.methods = [m for m in methods if m != "pvp"]
    print(f"# nanoPETL few-shot benchmark: ours (fewshot.fit + evaluate) vs a timm reference\n\n"
          f"{datetime.datetime.now().astimezone().isoformat(timespec='seconds')}; {machine()}; "
          f"torch {torch.__version__}, timm {timm.__version__}, python {platform.python_version()}; "
          f"{torch.get_num_threads()} threads (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}); "
          f"device {device}")
    if args.peak is not True:
        print(f"times: min over {args.repeats} repeat(s), sides interleaved (the order flips every repeat); memory: "
              "median peak increase (MB) over the phase, " +
              ("CUDA max_memory_allocated" if device.type == "cuda" else "process RSS sampled every 5 ms"))
        if "pvp" in methods:
            print("pvp: not timed separately: it is VPT-deep with loaded prompts, so its row is the vpt row")
        print("reference: lora evaluates UNmerged (ours merged); e2vpt keeps pruned prompt tokens as masked zeros "
              "(ours drops them)")
        settings = {"world": [world_setting], "vitb": [vitb_setting], "both": [world_setting, vitb_setting]}
        rows = []
        for make in settings[args.setting]:
            rows += bench_setting(make(args), args, device)
        print("\ntop-1: both sides start from the same initial values and see the same batches and dropout draws, so "
              "equal top-1 says they trained alike; linear and full may move by an image or two (ours' linear trains "
              "the head on cached features; rounding), e2vpt may differ by design (pruned tokens dropped vs masked)")
        print(f"\n{HEADER}\n" + "\n".join(rows), flush=True)
        if any(" *" in r for r in rows):
            print(f"*: a side's repeats spread by more than {NOISY:.0%} (other load on the machine?): that ratio is "
                  "noisy; re-run with more --repeats")
    if args.peak is not False:
        peak_section(device, torch.get_num_threads(), args.micro)


if __name__ == "__main__":
    main()

"""
A Vision Transformer from scratch, with einops, that loads the checkpoints the PETuning papers use.

ViT: Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021, arXiv 2010.11929, Sec. 3.1, Eq. 1-4:
    z_0 = [x_cls; x_p^1 E; ...; x_p^N E] + E_pos          (embed: patches, CLS, position)
    z'_l = MSA(LN(z_{l-1})) + z_{l-1}                      (Block, pre-norm)
    z_l  = MLP(LN(z'_l)) + z'_l
    y    = LN(z_L^0)                                       (final norm, CLS token) -> head
Parameter names are timm's, so a timm state dict loads as it is; `load_pretrained` also converts Google's
`.npz` (the ImageNet-21k ViT-B/16 of VPT, E2VPT and PVP) and torchvision's `vit_b_16` layout.

How a method attaches (vpt.py, e2vpt.py, lora.py wrap this model and never copy it, nor any part of it):
  - the loop: vit.embed(images) -> tokens, `for blk in vit.blocks: x = blk(x)`, vit.norm, vit.head, written out
    by a method that adds tokens between blocks (VPT's prompts), the last block with cls_only=True (ViT.features);
  - blk(x, kv_prompt=(keys, values)): tokens joined to the keys and values only (E2VPT's key-value prompts);
  - blk.mlp_branch = module (None by default): a branch beside the MLP, reading z' (AdaptFormer, Chen et al., arXiv
    2205.13535; the official Block.forward in ShoufaChen/AdaptFormer models/custom_modules.py);
  - in-place replacement of any submodule, e.g. blk.attn.qkv = Wrap(blk.attn.qkv): LoRA beside a Linear, or SSF's
    scale-and-shift after every Linear and LayerNorm (Lian et al., arXiv 2210.08823; dongzelian/SSF ssf_ada).
ViT(drop_path=r) adds stochastic depth (timm's rule, for recipes that train with it); off by default.
run: python vit.py [--preset NAME] [--weights SOURCE]   (parameter counts; --weights: does a checkpoint load?)
"""
import argparse
import hashlib
import json
import math
import os
import pickle
import re
import urllib.request
import zipfile
from contextlib import suppress
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from safetensors import SafetensorError

# -----------------------------------------------------------------------------
# the model


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)  # fused: rows are q | k | v, each (heads, head_dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, kv_prompt=None, queries=None):
        # kv_prompt (E2VPT): (key_prompt, value_prompt), each (heads, T, head_dim), joined to K and V after
        # their projections; the output keeps the queries' length N. queries=Q: only the first Q tokens ask.
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)  # 3 x (B, h, N, d)
        q = q[:, :, :queries]  # (B, h, Q, d)
        if kv_prompt is not None:
            pk, pv = (p.expand(x.shape[0], *p.shape) for p in kv_prompt)  # (B, h, T, d)
            k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)  # (B, h, T+N, d)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, h, Q, d)
        return self.proj(rearrange(x, "b h n d -> b n (h d)"))  # (B, Q, D)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def drop_path(x, rate, training):
    """Stochastic depth (Huang et al., arXiv 1603.09382; timm's DropPath): in training, each sample's residual branch
    is dropped with probability `rate` and kept ones are scaled by 1/keep, so the expectation is unchanged."""
    if not training or rate == 0:
        return x
    keep = x.new_empty(x.shape[0], *[1] * (x.dim() - 1)).bernoulli_(1 - rate)  # (B, 1, 1): 1 keeps the branch
    return x * keep.div_(1 - rate) if rate < 1 else x * keep


class Block(nn.Module):
    """One pre-norm encoder layer: z' = MSA(LN(z)) + z, then z = MLP(LN(z')) + z'. Its seams:
      kv_prompt=(P_K, P_V): E2VPT's K' = [P_K; K], V' = [P_V; V], joined after the key and value projections;
      mlp_branch: a module beside the MLP, z = MLP(LN(z')) + z' + branch(z') (AdaptFormer; SSF replaces submodules);
      drop_path: stochastic depth on both residual branches, exact at 0 (the very same tensor at rate 0 or in eval).
    cls_only=True is a speed trick, not a method: only the CLS row is read after the last block, so only it is made."""

    def __init__(self, dim, heads, mlp_ratio, drop_path=0.0):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, int(dim * mlp_ratio))
        self.drop_path, self.mlp_branch = drop_path, None  # the rate, and a method's module beside the MLP

    def forward(self, x, kv_prompt=None, cls_only=False):
        rows, drop = (1 if cls_only else None), lambda y: drop_path(y, self.drop_path, self.training)
        x = x[:, :rows] + drop(self.attn(self.norm1(x), kv_prompt, queries=rows))  # z' = MSA(LN(z)) + z, (B, N|1, D)
        out = x + drop(self.mlp(self.norm2(x)))  # z = MLP(LN(z')) + z'
        return out if self.mlp_branch is None else out + self.mlp_branch(x)  # AdaptFormer's branch is never dropped


class PatchEmbed(nn.Module):
    """A patch is a vector of C*p*p pixels and one Linear maps it to dim: the same map as a stride-p conv,
    whose (dim, C, p, p) weight is this Linear's weight reshaped, because patches flatten as (c p1 p2)."""

    def __init__(self, patch_size, dim, channels=3):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(channels * patch_size**2, dim)

    def forward(self, images):
        p = self.patch_size
        patches = rearrange(images, "b c (h p1) (w p2) -> b (h w) (c p1 p2)", p1=p, p2=p)  # (B, N, C*p*p)
        return self.proj(patches)  # (B, N, D)


def resample_pos_embed(pos_embed, grid):
    """Bicubic resampling of the patch positions to a grid x grid layout; the CLS position is kept (timm's rule)."""
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]  # (1, 1, D), (1, g*g, D)
    old = math.isqrt(patch_pos.shape[1])
    patch_pos = rearrange(patch_pos, "1 (h w) d -> 1 d h w", h=old).float()
    patch_pos = F.interpolate(patch_pos, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
    patch_pos = rearrange(patch_pos, "1 d h w -> 1 (h w) d").to(pos_embed.dtype)  # (1, grid*grid, D)
    return torch.cat([cls_pos, patch_pos], dim=1)


class ViT(nn.Module):
    def __init__(self, *, img_size=224, patch_size=16, dim=768, depth=12, heads=12, mlp_ratio=4.0, num_classes=1000,
                 drop_path=0.0):
        super().__init__()
        self.img_size, self.patch_size, self.dim = img_size, patch_size, dim
        self.patch_embed = PatchEmbed(patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + (img_size // patch_size) ** 2, dim) * 0.02)
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]  # timm's rule: 0 at the first block, rising
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio, rate) for rate in rates])  # to drop_path at the last
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes) if num_classes else nn.Identity()
        for m in self.modules():  # timm's default init for Linear layers; LayerNorm stays at (1, 0)
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def embed(self, images):
        x = self.patch_embed(images)  # (B, N, D)
        pos = self.pos_embed
        if pos.shape[1] != 1 + x.shape[1]:  # another resolution than the one trained at
            pos = resample_pos_embed(pos, math.isqrt(x.shape[1]))
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, D)
        return torch.cat([cls, x], dim=1) + pos  # (B, 1+N, D)

    def features(self, images):
        x = self.embed(images)
        for i, blk in enumerate(self.blocks):
            x = blk(x, cls_only=i == len(self.blocks) - 1)
        return self.norm(x)[:, 0]  # (B, D): the final-norm CLS token

    def forward(self, images):
        return self.head(self.features(images))  # (B, num_classes)


vit_base_patch16 = partial(ViT, patch_size=16, dim=768, depth=12, heads=12)  # ViT-B/16, 85.8M without head
vit_small_patch16 = partial(ViT, patch_size=16, dim=384, depth=12, heads=6)
vit_tiny_patch16 = partial(ViT, patch_size=16, dim=192, depth=12, heads=3)
vit_synthetic = partial(ViT, img_size=32, patch_size=8, dim=128, depth=6, heads=4)  # the embedded world's backbone
PRESETS = dict(vit_base_patch16=vit_base_patch16, vit_small_patch16=vit_small_patch16,
               vit_tiny_patch16=vit_tiny_patch16, vit_synthetic=vit_synthetic)


# -----------------------------------------------------------------------------
# checkpoints: named weights, files read without running code, every layout converted to timm's names

# google-research/vision_transformer's release (README, "Available ViT models"); both were trained on inputs in
# [-1, 1] ("inception" 0.5/0.5 normalisation)
PRETRAINED = {
    "vit_b16_in21k": dict(  # Google's supervised ImageNet-21k ViT-B/16: the backbone of VPT, E2VPT, NOAH and PVP
        url="https://storage.googleapis.com/vit_models/imagenet21k/ViT-B_16.npz",
        md5_prefix="d9715d", preset="vit_base_patch16", norm="inception", num_classes=21843),  # md5: KMnP/vpt README
    "vit_b16_augreg_in21k": dict(  # AugReg (Steiner et al. 2021); no checksum is published for it
        url="https://storage.googleapis.com/vit_models/augreg/"
            "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz",
        md5_prefix=None, preset="vit_base_patch16", norm="inception", num_classes=21843),
}
CACHE = Path(os.environ.get("NANOPETL_CACHE", Path.home() / ".cache" / "nanopetl"))


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or placed; the message names the file, keys and shapes."""


def md5_of(path, known=None):
    """The md5 of a file, remembered in a sidecar `<file>.md5` keyed by its size and mtime, so a 330 MB file is
    hashed once and not on every run (`known`: a digest just computed, to remember)."""
    st, side = path.stat(), path.with_name(path.name + ".md5")
    key = f"{st.st_size} {st.st_mtime_ns} "
    with suppress(OSError, UnicodeError):
        if known is None and (text := side.read_text()).startswith(key):
            return text[len(key):].strip()
    if known is None:
        with open(path, "rb") as f:
            known = hashlib.file_digest(f, "md5").hexdigest()
    with suppress(OSError):  # a read-only cache: hashed again next time
        (tmp := side.with_name(f"{side.name}.{os.getpid()}")).write_text(key + known), tmp.replace(side)
    return known


def download(name):
    """PRETRAINED[name] from CACHE, fetched once (to a temporary file, renamed only when the checksum holds); a file
    already there, e.g. placed by hand, is checked against the published checksum before its first use."""
    from tqdm import tqdm
    url, prefix = PRETRAINED[name]["url"], PRETRAINED[name]["md5_prefix"]
    path = CACHE / url.rsplit("/", 1)[1]
    if path.exists():
        with suppress(OSError):  # a folder or a file it may not read: read_checkpoint says so
            if prefix and not (md5 := md5_of(path)).startswith(prefix):
                raise CheckpointError(f"{path}: md5 {md5} does not start with {prefix}, the published checksum of "
                                      f"{name}: a damaged or different file. Delete it to download it again, or pass "
                                      "it as --weights PATH to use it unchecked")
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    part, md5 = path.with_suffix(f".{os.getpid()}.part"), hashlib.md5()
    try:
        with urllib.request.urlopen(url) as r, open(part, "wb") as f, tqdm(
                total=int(r.headers.get("Content-Length") or 0) or None, unit="B", unit_scale=True, desc=name) as bar:
            while chunk := r.read(1 << 20):
                f.write(chunk), md5.update(chunk), bar.update(len(chunk))
    except OSError as e:
        part.unlink(missing_ok=True)
        raise CheckpointError(f"could not download {name} from {url} ({e}); fetch it by hand and pass "
                              f"--weights PATH, or place it at {path}") from None
    if prefix and not md5.hexdigest().startswith(prefix):
        part.unlink()
        raise CheckpointError(f"{name}: md5 {md5.hexdigest()} does not start with the published {prefix}: "
                              "a corrupt download or not the published file")
    md5_of(part.rename(path), md5.hexdigest())
    return path


def check_finite(tensors, where):
    """Refuse NaN or infinite values (a checkpoint saved after training diverged, or a damaged file), naming the
    tensor and how many: they would otherwise surface as a NaN loss in every run."""
    bad = [k for k, v in tensors.items() if torch.is_tensor(v) and v.is_floating_point() and not v.isfinite().all()]
    if bad:
        v, more = tensors[bad[0]], f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise CheckpointError(f"{where}: {bad[0]} holds {int(v.isnan().sum())} NaN and {int(v.isinf().sum())} "
                              f"infinite values of {v.numel()}{more}: saved after training diverged, or damaged; use "
                              "an earlier checkpoint or make it again")


def error_line(e):
    """The line of a loader's exception that says what is wrong: torch's weights_only refusal puts it under advice
    (to load unsafely) that must not be passed on."""
    lines = [re.sub(r"\x1b\[\d*m", "", line).strip() for line in str(e).splitlines() if line.strip()]
    said = [line.split(" Please use")[0] for line in lines if "GLOBAL" in line or "Unsupported" in line]
    return (said or lines or [type(e).__name__])[0]


def read_checkpoint(path):
    """Tensors from .npz (no pickle), .safetensors, or .pth/.pt/.bin (torch.load with weights_only)."""
    path, module = Path(path), None
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}: give the path of a checkpoint file, or one of the named "
                              f"weights {', '.join(PRETRAINED)}")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                return {k: torch.from_numpy(np.ascontiguousarray(npz[k])) for k in npz.files}
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file, safe_open
            with safe_open(path, "pt") as f:  # pvp_pretrain.py's module checkpoints say so in their header
                meta = json.loads((f.metadata() or {}).get("nanopetl", "{}"))
            module = meta.get("method") if isinstance(meta, dict) else None
            sd = None if module else load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, ValueError, RuntimeError, OSError, zipfile.BadZipFile, EOFError,
            SafetensorError) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint of plain tensors ({error_line(e)}). Pickled objects "
                              "and object arrays are refused, since loading them can run code: re-save the state dict "
                              "alone, e.g. torch.save(model.state_dict(), path)") from None
    if module:
        raise CheckpointError(f"{path} is a {module} module checkpoint made by pvp_pretrain.py, not a backbone: pass "
                              "it as --pvp-init, and the backbone it was pre-trained on as --weights")
    for wrapper in ("model", "state_dict", "module"):  # training checkpoints often nest the state dict
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        what = type(sd).__name__ if not isinstance(sd, dict) else "a dict with " + ", ".join(
            sorted({type(v).__name__ for v in sd.values() if not isinstance(v, torch.Tensor)})) + " values"
        raise CheckpointError(f"{path}: not a state dict (a dict of tensors) but {what}: re-save it with "
                              "torch.save(model.state_dict(), path)")
    return sd


def _from_google(w):
    """Google/Flax .npz -> timm names. Kernels are (in, out), Linear weights (out, in); q, k, v are per head."""
    w = {re.sub(r"^(opt/target/|params/)", "", k): v for k, v in w.items()}
    dim = w["cls"].shape[-1]
    sd = {"cls_token": w["cls"], "patch_embed.proj.weight": w["embedding/kernel"].permute(3, 2, 0, 1),  # HWIO -> OIHW
          "patch_embed.proj.bias": w["embedding/bias"], "pos_embed": w["Transformer/posembed_input/pos_embedding"],
          "norm.weight": w["Transformer/encoder_norm/scale"], "norm.bias": w["Transformer/encoder_norm/bias"]}
    if "head/kernel" in w:
        sd |= {"head.weight": w["head/kernel"].T, "head.bias": w["head/bias"]}
    for i in range(len({k.split("/")[1] for k in w if k.startswith("Transformer/encoderblock_")})):
        b, o = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        mha = b + "MultiHeadDotProductAttention_1/"  # Flax numbers submodules in creation order
        qkv = [mha + n for n in ("query/", "key/", "value/")]
        sd |= {o + "norm1.weight": w[b + "LayerNorm_0/scale"], o + "norm1.bias": w[b + "LayerNorm_0/bias"],
               o + "attn.qkv.weight": torch.cat([w[n + "kernel"].reshape(dim, dim).T for n in qkv]),  # (3D, D)
               o + "attn.qkv.bias": torch.cat([w[n + "bias"].reshape(dim) for n in qkv]),
               o + "attn.proj.weight": w[mha + "out/kernel"].reshape(dim, dim).T,
               o + "attn.proj.bias": w[mha + "out/bias"],
               o + "norm2.weight": w[b + "LayerNorm_2/scale"], o + "norm2.bias": w[b + "LayerNorm_2/bias"]}
        for j in (0, 1):
            m = b + f"MlpBlock_3/Dense_{j}/"
            sd |= {o + f"mlp.fc{j + 1}.weight": w[m + "kernel"].T, o + f"mlp.fc{j + 1}.bias": w[m + "bias"]}
    return sd


# torchvision's vit_b_16 -> timm: a pure rename, same tensors (torchvision/models/vision_transformer.py)
TORCHVISION_NAMES = [
    (r"^class_token$", "cls_token"), (r"^conv_proj\.", "patch_embed.proj."), (r"^encoder\.pos_embedding$", "pos_embed"),
    (r"^encoder\.ln\.", "norm."), (r"^heads\.head\.", "head."), (r"^heads\.pre_logits\.", "pre_logits."),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.", r"blocks.\1."), (r"\.ln_(1|2)\.", r".norm\1."),
    (r"\.self_attention\.in_proj_", ".attn.qkv."), (r"\.self_attention\.out_proj\.", ".attn.proj."),
    (r"\.mlp\.(0|linear_1)\.", ".mlp.fc1."), (r"\.mlp\.(3|linear_2)\.", ".mlp.fc2.")]


def to_timm_names(sd):
    """Any supported layout -> (timm-named state dict, layout name); the layout is read off the keys."""
    sd = {k.removeprefix("module."): v for k, v in sd.items()}  # DistributedDataParallel's prefix
    if any(k.endswith("embedding/kernel") for k in sd):
        return _from_google(sd), "google npz"
    if "conv_proj.weight" in sd:
        rename = lambda k: [k := re.sub(p, r, k) for p, r in TORCHVISION_NAMES][-1]
        return {rename(k): v for k, v in sd.items()}, "torchvision"
    return dict(sd), "timm"


def fit_pos_embed(pos, grid, where):
    """(1, N, D) -> (1, 1 + grid*grid, D), and notes. A square N has no CLS position (timm's no_embed_class: the CLS
    token gets none), so it gets a zero one, the same sums; 1 + g*g is never a square, so the cases cannot mix."""
    n, note = pos.shape[1], []
    if (square := lambda k: k > 0 and math.isqrt(k) ** 2 == k)(n):
        pos, note = torch.cat([pos.new_zeros(1, 1, pos.shape[2]), pos], dim=1), ["pos_embed given a zero CLS position"]
    elif not square(n - 1):
        raise CheckpointError(f"{where}: pos_embed has {n} positions, neither g*g patches nor 1 + g*g with a CLS one: "
                              "not a ViT position table this loader can place; save it as (1, 1 + g*g, dim)")
    if pos.shape[1] != 1 + grid * grid:
        pos, note = resample_pos_embed(pos, grid), note + [f"pos_embed resampled from {n} to {grid * grid} patches"]
    return pos, note


def load_pretrained(model, source, verbose=True):
    """Load a PRETRAINED name, a file or a state dict into `model` (a ViT) and return it. Converts the layout,
    fits pos_embed to the model's grid (a missing batch axis or CLS position added, resampled), drops pre_logits,
    keeps the head only when its class count matches, and refuses, naming the key, whatever it cannot place: a
    shape that does not fit, a tensor that is not floating point, a NaN or infinite value."""
    if isinstance(source, str) and source in PRETRAINED:
        source = download(source)
    where = "state dict" if isinstance(source, dict) else str(source)
    try:
        sd, layout = to_timm_names(source if isinstance(source, dict) else read_checkpoint(source))
    except KeyError as e:  # a Google .npz with a tensor missing
        raise CheckpointError(f"{where}: a Google .npz layout without {e}: an incomplete or foreign file") from None
    sd = {k: v for k, v in sd.items() if not k.startswith("pre_logits")}  # IN21k's tanh layer; no method uses it
    if ints := [f"{k} ({str(v.dtype).removeprefix('torch.')})" for k, v in sd.items() if not v.is_floating_point()]:
        raise CheckpointError(f"{where}: {', '.join(ints[:4])}{' ...' if len(ints) > 4 else ''} not floating point, "
                              "so not a ViT's weights (a quantised checkpoint?): save the float weights")
    check_finite(sd, where)
    target, notes = model.state_dict(), []
    if sd.get("patch_embed.proj.weight", torch.empty(0)).dim() == 4:  # a conv kernel (D, C, p, p) -> (D, C*p*p)
        sd["patch_embed.proj.weight"] = sd["patch_embed.proj.weight"].flatten(1)
    pos, want = sd.get("pos_embed"), target["pos_embed"]
    if pos is not None and pos.dim() in (2, 3) and pos.shape != want.shape and pos.shape[-1] == want.shape[-1] and (
            pos.dim() == 2 or pos.shape[0] == 1):  # (N, D) or (1, N, D) is placed; anything else is refused below
        sd["pos_embed"], notes = fit_pos_embed(pos.reshape(1, -1, pos.shape[-1]), math.isqrt(want.shape[1] - 1), where)
    if "head.weight" in sd and sd["head.weight"].shape != target.get("head.weight", torch.empty(0)).shape:
        notes.append(f"head of {sd['head.weight'].shape[0]} classes not loaded (the model's has "
                     f"{target['head.weight'].shape[0] if 'head.weight' in target else 'none'})")
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    problems = [f"missing from the checkpoint: {k}" for k in target if k not in sd and not k.startswith("head.")]
    problems += [f"not in the model: {k} {tuple(v.shape)}" for k, v in sd.items() if k not in target]
    problems += [f"shape mismatch: {k} checkpoint {tuple(v.shape)} vs model {tuple(target[k].shape)}"
                 for k, v in sd.items() if k in target and v.shape != target[k].shape]
    if problems:
        more = f"; ... and {len(problems) - 8} more" if len(problems) > 8 else ""
        raise CheckpointError(f"{where} ({layout} layout) does not fit this ViT (dim {model.dim}, depth "
                              f"{len(model.blocks)}, patch {model.patch_size}): " + "; ".join(problems[:8]) + more +
                              f". Saved from another architecture? Build the model of its preset (fewshot.py --arch: "
                              f"{', '.join(PRESETS)})")
    model.load_state_dict({**target, **sd}, strict=True)  # a head left out keeps the model's own initialisation
    if verbose:
        print(f"loaded {where} ({layout} layout, {len(sd)} tensors){': ' if notes else ''}{'; '.join(notes)}")
    return model


# -----------------------------------------------------------------------------

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Parameter counts of the presets, and with --weights whether (and how) a "
                                 "checkpoint loads into one.")
    ap.add_argument("--preset", choices=PRESETS, help="one preset (default: all; with --weights, the named weight's "
                    "own, else vit_base_patch16)")
    ap.add_argument("--weights", metavar="SOURCE", help=f"a checkpoint file or a named weight: {', '.join(PRETRAINED)}")
    args = ap.parse_args()
    name = args.preset or args.weights and PRETRAINED.get(args.weights, {}).get("preset", "vit_base_patch16")
    count = lambda m: sum(p.numel() for p in m.parameters())
    for each in [name] if name else PRESETS:
        with torch.device("meta"):  # counting needs no memory
            body, full = PRESETS[each](num_classes=0), PRESETS[each](num_classes=1000)
        print(f"{each:18s} {count(body):>11,} parameters without head, {count(full):>11,} with 1000 classes")
    try:
        model = load_pretrained(PRESETS[name](num_classes=0), args.weights) if args.weights else vit_synthetic(
            num_classes=10)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    with torch.no_grad():
        x = torch.randn(4, 3, model.img_size, model.img_size)
        print(f"{name or 'vit_synthetic'}: images {tuple(x.shape)} -> {'features' if args.weights else 'logits'} "
              f"{tuple(model.eval()(x).shape)}")

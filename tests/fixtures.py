"""Writers for the real checkpoint layouts, from a timm-named state dict (Google's .npz as
google-research/vision_transformer saves it, torchvision's vit_b_16 names), so tests can save a random ViT the way
Google, timm and torchvision ship theirs. The inverse of vit.load_pretrained's converters,
written independently from the key table, so a mistake in one is not mirrored in the other."""
import numpy as np
import torch


def to_google_npz(sd, path, heads, pre_logits=False, prefix=""):
    """Save `sd` (timm names) as a Google/Flax .npz: HWIO patch kernel, (in, out) kernels, per-head q/k/v."""
    n = lambda t: t.detach().cpu().numpy().astype(np.float32)
    dim = sd["cls_token"].shape[-1]
    hd = dim // heads
    w = {"cls": n(sd["cls_token"]),
         "embedding/kernel": n(sd["patch_embed.proj.weight"]).transpose(2, 3, 1, 0),  # (D,C,p,p) -> HWIO
         "embedding/bias": n(sd["patch_embed.proj.bias"]),
         "Transformer/posembed_input/pos_embedding": n(sd["pos_embed"]),
         "Transformer/encoder_norm/scale": n(sd["norm.weight"]), "Transformer/encoder_norm/bias": n(sd["norm.bias"])}
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        b, s = f"Transformer/encoderblock_{i}/", lambda k: n(sd[f"blocks.{i}.{k}"])
        mha = b + "MultiHeadDotProductAttention_1/"
        qkv_w, qkv_b = s("attn.qkv.weight"), s("attn.qkv.bias")
        for j, name in enumerate(("query", "key", "value")):
            w[mha + name + "/kernel"] = qkv_w[j * dim:(j + 1) * dim].T.reshape(dim, heads, hd)
            w[mha + name + "/bias"] = qkv_b[j * dim:(j + 1) * dim].reshape(heads, hd)
        w[mha + "out/kernel"] = s("attn.proj.weight").T.reshape(heads, hd, dim)
        w[mha + "out/bias"] = s("attn.proj.bias")
        w[b + "LayerNorm_0/scale"], w[b + "LayerNorm_0/bias"] = s("norm1.weight"), s("norm1.bias")
        w[b + "LayerNorm_2/scale"], w[b + "LayerNorm_2/bias"] = s("norm2.weight"), s("norm2.bias")
        w[b + "MlpBlock_3/Dense_0/kernel"], w[b + "MlpBlock_3/Dense_0/bias"] = s("mlp.fc1.weight").T, s("mlp.fc1.bias")
        w[b + "MlpBlock_3/Dense_1/kernel"], w[b + "MlpBlock_3/Dense_1/bias"] = s("mlp.fc2.weight").T, s("mlp.fc2.bias")
    if "head.weight" in sd:
        w["head/kernel"], w["head/bias"] = n(sd["head.weight"]).T, n(sd["head.bias"])
    if pre_logits:
        rng = np.random.default_rng(0)
        w["pre_logits/kernel"] = rng.standard_normal((dim, dim), dtype=np.float32)
        w["pre_logits/bias"] = np.zeros(dim, np.float32)
    np.savez(path, **{prefix + k: v for k, v in w.items()})


def to_torchvision(sd):
    """timm names -> torchvision's vit_b_16 names (a pure rename)."""
    out = {}
    for k, v in sd.items():
        k = (k.replace("cls_token", "class_token").replace("patch_embed.proj.", "conv_proj.")
             .replace("pos_embed", "encoder.pos_embedding").replace("head.", "heads.head."))
        if k.startswith("norm."):
            k = "encoder.ln." + k[5:]
        if k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            rest = (rest.replace("norm1.", "ln_1.").replace("norm2.", "ln_2.")
                    .replace("attn.qkv.weight", "self_attention.in_proj_weight")
                    .replace("attn.qkv.bias", "self_attention.in_proj_bias")
                    .replace("attn.proj.", "self_attention.out_proj.")
                    .replace("mlp.fc1.", "mlp.0.").replace("mlp.fc2.", "mlp.3."))
            k = f"encoder.layers.encoder_layer_{i}.{rest}"
        out[k] = v
    return out


def randomize(model, std=0.1, seed=0):
    """Fill every parameter with noise, so a swapped or transposed tensor cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def save_backbone(path, seed):
    """A random vit_synthetic (seeded) saved as a timm-layout .safetensors file; returns the path."""
    import vit
    from safetensors.torch import save_file
    torch.manual_seed(seed)
    model = vit.vit_synthetic(num_classes=0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path

"""vit.py: parity with timm and torchvision, every checkpoint layout, resampling, refusals, the download path, the
seams a method attaches through, and drop-path."""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from timm.models.vision_transformer import VisionTransformer, _load_weights, checkpoint_filter_fn
from timm.layers import resample_abs_pos_embed

import vit
from fixtures import randomize, to_google_npz, to_torchvision

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(img_size=32, patch_size=8, dim=64, depth=2, heads=4)
BASE = dict(img_size=224, patch_size=16, dim=768, depth=12, heads=12)


def timm_vit(cfg, num_classes, std, **kw):
    m = VisionTransformer(img_size=cfg["img_size"], patch_size=cfg["patch_size"], embed_dim=cfg["dim"],
                          depth=cfg["depth"], num_heads=cfg["heads"], num_classes=num_classes, **kw)
    return randomize(m, std=std).eval()


def images(cfg, n=2, seed=1):
    return torch.randn(n, 3, cfg["img_size"], cfg["img_size"], generator=torch.Generator().manual_seed(seed))


def ours(cfg, num_classes):
    return vit.ViT(**cfg, num_classes=num_classes).eval()


@pytest.fixture(scope="module")
def base_pair():
    """timm's ViT-B/16 with random weights (built once: it is the slow part of this file)."""
    torch.manual_seed(0)
    return timm_vit(BASE, 1000, std=0.02)


@pytest.mark.parametrize("size", ["small", "base"])
def test_timm_state_dict_parity(size, base_pair):
    cfg, ref = (SMALL, timm_vit(SMALL, 7, 0.1)) if size == "small" else (BASE, base_pair)
    model = vit.load_pretrained(ours(cfg, ref.num_classes), ref.state_dict(), verbose=False)
    x = images(cfg)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", ["small", "base"])
def test_google_npz_parity_with_timm_loader(size, base_pair, tmp_path):
    cfg, src = (SMALL, timm_vit(SMALL, 7, 0.1)) if size == "small" else (BASE, base_pair)
    path = tmp_path / "ViT.npz"
    to_google_npz(src.state_dict(), path, heads=cfg["heads"], pre_logits=True)
    oracle = timm_vit(cfg, src.num_classes, std=0.5)  # different weights: the loader must overwrite all of them
    _load_weights(oracle, str(path))
    model = vit.load_pretrained(ours(cfg, src.num_classes), path, verbose=False)
    x = images(cfg)
    with torch.no_grad():
        torch.testing.assert_close(model(x), oracle.eval()(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(model(x), src(x), atol=1e-5, rtol=0)


def test_google_npz_with_opt_target_prefix(tmp_path):
    src = timm_vit(SMALL, 7, 0.1)
    path = tmp_path / "augreg.npz"
    to_google_npz(src.state_dict(), path, heads=SMALL["heads"], prefix="opt/target/")
    model = vit.load_pretrained(ours(SMALL, 7), path, verbose=False)
    x = images(SMALL)
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", ["small", "base"])
def test_torchvision_parity(size):
    cfg = SMALL if size == "small" else BASE
    torch.manual_seed(0)
    tv = torchvision.models.VisionTransformer(image_size=cfg["img_size"], patch_size=cfg["patch_size"],
                                              num_layers=cfg["depth"], num_heads=cfg["heads"], hidden_dim=cfg["dim"],
                                              mlp_dim=4 * cfg["dim"], num_classes=5)
    randomize(tv, std=0.1 if size == "small" else 0.02).eval()
    model = vit.load_pretrained(ours(cfg, 5), tv.state_dict(), verbose=False)
    x = images(cfg)
    with torch.no_grad():
        torch.testing.assert_close(model(x), tv(x), atol=1e-5, rtol=0)


def test_torchvision_and_timm_writers_agree():
    """The test's own torchvision writer is a rename that vit.py reads back to the same tensors."""
    sd = timm_vit(SMALL, 3, 0.1).state_dict()
    back, kind = vit.to_timm_names(to_torchvision(sd))
    assert kind == "torchvision" and back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_parameter_counts():
    with torch.device("meta"):
        body, full = vit.vit_base_patch16(num_classes=0), vit.vit_base_patch16(num_classes=1000)
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(body) == 85_798_656
    assert count(full) == 86_567_656


def test_pos_embed_resampling_matches_timm(tmp_path):
    src = timm_vit(SMALL, 7, 0.1)
    big = {**SMALL, "img_size": 48}  # grid 4x4 -> 6x6, as 224 -> 384 is 14x14 -> 24x24
    model = vit.load_pretrained(ours(big, 7), src.state_dict(), verbose=False)
    expected = resample_abs_pos_embed(src.pos_embed.detach(), (6, 6), num_prefix_tokens=1)
    torch.testing.assert_close(model.pos_embed.detach(), expected, atol=1e-6, rtol=0)
    oracle = timm_vit(big, 7, 0.5)
    oracle.load_state_dict(checkpoint_filter_fn(src.state_dict(), oracle))
    x = images(big)
    with torch.no_grad():
        torch.testing.assert_close(model(x), oracle(x), atol=1e-5, rtol=0)


def test_vit_b16_224_checkpoint_runs_at_384(base_pair):
    model = vit.load_pretrained(vit.vit_base_patch16(img_size=384, num_classes=1000), base_pair.state_dict(),
                                verbose=False)
    assert model.pos_embed.shape == (1, 1 + 24 * 24, 768)
    expected = resample_abs_pos_embed(base_pair.pos_embed.detach(), (24, 24), num_prefix_tokens=1)
    torch.testing.assert_close(model.pos_embed.detach(), expected, atol=1e-6, rtol=0)
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 384, 384)).shape == (1, 1000)


def test_embed_resamples_for_another_input_size():
    model = ours(SMALL, 3)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 48, 48)).shape == (2, 3)


def test_head_kept_only_when_class_count_matches(tmp_path):
    src = timm_vit(SMALL, 21, 0.1)
    path = tmp_path / "in21k.npz"
    to_google_npz(src.state_dict(), path, heads=SMALL["heads"], pre_logits=True)
    model = ours(SMALL, 10)
    head_before = model.head.weight.detach().clone()
    vit.load_pretrained(model, path, verbose=False)
    assert torch.equal(model.head.weight, head_before)  # dropped: 21 classes in the file, 10 in the model
    torch.testing.assert_close(model.blocks[1].mlp.fc2.weight, src.blocks[1].mlp.fc2.weight)
    same = vit.load_pretrained(ours(SMALL, 21), path, verbose=False)
    torch.testing.assert_close(same.head.weight, src.head.weight)
    features = vit.load_pretrained(ours(SMALL, 0), path, verbose=False)  # identity head: features only
    with torch.no_grad():
        assert features(images(SMALL)).shape == (2, SMALL["dim"])


def test_own_format_and_safetensors_round_trip(tmp_path):
    from safetensors.torch import save_file
    model = randomize(ours(SMALL, 4), std=0.1)
    for path in (tmp_path / "own.pth", tmp_path / "own.safetensors"):
        torch.save(model.state_dict(), path) if path.suffix == ".pth" else save_file(model.state_dict(), path)
        loaded = vit.load_pretrained(ours(SMALL, 4), path, verbose=False)
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    torch.save({"model": model.state_dict(), "epoch": 3}, tmp_path / "wrapped.pth")  # a training checkpoint
    vit.load_pretrained(ours(SMALL, 4), tmp_path / "wrapped.pth", verbose=False)


def test_pos_embed_without_cls_position_matches_timm_no_embed_class():
    """timm's no_embed_class (DeiT III) adds positions to the patches only: a zero CLS position is the same model."""
    src = timm_vit(SMALL, 7, 0.1, no_embed_class=True)
    assert src.pos_embed.shape == (1, 16, SMALL["dim"])
    model = vit.load_pretrained(ours(SMALL, 7), src.state_dict(), verbose=False)
    assert torch.equal(model.pos_embed[:, 0], torch.zeros(1, SMALL["dim"]))
    x = images(SMALL)
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x), atol=1e-5, rtol=0)
    big = {**SMALL, "img_size": 48}  # and resampled to a 6x6 grid, as timm resamples it (no prefix token)
    model = vit.load_pretrained(ours(big, 7), src.state_dict(), verbose=False)
    oracle = timm_vit(big, 7, 0.5, no_embed_class=True)
    oracle.load_state_dict(checkpoint_filter_fn(src.state_dict(), oracle))
    with torch.no_grad():
        torch.testing.assert_close(model(images(big)), oracle(images(big)), atol=1e-5, rtol=0)


def test_pos_embed_without_batch_axis_is_placed(capsys):
    src = timm_vit(SMALL, 7, 0.1)
    x = images(SMALL)
    for sd in ({**src.state_dict(), "pos_embed": src.pos_embed.detach()[0]},  # (17, D)
               {**timm_vit(SMALL, 7, 0.1, no_embed_class=True).state_dict()}):
        sd["pos_embed"] = sd["pos_embed"].reshape(-1, SMALL["dim"])  # (17, D), and (16, D) without a CLS position
        reference = {**sd, "pos_embed": sd["pos_embed"][None]}
        with torch.no_grad():
            torch.testing.assert_close(vit.load_pretrained(ours(SMALL, 7), sd)(x),
                                       vit.load_pretrained(ours(SMALL, 7), reference, verbose=False)(x), atol=0, rtol=0)
    assert "pos_embed given a zero CLS position" in capsys.readouterr().out


# ----------------------------------------------------------------------------- refusals


def refused(model, source, *needles):
    with pytest.raises(vit.CheckpointError) as e:
        vit.load_pretrained(model, source, verbose=False)
    for needle in needles:
        assert needle in str(e.value), str(e.value)
    return str(e.value)


def test_refuses_wrong_shapes():
    sd = timm_vit({**SMALL, "dim": 32}, 7, 0.1).state_dict()
    refused(ours(SMALL, 7), sd, "shape mismatch", "cls_token checkpoint (1, 1, 32) vs model (1, 1, 64)")


def test_refuses_unknown_and_missing_keys():
    sd = timm_vit(SMALL, 7, 0.1).state_dict()
    refused(ours(SMALL, 7), {**sd, "blocks.0.attn.gate": torch.zeros(3)}, "not in the model", "blocks.0.attn.gate (3,)")
    deeper = timm_vit({**SMALL, "depth": 3}, 7, 0.1).state_dict()
    refused(ours(SMALL, 7), deeper, "blocks.2.norm1.weight", "depth 2")
    refused(ours(SMALL, 7), {k: v for k, v in sd.items() if k != "norm.bias"}, "missing from the checkpoint: norm.bias")


def test_refuses_pos_embed_it_cannot_place():
    sd = timm_vit(SMALL, 7, 0.1).state_dict()
    refused(ours(SMALL, 7), {**sd, "pos_embed": sd["pos_embed"][:, :7]}, "pos_embed has 7 positions",
            "(1, 1 + g*g, dim)")
    refused(ours(SMALL, 7), {**sd, "pos_embed": sd["pos_embed"][None]},
            "shape mismatch: pos_embed checkpoint (1, 1, 17")
    refused(ours(SMALL, 7), {**sd, "pos_embed": sd["pos_embed"].expand(2, -1, -1)}, "pos_embed checkpoint (2, 17")
    refused(ours(SMALL, 7), {**sd, "pos_embed": torch.tensor(0.5)}, "pos_embed checkpoint ()")


def test_refuses_tensors_that_are_not_floating_point(tmp_path):
    from safetensors.torch import save_file
    sd = timm_vit(SMALL, 7, 0.1).state_dict()
    refused(ours(SMALL, 7), {**sd, "pos_embed": (sd["pos_embed"] * 100).long()}, "pos_embed (int64)", "not floating")
    save_file({**sd, "blocks.1.norm2.bias": torch.ones(SMALL["dim"], dtype=torch.bool)}, tmp_path / "b.safetensors")
    refused(ours(SMALL, 7), tmp_path / "b.safetensors", "b.safetensors", "blocks.1.norm2.bias (bool)")
    to_google_npz(sd, tmp_path / "int.npz", heads=SMALL["heads"])  # then its cls array made int8
    with np.load(tmp_path / "int.npz") as z:
        np.savez(tmp_path / "int.npz", **{k: (z[k].astype(np.int8) if k == "cls" else z[k]) for k in z.files})
    refused(ours(SMALL, 7), tmp_path / "int.npz", "int.npz", "cls_token (int8)")


def test_refuses_nan_and_infinite_values_naming_the_tensor(tmp_path):
    sd = timm_vit(SMALL, 7, 0.1).state_dict()
    bad = sd["blocks.1.mlp.fc1.weight"].clone()
    bad[0, :2], bad[3, 3] = float("nan"), float("-inf")
    refused(ours(SMALL, 7), {**sd, "blocks.1.mlp.fc1.weight": bad}, "blocks.1.mlp.fc1.weight holds 2 NaN and 1 "
            f"infinite values of {bad.numel()}", "earlier checkpoint")
    torch.save({**sd, "norm.bias": torch.full((SMALL["dim"],), float("inf")), "cls_token": bad[:1, None]},
               tmp_path / "two.pth")
    refused(ours(SMALL, 7), tmp_path / "two.pth", "two.pth", "(and 1 more tensors)")
    vit.check_finite({"prompts": torch.zeros(2, 3), "mask": torch.ones(3, dtype=torch.bool)}, "module")  # passes
    with pytest.raises(vit.CheckpointError, match=r"^m\.safetensors: prompts holds 1 NaN and 0 infinite values of 6:"):
        vit.check_finite({"prompts": torch.tensor([[0, 1, float("nan")], [0, 0, 0]])}, "m.safetensors")


class Payload:
    def __reduce__(self):
        return (print, ("this would have run",))


def test_refuses_pickled_objects(tmp_path):
    sd = timm_vit(SMALL, 7, 0.1).state_dict()
    torch.save({"model": sd, "config": Payload()}, tmp_path / "pickled.pth")
    refused(ours(SMALL, 7), tmp_path / "pickled.pth", "pickled.pth", "Pickled objects")
    np.savez(tmp_path / "objects.npz", cls=np.array([{"a": 1}], dtype=object))
    refused(ours(SMALL, 7), tmp_path / "objects.npz", "objects.npz", "object arrays")


def test_refuses_missing_corrupt_and_truncated_files(tmp_path):
    refused(ours(SMALL, 7), tmp_path / "nope.pth", "no checkpoint file", "nope.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint at all")
    refused(ours(SMALL, 7), tmp_path / "garbage.pth", "garbage.pth", "not a readable checkpoint")
    torch.save(timm_vit(SMALL, 7, 0.1).state_dict(), tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    refused(ours(SMALL, 7), tmp_path / "cut.pth", "cut.pth")
    to_google_npz(timm_vit(SMALL, 7, 0.1).state_dict(), tmp_path / "full.npz", heads=4)
    data = (tmp_path / "full.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    refused(ours(SMALL, 7), tmp_path / "cut.npz", "cut.npz")


# ----------------------------------------------------------------------------- named weights


def test_download_verifies_checksum_and_caches(tmp_path, monkeypatch):
    src = timm_vit(SMALL, 7, 0.1)
    fixture = tmp_path / "served" / "ViT-S_8.npz"
    fixture.parent.mkdir()
    to_google_npz(src.state_dict(), fixture, heads=4)
    md5 = hashlib.md5(fixture.read_bytes()).hexdigest()
    monkeypatch.setattr(vit, "CACHE", tmp_path / "cache")
    monkeypatch.setitem(vit.PRETRAINED, "fixture",
                        dict(url=fixture.as_uri(), md5_prefix=md5[:6], preset="x", norm="inception"))
    monkeypatch.setitem(vit.PRETRAINED, "corrupt",
                        dict(url=fixture.as_uri(), md5_prefix="000000", preset="x", norm="inception"))

    refused(ours(SMALL, 7), "corrupt", "md5", "000000")
    assert not any((tmp_path / "cache").iterdir())  # nothing half-written is left to be reused

    model = vit.load_pretrained(ours(SMALL, 7), "fixture", verbose=False)
    assert (tmp_path / "cache" / "ViT-S_8.npz").is_file()
    assert (tmp_path / "cache" / "ViT-S_8.npz.md5").read_text().endswith(" " + md5)  # known: not hashed again
    fixture.unlink()  # the second load must come from the cache
    again = vit.load_pretrained(ours(SMALL, 7), "fixture", verbose=False)
    x = images(SMALL)
    with torch.no_grad():
        torch.testing.assert_close(again(x), src(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(model(x), src(x), atol=1e-5, rtol=0)


def test_named_weight_placed_by_hand_is_checked_once(tmp_path, monkeypatch):
    """A file put in the cache by hand (as the download error suggests) is checked against the published md5 before
    its first use; the digest is remembered beside it, keyed by size and mtime, so it is not hashed on every run."""
    src = timm_vit(SMALL, 7, 0.1)
    good, cache = tmp_path / "good.npz", tmp_path / "cache"
    to_google_npz(src.state_dict(), good, heads=SMALL["heads"])
    md5 = hashlib.md5(good.read_bytes()).hexdigest()
    monkeypatch.setattr(vit, "CACHE", cache)
    monkeypatch.setitem(vit.PRETRAINED, "byhand", dict(url="https://nowhere.invalid/ViT-S_8.npz", md5_prefix=md5[:6],
                                                       preset="x", norm="inception"))
    cache.mkdir()
    placed, sidecar = cache / "ViT-S_8.npz", cache / "ViT-S_8.npz.md5"
    to_google_npz(timm_vit(SMALL, 7, 0.2).state_dict(), placed, heads=SMALL["heads"])  # another file
    message = refused(ours(SMALL, 7), "byhand", str(placed), f"does not start with {md5[:6]}", "Delete it")
    assert "\n" not in message and placed.exists()  # the user's file is not deleted behind their back
    placed.write_bytes(good.read_bytes())
    os.utime(placed, ns=(1, 2_000_000_000))  # a new mtime, whatever the clock's resolution
    x = images(SMALL)
    with torch.no_grad():
        torch.testing.assert_close(vit.load_pretrained(ours(SMALL, 7), "byhand", verbose=False)(x), src(x), atol=1e-5,
                                   rtol=0)
    assert sidecar.read_text() == f"{placed.stat().st_size} 2000000000 {md5}"
    sidecar.write_text(f"{placed.stat().st_size} 2000000000 {'f' * 32}")  # a remembered verdict is trusted ...
    refused(ours(SMALL, 7), "byhand", "md5 ffffffff")
    os.utime(placed, ns=(1, 3_000_000_000))  # ... until the file changes: hashed again
    vit.load_pretrained(ours(SMALL, 7), "byhand", verbose=False)
    assert sidecar.read_text().endswith(md5)
    placed.unlink(), sidecar.unlink(), placed.mkdir()  # a folder in its place: one line, no traceback
    refused(ours(SMALL, 7), "byhand", f"no checkpoint file at {placed}")


def test_unreachable_download_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(vit, "CACHE", tmp_path / "cache")
    monkeypatch.setitem(vit.PRETRAINED, "gone",
                        dict(url=(tmp_path / "absent.npz").as_uri(), md5_prefix=None, preset="x", norm="x"))
    refused(ours(SMALL, 7), "gone", "could not download gone", "--weights PATH")


def test_pretrained_table_names_the_literature_backbone():
    spec = vit.PRETRAINED["vit_b16_in21k"]
    assert spec["url"].endswith("imagenet21k/ViT-B_16.npz") and spec["md5_prefix"] == "d9715d"
    assert spec["norm"] == "inception" and spec["num_classes"] == 21843


# ----------------------------------------------------------------------------- seams and the demo


def test_kv_prompt_is_prepended_to_keys_and_values():
    attn = randomize(vit.Attention(64, 4), std=0.1)
    x = torch.randn(2, 5, 64)
    pk, pv = torch.randn(4, 3, 16), torch.randn(4, 3, 16)
    q, k, v = attn.qkv(x).reshape(2, 5, 3, 4, 16).permute(2, 0, 3, 1, 4)  # the manual split, (three h d)
    k, v = torch.cat([pk.expand(2, -1, -1, -1), k], 2), torch.cat([pv.expand(2, -1, -1, -1), v], 2)
    a = torch.softmax(q @ k.transpose(-2, -1) / 4.0, dim=-1)  # (B, h, 5, 8)
    expected = attn.proj((a @ v).transpose(1, 2).reshape(2, 5, 64))
    torch.testing.assert_close(attn(x, kv_prompt=(pk, pv)), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(attn(x, kv_prompt=(pk[:, :0], pv[:, :0])), attn(x), atol=1e-6, rtol=0)


def test_main_prints_counts_and_shape():
    out = subprocess.run([sys.executable, "vit.py"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "85,798,656" in out and "86,567,656" in out and "(4, 10)" in out


def test_main_loads_a_checkpoint_into_a_preset(tmp_path):
    from safetensors.torch import save_file
    sd = timm_vit(dict(img_size=32, patch_size=8, dim=128, depth=6, heads=4), 0, 0.02, no_embed_class=True).state_dict()
    save_file(sd, tmp_path / "deit3ish.safetensors")
    out = subprocess.run([sys.executable, "vit.py", "--preset", "vit_synthetic", "--weights", tmp_path /
                          "deit3ish.safetensors"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "1,216,896 parameters without head" in out and "vit_base" not in out
    assert "pos_embed given a zero CLS position" in out and "features (4, 128)" in out


class ParallelAdapter(nn.Module):
    """AdaptFormer's AdaptMLP (ShoufaChen/AdaptFormer, models/adapter.py, without its optional LayerNorm): s * up(
    relu(down(x))) on the residual stream x, beside the MLP; `up` starts at zero, so the block starts unchanged."""

    def __init__(self, dim, bottleneck=8, scale=0.1):
        super().__init__()
        self.down, self.up, self.scale = nn.Linear(dim, bottleneck), nn.Linear(bottleneck, dim), scale
        nn.init.zeros_(self.up.weight), nn.init.zeros_(self.up.bias)

    def forward(self, x):
        return self.scale * self.up(F.relu(self.down(x)))


def test_parallel_adapter_attaches_beside_the_mlp():
    model = randomize(ours(SMALL, 5), std=0.1)
    x = images(SMALL)
    with torch.no_grad():
        before = model(x)
        for blk in model.blocks:
            blk.mlp_branch = ParallelAdapter(SMALL["dim"])
        assert torch.equal(model(x), before)  # zero init: exactly the backbone
        for blk in model.blocks:
            randomize(blk.mlp_branch, std=0.1, seed=3)
        assert (model(x) - before).abs().max() > 1e-3
        blk, tokens = model.blocks[0], torch.randn(2, 17, SMALL["dim"])
        for q in (None, 1):  # every row, and the last block's CLS row alone
            stream = tokens[:, :q] + blk.attn(blk.norm1(tokens), queries=q)  # the residual stream before norm2
            expected = stream + blk.mlp(blk.norm2(stream)) + blk.mlp_branch(stream)  # AdaptFormer Eq. 4
            torch.testing.assert_close(blk(tokens, cls_only=q == 1), expected, atol=1e-6, rtol=0)
    assert {k for k in model.state_dict() if "mlp_branch" in k} == {f"blocks.{i}.mlp_branch.{n}.{w}" for i in range(2)
                                                                   for n in ("down", "up") for w in ("weight", "bias")}


class ScaleShift(nn.Module):
    """SSF (dongzelian/SSF, models/vision_transformer.py, ssf_ada): y = layer(x) * scale + shift, per channel."""

    def __init__(self, layer, dim):
        super().__init__()
        self.layer, self.scale, self.shift = layer, nn.Parameter(torch.ones(dim)), nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return self.layer(x) * self.scale + self.shift


def test_scale_and_shift_attaches_by_replacing_submodules():
    """SSF's places (after patch_embed, every Linear and LayerNorm of a block, the final norm) are submodules that
    vit.py calls by attribute: replacing each in place reaches them all, no forward copied."""
    model = randomize(ours(SMALL, 5), std=0.1)
    x = images(SMALL)
    with torch.no_grad():
        before, features = model(x), model.features(x)
        places = [(model.patch_embed, "proj"), (model, "norm")] + [(m, n) for blk in model.blocks for m, n in (
            (blk, "norm1"), (blk.attn, "qkv"), (blk.attn, "proj"), (blk, "norm2"), (blk.mlp, "fc1"), (blk.mlp, "fc2"))]
        for owner, name in places:
            layer = getattr(owner, name)
            setattr(owner, name, ScaleShift(layer, layer.weight.shape[0]))
        assert torch.equal(model(x), before)  # identity init: exactly the backbone
        s, t = torch.rand(SMALL["dim"]) + 0.5, torch.randn(SMALL["dim"])
        model.norm.scale.copy_(s), model.norm.shift.copy_(t)
        torch.testing.assert_close(model.features(x), features * s + t, atol=1e-5, rtol=0)  # after the final norm
        for owner, name in places[2:]:  # and each block place changes the output (a shift that is not uniform
            shift = getattr(owner, name).shift  # across channels, which the next LayerNorm would take out)
            shift.add_(d := torch.randn(shift.shape))
            assert (model.features(x) - features * s - t).abs().max() > 1e-3, name
            shift.sub_(d)


# ----------------------------------------------------------------------------- drop-path (stochastic depth)


def test_drop_path_off_by_default_and_exact_at_zero():
    model = randomize(ours(SMALL, 5), std=0.1)
    assert [blk.drop_path for blk in model.blocks] == [0.0, 0.0]
    x = images(SMALL)
    with torch.no_grad():
        torch.manual_seed(0)
        trained = model.train()(x)
        assert torch.equal(trained, model.eval()(x))  # nothing random at rate 0, nor any other train-mode change
        t = torch.randn(3, 4, 5)
        assert vit.drop_path(t, 0.0, True) is t and vit.drop_path(t, 0.5, False) is t  # the very same tensor


def test_drop_path_follows_timm_rule_and_matches_timm_in_train_mode():
    cfg = {**SMALL, "depth": 3}
    ref = timm_vit(cfg, 5, 0.1, drop_path_rate=0.5)
    model = vit.load_pretrained(vit.ViT(**cfg, num_classes=5, drop_path=0.5), ref.state_dict(), verbose=False)
    assert [blk.drop_path for blk in model.blocks] == [0.0, 0.25, 0.5]
    assert [blk.drop_path1.drop_prob if i else 0.0 for i, blk in enumerate(ref.blocks)] == [0.0, 0.25, 0.5]
    x = images(cfg, n=16)
    with torch.no_grad():
        for seed in range(3):  # the same random draws, in the same order: the same outputs
            torch.manual_seed(seed)
            expected = ref.train()(x)
            torch.manual_seed(seed)
            torch.testing.assert_close(model.train()(x), expected, atol=1e-5, rtol=0)
        torch.manual_seed(0)
        assert (model(x) - model.eval()(x)).abs().max() > 1e-3  # active in train mode only
        torch.testing.assert_close(model.eval()(x), ref.eval()(x), atol=1e-5, rtol=0)


def test_drop_path_is_per_sample_and_keeps_the_expectation():
    torch.manual_seed(0)
    y = vit.drop_path(torch.ones(40_000, 3, 4), 0.3, training=True)
    assert torch.equal(y.amin((1, 2)), y.amax((1, 2)))  # a whole sample's branch is dropped or kept
    kept = y[:, 0, 0] > 0
    assert y[:, 0, 0].unique().tolist() == [0.0, pytest.approx(1 / 0.7)]
    assert abs(kept.float().mean() - 0.7) < 4 * (0.21 / 40_000) ** 0.5  # within 4 sigma of the keep rate
    assert abs(y.mean() - 1) < 4 * (0.3 / 0.7 / 40_000) ** 0.5  # scaled by 1/keep: the mean is unchanged
    assert torch.equal(vit.drop_path(torch.ones(5, 2), 1.0, True), torch.zeros(5, 2))  # rate 1: always dropped

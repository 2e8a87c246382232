"""E2VPT with num_prompts=0: key-value prompts alone (an ablation of the paper). No visual prompt enters the
sequence, the key-value prompts train, the trainable count is the paper's formula, and importance / prune / rewind
have nothing to prune and run through. CPU, a tiny ViT, well under a second."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

import e2vpt
import plumbing
import vit
from fixtures import randomize

TINY = dict(img_size=32, patch_size=8, dim=32, depth=2, heads=4)  # 16 patches + CLS, head_dim 8


def backbone(**kw):
    return randomize(vit.ViT(**{**TINY, **kw}, num_classes=0), std=0.2, seed=0).eval()


def kv_only(shared_kv=True, T=2, seed=0, **kw):
    torch.manual_seed(seed)
    return e2vpt.E2VPT(backbone(**kw), num_classes=3, num_prompts=0, num_kv_prompts=T, shared_kv=shared_kv)


def batch(n=6):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 32, 32, generator=g), torch.arange(n) % 3


def test_no_visual_prompt_enters_the_sequence():
    model, (x, _) = kv_only(T=0), batch()
    assert model.prompts.shape == (2, 0, 32) and model(x).shape == (6, 3)
    with torch.no_grad():  # no key-value prompts either: the plain ViT's CLS token, 1+N tokens all the way
        h = model.vit.embed(x)  # (B, 1+N, D)
        for blk in model.vit.blocks:
            h = blk(h)
        plain = model.vit.norm(h)[:, 0]
        torch.testing.assert_close(model.eval().features(x), plain, rtol=0, atol=1e-6)
        assert (kv_only(T=2).eval().features(x) - plain).abs().max() > 1e-3  # the key-value prompts reach it


@pytest.mark.parametrize("shared_kv", [True, False])
def test_the_count_is_the_papers_formula(shared_kv):
    model = kv_only(shared_kv, T=5)
    counted = sum(p.numel() for p in model.trainable_parameters())
    formula = 2 * 5 * 32 * (1 if shared_kv else 2) + (32 + 1) * 3  # depth*T*dim (x2 when not shared) + head
    assert counted == formula == e2vpt.E2VPT.trainable_count(model.vit, 3, **model.config)
    with torch.device("meta"):
        base = vit.vit_base_patch16(num_classes=0)
    model = e2vpt.E2VPT(base, num_classes=100, num_prompts=0, num_kv_prompts=5, shared_kv=shared_kv)
    assert sum(p.numel() for p in model.trainable_parameters()) == 46_080 * (2 - shared_kv) + 76_900


@pytest.mark.parametrize("shared_kv", [True, False])
def test_trains_the_key_value_prompts(shared_kv):
    model, (x, y) = kv_only(shared_kv), batch()
    nn.init.normal_(model.head.weight, std=0.1)  # a zero head gives the prompts no gradient
    before = {n: t.clone() for n, t in model.prompt_snapshot().items()}
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    model.train()
    for _ in range(3):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(), loss.backward(), opt.step()
    for name in model.prompt_names[1:]:
        assert (getattr(model, name) - before[name]).abs().max() > 1e-3, name


def test_importance_prune_rewind_have_nothing_to_prune(tmp_path):
    model, (x, y) = kv_only(), batch()
    initial = model.prompt_snapshot()
    with torch.no_grad():
        model.kv_prompts.add_(0.5)
    scores = model.importance([(x, y)])
    assert scores["token"].shape == (0,) and scores["segment"].shape == (0, 16)
    for fractions in ((0.0, 0.0), (0.5, 0.5), (0.9, 0.9)):
        assert model.prune(*fractions, scores) == dict(tokens=0, segments=0, visual_parameters=0)
    assert torch.equal(model.rewind().kv_prompts, initial["kv_prompts"])  # back to the construction values
    assert not torch.equal(model.rewind(fresh=True).kv_prompts, initial["kv_prompts"])  # a new draw
    assert model(x).shape == (6, 3)
    path = tmp_path / "kv.safetensors"  # the empty tensors (prompts, masks) survive a module checkpoint
    plumbing.save_module(model, path, dict(method="e2vpt", config=model.config))
    loaded = plumbing.load_module_state_dict(kv_only(seed=4), load_file(path), head=False)
    assert torch.equal(loaded.kv_prompts, model.kv_prompts) and loaded.prompts.shape == (2, 0, 32)

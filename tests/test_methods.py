"""vpt.py, lora.py, e2vpt.py: each method's defining invariants, parameter counts on ViT-B/16, frozen backbone,
module checkpoints, overfitting one batch, and E2VPT's importance / prune / rewind. CPU, a tiny ViT, seconds."""
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

import e2vpt
import fewshot
import lora
import plumbing
import vit
import vpt
from fixtures import randomize

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(img_size=32, patch_size=8, dim=32, depth=2, heads=4)  # 16 patches + CLS, head_dim 8
BASE = dict(img_size=224, patch_size=16, dim=768, depth=12, heads=12)
METHODS = {  # small settings on the tiny ViT; every generic test runs on each
    "vpt": lambda v, **kw: vpt.VPT(v, num_prompts=3, **kw),
    "vpt-shallow": lambda v, **kw: vpt.VPT(v, num_prompts=3, deep=False, **kw),
    "e2vpt": lambda v, **kw: e2vpt.E2VPT(v, num_prompts=4, num_kv_prompts=2, **kw),
    "e2vpt-separate": lambda v, **kw: e2vpt.E2VPT(v, num_prompts=4, num_kv_prompts=2, shared_kv=False, **kw),
    "lora": lambda v, **kw: lora.LoRA(v, rank=4, **kw),
    "lora-all": lambda v, **kw: lora.LoRA(v, rank=2, targets=("q", "k", "v", "proj"), dropout=0.1, **kw),
}
BASELINES = ("linear", "full", "pvp")  # no module of their own beside a frozen backbone: tests/test_registry.py's
METHODS |= {name: (lambda v, name=name, **kw: fewshot.METHODS[name](v, **kw))  # a new registry entry, at its defaults
            for name in fewshot.METHODS if name not in METHODS and name not in BASELINES}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors run fastest on one thread, and a busy shared machine cannot stall them (with 2 threads on 2
    busy cores a 4 ms step was measured at ~330 ms)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def backbone(seed=0, **kw):
    """A random tiny ViT (the same weights for the same seed), LayerNorm scales near 1 so it is well conditioned."""
    model = randomize(vit.ViT(**{**TINY, **kw}, num_classes=0), std=0.2, seed=seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.add_(1.0)
    return model.eval()


def build(method, num_classes=4, seed=0, **kw):
    torch.manual_seed(seed)  # the method's own initialisation
    return METHODS[method](backbone(**kw), num_classes=num_classes)


def images(n=4, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def backbone_tensors(model):
    """Every backbone tensor by name (LoRA's A and B live inside the wrapped ViT, so they are left out)."""
    return {k: v.detach().clone() for k, v in model.vit.state_dict().items() if ".lora_" not in k}


def backbone_parameters(model):
    return [p for n, p in model.vit.named_parameters() if ".lora_" not in n]


def method_tensors(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")}


def perturb(model, std=0.3, seed=5):
    """Noise on every trainable tensor (the head too), so a round trip cannot pass with tensors left at init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


# -----------------------------------------------------------------------------
# VPT


@pytest.mark.parametrize("deep", [True, False])
def test_vpt_with_no_prompts_is_the_plain_vit(deep):
    model = vpt.VPT(backbone(), num_classes=3, num_prompts=0, deep=deep).eval()
    x = images()
    torch.testing.assert_close(model.features(x), backbone().features(x), rtol=0, atol=1e-6)
    assert sum(p.numel() for p in model.trainable_parameters()) == 3 * TINY["dim"] + 3  # the head only


@pytest.mark.parametrize("deep", [True, False])
def test_vpt_deep_overwrites_the_previous_prompt_outputs(deep):
    """Block 0's outputs at the prompt slots are replaced by noise (a probe hook): VPT-deep must not notice,
    since block 1's slots are overwritten by its own prompts; adding instead of overwriting, or VPT-shallow,
    carries the noise on. Block 1's input slots must hold exactly its prompts."""
    model, x, p = vpt.VPT(backbone(), num_classes=3, num_prompts=3, deep=deep).eval(), images(), 3
    clean = model.features(x)
    seen = {}
    g = torch.Generator().manual_seed(2)
    noise = lambda mod, args, out: torch.cat([out[:, :1], torch.randn(out[:, 1:1 + p].shape, generator=g) * 5,
                                              out[:, 1 + p:]], dim=1)  # (B, 1+p+N, D), prompt slots replaced
    handles = [model.vit.blocks[0].register_forward_hook(noise),
               model.vit.blocks[1].register_forward_pre_hook(lambda mod, args: seen.update(x=args[0]))]
    noisy = model.features(x)
    for h in handles:
        h.remove()
    if deep:
        assert torch.equal(noisy, clean)
        assert torch.equal(seen["x"][:, 1:1 + p], model.prompts[1].expand(len(x), -1, -1))
    else:
        assert (noisy - clean).abs().max() > 1e-3
    assert seen["x"].shape[1] == 1 + p + 16  # the sequence keeps its length


def test_vpt_shallow_and_deep():
    x = images()
    deep, shallow = (vpt.VPT(backbone(), num_classes=3, num_prompts=3, deep=d) for d in (True, False))
    assert (deep.name, shallow.name, deep.prompts.shape[0], shallow.prompts.shape[0]) == ("vpt", "vpt-shallow", 2, 1)
    assert (deep.config["dropout"], shallow.config["dropout"]) == (0.1, 0.0)  # the defaults of the paper / demo
    with torch.no_grad():
        shallow.prompts.copy_(deep.prompts[:1])
    assert (deep.eval().features(x) - shallow.eval().features(x)).abs().max() > 1e-3  # layer 2's prompts differ
    one = [vpt.VPT(backbone(depth=1), num_classes=3, num_prompts=3, deep=d).eval() for d in (True, False)]
    with torch.no_grad():
        one[1].prompts.copy_(one[0].prompts)
    torch.testing.assert_close(one[0].features(x), one[1].features(x), rtol=0, atol=0)  # one layer: the same


def test_vpt_prompt_init():
    v = (6 / (3 * 8**2 + 32)) ** 0.5  # the tiny ViT: patch 8, dim 32
    assert 0.99 * v < vpt.VPT(backbone(), num_classes=2).prompts.abs().max() <= v
    b1 = vit.ViT(img_size=16, patch_size=16, dim=768, depth=1, heads=12, num_classes=0)  # ViT-B's patch and dim
    prompts = vpt.VPT(b1, num_classes=2, num_prompts=50).prompts
    assert 0.0620 < prompts.abs().max() <= 0.0625  # v = sqrt(6 / (3*16*16 + 768))


def test_vpt_xavier_init_is_noahs():
    """init="xavier": xavier_uniform_ on each layer's (1, p, 768), bound sqrt(6 / (768 (p + 1))) (NOAH's, 0.00879 at
    p=100), every layer drawn; the default "vpt" is the same draw as a model built without the option."""
    b1 = vit.ViT(img_size=16, patch_size=16, dim=768, depth=3, heads=12, num_classes=0)
    for p in (1, 100):
        prompts = vpt.VPT(b1, num_classes=2, num_prompts=p, init="xavier").prompts  # (3, p, 768)
        bound = (6 / (768 * (p + 1))) ** 0.5
        assert prompts.abs().amax((1, 2)).min() > 0.97 * bound and prompts.abs().max() <= bound
    assert vpt.VPT(b1, num_classes=2, num_prompts=0, init="xavier").prompts.shape == (3, 0, 768)
    torch.manual_seed(3)
    plain = vpt.VPT(backbone(), num_classes=2).prompts
    torch.manual_seed(3)
    assert torch.equal(vpt.VPT(backbone(), num_classes=2, init="vpt").prompts, plain)
    with pytest.raises(ValueError, match="init"):
        vpt.VPT(backbone(), num_classes=2, init="normal")


# -----------------------------------------------------------------------------
# E2VPT: prompts


def test_e2vpt_without_kv_prompts_is_vpt_deep():
    x = images()
    ref = vpt.VPT(backbone(), num_classes=3, num_prompts=4).eval()
    for T in (0, 2):
        model = e2vpt.E2VPT(backbone(), num_classes=3, num_prompts=4, num_kv_prompts=T).eval()
        with torch.no_grad():
            model.prompts.copy_(ref.prompts)
        diff = (model.features(x) - ref.features(x)).abs().max()
        assert diff < 1e-6 if T == 0 else diff > 1e-3  # T>0 does reach the output


def test_e2vpt_kv_prompt_init_and_sharing():
    b1 = vit.ViT(img_size=16, patch_size=16, dim=768, depth=1, heads=12, num_classes=0)  # ViT-B's heads x head_dim
    for T in (1, 5):
        kv = e2vpt.E2VPT(b1, num_classes=2, num_kv_prompts=T).kv_prompts
        bound = (6 / (64 * T)) ** 0.5  # Kaiming-uniform over fan_in = T*64: 0.306 for T=1, 0.137 for T=5
        assert kv.shape == (1, 12, T, 64) and 0.97 * bound < kv.abs().max() <= bound
    sep = e2vpt.E2VPT(b1, num_classes=2, num_kv_prompts=5, shared_kv=False)
    assert not torch.equal(sep.key_prompts, sep.value_prompts) and sep.key_prompts.abs().max() <= (6 / 320) ** 0.5
    # separate K and V set to the shared tensor give the shared model's output; different ones do not
    x, shared, sep = images(), build("e2vpt").eval(), build("e2vpt-separate").eval()
    with torch.no_grad():
        sep.prompts.copy_(shared.prompts), sep.key_prompts.copy_(shared.kv_prompts)
        sep.value_prompts.copy_(shared.kv_prompts)
    torch.testing.assert_close(sep.features(x), shared.features(x), rtol=0, atol=1e-6)
    with torch.no_grad():
        sep.value_prompts.mul_(-1)
    assert (sep.features(x) - shared.features(x)).abs().max() > 1e-3


# -----------------------------------------------------------------------------
# LoRA


@pytest.mark.parametrize("method", ["lora", "lora-all"])
def test_lora_at_init_is_the_plain_vit(method):
    model, x = build(method).eval(), images()
    torch.testing.assert_close(model.features(x), backbone().features(x), rtol=0, atol=1e-6)
    for m in model.adapters():
        bound = m.base.in_features ** -0.5  # kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(d_in), 1/sqrt(d_in))
        assert all(0.5 * bound < a.abs().max() <= bound for a in m.lora_A.values())
        assert all(torch.equal(b, torch.zeros_like(b)) for b in m.lora_B.values())


def test_lora_adapts_only_its_slices():
    model = build("lora")  # q and v
    layer, h = model.vit.blocks[0].attn.qkv, torch.randn(2, 5, TINY["dim"])
    perturb(model)
    out, plain = layer(h).chunk(3, dim=-1), layer.base(h).chunk(3, dim=-1)
    assert torch.equal(out[1], plain[1])  # k untouched
    assert all((out[i] - plain[i]).abs().max() > 1e-3 for i in (0, 2))
    assert layer.scale == 1.0  # alpha / r, alpha = rank by default
    torch.testing.assert_close(out[0], plain[0] + h @ layer.lora_A["q"].T @ layer.lora_B["q"].T)
    assert lora.LoRA(backbone(), num_classes=4, rank=4, alpha=8).vit.blocks[0].attn.qkv.scale == 2.0


@pytest.mark.parametrize("method", ["lora", "lora-all"])
def test_lora_merge_and_unmerge(method):
    model, x = perturb(build(method)).eval(), images()  # B is nonzero now
    before, sd, weights = model(x), plumbing.module_state_dict(model), backbone_tensors(model)
    assert (model.features(x) - backbone().features(x)).abs().max() > 1e-3
    model.merge()
    merged_weights = backbone_tensors(model)
    assert model.merged and any(not torch.equal(merged_weights[k], weights[k]) for k in weights)
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-5)
    assert sd.keys() == plumbing.module_state_dict(model).keys()
    assert all(torch.equal(v, plumbing.module_state_dict(model)[k]) for k, v in sd.items())  # never a merged weight
    model.merge()  # merging twice is a no-op
    assert all(torch.equal(v, backbone_tensors(model)[k]) for k, v in merged_weights.items())
    with pytest.raises(RuntimeError, match="unmerge"):
        model.train()
    model.unmerge().unmerge()
    assert not model.merged
    for k, v in backbone_tensors(model).items():
        torch.testing.assert_close(v, weights[k], rtol=0, atol=1e-6)
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-5)
    fresh = build(method).merge()  # loading into a merged model keeps the frozen weight = W_0 + the loaded update
    plumbing.load_module_state_dict(fresh, sd)
    torch.testing.assert_close(fresh.eval()(x), before, rtol=0, atol=1e-5)


def test_lora_wrapping_renames_the_backbone_keys_and_refuses_twice():
    plain = backbone()
    sd = plain.state_dict()
    model = lora.LoRA(plain, num_classes=2)
    keys = model.vit.state_dict().keys()
    assert {"blocks.0.attn.qkv.base.weight", "blocks.0.attn.qkv.lora_A.q", "blocks.0.attn.qkv.lora_B.v"} <= keys
    assert "blocks.0.attn.qkv.weight" not in keys and "blocks.0.attn.proj.weight" in keys
    with pytest.raises(vit.CheckpointError, match="attn.qkv.base.weight"):  # load before wrapping; nothing remapped
        vit.load_pretrained(model.vit, sd, verbose=False)
    with pytest.raises(ValueError, match="already wrapped"):
        lora.LoRA(model.vit, num_classes=2)
    for bad in (dict(targets=("q", "o")), dict(targets=()), dict(targets=("q", "q")), dict(rank=0)):
        with pytest.raises(ValueError, match="targets"):
            lora.LoRA(backbone(), num_classes=2, **bad)
    for bad in (dict(alpha=True), dict(alpha=0), dict(alpha=float("inf")), dict(dropout=1.0), dict(dropout=-0.1)):
        with pytest.raises(ValueError, match="positive, finite alpha and a dropout in"):
            lora.LoRA(backbone(), num_classes=2, **bad)


# -----------------------------------------------------------------------------
# every method: counts, freezing, training, checkpoints


def test_trainable_counts_on_vit_b16():
    """The docstring formulas on the ViT-B/16 configuration, built on the meta device."""
    def count(make):
        with torch.device("meta"):
            base = vit.ViT(**BASE, num_classes=0)
        model = make(base)
        head = 768 * 100 + 100
        assert sum(p.numel() for p in model.head.parameters()) == head
        return sum(p.numel() for p in model.trainable_parameters()) - head
    with torch.device("meta"):
        assert sum(p.numel() for p in vit.ViT(**BASE, num_classes=0).parameters()) == 85_798_656
    D, L = 768, 12
    for p in (1, 50, 200):
        assert count(lambda v: vpt.VPT(v, num_classes=100, num_prompts=p)) == L * p * D
        assert count(lambda v: vpt.VPT(v, num_classes=100, num_prompts=p, deep=False)) == p * D
    assert count(lambda v: vpt.VPT(v, num_classes=100)) == 460_800
    for P, T in ((10, 5), (32, 5), (1, 1)):
        assert count(lambda v: e2vpt.E2VPT(v, num_classes=100, num_prompts=P,
                                           num_kv_prompts=T)) == L * P * D + L * T * D
        assert count(lambda v: e2vpt.E2VPT(v, num_classes=100, num_prompts=P, num_kv_prompts=T,
                                           shared_kv=False)) == L * P * D + 2 * L * T * D
    assert count(lambda v: e2vpt.E2VPT(v, num_classes=100)) == 138_240
    for r, targets in ((8, ("q", "v")), (4, ("q", "k", "v", "proj")), (16, ("v",)), (1, ("proj",))):
        assert count(lambda v: lora.LoRA(v, num_classes=100, rank=r, targets=targets)) == L * len(targets) * r * 2 * D
    assert count(lambda v: lora.LoRA(v, num_classes=100)) == 294_912


@pytest.mark.parametrize("method", METHODS)
def test_only_the_method_and_its_head_train_and_the_backbone_is_bit_identical(method):
    model, x, y = build(method).train(), images(8), torch.arange(8) % 4
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == set(plumbing.module_state_dict(model)) - {"token_mask", "segment_mask"}  # E2VPT's masks: buffers
    assert {"head.weight", "head.bias"} < names and not any(p.requires_grad for p in backbone_parameters(model))
    frozen, start = backbone_tensors(model), {n: p.detach().clone() for n, p in method_tensors(model).items()}
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(3):  # the zero head passes no gradient on step 1, LoRA's zero B none to A on step 2
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert all(torch.equal(v, frozen[k]) for k, v in backbone_tensors(model).items())
    assert all(p.grad is None for p in backbone_parameters(model))
    assert all(not torch.equal(p, start[n]) for n, p in method_tensors(model).items())


@pytest.mark.parametrize("method", METHODS)
def test_the_backbone_stays_in_eval_mode(method):
    model = build(method).train()
    lora_dropouts = {id(m.dropout) for m in getattr(model, "adapters", list)()}
    assert model.training and all(m.training for m in model.modules() if id(m) in lora_dropouts)
    assert all(not m.training for m in model.vit.modules() if id(m) not in lora_dropouts)
    if hasattr(model, "dropout"):
        assert model.dropout.training  # the prompt dropout follows the method
    assert not any(m.training for m in model.eval().modules())


@pytest.mark.parametrize("method", METHODS)
def test_module_state_dict_round_trip(method):
    a, x = perturb(build(method)), images()
    if method.startswith("e2vpt"):  # a pruned model, so the masks must travel too
        a.prune(0.5, 0.5, {"token": torch.rand(4), "segment": torch.rand(4, 16)})
    sd = plumbing.module_state_dict(a)
    backbone_keys = {"vit." + k for k in backbone_tensors(a)}
    assert sd and not set(sd) & backbone_keys
    assert all(".lora_" in k or k.startswith("head.") for k in sd) if method.startswith("lora") else \
        not any(k.startswith("vit.") for k in sd)
    assert all(v.device.type == "cpu" and not v.requires_grad for v in sd.values())
    other = plumbing.module_state_dict(a)
    other["head.bias"] += 1  # a copy: the model is not changed through it
    assert not torch.equal(a.head.bias, other["head.bias"])
    b = plumbing.load_module_state_dict(build(method, seed=1), sd)
    assert torch.equal(b.eval()(x), a.eval()(x))
    assert set(plumbing.module_state_dict(a, head=False)) == set(sd) - {"head.weight", "head.bias"}


@pytest.mark.parametrize("method", METHODS)
def test_load_module_state_dict_refuses_what_does_not_fit(method):
    sd, model = plumbing.module_state_dict(build(method, seed=3)), build(method)
    before = plumbing.module_state_dict(model)
    key = next(k for k in sd if not k.startswith("head."))
    with pytest.raises(ValueError, match="unexpected vit.blocks.0.norm1.weight"):
        plumbing.load_module_state_dict(model, {**sd, "vit.blocks.0.norm1.weight": torch.zeros(TINY["dim"])})
    with pytest.raises(ValueError, match=f"missing {key}"):
        plumbing.load_module_state_dict(model, {k: v for k, v in sd.items() if k != key})
    with pytest.raises(ValueError, match=f"shape of {key}"):
        plumbing.load_module_state_dict(model, {**sd, key: torch.zeros(*sd[key].shape[:-1], sd[key].shape[-1] + 1)})
    with pytest.raises(ValueError, match="shape of head.weight"):
        plumbing.load_module_state_dict(model, plumbing.module_state_dict(build(method, num_classes=7)))
    assert all(torch.equal(v, plumbing.module_state_dict(model)[k]) for k, v in before.items())  # nothing half-loaded


@pytest.mark.parametrize("method", METHODS)
def test_load_without_head_leaves_the_head_alone(method):
    source, target = perturb(build(method, num_classes=7)), build(method, num_classes=4, seed=2)
    head = {k: v.clone() for k, v in target.head.state_dict().items()}
    # a 7-class head is ignored
    for sd in (plumbing.module_state_dict(source), plumbing.module_state_dict(source, head=False)):
        plumbing.load_module_state_dict(target, sd, head=False)
        assert all(torch.equal(v, target.head.state_dict()[k]) for k, v in head.items())
        mine = plumbing.module_state_dict(target, head=False)
        assert all(torch.equal(v, mine[k]) for k, v in plumbing.module_state_dict(source, head=False).items())


def overfit(model, steps, lr):
    """AdamW on one batch of 16 images and 4 classes; returns the final cross-entropy (train mode, dropout on)."""
    x, y = images(16, seed=7), torch.arange(16) % 4
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return F.cross_entropy(model.eval()(x), y).item()


@pytest.mark.parametrize("method", METHODS)
def test_overfits_one_batch(method):
    assert overfit(build(method), steps=100, lr=1e-2) < 0.1  # measured: 0.001 (LoRA) to 0.022 (VPT-deep)


@pytest.mark.parametrize("method", METHODS)
def test_overfits_one_batch_through_the_method_alone(method):
    """The head fixed at random: only the prompts / low-rank updates can lower the loss (measured from ~6.4 to
    0.001 for LoRA, 0.2 for E2VPT, 0.7 for VPT-deep and 1.0 for VPT-shallow, whose prompts act only at layer 1)."""
    model, x, y = build(method), images(16, seed=7), torch.arange(16) % 4
    with torch.no_grad():
        model.head.weight.copy_(torch.randn(model.head.weight.shape, generator=torch.Generator().manual_seed(3)))
    model.head.requires_grad_(False)
    start = F.cross_entropy(model.eval()(x), y).item()
    assert overfit(model, steps=100, lr=1e-2) < start / 3


@pytest.mark.parametrize("method", METHODS)
def test_runs_in_another_dtype(method):
    """No hard-wired device or dtype: the method follows .to()."""
    model, x = build(method).eval(), images()
    ref = model(x)
    torch.testing.assert_close(model.double()(x.double()).float(), ref, rtol=0, atol=1e-5)


# -----------------------------------------------------------------------------
# E2VPT: importance, pruning, rewinding


def with_random_head(model):
    nn.init.normal_(model.head.weight, generator=torch.Generator().manual_seed(4))  # a zero head has zero importance
    return model


def test_importance_scores():
    model, x = with_random_head(build("e2vpt")).train(), images(8)
    batches = [(x[:4], torch.arange(4)), (x[4:], torch.arange(4))]
    scores = model.importance(batches, F.cross_entropy)
    assert scores["token"].shape == (4,) and scores["segment"].shape == (4, 16) and model.scores is scores
    assert all(s.isfinite().all() and (s >= 0).all() and s.abs().sum() > 0 for s in scores.values())
    assert model.training and not model.token_mask.requires_grad  # mode and masks restored
    assert all(p.grad is None for p in model.parameters())  # the parameters' gradients are untouched
    assert torch.equal(model.importance(batches)["token"], scores["token"])  # eval mode: no dropout; CE by default


def test_signed_and_absolute_importance():
    """Two batches whose losses are exact opposites: the signed mean cancels to 0 (the code), the mean of
    absolute gradients (the paper) is the size of either one."""
    model, x = with_random_head(build("e2vpt")), images(4)
    batches = [(x, torch.ones(4)), (x, -torch.ones(4))]
    loss_fn = lambda logits, sign: (logits.sum(1) * sign).mean()
    one = model.importance(batches[:1], loss_fn, signed=True, token_from="mask")
    absolute, signed = (model.importance(batches, loss_fn, signed=s, token_from="mask") for s in (False, True))
    for k in ("token", "segment"):
        assert signed[k].abs().max() < 1e-7 < one[k].abs().min()
        torch.testing.assert_close(absolute[k], one[k].abs())


def test_prune_keeps_the_minimums_and_only_goes_down():
    model = build("e2vpt")
    with pytest.raises(ValueError, match="importance"):
        model.prune(0.5, 0.5)
    scores = {"token": torch.tensor([0.3, 0.1, 0.4, 0.2]), "segment": torch.arange(64.0).reshape(4, 16).flip(1)}
    info = model.prune(0.5, 0.25, scores)  # tokens 1 and 3; in each token the last 4 segments score lowest
    assert model.token_mask.tolist() == [1, 0, 1, 0] and model.segment_mask[0].tolist() == [1] * 12 + [0] * 4
    assert info == dict(tokens=2, segments=12, visual_parameters=2 * 2 * 12 * 2)  # layers x tokens x segments x dims
    assert (model.prompts[:, 1] == 0).all() and (model.prompts[:, 0, 24:] == 0).all()
    assert (model.prompts[:, 0, :24] != 0).all()
    info = model.prune(1.0, 1.0, {k: -v for k, v in scores.items()})  # reversed scores cannot revive anything
    assert info == dict(tokens=1, segments=4, visual_parameters=2 * 1 * 4 * 2)  # one token, R/4 segments
    assert model.token_mask.tolist() == [1, 0, 0, 0] and model.segment_mask[0].tolist() == [0] * 8 + [1] * 4 + [0] * 4
    few = e2vpt.E2VPT(backbone(), num_classes=2, num_prompts=3, segments=2)
    assert few.prune(1.0, 1.0, {"token": torch.zeros(3), "segment": torch.zeros(3, 2)})["segments"] == 1


def masked_reference(model, x, attend_to_pruned=False):
    """E2VPT the long way: all P prompt tokens stay in the sequence with the masks multiplied in (contiguous
    segments), and an attention mask hides pruned tokens from every query. attend_to_pruned=True: the official
    code's semantics, where a pruned token is a zero vector that stays in the attention."""
    v, P = model.vit, model.prompts.shape[1]
    prompts = model.prompts * model.token_mask[:, None] * model.segment_mask.repeat_interleave(2, dim=1)  # (L, P, D)
    h = v.embed(x)
    for i, blk in enumerate(v.blocks):
        h = torch.cat([h[:, :1], prompts[i].expand(len(x), -1, -1), h[:, 1 + P * (i > 0):]], dim=1)  # (B, 1+P+N, D)
        pk, pv = model.kv_prompt(i)
        keep = torch.cat([torch.ones(pk.shape[1] + 1), model.token_mask, torch.ones(h.shape[1] - 1 - P)]) > 0  # keys
        keep = keep.expand(h.shape[1], -1)  # (queries, T+1+P+N)
        qkv = blk.attn.qkv(blk.norm1(h))  # (B, 1+P+N, 3D)
        q, k, val = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=blk.attn.heads)
        k, val = torch.cat([pk.expand(len(x), -1, -1, -1), k], 2), torch.cat([pv.expand(len(x), -1, -1, -1), val], 2)
        a = F.scaled_dot_product_attention(q, k, val, attn_mask=None if attend_to_pruned else keep)
        h = h + blk.attn.proj(rearrange(a, "b h n d -> b n (h d)"))
        h = h + blk.mlp(blk.norm2(h))
    return v.norm(h)[:, 0]


@pytest.mark.parametrize("method", ["e2vpt", "e2vpt-separate"])
def test_pruned_and_dropped_equals_masked(method):
    model, x = perturb(build(method)).eval(), images()
    torch.testing.assert_close(model.features(x), masked_reference(model, x), rtol=0, atol=1e-5)
    model.prune(0.5, 0.5, {"token": torch.tensor([0.3, 0.1, 0.4, 0.2]), "segment": torch.rand(4, 16)})
    seen = []
    handle = model.vit.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    dropped = model.features(x)
    handle.remove()
    assert seen == [1 + 2 + 16]  # CLS + the 2 kept prompts + 16 patches: pruned tokens are not in the sequence
    torch.testing.assert_close(dropped, masked_reference(model, x), rtol=0, atol=1e-5)
    assert (dropped - masked_reference(model, x, attend_to_pruned=True)).abs().max() > 1e-4  # zeros still count


def test_rewind_then_retrain_keeps_pruned_entries_at_zero():
    model, x, y = build("e2vpt"), images(16, seed=7), torch.arange(16) % 4
    init = model.prompt_snapshot()
    overfit(model, steps=5, lr=1e-2)
    model.prune(0.5, 0.5, model.importance([(x, y)], F.cross_entropy))
    pruned = model.prompt_mask() == 0  # (P, D)
    model.rewind()
    assert torch.equal(model.prompts, init["prompts"] * model.prompt_mask())
    assert torch.equal(model.kv_prompts, init["kv_prompts"])
    overfit(model, steps=5, lr=1e-2)  # a new optimizer, train mode, weight decay 0
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    F.cross_entropy(model.train()(x), y).backward()
    opt.step()
    assert (model.prompts[:, pruned] == 0).all() and (model.prompts[:, ~pruned] != init["prompts"][:, ~pruned]).all()
    model.rewind(fresh=True)
    assert (model.prompts[:, pruned] == 0).all()
    assert not torch.equal(model.prompts[:, ~pruned], init["prompts"][:, ~pruned])
    assert model.prompts.abs().max() <= (6 / (3 * 64 + 32)) ** 0.5
    # the rewind point moves
    loaded = plumbing.load_module_state_dict(build("e2vpt", seed=9), plumbing.module_state_dict(model))
    perturb(loaded).rewind()
    assert torch.equal(loaded.prompts, model.prompts) and torch.equal(loaded.kv_prompts, model.kv_prompts)


def test_method_files_keep_their_budget():
    for name in ("vpt.py", "lora.py", "e2vpt.py"):
        text = (ROOT / name).read_text()
        assert len(text.splitlines()) <= 250, name
        assert "cuda" not in text and 'device="' not in text, name  # no device code in method files

"""The papers' recipes: each preset resolves to its table and explicit flags override it; what the
recipes add to the loop (label smoothing, MixUp/CutMix, drop-path, the schedules, head inits, LoRA over the whole
qkv, E2VPT's official pruning) changes training as it should, and nothing at all when off."""
import json
import math

import pytest
import torch
import torch.nn as nn

import data
import e2vpt
import fewshot
import plumbing
import lora
import vit
from fixtures import randomize

TINY = dict(img_size=32, patch_size=8, dim=32, depth=2, heads=4)


def backbone(seed=0):
    model = randomize(vit.ViT(**TINY, num_classes=0), std=0.2, seed=seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.add_(1.0)
    return model.eval()


@pytest.mark.parametrize("name", fewshot.RECIPES)
def test_each_recipe_resolves_to_its_table_and_flags_override_it(name):
    table = fewshot.RECIPES[name]
    cfg = fewshot.parse(["--recipe", name, "--weights", "x"])
    for key, (value, source) in table.items():
        assert source and (key == "options" or getattr(cfg, key) == value), key
    for f in fewshot.dataclasses.fields(fewshot.Config):  # what the recipe does not name keeps nanopetl's value
        if f.name not in table and f.name not in ("recipe", "weights"):
            assert getattr(cfg, f.name) == f.default, f.name
    assert fewshot.parse(["--recipe", name, "--weights", "x", "--lr", "0.123", "--no-drop-last"]).lr == 0.123
    assert not fewshot.parse(["--recipe", name, "--weights", "x", "--no-drop-last"]).drop_last


def test_recipe_method_options_reach_the_methods_and_flags_still_win():
    noah = fewshot.parse(["--recipe", "noah"])
    assert fewshot.method_options("lora", noah) == dict(rank=8, alpha=None, targets=["qkv"], dropout=0.1)
    assert fewshot.method_options("vpt", fewshot.parse(["--recipe", "vpt"]))["dropout"] == 0.0
    mine = fewshot.parse(["--recipe", "noah", "--opt", "dropout=0.3", "--rank", "4"])
    assert fewshot.method_options("lora", mine) == dict(rank=4, alpha=None, targets=["qkv"], dropout=0.3)


def test_the_schedules():
    cfg = lambda **k: fewshot.dataclasses.replace(fewshot.parse(["--weights", "x"]), **k)
    step = cfg(warmup=0.1)  # today's: (t+1)/W then cosine after warmup, per step
    old = lambda t, W=10, T=100: (t + 1) / W if t < W else 0.5 * (1 + math.cos(math.pi * (t - W) / (T - W)))
    assert all(math.isclose(fewshot.learning_rate(step, 1.0, t, 0, 100, 1), old(t)) for t in range(100))
    vpt = cfg(schedule="epoch", warmup=0.1)  # per epoch, epoch 0 at lr 0
    lrs = [fewshot.learning_rate(vpt, 2.0, t, e, 1000, 100) for e in range(100) for t in (e * 10, e * 10 + 9)]
    assert lrs[0] == lrs[1] == 0.0 and lrs[2] == lrs[3] == 0.2 and lrs[20] == 2.0 and lrs[-1] < 1e-3
    noah = cfg(schedule="timm", warmup=0.1, warmup_lr=1e-6, min_lr=1e-5)
    lrs = [fewshot.learning_rate(noah, 5e-3, 0, e, 100, 100) for e in range(100)]
    assert lrs[0] == lrs[1] == 1e-6 and math.isclose(lrs[6], 1e-6 + 0.5 * (5e-3 - 1e-6))  # one epoch behind
    assert math.isclose(lrs[11], 1e-5 + (5e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 10 / 100)))


def test_the_timm_schedule_runs_on_noahs_clock():
    """Epoch by epoch, --recipe noah's lr equals timm's CosineLRScheduler as NOAH creates and steps it: created with
    its arguments (supernet_train_prompt.py:88-107, timm's create_scheduler), the optimizer's lr read while an epoch
    trains, step(epoch) after it (supernet_train_prompt.py:414)."""
    from timm.scheduler import CosineLRScheduler
    for base, epochs in ((5e-3, 100), (1e-3, 37)):
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base)
        sched = CosineLRScheduler(opt, t_initial=epochs, lr_min=1e-5, warmup_lr_init=1e-6, warmup_t=int(0.1 * epochs),
                                  cycle_limit=1, t_in_epochs=True)
        theirs = []
        for e in range(epochs):
            theirs.append(opt.param_groups[0]["lr"])
            sched.step(e + 0)  # after epoch e, as NOAH's loop does
        cfg = fewshot.dataclasses.replace(fewshot.parse(["--recipe", "noah", "--weights", "x"]), lr=base)
        ours = [fewshot.learning_rate(cfg, base, 0, e, epochs * 10, epochs) for e in range(epochs)]
        assert all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) for a, b in zip(ours, theirs)), (ours, theirs)


def tiny_task():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (8, 3, 32, 32), generator=g, dtype=torch.uint8)
    split = data.Split(images, torch.arange(8) % 4)
    return data.Task("tiny", 4, split, split, split, 32, (0.5,) * 3, (0.5,) * 3, "none")


class Recorder(nn.Module):
    """A VPT that keeps what it was fed and whether its backbone blocks were in train mode."""

    def __init__(self, model):
        super().__init__()
        self.model, self.seen = model, []

    def forward(self, x):
        self.seen.append(x.clone())
        return self.model(x)


def trained(**flags):
    torch.manual_seed(0)
    model = fewshot.METHODS["vpt"](backbone(), num_classes=4, num_prompts=2)
    cfg = fewshot.dataclasses.replace(fewshot.parse(["--weights", "x", "--max-steps", "2", "--batch", "4"]), **flags)
    rec = Recorder(model)
    fewshot.train(rec, tiny_task().train, tiny_task(), cfg, torch.device("cpu"), seed=0)
    return model, rec.seen


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(plumbing.module_state_dict(a).values(),
                                                 plumbing.module_state_dict(b).values()))


def test_label_smoothing_mixup_cutmix_and_drop_path_change_training_and_nothing_when_off():
    plain, seen = trained()
    again, seen_again = trained(label_smoothing=0.0, mixup=0.0, cutmix=0.0, drop_path=0.0)
    assert same(plain, again) and all(torch.equal(a, b) for a, b in zip(seen, seen_again))
    assert not same(plain, trained(label_smoothing=0.1)[0])
    for flags in (dict(mixup=0.8), dict(cutmix=1.0), dict(mixup=0.8, cutmix=1.0)):
        model, mixed = trained(**flags)
        assert not any(torch.equal(a, b) for a, b in zip(seen, mixed)) and not same(plain, model)  # mixed inputs
    assert not same(plain, trained(drop_path=0.5)[0])


def test_drop_path_on_is_active_in_the_frozen_backbone_and_restored_after():
    model = fewshot.METHODS["vpt"](backbone(), num_classes=4, num_prompts=2).eval()  # no prompt dropout draws
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():  # features: the head starts at zero
        base = model.features(x)
        restore = fewshot.drop_path_on(model, 0.5)
        rates = [blk.drop_path for blk in model.vit.blocks]
        dropped = [model.features(x) for _ in range(3)]
        restore()
        after = model.features(x)
    assert rates == [0.0, 0.5] and any(not torch.allclose(d, base) for d in dropped)
    assert torch.equal(after, base) and all(not blk.training and blk.drop_path == 0 for blk in model.vit.blocks)
    assert fewshot.drop_path_on(model, 0.0)() is None and torch.equal(model.features(x).detach(), base)


def test_head_inits():
    model = fewshot.METHODS["linear"](backbone(), num_classes=500)
    task = tiny_task()
    fewshot.init_head(model, task.train, task, torch.device("cpu"), "trunc_normal")
    w = model.head.weight
    assert abs(w.std().item() - 0.02) < 0.003 and model.head.bias.abs().max() == 0  # cut at +-2, as timm: ~never
    fewshot.init_head(model, task.train, task, torch.device("cpu"), "kaiming")
    assert torch.allclose(model.head.bias, torch.full((500,), -math.log(99)))
    assert abs(model.head.weight.std().item() - math.sqrt(2 / 500)) < 0.01  # fan_out = classes


def test_lora_over_the_whole_qkv_adapts_q_k_and_v_with_one_pair():
    model = lora.LoRA(backbone(), num_classes=4, rank=2, targets=("qkv",))
    layer = model.vit.blocks[0].attn.qkv
    assert (set(layer.lora_A) == {"qkv"} and layer.lora_A["qkv"].shape == (2, 32)
            and layer.lora_B["qkv"].shape == (96, 2))
    with torch.no_grad():
        layer.lora_B["qkv"].normal_()
        x = torch.randn(1, 5, 32)
        delta = layer(x) - layer.base(x)
    assert all(delta[..., i * 32:(i + 1) * 32].abs().max() > 0 for i in range(3))  # q, k and v all move
    with pytest.raises(ValueError, match="qkv"):
        lora.LoRA(backbone(), num_classes=4, targets=("qkv", "q"))


def test_the_token_mask_gradient_is_layernorm_noise_so_tokens_are_scored_by_segments():
    torch.manual_seed(0)
    model = e2vpt.E2VPT(backbone(), num_classes=4, num_prompts=6, num_kv_prompts=2)
    nn.init.normal_(model.head.weight, std=0.5)
    batch = [(torch.randn(8, 3, 32, 32), torch.arange(8) % 4)]
    official = model.importance(batch, token_from="mask")
    assert official["token"].mean() < 1e-2 * official["segment"].mean()  # eps-sized against the segments
    ours = model.importance(batch)
    torch.testing.assert_close(ours["token"], ours["segment"].sum(1))


def test_official_pruning_chooses_the_pair_on_val_and_records_it(tmp_path):
    from safetensors.torch import save_file
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in vit.vit_synthetic(num_classes=0).state_dict().items()},
              tmp_path / "b.safetensors")
    argv = ["--weights", str(tmp_path / "b.safetensors"), "--arch", "vit_synthetic", "--data", "synthetic:shape",
            "--shots", "1", "--seeds", "0", "--max-steps", "2", "--method", "e2vpt", "--out", str(tmp_path / "out")]
    assert fewshot.main([*argv, "--prune", "official", "--prune-grid", "0.25,0.5"]) == 0
    assert fewshot.main([*argv, "--prune", "none"]) == 0
    official, none = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    grid = official["prune_grid"]
    assert [g[:2] for g in grid] == [[0.25, 0.25], [0.25, 0.5], [0.5, 0.25], [0.5, 0.5]]
    best = max(grid, key=lambda g: (g[2], -g[3]))  # ties: the more pruned tokens (E2VPT's find_best_MtMtp)
    assert official["pruned"]["fractions"] == best[:2] and official["protocol"]["prune"] == "official"
    assert "pruned" not in none and none["key"] != official["key"]


def test_e2vpt_official_search_trains_as_the_official_flow(tmp_path, monkeypatch, capsys):
    """--grid --prune official: lr x wd without pruning (2), one training at the choice and the pair grid (4), then
    every seed trains the chosen masks once from a fresh start (2 seeds): 2 + 1 + 4 + 2 trainings, the count said
    before the search starts. Pairs whose masks are equal train once (0.9 of 16 segments keeps 4, as 0.8 does)."""
    from safetensors.torch import save_file
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in vit.vit_synthetic(num_classes=0).state_dict().items()},
              tmp_path / "b.safetensors")
    calls, real = [], fewshot.train
    monkeypatch.setattr(fewshot, "train", lambda *a, **k: calls.append(k.get("desc")) or real(*a, **k))
    argv = ["--weights", str(tmp_path / "b.safetensors"), "--arch", "vit_synthetic", "--data", "synthetic:shape",
            "--shots", "1", "--seeds", "0,1", "--max-steps", "2", "--method", "e2vpt", "--prune", "official", "--grid",
            "--grid-lr", "0.01,0.001", "--grid-wd", "0", "--out", str(tmp_path / "out")]
    assert fewshot.main([*argv, "--prune-grid", "0.2,0.5"]) == 0
    assert len(calls) == 2 + 1 + 4 + 2 and sum("pruned" in c for c in calls) == 4
    assert "2 lr x wd trainings, then 1 and at most 4 pair trainings" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert all(r["chosen"]["pruned"] == rows[0]["chosen"]["pruned"] for r in rows) and "pruned" not in rows[0]
    calls.clear()
    assert fewshot.main([*argv, "--prune-grid", "0.8,0.9", "--out", str(tmp_path / "dedupe")]) == 0
    assert sum("pruned" in c for c in calls) == 2  # 0.8 and 0.9 of 10 tokens differ (8, 9); of 16 segments not

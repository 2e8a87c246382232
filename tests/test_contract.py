"""The method contract, checked generically for every entry of fewshot.METHODS (read from the registry, never listed
by hand), by plain check functions that take a registry entry:

  check_merge(build)   merge() then forward equals the unmerged forward (1e-5), after the trainable tensors were
                       perturbed so the update is not zero; merge() changes some weight; unmerge() restores every
                       tensor of the model (1e-6); the module (plumbing.module_state_dict) is the same merged or not
  check_counts(build)  trainable_count(vit, num_classes, **model.config) equals the parameters with requires_grad on
                       the defaults (tiny ViT), on every option changed one at a time (values derived from the
                       option's default), and on a wider, deeper ViT

`pvp` builds the type its checkpoint records: it is checked on module checkpoints made here from the other entries.
The checks are themselves tested: a small toy method (ScaleShift toy: y = gamma * proj(x) + beta after every block's
attention projection, folded into the projection by merge) passes both, and two planted bugs are rejected: a merge
that drops the shift, and a trainable_count that ignores an option."""
import functools
import inspect
import math

import pytest
import torch
import torch.nn as nn

import fewshot
import plumbing
import vit
from fixtures import randomize

TINY = dict(img_size=32, patch_size=8, dim=32, depth=2, heads=4)
WIDE = dict(img_size=32, patch_size=8, dim=48, depth=3, heads=4)  # another width and depth


def tiny(seed=0):
    return randomize(vit.ViT(**TINY, num_classes=0), std=0.2, seed=seed).eval()


def wide(seed=0):
    return randomize(vit.ViT(**WIDE, num_classes=0), std=0.2, seed=seed).eval()


REFUSED = (ValueError, TypeError)  # how a constructor refuses an option value

# -----------------------------------------------------------------------------
# the generic checks: plain functions of a registry entry


def counted(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def check_count(build, make_vit=tiny, num_classes=7, **options):
    """One configuration: the entry's formula, on the options as the model resolved them, against the parameters
    that train. Returns the model."""
    torch.manual_seed(0)
    model = build(make_vit(), num_classes=num_classes, **options)
    n, formula = counted(model), type(model).trainable_count(make_vit(), num_classes, **model.config)
    assert n == formula, (f"{getattr(model, 'name', type(model).__name__)} with config {model.config} on "
                          f"{make_vit().dim}-dim x {len(make_vit().blocks)}: trainable_count says {formula}, "
                          f"{n} parameters train")
    return model


def candidates(value):
    """Values other than `value` of its kind, the likeliest to be accepted first."""
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [v for v in (value * 2, value + 1, value - 1, 1, 2) if v != value and v >= 0]
    if isinstance(value, float):
        inside = [value / 2, (value + 1) / 2] if 0 < value < 1 else []  # a fraction stays a fraction
        return [v for v in (*inside, 0.5, 0.25, value * 2, value + 1, 0.0) if v != value and math.isfinite(v)]
    if isinstance(value, (tuple, list)):
        kind = type(value)
        return [v for v in (kind(value[:1]), kind(value[1:]), kind(value[::-1]), kind(value[:-1]))
                if v and v != value]
    if isinstance(value, str):
        return [value.upper(), value[::-1]]
    return []


def derived_options(build, make_vit=tiny):
    """{option: a non-default value the constructor accepts} for each option of the entry that has one; an option
    whose default is None is changed from the value the model resolved it to."""
    resolved = build(make_vit(), num_classes=3).config
    found = {}
    for name, default in plumbing.options_of(build).items():
        if default is inspect.Parameter.empty:
            continue  # a required argument, not an option with a default
        base = resolved.get(name, default) if default is None else default
        for value in candidates(base):
            try:
                build(make_vit(), num_classes=3, **{name: value})
            except REFUSED:
                continue
            found[name] = value
            break
    return found


def check_counts(build):
    """trainable_count on at least three configurations: the defaults on the tiny ViT, every derivable non-default
    option (one at a time, at least one must build) on it, and the defaults on a wider, deeper ViT."""
    check_count(build, tiny)
    changed = derived_options(build)
    assert changed or not plumbing.options_of(build), (
        f"no non-default configuration of options {plumbing.options_of(build)} could be built")
    for name, value in changed.items():
        check_count(build, tiny, **{name: value})
    check_count(build, wide)
    return changed


@torch.no_grad()
def check_merge(build, make_vit=tiny, **options):
    """merge() folds a non-zero update into the weights without changing the forward; unmerge() takes it out."""
    torch.manual_seed(0)
    model = build(make_vit(), num_classes=5, **options).eval()
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        if p.requires_grad:  # a zero-started update (LoRA's B, a shift) must be non-zero for the check to mean much
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    x = torch.randn(4, 3, model.vit.img_size, model.vit.img_size, generator=g)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    module = plumbing.module_state_dict(model)
    unmerged = model(x)
    model.merge()
    after = model.state_dict()
    assert any(not torch.equal(after[k], v) for k, v in before.items()), "merge() changed no weight"
    merged = model(x)
    assert torch.allclose(merged, unmerged, rtol=0, atol=1e-5), (
        f"merged forward differs from the unmerged by {(merged - unmerged).abs().max():.2e}")
    now = plumbing.module_state_dict(model)
    assert now.keys() == module.keys() and all(torch.equal(now[k], module[k]) for k in module), (
        "merge() changed the module's own tensors (it may edit only frozen weights)")
    model.unmerge()
    after = model.state_dict()
    worst = {k: (after[k] - v).abs().max().item() for k, v in before.items() if v.is_floating_point() and v.numel()}
    assert after.keys() == before.keys() and max(worst.values()) <= 1e-6, (
        f"unmerge() left {max(worst, key=worst.get)} off by {max(worst.values()):.2e}")
    assert torch.allclose(model(x), unmerged, rtol=0, atol=1e-5), "the forward after unmerge() differs"
    return model

# -----------------------------------------------------------------------------
# the registry's entries; pvp from module checkpoints made here


NAMES = [n for n in fewshot.METHODS if n != "pvp"]


def has_module(name):
    """Whether the entry has tensors of its own beside a frozen backbone (what a module checkpoint holds)."""
    backbone = tiny()
    frozen = list(backbone.parameters())  # before the method wraps anything
    model = fewshot.METHODS[name](backbone, num_classes=3)
    own = [n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")]
    return bool(own) and not any(p.requires_grad for p in frozen)


SOURCES = [n for n in NAMES if has_module(n)]  # what pvp can start from


def module_checkpoint(path, name, make_vit=tiny, **options):
    torch.manual_seed(0)
    model = fewshot.METHODS[name](make_vit(), num_classes=3, **options)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    plumbing.save_module(model, path, dict(method=name, config=model.config, backbone="tiny",
                                          backbone_hash=plumbing.weights_hash(make_vit())))
    return path


def test_the_registry_is_read():
    assert NAMES and "pvp" in fewshot.METHODS and SOURCES
    for name, build in fewshot.METHODS.items():
        assert callable(build) and "num_classes" in inspect.signature(build).parameters, name


@pytest.mark.parametrize("name", fewshot.METHODS)
def test_the_model_has_the_contract_s_parts(name, tmp_path):
    build = fewshot.METHODS[name]
    options = {}
    if name == "pvp":
        options = dict(checkpoint=module_checkpoint(tmp_path / "m.safetensors", SOURCES[0]))
    model = build(tiny(), num_classes=5, **options)
    kind = type(model)
    assert isinstance(model.config, dict) and isinstance(model.head, nn.Linear) and model.head.out_features == 5
    if name != "pvp":
        assert set(model.config) <= set(plumbing.options_of(build)), "config holds something that is not an option"
    assert isinstance(inspect.getattr_static(kind, "trainable_count"), (staticmethod, classmethod))
    assert hasattr(kind, "merge") == hasattr(kind, "unmerge"), "merge() without unmerge() (or the reverse)"
    x = torch.randn(2, 3, 32, 32)
    assert model.eval().features(x).shape == (2, 32) and model(x).shape == (2, 5)


@pytest.mark.parametrize("name", NAMES)
def test_trainable_count_on_three_configurations(name):
    check_counts(fewshot.METHODS[name])


@pytest.mark.parametrize("source", SOURCES)
def test_pvp_trainable_count_on_three_configurations(source, tmp_path):
    """pvp's options are its checkpoint's: one from the defaults, one per non-default option, one on the wide ViT."""
    pvp = fewshot.METHODS["pvp"]
    check_count(pvp, tiny, checkpoint=module_checkpoint(tmp_path / "d.safetensors", source))
    changed = derived_options(fewshot.METHODS[source])
    assert changed
    for name, value in changed.items():
        path = module_checkpoint(tmp_path / f"{name}.safetensors", source, **{name: value})
        assert check_count(pvp, tiny, checkpoint=path).config[name] == value
    check_count(pvp, wide, checkpoint=module_checkpoint(tmp_path / "w.safetensors", source, wide))


MERGEABLE = [n for n in NAMES if hasattr(fewshot.METHODS[n](tiny(), num_classes=3), "merge")]


@pytest.mark.parametrize("name", NAMES)
def test_merge_is_exact_and_unmerge_restores(name):
    if name not in MERGEABLE:
        pytest.skip(f"{name} has no merge()")
    build = fewshot.METHODS[name]
    check_merge(build)
    for option, value in derived_options(build).items():  # every mergeable configuration, not only the defaults
        check_merge(build, **{option: value})
    check_merge(build, wide)


def test_pvp_merge_is_exact_and_unmerge_restores(tmp_path):
    """pvp has merge() when its checkpoint's type has: checked on a module of each mergeable source."""
    sources = [n for n in SOURCES if n in MERGEABLE]
    if not sources:
        pytest.skip("no registry entry with a module checkpoint has merge()")
    for source in sources:
        check_merge(fewshot.METHODS["pvp"], checkpoint=module_checkpoint(tmp_path / f"{source}.safetensors", source))

# -----------------------------------------------------------------------------
# the checks themselves: a correct toy mergeable method passes, each planted bug is rejected


class ScaleShiftLinear(nn.Module):
    """A frozen Linear followed by gamma * y + beta (per output channel); merge folds them into its weight and bias."""

    def __init__(self, base, shift, init_scale):
        super().__init__()
        self.base, self.merged = base, False
        self.gamma = nn.Parameter(torch.full((base.out_features,), float(init_scale)))
        self.beta = nn.Parameter(torch.zeros(base.out_features)) if shift else None

    def forward(self, x):
        y = self.base(x)
        if self.merged:
            return y
        y = y * self.gamma
        return y if self.beta is None else y + self.beta

    def folded_shift(self):
        return self.beta if self.beta is not None else torch.zeros_like(self.gamma)

    @torch.no_grad()
    def merge(self, sign=1):
        """W' = gamma W, b' = gamma b + beta; sign=-1 undoes it."""
        if sign > 0:
            self.base.weight.mul_(self.gamma[:, None])
            self.base.bias.mul_(self.gamma).add_(self.folded_shift())
        else:
            self.base.bias.sub_(self.folded_shift()).div_(self.gamma)
            self.base.weight.div_(self.gamma[:, None])
        self.merged = sign > 0


class ScaleShiftToy(nn.Module):
    """ScaleShift toy: a ScaleShiftLinear around every block's attn.proj of a frozen ViT, and a new head."""

    name = "scaleshift-toy"
    layer = ScaleShiftLinear

    def __init__(self, vit, *, num_classes, shift=True, init_scale=1.0):
        super().__init__()
        if not (isinstance(init_scale, (int, float)) and init_scale > 0):
            raise ValueError(f"init_scale must be positive, got {init_scale!r}")
        self.config = dict(shift=shift, init_scale=init_scale)
        self.vit = vit.requires_grad_(False).eval()
        for blk in vit.blocks:
            blk.attn.proj = self.layer(blk.attn.proj, shift, init_scale)
        self.head = nn.Linear(vit.dim, num_classes)
        nn.init.zeros_(self.head.weight), nn.init.zeros_(self.head.bias)

    def adapters(self):
        return [m for m in self.vit.modules() if isinstance(m, ScaleShiftLinear)]

    def merge(self):
        for m in self.adapters():
            if not m.merged:
                m.merge(+1)
        return self

    def unmerge(self):
        for m in self.adapters():
            if m.merged:
                m.merge(-1)
        return self

    def features(self, images):
        return self.vit.features(images)

    def forward(self, images):
        return self.head(self.features(images))

    @staticmethod
    def trainable_count(vit, num_classes, *, shift, init_scale):
        return len(vit.blocks) * vit.dim * (1 + shift) + (vit.dim + 1) * num_classes


class DropsTheShift(ScaleShiftLinear):
    def folded_shift(self):  # planted bug: beta is not folded in (and not taken out again)
        return torch.zeros_like(self.gamma)


class MergeDropsTheShift(ScaleShiftToy):
    layer = DropsTheShift


class CountIgnoresShift(ScaleShiftToy):
    @staticmethod
    def trainable_count(vit, num_classes, *, shift, init_scale):  # planted bug: beta counted whether or not it is
        return len(vit.blocks) * vit.dim * 2 + (vit.dim + 1) * num_classes


def test_the_correct_toy_passes_both_checks():
    assert check_counts(ScaleShiftToy) == dict(shift=False, init_scale=0.5)
    check_merge(ScaleShiftToy), check_merge(ScaleShiftToy, shift=False), check_merge(ScaleShiftToy, wide)


def test_a_merge_that_drops_the_shift_is_rejected():
    check_counts(MergeDropsTheShift)  # its count is right: only the merge check can catch it
    with pytest.raises(AssertionError, match="merged forward differs"):
        check_merge(MergeDropsTheShift)


def test_a_count_that_ignores_an_option_is_rejected():
    check_merge(CountIgnoresShift)
    check_count(CountIgnoresShift)  # right on the defaults and on another ViT: the bug hides there ...
    check_count(CountIgnoresShift, wide)
    with pytest.raises(AssertionError, match="trainable_count says"):
        check_counts(CountIgnoresShift)  # ... and shows once shift is changed


def test_a_registry_entry_built_by_partial_is_checked_on_its_own_options():
    """A functools.partial entry (as vpt-shallow) exposes its bound keywords as options with defaults."""
    entry = functools.partial(CountIgnoresShift, shift=False)
    assert plumbing.options_of(entry) == dict(shift=False, init_scale=1.0)
    with pytest.raises(AssertionError, match="trainable_count says"):
        check_count(entry)

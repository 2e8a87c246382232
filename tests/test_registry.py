"""The method contract, checked over fewshot.METHODS whatever the names in it: every registered method
keeps the backbone frozen and gradient-free (or trains it, and says so), round-trips its module, counts its
trainable parameters by its docstring's formula, survives a PVP checkpoint, and runs through both scripts. A new
method file written the way the README says runs through fewshot.py and pvp_pretrain.py with no other edit."""
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fewshot
import plumbing
import pvp_pretrain
import vit
from fixtures import randomize, run_copy, save_backbone

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(img_size=32, patch_size=8, dim=32, depth=2, heads=4)


def backbone(seed=0):
    return randomize(vit.ViT(**TINY, num_classes=0), std=0.2, seed=seed).eval()


def pretrainable(name, ckpt):
    """Whether PVP can pre-train it: a module beside a frozen backbone (pvp_pretrain.py's own check)."""
    model, frozen = make(name, ckpt)
    own = [n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")]
    return name != "pvp" and bool(own) and not any(p.requires_grad for p in frozen.values())


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A VPT-deep module checkpoint made on backbone(0): what the registry's `pvp` entry starts from."""
    path = tmp_path_factory.mktemp("registry") / "pvp.safetensors"
    model = fewshot.METHODS["vpt"](backbone(), num_classes=3, num_prompts=3)
    plumbing.save_module(model, path, dict(method="vpt", config=model.config, backbone="tiny",
                                          backbone_hash=plumbing.weights_hash(backbone())))
    return path


def make(name, ckpt, num_classes=4, seed=0):
    """(the method built by the registry on a fresh tiny backbone, that backbone's own parameters by name)."""
    bb = backbone()
    frozen = dict(bb.named_parameters())  # before the method wraps anything
    torch.manual_seed(seed)
    return fewshot.build(name, bb, num_classes, fewshot.parse(["--pvp-init", str(ckpt)])), frozen


def step(model, n=3):
    x, y = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.arange(8) % 4
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(n):  # a zero head passes no gradient on step 1, a zero LoRA B none to A on step 2
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return x


@pytest.mark.parametrize("name", fewshot.METHODS)
def test_the_backbone_is_untouched_and_gets_no_gradient(name, ckpt):
    model, frozen = make(name, ckpt)
    before = {k: v.detach().clone() for k, v in frozen.items()}
    trains_backbone = any(p.requires_grad for p in frozen.values())
    step(model)
    if trains_backbone:  # full fine-tuning: the one method that says it trains the backbone
        assert getattr(model, "trains_backbone", False) and any(
            not torch.equal(v, before[k]) for k, v in frozen.items())
    else:
        assert all(torch.equal(v, before[k]) and v.grad is None for k, v in frozen.items())
    ids = {id(p) for p in frozen.values()}
    layers = [m for m in model.vit.modules() if any(id(p) in ids for p in m.parameters(recurse=False))]
    assert model.training and all(m.training == trains_backbone for m in layers)  # frozen layers stay in eval


@pytest.mark.parametrize("name", fewshot.METHODS)
def test_module_state_dict_round_trip(name, ckpt):
    a, _ = make(name, ckpt)
    x = step(a)
    b, _ = make(name, ckpt, seed=1)
    plumbing.load_module_state_dict(b, plumbing.module_state_dict(a))
    assert torch.equal(b.eval()(x), a.eval()(x))
    with pytest.raises(ValueError):
        plumbing.load_module_state_dict(b, {**plumbing.module_state_dict(a), "not.a.tensor.of.it": torch.zeros(1)})


@pytest.mark.parametrize("name", fewshot.METHODS)
def test_trainable_count_is_the_docstring_formula(name, ckpt):
    model, _ = make(name, ckpt, num_classes=7)
    counted = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counted == type(model).trainable_count(backbone(), 7, **model.config)


@pytest.mark.parametrize("name", fewshot.METHODS)
def test_a_pvp_checkpoint_round_trips(name, ckpt, tmp_path):
    if not pretrainable(name, ckpt):
        pytest.skip(f"{name} has no module beside a frozen backbone: nothing for PVP to pre-train")
    model, _ = make(name, ckpt, num_classes=9)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    path = tmp_path / "m.safetensors"
    plumbing.save_module(model, path, dict(method=name, config=model.config, backbone="tiny",
                                          backbone_hash=plumbing.weights_hash(backbone())))
    loaded = fewshot.METHODS["pvp"](backbone(), num_classes=4, checkpoint=path)
    assert type(loaded) is type(model) and json.dumps(loaded.config) == json.dumps(model.config)
    mine, theirs = plumbing.module_state_dict(loaded, head=False), plumbing.module_state_dict(model, head=False)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def micro(tmp_path, *extra):
    return ["--weights", str(tmp_path / "bb.safetensors"), "--arch", "vit_synthetic", *extra]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    save_backbone(d / "bb.safetensors", seed=0)
    return d


@pytest.mark.parametrize("name", [m for m in fewshot.METHODS if m not in ("linear", "full", "pvp")])
def test_pretrained_and_then_started_from_through_both_scripts(name, world, tmp_path):
    """pvp_pretrain.py --method NAME, then fewshot.py --method pvp from it: the row names the module, and pvp
    follows the module's recipe (E2VPT pruned and rewound, LoRA merged for evaluation)."""
    ck = tmp_path / f"{name}.safetensors"
    assert pvp_pretrain.main(micro(world, "--method", name, "--per-class", "2", "--epochs", "1", "--out", str(ck))) == 0
    assert fewshot.main(micro(world, "--method", "pvp", "--pvp-init", str(ck), "--data", "synthetic:shape", "--shots",
                              "1", "--seeds", "0", "--max-steps", "2", "--out", str(tmp_path / "out"))) == 0
    [r] = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert (r["status"] == "ok" and r["row"] == f"pvp({name})"
            and f"| pvp({name}) |" in (tmp_path / "out" / "summary.md").read_text())
    assert ("pruned" in r) == (name == "e2vpt")
    if name == "lora":
        model, _ = fewshot.fit("pvp", *task_and_backbone(world), fewshot.parse(micro(world, "--pvp-init", str(ck),
                                                                                    "--max-steps", "1")),
                               torch.device("cpu"), seed=0)
        assert model.merged


def task_and_backbone(world):
    import data
    [task] = data.load_task("synthetic:shape", shots=1, seed=0)
    return task, plumbing.load_backbone(str(world / "bb.safetensors"), "vit_synthetic")[0]


ADAPTER = '''"""
Bottleneck adapter after each MLP (Houlsby et al. 2019, arXiv 1902.00751, Sec. 2.1, one adapter per block):
    mlp'(x) = mlp(x) + up(relu(down(mlp(x))))      down: dim -> bottleneck, up: bottleneck -> dim, up = 0 at init
    trainable = depth * (2 * dim * bottleneck + bottleneck + dim) + (dim+1)*classes
"""
import torch.nn as nn


class Adapted(nn.Module):
    def __init__(self, mlp, dim, bottleneck):
        super().__init__()
        self.mlp, self.down, self.up = mlp, nn.Linear(dim, bottleneck), nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight), nn.init.zeros_(self.up.bias)

    def forward(self, x):
        h = self.mlp(x)
        return h + self.up(self.down(h).relu())


class Adapter(nn.Module):
    def __init__(self, vit, *, num_classes, bottleneck=8):
        super().__init__()
        self.config = dict(bottleneck=bottleneck)
        self.vit = vit.requires_grad_(False).eval()
        for blk in vit.blocks:  # in-place replacement of a submodule, as LoRA does
            blk.mlp = Adapted(blk.mlp, vit.dim, bottleneck)
        self.head = nn.Linear(vit.dim, num_classes)
        nn.init.zeros_(self.head.weight), nn.init.zeros_(self.head.bias)

    def train(self, mode=True):
        super().train(mode)
        self.vit.eval()
        return self

    def features(self, images):
        return self.vit.features(images)

    def forward(self, images):
        return self.head(self.features(images))

    @staticmethod
    def trainable_count(vit, num_classes, *, bottleneck):
        return len(vit.blocks) * (2 * vit.dim * bottleneck + bottleneck + vit.dim) + (vit.dim + 1) * num_classes
'''


def test_a_new_method_file_plus_one_entry_runs_in_both_scripts(world, tmp_path):
    """As the README's 'Adding a method' says: a file, its import, one registry entry; nothing else is edited."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for f in ROOT.glob("*.py"):
        shutil.copy(f, repo / f.name)
    (repo / "adapter.py").write_text(ADAPTER)
    source = (repo / "fewshot.py").read_text()
    source, n_import = re.subn(r"^import e2vpt$", "import adapter\nimport e2vpt", source, flags=re.M)
    source, n_entry = re.subn(r'^(\s+)"pvp": pvp,$', r'\1"adapter": adapter.Adapter,\n\1"pvp": pvp,', source,
                              flags=re.M)
    assert n_import == n_entry == 1, "the README's two lines no longer fit fewshot.py"
    (repo / "fewshot.py").write_text(source)
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo), "HOME": str(tmp_path)}
    run = lambda script, *a: run_copy(repo, script, *micro(world, *a), env=env)  # noqa: E731 (repo's own modules)
    sweep = ("--data", "synthetic:shape", "--shots", "1", "--seeds", "0", "--max-steps", "2")
    r = run("fewshot.py", "--method", "adapter,pvp", "--opt", "bottleneck=4", *sweep, "--pvp-init",
            str(repo / "a.safetensors"), "--out", str(tmp_path / "refused"))
    assert r.returncode == 1 and "no module checkpoint" in r.stderr  # not built yet: refused up front
    r = run("pvp_pretrain.py", "--method", "adapter", "--opt", "bottleneck=4", "--per-class", "2", "--epochs", "1",
            "--out", str(repo / "a.safetensors"))
    assert r.returncode == 0, r.stderr[-2000:]
    r = run("fewshot.py", "--method", "adapter,pvp", "--opt", "bottleneck=4", *sweep, "--pvp-init",
            str(repo / "a.safetensors"), "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [x["row"] for x in rows] == ["adapter", "pvp(adapter)"] and all(x["status"] == "ok" for x in rows)
    assert rows[0]["config"] == dict(bottleneck=4) and rows[0]["trainable"] == rows[1]["trainable"] == \
        6 * (2 * 128 * 4 + 4 + 128) + 129 * 16

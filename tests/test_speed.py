"""What keeps a few-shot run cheap, each checked by behaviour, not by time: the linear probe's backbone
runs once, the frozen backbone gets no gradients or optimiser state, evaluation is inference-only with LoRA merged
and E2VPT's pruned prompts out of the sequence, val/test images are decoded once per process, and --compile works.
Timings and ratios are measured by tests/bench_fewshot.py, never asserted here."""
import copy
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import data
import fewshot
import vit

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    backbone = vit.vit_synthetic(num_classes=0).eval()
    [task] = data.load_task("synthetic:shape", shots=2, seed=0)
    cfg = fewshot.parse(["--weights", "x", "--max-steps", "6", "--batch", "8"])
    return backbone, task, cfg


def count_calls(monkeypatch, obj, name):
    calls, real = [], getattr(obj, name)

    def spy(*a, **k):
        calls.append(torch.is_inference_mode_enabled())
        return real(*a, **k)

    monkeypatch.setattr(obj, name, spy)
    return calls


def test_linear_probe_runs_the_backbone_once_and_trains_the_head_as_the_image_loop_would(setup, monkeypatch):
    backbone, task, cfg = setup
    reference = fewshot.LinearProbe(copy.deepcopy(backbone), num_classes=task.num_classes)
    fewshot.train(reference, task.train, task, cfg, CPU, seed=0)  # the image loop: the backbone runs every step
    calls = count_calls(monkeypatch, vit.ViT, "features")
    model, _ = fewshot.fit("linear", task, backbone, cfg, CPU, seed=0)
    assert len(calls) == 1  # 32 support images, one batch of features; then 6 steps on the head alone
    assert model.head.weight.abs().max() > 0
    torch.testing.assert_close(model.head.weight, reference.head.weight, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(model.head.bias, reference.head.bias, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["linear", "vpt", "e2vpt", "lora"])
def test_frozen_backbone_gets_no_gradients_and_no_optimiser_state(setup, monkeypatch, name):
    backbone, task, cfg = setup
    stepped = []
    real = torch.optim.AdamW

    def spy(groups, **k):
        opt = real(groups, **k)
        stepped.append(opt)
        return opt

    monkeypatch.setattr(torch.optim, "AdamW", spy)
    model, out = fewshot.fit(name, task, backbone, cfg, CPU, seed=0)
    frozen = {id(p) for n, p in model.vit.named_parameters() if "lora_" not in n}  # LoRA's A and B live in vit
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert frozen and all(p.grad is None for p in model.vit.parameters() if id(p) in frozen)
    for opt in stepped:
        held = [p for g in opt.param_groups for p in g["params"]]
        assert not {id(p) for p in held} & frozen and not {id(p) for p in opt.state} & frozen
    assert sum(p.numel() for p in trainable) == out["trainable"] < sum(p.numel() for p in backbone.parameters())


def test_evaluation_is_inference_only_with_lora_merged_and_pruned_prompts_out_of_the_sequence(setup, monkeypatch):
    backbone, task, cfg = setup
    lora_model, _ = fewshot.fit("lora", task, backbone, cfg, CPU, seed=0)
    assert lora_model.merged and not lora_model.training
    e2, out = fewshot.fit("e2vpt", task, backbone, cfg, CPU, seed=0)
    lengths = []
    e2.vit.blocks[0].register_forward_pre_hook(
        lambda m, a: lengths.append((a[0].shape[1], torch.is_inference_mode_enabled())))
    fewshot.evaluate(e2, task.test, task, CPU)
    kept = int(e2.token_mask.sum())
    assert 0 < kept < fewshot.method_options("e2vpt", cfg)["num_prompts"] and out["pruned"]
    assert set(lengths) == {(1 + (task.img_size // 8) ** 2 + kept, True)}  # CLS + patches + the kept prompts only
    assert len(lengths) == -(-len(task.test) // 256)  # in batches of 256


def test_val_and_test_are_decoded_once_per_process(tmp_path, monkeypatch):
    for split in ("train", "test"):
        for c in range(2):
            (tmp_path / split / f"c{c}").mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (40, 30), (60 * c, 20 * i, 90)).save(tmp_path / split / f"c{c}" / f"{i}.png")
    decoded = count_calls(monkeypatch, data, "_decode")
    a = data.load_task("imagefolder", tmp_path, shots=1, seed=0, img_size=16)[0]
    b = data.load_task("imagefolder", tmp_path, shots=2, seed=0, img_size=16)[0]
    assert a.test is b.test and len(a.test) == 8 and a.train is not b.train
    assert len(decoded) == 4 and a.val is b.val  # train, val, test; then train only (seed 0 holds out the same val)
    c = data.load_task("imagefolder", tmp_path, shots=1, seed=1, img_size=16)[0]
    assert c.test is a.test and len(decoded) == 5 + (c.val is not a.val)  # another seed may hold out another val


def test_compile_flag_trains_and_evaluates_through_torch_compile(setup, tmp_path):
    backbone, task, _ = setup
    path = tmp_path / "bb.safetensors"
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, path)
    argv = ["--weights", str(path), "--arch", "vit_synthetic", "--data", "synthetic:shape", "--shots", "1", "--seeds",
            "0", "--max-steps", "4", "--method", "vpt"]
    assert fewshot.main(argv + ["--out", str(tmp_path / "eager")]) == 0
    torch._dynamo.reset()
    assert fewshot.main(argv + ["--out", str(tmp_path / "compiled"), "--compile"]) == 0
    eager, compiled = (json.loads((tmp_path / d / "results.jsonl").read_text()) for d in ("eager", "compiled"))
    assert compiled["compiled"] and not eager["compiled"] and compiled["status"] == "ok"
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # it went through dynamo, not around it
    assert abs(compiled["test_top1"] - eager["test_top1"]) <= 2.0  # the same model up to float reordering

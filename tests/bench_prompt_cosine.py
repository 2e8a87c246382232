"""PVP's mechanism, measured (a script, not collected by pytest): how far do VPT-deep prompts move the frozen
backbone's CLS feature away from the unprompted one, on a downstream task's test images, before any tuning?

PVP (arXiv 2304.13639, Sec. 1 and 3) argues that randomly started prompts disturb a pre-trained backbone's
features, so that with 1-2 images per class the tuning spends them undoing the disturbance; prompts pre-trained on
a source task start where the features still work. Here: cosine(features with prompts, features without) per
image (the final-norm CLS token, eval mode, no prompt dropout), mean and spread over each task's test set, for
  random  VPT-deep as fewshot.py starts it (vpt.VPT's U(-v, v) init), one draw per seed
  pvp     the pre-trained prompts fewshot.py --method pvp starts from (the embedded ones unless --pvp-init)
run: python tests/bench_prompt_cosine.py [--seeds 0,1,2] [--tasks shape,texture,...] [--weights P --pvp-init P]
     python tests/bench_prompt_cosine.py --micro   # the same rows on one task, one seed, 64 test images, and (without
                                                    # --pvp-init) a module of random prompts made in a temporary folder
                                                    # instead of the embedded PVP prompts (for the tests)"""
import argparse
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import fewshot  # noqa: E402
import plumbing  # noqa: E402
import vpt  # noqa: E402


@torch.inference_mode()
def features(model, images, batch=512):
    return torch.cat([model.features(images[i:i + batch]) for i in range(0, len(images), batch)])  # (N, D)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default=",".join(data.SYNTHETIC_TASKS), help="embedded tasks (comma list)")
    ap.add_argument("--seeds", default="0,1,2", help="draws of the random prompts")
    ap.add_argument("--prompts", type=int, default=10, help="prompt tokens per layer of the random VPT-deep")
    ap.add_argument("--weights", default=None, help="a vit_synthetic backbone file (default: the shipped one)")
    ap.add_argument("--pvp-init", default=None, help="its pre-trained prompts (default: the embedded ones)")
    ap.add_argument("--micro", action="store_true", help="a tiny run of the same code (see above)")
    args = ap.parse_args()
    if args.micro:
        args.tasks, args.seeds = args.tasks.split(",")[0], args.seeds.split(",")[0]
    torch.set_num_threads(min(2, torch.get_num_threads()))
    backbone, name = plumbing.load_backbone(args.weights, "vit_synthetic")
    with tempfile.TemporaryDirectory() as tmp:
        if args.micro and not args.pvp_init:  # pre-training the embedded prompts would take minutes
            args.pvp_init = str(Path(tmp) / "random_prompts.safetensors")
            torch.manual_seed(1000)  # a draw other than the random column's
            module = vpt.VPT(backbone, num_classes=2, num_prompts=args.prompts, deep=True)
            plumbing.save_module(module, args.pvp_init, dict(method="vpt", config=module.config, backbone=name,
                                                             backbone_hash=plumbing.weights_hash(backbone)))
        cosines(args, backbone, name)


def cosines(args, backbone, name):
    pvp_init = args.pvp_init or plumbing.embedded_pvp(backbone, fewshot.METHODS)
    print(f"backbone {name} (weights {plumbing.weights_hash(backbone)}), PVP prompts {pvp_init}")
    print("| task | test images | random VPT-deep prompts | PVP pre-trained prompts |\n|---|---|---|---|")
    rows = {"random": [], "pvp": []}
    for t in args.tasks.split(","):
        [task] = data.load_task(f"synthetic:{t}", shots=1, seed=0, norm="inception")
        images = task.test.images[:64] if args.micro else task.test.images
        x = data.normalize(images, task.mean, task.std)  # (N, 3, 32, 32), no augmentation
        clean = features(backbone, x)
        cos = lambda model: F.cosine_similarity(features(model.eval(), x), clean, dim=-1)  # (N,)
        random = []
        for s in map(int, args.seeds.split(",")):
            torch.manual_seed(s)  # as fewshot.fit seeds a run before building its method
            random.append(cos(vpt.VPT(backbone, num_classes=task.num_classes, num_prompts=args.prompts, deep=True)))
        random, pvp = torch.stack(random), cos(fewshot.pvp(backbone, num_classes=task.num_classes, checkpoint=pvp_init))
        rows["random"].append(random.mean()), rows["pvp"].append(pvp.mean())
        print(f"| {t} | {len(x)} | {random.mean():.3f} (images 5-95%: {random.quantile(.05):.3f}-"
              f"{random.quantile(.95):.3f}; seeds {' '.join(f'{r:.3f}' for r in random.mean(1))}) | {pvp.mean():.3f} "
              f"(5-95%: {pvp.quantile(.05):.3f}-{pvp.quantile(.95):.3f}) |")
    print(f"| mean of tasks | | {torch.stack(rows['random']).mean():.3f} | {torch.stack(rows['pvp']).mean():.3f} |")


if __name__ == "__main__":
    main()

"""PVP's mechanism, measured (a script, not collected by pytest): how far do VPT-deep prompts move the frozen
backbone's CLS feature away from the unprompted one, on a downstream task's test images, before any tuning?

PVP (arXiv 2304.13639, Sec. 1 and 3) argues that randomly started prompts disturb a pre-trained backbone's
features, so that with 1-2 images per class the tuning spends them undoing the disturbance; prompts pre-trained on
a source task start where the features still work. Here: cosine(features with prompts, features without) per
image (the final-norm CLS token, eval mode, no prompt dropout), mean and spread over each task's test set, for
  random  VPT-deep as fewshot.py starts it (vpt.VPT's U(-v, v) init), one draw per seed
  pvp     the pre-trained prompts fewshot.py --method pvp starts from (the embedded ones unless --pvp-init)
run: python tests/bench_prompt_cosine.py [--seeds 0,1,2] [--tasks shape,texture,...] [--weights P --pvp-init P]"""
import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import fewshot  # noqa: E402
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
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    backbone, name = fewshot.load_backbone(args.weights, "vit_synthetic")
    pvp_init = args.pvp_init or fewshot.embedded_pvp(backbone)
    print(f"backbone {name} (weights {fewshot.weights_hash(backbone)}), PVP prompts {pvp_init}")
    print("| task | test images | random VPT-deep prompts | PVP pre-trained prompts |\n|---|---|---|---|")
    rows = {"random": [], "pvp": []}
    for t in args.tasks.split(","):
        [task] = data.load_task(f"synthetic:{t}", shots=1, seed=0, norm="inception")
        x = data.normalize(task.test.images, task.mean, task.std)  # (N, 3, 32, 32), no augmentation
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

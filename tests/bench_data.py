"""Benchmark of data.py (a script, not collected by pytest): embedded-world generation speed in images/s (median of
repeats, at 1 thread and at torch's default), the five tasks' first load, and JPEG decode speed at 224 px; then the
streaming path (--stream): decode throughput against the PIL path data.py used before, images/s of the
loader alone and of loader + a ViT-B/16 step (VPT-deep, backbone frozen, forward + backward) at 0/1/2 workers
against a plain torchvision.datasets.ImageFolder + DataLoader in the same process, and peak memory against the size
of the source (a pass over a few hundred and over several thousand JPEGs, each in a child process).
run: python tests/bench_data.py [--repeats 5] [--stream] [--only-stream]
     python tests/bench_data.py --micro    # every section (--stream included) on the same code at a tiny size: small
                                           # chunks and JPEGs, a tiny ViT for the step, one pass of 16 images in the
                                           # memory child (seconds; for the tests)"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402


def median_time(fn, repeats):
    fn()  # warm-up: caches, allocator
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--stream", action="store_true", help="also benchmark the streaming path (minutes)")
    ap.add_argument("--only-stream", action="store_true", help="only the streaming path")
    ap.add_argument("--images", type=int, default=192, help="--stream: JPEGs read per loader measurement")
    ap.add_argument("--vit-batches", type=int, default=3, help="--stream: ViT-B/16 steps per measurement")
    ap.add_argument("--rss", default="300,3000", help="--stream: source sizes for the peak-memory pass")
    ap.add_argument("--memory-only", action="store_true", help="--stream: only the peak-memory pass")
    ap.add_argument("--micro", action="store_true", help="every section at a tiny size (see above)")
    ap.add_argument("--rss-child", nargs=2, help=argparse.SUPPRESS)  # internal: FOLDER COUNT
    args = ap.parse_args()
    if args.rss_child:
        return rss_child(*args.rss_child)
    if args.micro:
        args.repeats, args.chunk, args.stream, args.images, args.vit_batches, args.rss = 1, 64, True, 16, 1, "16"
        SIZE.update(MICRO)
    if args.stream or args.only_stream:
        stream(args)
    if args.only_stream:
        return
    default_threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {default_threads} threads by default")
    rows = []  # printed as one table at the end (load_task prints what it keeps in between)

    source = data.synthetic_source("backbone")
    for threads in sorted({1, default_threads}):
        torch.set_num_threads(threads)
        step = iter(range(10**6))
        t = median_time(lambda: source.batch(next(step), args.chunk), args.repeats)
        rows.append(f"| world generation, {threads} thread(s), 32x32, chunks of {args.chunk} | "
                    f"{args.chunk / t:,.0f} images/s |")
    torch.set_num_threads(default_threads)

    data._world_pools.cache_clear(), data._backgrounds.cache_clear()
    t = time.perf_counter()
    tasks = data.load_task("synthetic")
    n = sum(len(s) for task in tasks for s in (task.train, task.val, task.test))
    rows.append(f"| load_task('synthetic'), first call, {n:,} images | {time.perf_counter() - t:.2f} s |")

    with tempfile.TemporaryDirectory() as tmp:  # 200 JPEGs of 500x375, about a Flowers/Pets photo
        rng, (w, h), counts = np.random.default_rng(0), SIZE["photo"], SIZE["per_class"]
        for split, per_class in zip(("train", "test"), counts):
            for c in ("a", "b"):
                folder = Path(tmp) / split / c
                folder.mkdir(parents=True)
                for i in range(per_class):
                    smooth = np.kron(rng.integers(0, 256, (h // 25, w // 25, 3)), np.ones((25, 25, 1)))
                    pixels = (smooth + rng.normal(0, 12, smooth.shape)).clip(0, 255).astype(np.uint8)
                    Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
        t = time.perf_counter()
        [task] = data.load_task("imagefolder", tmp, img_size=224)
        n = len(task.train) + len(task.val) + len(task.test)
        rows.append(f"| decode + resize + crop (fgvc protocol, 224 px), {n} JPEGs of {w}x{h} | "
                    f"{n / (time.perf_counter() - t):,.0f} images/s |")
    print("| measurement | result |\n|---|---|\n" + "\n".join(rows))


# -----------------------------------------------------------------------------
# the streaming path

CAMERA = (1600, 1200)  # a 2-megapixel photo, ~300 kB as JPEG; the few-shot datasets' images are 300-500 px a side
SIZE = dict(photo=(500, 375), per_class=(80, 20), camera=CAMERA, files=48, vit=None)  # --micro replaces them
MICRO = dict(photo=(100, 75), per_class=(4, 2), camera=(160, 120), files=8,
             vit=dict(img_size=224, patch_size=32, dim=32, depth=2, heads=4))


def photos(folder, count, size, distinct=24, classes=4):
    """`count` JPEGs in ImageFolder layout (train/c<k>/<i>.jpg), hard links to `distinct` encoded photos, so a
    source of thousands costs seconds to make; each file is still opened and decoded on its own."""
    rng, made = np.random.default_rng(0), []
    Path(folder).mkdir(parents=True)
    for i in range(distinct):
        smooth = np.kron(rng.integers(0, 256, (size[1] // 40 + 1, size[0] // 40 + 1, 3)), np.ones((40, 40, 1)))
        pixels = (smooth[:size[1], :size[0]] + rng.normal(0, 12, (size[1], size[0], 3))).clip(0, 255).astype(np.uint8)
        made.append(Path(folder) / f"src{i}.jpg")
        Image.fromarray(pixels).save(made[-1], quality=90)
    for i in range(count):
        path = Path(folder) / "train" / f"c{i % classes}" / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        os.link(made[i % distinct], path)
    return sorted(Path(folder, "train").rglob("*.jpg"))


def pil_path(path, side=256, crop=224):
    """What data.py did per image before it streamed: read_image, PIL resize of the shorter side, centre crop."""
    im = data.read_image(path)
    w, h = im.size
    size = (side, int(side * h / w)) if w <= h else (int(side * w / h), side)
    left, top = round((size[0] - crop) / 2), round((size[1] - crop) / 2)
    im = im.resize(size, Image.BILINEAR).crop((left, top, left + crop, top + crop))
    return torch.from_numpy(np.array(im)).permute(2, 0, 1)


def rate(fn, n):
    t = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t)


def stream(args):
    torch.set_num_threads(1)
    print(f"\nstreaming path, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, one thread per process")
    with tempfile.TemporaryDirectory() as tmp:
        if not args.memory_only:
            speed(args, tmp)
        memory(args, tmp)


def speed(args, tmp):
    from torch.utils.data import DataLoader
    from torchvision import datasets
    from torchvision.transforms import v2
    import fewshot
    import vit
    import vpt
    print("| JPEG | PIL path (before) img/s | decode + transforms.v2 (now) img/s | now / before |\n|---|---|---|---|")
    for size in (SIZE["photo"], SIZE["camera"]):
        files = photos(Path(tmp) / f"{size[0]}", SIZE["files"], size)
        transform = data.resize_crop("shorter", 256, data.BILINEAR, 224)
        pil = rate(lambda: [pil_path(f) for f in files], len(files))
        ours = rate(lambda: [transform(data.decode(f)) for f in files], len(files))
        print(f"| decode + resize + centre crop to 224, {size[0]}x{size[1]}, 1 thread | {pil:,.0f} | {ours:,.0f} | "
              f"{ours / pil:.2f} |")

    root = Path(tmp) / "src"
    photos(root, args.images, SIZE["photo"])
    items = [(f, int(f.parent.name[1:])) for f in sorted((root / "train").rglob("*.jpg"))]
    ref_set = datasets.ImageFolder(str(root / "train"), transform=v2.Compose([
        v2.PILToTensor(), v2.Resize(256, antialias=True), v2.CenterCrop(224)]))
    task = data.Task("bench", 4, None, None, None, 224, *data.NORMS["imagenet"], "crop_flip")
    backbone = vit.ViT(**SIZE["vit"], num_classes=0) if SIZE["vit"] else vit.vit_base_patch16(num_classes=0)
    model = vpt.VPT(backbone, num_classes=4, num_prompts=10, deep=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    rows = []
    for workers in (0, 1, 2):
        ours = data.Stream(items, "shorter", 256, data.BILINEAR, 256, workers)  # the training squares
        reference = DataLoader(ref_set, batch_size=32, shuffle=True, num_workers=workers,
                               persistent_workers=workers > 0)

        def ours_pass(limit=None, step=None):
            g, n = torch.Generator().manual_seed(0), 0
            for x, y in fewshot.batches(ours, task, torch.device("cpu"), 32 if step is None else 8, train=True,
                                        generator=g):
                n += len(y)
                if step:
                    step(x, y)
                if limit and n >= limit:
                    break
            return n

        def ref_pass():  # normalised in this process as fewshot.batches does; no random crop + flip
            return sum(len(data.normalize(x, *data.NORMS["imagenet"])) for x, _ in reference)

        for warm in (ours_pass, ref_pass):
            warm() if workers else None  # start the persistent workers outside the clock
        alone = [rate(lambda: ours_pass(), len(items)), rate(ref_pass, len(items))]

        def step(x, y):
            loss = torch.nn.functional.cross_entropy(model(x.float()), y)
            opt.zero_grad(), loss.backward(), opt.step()

        n = 8 * args.vit_batches
        with_vit = rate(lambda: ours_pass(limit=n, step=step), n)
        ref8 = DataLoader(ref_set, batch_size=8, shuffle=True, num_workers=workers)

        def ref_step():
            for k, (x, y) in enumerate(ref8):
                step(data.normalize(x, *data.NORMS["imagenet"]), y)
                if k + 1 == args.vit_batches:
                    break
        ref_vit = rate(ref_step, n)
        rows.append((workers, *alone, with_vit, ref_vit))
    net = "ViT-B/16" if not SIZE["vit"] else "micro ViT"
    print(f"\n{len(items)} JPEGs of {SIZE['photo'][0]}x{SIZE['photo'][1]}, batch 32 (loader alone) and 8 (with a "
          f"{net} VPT-deep step, backbone frozen, forward + backward), images/s:")
    print(f"| workers | loader alone: data.Stream | ImageFolder + DataLoader | + {net} step: data.Stream | "
          "ImageFolder + DataLoader |\n|---|---|---|---|---|")
    for w, a, b, c, d in rows:
        print(f"| {w} | {a:,.0f} | {b:,.0f} | {c:.2f} | {d:.2f} |")



def memory(args, tmp):
    camera = SIZE["camera"]
    print(f"\npeak memory over one pass of {camera[0]}x{camera[1]} JPEGs, 2 workers, batch 32, 224 px "
          "(each in a fresh child process; PSS sums the processes' proportional shares):")
    print("| images | seconds | img/s | peak PSS of the process tree MiB | peak PSS of the main process MiB | "
          "main process peak RSS MiB |\n|---|---|---|---|---|---|")
    for count in map(int, args.rss.split(",")):
        folder = Path(tmp) / f"rss{count}"
        photos(folder, count, camera)
        r = subprocess.run([sys.executable, __file__, "--rss-child", str(folder), str(count)], capture_output=True,
                           text=True)
        if r.returncode:
            raise SystemExit(r.stderr[-2000:])
        m = json.loads(r.stdout.splitlines()[-1])
        print(f"| {count:,} | {m['seconds']:.1f} | {count / m['seconds']:.0f} | {m['pss'] / 2**20:,.0f} | "
              f"{m['main_pss'] / 2**20:,.0f} | {m['hwm'] / 2**20:,.0f} |")


def pss(pid):  # kB -> bytes, of one process (0 once it is gone)
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
    except (OSError, StopIteration):
        return 0


def children(pid):
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            kids += [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            pass
    return kids


def rss_child(folder, count):
    """One pass over a source of `count` JPEGs through data.load_task (streamed: --cache-gb 0), sampling the PSS of
    this process and its loader workers every 50 ms; prints one JSON line."""
    torch.set_num_threads(1)
    [task] = data.load_task("imagefolder", folder if (Path(folder) / "test").exists() else _with_test(folder),
                            img_size=224, cache_gb=0, workers=2)
    import fewshot
    peak, main_peak, done = [0], [0], threading.Event()

    def sample():
        while not done.is_set():
            me = os.getpid()
            main_peak[0] = max(main_peak[0], pss(me))
            peak[0] = max(peak[0], pss(me) + sum(pss(k) for k in children(me)))
            time.sleep(0.05)
    threading.Thread(target=sample, daemon=True).start()
    t, n = time.perf_counter(), 0
    for x, y in fewshot.batches(task.train, task, torch.device("cpu"), 32, train=True,
                                generator=torch.Generator().manual_seed(0)):
        n += len(y)
    seconds = time.perf_counter() - t
    done.set()
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    print(json.dumps(dict(count=int(count), read=n, seconds=seconds, pss=peak[0], main_pss=main_peak[0], hwm=hwm)))


def _with_test(folder):
    (Path(folder) / "test").symlink_to(Path(folder) / "train")
    return folder


if __name__ == "__main__":
    main()

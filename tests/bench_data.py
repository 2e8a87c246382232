"""Benchmark of data.py (a script, not collected by pytest): embedded-world generation speed in images/s (median of
repeats, at 1 thread and at torch's default), the five tasks' first load, and JPEG decode speed at 224 px.
run: python tests/bench_data.py [--repeats 5]"""
import argparse
import statistics
import sys
import tempfile
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
    args = ap.parse_args()
    default_threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {default_threads} threads by default")

    source = data.synthetic_source("backbone")
    for threads in sorted({1, default_threads}):
        torch.set_num_threads(threads)
        step = iter(range(10**6))
        t = median_time(lambda: source.batch(next(step), args.chunk), args.repeats)
        print(f"world generation, {threads} thread(s): {args.chunk / t:,.0f} images/s (32x32, chunks of {args.chunk})")
    torch.set_num_threads(default_threads)

    data._world_pools.cache_clear(), data._backgrounds.cache_clear()
    t = time.perf_counter()
    tasks = data.load_task("synthetic")
    n = sum(len(s) for task in tasks for s in (task.train, task.val, task.test))
    print(f"load_task('synthetic'), first call: {time.perf_counter() - t:.2f} s for {n:,} images")

    with tempfile.TemporaryDirectory() as tmp:  # 200 JPEGs of 500x375, about a Flowers/Pets photo
        rng = np.random.default_rng(0)
        for split, per_class in (("train", 80), ("test", 20)):
            for c in ("a", "b"):
                folder = Path(tmp) / split / c
                folder.mkdir(parents=True)
                for i in range(per_class):
                    smooth = np.kron(rng.integers(0, 256, (15, 20, 3)), np.ones((25, 25, 1)))
                    pixels = (smooth + rng.normal(0, 12, smooth.shape)).clip(0, 255).astype(np.uint8)
                    Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
        t = time.perf_counter()
        [task] = data.load_task("imagefolder", tmp, img_size=224)
        n = len(task.train) + len(task.val) + len(task.test)
        print(f"decode + resize + crop (fgvc protocol, 224 px): {n / (time.perf_counter() - t):,.0f} images/s "
              f"({n} JPEGs of 500x375)")


if __name__ == "__main__":
    main()

"""Writers for the real checkpoint layouts, from a timm-named state dict (Google's .npz as
google-research/vision_transformer saves it, torchvision's vit_b_16 names), so tests can save a random ViT the way
Google, timm and torchvision ship theirs. The inverse of vit.load_pretrained's converters,
written independently from the key table, so a mistake in one is not mirrored in the other. And two ways to run
the commands: a copy of the project's files run in this process (run_copy), and, for the tests of two processes on
one --out, a way to have the first take the lock and the second wait for it (first_then_second)."""
import fcntl
import importlib
import io
import os
import runpy
import select
import signal
import subprocess
import sys
import time
import traceback
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import torch


def to_google_npz(sd, path, heads, pre_logits=False, prefix=""):
    """Save `sd` (timm names) as a Google/Flax .npz: HWIO patch kernel, (in, out) kernels, per-head q/k/v."""
    n = lambda t: t.detach().cpu().numpy().astype(np.float32)
    dim = sd["cls_token"].shape[-1]
    hd = dim // heads
    w = {"cls": n(sd["cls_token"]),
         "embedding/kernel": n(sd["patch_embed.proj.weight"]).transpose(2, 3, 1, 0),  # (D,C,p,p) -> HWIO
         "embedding/bias": n(sd["patch_embed.proj.bias"]),
         "Transformer/posembed_input/pos_embedding": n(sd["pos_embed"]),
         "Transformer/encoder_norm/scale": n(sd["norm.weight"]), "Transformer/encoder_norm/bias": n(sd["norm.bias"])}
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        b, s = f"Transformer/encoderblock_{i}/", lambda k: n(sd[f"blocks.{i}.{k}"])
        mha = b + "MultiHeadDotProductAttention_1/"
        qkv_w, qkv_b = s("attn.qkv.weight"), s("attn.qkv.bias")
        for j, name in enumerate(("query", "key", "value")):
            w[mha + name + "/kernel"] = qkv_w[j * dim:(j + 1) * dim].T.reshape(dim, heads, hd)
            w[mha + name + "/bias"] = qkv_b[j * dim:(j + 1) * dim].reshape(heads, hd)
        w[mha + "out/kernel"] = s("attn.proj.weight").T.reshape(heads, hd, dim)
        w[mha + "out/bias"] = s("attn.proj.bias")
        w[b + "LayerNorm_0/scale"], w[b + "LayerNorm_0/bias"] = s("norm1.weight"), s("norm1.bias")
        w[b + "LayerNorm_2/scale"], w[b + "LayerNorm_2/bias"] = s("norm2.weight"), s("norm2.bias")
        w[b + "MlpBlock_3/Dense_0/kernel"], w[b + "MlpBlock_3/Dense_0/bias"] = s("mlp.fc1.weight").T, s("mlp.fc1.bias")
        w[b + "MlpBlock_3/Dense_1/kernel"], w[b + "MlpBlock_3/Dense_1/bias"] = s("mlp.fc2.weight").T, s("mlp.fc2.bias")
    if "head.weight" in sd:
        w["head/kernel"], w["head/bias"] = n(sd["head.weight"]).T, n(sd["head.bias"])
    if pre_logits:
        rng = np.random.default_rng(0)
        w["pre_logits/kernel"] = rng.standard_normal((dim, dim), dtype=np.float32)
        w["pre_logits/bias"] = np.zeros(dim, np.float32)
    np.savez(path, **{prefix + k: v for k, v in w.items()})


def to_torchvision(sd):
    """timm names -> torchvision's vit_b_16 names (a pure rename)."""
    out = {}
    for k, v in sd.items():
        k = (k.replace("cls_token", "class_token").replace("patch_embed.proj.", "conv_proj.")
             .replace("pos_embed", "encoder.pos_embedding").replace("head.", "heads.head."))
        if k.startswith("norm."):
            k = "encoder.ln." + k[5:]
        if k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            rest = (rest.replace("norm1.", "ln_1.").replace("norm2.", "ln_2.")
                    .replace("attn.qkv.weight", "self_attention.in_proj_weight")
                    .replace("attn.qkv.bias", "self_attention.in_proj_bias")
                    .replace("attn.proj.", "self_attention.out_proj.")
                    .replace("mlp.fc1.", "mlp.0.").replace("mlp.fc2.", "mlp.3."))
            k = f"encoder.layers.encoder_layer_{i}.{rest}"
        out[k] = v
    return out


def randomize(model, std=0.1, seed=0):
    """Fill every parameter with noise, so a swapped or transposed tensor cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def save_backbone(path, seed):
    """A random vit_synthetic (seeded) saved as a timm-layout .safetensors file; returns the path."""
    import vit
    from safetensors.torch import save_file
    torch.manual_seed(seed)
    model = vit.vit_synthetic(num_classes=0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


def holds_lock(lock):
    """True while some process holds the exclusive flock on `lock` (the <out>.lock file plumbing.locked takes)."""
    try:
        f = open(lock)
    except FileNotFoundError:
        return False
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


WAITING = "waiting: another process is building"  # what plumbing.locked says when it has to wait


def first_then_second(lock, start, timeout=120):
    """Two processes started at once that both take `lock` (plumbing.locked), the first of them to hold it and the
    second to wait for it, whatever their speed: this process holds the lock until both say they wait, lets go of it
    with the second paused (SIGSTOP), and lets the second go on once the first holds it. start(i) starts process i
    (stdout=PIPE, text=True, PYTHONUNBUFFERED=1). Returns (first, second, [what each wrote until it waited])."""
    held = open(lock, "a")
    fcntl.flock(held, fcntl.LOCK_EX)
    procs, paused = [], False
    try:
        procs = [start(0), start(1)]
        said = [read_until(p, WAITING, timeout) for p in procs]
        procs[1].send_signal(signal.SIGSTOP)
        paused = True
        stopped(procs[1], timeout)  # not only signalled: a process woken with the signal pending could take the lock
        held.close()  # the first, waiting, takes it: the second cannot while stopped
        deadline = time.time() + timeout
        while not holds_lock(lock) and procs[0].poll() is None and time.time() < deadline:
            time.sleep(0.01)
    finally:
        held.close()
        if paused:
            procs[1].send_signal(signal.SIGCONT)
    return procs[0], procs[1], said


def stopped(proc, timeout=120):
    """Wait until `proc` has stopped (SIGSTOP) or ended (then its exit status is kept, as Popen.wait would)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        pid, status = os.waitpid(proc.pid, os.WUNTRACED | os.WNOHANG)
        if pid:
            if not os.WIFSTOPPED(status):
                proc.returncode = os.waitstatus_to_exitcode(status)
            return
        time.sleep(0.005)


def read_until(proc, text, timeout=120):
    """What `proc` (started with stdout=PIPE, text=True, PYTHONUNBUFFERED=1) writes to its standard output, read as
    it comes until `text` appears, it ends, or the deadline; proc.communicate() returns the rest."""
    got, deadline = b"", time.time() + timeout
    while text.encode() not in got and time.time() < deadline:
        if select.select([proc.stdout], [], [], 0.1)[0]:
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            got += chunk
    return got.decode()


def run_copy(repo, script, *args, env):
    """`python script args` with cwd=repo, PYTHONPATH=repo and exactly the variables `env`, the way a fresh process
    runs it, but in this one (no torch import to pay): runpy executes repo/script as __main__ with every module of
    repo (a copy of the project's files, maybe edited) imported afresh from there, and this process's own modules,
    sys.path, cwd, argv, environment and SIGTERM handler put back after. SystemExit is the exit status; an exception
    that escapes is printed as the interpreter would and is status 1. A subprocess.CompletedProcess."""
    repo, ours = Path(repo), {p.stem for p in Path(repo).glob("*.py")}
    mine = lambda: [n for n in sys.modules if n.split(".")[0] in ours]  # noqa: E731
    saved = {n: sys.modules.pop(n) for n in mine()}
    state = sys.path[:], os.getcwd(), sys.argv, dict(os.environ), signal.getsignal(signal.SIGTERM)
    out, err, code = io.StringIO(), io.StringIO(), 0
    try:
        sys.path.insert(0, str(repo)), os.chdir(repo), os.environ.clear(), os.environ.update(env)
        sys.argv = [script, *map(str, args)]
        importlib.invalidate_caches()
        with redirect_stdout(out), redirect_stderr(err):
            try:
                runpy.run_path(str(repo / script), run_name="__main__")
            except SystemExit as e:
                code = 0 if e.code is None else e.code if isinstance(e.code, int) else print(e.code,
                                                                                            file=sys.stderr) or 1
            except BaseException:
                traceback.print_exc()
                code = 1
    finally:
        for n in mine():
            del sys.modules[n]
        sys.modules.update(saved)
        sys.path[:], sys.argv = state[0], state[2]
        os.chdir(state[1]), os.environ.clear(), os.environ.update(state[3]), signal.signal(signal.SIGTERM, state[4])
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())

"""
Plumbing that keeps nanoBCR's promises, apart from the algorithm (as nanochat's checkpoint_manager):
a checkpoint is a folder of model.safetensors (tagged with its step), config.json (the model's
shape, the training config, step, done), tokenizer.json and state.pt (the optimizer), written to
<folder>.tmp and swapped in with two renames, and trusted only when its parts agree. Also the
per-step JSONL log, the out_dir lock, and atomic writes of every output.
"""
import contextlib
import fcntl
import json
import os
import shutil
from dataclasses import asdict, fields

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as parse_safetensors, save_file

from data import load_tokenizer
from model import GPT, GPTConfig


def write_weights(model, folder, meta=None):
    """Weights as safetensors (no pickle, tagged with their step) + config.json: the shape, meta."""
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    del sd["lm_head.weight"]  # tied to wte.weight; safetensors refuses shared storage
    save_file(sd, os.path.join(folder, "model.safetensors"), {"step": str((meta or {}).get("step"))})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"model": asdict(model.cfg), **(meta or {})}, f, indent=1)

def plain_file(path):
    """path, if a regular file or absent: a link would be replaced (its target never written), a FIFO hang."""
    if os.path.islink(path) or (os.path.exists(path) and not os.path.isfile(path)):
        raise ValueError(f"{path} is a link or not a regular file: remove it, or use another --out_dir")
    return path

def atomic_write(path, data):
    """A kill or a full disk at any moment leaves the old file or the new one, never a cut one
    (and a failed or interrupted write no <path>.tmp either)."""
    try:
        with open(f"{plain_file(path)}.tmp", "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(f"{path}.tmp", path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(f"{path}.tmp")
        if isinstance(e, OSError):  # a full disk, say: name the file
            raise ValueError(f"cannot write {path} ({e.strerror or e})") from None
        raise

def save(folder, model, tok, meta, state):
    """Atomic: the whole checkpoint is written to <folder>.tmp, then swapped in with renames. A kill
    at any moment leaves either the old or the new checkpoint (undo_cut_save() finishes a cut swap).
    meta goes into config.json beside the model's shape; state (the optimizer's) into state.pt."""
    folder = os.path.realpath(folder)  # a symlink would be renamed away, its target left as .old
    tmp, old = folder + ".tmp", folder + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:  # a full disk: safetensors, tokenizers and torch.save each raise their own error
        write_weights(model, tmp, meta)
        tok.save(f"{tmp}/tokenizer.json")
        torch.save(state, f"{tmp}/state.pt")
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError(f"cannot write a checkpoint to {tmp} ({str(e).splitlines()[0][:120]}); "
                         f"the last one in {folder} is untouched") from None
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(folder):
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)

def undo_cut_save(folder):
    """A save killed between its renames (save) leaves only <folder>.old: loaders move it back."""
    folder = os.path.realpath(folder)  # a symlinked folder is swapped where it really is
    if not os.path.exists(folder) and os.path.exists(f"{folder}.old"):
        os.replace(f"{folder}.old", folder)

def load(folder, device="cpu"):
    """(model in eval mode, tokenizer, config dict) of a checkpoint folder; ValueError with one line
    for anything wrong in it."""
    undo_cut_save(folder)
    for name in ("config.json", "model.safetensors"):
        if not os.path.isfile(os.path.join(folder, name)):
            raise ValueError(f"checkpoint {str(folder)!r} is missing {name}")
    try:  # an unreadable file (permissions) is an OSError naming it, reported by the CLIs
        with open(os.path.join(folder, "config.json")) as f:
            meta = json.load(f)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError; deep nesting
        raise ValueError(f"{folder}/config.json is corrupt ({e})") from None
    names = {f.name for f in fields(GPTConfig)}
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict) or set(meta["model"]) != names:
        raise ValueError(f"{folder}/config.json does not describe a GPTConfig")
    try:
        model = GPT(GPTConfig(**meta["model"]))
    except (ValueError, RuntimeError, MemoryError) as e:  # a shape out of range, or too big to allocate
        raise ValueError(f"{folder}/config.json: {(str(e) or 'out of memory').splitlines()[0][:120]}") \
            from None
    try:
        with open(os.path.join(folder, "model.safetensors"), "rb") as f:
            sd = parse_safetensors(f.read())
        with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
            saved = f.metadata() or {}
    except (SafetensorError, ValueError) as e:
        raise ValueError(f"{folder}/model.safetensors is corrupt ({str(e).splitlines()[0]})") from None
    if saved.get("step", "None") not in ("None", str(meta.get("step"))):  # the weights of another step
        raise ValueError(f"{folder}: model.safetensors is from step {saved['step']}, config.json from step "
                         f"{meta.get('step')}: the checkpoint's parts disagree")
    sd["lm_head.weight"] = sd.get("wte.weight")
    want = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    got = {k: (tuple(v.shape), v.dtype) for k, v in sd.items() if v is not None}
    if want != got:
        bad = sorted(set(want) ^ set(got) or [k for k in want if want[k] != got[k]])[0]
        raise ValueError(f"{folder}: weights do not match config.json (first mismatch: {bad})")
    if not all(v.isfinite().all() for v in sd.values()):
        raise ValueError(f"{folder}/model.safetensors holds non-finite weights")
    model.load_state_dict(sd)
    tok = load_tokenizer(f"{folder}/tokenizer.json")
    if model.cfg.vocab_size != tok.get_vocab_size():
        raise ValueError(f"{folder}: the model has {model.cfg.vocab_size} token embeddings, its tokenizer "
                         f"{tok.get_vocab_size()} tokens")
    return model.to(device).eval(), tok, meta

def restore(folder, model, opt, step):
    """Weights and optimizer state of a checkpoint whose config.json says `step`. No RNG state: data
    and sampling generators are pure functions of (seed, step); a fork that adds dropout should draw
    it the same way, or resuming stops being bitwise exact."""
    model.load_state_dict(load(folder)[0].state_dict())
    try:  # anything wrong in it (truncated, another stage's optimizer, missing keys) is one line
        state = torch.load(f"{folder}/state.pt", weights_only=True)  # no code can run from it
        opt.load_state_dict(state["opt"])
    except Exception as e:
        why = (str(e).splitlines() or [""])[0][:80]
        raise ValueError(f"{folder}/state.pt is unreadable or not this stage's ({type(e).__name__}: {why})") \
            from None
    if state.get("step") != step:
        raise ValueError(f"{folder}: state.pt is from step {state.get('step')}, config.json from step "
                         f"{step}: the checkpoint's parts disagree")
    return step

def checked(folder, cfg, keys, total, need_done=False):
    """None if there is no checkpoint; else its config.json, once its parts agree: made by this
    training config (cfg, train.py's; the keys that matter for it), its step within 0..total and
    "done" exactly at total, weights of that step (load); and finished, or to be resumed
    (cfg.resume; never with need_done: evaluation never uses a half-trained model). Never writes."""
    undo_cut_save(folder)
    if not os.path.exists(folder):
        return None
    _, _, meta = load(folder)
    step, done = meta.get("step"), meta.get("done")
    if not (isinstance(meta.get("train"), dict) and type(done) is bool and type(step) is int
            and isinstance(meta.get("wall_s"), (int, float))):
        raise ValueError(f"{folder}/config.json is not a train.py checkpoint (train, step, done, wall_s)")
    diff = [f"{k}: {meta['train'].get(k)!r} there, {getattr(cfg, k)!r} now" for k in keys
            if meta["train"].get(k) != getattr(cfg, k)]
    if diff:
        raise ValueError(f"{folder} was made with another config ({'; '.join(diff)}); "
                         f"use another --out_dir or remove that folder")
    if not 0 <= step <= total or done != (step == total):
        raise ValueError(f"{folder}/config.json says step {step} of {total}, done: {done}: parts disagree")
    if not done and (not cfg.resume or need_done):
        raise ValueError(f"{folder} holds an unfinished run (step {step}): continue it with its "
                         f"--stage and --resume, or remove the folder to start over")
    return meta

class Log:
    """Per-step JSONL. A resumed run's log must hold steps 0..start-1 (lines past them, written after
    the last save, are dropped so that it reads as one run), checked before anything is written."""

    def __init__(self, path, start, rank):
        self.path, self.on, self.rows = path, rank == 0, []
        if self.on and start > 0:
            lines = open(plain_file(path), "rb").readlines() if os.path.exists(path) else []  # (a FIFO hangs)
            for i, x in enumerate(lines):  # bytes: json.loads refuses a non-UTF-8 byte as any corrupt line
                try:
                    if json.loads(x)["step"] < start:
                        self.rows.append((json.loads(x)["step"], x.rstrip(b"\n") + b"\n"))
                except (ValueError, KeyError, TypeError, RecursionError):
                    if i + 1 < len(lines):  # only a last line cut by a kill mid-write is dropped
                        raise ValueError(f"{path}: line {i + 1} is corrupt; mend or delete it to resume") \
                            from None
            if [s for s, _ in self.rows] != list(range(start)):
                raise ValueError(f"{path} does not hold steps 0..{start - 1}: it and its checkpoint disagree")

    def rewrite(self):  # atomic: a kill here must not leave the log empty
        if self.on:
            atomic_write(self.path, b"".join(x for _, x in self.rows))

    def __call__(self, row):
        if self.on:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")

def lock(out_dir):
    """Held for the whole run: a second run's saves would interleave with this one's. The kernel
    drops a flock when its process dies, so a killed run never leaves a stale lock."""
    f = open(f"{out_dir}/.lock", "a+")  # not "w": a refused run must not wipe the holder's pid
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        raise ValueError(f"{out_dir}/ is in use by pid {f.read().strip() or '?'}: wait, or use another")
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    return f

"""
The plumbing that keeps nanoBCR's promises (nanochat's checkpoint_manager): checkpoints, the log, the
out_dir lock, atomic writes, and the checks that make a bad file one line, not a traceback, a hang or
a lost run. A checkpoint is a folder, model.safetensors (tagged with its step), config.json (shape,
training config, step, done), tokenizer.json, state.pt (the optimizer), trusted only when its parts
agree. Only the writer, which holds the lock, repairs what a kill left."""
import contextlib
import fcntl
import io
import json
import os
import shutil
import stat
from dataclasses import asdict, fields

import torch
from safetensors import SafetensorError
from safetensors.torch import load as parse_safetensors, save_file
from tokenizers import Tokenizer

from data import build_tokenizer
from model import GPT, GPTConfig

MiB = 1 << 20

def first_line(e):  # an exception as one short line; an empty one still says what it is
    text = str(e) or ("out of memory" if isinstance(e, MemoryError) else type(e).__name__)
    return (text.splitlines() or [""])[0][:120]

def plain_file(path):
    """path, if a regular file or absent: a link would lead a write to its target, a FIFO hang it."""
    if os.path.islink(path) or (os.path.exists(path) and not os.path.isfile(path)):
        raise ValueError(f"{path} is a link or not a regular file: remove it, or use another --out_dir")
    return path

def read(path, limit=64 * MiB):
    """The bytes of a regular file (or a link to one) of at most limit bytes: a FIFO would block the
    read for ever, /dev/zero never end it. Checked once opened (without blocking), not before."""
    with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path} is not a regular file (a FIFO or a device?): remove it")
        if st.st_size > limit:
            raise ValueError(f"{path} is over {limit / MiB:.0f} MiB: not the file nanoBCR wrote")
        return f.read()

def read_json(path, limit=64 * MiB):
    text = read(path, limit)
    try:  # JSONDecodeError, UnicodeDecodeError; RecursionError from deep nesting
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{path} is corrupt ({first_line(e)})") from None

def cached(path):
    """The JSON in path; None if there is none or it is corrupt (recomputed); a link or FIFO: refused."""
    plain_file(path)
    with contextlib.suppress(FileNotFoundError, ValueError):  # none yet, or corrupt: computed again
        return read_json(path)
    return None

def atomic_write(path, data):
    """A kill or a full disk at any moment leaves the old file or the new one, never a cut one, and
    no <path>.tmp. A link at either name is never followed out of the run's folder."""
    tmp = f"{plain_file(path)}.tmp"
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        with open(tmp, "xb") as f:  # x: created here, exclusively
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError):  # a full disk, say: name the file
            raise ValueError(f"cannot write {path} ({e.strerror or e})") from None
        raise

def check_memory(cfg, rows=1, training=False):
    """Refuse, before any allocation, a model too big for this machine: fp32 weights (x4 training: grads,
    AdamW's moments), a KV cache of rows x block_size and one layer's activations: the big terms."""
    C, L, T = cfg.n_embd, cfg.n_layer, cfg.block_size
    weights = 12 * L * C * C + (cfg.vocab_size + cfg.n_seg) * C
    need = 4 * ((4 if training else 1) * weights + 2 * L * rows * T * C + 16 * rows * T * C)
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        raise ValueError(f"n_layer={L}, n_embd={C}: {need >> 30} GiB of memory needed, {have >> 30} here")

def save(folder, model, tok, meta, state):
    """The whole checkpoint to <folder>.tmp, swapped in with two renames: a kill at any moment leaves
    the old one or the new one (recover() ends a cut swap), a failure no <folder>.tmp."""
    folder = os.path.realpath(folder)  # a symlink would be renamed away, its target left as .old
    tmp, old = folder + ".tmp", folder + ".old"
    last = f"the last one in {folder} is untouched" if os.path.exists(folder) else "nothing was saved yet"
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    del sd["lm_head.weight"]  # tied to wte.weight; safetensors refuses shared storage
    try:  # a full disk: safetensors, tokenizers and torch.save each raise their own error
        os.makedirs(tmp)  # recover() removed a kill's leftover
        save_file(sd, f"{tmp}/model.safetensors", {"step": str(meta.get("step"))})  # no pickle
        with open(f"{tmp}/config.json", "w") as f:
            json.dump({"model": asdict(model.cfg), **meta}, f, indent=1)
        tok.save(f"{tmp}/tokenizer.json")
        torch.save(state, f"{tmp}/state.pt")
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(folder):
            os.replace(folder, old)
        os.replace(tmp, folder)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        recover(folder)
        raise ValueError(f"cannot write a checkpoint to {tmp} ({first_line(e)}); {last}") from None
    shutil.rmtree(old, ignore_errors=True)

def recover(folder):
    """The writer's repair, under the lock, before it checks or trains a run: a save killed between
    its renames left only <folder>.old, which goes back; a kill's <folder>.tmp goes."""
    real = os.path.realpath(folder)  # a symlinked folder is swapped where it really is
    if not os.path.exists(real) and os.path.isdir(real + ".old"):
        os.replace(real + ".old", real)
    for stale in (real + ".tmp", real + ".old"):
        shutil.rmtree(stale, ignore_errors=True)
        if os.path.lexists(stale):
            raise ValueError(f"{stale} is in the way of saving {folder} and cannot be removed: remove it")

def load(folder, device="cpu"):
    """(model in eval mode, tokenizer, config dict) of a checkpoint folder; one line for anything
    wrong in it. Never writes: a save cut between its renames is read from <folder>.old in place."""
    if not os.path.exists(folder) and os.path.isdir(os.path.realpath(folder) + ".old"):
        folder = os.path.realpath(folder) + ".old"
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not os.path.exists(os.path.join(folder, name)):
            raise ValueError(f"checkpoint {str(folder)!r} is missing {name}")
    # 1) config.json: a GPTConfig that fits this machine, and allocates
    meta = read_json(f"{folder}/config.json", MiB)
    names = {f.name for f in fields(GPTConfig)}
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict) or set(meta["model"]) != names:
        raise ValueError(f"{folder}/config.json does not describe a GPTConfig")
    try:
        check_memory(GPTConfig(**meta["model"]))
        model = GPT(GPTConfig(**meta["model"]))
    except (ValueError, RuntimeError, MemoryError) as e:
        raise ValueError(f"{folder}/config.json: {first_line(e)}") from None
    # 2) the weights: tagged with config.json's step (an untagged file could be any run's), the
    # model's names, shapes and dtypes, finite
    data = read(f"{folder}/model.safetensors", 4 * sum(p.numel() for p in model.parameters()) + MiB)
    try:
        sd = parse_safetensors(data)
        header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])  # safetensors' layout
    except (SafetensorError, ValueError) as e:
        raise ValueError(f"{folder}/model.safetensors is corrupt ({first_line(e)})") from None
    tag, step = (header.get("__metadata__") or {}).get("step"), meta.get("step")
    if tag != str(step):
        said = f"is from step {tag}" if tag else "has no step tag"
        raise ValueError(f"{folder}: model.safetensors {said}, config.json is from step {step}")
    sd["lm_head.weight"] = sd.get("wte.weight")
    want = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    got = {k: (tuple(v.shape), v.dtype) for k, v in sd.items() if v is not None}
    if want != got:
        bad = sorted(set(want) ^ set(got) or [k for k in want if want[k] != got[k]])[0]
        raise ValueError(f"{folder}: weights do not match config.json (first mismatch: {bad})")
    if not all(v.isfinite().all() for v in sd.values()):
        raise ValueError(f"{folder}/model.safetensors holds non-finite weights")
    model.load_state_dict(sd)
    # 3) the tokenizer, read back through `tokenizers` and compared whole (vocabulary, normalizer, splits)
    try:  # tokenizers raises a bare Exception for a corrupt file
        tok = Tokenizer.from_str(read(f"{folder}/tokenizer.json", MiB).decode())
    except Exception as e:
        raise ValueError(f"cannot load {folder}/tokenizer.json ({first_line(e)[:80]})") from None
    if json.loads(tok.to_str()) != json.loads(build_tokenizer().to_str()):
        raise ValueError(f"{folder}/tokenizer.json is not nanoBCR's character tokenizer")
    if model.cfg.vocab_size != tok.get_vocab_size():
        raise ValueError(f"{folder}: {model.cfg.vocab_size} embeddings, {tok.get_vocab_size()} tokens")
    return model.to(device).eval(), tok, meta

def restore(folder, model, opt, step):
    """Weights and optimizer state of a checkpoint whose config.json says `step`. No RNG state: data and
    sampling are pure functions of (seed, step), which keeps a resume bitwise exact."""
    model.load_state_dict(load(folder)[0].state_dict())
    data = read(f"{folder}/state.pt", 16 * sum(p.numel() for p in model.parameters()) + MiB)
    try:  # anything wrong in it (truncated, another stage's optimizer, missing keys) is one line
        state = torch.load(io.BytesIO(data), weights_only=True)  # no code can run from it
        opt.load_state_dict(state["opt"])
    except Exception as e:
        raise ValueError(f"{folder}/state.pt is unreadable or not this stage's ({first_line(e)})") from None
    if state.get("step") != step:
        raise ValueError(f"{folder}: state.pt is from step {state.get('step')}, config.json from step {step}")
    return step

def checked(folder, cfg, keys, total, need_done=False):
    """None if no checkpoint; else its config.json once its parts agree (load), it was made with cfg's
    keys, step in 0..total, done at total, and finished or (cfg.resume, not need_done) to be resumed."""
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
        raise ValueError(f"{folder} was made with another config ({'; '.join(diff)}): use another --out_dir")
    if not 0 <= step <= total or done != (step == total):
        raise ValueError(f"{folder}/config.json says step {step} of {total}, done: {done}")
    if not done and (not cfg.resume or need_done):
        raise ValueError(f"{folder} holds an unfinished run (step {step}): its --stage with --resume goes on")
    return meta

class Log:
    """Per-step JSONL. A resumed run's log must hold steps 0..start-1; lines past them, written after
    the last save, are dropped so that it reads as one run: checked, then rewritten atomically."""

    def __init__(self, path, start, rank):
        self.path, self.on, rows = plain_file(path), rank == 0, []
        resumed = self.on and start > 0 and os.path.exists(path)
        lines = read(path, 1 << 40).splitlines(keepends=True) if resumed else []
        for i, x in enumerate(lines):  # bytes: json.loads refuses a non-UTF-8 byte as any corrupt line
            try:
                if json.loads(x)["step"] < start:
                    rows.append((json.loads(x)["step"], x.rstrip(b"\n") + b"\n"))
            except (ValueError, KeyError, TypeError, RecursionError):
                if i + 1 < len(lines):  # only a last line cut by a kill mid-write is dropped
                    raise ValueError(f"{path}: line {i + 1} is corrupt; mend or delete it to resume") \
                        from None
        if self.on and [s for s, _ in rows] != list(range(start)):
            raise ValueError(f"{path} does not hold steps 0..{start - 1}: it and its checkpoint disagree")
        if self.on:  # atomic: a kill here must not leave the log empty
            atomic_write(path, b"".join(x for _, x in rows))

    def __call__(self, row):
        if self.on:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")

def lock(out_dir):
    """Held for the whole run: a second run's saves would interleave with this one's. A flock dies with
    its process, so a killed run leaves no stale lock; no link is followed, no pid wiped before."""
    path = plain_file(f"{out_dir}/.lock")
    f = open(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW), "r+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        with f:
            holder = f.read(20).strip() or "?"
        raise ValueError(f"{out_dir}/ is in use by pid {holder}: wait, or use another") from None
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    return f

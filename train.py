"""
nanoBCR's entry point: `python train.py` runs the whole reproduction, reusing finished stages.

  pretrain   a tiny GPT learns verbose arithmetic traces (re-check loops, direct answers)  -> out/base
  bcr        BCR: N=3 problems per prompt under one hard cap of N*b tokens             -> out/bcr-s<seed>
  grpo       control: the same GRPO at N=1 with the sweep's budget C (no pressure)      -> out/grpo-s<seed>
  lenpen     control: GRPO at N=1, cap C, reward acc - lenpen*|y|/C                     -> out/lenpen-s<seed>
  eval       every model on N in eval_Ns under the one shared budget C, sampled (greedy at N=1)
  report     out/report.md, out/report.json (and out/report.png with matplotlib)
  ablations  BCR variants on the same base (budget b, training N, credit, advantages, budget-aware
             BCR), each evaluated on the sweep                                          -> out/ablations.md

--stage=<name> runs one stage (RL stages first finish or reuse the base); --seeds=3 runs three RL
seeds. Every step is logged to out/<run>.jsonl. A finished run is reused only if its saved config
matches; an interrupted one continues with --resume. Several processes: torchrun --nproc_per_node=K.
"""
import argparse
import fcntl
import json
import math
import os
import platform
import random
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import bcr
from data import build_tokenizer, prompt, pretrain_batch, sample_problem, solution
from model import (GPT, GPTConfig, atomic_write, autocast, load_checkpoint, new_optimizer, pick_device, recover,
                   restore, save_checkpoint, update_bf16)


def F_(default, help, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class Config:
    # run
    stage: str = F_("all", "what to run", ("all", "pretrain", "bcr", "grpo", "lenpen", "eval", "report", "ablations"))
    out_dir: str = F_("out", "where checkpoints, logs and the report go")
    device: str = F_("auto", "auto | cpu | cuda | mps")
    preset: str = F_("cpu", "cpu: laptop defaults; gpu: bigger model and batches, one GPU", ("cpu", "gpu"))
    seed: int = F_(1, "first RL seed")
    seeds: int = F_(1, "number of RL seeds: seed, seed+1, ...")
    resume: bool = F_(False, "continue an interrupted stage from its last checkpoint")
    save_every: int = F_(100, "steps between checkpoints during a stage")
    compile: bool = F_(False, "torch.compile the training forward")
    decode: str = F_("auto", "sampler path (graph: CUDA only)", ("auto", "eager", "static", "graph"))
    # model
    n_layer: int = F_(4, "transformer blocks")
    n_head: int = F_(4, "attention heads (head size 32: cheaper attention on CPU than 8 heads of 16)")
    n_embd: int = F_(128, "model width")
    block_size: int = F_(768, "longest prompt + completion, in tokens")
    # data: the base's habits
    max_digits: int = F_(2, "operands have 1..max_digits digits")
    ops: str = F_("+-", "operations to draw from")
    max_N: int = F_(8, "pretraining documents hold 1..max_N problems (and budget-aware BCR's prompts)")
    p_loop: float = F_(0.7, "chance of a re-check loop after a step (base style)")
    p_again: float = F_(0.45, "chance of checking once more after a check")
    max_loops: int = F_(4, "most re-checks in a row")
    p_direct: float = F_(0.25, "chance that the base answers a problem directly, with no steps (short, risky)")
    p_runaway: float = F_(0.03, "chance of a runaway re-check loop in a verbose solution")
    # pretraining
    base_seed: int = F_(0, "seed of the base model's init and data")
    pt_steps: int = F_(1000, "pretraining steps")
    pt_docs: int = F_(32, "documents per pretraining step (small batches, many updates: faster here)")
    pt_micro_tokens: int = F_(4096, "padded tokens per micro-batch")
    pt_max_pad: float = F_(1.2, "a micro-batch ends before a row longer than this x its first (GPU: more)")
    pt_lr: float = F_(2e-3, "peak AdamW learning rate of pretraining (embeddings, norms)")
    pt_muon_lr: float = F_(0.02, "Muon learning rate of the blocks' matrices (0: AdamW for every weight)")
    pt_grow_N: float = F_(0.5, "share of pretraining over which the largest N grows from 2 to max_N")
    pt_concise: float = F_(0.7, "share of pretraining with mostly concise traces before all verbose")
    warmup: int = F_(30, "linear warm-up steps")
    grad_clip: float = F_(1.0, "gradient-norm clip")
    # RL
    N: int = F_(3, "problems per packed prompt in BCR training (the paper's best)")
    b: int = F_(36, "completion tokens per problem: the BCR cap is N*b")
    G: int = F_(8, "samples per prompt (the GRPO group)")
    prompts: int = F_(8, "packed prompts per RL step")
    rl_steps: int = F_(100, "RL steps of each RL run")
    rl_lr: float = F_(1e-4, "RL learning rate (constant after warm-up)")
    temperature: float = F_(1.0, "sampling temperature in RL and in sampled evaluation")
    std_norm: bool = F_(True, "divide advantages by the group's std (False: Dr. GRPO / REINFORCE)")
    token_mean: bool = F_(True, "average the loss over tokens (False: per sequence, then over sequences)")
    slot_credit: bool = F_(False, "problem k's advantage on problem k's tokens (False: one shared reward)")
    kl: float = F_(0.0, "weight of the k3 KL penalty to the frozen base (0: none)")
    format_bonus: float = F_(0.1, "reward for exactly N labelled answers followed by <eos>")
    lenpen: float = F_(1.0, "lambda of the length-penalty control: r = acc - lambda*|y|/C")
    update_dtype: str = F_("auto", "RL update's autocast (auto: bf16 on CUDA and on a CPU with native bf16)",
                           ("auto", "bf16", "fp32"))
    # evaluation
    eval_problems: int = F_(512, "held-out problems per N")
    eval_Ns: str = F_("1,2,3,4,5,6,7,8", "values of N in the evaluation sweep")
    C: int = F_(0, "shared completion budget of the sweep, the same for every N (0: 4*b, binding from N=4)")
    eval_batch: int = F_(256, "prompts decoded together in evaluation")
    eval_seed: int = F_(1234, "seed of the evaluation problems and sampling")


# gpu: the same task and recipe, a 4.8M-parameter model, 2x the documents, 4x the RL prompts, and far
# fewer, bigger pretraining micro-batches (a small GPU step is bound by kernel launches, not arithmetic)
PRESETS = {"cpu": {}, "gpu": dict(n_layer=6, n_head=8, n_embd=256, pt_docs=64, pt_micro_tokens=16384,
                                  pt_max_pad=100.0, prompts=32, eval_batch=512)}
MODEL_KEYS = ("n_layer", "n_head", "n_embd", "block_size")
BASE_KEYS = MODEL_KEYS + ("max_digits", "ops", "max_N", "p_loop", "p_again", "max_loops", "p_direct", "p_runaway",
                          "base_seed", "pt_steps", "pt_docs", "pt_micro_tokens", "pt_max_pad", "pt_lr", "pt_muon_lr",
                          "pt_grow_N", "pt_concise", "warmup", "grad_clip")
RL_KEYS = BASE_KEYS + ("N", "b", "G", "prompts", "rl_steps", "rl_lr", "temperature", "std_norm",
                       "token_mean", "slot_credit", "kl", "format_bonus", "lenpen", "update_dtype")
EVAL_KEYS = ("eval_problems", "eval_Ns", "C", "eval_seed", "temperature")
# The paper's ablations and one beyond it, each a BCR run on the same base: name -> (task, flags).
# Budgets at 0.8x / 1x / 1.2x b, as the paper's 4096 / 5120 / 6144 tokens for N = 3.
ABLATIONS = {"b29": ("bcr", dict(b=29)), "b43": ("bcr", dict(b=43)), "N2": ("bcr", dict(N=2)),
             "N4": ("bcr", dict(N=4)), "N5": ("bcr", dict(N=5)), "slot": ("bcr", dict(slot_credit=True)),
             "nostd": ("bcr", dict(std_norm=False)), "mix": ("mix", {})}


class ArgParser(argparse.ArgumentParser):
    def error(self, message):  # a bad command line costs one line (main prints it), not a usage dump
        raise ValueError(f"{self.prog}: {message}")


def to_bool(s):
    if s.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return s.lower() in ("1", "true", "yes", "on")
    raise ValueError(s)


to_bool.__name__ = "bool"  # argparse names the type in its error: "invalid bool value: 'x'"


def parse_config(argv=None):
    """Flags from the dataclass: --name=value, typed; --preset sets defaults that flags override."""
    ap = ArgParser(prog="train.py", description=__doc__.split("\n\n")[0])
    for f in fields(Config):
        kind = dict(type=to_bool, nargs="?", const=True) if f.type is bool else dict(type=f.type)
        ap.add_argument(f"--{f.name}", choices=f.metadata["choices"], help=f.metadata["help"], **kind)
    args = {k: v for k, v in vars(ap.parse_args(argv)).items() if v is not None}
    cfg = replace(Config(), **{**PRESETS[args.get("preset", "cpu")], **args})
    validate(cfg)
    return cfg


def eval_Ns(cfg):
    return [int(x) for x in cfg.eval_Ns.split(",")]


AT_LEAST = {2: "G",
            1: "seeds prompts max_digits eval_problems eval_batch pt_docs pt_micro_tokens save_every pt_max_pad "
               "max_loops",
            0: "seed base_seed eval_seed pt_steps rl_steps warmup C pt_lr pt_muon_lr rl_lr kl lenpen grad_clip p_loop "
               "p_again p_direct p_runaway pt_grow_N pt_concise"}


def validate(cfg):
    """Every bad value gets a one-line reason before any work starts. Two tables: values on their
    own, then what depends on them (the longest prompt needs a sane max_digits)."""
    def check(table):
        for ok, why in table:
            if not ok:
                raise ValueError(why)
    check([(all(x.strip().isdigit() and x.isascii() for x in cfg.eval_Ns.split(",")),
            "--eval_Ns: integers, comma-separated"),
           *[(math.isfinite(getattr(cfg, f.name)), f"--{f.name} must be finite")
             for f in fields(cfg) if f.type is float],
           *[(getattr(cfg, k) >= lo, f"--{k} must be >= {lo}") for lo, ks in AT_LEAST.items() for k in ks.split()],
           (max(cfg.p_loop, cfg.p_direct, cfg.p_runaway, cfg.pt_grow_N, cfg.pt_concise) <= 1 and cfg.p_again < 1,
            "--p_loop, --p_direct, --p_runaway, --pt_grow_N, --pt_concise must be at most 1, --p_again below 1"),
           (max(cfg.seed + cfg.seeds, cfg.base_seed, cfg.eval_seed) < 2 ** 31, "seeds must be below 2**31"),
           (max(cfg.pt_lr, cfg.pt_muon_lr, cfg.rl_lr) <= 10, "--pt_lr, --pt_muon_lr and --rl_lr must be at most 10"),
           (cfg.max_digits <= 18, "--max_digits must be at most 18"),
           (cfg.temperature == 0 or 0.01 <= cfg.temperature <= 100, "--temperature must be 0 (greedy) or 0.01 to 100"),
           (cfg.ops and set(cfg.ops) <= set("+-"), "--ops must use only + and -"),
           (not os.path.isfile(cfg.out_dir), f"--out_dir={cfg.out_dir!r} is a file, not a folder"),
           (cfg.out_dir == cfg.out_dir.encode(errors="replace").decode(), f"--out_dir={cfg.out_dir!r} is not UTF-8")])
    GPTConfig(**{k: getattr(cfg, k) for k in MODEL_KEYS})  # the model's own checks (sizes, head size)
    Ns, C, cap = eval_Ns(cfg), bcr.budget(cfg), cfg.N * cfg.b
    worst = (10 ** cfg.max_digits - 1, "+", 10 ** cfg.max_digits - 1)
    shortest, longest = len(solution(worst, 1)) + 1, len(prompt([worst] * max(cfg.max_N, cfg.N, *Ns)))
    check([(1 <= min(cfg.N, cfg.max_N, *Ns) and max(cfg.N, cfg.max_N, *Ns) <= 14, "N, max_N and eval N: 1 to 14"),
           (Ns == sorted(set(Ns)) and cfg.eval_problems >= Ns[-1],
            "--eval_Ns must be ascending with no repeats, --eval_problems at least its largest N"),
           (Ns[0] == 1 or cfg.stage not in ("all", "report"), "--eval_Ns must start at 1 for the report"),
           (min(cap, C) >= shortest, f"--N*--b={cap} or --C={C} cannot hold one concise answer ({shortest} tokens)"),
           (longest + max(C, cap) <= cfg.block_size,
            f"the longest prompt ({longest}) + the cap ({max(C, cap)}) exceed --block_size={cfg.block_size}")])


# ----------------------------------------------------------------------------- processes

def setup(cfg):
    """(rank, world, device). A no-op for one process; under torchrun, one process per device
    (CUDA: nccl, one GPU each) or per CPU share (gloo)."""
    device = pick_device(cfg.device)
    env, names = os.environ, ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_PORT")
    local_rank, rank, world, local_world = 0, 0, 1, 1
    try:  # torchrun sets all of these; a stray RANK alone would train a process that never saves
        v = {k: int(env[k]) for k in names if k in env}
        if set(v) - {"MASTER_PORT"}:
            local_rank, rank, world, local_world, port = (v[k] for k in names)  # KeyError: names a missing one
            if not (0 <= rank < world and 0 <= local_rank < local_world <= world and 0 < port < 65536
                    and env["MASTER_ADDR"]):
                raise ValueError("RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE or MASTER_PORT out of range")
    except (KeyError, ValueError) as e:
        raise ValueError(f"this environment is not torchrun's ({e}): start several processes with torchrun") from None
    if world > min(cfg.prompts, cfg.pt_docs):
        raise ValueError(f"{world} processes need --prompts and --pt_docs >= {world} (each takes a share)")
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        else:  # K processes on one CPU: share the cores instead of oversubscribing them
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def all_mean(values, world):
    """Average a dict of floats over processes (for logging)."""
    if world == 1:
        return values
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"  # NCCL reduces GPU tensors only
    t = torch.tensor([float(v) for v in values.values()], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: v / world for k, v in zip(values, t.tolist())}


# ----------------------------------------------------------------------------- checkpoints

def existing(folder, cfg, keys, need_done=False):
    """None if there is no checkpoint; else its config.json after checking it was made by this
    config (the keys that matter for it) and is finished, or may be resumed (--resume, unless
    need_done: evaluation never uses a half-trained model). Never touches the folder."""
    recover(folder)
    if not os.path.exists(folder):
        return None
    _, _, meta = load_checkpoint(folder)
    if not (isinstance(meta.get("train"), dict) and isinstance(meta.get("done"), bool)
            and isinstance(meta.get("step"), int) and isinstance(meta.get("wall_s"), (int, float))):
        raise ValueError(f"{folder}/config.json is not a train.py checkpoint (no train config, step, done or wall_s)")
    saved = meta["train"]
    diff = [f"{k}: {saved.get(k)!r} there, {getattr(cfg, k)!r} now" for k in keys if saved.get(k) != getattr(cfg, k)]
    if diff:
        raise ValueError(f"{folder} was made with another config ({'; '.join(diff)}); "
                       f"use another --out_dir or remove that folder")
    if not meta["done"] and (not cfg.resume or need_done):
        raise ValueError(f"{folder} holds an unfinished run (step {meta['step']}): continue it with its "
                         f"--stage and --resume, or remove the folder to start over")
    return meta


class Log:
    """Per-step JSONL. On resume, lines past the resumed step are dropped so the log reads as one run."""

    def __init__(self, path, start, rank):
        self.path, self.on = path, rank == 0
        if self.on:
            lines = open(path, "rb").readlines() if os.path.exists(path) and start > 0 else []
            keep = []  # bytes: json.loads refuses a non-UTF-8 byte as it does any corrupt line
            for i, x in enumerate(lines):  # all parsed before the file is rewritten: a bad line costs nothing
                try:
                    if json.loads(x)["step"] < start:
                        keep.append(x.rstrip(b"\n") + b"\n")
                except (ValueError, KeyError, TypeError, RecursionError):
                    if i + 1 < len(lines):  # only a last line cut by a kill mid-write is dropped
                        raise ValueError(f"{path}: line {i + 1} is corrupt; mend or delete it to resume") from None
            atomic_write(path, b"".join(keep))  # a kill here must not leave the log empty

    def __call__(self, row):
        if self.on:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


# ----------------------------------------------------------------------------- training runs

def set_lr(opt, step, total, peak, warmup, cosine):
    """Linear warm-up, then constant or cosine down to 10% of the peak."""
    lr = peak * min(1.0, (step + 1) / max(1, warmup))
    if cosine and step >= warmup:
        lr = peak * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)
    return lr


class Run:
    """The bookkeeping every training run shares, around its own `for step in run.steps` loop:
    resume an interrupted checkpoint (meta, from existing()), log each step, save every save_every
    steps and at the end (rank 0 only), stop on a non-finite step with the last good checkpoint
    untouched."""

    def __init__(self, cfg, folder, meta, model, opt, total, rank, world):
        self.cfg, self.folder, self.model, self.opt, self.total, self.rank, self.world = (
            cfg, folder, model, opt, total, rank, world)
        start = restore(folder, model, opt) if meta else 0
        self.wall, self.t0 = meta["wall_s"] if meta else 0.0, time.perf_counter()
        real = os.path.realpath(folder)  # where save_checkpoint swaps; what would fail its first save is refused now
        for stale in (real + ".tmp", real + ".old") if rank == 0 else ():  # (a kill's leftovers just go)
            shutil.rmtree(stale, ignore_errors=True)
            if os.path.lexists(stale):
                raise ValueError(f"{stale} is in the way of saving {folder} and cannot be removed: remove it")
        if world > 1:  # every process starts from rank 0's weights
            for p in model.parameters():
                dist.broadcast(p.data, 0)
        self.log = Log(folder + ".jsonl", start, rank)
        self.steps = tqdm(range(start, total), desc=os.path.basename(folder), disable=rank > 0, initial=start,
                          total=total)
        if start == total:
            self.save(total)

    def end_step(self, step, row):  # a huge step can overflow the weights from a finite gradient
        if not (row.pop("finite") and torch.stack([p.isfinite().all() for p in self.model.parameters()]).all()):
            raise ValueError(f"non-finite loss, gradient or weights at step {step}: stopped; the last good "
                             f"checkpoint in {self.folder} is untouched")
        row = all_mean(row, self.world)
        self.log({"step": step, **row})
        self.steps.set_postfix({k: f"{row[k]:.3g}" for k in ("loss", "reward", "tokens", "loops") if k in row})
        if step + 1 == self.total or (step + 1) % self.cfg.save_every == 0:
            self.save(step + 1)

    def save(self, step):
        if self.rank == 0:
            meta = {"train": asdict(self.cfg), "step": step, "done": step == self.total,
                    "wall_s": self.wall + time.perf_counter() - self.t0}
            state = {"step": step, "opt": self.opt.state_dict()}
            save_checkpoint(self.folder, self.model, build_tokenizer(), meta, state)
        if self.world > 1 and step == self.total:
            dist.barrier()


def pretrain_step(model, fwd, opt, cfg, tok, step, rank, world, device):
    """One step of next-token cross-entropy on verbose traces, loss on completion tokens only.
    fwd is the model or its torch.compile'd twin. tests/bench.py --what=pretrain times it too."""
    t0 = time.perf_counter()
    lr = set_lr(opt, step, cfg.pt_steps, cfg.pt_lr, cfg.warmup, cosine=True)
    micro, n_targets = pretrain_batch(tok, cfg, step, rank, world)
    if not micro:
        raise ValueError(f"every document of pretraining step {step} is longer than --block_size={cfg.block_size}")
    t_data = time.perf_counter() - t0
    loss_sum, n_tok = 0.0, 0
    for idx, seg, tgt in micro:
        idx, seg, tgt = idx.to(device), seg.to(device), tgt.to(device)   # (b, T) each
        with autocast(device):
            logits = fwd(idx, seg)                                       # (b, T, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten(), ignore_index=-1,
                               reduction="sum") / n_targets              # global token mean
        loss.backward()
        loss_sum, n_tok = loss_sum + loss.item(), n_tok + idx.numel()
    grad_norm, ok = bcr.finish_grads(model, cfg.grad_clip, world, loss_sum)
    if ok:
        opt.step()
    opt.zero_grad(set_to_none=True)
    dt = time.perf_counter() - t0
    return {"finite": ok, "loss": loss_sum * world, "grad_norm": grad_norm, "lr": lr,
            "tokens_per_s": n_tok / dt, "t_data": t_data, "t_step": dt, "micro_batches": len(micro)}


def pretrain(cfg, tok, rank, world, device):
    """The verbose base: finished -> reused; interrupted -> resumed with --resume, else refused."""
    folder = f"{cfg.out_dir}/base"
    meta = existing(folder, cfg, BASE_KEYS)
    if meta and meta["done"]:
        return
    torch.manual_seed(cfg.base_seed)
    model = GPT(GPTConfig(tok.get_vocab_size(), **{k: getattr(cfg, k) for k in MODEL_KEYS})).to(device)
    opt = new_optimizer(model, cfg.pt_lr, cfg.pt_muon_lr)
    fwd = torch.compile(model) if cfg.compile else model
    run = Run(cfg, folder, meta, model, opt, cfg.pt_steps, rank, world)
    for step in run.steps:
        run.end_step(step, pretrain_step(model, fwd, opt, cfg, tok, step, rank, world, device))


def rl(cfg, name, run_name, seed, tok, rank, world, device):
    """One RL run on the base: name is bcr.task's (bcr, mix, grpo, lenpen), cfg may carry an ablation's flags."""
    folder = f"{cfg.out_dir}/{run_name}"
    meta = existing(folder, cfg, RL_KEYS)
    if meta and meta["done"]:
        return
    model = load_checkpoint(f"{cfg.out_dir}/base", device)[0]
    ref = load_checkpoint(f"{cfg.out_dir}/base", device)[0] if cfg.kl > 0 else None
    opt = new_optimizer(model, cfg.rl_lr)
    _, cap, lenpen = bcr.task(name, cfg)
    scfg = replace(cfg, lenpen=lenpen, decode=decode_mode(cfg, device))
    run = Run(cfg, folder, meta, model, opt, cfg.rl_steps, rank, world)
    for step in run.steps:
        set_lr(opt, step, cfg.rl_steps, cfg.rl_lr, min(cfg.warmup, 10), cosine=False)
        groups = bcr.rl_batch(name, cfg, seed, step)
        gen = torch.Generator(device).manual_seed(seed * 1_000_003 + step * 101 + rank)
        # the step's groups are split over processes: a group never straddles two of them
        run.end_step(step, bcr.rl_step(model, opt, tok, groups[rank::world], cap, gen, scfg, ref, world))


def decode_mode(cfg, device):
    if cfg.decode == "graph" and device.type != "cuda":
        raise ValueError("--decode=graph needs CUDA")
    return ("graph" if device.type == "cuda" else "eager") if cfg.decode == "auto" else cfg.decode


def runs(cfg, ablations=False):
    """{run name: (task, its training config)}: the base, each RL run of each seed, and with
    ablations each variant of each seed (abl-<name>-s<seed>), trained with its own flags."""
    seeds, out = range(cfg.seed, cfg.seed + cfg.seeds), {"base": ("base", cfg)}
    out.update({f"{name}-s{s}": (name, cfg) for s in seeds for name in ("bcr", "grpo", "lenpen")})
    for k, (task, flags) in ABLATIONS.items() if ablations else ():
        tcfg = replace(cfg, **flags)
        try:
            validate(tcfg)
        except ValueError as e:
            raise ValueError(f"ablation {k} ({flags}): {e}") from None
        out.update({f"abl-{k}-s{s}": (task, tcfg) for s in seeds})
    return out


# ----------------------------------------------------------------------------- evaluation

def eval_problems(cfg):
    rng = random.Random(cfg.eval_seed)
    return [sample_problem(rng, cfg.max_digits, cfg.ops, heldout=True) for _ in range(cfg.eval_problems)]


def evaluate_runs(cfg, todo, rank, world, device, greedy=True):
    """The N-sweep of each run under the shared budget C, sampled (and greedy at N = 1); the base
    also gets a sampled sweep with room to finish. A run is first checked as reuse would check it
    (the same training config but the eval flags, finished); its rows are cached in <run>/eval.json,
    keyed by the eval config. Returns {run: {"rows", "wall_s" (evaluation), "train_wall_s"}}."""
    ev, C, Ns, problems = {}, bcr.budget(cfg), eval_Ns(cfg), eval_problems(cfg)
    room = cfg.block_size - len(prompt([(10 ** cfg.max_digits - 1, "+", 1)] * max(Ns)))  # the base's sweep with room
    for run, (_, tcfg) in todo.items():
        keys = [k for k in (BASE_KEYS if run == "base" else RL_KEYS) if k not in EVAL_KEYS]
        meta = existing(f"{cfg.out_dir}/{run}", tcfg, keys, need_done=True)
        if meta is None:
            raise ValueError(f"no {run} in {cfg.out_dir}: run the stage that makes it first")
        path, g = f"{cfg.out_dir}/{run}/eval.json", greedy or run == "base"
        key = {**{k: getattr(cfg, k) for k in EVAL_KEYS}, "greedy": g}
        try:
            with open(path) as f:
                ev[run] = json.load(f)
        except (OSError, ValueError, RecursionError):  # none yet, or a corrupt cache: recomputed
            ev[run] = None
        if not (isinstance(ev[run], dict) and ev[run].get("key") == key):
            t0 = time.perf_counter()
            model, tok, _ = load_checkpoint(f"{cfg.out_dir}/{run}", device)
            plan = [(N, C, cfg.temperature) for N in Ns] + [(1, C, 0.0)] * g  # greedy: the free lunch's N only
            plan += [(N, room, cfg.temperature) for N in Ns if N <= 4] if run == "base" else []  # its targets' Ns
            rows = [bcr.evaluate(model, tok, problems, N, c, t, cfg.eval_seed, cfg.eval_batch,
                                 decode_mode(cfg, device), rank, world)
                    for N, c, t in tqdm(plan, desc=f"eval {run}", disable=rank > 0)]
            ev[run] = {"key": key, "rows": rows, "wall_s": time.perf_counter() - t0}
            if rank == 0:
                atomic_write(path, json.dumps(ev[run]))
        ev[run]["train_wall_s"] = meta["wall_s"]
    return ev


# ----------------------------------------------------------------------------- report

WHAT = {"base": "the verbose base", "bcr": "BCR, the default", "grpo": "vanilla GRPO, N = 1 under C",
        "lenpen": "length penalty, N = 1 under C", **{k: f"{t} {v}" for k, (t, v) in ABLATIONS.items()}}


def entries(cfg, ev):
    """One report entry per run: its N-sweep, its N = 1 figures, the truncation model's prediction
    of its sweep (bcr.predict), its training curve (none for a run copied without its step log)."""
    out, C = [], bcr.budget(cfg)
    for run, rows in ev.items():
        name, _, seed = run.removeprefix("abl-").rpartition("-s") if run != "base" else ("base", "", "")
        log = f"{cfg.out_dir}/{run}.jsonl"
        curve = [json.loads(x) for x in open(log)] if run != "base" and os.path.exists(log) else []
        sweep = [r for r in rows["rows"] if r["budget"] == C]
        one = bcr.pick(sweep, 1)
        out.append({"name": name, "seed": int(seed) if seed else None, "eval": sweep,
                    "eval_room": [dict(r, room=True) for r in rows["rows"] if r["budget"] != C],
                    "free_lunch": {k: one[k] for k in ("budget", "acc", "tokens_per_problem", "loops_per_problem",
                                                        "steps_per_problem", "direct_share")},
                    "predicted": bcr.predict(one.pop("samples"), C, eval_Ns(cfg)),
                    "curve": [{k: c[k] for k in ("step", "reward", "acc", "tokens", "loops", "truncated")}
                              for c in curve]})
    return out


def summary(es, Nmax):
    """Markdown: one row per model, mean (min, max) over its seeds, at N = 1 and at the largest N."""
    cols = [(1, "acc", "acc", "{:.3f}"), (1, "tokens_per_problem", "tokens/problem", "{:.1f}"),
            (1, "direct_share", "direct share", "{:.2f}"), (1, "loops_per_problem", "loops", "{:.2f}"),
            (Nmax, "acc", "acc", "{:.3f}"), (Nmax, "tokens_per_problem", "tokens/problem", "{:.1f}"),
            (Nmax, "truncation_rate", "truncated", "{:.2f}")]
    out = ["| run | what | " + " | ".join(f"N={N} {h}" for N, _, h, _ in cols) + f" | tokens N={Nmax} / N=1 |",
           "|" + "---|" * (len(cols) + 3)]
    for name in WHAT:
        at = [{N: bcr.pick(e["eval"], N) for N in (1, Nmax)} for e in es if e["name"] == name]
        if at:
            cells = [bcr.spread([a[N][k] for a in at], fmt) for N, k, _, fmt in cols]
            ratio = [a[Nmax]["tokens_per_problem"] / a[1]["tokens_per_problem"] for a in at]
            out.append(f"| {name} | {WHAT[name]} | " + " | ".join(cells + [bcr.spread(ratio, "{:.2f}")]) + " |")
    return "\n".join(out)


def sweep_table(es):
    """Markdown: every row of every run's sweep, beside the truncation model's prediction."""
    out = ["| model | seed | decoding | N | budget | acc | tokens/problem | predicted acc, tokens | direct share "
           "| loops | steps | truncated | acc by slot |", "|" + "---|" * 13]
    for e in es:
        pred = {p["N"]: p for p in e["predicted"]}
        for r in e["eval"] + e["eval_room"]:
            p = pred.get(r["N"]) if r["decoding"] == "sample" and not r.get("room") else None
            cells = [e["name"], e["seed"] or "-", r["decoding"], r["N"], r["budget"], f"{r['acc']:.3f}",
                     f"{r['tokens_per_problem']:.1f}", f"{p['acc']:.3f}, {p['tokens_per_problem']:.1f}" if p else "-",
                     *(f"{r[k]:.2f}" for k in ("direct_share", "loops_per_problem", "steps_per_problem",
                                               "truncation_rate")), " ".join(f"{a:.2f}" for a in r["acc_by_slot"])]
            out.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(out)


def write_report(cfg, device, ev, name="report"):
    """out/<name>.json: config, versions, wall times, one entry per run and the claims checked
    (report: the paper's four, bcr.findings; ablations: budget-aware BCR); out/<name>.md: the same
    as tables; for the report also the figure, out/report.png."""
    es, C, Nmax = entries(cfg, ev), bcr.budget(cfg), max(eval_Ns(cfg))
    wall = {"pretrain": ev["base"]["train_wall_s"]}
    for e, v in zip(es, ev.values()):
        if e["name"] != "base":
            wall[e["name"]] = wall.get(e["name"], 0.0) + v["train_wall_s"]
    wall["eval"] = sum(v["wall_s"] for v in ev.values())
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    report = {"config": asdict(cfg), "versions": {"python": platform.python_version(), "torch": torch.__version__},
              "device": f"{gpu}, RL update in {'bf16' if update_bf16(cfg.update_dtype, device) else 'fp32'}",
              "wall_s": wall, "runs": es,
              "findings": bcr.findings(cfg, ev) if name == "report" else {"budget_aware": bcr.budget_aware(es, Nmax)},
              # the yardstick: the loop-free trace of the eval problems, <eos> included
              "concise_tokens_per_problem": statistics.mean(len(solution(p, 1)) + 1 for p in eval_problems(cfg))}
    if name == "ablations":  # docs/ablations.md is a copy of this file
        aware = report["findings"]["budget_aware"]
        md = [f"# nanoBCR ablations\n\nSampled sweep under C = {C}, mean (min, max) over seeds {cfg.seed}.."
              f"{cfg.seed + cfg.seeds - 1}; b and N vary in training only.\n", summary(es, Nmax),
              f"\n**Budget-aware BCR**: {'reached' if aware['reproduced'] else 'NOT reached'}: "
              f"{aware['evidence']}.", ""]
    else:
        md = [f"# nanoBCR report\n\ntorch {torch.__version__} on {report['device']}; wall time (s): "
              + ", ".join(f"{k} {v:.0f}" for k, v in wall.items()) + "; the loop-free trace of the eval problems: "
              f"{report['concise_tokens_per_problem']:.1f} tokens per problem; shared budget C = {C}\n",
              "## Findings\n", *(f"- **{k}**: {'' if v['reproduced'] else 'NOT '}reproduced. {v['evidence']}."
                                  for k, v in report["findings"].items()),
              "\n## Mean (min, max) over seeds, sampled under C\n", summary(es, Nmax),
              "\n## Every sweep: under C, and the base's with room; predicted: the truncation model\n", sweep_table(es),
              "\n## Config\n\n```\n" + json.dumps(report["config"]) + "\n```\n"]
    atomic_write(f"{cfg.out_dir}/{name}.json", json.dumps(report, indent=1))
    atomic_write(f"{cfg.out_dir}/{name}.md", "\n".join(md))
    return (plot(report, f"{cfg.out_dir}/report.png") + "; " if name == "report" else "") + \
        f"wrote {cfg.out_dir}/{name}.md and {name}.json"


def plot(report, path):
    """The N-sweep (accuracy, tokens per problem; BCR's truncation-model prediction dashed) and the
    RL training curves, as out/report.png. matplotlib is optional: without it, no figure."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no out/report.png: pip install matplotlib for the figure"
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for i, name in enumerate(("base", "bcr", "grpo", "lenpen")):
        es = [e for e in report["runs"] if e["name"] == name]
        Ns = [r["N"] for r in es[0]["eval"] if r["decoding"] == "sample"]
        for j, key in enumerate(("acc", "tokens_per_problem")):
            y = [statistics.mean(bcr.pick(e["eval"], N)[key] for e in es) for N in Ns]
            ax[j].plot(Ns, y, "o-", color=f"C{i}", label=name)
            if name == "bcr":
                pred = [statistics.mean(p[key] for e in es for p in e["predicted"] if p["N"] == N) for N in Ns]
                ax[j].plot(Ns, pred, "--", color=f"C{i}", label="bcr, truncation model")
        if name != "base":
            ax[2].plot([c["step"] for c in es[0]["curve"]], [c["acc"] for c in es[0]["curve"]], color=f"C{i}",
                       label=name)
    C = report["config"]["C"] or 4 * report["config"]["b"]
    ax[1].plot(Ns, [C / N for N in Ns], ":", color="gray", label="C / N")
    for a, t in zip(ax, ("accuracy (sampled) vs N, one shared budget C", "tokens per problem vs N",
                         "RL training accuracy (rollouts), first seed")):
        a.set_title(t, fontsize=10)
        a.legend(fontsize=8)
    ax[1].set_ylim(0, 1.25 * max(max(line.get_ydata()) for line in ax[1].lines[:-1]))  # C / N off the top
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return f"wrote {path}"


def lock(out_dir):
    """Held for the whole run: a second run's saves would interleave with this one's. The kernel
    drops a flock when its process dies, so a killed run never leaves a stale lock."""
    f = open(f"{out_dir}/.lock", "a+")  # not "w": a refused run must not wipe the holder's pid
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        raise ValueError(f"{out_dir}/ is in use by pid {f.read().strip() or '?'}: wait, or use another --out_dir")
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    return f


def main(argv=None):
    held = None
    try:
        cfg = parse_config(argv)
        rank, world, device = setup(cfg)
        tok = build_tokenizer()
        decode_mode(cfg, device)  # --decode=graph without CUDA: refused before any work
        stage, todo = cfg.stage, runs(cfg, ablations=cfg.stage == "ablations")
        missing = [r for r in todo if not os.path.exists(f"{cfg.out_dir}/{r}")]
        needed = {"report": missing, "eval": [r for r in missing if r == "base"]}.get(stage, [])
        if needed:  # refused before anything is touched (a mistyped --out_dir is not created)
            raise ValueError(f"no {', '.join(needed)} in {cfg.out_dir}: run the stages that make them first")
        os.makedirs(cfg.out_dir, exist_ok=True)
        try:
            held, refused = lock(cfg.out_dir) if rank == 0 else None, None  # torchrun's other ranks share rank 0's
        except ValueError as e:
            refused = e
        if all_mean({"ok": float(refused is None)}, world)["ok"] < 1:  # all leave, none waits at a collective
            raise refused or ValueError("rank 0 refused to start (its error says why)")
        if stage not in ("eval", "report"):  # every training stage builds on a finished base: reused, resumed or made
            pretrain(cfg, tok, rank, world, device)
        wanted = {"all": ("bcr", "grpo", "lenpen"), "ablations": ("bcr",)}.get(stage, (stage,))  # + the abl- runs
        for run, (name, tcfg) in todo.items():
            if name in wanted or run.startswith("abl-"):
                rl(tcfg, name, run, int(run.rpartition("-s")[2]), tok, rank, world, device)
        if stage in ("all", "eval", "report", "ablations"):  # --stage=eval: whatever runs are there
            ev = evaluate_runs(cfg, {r: v for r, v in todo.items() if not (stage == "eval" and r in missing) and not
                                     (stage == "ablations" and r.startswith(("grpo", "lenpen")))},
                               rank, world, device, greedy=stage != "ablations")  # ablations: sampled only
            if stage != "eval" and rank == 0:
                print(write_report(cfg, device, ev, "ablations" if stage == "ablations" else "report"))
        if dist.is_initialized():  # leave together: gloo aborts a process whose peer is still busy
            dist.barrier()
    except (ValueError, OSError) as e:  # bad input, or a file it cannot write or read (named in the message)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if held:  # now, not when a traceback holding this frame is freed: a test runs main again at once
            held.close()
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""
nanoBCR's entry point: `python train.py` runs the whole reproduction, reusing finished stages.
  pretrain   a tiny GPT learns verbose arithmetic traces (re-check loops, direct answers) -> out/base
  bcr        BCR: N=3 problems per prompt under one hard cap of N*b tokens            -> out/bcr-s<seed>
  grpo       control: the same GRPO at N=1 with the sweep's budget C (no pressure)     -> out/grpo-s<seed>
  lenpen     control: GRPO at N=1, cap C, reward acc - lenpen*|y|/C                    -> out/lenpen-s<seed>
  eval       every model on N in eval_Ns under the one shared budget C, sampled (greedy at N=1)
  report     the paper's claims judged by report.py                              -> out/report.md, .json, .png
Not part of all: ablations (b, N, credit, std), adapt (budget-aware BCR against the allocation
oracle), frontier (penalty weights against budgets) and arena (the field's methods) -> out/<stage>.*
--stage=<name> runs one (RL stages first finish or reuse the base); --seeds=3 runs three RL seeds.
Each step is logged to out/<run>.jsonl; a finished run is reused only if its saved config matches,
an interrupted one continues with --resume. Several processes: torchrun --nproc_per_node=K.
"""
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace

if __name__ == "__main__":  # Ctrl-C while torch loads (seconds): out at once, nothing is written yet
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

import arena  # noqa: E402
import bcr  # noqa: E402
import checkpoint  # noqa: E402
import report  # noqa: E402
from data import build_tokenizer, prompt, pretrain_batch, solution  # noqa: E402
from model import GPT, GPTConfig, all_mean, autocast, new_optimizer, setup  # noqa: E402
from sample import ArgParser  # noqa: E402

def arg(default, help, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})

@dataclass
class Config:
    # run
    stage: str = arg("all", "what to run", ("all", "pretrain", "bcr", "grpo", "lenpen", "eval", "report",
                                           "ablations", "frontier", "adapt", "arena"))
    out_dir: str = arg("out", "where checkpoints, logs and the report go")
    device: str = arg("auto", "auto | cpu | cuda | mps")
    preset: str = arg("cpu", "cpu: laptop defaults; gpu: bigger model and batches, one GPU", ("cpu", "gpu"))
    seed: int = arg(1, "first RL seed")
    seeds: int = arg(1, "number of RL seeds: seed, seed+1, ...")
    resume: bool = arg(False, "continue an interrupted stage from its last checkpoint")
    save_every: int = arg(100, "steps between checkpoints during a stage")
    # model
    n_layer: int = arg(4, "transformer blocks")
    n_head: int = arg(4, "attention heads (head size 32: cheaper on CPU than 8 heads of 16)")
    n_embd: int = arg(128, "model width")
    block_size: int = arg(768, "longest prompt + completion, in tokens")
    # data: the base's habits
    max_digits: int = arg(2, "operands have 1..max_digits digits")
    ops: str = arg("+-", "operations to draw from")
    max_N: int = arg(8, "pretraining documents hold 1..max_N problems (and budget-aware BCR's prompts)")
    p_loop: float = arg(0.7, "chance of a re-check loop after a step (base style)")
    p_again: float = arg(0.45, "chance of checking once more after a check")
    max_loops: int = arg(4, "most re-checks in a row")
    p_direct: float = arg(0.25, "chance that the base answers a problem with no steps (short, risky)")
    p_runaway: float = arg(0.03, "chance of a runaway re-check loop in a verbose solution")
    # pretraining
    base_seed: int = arg(0, "seed of the base model's init and data")
    pt_steps: int = arg(1000, "pretraining steps")
    pt_docs: int = arg(32, "documents per pretraining step (small batches, many updates: faster here)")
    pt_micro_tokens: int = arg(4096, "padded tokens per micro-batch")
    pt_max_pad: float = arg(1.2, "a micro-batch ends before a row longer than this x its first (GPU: more)")
    pt_lr: float = arg(2e-3, "peak AdamW learning rate of pretraining (embeddings, norms)")
    pt_muon_lr: float = arg(0.02, "Muon learning rate of the blocks' matrices (0: AdamW for every weight)")
    pt_grow_N: float = arg(0.5, "share of pretraining over which the largest N grows from 2 to max_N")
    pt_concise: float = arg(0.7, "share of pretraining with mostly concise traces before all verbose")
    warmup: int = arg(30, "linear warm-up steps")
    grad_clip: float = arg(1.0, "gradient-norm clip")
    # RL
    N: int = arg(3, "problems per packed prompt in BCR training (the paper's best)")
    b: int = arg(36, "completion tokens per problem: the BCR cap is N*b")
    G: int = arg(8, "samples per prompt (the GRPO group)")
    prompts: int = arg(8, "packed prompts per RL step")
    rl_steps: int = arg(100, "RL steps of each RL run")
    adapt_steps: int = arg(1200, "RL steps of budget-aware BCR (--stage=adapt): learning to read N is slow")
    rl_lr: float = arg(1e-4, "RL learning rate (constant after warm-up)")
    temperature: float = arg(1.0, "sampling temperature in RL and in sampled evaluation")
    std_norm: bool = arg(True, "divide advantages by the group's std (False: Dr. GRPO / REINFORCE)")
    token_mean: bool = arg(True, "average the loss over tokens (False: per sequence, then over sequences)")
    slot_credit: bool = arg(False, "problem k's advantage on problem k's tokens (False: one shared reward)")
    kl: float = arg(0.0, "weight of the k3 KL penalty to the frozen base (0: none)")
    format_bonus: float = arg(0.1, "reward for exactly N labelled answers followed by <eos>")
    lenpen: float = arg(1.0, "lambda of the length-penalty control: r = acc - lambda*|y|/C")
    method: str = arg("", "a method of the arena turning rewards into advantages (arena.py; '': BCR's)")
    update_dtype: str = arg("auto", "RL update's autocast (auto: bf16 on CUDA and on a CPU with native bf16)",
                            ("auto", "bf16", "fp32"))
    # evaluation
    eval_problems: int = arg(512, "held-out problems per N")
    eval_Ns: str = arg("1,2,3,4,5,6,7,8", "values of N in the evaluation sweep")
    C: int = arg(0, "the sweep's one completion budget, the same for every N (0: 4*b, binding from N=4)")
    eval_batch: int = arg(256, "prompts decoded together in evaluation")
    eval_seed: int = arg(1234, "seed of the evaluation problems and sampling")

# gpu: the same task and recipe, a 4.8M-parameter model, 2x the documents, 4x the RL prompts, and far
# fewer, bigger pretraining micro-batches (a small GPU step is bound by kernel launches, not arithmetic)
PRESETS = {"cpu": {}, "gpu": dict(n_layer=6, n_head=8, n_embd=256, pt_docs=64, pt_micro_tokens=16384,
                                  pt_max_pad=100.0, prompts=32, eval_batch=512)}
# what a checkpoint must have been made with to be reused: the model, the base's data and recipe, RL's
MODEL_KEYS = ("n_layer", "n_head", "n_embd", "block_size")
BASE_KEYS = MODEL_KEYS + tuple("max_digits ops max_N p_loop p_again max_loops p_direct p_runaway base_seed "
                               "pt_steps pt_docs pt_micro_tokens pt_max_pad pt_lr pt_muon_lr pt_grow_N "
                               "pt_concise warmup grad_clip".split())
RL_KEYS = BASE_KEYS + tuple("N b G prompts rl_steps rl_lr temperature std_norm token_mean slot_credit kl "
                            "format_bonus lenpen method update_dtype".split())
EVAL_KEYS = ("eval_problems", "eval_Ns", "C", "eval_seed", "temperature")
# Variants, RL runs on the same base: label -> (task, flags); a main run's label (bcr, lenpen) is that run.
# The paper's ablations, budgets at 0.8x / 1.2x b as its 4096 / 6144 tokens against 5120, and one beyond it
ABLATIONS = {"b29": ("bcr", dict(b=29)), "b43": ("bcr", dict(b=43)), "N2": ("bcr", dict(N=2)),
             "N4": ("bcr", dict(N=4)), "N5": ("bcr", dict(N=5)), "slot": ("bcr", dict(slot_credit=True)),
             "nostd": ("bcr", dict(std_norm=False))}
# Budget-aware BCR (trained for --adapt_steps)
ADAPT = {"adapt": ("adapt", {})}
VARIANTS = {"ablations": ABLATIONS, "frontier": arena.FRONTIER, "adapt": ADAPT, "arena": arena.ARENA}

TRAIN_ONLY = ("pretrain", "bcr", "grpo", "lenpen")  # stages that write no report

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

AT_LEAST = {2: "G", 1: "seeds prompts max_digits eval_problems eval_batch pt_docs pt_micro_tokens save_every "
                      "pt_max_pad max_loops",
           0: "seed base_seed eval_seed pt_steps rl_steps adapt_steps warmup C pt_lr pt_muon_lr rl_lr kl "
              "lenpen grad_clip p_loop p_again p_direct p_runaway pt_grow_N pt_concise"}

def validate(cfg):
    """Every bad value gets a one-line reason before any work starts: one table of (condition,
    message), checked in order, so that a value is named before what depends on it."""
    ok_Ns = all(x.strip().isdigit() and x.isascii() for x in cfg.eval_Ns.split(","))
    Ns, digits = [int(x) for x in cfg.eval_Ns.split(",")] if ok_Ns else [1], min(max(cfg.max_digits, 1), 18)
    worst, C, cap = (10 ** digits - 1, "+", 10 ** digits - 1), bcr.sweep_budget(cfg), cfg.N * cfg.b
    shortest = len(solution(worst, 1)) + 1
    longest = len(prompt([worst] * min(max(cfg.max_N, cfg.N, *Ns), 14)))
    table = [
        (ok_Ns, "--eval_Ns: integers, comma-separated"),
        *[(math.isfinite(getattr(cfg, f.name)), f"--{f.name} must be finite")
          for f in fields(cfg) if f.type is float],
        *[(getattr(cfg, k) >= lo, f"--{k} must be >= {lo}") for lo, names in AT_LEAST.items()
          for k in names.split()],
        (max(cfg.p_loop, cfg.p_direct, cfg.p_runaway, cfg.pt_grow_N, cfg.pt_concise) <= 1 and cfg.p_again < 1,
         "--p_loop, --p_direct, --p_runaway, --pt_grow_N, --pt_concise must be at most 1, --p_again below 1"),
        (max(cfg.seed + cfg.seeds, cfg.base_seed, cfg.eval_seed) < 2 ** 31, "seeds must be below 2**31"),
        (max(cfg.pt_lr, cfg.pt_muon_lr, cfg.rl_lr) <= 10, "--pt_lr, --pt_muon_lr, --rl_lr: at most 10"),
        (cfg.max_digits <= 18, "--max_digits must be at most 18"),
        (cfg.temperature == 0 or 0.01 <= cfg.temperature <= 100, "--temperature: 0 (greedy) or 0.01 to 100"),
        (cfg.ops and set(cfg.ops) <= set("+-"), "--ops must use only + and -"),
        (cfg.method in ("", *bcr.METHODS), f"--method: '' or one of {', '.join(bcr.METHODS)}"),
        (not os.path.isfile(cfg.out_dir), f"--out_dir={cfg.out_dir!r} is a file, not a folder"),
        (cfg.out_dir.encode(errors="replace").decode() == cfg.out_dir,
         f"--out_dir={cfg.out_dir!r} is not UTF-8"),
        (1 <= min(cfg.N, cfg.max_N, *Ns) and max(cfg.N, cfg.max_N, *Ns) <= 14, "N, max_N, eval N: 1 to 14"),
        (Ns == sorted(set(Ns)) and cfg.eval_problems >= Ns[-1],
         "--eval_Ns must be ascending with no repeats, --eval_problems at least its largest N"),
        (Ns[0] == 1 or cfg.stage in TRAIN_ONLY + ("eval",), "--eval_Ns must start at 1 for a report"),
        (cfg.eval_problems <= 10 ** 6, "--eval_problems: at most 1000000"),
        (min(cap, C) >= shortest, f"--N*--b={cap} or --C={C} cannot hold an answer ({shortest} tokens)"),
        (longest + max(C, cap) <= cfg.block_size,
         f"the longest prompt ({longest}) + the cap ({max(C, cap)}) exceed --block_size={cfg.block_size}")]
    for ok, why in table:
        if not ok:
            raise ValueError(why)
    # the model's own checks (sizes, head size), then memory for the largest decode batch
    shape = GPTConfig(**{k: getattr(cfg, k) for k in MODEL_KEYS})
    checkpoint.check_memory(shape, cfg.eval_batch, training=True)

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
    """The bookkeeping of every training run, around its `for step in run.steps` loop: resume an
    interrupted checkpoint (meta: checkpoint.checked's), log each step, save every save_every steps
    and at the end (rank 0), stop on a non-finite step with the last good checkpoint untouched."""

    def __init__(self, cfg, folder, meta, model, opt, total, rank, world):
        self.cfg, self.folder, self.model, self.opt, self.total, self.rank, self.world = (
            cfg, folder, model, opt, total, rank, world)
        start = checkpoint.restore(folder, model, opt, meta["step"]) if meta else 0
        self.wall, self.t0 = meta["wall_s"] if meta else 0.0, time.perf_counter()
        self.log = checkpoint.Log(folder + ".jsonl", start, rank)
        if world > 1:  # every process starts from rank 0's weights
            for p in model.parameters():
                dist.broadcast(p.data, 0)
        self.steps = tqdm(range(start, total), desc=os.path.basename(folder), disable=rank > 0, initial=start,
                          total=total)
        if start == total:
            self.save(total)

    def end_step(self, step, row):
        # a huge step can overflow the weights, or Adam's moments, from a finite gradient: never saved
        state = [t for p in self.model.parameters() for t in [p, *self.opt.state.get(p, {}).values()]
                 if torch.is_tensor(t) and t.is_floating_point()]
        if not (row.pop("finite") and torch.stack([t.isfinite().all() for t in state]).all()):
            last = f"the last good checkpoint in {self.folder} is untouched" if os.path.exists(self.folder) \
                else "nothing was saved yet"
            raise ValueError(f"non-finite loss, gradient, weights or optimizer state at step {step}: "
                             f"stopped; {last}")
        row = all_mean(row, self.world)
        self.log({"step": step, **row})
        self.steps.set_postfix({k: f"{row[k]:.3g}" for k in ("loss", "reward", "tokens", "loops")
                                if k in row})
        if step + 1 == self.total or (step + 1) % self.cfg.save_every == 0:
            self.save(step + 1)

    def save(self, step):
        if self.rank == 0:
            meta = {"train": asdict(self.cfg), "step": step, "done": step == self.total,
                    "wall_s": self.wall + time.perf_counter() - self.t0}
            state = {"step": step, "opt": self.opt.state_dict()}
            checkpoint.save(self.folder, self.model, build_tokenizer(), meta, state)
        if self.world > 1 and step == self.total:
            dist.barrier()

def pretrain_step(model, opt, cfg, tok, step, rank, world, device):
    """One step of next-token cross-entropy on verbose traces, loss on completion tokens only
    (tests/bench.py --what=pretrain times it too)."""
    t0 = time.perf_counter()
    lr = set_lr(opt, step, cfg.pt_steps, cfg.pt_lr, cfg.warmup, cosine=True)
    micro, n_targets = pretrain_batch(tok, cfg, step, rank, world)
    if not micro:
        raise ValueError(f"every document of pretraining step {step} exceeds --block_size={cfg.block_size}")
    t_data = time.perf_counter() - t0
    loss_sum, n_tok = 0.0, 0
    for idx, seg, tgt in micro:
        idx, seg, tgt = idx.to(device), seg.to(device), tgt.to(device)   # (b, T) each
        with autocast(device):
            logits = model(idx, seg)                                     # (b, T, V)
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

def pretrain(cfg, meta, tok, rank, world, device):
    """The verbose base: finished -> reused; interrupted (meta: its checkpoint) -> resumed."""
    folder = f"{cfg.out_dir}/base"
    if meta and meta["done"]:
        return
    torch.manual_seed(cfg.base_seed)
    model = GPT(GPTConfig(tok.get_vocab_size(), **{k: getattr(cfg, k) for k in MODEL_KEYS})).to(device)
    opt = new_optimizer(model, cfg.pt_lr, cfg.pt_muon_lr)
    run = Run(cfg, folder, meta, model, opt, cfg.pt_steps, rank, world)
    for step in run.steps:
        run.end_step(step, pretrain_step(model, opt, cfg, tok, step, rank, world, device))

def train_rl(cfg, meta, task, name, seed, tok, rank, world, device):
    """One RL run on the base: task is bcr.task's (bcr, adapt, grpo, lenpen); cfg may hold a variant's
    flags; meta is its checkpoint's, if it has one (finished: reused; interrupted: resumed)."""
    folder = f"{cfg.out_dir}/{name}"
    if meta and meta["done"]:
        return
    model = checkpoint.load(f"{cfg.out_dir}/base", device)[0]
    ref = checkpoint.load(f"{cfg.out_dir}/base", device)[0] if cfg.kl > 0 else None
    opt = new_optimizer(model, cfg.rl_lr)
    spec = bcr.task(task, cfg)
    step_cfg = replace(cfg, lenpen=spec.lenpen)
    run = Run(cfg, folder, meta, model, opt, cfg.rl_steps, rank, world)
    for step in run.steps:
        set_lr(opt, step, cfg.rl_steps, cfg.rl_lr, min(cfg.warmup, 10), cosine=False)
        groups = bcr.rl_batch(task, cfg, seed, step)
        gen = torch.Generator(device).manual_seed(seed * 1_000_003 + step * 101 + rank)
        # the step's groups are split over processes: a group never straddles two of them
        row = bcr.rl_step(model, opt, tok, groups[rank::world], spec.cap, gen, step_cfg, ref, world)
        run.end_step(step, row)

def plan(cfg):
    """What the stage trains or evaluates, in order, the base first: {run name: (task, config, seed)}.
    A variant (VARIANTS) is trained with its own flags as abl-<label>-s<seed>; a main run's label
    (bcr, lenpen) is that run, reused."""
    seeds, stage = range(cfg.seed, cfg.seed + cfg.seeds), cfg.stage
    controls = "bcr grpo lenpen"  # the main runs the report judges
    main = {"all": controls, "eval": controls, "report": controls, "ablations": "bcr", "adapt": "bcr",
            "bcr": "bcr", "grpo": "grpo", "lenpen": "lenpen"}.get(stage, "").split()
    out = {"base": ("base", cfg, None)} | {f"{t}-s{s}": (t, cfg, s) for s in seeds for t in main}
    for label, (task, flags) in VARIANTS.get(stage, {}).items():
        run_cfg = replace(cfg, **flags, **{"rl_steps": cfg.adapt_steps} if task == "adapt" else {})
        try:
            validate(run_cfg)
        except ValueError as e:
            raise ValueError(f"{stage} variant {label} ({flags}): {e}") from None
        name = label if label in ("bcr", "lenpen") else f"abl-{label}"
        out |= {f"{name}-s{s}": (task, run_cfg, s) for s in seeds}
    return out

# ----------------------------------------------------------------------------- evaluation

def check(cfg, run, run_cfg, evaluating):
    """A run's checkpoint against the flags that made it (checkpoint.checked): None if it has none.
    Evaluation never trains, so it wants the run finished, and its own flags may differ."""
    keys = [k for k in (BASE_KEYS if run == "base" else RL_KEYS) if not (evaluating and k in EVAL_KEYS)]
    total = run_cfg.pt_steps if run == "base" else run_cfg.rl_steps
    return checkpoint.checked(f"{cfg.out_dir}/{run}", run_cfg, keys, total, need_done=evaluating)

def main(argv=None):
    held, cfg = None, None
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C from here: says where checkpoints are
    try:
        # 1) the config, the processes and the runs; refusals before anything is touched
        cfg = parse_config(argv)
        rank, world, device = setup(cfg)
        tok = build_tokenizer()
        todo, stage = plan(cfg), cfg.stage
        missing = [r for r in todo if not os.path.exists(f"{cfg.out_dir}/{r}")]
        needed = {"report": missing, "eval": [r for r in missing if r == "base"]}.get(stage, [])
        if needed:  # (a mistyped --out_dir is not created)
            raise ValueError(f"no {', '.join(needed)} in {cfg.out_dir}: run the stages that make them first")
        os.makedirs(cfg.out_dir, exist_ok=True)
        refused = None
        try:  # rank 0 alone takes the lock and repairs what a kill left; the other ranks wait for it
            held = checkpoint.lock(cfg.out_dir) if rank == 0 else None
            for run in todo if rank == 0 else ():
                checkpoint.recover(f"{cfg.out_dir}/{run}")
        except ValueError as e:
            refused = e
        if all_mean({"ok": float(refused is None)}, world)["ok"] < 1:  # all leave, none waits at a collective
            raise refused or ValueError("rank 0 refused to start (its error says why)")
        # 2) every run's checkpoint checked before the first is trained (eval: only those there)
        evaluating = stage in ("eval", "report")
        metas = {run: check(cfg, run, run_cfg, evaluating) for run, (_, run_cfg, _) in todo.items()}
        # 3) the base, then the RL runs: each reused, resumed or trained (eval and report only read)
        if not evaluating:
            pretrain(cfg, metas["base"], tok, rank, world, device)
            for run, (task, run_cfg, seed) in list(todo.items())[1:]:
                train_rl(run_cfg, metas[run], task, run, seed, tok, rank, world, device)
        # 4) evaluation (eval: the runs that are there; the variants' stages: sampled only), the report
        if stage not in TRAIN_ONLY:
            there = [r for r in todo if r not in missing or stage != "eval"]
            metas = {r: check(cfg, r, todo[r][1], evaluating=True) for r in there}  # finished, these flags
            key = {**{k: getattr(cfg, k) for k in EVAL_KEYS}, "format": 3}  # 3: direct answers by columns
            greedy = stage in ("all", "eval", "report")
            evals = report.sweeps(cfg, metas, key, rank, world, device, greedy)
            if stage != "eval" and rank == 0:
                write = arena.write if stage in ("frontier", "arena") else report.write
                print(write(cfg, device, evals, VARIANTS.get(stage, {})))
        if dist.is_initialized():  # leave together: gloo aborts a process whose peer is still busy
            dist.barrier()
    except (ValueError, OSError, MemoryError, RuntimeError) as e:  # bad input, a file it cannot write or read
        if isinstance(e, RuntimeError) and "alloc" not in str(e):  # (named in the message), no memory left
            raise
        print(f"error: {str(e).splitlines()[0] if str(e) else 'out of memory'}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C: saves are atomic, so the last checkpoint is whole
        where = f"{cfg.out_dir}/" if cfg else "--out_dir"
        print(f"\ninterrupted: the last checkpoints are in {where}; the same command with --resume goes on",
              file=sys.stderr)
        sys.exit(130)
    finally:
        if held:  # now, not when a traceback holding this frame is freed: a test runs main again at once
            held.close()
        if dist.is_initialized():
            dist.destroy_process_group()

if __name__ == "__main__":
    main()

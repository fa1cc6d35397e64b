"""
Speed benchmarks (pytest does not collect this file). Every comparison is measured in one run,
alternating the contenders round by round, and reported as medians and ratios.

  python tests/bench.py                      # sampler, training throughput, one RL step
  python tests/bench.py --what=sample --rounds=5
  python tests/bench.py --ckpt=out/base      # the RL step on the real verbose base

sample: batch 64, a short prompt, 96 new tokens at temperature 1 (every row forced to the full
        length): our cached sampler (eager, static, and graph on CUDA), the naive full-recompute
        loop, and Hugging Face generate on a Llama of identical d, layers, heads, MLP width and
        vocab (random weights) if `transformers` is installed.
train:  fwd+bwd+AdamW tokens/s on pretraining-shaped batches, with an MFU estimate against the
        fp32 (CUDA: bf16) matmul rate measured in the same run, and the same for the HF Llama.
rl:     one BCR step (64 rollouts of up to 90 new tokens, then the update), split into rollout (with
        scoring) and update; where the update runs in bf16 (a CPU with native bf16, or CUDA), the
        fp32 update is timed beside it on the same rollouts.
pretrain (not in all): real pretraining steps, whose shapes change every micro-batch;
        --preset=gpu for the GPU batch, --profile for torch.profiler tables.
eval (not in all; give --ckpt): the evaluation's first batch (up to 256 prompts, 512 with
        --preset=gpu, of N problems under the budget C) at N = 1 and 3, eager decoding with finished rows dropped
        vs. kept in the batch, and on CUDA the CUDA-graph path.
"""
import math
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bcr  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402
from data import build_tokenizer, doc_rng, encode, heldout_problems, packed_prompts, prompt, segments  # noqa: E402
from model import GPT, GPTConfig, autocast, new_optimizer, pick_device, update_bf16  # noqa: E402
from checkpoint import load as load_checkpoint  # noqa: E402
from train import ArgParser  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def rounds(contenders, n, device):
    """Run each contender once per round, alternating; median seconds of each."""
    times = {}
    for k, fn in list(contenders.items()):  # warm-up (and CUDA graph / compile set-up) outside the timing
        try:
            fn()
            times[k] = []
        except Exception as e:  # an optional contender (HF) that breaks must not cost the others' figures
            print(f"  {k}: failed, left out ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
            del contenders[k]
    for _ in range(n):
        for k, fn in contenders.items():
            times[k].append(timed(fn, device))
    return {k: statistics.median(v) for k, v in times.items()}


def hf_llama(cfg, device):
    """The equal-size Llama, or None when transformers is not installed (it is never required)."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    hf = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=4 * cfg.n_embd,
                     num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                     num_key_value_heads=cfg.n_head, max_position_embeddings=cfg.block_size,
                     tie_word_embeddings=True, pad_token_id=0, bos_token_id=2, eos_token_id=1)
    return LlamaForCausalLM(hf).to(device).eval()


def bench_sample(model, device, n_rounds, batch=64, new=96):
    prompts = [[17, 3, 14, 4, 7, 10, 6, 5, 16]] * batch  # "Q1:25+43\n"
    sample.EOS = -1  # no row may stop early: every contender decodes exactly `new` tokens
    gen = torch.Generator(device).manual_seed(0)
    c = {"cached (eager)": lambda: sample.generate(model, prompts, new, 1.0, 0, gen, "eager"),
         "cached (static)": lambda: sample.generate(model, prompts, new, 1.0, 0, gen, "static"),
         "naive recompute": lambda: sample.generate_naive(model, prompts, new, 1.0, 0, gen)}
    if device.type == "cuda":
        c["cached (graph)"] = lambda: sample.generate(model, prompts, new, 1.0, 0, gen, "graph")
    hf = hf_llama(model.cfg, device)
    if hf is not None:
        ids = torch.tensor(prompts, device=device)

        def hf_generate():
            with torch.inference_mode(), autocast(device):
                hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                            top_k=0, max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
        c["HF generate (Llama)"] = hf_generate
    med = rounds(c, n_rounds, device)
    sample.EOS = 1
    tps = {k: batch * new / v for k, v in med.items()}
    print(f"\nsampling: batch {batch}, prompt 9 tokens, {new} new tokens, temperature 1, median of {n_rounds}")
    for k, v in tps.items():
        print(f"  {k:22s} {v:10.0f} tok/s   {v / tps['cached (eager)']:.2f}x eager")
    ours = max(v for k, v in tps.items() if k.startswith("cached"))
    print(f"  best cached / naive = {ours / tps['naive recompute']:.1f}x")
    if "HF generate (Llama)" in tps:
        print(f"  best cached / HF generate = {ours / tps['HF generate (Llama)']:.2f}x")
    return tps


def matmul_rate(device):
    n = 4096 if device.type == "cuda" else 1024  # big enough to near the card's peak
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    k = 50 if device.type == "cuda" else 10
    best = min(timed(lambda: [a @ b for _ in range(k)], device) for _ in range(5))
    return 2 * n ** 3 * k / best


def bench_train(model, device, n_rounds, rows=16, T=256):
    """fwd+bwd+AdamW on (rows, T) batches: tokens/s and MFU (6*params + attention FLOPs per token)."""
    cfg = model.cfg
    x = torch.randint(2, cfg.vocab_size, (rows, T + 1), device=device)
    seg = segments(x[:, :-1], T // 4)

    def step_fn(m, opt, hf=False):
        def go():
            with autocast(device):
                logits = m(x[:, :-1]).logits if hf else m(x[:, :-1], seg)
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return go
    ours = GPT(cfg).to(device).train()
    c = {"ours": step_fn(ours, torch.optim.AdamW(ours.parameters(), 1e-4, fused=True))}
    hf = hf_llama(cfg, device)
    if hf is not None:
        hf.train()
        c["HF Llama"] = step_fn(hf, torch.optim.AdamW(hf.parameters(), 1e-4, fused=True), hf=True)
    med = rounds(c, n_rounds, device)
    peak = matmul_rate(device)
    params = sum(p.numel() for p in ours.parameters())
    flops_tok = 6 * params + 6 * cfg.n_layer * T * cfg.n_embd  # causal attention: half of 12*L*T*d
    print(f"\ntraining: fwd+bwd+AdamW on ({rows}, {T}) tokens, median of {n_rounds}; "
          f"measured matmul rate {peak / 1e9:.0f} GFLOP/s ({'bf16' if device.type == 'cuda' else 'fp32'})")
    for k, v in med.items():
        tps = rows * T / v
        print(f"  {k:10s} {tps:10.0f} tok/s   MFU {tps * flops_tok / peak:.0%} (our FLOP count)   "
              f"{med['ours'] and v / med['ours']:.2f}x our step time")
    if "HF Llama" in med:
        print(f"  ours / HF Llama = {med['HF Llama'] / med['ours']:.2f}x")


def bench_rl(model, device, n_rounds):
    """One BCR step at the default shape: 8 prompts x G=8 of N=3 problems, cap 3*30 = 90. Where the
    update runs in bf16 (update_dtype=auto), an fp32 update is timed beside it, round by round; and
    with `trl` installed, TRL's GRPOTrainer on the same workload, its steps alternating with ours."""
    tok = build_tokenizer()
    cfg = SimpleNamespace(max_digits=2, ops="+-", G=8, temperature=1.0, std_norm=True, token_mean=True,
                          slot_credit=False, kl=0.0, lenpen=0.0, method="", format_bonus=0.1, grad_clip=1.0,
                          update_dtype="auto")
    dtypes = ["bf16" if update_bf16(cfg.update_dtype, device) else "fp32"]
    dtypes += ["fp32"] if dtypes[0] == "bf16" else []
    opt = torch.optim.AdamW(model.parameters(), 1e-9, fused=True)  # a tiny lr keeps the model as it is
    splits, total = {d: [] for d in dtypes}, {d: [] for d in dtypes}

    def ours(step):
        groups = packed_prompts(doc_rng("bench", step), cfg, 8, 3)
        for d in dtypes:  # the same groups and sampling seed: the same rollouts
            gen, c = torch.Generator(device).manual_seed(step), SimpleNamespace(**{**vars(cfg), "update_dtype": d})
            total[d].append(timed(lambda: splits[d].append(bcr.rl_step(model, opt, tok, groups, 90, gen, c)), device))
    ours(0)  # a warm-up, and the length of our base's completions, which TRL's random Llama is held to
    batches = [packed_prompts(doc_rng("bench", s), cfg, 8, 3) for s in range(1, n_rounds + 2)]
    trl = trl_steps(model.cfg, device, batches, ours, round(splits[dtypes[0]][0]["tokens"]))  # ours between its steps
    if trl is None:
        for step in range(1, n_rounds + 1):
            ours(step)
    print(f"\nBCR step: 64 rollouts (N=3, cap 90), median of {n_rounds}:")
    for d in dtypes:  # the first step warms up
        med = {k: statistics.median(s[k] for s in splits[d][1:]) for k in ("t_rollout", "t_update", "tokens")}
        print(f"  update in {d}: {statistics.median(total[d][1:]):.3f} s = rollout and "
              f"scoring {med['t_rollout']:.3f} + update {med['t_update']:.3f}; "
              f"mean completion {med['tokens']:.0f} tokens")
    if trl is None:
        print("  TRL GRPOTrainer: not installed (pip install trl), left out")
    else:
        t = statistics.median(trl[1:])
        print(f"  TRL GRPOTrainer (equal-size Llama, same prompts, cap and reward): {t:.3f} s a step; "
              f"ours {t / statistics.median(total[dtypes[0]][1:]):.2f}x faster")


def trl_steps(cfg, device, batches, ours, length):
    """Step times of TRL's GRPOTrainer on `batches` of packed prompts (8 prompts x 8 generations, at
    most 90 new tokens, no KL, one update per batch: our defaults; the share of problems right as
    its reward), calling ours(i) after its step i so that the two alternate; None without trl.
    Its random-weight Llama would stop at a random <eos> after a few tokens, so it writes at least
    `length` tokens: the mean of our trained base's completions on the same prompts."""
    try:
        from datasets import Dataset
        from transformers import PreTrainedTokenizerFast, TrainerCallback
        from trl import GRPOConfig, GRPOTrainer
    except ImportError:
        return None
    import tempfile
    from reward import score
    flat = [g for b in batches for g in b]
    data = Dataset.from_dict({"prompt": [prompt(g) for g in flat], "i": list(range(len(flat)))})
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=build_tokenizer(), pad_token="<pad>", eos_token="<eos>")

    def reward(prompts, completions, i, **_):
        return [score(c, flat[k]).acc for c, k in zip(completions, i)]

    times = []

    class Alternate(TrainerCallback):
        def on_step_begin(self, args, state, control, **_):
            sync(device)
            times.append(time.perf_counter())

        def on_step_end(self, args, state, control, **_):
            sync(device)
            times[-1] = time.perf_counter() - times[-1]
            ours(len(times))
    args = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=64, num_generations=8,
                      max_completion_length=90, beta=0.0, num_iterations=1, learning_rate=1e-9, temperature=1.0,
                      gradient_checkpointing=False, use_cpu=device.type == "cpu", bf16=device.type == "cuda",
                      save_strategy="no", report_to="none", logging_steps=10 ** 6, disable_tqdm=True,
                      max_steps=len(batches), shuffle_dataset=False, seed=0,
                      generation_kwargs={"min_new_tokens": length})
    GRPOTrainer(model=hf_llama(cfg, device).train(), reward_funcs=reward, args=args, train_dataset=data,
                processing_class=hf_tok, callbacks=[Alternate()]).train()
    return times


def bench_eval(model, device, n_rounds, preset="cpu", Ns=(1, 3)):
    """The evaluation's first batch at each N (train.py's defaults for --preset), decoded eagerly
    with finished rows dropped and kept (the same tokens, tests/test_sample.py), and on CUDA by the
    CUDA graph (whole batch, fixed shapes), alternating."""
    cfg, tok = train.parse_config([f"--preset={preset}"]), build_tokenizer()
    print(f"\nevaluation batch: up to {cfg.eval_batch} prompts, budget {bcr.sweep_budget(cfg)}, T={cfg.temperature}, "
          f"median of {n_rounds}:")
    modes = {"eager, dropped": ("eager", True), "eager, kept": ("eager", False)}
    if device.type == "cuda":
        modes["graph"] = ("graph", False)
    probs = heldout_problems(cfg)
    for N in Ns:  # the prompts bcr.evaluate decodes first: ceil(len/N) of them, problems reused to fill
        flat = (probs * 2)[:math.ceil(len(probs) / N) * N]
        ids = encode(tok, [prompt(flat[i:i + N]) for i in range(0, len(flat), N)][:cfg.eval_batch])
        lengths = {}

        def run(name):
            gen = torch.Generator(device).manual_seed(cfg.eval_seed)
            lengths[name] = sample.generate(model, ids, bcr.sweep_budget(cfg), cfg.temperature, 0, gen, *modes[name])[1]
        med = rounds({k: lambda k=k: run(k) for k in modes}, n_rounds, device)
        n = lengths["eager, dropped"]
        print(f"  N={N}, {len(ids)} prompts (mean completion {n.float().mean():.0f} tokens, longest {int(n.max())}): "
              + ", ".join(f"{k} {v:.3f} s" for k, v in med.items())
              + f"; kept / dropped {med['eager, kept'] / med['eager, dropped']:.2f}x")


def bench_pretrain(model, device, n_rounds, preset, profile, max_pad=None):
    """Real pretraining steps (train.pretrain_step): documents of every length, so the micro-batch
    shapes change all the time, which the fixed-shape training bench cannot see (on an H100 it hid
    100x fewer tokens/s). Steps from pt_concise * pt_steps on: past both curricula."""
    cfg = train.parse_config([f"--preset={preset}"] + ([f"--pt_max_pad={max_pad}"] if max_pad else []))
    tok, opt = build_tokenizer(), new_optimizer(model.train(), cfg.pt_lr, cfg.pt_muon_lr)
    s0, rows = int(cfg.pt_concise * cfg.pt_steps), []
    step = lambda i: rows.append(train.pretrain_step(model, opt, cfg, tok, s0 + i, 0, 1, device))  # noqa: E731
    total = [timed(lambda i=i: step(i), device) for i in range(n_rounds + 1)][1:]  # the first step warms up
    med = {k: statistics.median(r[k] for r in rows[1:]) for k in ("tokens_per_s", "t_data", "micro_batches")}
    print(f"\npretraining (--preset={preset}, {cfg.pt_docs} documents a step, "
          f"pt_max_pad {cfg.pt_max_pad}), "
          f"median of {n_rounds}: "
          f"{statistics.median(total):.3f} s a step, data {med['t_data']:.3f} s, "
          f"{med['micro_batches']:.0f} micro-batches, {med['tokens_per_s']:.0f} tok/s")
    if profile:
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch.profiler.profile(activities=acts) as prof:
            for i in range(3):
                step(n_rounds + 1 + i)
        sync(device)
        for key in ("self_cpu_time_total",) + (("self_device_time_total",) if device.type == "cuda" else ()):
            print(prof.key_averages().table(sort_by=key, row_limit=12))


def main(argv=None):
    ap = ArgParser(prog="bench.py", description="nanoBCR speed benchmarks")
    ap.add_argument("--what", default="all", choices=["all", "sample", "train", "rl", "pretrain", "eval"],
                    help="which benchmark (all: the first three)")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds per contender (median reported)")
    ap.add_argument("--ckpt", default="", help="checkpoint for the RL step and eval (default: random weights)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--n_layer", type=int, default=4, help="model size of the random-weight models")
    ap.add_argument("--n_embd", type=int, default=128, help="model width")
    ap.add_argument("--n_head", type=int, default=4, help="attention heads")
    ap.add_argument("--preset", default="cpu", choices=list(train.PRESETS), help="pretrain, eval: batch shapes of this preset")
    ap.add_argument("--profile", action="store_true", help="pretrain: torch.profiler tables of 3 more steps")
    ap.add_argument("--pt_max_pad", type=float, default=None, help="pretrain: train.py's --pt_max_pad (default: the preset's)")
    try:
        args = ap.parse_args(argv)
        if args.rounds < 1:
            raise ValueError("--rounds must be >= 1")
        if args.pt_max_pad is not None and args.pt_max_pad < 1:
            raise ValueError("--pt_max_pad must be >= 1")
        device = pick_device(args.device)
        torch.manual_seed(0)
        cfg = GPTConfig(vocab_size=23, block_size=768, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
        model = load_checkpoint(args.ckpt, device)[0] if args.ckpt else GPT(cfg).to(device).eval()
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"model {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params")
    if args.what in ("all", "sample"):
        bench_sample(model, device, args.rounds)
    if args.what in ("all", "train"):
        bench_train(model, device, args.rounds, rows=64 if device.type == "cuda" else 16)  # GPU: preset's 16k tokens
    if args.what in ("all", "rl"):
        bench_rl(model, device, args.rounds)
    if args.what == "pretrain":
        bench_pretrain(model, device, args.rounds, args.preset, args.profile, args.pt_max_pad)
    if args.what == "eval":
        bench_eval(model, device, args.rounds, args.preset)


if __name__ == "__main__":
    main()

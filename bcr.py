"""
Batched Contextual Reinforcement (BCR, arXiv 2604.02322), in miniature. One BCR step:
1. Pack N problems of one difficulty (digit columns) into a prompt; take `prompts` such prompts.
2. Sample G completions of each under one hard cap of N*b new tokens for the whole packed answer,
   the only pressure towards brevity: verbosity on early problems leaves no room for later ones.
3. Reward: the share of the N problems right, + format_bonus for exactly N labelled answers then
   <eos>. A problem the cap cut off scores 0; those before it keep their credit. No length term.
4. GRPO: advantages normalised within each group of G samples of one prompt; one on-policy step
   on -A * log p(token), averaged over the batch's completion tokens.
Departures from the paper (its code and hyper-parameters are not public): "GRPO" as nanochat's
chat_rl.py (on-policy, one update a batch: no ratio, no clipping; no KL unless kl > 0; a token
mean unless token_mean=False); "similar difficulty" is one column count; a bf16 update beside fp32
sampling is slightly off-policy, uncorrected. Switches: std_norm, token_mean, slot_credit, lenpen
(r = acc - lenpen*|y|/cap), and task "adapt" (N from 1..max_N under C, mixed difficulty).
Read in order: task, rl_batch, rollout, advantages, pg_loss (the loss in its textbook form),
pg_loss_fast (the same loss and gradient with less work, tested equal), rl_step, evaluate.
"""
import math
import time
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from data import EOS, PAD, columns, doc_rng, encode, packed_prompts, prompt, segments
from model import autocast, update_bf16
from reward import score
from sample import generate

# ----------------------------------------------------------------------------- what a run trains on

class Task(NamedTuple):
    Ns: list          # the N of each packed prompt, drawn uniformly from these
    cap: int          # the hard cap on new tokens for the whole packed completion
    lenpen: float     # the weight of an explicit length penalty (0: none)
    stratified: bool  # the problems of a prompt share one column count

def sweep_budget(cfg):
    """The N-sweep's one completion budget C, the same for every N."""
    return cfg.C or 4 * cfg.b

def task(name, cfg):
    """This is where BCR differs from its controls."""
    C = sweep_budget(cfg)
    any_N = range(1, cfg.max_N + 1)
    return {
        # BCR: N problems under one cap of N*b tokens
        "bcr": Task([cfg.N], cfg.N * cfg.b, 0.0, True),
        # budget-aware BCR: any N under the sweep's C, problems of mixed difficulty, never told C
        "adapt": Task(any_N, C, 0.0, False),
        # vanilla GRPO: one problem, room to spare
        "grpo": Task([1], C, 0.0, True),
        # one problem under BCR's room per problem, b (ThinkPrune's hard cap)
        "cap": Task([1], cfg.b, 0.0, True),
        # the explicit length penalty
        "lenpen": Task([1], C, cfg.lenpen, True),
    }[name]

def rl_batch(name, cfg, seed, step):
    """The step's packed prompts (lists of problems): a pure function of (run, seed, step)."""
    spec = task(name, cfg)
    rng = doc_rng(f"{name}{seed}", step)
    batch = []
    for _ in range(cfg.prompts):
        N = rng.choice(spec.Ns)
        batch += packed_prompts(rng, cfg, 1, N, stratified=spec.stratified)
    return batch

# ----------------------------------------------------------------------------- sample, score, advantages

def rollout(model, tok, groups, G, cap, temperature, generator):
    """Sample G completions of each packed prompt (a list of problems) under a hard cap, and score
    them. Returns the prompt ids (P*G lists), the completion tokens (P*G, cap), their lengths
    (P*G,) and one reward.Reward per completion."""
    ids = encode(tok, [prompt(g) for g in groups])
    # the G samples of a prompt are consecutive rows
    ids = [p for p in ids for _ in range(G)]
    tokens, lengths = generate(model, ids, cap, temperature,
                               0, generator)
    texts = tok.decode_batch(tokens.tolist())  # drops <pad> and <eos>
    # a completion the cap cut has no <eos>
    cut = (tokens == EOS).sum(1) == 0  # (P*G,)
    cut = cut.tolist()
    rewards = []
    for i, text in enumerate(texts):
        problems = groups[i // G]
        rewards.append(score(text, problems, cut[i]))
    return ids, tokens, lengths, rewards

def advantages(r, std_norm=True, eps=1e-4):
    """r (P, G, ...) rewards -> advantages (P, G, ...), centred (and scaled) within each group of G
    samples of one prompt. A group whose samples all scored alike gets zero: nothing to learn."""
    a = r - r.mean(1, keepdim=True)
    if std_norm:
        a = a / (r.std(1, keepdim=True) + eps)
    return a

# The arena's methods (arena.py) turn a step's rewards into advantages their own way:
# name -> f(r (B,), rewards, lengths (B,), cap, G) -> (advantages (B,), rewards (B,))
METHODS = {}

def token_advantages(rewards, lengths, G, cap, cfg):
    """Per-token advantages (B, cap) of the completion tokens, and the scalar rewards (B,).
    Shared credit: one reward per completion (accuracy over its N problems, the format term, minus
    the length term if lenpen > 0), one advantage on all its tokens. Slot credit: problem k's reward,
    normalised across the group, on the tokens reward.py attributes to problem k."""
    B = len(rewards)
    format_ok = torch.tensor([float(x.format_ok) for x in rewards])                 # (B,)
    bonus = cfg.format_bonus * format_ok                                             # (B,)
    bonus -= cfg.lenpen * lengths.float().cpu() / cap                               # (B,)
    acc = torch.tensor([x.acc for x in rewards])                                     # (B,)
    r = acc + bonus                                                                  # (B,)
    if cfg.method:
        adv, r = METHODS[cfg.method](r, rewards, lengths, cap, G)                    # (B,) each
        return adv.view(B, 1).expand(B, cap), r
    if not cfg.slot_credit:
        adv = advantages(r.view(-1, G), cfg.std_norm)                              # (P, G)
        return adv.view(B, 1).expand(B, cap), r
    per_problem = torch.tensor([x.correct for x in rewards])                        # (B, N)
    per_problem += bonus[:, None]
    N = per_problem.shape[1]
    adv = advantages(per_problem.view(-1, G, N), cfg.std_norm)                     # (P, G, N)
    adv = adv.view(B, N)
    out = torch.zeros(B, cap)
    for i, x in enumerate(rewards):
        # character offsets are token offsets (a character-level tokenizer)
        for start, end, k in x.spans:
            out[i, start:end] = adv[i, k]
    return out, r

# ----------------------------------------------------------------------------- the loss

def layout(ids, tokens, lengths, adv, token_mean, pad_to):
    """Right-padded rows of prompt + completion x (B, T), and at the positions that predict a
    completion token its loss weight w and advantage a (B, T) each; rows and length rounded up to
    multiples of pad_to (padding rows weigh 0)."""
    n = lengths.tolist()
    rows, length = pad_to
    B = -(-len(ids) // rows) * rows
    longest = max(len(p) + k for p, k in zip(ids, n))
    T = -(-(longest - 1) // length) * length + 1
    x = torch.full((B, T), PAD, dtype=torch.long)
    w = torch.zeros(B, T)
    a = torch.zeros(B, T)
    for i, (p, k) in enumerate(zip(ids, n)):
        start = len(p)
        x[i, :start] = torch.tensor(p)
        x[i, start:start + k] = tokens[i, :k]
        # the logits at position t predict token t+1: completion token j at start-1+j
        predicted = slice(start - 1, start - 1 + k)
        w[i, predicted] = 1.0 if token_mean else 1.0 / max(k, 1)
        a[i, predicted] = adv[i, :k]
    return x, w, a

def pg_loss(model, ids, tokens, lengths, adv, norm, cfg,
            ref=None, pad_to=(1, 1)):
    """BCR's objective in its textbook form: minus the advantage-weighted log-likelihood of the
    sampled completion tokens, -sum_t A_t * w_t * log p(y_t | prompt, y_<t) / norm, where w_t is 1
    on completion tokens and 0 on the prompt and padding (1/|y| per sequence when not token_mean),
    and norm the batch's completion-token count (or number of sequences). With cfg.kl > 0, plus kl
    times the k3 estimate of KL(policy || frozen base) on the same tokens. ids: prompt ids (B
    lists), tokens (B, cap), lengths (B,), adv (B, cap). Returns the loss and sums for the logs."""
    device = model.wte.weight.device
    x, w, a = layout(ids, tokens, lengths, adv, cfg.token_mean, pad_to)  # (B, T) each
    B = x.shape[0]
    x = x.to(device)
    inputs = x[:, :-1]                             # (B, T-1)
    targets = x[:, 1:]                             # (B, T-1) the token each position predicts
    w = w[:, :-1].to(device)                       # (B, T-1)
    a = a[:, :-1].to(device)                       # (B, T-1)
    # which problem each token belongs to (padding rows: a prompt of one token)
    n_prompt = [len(p) for p in ids]
    n_prompt += [1] * (B - len(ids))
    n_prompt = torch.tensor(n_prompt, device=device)  # (B,)
    seg = segments(inputs, n_prompt)               # (B, T-1)
    bf16 = update_bf16(cfg.update_dtype, device)
    with autocast(device, bf16):
        logits = model(inputs, seg).float()        # (B, T-1, V)
    logp_all = F.log_softmax(logits, -1)           # (B, T-1, V)
    # log p(y_t) of each sampled token
    logp = logp_all.gather(-1, targets[..., None])  # (B, T-1, 1)
    logp = logp.squeeze(-1)                        # (B, T-1)
    loss = -(a * logp * w).sum()
    sums = {}
    if cfg.kl > 0:
        # k3 estimator of KL(policy || frozen base), per token (Schulman's note)
        with torch.no_grad(), autocast(device, bf16):
            ref_logits = ref(inputs, seg).float()                           # (B, T-1, V)
        ref_logp = F.log_softmax(ref_logits, -1)                            # (B, T-1, V)
        ref_logp = ref_logp.gather(-1, targets[..., None])                  # (B, T-1, 1)
        ref_logp = ref_logp.squeeze(-1)                                     # (B, T-1)
        d = ref_logp - logp
        kl = d.exp() - d - 1                                                # (B, T-1)
        loss = loss + cfg.kl * (kl * w).sum()
        sums["kl"] = (kl * w).sum().detach()
        sums["weight"] = w.sum()
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)                      # (B, T-1)
        sums["entropy"] = (entropy * (w > 0)).sum()
        sums["tokens"] = (w > 0).sum()
    return loss / norm, sums

def pg_loss_fast(model, ids, tokens, lengths, adv, norm, cfg,
                 ref=None, max_pad=1.25):
    """pg_loss's loss and gradient (to float rounding) with less work; returns the loss and the
    entropy (and KL) means. Rows whose advantages are all zero (their group scored alike) add nothing
    and are left out (but with KL; one is kept so backward() has a graph). Rows are sorted by length
    and cut into chunks padded by at most max_pad x their shortest: one batch would pad every row to
    the longest, which one runaway makes several times the mean. Under a bf16 update on CPU, chunks
    pad to rows x4 and length x16: oneDNN builds a kernel per new matmul shape, which costs more."""
    n = lengths.tolist()
    # each row's prompt + completion
    size = [len(p) + k for p, k in zip(ids, n)]
    # the rows that move the gradient, shortest first
    used = []
    for i in range(len(ids)):
        if cfg.kl > 0 or adv[i, :n[i]].any():
            used.append(i)
    used = sorted(used or [0], key=lambda i: size[i])
    chunks = [[used[0]]]
    for i in used[1:]:
        shortest = size[chunks[-1][0]]
        if size[i] > max_pad * shortest:
            chunks.append([])
        chunks[-1].append(i)
    device = model.wte.weight.device
    cpu_bf16 = update_bf16(cfg.update_dtype, device) and device.type == "cpu"
    pad_to = (4, 16) if cpu_bf16 else (1, 1)
    loss = 0.0
    sums = {}
    for rows in chunks:
        # each chunk's summed loss (norm 1), divided once at the end, as one batch would be
        chunk_ids = [ids[i] for i in rows]
        part, s = pg_loss(model, chunk_ids, tokens[rows], lengths[rows],
                          adv[rows], 1.0, cfg, ref, pad_to)
        loss = loss + part
        for k, v in s.items():
            sums[k] = sums.get(k, 0.0) + v
    # one host sync, not one per chunk
    entropy = sums["entropy"] / sums["tokens"]
    stats = {"entropy": entropy.item()}
    if cfg.kl > 0:
        kl = sums["kl"] / sums["weight"]
        stats["kl"] = kl.item()
    return loss / norm, stats

def finish_grads(model, clip, world, loss):
    """Sum the gradients over processes, clip them; (norm, whether loss and gradients are finite)."""
    if world > 1:
        for p in model.parameters():
            dist.all_reduce(p.grad)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    norm = norm.item()
    return norm, math.isfinite(norm) and math.isfinite(loss)

def rl_step(model, opt, tok, groups, cap, generator, cfg,
            ref=None, world=1):
    """One on-policy step: rollout, score, one optimizer update. Returns a metrics dict. With several
    processes each brings its own groups; the loss normaliser and the gradients are summed across
    processes, so the update equals the one-process update on all groups."""
    # 1) sample and score
    t0 = time.perf_counter()
    model.eval()
    ids, tokens, lengths, rewards = rollout(
        model, tok, groups, cfg.G, cap, cfg.temperature, generator)
    adv, r = token_advantages(rewards, lengths, cfg.G, cap, cfg)
    # 2) the update; the normaliser counts every process's tokens (or sequences)
    t1 = time.perf_counter()
    model.train()
    norm = lengths.sum() if cfg.token_mean else len(ids)
    # on the lengths' device: NCCL reduces GPU tensors only
    norm = torch.tensor([float(norm)], device=lengths.device)
    if world > 1:
        dist.all_reduce(norm)
    tokens = tokens.cpu()
    lengths = lengths.cpu()
    loss, stats = pg_loss_fast(model, ids, tokens, lengths, adv,
                               norm.item(), cfg, ref)
    loss.backward()
    clip = cfg.grad_clip
    grad_norm, finite = finish_grads(model, clip, world, loss.item())
    if finite:  # a NaN/inf step is never applied; train.py stops the stage on it
        opt.step()
    opt.zero_grad(set_to_none=True)
    t2 = time.perf_counter()
    # 3) what catches RL's failure modes
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    # the share of groups whose samples all scored alike: nothing to learn from them
    zero_var = r.view(-1, cfg.G).std(1) == 0  # (P,)
    zero_var = zero_var.float().mean().item()
    return {"finite": finite,
            "reward": r.mean().item(),
            "reward_std": r.std().item(),
            "acc": mean([x.acc for x in rewards]),
            "tokens": lengths.float().mean().item(),
            "loops": mean([x.loops for x in rewards]),
            "truncated": mean([x.truncated for x in rewards]),
            "zero_var_groups": zero_var,
            "grad_norm": grad_norm,
            "loss": loss.item(),
            **stats,
            "t_rollout": t1 - t0,
            "t_update": t2 - t1}

# ----------------------------------------------------------------------------- the N-sweep

@torch.no_grad()
def evaluate(model, tok, problems, N, cap, temperature, seed,
             batch=256, rank=0, world=1):
    """Solve `problems` N at a time (ceil(len/N) prompts, reusing the first ones to fill the last)
    under one completion budget `cap`; with several processes each takes every world-th prompt and
    the results are gathered. Returns one report row (train.py's report.json keeps them)."""
    model.eval()
    device = model.wte.weight.device
    n_prompts = math.ceil(len(problems) / N)
    flat = (problems * 2)[:n_prompts * N]
    groups = [flat[i * N:(i + 1) * N]
              for i in range(n_prompts)]
    groups = groups[rank::world]
    gen = torch.Generator(device)
    gen.manual_seed(seed * 1000 + N * 10 + rank)
    results = []  # (reward, tokens, the prompt's problems)
    for i in range(0, len(groups), batch):
        part = groups[i:i + batch]
        _, _, lengths, rewards = rollout(model, tok, part, 1, cap,
                                         temperature, gen)
        results += zip(rewards, lengths.tolist(), part)
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, results)
        results = [x for part in gathered for x in part]
    return sweep_row(results, N, cap, temperature)

def sweep_row(results, N, cap, temperature):
    """The report row of one N: results are (reward, new tokens, problems) per prompt."""
    rs = [r for r, _, _ in results]
    n_prob = len(rs) * N
    tokens = [float(k) for _, k, _ in results]
    tokens = torch.tensor(tokens)                              # (prompts,) new tokens
    right = torch.tensor([r.acc for r in rs])                  # (prompts,) share right
    # per problem: its column count, and whether it was answered with no step
    cols = [columns(p) for _, _, g in results for p in g]
    direct = [d for r in rs for d in r.direct]
    row = {"N": N, "budget": cap, "problems": n_prob}
    row["decoding"] = "greedy" if temperature == 0 else "sample"
    right_total = sum(sum(r.correct) for r in rs)
    row["acc"] = right_total / n_prob
    # one evaluation's sampling noise: the standard error over prompts (N=1: binomial)
    acc_se = right.std() / len(rs) ** 0.5
    row["acc_se"] = acc_se.item()
    row["tokens_per_problem"] = tokens.sum().item() / n_prob
    tokens_se = tokens.std() / N / len(rs) ** 0.5
    row["tokens_per_problem_se"] = tokens_se.item()
    row["loops_per_problem"] = sum(r.loops for r in rs) / n_prob
    row["steps_per_problem"] = sum(r.steps for r in rs) / n_prob
    cut_total = sum(r.truncated for r in rs)
    row["truncation_rate"] = cut_total / len(rs)
    row["acc_by_slot"] = []
    for k in range(N):
        right_k = sum(r.correct[k] for r in rs)
        row["acc_by_slot"].append(right_k / len(rs))
    row["direct_share"] = sum(direct) / n_prob
    # the mechanism of adaptation: direct answers by column count
    row["direct_by_columns"] = {}
    for c in sorted(set(cols)):
        picked = [d for d, k in zip(direct, cols) if k == c]
        share = sum(picked) / len(picked)
        row["direct_by_columns"][str(c)] = share
    if N == 1:
        # per problem, for report.py: tokens, right, direct, loops, columns
        row["samples"] = []
        for r, k, g in results:
            right, direct = r.correct[0], r.direct[0]
            cols_1 = columns(g[0])
            row["samples"].append([k, right, direct, r.loops, cols_1])
    return row

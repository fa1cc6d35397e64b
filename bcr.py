"""
Batched Contextual Reinforcement (BCR, arXiv 2604.02322), in miniature.

What one BCR step does here:
1. Pack N problems of one difficulty (digit columns) into a prompt; take `prompts` such prompts.
2. Sample G completions of each, all under one hard cap of N*b new tokens for the whole packed
   answer. The cap is the only pressure towards brevity: verbosity on early problems leaves no room
   for later ones.
3. Reward = the share of the N problems answered correctly, plus a small format term (the paper
   has one too): format_bonus if the completion is exactly N labelled answers, then <eos>. A
   problem the cap cut off scores 0, the ones answered before keep their credit. No length term.
   (Without the format term, tokens after the last answer would cost nothing.)
4. GRPO: advantages normalised within each group of G samples of the same prompt, one on-policy
   policy-gradient step on -A * log p(token), averaged over all completion tokens of the batch.

Where this departs from the paper (whose code and hyper-parameters are not public):
- it is "GRPO" the way nanochat's chat_rl.py is: strictly on-policy with one update per batch, so
  the PPO ratio is always 1 and there is no clipping; no KL term by default (kl > 0 adds the k3
  estimate against the frozen base); token-level mean (DAPO style) by default;
- groups are "similar difficulty" by having the same number of digit columns;
- where the update runs in bf16 and sampling in fp32 (a CPU with native bf16, update_bf16), the
  log-probs the gradient uses differ from the sampler's by bf16 rounding: slightly off-policy,
  which a PPO ratio would correct and this does not;
- variants worth ablating are switches: std_norm=False (REINFORCE with a group-mean baseline,
  Dr. GRPO style), token_mean=False (mean per sequence, then over sequences), slot_credit=True
  (problem k's advantage on the tokens that answer problem k, instead of one shared advantage),
  and lenpen > 0, the explicit length penalty r = acc - lenpen*|y|/cap the paper reports collapses;
- beyond the paper, task "mix" (budget-aware BCR): N drawn per prompt from 1..max_N under the one
  cap C, to see whether a model learns to spend per problem what C/N allows.

The code reads in that order: packed prompts, rollouts, rewards, advantages, then pg_loss, the
loss in its textbook form; pg_loss_fast computes the same loss and gradient with less work (tested
against it). Then the N-sweep evaluation (evaluate): N problems per prompt under one shared
completion budget C, the same for every N, reporting accuracy, tokens, loops and steps per problem,
the share of problems answered directly (no steps), truncation and accuracy by slot; and predict(),
the truncation model that says what the sweep would be if a model never adapted to N. report.py
turns these rows into the verdicts.
"""
import math
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from data import EOS, PAD, columns, doc_rng, encode, packed_prompts, prompt, segments
from reward import score
from model import autocast, update_bf16
from sample import generate

def budget(cfg):
    """The shared completion budget C of the N-sweep, the same for every N."""
    return cfg.C or 4 * cfg.b

def task(name, cfg):
    """What an RL run trains on: (the N of each packed prompt, drawn uniformly; the hard cap on the
    whole completion; the length-penalty weight). This is where BCR differs from its controls."""
    return {"bcr": ([cfg.N], cfg.N * cfg.b, 0.0),          # BCR: N problems under N*b tokens
            "mix": (range(1, cfg.max_N + 1), budget(cfg), 0.0),  # budget-aware BCR: any N under C
            "grpo": ([1], budget(cfg), 0.0),                # vanilla GRPO, one problem, room to spare
            "lenpen": ([1], budget(cfg), cfg.lenpen)}[name]  # the explicit length penalty

def rl_batch(name, cfg, seed, step):
    """The step's packed prompts (lists of problems): a pure function of (run, seed, step)."""
    Ns, rng = task(name, cfg)[0], doc_rng(f"{name}{seed}", step)
    return [packed_prompts(rng, cfg, 1, rng.choice(Ns))[0] for _ in range(cfg.prompts)]

def rollout(model, tok, groups, G, cap, temperature, generator, mode="eager"):
    """Sample G completions for each packed prompt (a list of problems) under a hard cap, then
    score them. Returns prompt ids (P*G lists), completion tokens (P*G, cap), lengths (P*G,) and
    one Reward per completion; the G samples of a prompt are consecutive rows."""
    ids = [p for p in encode(tok, [prompt(g) for g in groups]) for _ in range(G)]
    out, n = generate(model, ids, cap, temperature, 0, generator, mode)
    texts = tok.decode_batch(out.tolist())  # drops <pad> and <eos>
    truncated = ((out == EOS).sum(1) == 0).tolist()
    return ids, out, n, [score(t, groups[i // G], tr) for i, (t, tr) in enumerate(zip(texts, truncated))]

def advantages(r, std_norm=True, eps=1e-4):
    """r (P, G, ...) rewards -> advantages (P, G, ...), centred (and scaled) within each group of
    G samples of one prompt. A group whose samples all scored alike gets zero: nothing to learn."""
    a = r - r.mean(1, keepdim=True)
    return a / (r.std(1, keepdim=True) + eps) if std_norm else a

def token_advantages(rewards, lengths, G, cap, cfg):
    """Per-token advantages (B, cap) for the completion tokens, and the scalar rewards (B,).
    Shared credit: one reward per completion (accuracy over its N problems, plus the format term,
    minus the length term if lenpen > 0), one advantage on all its tokens. Slot credit: problem k's
    reward, normalised across the group, on the tokens that reward.py attributes to problem k."""
    B = len(rewards)
    extra = cfg.format_bonus * torch.tensor([float(x.format_ok) for x in rewards])
    extra -= cfg.lenpen * lengths.float().cpu() / cap                          # (B,)
    r = torch.tensor([x.acc for x in rewards]) + extra                        # (B,)
    if not cfg.slot_credit:
        adv = advantages(r.view(-1, G), cfg.std_norm).view(B, 1)              # (B, 1)
        return adv.expand(B, cap), r
    per = torch.tensor([x.correct for x in rewards]) + extra[:, None]         # (B, N)
    adv = advantages(per.view(-1, G, per.shape[1]), cfg.std_norm).view(B, -1)  # (B, N)
    out = torch.zeros(B, cap)
    for i, x in enumerate(rewards):  # char offsets are token offsets (character-level tokenizer)
        for start, end, k in x.spans:
            out[i, start:end] = adv[i, k]
    return out, r

def pg_loss(model, ids, out, lengths, adv, norm, cfg, ref=None, pad_to=(1, 1)):
    """BCR's objective in its textbook form: minus the advantage-weighted log-likelihood of the
    sampled completion tokens, -sum_t A_t * w_t * log p(y_t | prompt, y_<t) / norm, where w_t is 1 on
    completion tokens and 0 on the prompt and padding (1/|y| per sequence when not cfg.token_mean),
    and norm is the batch's completion-token count (or number of sequences). With cfg.kl > 0, plus
    kl * the k3 estimate of KL(policy || frozen base) on the same tokens.
    ids: prompt ids (B lists), out (B, cap) completion tokens, lengths (B,), adv (B, cap).
    Returns the loss and sums for the logs (entropy and KL over the completion tokens).
    pad_to: rows and length rounded up to multiples of these (padding rows weigh 0; pg_loss_fast)."""
    device, n = model.wte.weight.device, lengths.tolist()
    B, T = len(ids), max(len(p) + k for p, k in zip(ids, n))
    B, T = -(-B // pad_to[0]) * pad_to[0], -(-(T - 1) // pad_to[1]) * pad_to[1] + 1
    x = torch.full((B, T), PAD, dtype=torch.long)                             # (B, T) prompt + completion
    w = torch.zeros(B, T)                                                     # (B, T) loss weights
    a = torch.zeros(B, T)                                                     # (B, T) advantages
    for i, (p, k) in enumerate(zip(ids, n)):
        x[i, :len(p)], x[i, len(p):len(p) + k] = torch.tensor(p), out[i, :k]
        # logits at position t predict token t+1: completion token j is predicted at len(p)-1+j
        w[i, len(p) - 1:len(p) - 1 + k] = 1.0 if cfg.token_mean else 1.0 / max(k, 1)
        a[i, len(p) - 1:len(p) - 1 + k] = adv[i, :k]
    x, w, a = x.to(device), w[:, :-1].to(device), a[:, :-1].to(device)
    n_prompt = torch.tensor([len(p) for p in ids] + [1] * (B - len(ids)), device=device)   # (B,)
    seg = segments(x[:, :-1], n_prompt)                                       # (B, T-1)
    bf16 = update_bf16(cfg.update_dtype, device)
    with autocast(device, bf16):
        logits = model(x[:, :-1], seg).float()                                 # (B, T-1, V)
    logp_all = F.log_softmax(logits, -1)                                      # (B, T-1, V)
    logp = logp_all.gather(-1, x[:, 1:, None]).squeeze(-1)                    # (B, T-1) log p(y_t)
    loss = -(a * logp * w).sum()
    sums = {}
    if cfg.kl > 0:  # k3 estimator of KL(policy || frozen base), per token (Schulman's note)
        with torch.no_grad(), autocast(device, bf16):
            ref_logp = F.log_softmax(ref(x[:, :-1], seg).float(), -1).gather(-1, x[:, 1:, None]).squeeze(-1)
        d = ref_logp - logp
        kl = d.exp() - d - 1                                                  # (B, T-1)
        loss = loss + cfg.kl * (kl * w).sum()
        sums = {"kl": (kl * w).sum().detach(), "weight": w.sum()}
    with torch.no_grad():
        ent = -(logp_all.exp() * logp_all).sum(-1)                            # (B, T-1)
        sums.update(entropy=(ent * (w > 0)).sum(), tokens=(w > 0).sum())
    return loss / norm, sums

def pg_loss_fast(model, ids, out, lengths, adv, norm, cfg, ref=None, max_pad=1.25):
    """pg_loss's loss and gradient (to float rounding) with less work; returns the loss and the
    entropy (and KL) means. Three savings:
    - a row whose advantages are all zero (its group's samples scored alike) adds nothing to the
      gradient, so it is left out of the forward (the KL term needs every row; one row is kept so
      that backward() always has a graph): less work once rewards saturate;
    - rows sorted by length and cut into chunks padded by at most max_pad x their shortest row: one
      batch would pad every row to the longest, which one runaway completion makes several times the mean;
    - under a bf16 update on CPU, chunks padded to rows x4 and length x16: oneDNN builds a kernel for
      every new matmul shape, which costs more than padding to a few shapes."""
    n = lengths.tolist()
    used = [i for i in range(len(ids)) if cfg.kl > 0 or adv[i, :n[i]].any()] or [0]
    used.sort(key=lambda i: len(ids[i]) + n[i])
    chunks = [[used[0]]]
    for i in used[1:]:
        if len(ids[i]) + n[i] > max_pad * (len(ids[chunks[-1][0]]) + n[chunks[-1][0]]):
            chunks.append([])
        chunks[-1].append(i)
    device = model.wte.weight.device
    pad_to = (4, 16) if update_bf16(cfg.update_dtype, device) and device.type == "cpu" else (1, 1)
    loss, sums = 0.0, {}
    for rows in chunks:  # each chunk's summed loss (norm 1), divided once at the end as one batch would be
        part, s = pg_loss(model, [ids[i] for i in rows], out[rows], lengths[rows], adv[rows], 1.0, cfg, ref,
                          pad_to)
        loss, sums = loss + part, {k: sums.get(k, 0.0) + v for k, v in s.items()}
    stats = {"entropy": (sums["entropy"] / sums["tokens"]).item()}  # one host sync, not one per chunk
    if cfg.kl > 0:
        stats["kl"] = (sums["kl"] / sums["weight"]).item()
    return loss / norm, stats

def finish_grads(model, clip, world, loss):
    """Sum the gradients over processes, clip them; (norm, whether loss and gradients are finite)."""
    if world > 1:
        for p in model.parameters():
            dist.all_reduce(p.grad)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip).item()
    return norm, math.isfinite(norm) and math.isfinite(loss)

def rl_step(model, opt, tok, groups, cap, generator, cfg, ref=None, world=1):
    """One on-policy step: rollout, score, one optimizer update. Returns a metrics dict.
    With several processes, each brings its own groups; the loss normaliser and the gradients
    are summed across processes, so the update equals the one-process update on all groups."""
    t0 = time.perf_counter()
    model.eval()
    ids, out, n, rewards = rollout(model, tok, groups, cfg.G, cap, cfg.temperature, generator, cfg.decode)
    adv, r = token_advantages(rewards, n, cfg.G, cap, cfg)
    t1 = time.perf_counter()
    model.train()
    local = torch.tensor([float(n.sum() if cfg.token_mean else len(ids))], device=n.device)  # NCCL: GPU only
    if world > 1:
        dist.all_reduce(local)
    loss, stats = pg_loss_fast(model, ids, out.cpu(), n.cpu(), adv, local.item(), cfg, ref)
    loss.backward()
    grad_norm, finite = finish_grads(model, cfg.grad_clip, world, loss.item())
    if finite:  # a NaN/inf step is never applied; train.py stops the stage on it
        opt.step()
    opt.zero_grad(set_to_none=True)
    t2 = time.perf_counter()
    zero_var = (r.view(-1, cfg.G).std(1) == 0).float().mean().item()
    return {"finite": finite, "reward": r.mean().item(), "reward_std": r.std().item(),
            "acc": sum(x.acc for x in rewards) / len(rewards),
            "tokens": n.float().mean().item(), "loops": sum(x.loops for x in rewards) / len(rewards),
            "truncated": sum(x.truncated for x in rewards) / len(rewards), "zero_var_groups": zero_var,
            "grad_norm": grad_norm, "loss": loss.item(), **stats,
            "t_rollout": t1 - t0, "t_update": t2 - t1}

@torch.no_grad()
def evaluate(model, tok, problems, N, cap, temperature, seed, batch=256, mode="eager", rank=0, world=1):
    """Solve `problems` N at a time (ceil(len/N) prompts, reusing the first ones to fill the last
    prompt) under a completion budget `cap`; with several processes each takes every world-th prompt
    and the results are gathered. Returns one report row (train.py's report.json keeps them)."""
    model.eval()
    device = model.wte.weight.device
    n_prompts = math.ceil(len(problems) / N)
    flat = (problems * 2)[:n_prompts * N]
    groups = [flat[i * N:(i + 1) * N] for i in range(n_prompts)][rank::world]
    gen = torch.Generator(device).manual_seed(seed * 1000 + N * 10 + rank)
    results = []  # (reward, tokens, first problem's column count) per prompt
    for i in range(0, len(groups), batch):
        _, _, n, rewards = rollout(model, tok, groups[i:i + batch], 1, cap, temperature, gen, mode)
        results += zip(rewards, n.tolist(), [columns(g[0]) for g in groups[i:i + batch]])
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, results)
        results = [x for part in gathered for x in part]
    n_prob, tokens = len(results) * N, torch.tensor([float(k) for _, k, _ in results])
    answered = [(d, c) for r, *_ in results for d, c, a in zip(r.direct, r.correct, r.answers)
                if a is not None]
    row = {"N": N, "budget": cap, "decoding": "greedy" if temperature == 0 else "sample",
           "problems": n_prob,
           "acc": sum(sum(r.correct) for r, *_ in results) / n_prob,
           # one evaluation's sampling noise: the standard error over prompts (N=1: binomial)
           "acc_se": (torch.tensor([r.acc for r, *_ in results]).std() / len(results) ** 0.5).item(),
           "tokens_per_problem": tokens.sum().item() / n_prob,
           "tokens_per_problem_se": (tokens.std() / N / len(results) ** 0.5).item(),  # standard error
           "loops_per_problem": sum(r.loops for r, *_ in results) / n_prob,
           "steps_per_problem": sum(r.steps for r, *_ in results) / n_prob,
           "truncation_rate": sum(r.truncated for r, *_ in results) / len(results),
           "format_rate": sum(r.format_ok for r, *_ in results) / len(results),
           "acc_by_slot": [sum(r.correct[k] for r, *_ in results) / len(results) for k in range(N)]}
    for name, d in (("direct", True), ("stepped", False)):  # the two strategies, told apart per problem
        right = [c for x, c in answered if x == d]
        row[f"{name}_share"] = len(right) / n_prob
        row[f"acc_{name}"] = sum(right) / len(right) if right else None
    if N == 1:  # what predict() and report.predictions() need, per problem and from the first token
        row["samples"] = [[k, r.correct[0], r.direct[0], r.loops, c] for r, k, c in results]
        row["p_first"] = first_token(model, tok, problems)
    return row

@torch.no_grad()
def first_token(model, tok, problems):
    """How likely the shortest completions are at N = 1: the mean probability that the model's
    answer starts with <eos> (empty) or with the answer label "A" (no restatement, no steps)."""
    device, ids, p = model.wte.weight.device, encode(tok, [prompt([q]) for q in problems]), []
    for L in sorted({len(x) for x in ids}):  # prompts of one length: a batch with no padding
        x = torch.tensor([i for i in ids if len(i) == L], device=device)          # (b, L)
        with autocast(device):
            p.append(model(x, segments(x, L))[:, -1].float().softmax(-1))        # (b, V)
    p = torch.cat(p)
    return {"eos": p[:, EOS].mean().item(), "A": p[:, tok.token_to_id("A")].mean().item()}

def predict(samples, C, Ns):
    """The truncation model of the N-sweep: what a model would score if it solved every problem of
    a packed prompt exactly as it solves one alone (the N = 1 `samples`: tokens with <eos>, score),
    the solutions one after another until the shared cap C cuts them. Exact under that assumption,
    by convolving the per-problem length distribution: problem k scores iff it is right and the
    first k solutions fit in C. A model above the prediction at large N has learned to spend less
    per problem when the budget is short; one on it has not adapted at all."""
    L = torch.tensor([s[0] - 1 for s in samples]).clamp(max=C + 1)                 # (n,) without <eos>
    pmf = torch.bincount(L, minlength=C + 2).double() / len(L)                       # (C+2,) last: > C
    hit = torch.bincount(L, torch.tensor([float(s[1]) for s in samples]).double(), C + 2) / len(L)
    fits = hit[:C + 1].cumsum(0)                      # (C+1,) P(right and length <= m), m = 0..C
    S, acc, out = torch.zeros(C + 1, dtype=torch.float64), 0.0, []  # S: P(first k solutions used s)
    S[0] = 1.0
    for N in range(1, max(Ns) + 1):
        acc += (S * fits.flip(0)).sum().item()        # P(problem N right and it fits after S)
        total = (torch.arange(C + 1)[:, None] + torch.arange(C + 1)).flatten()       # (C+1)^2 sums s + l
        both = torch.outer(S, pmf[:C + 1]).flatten()  # P(s used so far, then a solution of l), by s + l
        S = torch.zeros(2 * C + 1, dtype=torch.float64).index_add_(0, total, both)
        S = S[:C + 1]                                 # mass past C is a cut, 1 - S.sum()
        if N in Ns:  # tokens: the solutions, <eos> after the last, or all of C when it cut them
            used = (S * (torch.arange(C + 1) + 1).clamp(max=C)).sum().item() + (1 - S.sum().item()) * C
            out.append({"N": N, "acc": acc / N, "tokens_per_problem": used / N})
    return out

"""
The harness: train.py's evaluation rows turned into verdicts, tables and figures (out/report.*,
ablations.*, adapt.*): how results are judged, not how BCR works. A verdict gives the
paper's claim in its words (arXiv 2604.02322, abstract), the toy's measurement and the rule joining
them, written before the runs it judges and never changed because of what it returned. "2 se":
2 * hypot(se_a, se_b), from each evaluation's own sampling noise (bcr.evaluate). Each rule holds on
every seed.
- Free lunch: "reduces token usage by 15.8% to 62.6% while consistently maintaining or improving
  accuracy". BCR at N = 1 uses >= 15.8% fewer tokens per problem than the base, its accuracy not
  below the base's by > 2 se; where the cut falls against the paper's range is stated beside it.
- Task-scaling law: "as the number of concurrent problems N increases during inference, per-problem
  token usage decreases monotonically while accuracy degrades far more gracefully than baselines"
  (the base models, packed the same way). BCR's tokens per problem never rise from one N to the
  next by > 2 se and fall from the first N to the last by > 2 se; BCR keeps a larger share of its
  N = 1 accuracy at the largest N than the base keeps of its own.
- Loops: "models autonomously eliminate redundant metacognitive loops without explicit length
  supervision", necessary steps kept. No number given; "eliminate": >= 90% fewer re-check loops per
  problem than the base at N = 1, and fewer than the no-budget GRPO control keeps (else RL alone,
  not the budget, removed them); "steps kept": >= 90% of the base's necessary steps.
- Explicit penalty: "implicit budget constraints successfully circumvent the adversarial gradients
  and catastrophic optimization collapse inherent to explicit length penalties" (accuracy "falls
  rapidly to zero"). The length-penalty control collapsed (category()) and BCR did not.
Beyond the paper, verdicts of their own: findings()'s "beyond" and adapts() here, arena.py's for
the frontier and the arena.
"""
import io
import itertools
import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict

import torch
from tqdm import tqdm

import bcr
import checkpoint
from data import EOS, encode, heldout_problems, prompt, segments, solution
from model import autocast, update_bf16

PAPER_CUT = (0.158, 0.626)  # the paper's token reductions at N = 1, smallest and largest
TITLES = {"report": "nanoBCR report", "ablations": "nanoBCR ablations (b and N vary in training only)",
          "adapt": "nanoBCR: does BCR adapt to N?"}
NAMES = {"base": "the verbose base", "bcr": "BCR, the default", "grpo": "vanilla GRPO, N = 1 under C",
         "lenpen": "length penalty, N = 1 under C", "adapt": "budget-aware BCR: N from 1 to max_N under C"}

def sweep_Ns(cfg):
    return [int(x) for x in cfg.eval_Ns.split(",")]

def pick(rows, N, decoding="sample"):
    return next(r for r in rows if r["N"] == N and r["decoding"] == decoding)

def spread(xs, fmt="{:.3f}"):
    return fmt.format(sum(xs) / len(xs)) + f" ({fmt.format(min(xs))}, {fmt.format(max(xs))})" * (len(xs) > 1)

def ratio(a, b):  # nan (never "reproduced") when the base has none, e.g. a smoke run
    return a / b if b else float("nan")

def two_se(a, b, key="acc"):
    return 2 * math.hypot(a.get(f"{key}_se", 0.0), b.get(f"{key}_se", 0.0))

def kept(rows, N):  # the share of its N = 1 accuracy a model keeps at N
    return pick(rows, N)["acc"] / max(pick(rows, 1)["acc"], 1e-9)

def smooth(curve, w=10):  # the training log's rollout accuracy, averaged over every window of w steps
    acc = [c["acc"] for c in curve]
    return [statistics.mean(acc[i:i + w]) for i in range(max(len(acc) - w, 0) + 1)] if acc else []

def falls(rows):
    """Tokens per problem never rise by > 2 se from one N to the next, and fall by > 2 se overall."""
    k = "tokens_per_problem"
    return all(b[k] - a[k] <= two_se(a, b, k) for a, b in zip(rows, rows[1:])) and \
        rows[0][k] - rows[-1][k] > two_se(rows[0], rows[-1], k)

def category(rows, base, curve):
    """collapsed: N = 1 accuracy below half the base's, at the end (the evaluation) or during training
    (the rollout accuracy smoothed over 10 steps falls below half its first 10 steps', where the
    policy is still the base); shortcut: not collapsed, N = 1 accuracy below the base's by more than
    2 se; stable: neither."""
    r, b, s = pick(rows, 1), pick(base, 1), smooth(curve)
    if r["acc"] < 0.5 * b["acc"] or (s and min(s) < 0.5 * s[0]):
        return "collapsed"
    return "shortcut" if b["acc"] - r["acc"] > two_se(r, b) else "stable"

def count(cats):
    return ", ".join(f"{c} {cats.count(c)}/{len(cats)}" for c in sorted(set(cats)))

def claim(ok, paper, rule, evidence):
    return {"reproduced": bool(ok), "paper": paper, "rule": rule, "evidence": evidence}

def findings(es, Ns, lenpen):
    """The paper's four claims, then the comparison beyond it, each a rule applied to every seed."""
    seeds = lambda name: {e["seed"]: e for e in es if e["name"] == name}  # noqa: E731
    base, main, grpo, lp = es[0]["eval"], seeds("bcr"), seeds("grpo"), seeds("lenpen")
    b1, Nmax, f = pick(base, 1), max(Ns), {}
    for s, e in main.items():
        x1, of_base = pick(e["eval"], 1), lambda row, k: ratio(row[k], b1[k])  # noqa: E731
        row = {"cut": 1 - of_base(x1, "tokens_per_problem"), "dacc": x1["acc"] - b1["acc"],
               "se2": two_se(x1, b1),
               "falls": falls([pick(e["eval"], N) for N in Ns]), "keep": kept(e["eval"], Nmax),
               "loops": of_base(x1, "loops_per_problem"), "steps": of_base(x1, "steps_per_problem"),
               "grpo_loops": of_base(pick(grpo[s]["eval"], 1), "loops_per_problem"),
               "lp_keep": kept(lp[s]["eval"], Nmax)}
        for k, v in row.items():
            f.setdefault(k, []).append(v)
    where = {"below" if c < PAPER_CUT[0] else "inside" if c <= PAPER_CUT[1] else "above" for c in f["cut"]}
    tpp = " | ".join(" ".join(f"{pick(e['eval'], N)['tokens_per_problem']:.1f}" for N in Ns)
                     for e in main.values())
    cats = {n: [category(e["eval"], base, e["curve"]) for e in runs.values()] for n, runs in (("bcr", main),
                                                                                            ("lenpen", lp))}
    return {
        "free_lunch": claim(
            all(c >= PAPER_CUT[0] for c in f["cut"]) and all(d >= -s for d, s in zip(f["dacc"], f["se2"])),
            "reduces token usage by 15.8% to 62.6% while consistently maintaining or improving accuracy",
            "every seed: >= 15.8% fewer tokens per problem at N = 1, accuracy not below the base's by > 2 se",
            f"{spread(f['cut'], '{:.1%}')} fewer tokens per problem ({'/'.join(sorted(where))} the paper's "
            f"range), accuracy {spread(f['dacc'], '{:+.3f}')} against the base's {b1['acc']:.3f} (2 se of "
            f"the difference: {spread(f['se2'])})"),
        "scaling_law": claim(
            all(f["falls"]) and all(k > kept(base, Nmax) for k in f["keep"]),
            "as N increases, per-problem token usage decreases monotonically while accuracy degrades far "
            "more gracefully than baselines",
            f"every seed: tokens per problem never rise by > 2 se and fall by > 2 se from N = 1 to {Nmax}; "
            f"more of the N = 1 accuracy kept at N = {Nmax} than the base keeps",
            f"tokens per problem for N = {','.join(map(str, Ns))}: {tpp} (one list per seed), falling on "
            f"{sum(f['falls'])} of {len(f['falls'])} seeds; accuracy kept from N = 1 to {Nmax}: BCR "
            f"{spread(f['keep'], '{:.0%}')}, base {kept(base, Nmax):.0%}"),
        "loops_vanish": claim(
            all(x <= 0.1 for x in f["loops"]) and all(x < g for x, g in zip(f["loops"], f["grpo_loops"]))
            and all(x >= 0.9 for x in f["steps"]),
            "models autonomously eliminate redundant metacognitive loops (necessary steps kept)",
            "every seed: <= 0.1 x the base's loops per problem at N = 1 and fewer than vanilla GRPO keeps; "
            ">= 0.9 x the base's necessary steps",
            f"loops {spread(f['loops'])} x the base's (vanilla GRPO {spread(f['grpo_loops'])} x), necessary "
            f"steps {spread(f['steps'], '{:.2f}')} x"),
        "length_penalty": claim(
            all(c == "collapsed" for c in cats["lenpen"]) and "collapsed" not in cats["bcr"],
            "implicit budget constraints circumvent the catastrophic optimization collapse inherent to "
            "explicit length penalties; accuracy falls rapidly to zero",
            "the length-penalty control collapsed on every seed and BCR on none (categories: category())",
            f"length penalty r = acc - {lenpen:g}|y|/C: {count(cats['lenpen'])}; BCR: {count(cats['bcr'])}"),
        "beyond": {"bcr_vs_length_penalty": claim(
            all(k > lk for k, lk in zip(f["keep"], f["lp_keep"])), "not claimed by the paper",
            f"every seed: BCR keeps more of its N = 1 accuracy at N = {Nmax} than the length-penalty control",
            f"kept from N = 1 to {Nmax}: BCR {spread(f['keep'], '{:.0%}')}, length penalty "
            f"{spread(f['lp_keep'], '{:.0%}')}")}}

@torch.no_grad()
def first_token(model, tok, problems):
    """The mean probability at N = 1 that an answer starts with <eos> (empty) or "A" (no steps)."""
    device, ids, p = model.wte.weight.device, encode(tok, [prompt([q]) for q in problems]), []
    for L in sorted({len(x) for x in ids}):  # prompts of one length: a batch with no padding
        x = torch.tensor([i for i in ids if len(i) == L], device=device)          # (b, L)
        with autocast(device):
            p.append(model(x, segments(x, L))[:, -1].float().softmax(-1))        # (b, V)
    p = torch.cat(p)
    return {"eos": p[:, EOS].mean().item(), "A": p[:, tok.token_to_id("A")].mean().item()}

def truncation_model(samples, C, Ns):
    """The N-sweep of a model that solves every packed problem exactly as it solves one alone (its
    N = 1 `samples`: tokens with <eos>, right), one after another until the cap C cuts them: exact,
    by convolving the length distribution (problem k scores iff right and the first k fit in C). A
    model on it at large N has not adapted to N; one above it spends less when the budget is short."""
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

def strategies(samples, fallback=None, least=20):
    """A model's two strategies from its N = 1 answers (samples: tokens with <eos>, right, direct,
    loops, columns): {(columns, direct): (accuracy, mean tokens without <eos>)}, {columns: share}.
    A cell of fewer than `least` answers (a strategy the model hardly uses) takes fallback's."""
    cells, share = {}, {}
    for c in sorted({s[4] for s in samples}):
        share[c] = sum(s[4] == c for s in samples) / len(samples)
        for d in (True, False):
            xs = [(s[1], s[0] - 1) for s in samples if s[4] == c and bool(s[2]) == d]
            use = len(xs) >= least or not fallback
            cells[c, d] = tuple(map(statistics.mean, zip(*xs))) if use and xs else \
                fallback[0][c, d] if fallback else (0.0, math.inf)
    return cells, share

def oracle(cells, share, C, N):
    """(best, all direct): the allocation oracle bounds what any mix of a model's two strategies can
    reach at N under C. Knowing every problem's column count, it answers each directly, stepped or
    not at all so that the answers fit in C at the strategies' mean lengths and the expected number
    right is largest (an exact search over how many of each column count go each way), averaged over
    the mix of column counts. Beside it, every problem answered directly, as many as fit."""
    classes, best = sorted(share), 0.0
    for combo in itertools.combinations_with_replacement(classes, N):
        n = [combo.count(c) for c in classes]
        p = math.factorial(N) * math.prod(share[c] ** k / math.factorial(k) for c, k in zip(classes, n))
        ways = [[(d, s) for d in range(k + 1) for s in range(k + 1 - d)] for k in n]
        fits = [0.0]
        for plan in itertools.product(*ways):  # (direct, stepped) of each column count
            total = [d * cells[c, True][i] + s * cells[c, False][i] for i in (0, 1)
                     for c, (d, s) in zip(classes, plan)]
            if 1 + sum(total[len(classes):]) <= C:
                fits.append(sum(total[:len(classes)]))
        best += p * max(fits) / N
    direct_len = sum(share[c] * cells[c, True][1] for c in classes)
    answered = min(N, (C - 1) // direct_len) / N
    return best, answered * sum(share[c] * cells[c, True][0] for c in classes)

def adapts(es, name, Ns):
    """Beyond the paper, "BCR adapts to N", for run `name`. Rule (written before the runs it judges),
    on every seed: at each N of 6, 7, 8 (the three largest N of a shorter sweep), accuracy above both
    the truncation model's prediction and the all-direct line, from the run's own N = 1 answers, by
    more than 2 se (of that N and of N = 1); at most 10% of prompts cut at the largest N; N = 1
    accuracy not below the default BCR's (same seed) by more than 2 se. Beside it, the distance to
    the allocation oracle at each N."""
    big = [N for N in Ns if N >= 6] or Ns[-3:]
    main = {e["seed"]: pick(e["eval"], 1) for e in es if e["name"] == "bcr"}
    ok, gaps, worst = [], [], []
    for e in (e for e in es if e["name"] == name):
        one, lines = pick(e["eval"], 1), {p["N"]: p for p in e["predicted"]}
        margin = [pick(e["eval"], N)["acc"] - max(lines[N]["acc"], lines[N]["all_direct"])
                  - two_se(pick(e["eval"], N), one) for N in big]
        held = one["acc"] >= main[e["seed"]]["acc"] - two_se(one, main[e["seed"]])
        ok.append(min(margin) > 0 and pick(e["eval"], Ns[-1])["truncation_rate"] <= 0.1 and held)
        gaps.append([lines[N]["oracle"] - pick(e["eval"], N)["acc"] for N in big])
        worst.append(min(margin))
    return claim(all(ok), "not claimed by the paper",
                 f"every seed: at N = {', '.join(map(str, big))} accuracy above the truncation model and the "
                 f"all-direct line by > 2 se; <= 10% of prompts cut at N = {Ns[-1]}; N = 1 accuracy not "
                 f"below BCR's by > 2 se",
                 f"{name}: {sum(ok)} of {len(ok)} seeds; smallest margin over the lines (2 se taken off) "
                 f"{spread(worst, '{:+.3f}')}; below the oracle at N = {', '.join(map(str, big))} by "
                 + " / ".join(spread([g[i] for g in gaps]) for i in range(len(big))))

def predictions(base1, C, format_bonus, rollouts):
    """The frontier's closed forms from the base's N = 1 samples (tokens with <eos>, right, direct,
    loops, columns), each strategy's expected reward r = acc + format - lambda*|y|/C:
    - lambda_c per column count: without std normalisation a direct answer out-earns a loop-free
      stepped one once lambda > (acc_step - acc_direct) C / (len_step - len_direct): the predicted
      direct share is that of the problems with lambda_c < lambda. With it, any lambda > 0 (in an
      all-right group the length term alone differs, and normalising makes it full-size): >= 0.5;
    - lambda_empty: <eos> alone out-earns a direct answer once lambda > (acc_direct + format) C /
      (len_direct - 1); on-policy RL moves only among what it samples, so collapse is predicted only
      if the base would sample an immediate <eos> in the run's rollouts (p_eos * rollouts >= 1);
    - BCR at b: N answers fit in N*b only if a share x is direct, x len_direct + (1-x) len_step <= b."""
    S, out = base1["samples"], {"per_column": {}}
    mean = lambda xs: statistics.mean(xs) if xs else float("nan")  # noqa: E731
    for c in sorted({s[4] for s in S}):
        d, st = [s for s in S if s[4] == c and s[2]], [s for s in S if s[4] == c and not s[2]]
        p = dict(share=sum(s[4] == c for s in S) / len(S), acc_direct=mean([s[1] for s in d]),
                 len_direct=mean([s[0] for s in d]), acc_step=mean([s[1] for s in st]),
                 len_step=mean([s[0] for s in st if s[3] == 0]))
        p["lambda"] = (p["acc_step"] - p["acc_direct"]) * C / (p["len_step"] - p["len_direct"])
        out["per_column"][str(c)] = p
    d = [s for s in S if s[2]]
    for k in ("len_direct", "len_step"):
        out[k] = sum(p["share"] * p[k] for p in out["per_column"].values())
    out["lambda_empty"] = (mean([s[1] for s in d]) + format_bonus) * C / (mean([s[0] for s in d]) - 1)
    out["p_eos"], out["p_A"], out["rollouts"] = base1["p_first"]["eos"], base1["p_first"]["A"], rollouts
    return out

def predict_run(pr, task, lam, std_norm, b):  # (direct share at N = 1, collapse or None for BCR) predicted
    if task == "bcr":
        return min(max((pr["len_step"] - b) / (pr["len_step"] - pr["len_direct"]), 0.0), 1.0), None
    share = 0.5 if std_norm else sum(p["share"] for p in pr["per_column"].values() if p["lambda"] < lam)
    return share, lam > pr["lambda_empty"] and pr["p_eos"] * pr["rollouts"] >= 1

def holds(task, std_norm, share, collapse, direct, cats):
    """A prediction holds when every seed's direct share is within 0.15 of it (with std normalisation:
    at least 0.5) and, for the penalty, every seed collapsed if a collapse was predicted, none if not."""
    near = all(x >= share if task == "lenpen" and std_norm else abs(x - share) <= 0.15 for x in direct)
    return near and (collapse is None or all((c == "collapsed") == collapse for c in cats))

def verdicts_md(f):
    """The paper's claims as a table, the comparisons beyond it as a list."""
    paper = [f"| {k} | \"{v['paper']}\" | {v['evidence']} | {v['rule']} | "
             f"{'reproduced' if v['reproduced'] else '**not reproduced**'} |"
             for k, v in f.items() if k != "beyond"]
    beyond = [f"- **{k}**: {'yes' if v['reproduced'] else '**no**'}. {v['evidence']} (rule: {v['rule']})."
              for k, v in f.get("beyond", {}).items()]
    head = ["## The paper's claims\n", "| claim | the paper | the toy | rule | verdict |", "|---" * 5 + "|"]
    return head * bool(paper) + paper + ["\n## Beyond the paper\n"] * bool(beyond) + beyond

def summary(es, Nmax, what):
    """Markdown: one row per model, mean (min, max) over its seeds, at N = 1 and at the largest N."""
    cols = [(1, "acc", "acc", "{:.3f}"), (1, "tokens_per_problem", "tokens/problem", "{:.1f}"),
            (1, "direct_share", "direct share", "{:.2f}"), (1, "loops_per_problem", "loops", "{:.2f}"),
            (Nmax, "acc", "acc", "{:.3f}"), (Nmax, "tokens_per_problem", "tokens/problem", "{:.1f}"),
            (Nmax, "truncation_rate", "truncated", "{:.2f}")]
    out = ["| run | what | " + " | ".join(f"N={N} {h}" for N, _, h, _ in cols) + " |",
           "|---" * (len(cols) + 2) + "|"]
    for name in what:
        at = [{N: pick(e["eval"], N) for N in (1, Nmax)} for e in es if e["name"] == name]
        out.append(f"| {name} | {what[name]} | " + " | ".join(spread([a[N][k] for a in at], fmt)
                                                           for N, k, _, fmt in cols) + " |")
    return "\n".join(out)

def sweep_md(es, Ns):
    """Markdown: each model's accuracy at each N (mean over seeds) beside what its N = 1 answers
    predict: the truncation model, the all-direct line and the allocation oracle; and its direct share."""
    out = ["| run | | " + " | ".join(f"N={N}" for N in Ns) + " |", "|---|---|" + "---|" * len(Ns)]
    rows = (("accuracy", "eval", "acc"), ("truncation model", "predicted", "acc"),
            ("all direct", "predicted", "all_direct"), ("oracle", "predicted", "oracle"),
            ("direct share", "eval", "direct_share"), ("prompts cut", "eval", "truncation_rate"))
    for name in dict.fromkeys(e["name"] for e in es):
        runs = [e for e in es if e["name"] == name]
        for label, where, k in rows:
            at = [statistics.mean(next(r[k] for r in e[where] if r["N"] == N) for e in runs) for N in Ns]
            out.append(f"| {name} | {label} | " + " | ".join(f"{x:.3f}" for x in at) + " |")
    return "\n".join(out)

def sweeps(cfg, metas, key, rank, world, device, greedy):
    """Each run's N-sweep under the shared budget C, sampled (greedy at N = 1 too: greedy, or the
    base), cached in <run>/eval.json under `key`, the evaluation's flags. metas: {run: its checkpoint's
    config.json, checked finished}. Returns {run: {"rows", "wall_s", "train_wall_s", "curve"}}."""
    evals, C, problems = {}, bcr.sweep_budget(cfg), heldout_problems(cfg)
    Ns = sweep_Ns(cfg)
    for run, meta in metas.items():
        path, greedy_too = f"{cfg.out_dir}/{run}/eval.json", greedy or run == "base"
        ev = checkpoint.cached(path)
        fresh = isinstance(ev, dict) and ev.get("key") == key and (ev.get("greedy") is True or not greedy_too)
        if not fresh:
            t0 = time.perf_counter()
            model, tok, _ = checkpoint.load(f"{cfg.out_dir}/{run}", device)
            plan = [(N, C, cfg.temperature) for N in Ns] + [(1, C, 0.0)] * greedy_too
            rows = [bcr.evaluate(model, tok, problems, N, c, t, cfg.eval_seed, cfg.eval_batch, rank, world)
                    for N, c, t in tqdm(plan, desc=f"eval {run}", disable=rank > 0)]
            if Ns[0] == 1:  # for the frontier's predictions
                rows[0]["p_first"] = first_token(model, tok, problems)
            ev = {"key": key, "greedy": greedy_too, "rows": rows, "wall_s": time.perf_counter() - t0}
            if rank == 0:
                checkpoint.atomic_write(path, json.dumps(ev))
        log = f"{cfg.out_dir}/{run}.jsonl"  # the training curve, if the run came with its log
        lines = checkpoint.read(log, 2 ** 40).splitlines() if run != "base" and os.path.exists(log) else []
        evals[run] = ev | {"train_wall_s": meta["wall_s"], "curve": [json.loads(x) for x in lines]}
    return evals

def entries(cfg, ev, C, Ns):
    """One entry per run of ev (train.evaluate_runs'): its N-sweep under C, its N = 1 figures, what its
    N = 1 answers predict at each N (the truncation model, the allocation oracle and the all-direct
    line; a strategy it hardly uses: the base's figures), its curve."""
    out, base = [], None
    for run, v in ev.items():
        name, _, seed = run.removeprefix("abl-").rpartition("-s") if run != "base" else ("base", "", "")
        sweep = v["rows"]
        one = pick(sweep, 1)
        cells = strategies(one["samples"], base)
        base = base or cells
        predicted = truncation_model(one["samples"], C, Ns)
        for p in predicted:
            p["oracle"], p["all_direct"] = oracle(*cells, C, p["N"])
        out.append({"name": name, "seed": int(seed) if seed else None, "eval": sweep,
                    "free_lunch": {k: one[k] for k in ("budget", "acc", "tokens_per_problem", "direct_share",
                                                       "loops_per_problem", "steps_per_problem")},
                    "predicted": predicted,
                    "curve": [{k: c[k] for k in ("step", "reward", "acc", "tokens", "loops", "truncated")}
                              for c in v["curve"]]})
    return out

def write(cfg, device, ev, variants):
    """out/<kind>.json and .md, and with matplotlib a figure (but for the ablations); the kind is the
    stage's: report (the paper's claims), ablations or adapt (BCR against the allocation oracle; the
    frontier and the arena: arena.py). ev: train.py's evaluate_runs; variants: the stage's."""
    C, Ns = bcr.sweep_budget(cfg), sweep_Ns(cfg)
    es = entries(cfg, ev, C, Ns)
    kind, Nmax, wall = cfg.stage if cfg.stage in ("ablations", "adapt") else "report", max(Ns), {}
    for run, v in ev.items():
        name = "pretrain" if run == "base" else run.rpartition("-s")[0]
        wall[name] = wall.get(name, 0.0) + v["train_wall_s"]
    wall["eval"] = sum(v["wall_s"] for v in ev.values())
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    concise = statistics.mean(len(solution(p, 1)) + 1 for p in heldout_problems(cfg))  # the yardstick
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    rep = {"config": asdict(cfg), "versions": versions,
           "device": f"{gpu}, RL update in {'bf16' if update_bf16(cfg.update_dtype, device) else 'fp32'}",
           "wall_s": wall, "concise_tokens_per_problem": concise, "budget": C}
    what = {e["name"]: NAMES.get(e["name"]) or " ".join(map(str, variants[e["name"]])) for e in es}
    head = (f"torch {torch.__version__} on {rep['device']}; wall time (s): "
            + ", ".join(f"{k} {v:.0f}" for k, v in wall.items()) + f"; shared budget C = {C}; the loop-free "
            f"trace of the eval problems: {rep['concise_tokens_per_problem']:.1f} tokens per problem\n")
    f = rep["findings"] = findings(es, Ns, cfg.lenpen) if kind == "report" else {} if kind != "adapt" \
        else {"beyond": {f"adapts_{n}": adapts(es, n, Ns) for n in variants}}
    md = [f"# {TITLES[kind]}\n", head, *verdicts_md(f), "\n## Mean (min, max) over seeds, sampled under C\n",
          summary(es, Nmax, what)]
    if kind in ("report", "adapt"):
        md += ["\n## The N-sweep against what each model's N = 1 answers predict\n", sweep_md(es, Ns)]
    md.append("\n## Config\n\n```\n" + json.dumps(rep["config"]) + "\n```\n")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "samples"} for r in rows]  # noqa: E731
    rep["runs"] = [dict(e, eval=strip(e["eval"])) for e in es]
    checkpoint.atomic_write(f"{cfg.out_dir}/{kind}.json", json.dumps(rep, indent=1))
    checkpoint.atomic_write(f"{cfg.out_dir}/{kind}.md", "\n".join(md))
    draw = {"report": plot_report, "adapt": plot_adapt}.get(kind)
    return (figure(draw, rep, f"{cfg.out_dir}/{kind}.png") + "; " if draw else "") + \
        f"wrote {cfg.out_dir}/{kind}.md and {kind}.json"

def figure(draw, rep, path):  # matplotlib is optional: without it, no figure
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"no {path}: pip install matplotlib for the figure"
    fig, buf = draw(plt, rep), io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, dpi=90, format="png")
    plt.close(fig)
    checkpoint.atomic_write(path, buf.getvalue())
    return f"wrote {path}"

def plot_sweep(ax, rep, names, lines):
    """Accuracy (ax[0]) and tokens per problem (ax[1]) against N, mean over seeds, a colour per model;
    for the models in `lines`, what their N = 1 answers predict (truncation model dotted, oracle dashed)."""
    for i, name in enumerate(names):
        es = [e for e in rep["runs"] if e["name"] == name]
        Ns = [r["N"] for r in es[0]["predicted"]]

        def mean(k, rows=None):  # over seeds, at each N: the measured row, or a predicted one
            def at(e, N):
                return pick(e["eval"], N) if rows is None else next(r for r in e[rows] if r["N"] == N)
            return [statistics.mean(at(e, N)[k] for e in es) for N in Ns]
        ax[0].plot(Ns, mean("acc"), "o-", color=f"C{i}", label=name)
        ax[1].plot(Ns, mean("tokens_per_problem"), "o-", color=f"C{i}", label=name)
        if name in lines:
            ax[0].plot(Ns, mean("acc", "predicted"), ":", color=f"C{i}", label=f"{name}, truncation model")
            ax[0].plot(Ns, mean("oracle", "predicted"), "--", color=f"C{i}", label=f"{name}, oracle")
            ax[1].plot(Ns, mean("tokens_per_problem", "predicted"), ":", color=f"C{i}")
    ax[1].plot(Ns, [rep["budget"] / N for N in Ns], ":", color="gray", label="C / N")
    ax[1].set_ylim(0, 1.25 * max(max(line.get_ydata()) for line in ax[1].lines[:-1]))  # C / N off the top
    for a, t in zip(ax, ("accuracy (sampled) vs N under one budget C", "tokens per problem vs N")):
        a.set_title(t, fontsize=10)
        a.set_xlabel("N")

def plot_report(plt, rep):
    """The N-sweep (BCR's truncation model and oracle beside it), the RL training curves."""
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    plot_sweep(ax, rep, ("base", "bcr", "grpo", "lenpen"), ("bcr",))
    for i, name in enumerate(("bcr", "grpo", "lenpen"), 1):
        curve = next(e["curve"] for e in rep["runs"] if e["name"] == name)
        ax[2].plot([c["step"] for c in curve], [c["acc"] for c in curve], color=f"C{i}", label=name)
    ax[2].set_title("RL training accuracy (rollouts), first seed", fontsize=10)
    for a in ax:
        a.legend(fontsize=8)
    return fig

def plot_adapt(plt, rep):
    """BCR and each adapting run: the N-sweep against its lines, the direct share by column count."""
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.5))
    names = [n for n in dict.fromkeys(e["name"] for e in rep["runs"]) if n != "base"]
    plot_sweep(ax, rep, names, names)
    for i, name in enumerate(names):
        es = [e for e in rep["runs"] if e["name"] == name]
        Ns = [r["N"] for r in es[0]["predicted"]]
        for c in pick(es[0]["eval"], 1)["direct_by_columns"]:
            share = [statistics.mean(pick(e["eval"], N)["direct_by_columns"].get(c, 0) for e in es)
                     for N in Ns]
            ax[2].plot(Ns, share, "o-" if c == "1" else "s--", color=f"C{i}", label=f"{name}, {c} column(s)")
    ax[2].set_title("share of problems answered directly, by column count", fontsize=10)
    for a in ax:
        a.legend(fontsize=7)
    return fig

"""
The reproduction harness: the evaluation rows of train.py's runs turned into verdicts, tables and
figures (out/report.*, ablations.*, frontier.*): how the results are judged, not how BCR works.
Every verdict gives the paper's claim in its own words (arXiv 2604.02322, abstract), the toy's
measurement and the rule that joins them, written before the runs it judges and never changed
because of what it returned. "2 se": twice the standard error of a difference, from each
evaluation's own sampling noise (bcr.evaluate), 2 * hypot(se_a, se_b).

- Free lunch: "reduces token usage by 15.8% to 62.6% while consistently maintaining or improving
  accuracy". Rule, on every seed: BCR at N = 1 uses at least 15.8% fewer tokens per problem than the
  base, and its accuracy is not below the base's by more than 2 se. Where the reduction falls
  against the paper's range (below, inside, above) is stated beside it.
- Task-scaling law: "as the number of concurrent problems N increases during inference, per-problem
  token usage decreases monotonically while accuracy degrades far more gracefully than baselines"
  (the baselines are the base models, packed the same way). Rule, on every seed: BCR's tokens per
  problem never rise from one N to the next by more than 2 se and fall from the first N to the last
  by more than 2 se; and BCR keeps a larger share of its N = 1 accuracy at the largest N than the
  base keeps of its own.
- Loops: "models autonomously eliminate redundant metacognitive loops without explicit length
  supervision", necessary steps kept. The paper gives no number; "eliminate" is taken to mean, on
  every seed: at least 90% fewer re-check loops per problem than the base at N = 1, and fewer than
  the no-budget GRPO control of the same seed keeps (else RL alone, not the budget, removed them);
  "steps kept": at least 90% of the base's necessary steps per problem.
- Explicit penalty: "implicit budget constraints successfully circumvent the adversarial gradients
  and catastrophic optimization collapse inherent to explicit length penalties"; with r_len =
  -|y|/maxlen accuracy "falls rapidly to zero". Every run gets a category (category()); rule: the
  length-penalty control collapsed on every seed and BCR on none.
Beyond the paper, verdicts of their own: findings()'s "beyond" and budget_aware(). The frontier
(train.py --stage=frontier) puts predictions() beside what each penalty weight and budget did.
"""
import io
import json
import math
import platform
import statistics
from dataclasses import asdict

import torch

from data import heldout_problems, solution
from checkpoint import atomic_write
from model import update_bf16

PAPER_CUT = (0.158, 0.626)  # the paper's token reductions at N = 1, smallest and largest
NAMES = {"base": "the verbose base", "bcr": "BCR, the default", "grpo": "vanilla GRPO, N = 1 under C",
         "lenpen": "length penalty, N = 1 under C"}

def pick(rows, N, decoding="sample"):
    return next(r for r in rows if r["N"] == N and r["decoding"] == decoding and not r.get("room"))

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
    base, bcr, grpo, lp = es[0]["eval"], seeds("bcr"), seeds("grpo"), seeds("lenpen")
    b1, Nmax, f = pick(base, 1), max(Ns), {}
    for s, e in bcr.items():
        x1 = pick(e["eval"], 1)
        row = {"cut": 1 - ratio(x1["tokens_per_problem"], b1["tokens_per_problem"]),
               "dacc": x1["acc"] - b1["acc"], "se2": two_se(x1, b1),
               "falls": falls([pick(e["eval"], N) for N in Ns]), "keep": kept(e["eval"], Nmax),
               "loops": ratio(x1["loops_per_problem"], b1["loops_per_problem"]),
               "grpo_loops": ratio(pick(grpo[s]["eval"], 1)["loops_per_problem"], b1["loops_per_problem"]),
               "steps": ratio(x1["steps_per_problem"], b1["steps_per_problem"]),
               "lp_keep": kept(lp[s]["eval"], Nmax)}
        for k, v in row.items():
            f.setdefault(k, []).append(v)
    where = {"below" if c < PAPER_CUT[0] else "inside" if c <= PAPER_CUT[1] else "above" for c in f["cut"]}
    tpp = " | ".join(" ".join(f"{pick(e['eval'], N)['tokens_per_problem']:.1f}" for N in Ns)
                     for e in bcr.values())
    cats = {n: [category(e["eval"], base, e["curve"]) for e in runs.values()] for n, runs in (("bcr", bcr),
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

def budget_aware(es, Nmax):
    """Beyond the paper: budget-aware BCR (task mix) spends at most 0.8 x its N = 1 tokens per problem
    at the largest N, with at most 10% of prompts cut by C."""
    mix = [(pick(e["eval"], Nmax), pick(e["eval"], 1)) for e in es if e["name"] == "mix"]
    shrink = [a["tokens_per_problem"] / b["tokens_per_problem"] for a, b in mix]
    cut = [a["truncation_rate"] for a, _ in mix]
    return claim(all(x <= 0.8 for x in shrink) and all(x <= 0.1 for x in cut), "not claimed by the paper",
                 f"every seed: N = {Nmax} tokens per problem <= 0.8 x N = 1's, truncation <= 10%",
                 f"budget-aware BCR spends {spread(shrink)} x its N = 1 tokens per problem at N = {Nmax}, "
                 f"truncation {spread(cut)}")

def predictions(base1, C, format_bonus, rollouts):
    """Closed forms from the base's sampled N = 1 row (its samples: tokens with <eos>, score, direct,
    loops, columns) for the frontier, each strategy's expected reward r = acc + format - lambda*|y|/C:
    - lambda_c, per column count: without std normalisation a direct answer out-earns a loop-free
      stepped one once lambda > (acc_step - acc_direct) * C / (len_step - len_direct); the predicted
      direct share is that of the problems whose lambda_c < lambda. With it, any lambda > 0: in a
      group whose samples are all right the length term is the only difference, and normalising
      makes it a full-size advantage (predicted: a shortcut, direct share >= 0.5);
    - lambda_empty: an empty completion (<eos> alone) out-earns a direct answer once lambda >
      (acc_direct + format_bonus) * C / (len_direct - 1). On-policy RL only moves among what the
      policy samples: collapse to it is predicted only if the base would sample an immediate <eos>
      at least once in the run's rollouts (p_eos * rollouts >= 1);
    - BCR at b: N answers fit in N*b only if a share x of them is direct, x*len_direct +
      (1 - x)*len_step <= b: the least direct share."""
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

def frontier(es, variants, cfg, Nmax):
    """One row per setting: its seeds' figures, categories, and the predictions beside them."""
    base, rows = es[0], []
    rollouts = cfg.G * cfg.prompts * cfg.rl_steps  # each starts with a sample of the first token
    pr = predictions(pick(base["eval"], 1), cfg.C or 4 * cfg.b, cfg.format_bonus, rollouts)
    for name, (task, flags) in variants.items():
        runs = [e for e in es if e["name"] == name]
        lam, std, b = (flags.get(k, getattr(cfg, k)) for k in ("lenpen", "std_norm", "b"))
        share, collapse = predict_run(pr, task, lam, std, b)
        got = lambda k, N=1: [pick(e["eval"], N)[k] for e in runs]  # noqa: E731
        cats = [category(e["eval"], base["eval"], e["curve"]) for e in runs]
        rows.append(dict(name=name, task=task, lenpen=lam if task == "lenpen" else None, std_norm=std, b=b,
                         acc=got("acc"), tokens=got("tokens_per_problem"), direct=got("direct_share"),
                         acc_N=got("acc", Nmax), tokens_N=got("tokens_per_problem", Nmax),
                         low=[min(smooth(e["curve"]) or [float("nan")]) for e in runs], categories=cats,
                         predicted_direct=share, predicted_collapse=collapse,
                         holds=holds(task, std, share, collapse, got("direct_share"), cats)))
    return pr, rows

def setting(r, short=False):
    if r["task"] == "bcr":  # BCR, or the length penalty at its weight
        return f"b={r['b']}" if short else f"BCR, b = {r['b']}"
    return (f"λ={r['lenpen']:g}" if short else f"length penalty λ = {r['lenpen']:g}") + (
        "" if r["std_norm"] else " no std" if short else ", no std normalisation")

def summary(es, Nmax, what):
    """Markdown: one row per model, mean (min, max) over its seeds, at N = 1 and at the largest N."""
    cols = [(1, "acc", "acc", "{:.3f}"), (1, "tokens_per_problem", "tokens/problem", "{:.1f}"),
            (1, "direct_share", "direct share", "{:.2f}"), (1, "loops_per_problem", "loops", "{:.2f}"),
            (Nmax, "acc", "acc", "{:.3f}"), (Nmax, "tokens_per_problem", "tokens/problem", "{:.1f}"),
            (Nmax, "truncation_rate", "truncated", "{:.2f}")]
    head = " | ".join(f"N={N} {h}" for N, _, h, _ in cols)
    out = [f"| run | what | {head} | tokens N={Nmax} / N=1 |", "|" + "---|" * (len(cols) + 3)]
    for name in what:
        at = [{N: pick(e["eval"], N) for N in (1, Nmax)} for e in es if e["name"] == name]
        cells = [spread([a[N][k] for a in at], fmt) for N, k, _, fmt in cols]
        shrink = [a[Nmax]["tokens_per_problem"] / a[1]["tokens_per_problem"] for a in at]
        out.append(f"| {name} | {what[name]} | " + " | ".join(cells + [spread(shrink, "{:.2f}")]) + " |")
    return "\n".join(out)

def frontier_md(pr, rows, C, Nmax):
    out = [f"| setting | N=1 acc | N=1 tokens/problem | N=1 direct share | N={Nmax} acc | lowest smoothed "
           "rollout acc | categories | predicted direct share | predicted collapse | prediction holds |",
           "|" + "---|" * 10]
    for r in rows:
        floor = ">= " if r["task"] == "lenpen" and r["std_norm"] else ""
        collapse = {None: "-", True: "yes", False: "no"}[r["predicted_collapse"]]
        cells = [spread(r["acc"]), spread(r["tokens"], "{:.1f}"), spread(r["direct"], "{:.2f}"),
                 spread(r["acc_N"]), spread(r["low"]), count(r["categories"]),
                 f"{floor}{r['predicted_direct']:.2f}", collapse, "yes" if r["holds"] else "**no**"]
        out.append(f"| {setting(r)} | " + " | ".join(cells) + " |")
    out.append(f"\nFrom the base's sampled N = 1 answers under C = {C}:\n")
    for c, p in pr["per_column"].items():
        out.append(f"- {c} column(s), {p['share']:.0%} of problems: direct {p['acc_direct']:.3f} right in "
                   f"{p['len_direct']:.1f} tokens, stepped {p['acc_step']:.3f} in {p['len_step']:.1f} "
                   f"(loop-free): without std normalisation direct pays from lambda_c = {p['lambda']:.2f}")
    out.append(f"- an empty completion out-earns a direct answer from lambda = {pr['lambda_empty']:.2f}; the "
               f"base ends at once with p = {pr['p_eos']:.2g} and starts with the answer label with p = "
               f"{pr['p_A']:.2g}: it would sample an immediate <eos> {pr['p_eos'] * pr['rollouts']:.2g} "
               f"times in a run's {pr['rollouts']} rollouts")
    out.append(f"- BCR at b fits N answers in N*b only with a direct share >= (len_step - b) / (len_step - "
               f"len_direct), len_step = {pr['len_step']:.1f}, len_direct = {pr['len_direct']:.1f}")
    return "\n".join(out)

def entries(cfg, ev, predict):
    """One entry per run of ev (train.evaluate_runs'): its N-sweep under C, the base's with room apart,
    its N = 1 figures, the truncation model's sweep (bcr.predict), its training curve (if logged)."""
    out, C, Ns = [], cfg.C or 4 * cfg.b, [int(x) for x in cfg.eval_Ns.split(",")]
    for run, v in ev.items():
        name, _, seed = run.removeprefix("abl-").rpartition("-s") if run != "base" else ("base", "", "")
        sweep = [r for r in v["rows"] if r["budget"] == C]
        one = pick(sweep, 1)
        out.append({"name": name, "seed": int(seed) if seed else None, "eval": sweep,
                    "eval_room": [dict(r, room=True) for r in v["rows"] if r["budget"] != C],
                    "free_lunch": {k: one[k] for k in ("budget", "acc", "tokens_per_problem", "direct_share",
                                                       "loops_per_problem", "steps_per_problem")},
                    "predicted": predict(one["samples"], C, Ns),
                    "curve": [{k: c[k] for k in ("step", "reward", "acc", "tokens", "loops", "truncated")}
                              for c in v["curve"]]})
    return out

def write(cfg, device, ev, variants, predict):
    """out/<kind>.json and .md, and with matplotlib a figure (report.png, frontier.png); the kind is
    the stage's: report (the paper's claims), ablations (budget-aware BCR) or frontier. ev: train.py's
    evaluate_runs; variants: {label: (task, flags)} of the ablations and the frontier; predict: bcr's."""
    es, C, Ns = entries(cfg, ev, predict), cfg.C or 4 * cfg.b, [int(x) for x in cfg.eval_Ns.split(",")]
    kind, Nmax, wall = cfg.stage if cfg.stage in ("ablations", "frontier") else "report", max(Ns), {}
    for run, v in ev.items():
        name = "pretrain" if run == "base" else run.rpartition("-s")[0]
        wall[name] = wall.get(name, 0.0) + v["train_wall_s"]
    wall["eval"] = sum(v["wall_s"] for v in ev.values())
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    concise = statistics.mean(len(solution(p, 1)) + 1 for p in heldout_problems(cfg))  # the yardstick
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    rep = {"config": asdict(cfg), "versions": versions,
           "device": f"{gpu}, RL update in {'bf16' if update_bf16(cfg.update_dtype, device) else 'fp32'}",
           "wall_s": wall, "concise_tokens_per_problem": concise}
    what = {e["name"]: NAMES.get(e["name"]) or " ".join(map(str, variants[e["name"]])) for e in es}
    head = (f"torch {torch.__version__} on {rep['device']}; wall time (s): "
            + ", ".join(f"{k} {v:.0f}" for k, v in wall.items()) + f"; shared budget C = {C}; the loop-free "
            f"trace of the eval problems: {rep['concise_tokens_per_problem']:.1f} tokens per problem\n")
    if kind == "report":
        f = rep["findings"] = findings(es, Ns, cfg.lenpen)
        md = ["# nanoBCR report\n", head, "## The paper's claims\n",
              "| claim | the paper | the toy | rule | verdict |", "|---|---|---|---|---|",
              *(f"| {k} | \"{v['paper']}\" | {v['evidence']} | {v['rule']} | "
                f"{'reproduced' if v['reproduced'] else '**not reproduced**'} |"
                for k, v in f.items() if k != "beyond"),
              "\n## Beyond the paper\n",
              *(f"- **{k}**: {'yes' if v['reproduced'] else '**no**'}. {v['evidence']} (rule: {v['rule']})."
                for k, v in f["beyond"].items()),
              "\n## Mean (min, max) over seeds, sampled under C (every row: report.json)\n",
              summary(es, Nmax, what),
              "\n## Config\n\n```\n" + json.dumps(rep["config"]) + "\n```\n"]
    elif kind == "ablations":
        aware = budget_aware(es, Nmax)
        rep["findings"] = {"beyond": {"budget_aware": aware}}
        md = ["# nanoBCR ablations\n", head, "Sampled under C, mean (min, max) over seeds; b and N vary in "
              "training only.\n", summary(es, Nmax, what), f"\n**Budget-aware BCR** (beyond the paper): "
              f"{'yes' if aware['reproduced'] else 'no'}: {aware['evidence']} (rule: {aware['rule']}).\n"]
    else:
        rep["predictions"], rep["frontier"] = frontier(es, variants, cfg, Nmax)
        md = ["# nanoBCR frontier: an explicit length penalty against an implicit budget\n", head,
              "Sampled under C, mean (min, max) over seeds.\n",
              frontier_md(rep["predictions"], rep["frontier"], C, Nmax),
              "\n## Mean (min, max) over seeds\n", summary(es, Nmax, what), ""]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "samples"} for r in rows]  # noqa: E731
    rep["runs"] = [dict(e, eval=strip(e["eval"]), eval_room=strip(e["eval_room"])) for e in es]
    atomic_write(f"{cfg.out_dir}/{kind}.json", json.dumps(rep, indent=1))
    atomic_write(f"{cfg.out_dir}/{kind}.md", "\n".join(md))
    draw = {"report": plot_report, "frontier": plot_frontier}.get(kind)
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
    atomic_write(path, buf.getvalue())
    return f"wrote {path}"

def plot_report(plt, rep):
    """The N-sweep (accuracy, tokens per problem; BCR's truncation model dashed), the RL curves."""
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for i, name in enumerate(("base", "bcr", "grpo", "lenpen")):
        es = [e for e in rep["runs"] if e["name"] == name]
        Ns = [r["N"] for r in es[0]["eval"] if r["decoding"] == "sample"]
        for j, key in enumerate(("acc", "tokens_per_problem")):
            y = [statistics.mean(pick(e["eval"], N)[key] for e in es) for N in Ns]
            ax[j].plot(Ns, y, "o-", color=f"C{i}", label=name)
            if name == "bcr":
                pred = [statistics.mean(p[key] for e in es for p in e["predicted"] if p["N"] == N)
                        for N in Ns]
                ax[j].plot(Ns, pred, "--", color=f"C{i}", label="bcr, truncation model")
        if name != "base":
            curve = es[0]["curve"]
            ax[2].plot([c["step"] for c in curve], [c["acc"] for c in curve], color=f"C{i}", label=name)
    C = rep["config"]["C"] or 4 * rep["config"]["b"]
    ax[1].plot(Ns, [C / N for N in Ns], ":", color="gray", label="C / N")
    for a, t in zip(ax, ("accuracy (sampled) vs N, one shared budget C", "tokens per problem vs N",
                         "RL training accuracy (rollouts), first seed")):
        a.set_title(t, fontsize=10)
        a.legend(fontsize=8)
    ax[1].set_ylim(0, 1.25 * max(max(line.get_ydata()) for line in ax[1].lines[:-1]))  # C / N off the top
    return fig

def plot_frontier(plt, rep):
    """Accuracy against tokens per problem, a point per setting with seed min-max bars, at N = 1 and
    at the largest N; and the smoothed rollout accuracy of the extreme settings during training."""
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.5))
    base, Nmax = rep["runs"][0]["eval"], max(r["N"] for r in rep["runs"][0]["eval"])
    for r in rep["frontier"]:
        color = "C0" if r["task"] == "bcr" else "C3" if r["std_norm"] else "C1"
        for a, (acc, tok) in zip(ax, ((r["acc"], r["tokens"]), (r["acc_N"], r["tokens_N"]))):
            x, y = statistics.mean(tok), statistics.mean(acc)
            a.errorbar(x, y, xerr=[[x - min(tok)], [max(tok) - x]], yerr=[[y - min(acc)], [max(acc) - y]],
                       fmt="o", color=color, capsize=2)
            a.annotate(setting(r, short=True), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for a, row in zip(ax, (pick(base, 1), pick(base, Nmax))):
        a.plot(row["tokens_per_problem"], row["acc"], "k*", markersize=10, label="base")
        for color, label in (("C0", "BCR, budget b"), ("C3", "length penalty"), ("C1", "penalty, no std")):
            a.plot([], [], "o", color=color, label=label)
        a.set_xlabel("tokens per problem")
        a.set_ylabel("accuracy")
    groups = [sorted((r for r in rep["frontier"] if (r["task"], r["std_norm"]) == g),
                     key=lambda r: r["lenpen"] or r["b"])
              for g in (("lenpen", True), ("lenpen", False), ("bcr", True))]
    for i, r in enumerate(r for g in groups if g for r in (g[0], g[-1])):  # each family's two ends
        s = smooth(next(e["curve"] for e in rep["runs"] if e["name"] == r["name"]))
        ax[2].plot(range(len(s)), s, color=f"C{i}", label=setting(r))
    for a, t in zip(ax, ("N = 1 (sampled, under C)", f"N = {Nmax} under the same C",
                         "rollout accuracy in training (10-step mean), extreme settings, first seed")):
        a.set_title(t, fontsize=10)
        a.legend(fontsize=7)
    return fig

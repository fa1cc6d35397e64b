"""
Beyond the paper: BCR against length control on one base, same RL steps and evaluation. The
frontier (--stage=frontier) doses the explicit penalty (with and without std normalisation)
against BCR's budget b, beside closed-form predictions (report.predictions). The arena (--stage=arena)
runs the field's methods, each a task and, where it changes how rewards become advantages, a few
lines in bcr.METHODS; "the cap" is b, BCR's room per problem, one problem a prompt unless BCR:
- cap (ThinkPrune, 2504.01296): a hard cap of b, reward 0 when cut: BCR without the shared context;
- kimi (Kimi k1.5): lambda = 0.5 - (len - min) / (max - min) per group, added to a right answer's
  reward, min(0, lambda) to a wrong one's;
- shorterbetter (2504.21370): r = alpha * right - beta * |len - SOL|, SOL the group's shortest right
  answer (its mean length if none is right), at the paper's alpha = 2, beta = 0.001 a token;
- dler (2510.15110): the cap, advantages centred per group and scaled by the batch's std (its clip
  and dynamic sampling have no counterpart on-policy);
- gfpo (2508.09726): 2G samples, trained on each group's G shortest, normalised among them;
- drgrpo (Dr. GRPO, 2503.20783): no std normalisation; a token sum over samples x cap.
Prediction, written before the runs: a method shortcuts to direct answers iff a group whose samples
are all right gets non-zero advantages (a length term separates them; std normalisation makes any
such term full-size): kimi and shorterbetter; not bcr, cap, dler, gfpo or drgrpo.
Add a method: a function (r, rewards, lengths, cap, G) -> (advantages, rewards) registered in
bcr.METHODS, a line in ARENA, a prediction in SHORTCUT; then python train.py --stage=arena.
"""
import json
import statistics
from dataclasses import asdict

import torch

import bcr
import report
from checkpoint import atomic_write

# the dose-response: the penalty's weight, with and without std normalisation, against BCR's budget
# (b = 16 and 20 bind below the loop-free trace); label -> (bcr task, flags)
FRONTIER = {**{f"lp{x:g}": ("lenpen", dict(lenpen=x)) for x in (0.1, 0.25)}, "lenpen": ("lenpen", {}),
            **{f"lp{x:g}": ("lenpen", dict(lenpen=x)) for x in (4, 10)},
            **{f"lp{x:g}-nostd": ("lenpen", dict(lenpen=x, std_norm=False)) for x in (0.25, 1, 4)},
            **{f"b{b}": ("bcr", dict(b=b)) for b in (16, 20, 29)}, "bcr": ("bcr", {}),
            "b43": ("bcr", dict(b=43))}

def right(rewards, G):
    return torch.tensor([x.acc == 1.0 for x in rewards]).view(-1, G)  # (P, G)

def kimi(r, rewards, lengths, cap, G):
    L = lengths.float().cpu().view(-1, G)                                # (P, G)
    lo, hi = L.min(1, keepdim=True).values, L.max(1, keepdim=True).values
    lam = 0.5 - (L - lo) / (hi - lo).clamp(min=1)                        # all alike: 0.5 each
    shaped = r.view(-1, G) + torch.where(right(rewards, G), lam, lam.clamp(max=0))
    return bcr.advantages(shaped).view(-1), shaped.view(-1)

def shorterbetter(r, rewards, lengths, cap, G, alpha=2.0, beta=0.001):
    L, ok = lengths.float().cpu().view(-1, G), right(rewards, G)         # (P, G) each
    sol = torch.where(ok, L, float("inf")).min(1, keepdim=True).values  # (P, 1)
    sol = torch.where(ok.any(1, keepdim=True), sol, L.mean(1, keepdim=True))
    shaped = alpha * ok - beta * (L - sol).abs()
    return bcr.advantages(shaped).view(-1), shaped.view(-1)

def dler(r, rewards, lengths, cap, G):
    centred = r.view(-1, G) - r.view(-1, G).mean(1, keepdim=True)       # (P, G)
    return (centred / (r.std() + 1e-4)).view(-1), r

def gfpo(r, rewards, lengths, cap, G):
    shortest = torch.sort(lengths.cpu().view(-1, G), dim=1, stable=True).indices[:, :G // 2]  # (P, G/2)
    adv = torch.zeros(r.numel() // G, G)
    adv.scatter_(1, shortest, bcr.advantages(r.view(-1, G).gather(1, shortest)))
    return adv.view(-1), r

def drgrpo(r, rewards, lengths, cap, G):
    # under token_mean the loss is divided by the batch's tokens: rescaled to a constant B * cap
    adv = bcr.advantages(r.view(-1, G), std_norm=False).view(-1)
    return adv * lengths.sum().item() / (len(lengths) * cap), r

bcr.METHODS.update(kimi=kimi, shorterbetter=shorterbetter, dler=dler, gfpo=gfpo, drgrpo=drgrpo)
ARENA = {"bcr": ("bcr", {}), "cap": ("cap", {}), "kimi": ("grpo", dict(method="kimi")),
         "shorterbetter": ("grpo", dict(method="shorterbetter")), "dler": ("cap", dict(method="dler")),
         "gfpo": ("grpo", dict(method="gfpo", G=16)),
         "drgrpo": ("grpo", dict(method="drgrpo", std_norm=False))}
SHORTCUT = {"bcr": False, "cap": False, "kimi": True, "shorterbetter": True, "dler": False, "gfpo": False,
            "drgrpo": False}

def batching(es, Nmax):
    """Beyond the paper, "batching matters". Rule (written before the runs), on every seed: BCR beats
    the per-problem cap by more than 2 se at N = 1 accuracy, or at the share of it kept at N = Nmax."""
    cap, wins = {e["seed"]: e["eval"] for e in es if e["name"] == "cap"}, []
    for e in (e for e in es if e["name"] == "bcr"):
        a1, b1 = report.pick(e["eval"], 1), report.pick(cap[e["seed"]], 1)
        kept = report.kept(e["eval"], Nmax) - report.kept(cap[e["seed"]], Nmax)
        # 2 se of the kept shares: the N = Nmax accuracies' noise over the smaller N = 1 accuracy
        se2 = report.two_se(report.pick(e["eval"], Nmax), report.pick(cap[e["seed"]], Nmax))
        better = a1["acc"] - b1["acc"] > report.two_se(a1, b1)
        better = better or kept > se2 / max(min(a1["acc"], b1["acc"]), 1e-9)
        wins.append((better, a1["acc"] - b1["acc"], kept))
    spread = lambda i: report.spread([w[i] for w in wins], "{:+.3f}")  # noqa: E731
    return report.claim(
        all(w[0] for w in wins), "not claimed by the paper",
        f"every seed: BCR above the per-problem cap by > 2 se at N = 1 accuracy or accuracy kept at "
        f"N = {Nmax}",
        f"BCR minus the cap: N = 1 accuracy {spread(1)}, accuracy kept at N = {Nmax} {spread(2)}; better on "
        f"{sum(w[0] for w in wins)} of {len(wins)} seeds")

def settings(es, variants, cfg, Nmax, pr):
    """One row per setting: its seeds' figures, categories, and the prediction beside them."""
    rows, base = [], es[0]["eval"]
    for name, (task, flags) in variants.items():
        runs = [e for e in es if e["name"] == name]
        got = lambda k, N=1: [report.pick(e["eval"], N)[k] for e in runs]  # noqa: E731
        cats = [report.category(e["eval"], base, e["curve"]) for e in runs]
        lam, std, b = (flags.get(k, getattr(cfg, k)) for k in ("lenpen", "std_norm", "b"))
        row = dict(name=name, task=task, flags=flags, acc=got("acc"), tokens=got("tokens_per_problem"),
                   direct=got("direct_share"), acc_N=got("acc", Nmax),
                   tokens_N=got("tokens_per_problem", Nmax),
                   low=[min(report.smooth(e["curve"]) or [float("nan")]) for e in runs], categories=cats)
        if cfg.stage == "arena":
            said = {True: "shortcut", False: "keeps steps", None: "-"}[SHORTCUT.get(name)]
            row.update(label=name, predicted=said,
                       holds=all((c == "shortcut") == SHORTCUT.get(name) for c in cats))
        else:
            share, collapse = report.predict_run(pr, task, lam, std, b)
            label = f"b={b}" if task == "bcr" else f"λ={lam:g}" + ("" if std else " no std")
            floor, said = ">= " * (task == "lenpen" and std), {None: "-", True: "yes", False: "no"}[collapse]
            row.update(label=label, predicted_direct=share, predicted_collapse=collapse,
                       predicted=f"direct {floor}{share:.2f}, collapse {said}",
                       holds=report.holds(task, std, share, collapse, got("direct_share"), cats))
        rows.append(row)
    return rows

def write(cfg, device, ev, variants):
    """out/<stage>.json, .md and .png for the frontier or the arena (device unused: report.write's)."""
    C, Ns = bcr.sweep_budget(cfg), report.sweep_Ns(cfg)
    es, Nmax, kind = report.entries(cfg, ev, C, Ns), max(Ns), cfg.stage
    rollouts = cfg.G * cfg.prompts * cfg.rl_steps  # each starts with a sample of the first token
    pr = report.predictions(report.pick(es[0]["eval"], 1), C, cfg.format_bonus, rollouts)
    rows = settings(es, variants, cfg, Nmax, pr)
    # what a table without the per-problem cap (a reader's own) still gets: every row, no verdict
    has_cap = any(e["name"] == "cap" for e in es)
    f = {"beyond": {"batching_matters": batching(es, Nmax)}} if kind == "arena" and has_cap else {}
    strip = lambda rows: [{k: v for k, v in r.items() if k != "samples"} for r in rows]  # noqa: E731
    rep = {"config": asdict(cfg), "budget": C, "predictions": pr, kind: rows, "findings": f,
           "runs": [dict(e, eval=strip(e["eval"])) for e in es]}
    md = [f"# nanoBCR {kind}: BCR against length control on one base\n", *report.verdicts_md(f),
          f"\n## Each setting, mean (min, max) over seeds, sampled under C = {C}\n",
          f"| setting | N=1 acc | N=1 tokens/problem | N=1 direct share | N={Nmax} acc | N={Nmax} "
          "tokens/problem | lowest smoothed rollout acc | categories | predicted | prediction holds |",
          "|---" * 10 + "|"]
    for r in rows:
        cells = [report.spread(r["acc"]), report.spread(r["tokens"], "{:.1f}"),
                 report.spread(r["direct"], "{:.2f}"), report.spread(r["acc_N"]),
                 report.spread(r["tokens_N"], "{:.1f}"), report.spread(r["low"]),
                 report.count(r["categories"]), r["predicted"], "yes" if r["holds"] else "**no**"]
        md.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    md += [f"\nFrom the base's sampled N = 1 answers under C = {C}:\n"] + [
        f"- {c} column(s), {p['share']:.0%} of problems: direct {p['acc_direct']:.3f} right in "
        f"{p['len_direct']:.1f} tokens, stepped {p['acc_step']:.3f} in {p['len_step']:.1f} (loop-free): "
        f"without std normalisation direct pays from lambda_c = {p['lambda']:.2f}"
        for c, p in pr["per_column"].items()]
    md.append(f"- an empty completion out-earns a direct answer from lambda = {pr['lambda_empty']:.2f}; the "
              f"base ends at once with p = {pr['p_eos']:.2g}: an immediate <eos> "
              f"{pr['p_eos'] * rollouts:.2g} times in {rollouts} rollouts")
    atomic_write(f"{cfg.out_dir}/{kind}.json", json.dumps(rep, indent=1))
    atomic_write(f"{cfg.out_dir}/{kind}.md", "\n".join(md) + "\n")
    return report.figure(plot, rep, f"{cfg.out_dir}/{kind}.png") + f"; wrote {cfg.out_dir}/{kind}.md, .json"

def plot(plt, rep):
    """Accuracy against tokens per problem, a point per setting with its seeds' min-max bars, at N = 1
    and at the largest N (the base: a star); the rollout accuracy in training (10-step mean)."""
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.5))
    base, rows = rep["runs"][0]["eval"], rep.get("arena") or rep["frontier"]
    Nmax = max(r["N"] for r in base)
    color = {r["name"]: f"C{i}" for i, r in enumerate(rows)} if "arena" in rep else {
        r["name"]: {"bcr": "C0", "lenpen": "C3" if r["flags"].get("std_norm", True) else "C1"}[r["task"]]
        for r in rows}
    for a, N, (acc, tok) in zip(ax, (1, Nmax), (("acc", "tokens"), ("acc_N", "tokens_N"))):
        for r in rows:
            x, y = statistics.mean(r[tok]), statistics.mean(r[acc])
            a.errorbar(x, y, xerr=[[x - min(r[tok])], [max(r[tok]) - x]], fmt="o", capsize=2,
                       yerr=[[y - min(r[acc])], [max(r[acc]) - y]], color=color[r["name"]])
        a.plot(report.pick(base, N)["tokens_per_problem"], report.pick(base, N)["acc"], "k*", markersize=10,
               label="base")
        a.set(xlabel="tokens per problem", ylabel="accuracy", title=f"N = {N} under C = {rep['budget']}")
        a.legend(fontsize=7)
    fig.tight_layout()  # the final scale: labels are placed in points on the page
    for a, (acc, tok) in zip(ax, (("acc", "tokens"), ("acc_N", "tokens_N"))):
        placed, top = [], a.bbox.y1 * 72 / fig.dpi - 9  # (left, right, bottom) of each label, in points
        for r in rows:  # a label that would overlap an earlier one moves a line down or up, the nearest free
            x, y = statistics.mean(r[tok]), statistics.mean(r[acc])
            px, py = a.transData.transform((x, y)) * 72 / fig.dpi
            left, right = px + 3, px + 3 + 4 * len(r["label"])
            free = [u for u in range(-60, 70, 9) if py + u < top and not any(
                left < q1 and q0 < right and abs(py + u - qy) < 9 for q0, q1, qy in placed)]
            up = min(free, key=lambda u: abs(u - 3), default=3)
            placed.append((left, right, py + up))
            a.annotate(r["label"], (x, y), fontsize=7, xytext=(3, up), textcoords="offset points")
    for r in rows:
        s = report.smooth(next(e["curve"] for e in rep["runs"] if e["name"] == r["name"]))
        ax[2].plot(range(len(s)), s, color=color[r["name"]], label=r["label"], alpha=0.8)
    ax[2].set_title("rollout accuracy in training (10-step mean), first seed", fontsize=10)
    ax[2].legend(fontsize=6, ncol=2)
    return fig

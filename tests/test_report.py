"""report.py's rules on synthetic rows: every verdict and category reachable, the closed-form
predictions on a hand-computed case."""
import math

import pytest

import report

NS = [1, 2, 4, 8]


def row(N, acc=0.9, tokens=40.0, loops=1.0, steps=1.5, direct=0.25, se=0.01, tse=0.5):
    return {"N": N, "decoding": "sample", "budget": 144, "acc": acc, "acc_se": se, "tokens_per_problem": tokens,
            "tokens_per_problem_se": tse, "loops_per_problem": loops, "steps_per_problem": steps,
            "direct_share": direct, "truncation_rate": 0.0}


def entry(name, seed, rows, curve=()):
    return {"name": name, "seed": seed, "eval": rows, "curve": [{"acc": a} for a in curve]}


def sweep(acc1, accN, tok1, tokN, **kw):
    """A sweep over NS, accuracy and tokens moving linearly from N = 1 to the largest N."""
    out = []
    for N in NS:
        f = (N - 1) / (NS[-1] - 1)
        out.append(row(N, acc1 + f * (accN - acc1), tok1 + f * (tokN - tok1), **kw))
    return out


def world(seeds=(1, 2, 3), **over):
    """A base and three runs per seed where every paper claim holds; over replaces a run's sweep."""
    es = [entry("base", None, sweep(0.85, 0.35, 42.0, 18.0, loops=1.8, steps=1.3))]
    for s in seeds:
        runs = {"bcr": sweep(0.95, 0.62, 27.0, 18.0, loops=0.05, steps=1.7, direct=0.02),
                "grpo": sweep(0.95, 0.40, 35.0, 18.0, loops=0.9, steps=1.5),
                "lenpen": sweep(0.30, 0.25, 15.0, 15.0, loops=0.0, steps=0.2, direct=0.95)}
        es += [entry(n, s, over.get(n, r), curve=[0.85] * 20) for n, r in runs.items()]
    return es


def test_every_claim_is_reproduced_on_a_world_that_satisfies_the_rules():
    f = report.findings(world(), NS, 1.0)
    assert all(f[k]["reproduced"] for k in ("free_lunch", "scaling_law", "loops_vanish", "length_penalty"))
    assert not f["beyond"]["bcr_vs_length_penalty"]["reproduced"]  # lenpen keeps 0.25/0.30 > BCR's 0.62/0.95
    assert "inside the paper's range" in f["free_lunch"]["evidence"]


@pytest.mark.parametrize("claim, run, rows", [
    ("free_lunch", "bcr", sweep(0.95, 0.62, 38.0, 18.0, loops=0.05, steps=1.7)),   # only 9.5% fewer tokens
    ("free_lunch", "bcr", sweep(0.80, 0.62, 27.0, 18.0, loops=0.05, steps=1.7)),   # 5 points below: > 2 se
    ("scaling_law", "bcr", sweep(0.95, 0.30, 27.0, 18.0, loops=0.05, steps=1.7)),  # keeps less than the base
    ("scaling_law", "bcr", [row(N, a, t, loops=0.05, steps=1.7)                      # a rise beyond 2 se
                            for N, a, t in ((1, 0.95, 27.0), (2, 0.9, 30.0), (4, 0.8, 20.0), (8, 0.62, 18.0))]),
    ("loops_vanish", "bcr", sweep(0.95, 0.62, 27.0, 18.0, loops=0.3, steps=1.7)),  # 0.17 x the base's loops
    ("loops_vanish", "grpo", sweep(0.95, 0.4, 35.0, 18.0, loops=0.01)),           # GRPO removed them too
    ("loops_vanish", "bcr", sweep(0.95, 0.62, 27.0, 18.0, loops=0.05, steps=1.0)),  # steps dropped
    ("length_penalty", "lenpen", sweep(0.80, 0.25, 15.0, 15.0)),                   # a shortcut, not a collapse
])
def test_each_claim_can_fail(claim, run, rows):
    """One seed's run changed is enough: the rules hold on every seed."""
    es = world()
    es[1 + ["bcr", "grpo", "lenpen"].index(run)]["eval"] = rows  # seed 1's run
    f = report.findings(es, NS, 1.0)
    assert not f[claim]["reproduced"]
    assert all(f[k]["reproduced"] for k in ("free_lunch", "scaling_law", "loops_vanish", "length_penalty")
               if k != claim)


def test_a_rise_within_two_standard_errors_is_noise():
    rows = [row(1, tokens=27.0), row(2, tokens=27.6), row(4, tokens=22.0), row(8, tokens=18.0)]
    assert report.falls(rows)  # +0.6 against 2 * hypot(0.5, 0.5) = 1.41
    assert not report.falls([row(1, tokens=27.0), row(2, tokens=28.6), row(4, tokens=22.0), row(8, tokens=18.0)])
    assert not report.falls([row(1, tokens=20.0), row(8, tokens=19.5)])  # flat: no fall beyond noise


def test_each_category_is_reachable():
    base, log = [row(1, acc=0.90)], lambda accs: [{"acc": a} for a in accs]  # noqa: E731
    assert report.category([row(1, acc=0.30)], base, log([0.9] * 20)) == "collapsed"      # at the end
    assert report.category([row(1, acc=0.89)], base, log([0.9] * 10 + [0.2] * 10 + [0.9] * 10)) == "collapsed"
    assert report.category([row(1, acc=0.80)], base, log([0.9] * 20)) == "shortcut"       # 10 points > 2 se
    assert report.category([row(1, acc=0.89)], base, log([0.9] * 20)) == "stable"         # 1 point < 2 se
    assert report.category([row(1, acc=0.97)], base, []) == "stable"                      # better; no log


def test_a_base_with_nothing_to_compare_reproduces_nothing():
    """A smoke run's untrained base may emit no loops or tokens: ratios are nan, never a verdict."""
    es = world(over={})
    es[0]["eval"] = sweep(0.0, 0.0, 0.0, 0.0, loops=0.0, steps=0.0)
    f = report.findings(es, NS, 1.0)
    assert not f["loops_vanish"]["reproduced"] and "nan" in f["loops_vanish"]["evidence"]
    assert not f["free_lunch"]["reproduced"]


def test_predictions_by_hand():
    """Samples [tokens with <eos>, right, direct, loops, columns]. One column: direct 12 tokens, right;
    stepped 18, right. Two columns: direct 17 tokens, right half the time; stepped loop-free 27 tokens,
    always right (a stepped sample with loops counts for accuracy, not for the loop-free length)."""
    s = ([[12, 1.0, True, 0, 1]] * 2 + [[18, 1.0, False, 0, 1]] * 2 +
         [[17, 1.0, True, 0, 2], [17, 0.0, True, 0, 2]] + [[27, 1.0, False, 0, 2]] * 3 + [[40, 1.0, False, 3, 2]])
    pr = report.predictions({"samples": s, "p_first": {"eos": 1e-6, "A": 0.01}}, 144, 0.1, 6400)
    one, two = pr["per_column"]["1"], pr["per_column"]["2"]
    assert one["share"] == 0.4 and two["share"] == 0.6
    assert one["lambda"] == 0.0  # direct is as accurate: any penalty makes it pay
    assert two["acc_step"] == 1.0 and two["len_step"] == 27.0
    assert math.isclose(two["lambda"], (1.0 - 0.5) * 144 / (27 - 17))  # 7.2
    acc_d, len_d = (1 + 1 + 1 + 0) / 4, (12 + 12 + 17 + 17) / 4
    assert math.isclose(pr["lambda_empty"], (acc_d + 0.1) * 144 / (len_d - 1))
    # no std normalisation: lambda 4 sends the one-column problems direct, 10 all of them
    assert report.predict_run(pr, "lenpen", 4.0, False, 36) == (0.4, False)
    assert report.predict_run(pr, "lenpen", 10.0, False, 36)[0] == 1.0
    # with it, a shortcut at any weight; the empty answer out-earns a direct one past lambda_empty, but
    # the base samples an immediate <eos> 0.0064 times in 6400 rollouts: no collapse predicted
    assert report.predict_run(pr, "lenpen", 0.1, True, 36) == (0.5, False)
    assert report.predict_run(pr, "lenpen", 100.0, True, 36)[1] is False
    pr["p_eos"] = 1e-3
    assert report.predict_run(pr, "lenpen", 100.0, True, 36)[1] is True
    # BCR: len_step = 0.4 * 18 + 0.6 * 27 = 23.4, len_direct = 0.4 * 12 + 0.6 * 17 = 15
    x, _ = report.predict_run(pr, "bcr", 0, True, 20)
    assert math.isclose(x, (23.4 - 20) / (23.4 - 15))
    assert report.predict_run(pr, "bcr", 0, True, 30)[0] == 0.0 and report.predict_run(pr, "bcr", 0, True, 10)[0] == 1


# ----------------------------------------------------------------------------- the allocation oracle (#38)

CELLS = {(1, True): (0.5, 4.0), (1, False): (1.0, 10.0), (2, True): (0.2, 5.0), (2, False): (0.9, 20.0)}


def test_the_oracle_on_a_hand_computed_case():
    """Two problem types, half each; C = 31 fits a one-column and a two-column stepped answer (10 +
    20 + <eos>) but not two two-column ones. Two problems: one of each (probability 0.5), both
    stepped, (1.0 + 0.9) / 2; two two-column ones (0.25), one stepped and one direct, (0.9 + 0.2) / 2;
    two one-column ones (0.25), both stepped, 1.0. Expected 0.5 * 0.95 + 0.25 * 0.55 + 0.25 = 0.8625;
    all direct: (0.5 + 0.2) / 2 = 0.35."""
    best, direct = report.oracle(CELLS, {1: 0.5, 2: 0.5}, 31, 2)
    assert best == pytest.approx(0.8625) and direct == pytest.approx(0.35)
    assert report.oracle(CELLS, {1: 0.5, 2: 0.5}, 41, 2)[0] == pytest.approx(0.5 * 0.95 + 0.25 * 0.9 + 0.25)
    # no room even for direct answers: the oracle answers none, the all-direct line none
    assert report.oracle(CELLS, {1: 0.5, 2: 0.5}, 3, 2) == (0.0, 0.0)


def test_strategies_take_the_base_figures_where_a_model_hardly_answers_directly():
    samples = [[11, 1.0, False, 0, 1]] * 40 + [[21, 0.0, False, 0, 2]] * 40 + [[5, 1.0, True, 0, 2]] * 3
    base = report.strategies(samples + [[5, 0.0, True, 0, 1]] * 30)
    cells, share = report.strategies(samples, base)
    assert cells[1, False] == (1.0, 10.0) and cells[2, False] == (0.0, 20.0)
    assert cells[2, True] == base[0][2, True] == (1.0, 4.0)  # 3 answers: fewer than 20, the base's
    assert cells[1, True] == (0.0, 4.0) and share == {1: 40 / 83, 2: 43 / 83}


def adapting(acc8, cut8=0.05, acc1=0.95, lines=0.70):
    """An adapting run: its sweep, and what its N = 1 answers predict (every line at `lines`)."""
    rows = [row(1, acc1), row(6, acc8 + 0.1), row(7, acc8 + 0.05), dict(row(8, acc8), truncation_rate=cut8)]
    pred = [{"N": r["N"], "acc": lines, "all_direct": lines, "oracle": 0.9} for r in rows]
    return dict(entry("adapt", 1, rows), predicted=pred)


@pytest.mark.parametrize("run, holds", [(adapting(0.80), True), (adapting(0.72), False),  # within 2 se
                                        (adapting(0.80, cut8=0.3), False), (adapting(0.80, acc1=0.85), False)])
def test_the_adapts_verdict_flips_both_ways(run, holds):
    es = [entry("base", None, [row(1), row(8)]), entry("bcr", 1, [row(1, 0.95), row(8, 0.6)]), run]
    v = report.adapts(es, "adapt", [1, 6, 7, 8])
    assert v["reproduced"] is holds, v["evidence"]
    assert "below the oracle at N = 6, 7, 8" in v["evidence"]


def test_the_arena_figure_labels_never_overlap():
    """Settings that cluster (the penalty's weights at N = 1) get labels that do not touch."""
    matplotlib = pytest.importorskip("matplotlib", reason="matplotlib is not installed: no figure")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import arena
    base = [dict(N=N, decoding="sample", acc=0.9, tokens_per_problem=40.0) for N in (1, 8)]
    points = [(18.4, 0.811), (18.4, 0.797), (17.8, 0.807), (18.0, 0.800), (15.7, 0.744), (26.7, 0.963)]
    rows = [dict(name=f"s{i}", label=f"λ={i} no std", task="lenpen", flags={}, acc=[y], tokens=[x],
                 acc_N=[y], tokens_N=[x]) for i, (x, y) in enumerate(points)]
    runs = [dict(name="base", eval=base)] + [dict(name=r["name"], curve=[dict(acc=0.5)] * 12) for r in rows]
    fig = arena.plot(plt, dict(runs=runs, arena=rows, budget=144))
    fig.canvas.draw()
    for a in fig.axes[:2]:
        boxes = [t.get_window_extent() for t in a.texts]
        assert len(boxes) == len(points)
        assert not any(b.overlaps(c) for i, b in enumerate(boxes) for c in boxes[i + 1:])
    plt.close(fig)

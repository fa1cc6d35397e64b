"""Advantages, per-token credit, the policy-gradient loss and its variants, packing under the cap."""
from dataclasses import replace
from types import SimpleNamespace

import torch

from bcr import advantages, pg_loss, pg_loss_fast, rollout, token_advantages
from data import EOS, build_tokenizer, heldout_problems, segments, solution
from reward import score
from test_sample import random_gpt


def cfg(**kw):
    base = dict(std_norm=True, token_mean=True, slot_credit=False, kl=0.0, lenpen=0.0, format_bonus=0.0, method="",
                update_dtype="fp32")
    return SimpleNamespace(**{**base, **kw})


def test_advantages_hand_computed():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]])  # (P=2, G=4)
    a = advantages(r, std_norm=False)
    assert torch.allclose(a, torch.tensor([[0.5, -0.5, -0.5, 0.5], [0, 0, 0, 0]]))
    s = advantages(r, std_norm=True, eps=0.0)[0]
    std = torch.tensor([1.0, 0, 0, 1]).std()  # unbiased, as torch.std: 0.5774
    assert torch.allclose(s, torch.tensor([0.5, -0.5, -0.5, 0.5]) / std)
    assert torch.equal(advantages(r)[1], torch.zeros(4))  # a zero-variance group teaches nothing
    # the variants agree in sign and order, and differ in scale exactly by the group std
    assert torch.equal(s.sign(), a[0].sign())


def fake_rewards(texts, problems, truncated=None):
    return [score(t, problems, tr) for t, tr in zip(texts, truncated or [False] * len(texts))]


P2 = [(47, "+", 85), (52, "-", 17)]


def test_shared_and_slot_credit():
    right = solution(P2[0], 1) + solution(P2[1], 2)
    wrong2 = solution(P2[0], 1) + "12-7=5 5-1-1=3 A2:99\n"
    rewards = fake_rewards([right, wrong2], P2)                    # one group of G=2
    n = torch.tensor([len(right) + 1, len(wrong2) + 1])
    shared, r = token_advantages(rewards, n, 2, 64, cfg(std_norm=False))
    assert torch.allclose(r, torch.tensor([1.0, 0.5]))
    assert torch.allclose(shared[0], torch.full((64,), 0.25)) and torch.allclose(shared[1], torch.full((64,), -0.25))
    slot, _ = token_advantages(rewards, n, 2, 64, cfg(std_norm=False, slot_credit=True))
    k1 = len(solution(P2[0], 1))
    # problem 1 was right in both samples: no credit either way on its tokens; problem 2 differs
    assert torch.equal(slot[:, :k1], torch.zeros(2, k1))
    assert torch.allclose(slot[0, k1:n[0]], torch.tensor(0.5)) and torch.allclose(slot[1, k1:n[1]], torch.tensor(-0.5))


def test_truncated_problem_scores_zero_and_keeps_earlier_credit():
    full = solution(P2[0], 1) + solution(P2[1], 2)
    cut = full[:len(solution(P2[0], 1)) + 6]
    r = fake_rewards([cut], P2, [True])[0]
    assert r.correct == [1.0, 0.0] and r.acc == 0.5 and r.truncated


def test_length_penalty_reward():
    rewards = fake_rewards([solution(P2[0], 1)] * 2, P2[:1])
    _, r = token_advantages(rewards, torch.tensor([20, 40]), 2, 80, cfg(lenpen=1.0))
    assert torch.allclose(r, torch.tensor([1 - 20 / 80, 1 - 40 / 80]))


def test_pg_loss_normalisation_and_gradient_direction():
    model = random_gpt(0)
    ids = [[5, 6, 7], [8, 9]]
    out = torch.tensor([[10, 11, EOS, 0], [12, EOS, 0, 0]])
    n = torch.tensor([3, 2])
    adv = torch.tensor([[1.0] * 4, [-1.0] * 4])
    loss_tok, st = pg_loss(model, ids, out, n, adv, 5.0, cfg())
    # hand check: token mean = -(sum of A*logp over the 5 completion tokens) / 5
    run = lambda row, n: model(torch.tensor([row]), segments(torch.tensor([row]), n))[0]  # noqa: E731
    logp = torch.log_softmax(run([5, 6, 7, 10, 11], 3), -1)
    lp0 = logp[2, 10] + logp[3, 11] + logp[4, EOS]
    logp1 = torch.log_softmax(run([8, 9, 12], 2), -1)
    lp1 = logp1[1, 12] + logp1[2, EOS]
    assert torch.allclose(loss_tok, -(lp0 - lp1) / 5, atol=1e-5)
    loss_seq, _ = pg_loss(model, ids, out, n, adv, 2.0, cfg(token_mean=False))
    assert torch.allclose(loss_seq, -(lp0 / 3 - lp1 / 2) / 2, atol=1e-5)
    assert st["entropy"] > 0
    # a step along -grad raises the log-prob of the positively rewarded completion
    loss_tok.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.05 * p.grad
    after = torch.log_softmax(run([5, 6, 7, 10, 11], 3), -1)
    assert after[2, 10] + after[3, 11] + after[4, EOS] > lp0


def test_the_fast_loss_is_the_textbook_loss():
    """pg_loss_fast leaves out rows with zero advantage and cuts the rest into length-sorted chunks
    (less padding): pg_loss's loss and gradient on the whole padded batch, to float rounding, for
    the token and the sequence mean and the KL term (which keeps every row: the same entropy too)."""
    model = random_gpt(0)
    ids = [[5, 6, 7], [8, 9], [7, 7, 5, 6], [4]]
    out = torch.tensor([[10, 11, EOS, 0, 0, 0, 0, 0], [12, 9, 9, 9, 9, 9, 9, EOS], [6, EOS, 0, 0, 0, 0, 0, 0],
                        [9, 8, 7, EOS, 0, 0, 0, 0]])
    n, adv = torch.tensor([3, 8, 2, 4]), torch.tensor([[1.0] * 8, [-1.0] * 8, [0.5] * 8, [0.0] * 8])
    for c in (cfg(), cfg(token_mean=False), cfg(kl=0.1)):
        model.zero_grad()
        loss, sums = pg_loss(model, ids, out, n, adv, 9.0, c, ref=random_gpt(1))
        loss.backward()
        want = loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])
        for max_pad in (1e9, 1.0):  # one chunk; every length its own chunk
            model.zero_grad()
            fast, st = pg_loss_fast(model, ids, out, n, adv, 9.0, c, ref=random_gpt(1), max_pad=max_pad)
            fast.backward()
            grad = torch.cat([p.grad.flatten() for p in model.parameters()])
            assert abs(fast.item() - want[0]) < 1e-6 and torch.allclose(grad, want[1], atol=1e-6)
            if c.kl:
                assert abs(st["entropy"] - (sums["entropy"] / sums["tokens"]).item()) < 1e-6
                assert abs(st["kl"] - (sums["kl"] / sums["weight"]).item()) < 1e-6


def test_bf16_update_agrees_with_fp32():
    """--update_dtype=bf16 (CPU autocast, attention kept in fp32, rows and length padded to a few
    shapes): the fp32 loss, gradient, entropy and KL to bf16's precision, and not bitwise them (it
    did run in bf16); the padding rows add nothing."""
    model = random_gpt(0)
    ids = [[5, 6, 7], [8, 9], [7, 7, 5, 6]]
    out = torch.tensor([[10, 11, EOS, 0], [12, 9, 9, EOS], [6, EOS, 0, 0]])
    n, adv = torch.tensor([3, 4, 2]), torch.tensor([[1.0] * 4, [-1.0] * 4, [0.5] * 4])
    got = {}
    for dtype in ("fp32", "bf16"):
        model.zero_grad()
        loss, st = pg_loss_fast(model, ids, out, n, adv, 9.0, cfg(update_dtype=dtype, kl=0.1), ref=random_gpt(1))
        loss.backward()
        got[dtype] = loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()]), st
    (l32, g32, s32), (l16, g16, s16) = got["fp32"], got["bf16"]
    assert abs(l16 - l32) < 0.02 * abs(l32) and all(abs(s16[k] - s32[k]) < 0.02 * abs(s32[k]) for k in s32)
    assert torch.nn.functional.cosine_similarity(g16, g32, 0) > 0.99 and not torch.equal(g16, g32)


def test_kl_term_is_zero_against_itself():
    model = random_gpt(0)
    ids, out, n, adv = [[5, 6]], torch.tensor([[7, EOS]]), torch.tensor([2]), torch.zeros(1, 2)
    loss, st = pg_loss_fast(model, ids, out, n, adv, 2.0, cfg(kl=0.1), ref=model)
    assert abs(st["kl"]) < 1e-6 and abs(loss.item()) < 1e-6


def test_rollout_packs_groups_and_respects_the_cap():
    tok = build_tokenizer()
    model = random_gpt(4)
    model.cfg.vocab_size = tok.get_vocab_size()
    groups = [[(1, "+", 2), (3, "+", 4), (5, "-", 1)], [(12, "+", 30), (9, "-", 9), (4, "+", 4)]]
    ids, out, n, rewards = rollout(model, tok, groups, G=3, cap=11, temperature=1.0,
                                   generator=torch.Generator().manual_seed(0))
    assert len(ids) == 6 and ids[0] == ids[2] and ids[3] == ids[5] and ids[0] != ids[3]
    assert out.shape == (6, 11) and (n <= 11).all()
    assert all(len(r.correct) == 3 for r in rewards)
    assert [r.truncated for r in rewards] == ((out == EOS).sum(1) == 0).tolist()


def test_truncation_model_matches_a_simulation():
    """report.truncation_model is exact for a model that solves each packed problem as it solves one alone:
    a hand case, then a Monte-Carlo replay of random (tokens, score) samples."""
    import random
    from report import truncation_model as predict
    pred = {r["N"]: r for r in predict([[21, 1.0]] * 4, 100, [1, 5, 6, 8])}  # 20 tokens a problem, C = 100
    assert pred[5]["acc"] == 1.0 and pred[6]["acc"] == 5 / 6 and pred[8]["tokens_per_problem"] == 100 / 8
    rng = random.Random(0)
    samples = [[rng.randint(10, 60), float(rng.random() < 0.8)] for _ in range(300)]
    pred = {r["N"]: r for r in predict(samples, 144, [2, 4, 6])}
    for N in (2, 4, 6):
        acc = tok = 0.0
        for _ in range(20000):
            used = 0
            for k, c in (rng.choice(samples) for _ in range(N)):
                used += k - 1
                acc += c * (used <= 144) / N
            tok += min(used + 1, 144) / N
        assert abs(acc / 20000 - pred[N]["acc"]) < 0.01 and abs(tok / 20000 - pred[N]["tokens_per_problem"]) < 0.3


def test_each_run_trains_on_its_own_batch():
    """BCR packs N problems under N*b; budget-aware BCR draws N per prompt under C; the controls one."""
    from bcr import rl_batch, sweep_budget, task
    c = SimpleNamespace(N=3, b=36, C=0, max_N=8, lenpen=1.0, prompts=64, max_digits=2, ops="+-")
    assert (task("bcr", c).cap, task("bcr", c).lenpen) == (108, 0.0)
    assert (task("lenpen", c).cap, task("lenpen", c).lenpen) == (sweep_budget(c), 1.0) == (144, 1.0)
    assert {len(g) for g in rl_batch("bcr", c, 1, 0)} == {3} and {len(g) for g in rl_batch("grpo", c, 1, 0)} == {1}
    mixed = rl_batch("adapt", c, 1, 0)
    assert len({len(g) for g in mixed}) >= 6 and max(map(len, mixed)) <= 8
    assert rl_batch("adapt", c, 1, 5) == rl_batch("adapt", c, 1, 5) != rl_batch("adapt", c, 2, 5)  # pure in (seed, step)
    # BCR's prompts are of one difficulty; budget-aware BCR mixes them, as the sweep does
    from data import columns
    assert all(len({columns(p) for p in g}) == 1 for g in rl_batch("bcr", c, 1, 0))
    assert any(len({columns(p) for p in g}) > 1 for g in mixed)


def test_the_default_sweep_covers_slack_binding_and_starved_budgets():
    """With the default flags, C/N runs from room for the verbose base's traces (N = 1) to less than
    the loop-free trace (largest N), through the BCR training budget b: the sweep can show whether a
    model adapts. Lengths from the base's own style on the eval problems (runaways aside)."""
    import random
    import train
    from bcr import sweep_budget
    cfg = train.parse_config([])
    C, Ns, probs = sweep_budget(cfg), [int(x) for x in cfg.eval_Ns.split(",")], heldout_problems(cfg)
    rng = random.Random(0)
    loop_free = sum(len(solution(p, 1)) + 1 for p in probs) / len(probs)
    stepped = replace(cfg, p_direct=0.0, p_runaway=0.0)
    verbose = sum(len(solution(p, 1, rng, stepped)) + 1 for p in probs) / len(probs)
    assert C / Ns[0] > 2 * verbose > verbose > cfg.b > loop_free > C / Ns[-1]
    assert any(C / N < verbose for N in Ns) and sum(C / N >= loop_free for N in Ns) >= 3


# ----------------------------------------------------------------------------- the arena's methods (#39)

def group(accs, lengths):
    """One group: its rewards (acc + a 0.1 format term) and what rl_step hands a method."""
    import torch
    rewards = [SimpleNamespace(acc=a) for a in accs]
    return torch.tensor(accs) + 0.1, rewards, torch.tensor(lengths), 144, len(accs)


def test_each_method_on_a_hand_computed_group_and_the_all_right_group():
    """The prediction rests on one fact per method: does a group whose samples are all right, of
    different lengths, get non-zero advantages? Kimi and ShorterBetter: yes (the shortcut); DLER,
    GFPO, Dr. GRPO and BCR: no."""
    import torch
    import arena
    from bcr import METHODS
    right = group([1.0, 1.0, 1.0, 1.0], [10, 20, 30, 40])
    for name in ("kimi", "shorterbetter"):
        adv, _ = METHODS[name](*right)
        assert adv[0] > 0 > adv[3], name  # the shortest right answer is pushed up, the longest down
    for name in ("dler", "gfpo", "drgrpo"):
        assert torch.all(METHODS[name](*right)[0] == 0), name
    assert arena.SHORTCUT == {"bcr": False, "cap": False, "kimi": True, "shorterbetter": True, "dler": False,
                              "gfpo": False, "drgrpo": False}
    mixed = group([1.0, 0.0, 1.0, 0.0], [10, 20, 30, 40])
    # Kimi: lambda = 0.5, 1/6, -1/6, -0.5; right answers get it, wrong ones min(0, lambda)
    _, shaped = METHODS["kimi"](*mixed)
    assert torch.allclose(shaped, torch.tensor([1.6, 0.1, 1.1 - 1 / 6, 0.1 - 0.5]))
    # ShorterBetter: SOL 10 (the shortest right); 2 * right - 0.001 * |len - 10|
    _, shaped = METHODS["shorterbetter"](*mixed)
    assert torch.allclose(shaped, torch.tensor([2.0, -0.01, 1.98, -0.03]))
    # DLER: centred in the group, scaled by the batch's std (here the group is the batch)
    adv, _ = METHODS["dler"](*mixed)
    assert torch.allclose(adv, (mixed[0] - 0.6) / (mixed[0].std() + 1e-4))
    # GFPO: the two shortest (10, 20) are kept and normalised between them; the rest weigh 0
    adv, _ = METHODS["gfpo"](*mixed)
    assert adv[2] == adv[3] == 0 and adv[0] > 0 > adv[1]
    # Dr. GRPO: mean-centred, no std; x tokens / (samples x cap) for a constant normaliser
    adv, _ = METHODS["drgrpo"](*mixed)
    assert torch.allclose(adv, (mixed[0] - 0.6) * 100 / (4 * 144))

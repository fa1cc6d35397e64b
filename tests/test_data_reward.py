"""Problems, traces, tokenizer and batches; the reward parser against adversarial strings."""
import random
import re
from types import SimpleNamespace

from hypothesis import given, settings, strategies as st

from data import (CHARS, EOS, PAD, build_tokenizer, encode, is_heldout, packed_prompts,
                  parse_problems, pretrain_batch, prompt, sample_problem, solution, steps)
from reward import score

CFG = SimpleNamespace(max_digits=3, ops="+-", max_N=8, p_loop=0.6, p_again=0.4, max_loops=4, p_direct=0.25, p_runaway=0.03,
                      base_seed=0,
                      pt_docs=24, pt_micro_tokens=2048, pt_max_pad=1.2, block_size=640, pt_steps=100, pt_grow_N=0.5, pt_concise=0.7)


def replay_steps(p):
    """Recompute the answer from the written steps alone: the trace must carry the whole algorithm."""
    digits = []
    for s in steps(p):
        lhs, r = s.split("=")
        digits.append(int(r) % 10)
    carry = int(steps(p)[-1].split("=")[1]) // 10 if p[1] == "+" else 0
    return int(str(carry) + "".join(map(str, digits[::-1])))


def test_traces_are_correct_arithmetic():
    rng = random.Random(0)
    for _ in range(3000):
        p = sample_problem(rng, 4, "+-", heldout=rng.random() < 0.5)
        a, op, b = p
        assert replay_steps(p) == (a + b if op == "+" else a - b) >= 0
        assert len(steps(p)) == max(len(str(a)), len(str(b)))  # one necessary step per column
    assert steps((602, "-", 58)) == ["12-8=4", "10-5-1=4", "6-0-1=5"]
    assert solution((47, "+", 85), 2) == "Q2:47+85 7+5=12 4+8+1=13 A2:132\n"
    assert solution((52, "-", 48), 1) == "Q1:52-48 12-8=4 5-4-1=0 A1:04\n"  # the column digits
    assert prompt([(9, "+", 13), (7, "-", 5)]) == "Q1:09+13\nQ2:7-5\n"  # operands aligned


def style(**kw):
    """The base's habits, loops only unless asked for more."""
    return SimpleNamespace(**{**dict(p_loop=0.0, p_again=0.0, max_loops=4, p_direct=0.0, p_runaway=0.0), **kw})


def test_loops_are_geometric_and_only_repeat_steps():
    rng = random.Random(1)
    loops = []
    for _ in range(4000):
        p = sample_problem(rng, 2, "+-")
        text = solution(p, 1, rng, style(p_loop=0.6, p_again=0.4))
        concise = solution(p, 1)
        assert text.replace("chk ", "").split() != concise.split() or "chk" not in text
        assert re.sub(r"chk \S+ ", "", text) == concise  # removing the loops gives the concise trace
        loops.append(text.count("chk") / len(steps(p)))
    mean = sum(loops) / len(loops)
    assert 0.9 < mean < 1.05  # 0.6 * (1 + 0.4 + 0.16 + 0.064) = 0.97 loops per step


def test_direct_answers_and_runaways_at_their_stated_rates():
    """The short, risky strategy: some problems are answered with no steps at all, the same answer
    string as the stepped trace's; and rare runaway loops far past max_loops, in verbose traces only."""
    rng, n, direct, runaway = random.Random(4), 6000, 0, 0
    for _ in range(n):
        p = sample_problem(rng, 3, "+-")
        text = solution(p, 1, rng, style(p_loop=0.6, p_again=0.4, p_direct=0.25, p_runaway=0.03))
        concise = solution(p, 1)
        assert text.split()[-1] == concise.split()[-1] and score(text, [p]).correct == [1.0]  # right either way
        if text == f"Q1:{concise.split()[0][3:]} {concise.split()[-1]}\n":
            direct += 1
            assert score(text, [p]).direct == [True]
        else:
            assert re.sub(r"chk \S+ ", "", text) == concise and score(text, [p]).direct == [False]
        runaway += re.search(r"(chk \S+ )\1{4}", text) is not None  # more re-checks in a row than max_loops
    assert abs(direct / n - 0.25) < 0.02
    assert 0.01 < runaway / n < 0.025  # 3% of the stepped 75%, of which 0.9**3 go past max_loops: 1.6%
    quiet = [solution(sample_problem(rng, 2, "+-"), 1, rng, style(p_runaway=1.0), loops=False) for _ in range(200)]
    assert not any("chk" in t for t in quiet)  # concise documents never loop, not even a runaway


def test_heldout_split_is_disjoint_and_about_a_tenth():
    rng = random.Random(2)
    train = {sample_problem(rng, 2, "+-") for _ in range(3000)}
    held = {sample_problem(rng, 2, "+-", heldout=True) for _ in range(300)}
    assert not train & held and all(is_heldout(p) for p in held)
    every = [(a, op, b) for a in range(100) for b in range(100) for op in "+-" if op == "+" or a >= b]
    assert 0.08 < sum(map(is_heldout, every)) / len(every) < 0.12


def test_stratified_prompts_share_a_difficulty():
    rng = random.Random(3)
    for group in packed_prompts(rng, CFG, 50, 4):
        assert len({max(len(str(a)), len(str(b))) for a, _, b in group}) == 1


def test_tokenizer_round_trips_one_token_per_char():
    tok = build_tokenizer()
    text = prompt([(47, "+", 85), (602, "-", 58)]) + solution((47, "+", 85), 1, random.Random(0), style(p_loop=1, p_again=0.5))
    ids = encode(tok, [text])[0]
    assert len(ids) == len(text) and tok.decode(ids) == text
    assert tok.decode([*ids, EOS, PAD]) == text  # specials are dropped on decode
    assert len(set(CHARS)) == len(CHARS) == tok.get_vocab_size() - 2
    try:
        encode(tok, ["Q1:4*5\n"])
        assert False, "a character outside the vocabulary must be refused"
    except ValueError as e:
        assert "'*'" in str(e)


def test_parse_problems_cli_syntax():
    assert parse_problems(" 47+85, 602 - 58;3+4") == [(47, "+", 85), (602, "-", 58), (3, "+", 4)]
    assert parse_problems("1\t+2,\n3-1\n") == [(1, "+", 2), (3, "-", 1)]  # any whitespace
    for bad in ["47*85", "4-9", "", "abc", "1+", "٣+4"]:
        try:
            parse_problems(bad)
            assert False, bad
        except ValueError:
            pass


def test_pretrain_batch_masks_prompt_and_is_a_function_of_step():
    tok = build_tokenizer()
    micro, n_targets = pretrain_batch(tok, CFG, step=85)  # late: N up to 8, all verbose
    again, _ = pretrain_batch(tok, CFG, step=85)
    assert all(all((a == b).all() for a, b in zip(m1, m2)) for m1, m2 in zip(micro, again))
    assert n_targets == sum(int((t >= 0).sum()) for *_, t in micro)
    real = sum(int((x != PAD).sum()) for x, *_ in micro)
    assert real / sum(x.numel() for x, *_ in micro) > 0.85  # length bucketing keeps padding small
    for x, seg, t in micro:
        for row_x, row_s, row_t in zip(x.tolist(), seg.tolist(), t.tolist()):
            text = tok.decode(row_x)
            first = row_t.index(next(v for v in row_t if v >= 0))
            # the first target is the first completion token: everything before is the prompt
            assert text[:first + 1].endswith("\n") and "A" not in text[:first + 1]
            assert text[first + 1:].startswith("Q1:")  # the completion opens by restating problem 1
            assert row_t[first:].count(EOS) == 1
            # segments: prompt line k and solution k share index k
            n = text[:first + 1].count("\n")
            assert row_s[0] == 1 and row_s[first] == n and row_s[first + 1] == 1
            k2 = text.index("Q2:", first + 1) if n > 1 else None
            assert k2 is None or (row_s[k2] == 2 and row_s[k2 - 1] == 1)
    # two processes see disjoint halves of the same global batch
    halves = [pretrain_batch(tok, CFG, 85, r, 2) for r in (0, 1)]
    assert sum(int((t >= 0).sum()) for h, _ in halves for *_, t in h) == n_targets


PROBS = [(47, "+", 85), (52, "-", 17), (9, "+", 3)]


def test_score_rules():
    full = "".join(solution(p, k, random.Random(k), style(p_loop=1, p_again=0.5)) for k, p in enumerate(PROBS, 1))
    r = score(full, PROBS)
    assert r.correct == [1.0, 1.0, 1.0] and r.format_ok and r.loops >= 3 and r.steps == 2 + 2 + 1
    assert r.spans[-1] == (len(full), len(full) + 1, 2)  # <eos> belongs to the last problem
    cut = full[:full.index("A3:") + 4]  # the cap hit inside the last answer: "A3:1" is no answer
    r = score(cut, PROBS, truncated=True)
    assert r.correct == [1.0, 1.0, 0.0] and r.answers[2] is None and r.truncated
    assert score("A2:35\nA1:132\nA3:12\n", PROBS).correct == [1, 1, 1]  # by label, any order...
    assert not score("A2:35\nA1:132\nA3:12\n", PROBS).format_ok          # ...but not well formed
    assert score("A1:5\nA1:132\n", PROBS).correct[0] == 0.0  # the first answer counts: no hedging
    assert score("A1:0132\nA2:+35\nA3:-12\n", PROBS).correct == [1.0, 0.0, 0.0]  # leading zeros ok
    assert score("A9:1\nA0:1\nA-1:3\n", PROBS).correct == [0.0] * 3
    assert score("A1:" + "9" * 50000 + "\n", PROBS).answers[0] is None  # no int() overflow error
    assert score("", PROBS).spans == [(0, 1, 0)]


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from(list(CHARS) + ["A1:", "A2:", "A3:", "A12:", "chk ", "=", "é", "\x00"]),
                max_size=80), st.booleans())
def test_score_never_raises_on_vocabulary_soup(parts, truncated):
    text = "".join(parts)
    r = score(text, PROBS, truncated)
    assert len(r.correct) == len(r.answers) == 3 and r.loops >= 0 and r.steps >= 0
    covered = [i for s, e, _ in r.spans for i in range(s, e)]
    assert covered == list(range(len(text) + 1)) and all(0 <= k < 3 for *_, k in r.spans)


@settings(max_examples=2000, deadline=None)
@given(st.text(max_size=300), st.integers(1, 9))
def test_score_never_raises_on_any_unicode(text, n):
    r = score(text, PROBS[:1] * n)
    assert len(r.correct) == n and 0.0 <= r.acc <= 1.0

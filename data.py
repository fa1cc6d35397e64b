"""
Synthetic arithmetic for nanoBCR: problems, verbose step-by-step traces, the tokenizer, packing.

A packed prompt holds N problems, one per line; the completion solves them in order, one
necessary step per digit column (right to left, carries and borrows explicit), then a labelled
answer. The base's style (solution) adds three habits: redundant re-check loops after a step
("chk <step>", repeated a geometric number of times: the toy's "wait, let me check again"), rare
runaway loops (a degenerate trace), and direct answers with no steps at all ("Q1:47+85 A1:132"):
the shorter, riskier strategy, reliable on one column, error-prone on carried ones. So there is a
real trade-off to learn: the loops are pure waste, but the steps are not.

    prompt      Q1:47+85          completion   Q1:47+85 7+5=12 chk 7+5=12 4+8+1=13 A1:132
                Q2:52-17                       Q2:52-17 12-7=5 5-1-1=3 A2:35
                Q3:09+03                       Q3:09+03 9+3=12 0+0+1=1 A3:12
                                               <eos>

Each solution first restates its problem (copying line k of the prompt is an easy, local habit for
a tiny model; the steps then read their digits nearby). Operands share one digit count, columns
aligned as on paper; the answer is the carry and the column digits as the steps wrote them ("04"
for 52-48; answers compare as integers). Subtraction keeps results non-negative; a borrow is written
"12-7=5" and paid back in the next column, "5-1-1=3". The tokenizer is character level, so a
character offset is a token offset (reward.py relies on it for per-slot credit).
"""
import random
import zlib

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

SPECIALS = ["<pad>", "<eos>"]
CHARS = "0123456789+-=: \nAQchk"
PAD, EOS = 0, 1
NEWLINE = len(SPECIALS) + CHARS.index("\n")

# ----------------------------------------------------------------------------- problems

def answer(p):
    a, op, b = p
    return a + b if op == "+" else a - b

def columns(p):
    """Digit columns of a problem: its difficulty, and the number of necessary steps."""
    return max(len(str(p[0])), len(str(p[2])))

def is_heldout(p):
    """1 problem in 10, by a stable hash of the problem: train and eval disjoint whatever the seed."""
    return zlib.crc32(f"{p[0]}{p[1]}{p[2]}".encode()) % 10 == 0

def sample_problem(rng, max_digits, ops, heldout=False, cols=None):
    """A random problem from one split: each operand gets 1..max_digits digits (uniform), then a
    uniform number of that many digits. cols, if given, fixes the difficulty (stratified groups)."""
    while True:
        a, b = (rng.randrange(10 ** (d - 1) if d > 1 else 0, 10 ** d)
                for d in (rng.randint(1, max_digits), rng.randint(1, max_digits)))
        op = rng.choice(ops)
        if op == "-" and a < b:
            a, b = b, a
        p = (a, op, b)
        if is_heldout(p) == heldout and (cols is None or columns(p) == cols):
            return p

def heldout_problems(cfg):
    """The evaluation problems: cfg.eval_problems of the held-out split, drawn from cfg.eval_seed."""
    rng = random.Random(cfg.eval_seed)
    return [sample_problem(rng, cfg.max_digits, cfg.ops, heldout=True) for _ in range(cfg.eval_problems)]

def line(p):
    """'47+85', '09+13': both operands padded to the problem's column count."""
    n = columns(p)
    return f"{p[0]:0{n}d}{p[1]}{p[2]:0{n}d}"

def steps(p):
    """The necessary steps, one per column, right to left, e.g. 47+85 -> ['7+5=12', '4+8+1=13']."""
    a, op, b = p
    n = columns(p)
    da, db = str(a).zfill(n)[::-1], str(b).zfill(n)[::-1]
    out, carry = [], 0
    for x, y in zip(map(int, da), map(int, db)):
        c = f"{op}1" if carry else ""
        if op == "+":
            s = x + y + carry
            out.append(f"{x}+{y}{c}={s}")
            carry = s // 10
        else:
            borrow = int(x - y - carry < 0)
            out.append(f"{x + 10 * borrow}-{y}{c}={x + 10 * borrow - y - carry}")
            carry = borrow
    return out

def solution(p, k, rng=None, style=None, loops=True):
    """Problem k's part of the completion: restatement, steps, answer; without rng the concise trace.
    With rng and a style (the base's knobs, train.Config), three habits of the base: direct answers
    (p_direct: no steps, "Q1:47+85 A1:132", short and risky on carried columns); re-check loops (if
    loops: after a step, p_loop, "chk <step>" repeated while a p_again coin comes up, at most
    max_loops times); a runaway (p_runaway: one step re-checked while a 0.9 coin comes up, up to 10 x
    max_loops: the toy's degenerate trace, long enough to hit a budget alone)."""
    out, direct = [], rng is not None and rng.random() < style.p_direct
    runaway = rng is not None and loops and not direct and rng.random() < style.p_runaway
    for i, s in enumerate([] if direct else steps(p)):
        out.append(s)
        if runaway and i == 0:
            n = 1
            while n < 10 * style.max_loops and rng.random() < 0.9:
                n += 1
            out += [f"chk {s}"] * n
        elif loops and rng is not None and rng.random() < style.p_loop:
            n = 1
            while n < style.max_loops and rng.random() < style.p_again:
                n += 1
            out += [f"chk {s}"] * n
    digits = "".join(s.split("=")[1][-1] for s in steps(p))[::-1]  # the column digits, left to right
    carry = "1" if p[1] == "+" and answer(p) >= 10 ** columns(p) else ""
    return f"Q{k}:{line(p)} " + "".join(x + " " for x in out) + f"A{k}:{carry}{digits}\n"

def prompt(problems):
    return "".join(f"Q{k}:{line(p)}\n" for k, p in enumerate(problems, 1))

def parse_problems(text):
    """'47+85, 602-58' -> [(47, '+', 85), (602, '-', 58)] for the sample.py CLI."""
    out = []
    for part in text.replace(";", ",").split(","):
        s = "".join(part.split())  # any whitespace
        op = "+" if "+" in s else "-"
        a, _, b = s.partition(op)
        if not (a.isdigit() and b.isdigit() and a.isascii() and b.isascii() and max(len(a), len(b)) <= 18):
            raise ValueError(f"cannot read problem {s[:40]!r}: expected e.g. 47+85 or 602-58 (<= 18 digits)")
        if op == "-" and int(a) < int(b):
            raise ValueError(f"problem {s!r} has a negative result, which the format cannot write")
        out.append((int(a), op, int(b)))
    return out

# ----------------------------------------------------------------------------- tokenizer

def build_tokenizer():
    """Character-level tokenizer from the `tokenizers` library: every character one token."""
    vocab = {t: i for i, t in enumerate(SPECIALS + list(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    return tok

def encode(tok, texts):
    """Token ids of each text; a character outside the vocabulary is refused, not mapped to <pad>."""
    bad = sorted(set("".join(texts)) - set(CHARS))
    if bad:
        raise ValueError(f"characters outside the vocabulary: {''.join(bad)!r}")
    return [e.ids for e in tok.encode_batch(texts)]

def segments(idx, n_prompt):
    """Problem index of every token, (B, T) from idx (B, T): line k of the prompt and solution k
    of the completion are both segment k (1-based); the prompt is the first n_prompt tokens (an
    int, or a (B,) tensor, one per row). model.py says why the model gets it."""
    nl = (idx == NEWLINE).long()
    before = nl.cumsum(1) - nl                                                # newlines before
    n_prompt = torch.as_tensor(n_prompt, device=idx.device).view(-1, 1)              # (B or 1, 1)
    completion = torch.arange(idx.shape[1], device=idx.device) >= n_prompt
    return 1 + before - completion * (nl * ~completion).sum(1, keepdim=True)  # (B, T)

# ----------------------------------------------------------------------------- batches

def doc_rng(seed, step, i=0):
    """Item i's generator: batches are pure functions of (seed, step), so resumes repeat them."""
    return random.Random(f"{seed}/{step}/{i}")

def pretrain_doc(rng, cfg, max_N, verbose):
    """One pretraining document: N training problems, P(N) proportional to 1/N so that every N
    gets about the same share of tokens (uniform N spends most of them on long documents, where
    finding the right problem is hardest, and learns much slower). Verbose documents carry the
    re-check loops whatever N is: the base is not budget-aware."""
    n = rng.choices(range(1, max_N + 1), [1 / n for n in range(1, max_N + 1)])[0]
    probs = [sample_problem(rng, cfg.max_digits, cfg.ops) for _ in range(n)]
    sol = "".join(solution(p, k, rng, cfg, verbose) for k, p in enumerate(probs, 1))
    return prompt(probs), sol

def pretrain_batch(tok, cfg, step, rank=0, world=1):
    """(idx, seg, targets) for one step, each (B, T): cfg.pt_docs documents, sorted by length so that
    right-padding wastes little, split into micro-batches of about cfg.pt_micro_tokens tokens.
    This rank takes every world-th document. targets are -1 on prompt and pad positions: the loss
    is only on the completion (the minGPT adder's trick). Returns a list of micro-batches and the
    number of target tokens in the whole global batch (the loss normaliser)."""
    # Two curricula. The largest N grows from 2 to max_N over the first pt_grow_N of the steps:
    # finding problem k among many is the slow part, learned faster when met gradually than at
    # once. And until pt_concise of the steps only a quarter of the documents are verbose (concise
    # ones cost fewer tokens per problem, so the arithmetic is learned faster); after it all are,
    # as the paper's bases are capable models distilled on verbose long-CoT traces.
    grow = (cfg.max_N - 2) * step / max(1.0, cfg.pt_grow_N * cfg.pt_steps)
    p_verbose = 1.0 if step >= cfg.pt_concise * cfg.pt_steps else 0.25
    rng = doc_rng(cfg.base_seed, step)
    docs = [pretrain_doc(rng, cfg, min(cfg.max_N, 2 + int(grow)), rng.random() < p_verbose)
            for _ in range(cfg.pt_docs)]
    ids = encode(tok, [p + s for p, s in docs])
    rows = sorted(((x + [EOS], len(p)) for x, (p, s) in zip(ids, docs) if len(x) < cfg.block_size),
                  key=lambda r: len(r[0]))
    n_targets = sum(len(x) - n for x, n in rows)
    micro, out = [], []
    for r in rows[rank::world] + [None]:  # ascending length: the newest row sets the padded width
        # cut when the micro-batch would exceed its token budget or pad its rows by over pt_max_pad
        if micro and (r is None or (len(micro) + 1) * len(r[0]) > cfg.pt_micro_tokens
                      or len(r[0]) > cfg.pt_max_pad * len(micro[0][0])):
            T = len(micro[-1][0]) - 1
            idx = torch.full((len(micro), T), PAD)  # (b, T)
            tgt = torch.full((len(micro), T), -1)   # (b, T)
            for j, (x, n) in enumerate(micro):
                x = torch.tensor(x)
                idx[j, :len(x) - 1] = x[:-1]
                tgt[j, n - 1:len(x) - 1] = x[n:]  # predict every completion token, EOS included
            out.append((idx, segments(idx, torch.tensor([n for _, n in micro])), tgt))
            micro = []
        micro.append(r)
    return out, n_targets

def packed_prompts(rng, cfg, n, N, heldout=False, stratified=True):
    """n packed prompts of N problems; stratified: of one column count, as the paper's groups are."""
    out = []
    for _ in range(n):
        cols = rng.randint(1, cfg.max_digits) if stratified else None
        out.append([sample_problem(rng, cfg.max_digits, cfg.ops, heldout, cols) for _ in range(N)])
    return out

"""
Score a packed completion: split it into per-problem answers by their labels, mark each problem
right or wrong, count re-check loops and necessary steps, and note which problems were answered
directly (no step written: the short, risky strategy). No length term: a problem that the
token cap cut off before its answer line simply has no answer and scores 0, and the problems
answered before the cap keep their credit (the paper's hard budget).

Rules, chosen so that no string can raise and no trick pays:
- an answer is "A<k>:<integer>" ended by a newline; a cut-off last line is not an answer;
- problem k takes the *first* answer labelled k (a second one cannot hedge), labels outside 1..N
  are ignored; out-of-order or duplicate labels still score but clear format_ok;
- integers compare by value ("007" is 7); more than 30 digits is no answer (Python refuses to
  parse very long integers, and no problem here has such an answer).
"""
import re
from dataclasses import dataclass

from data import answer

ANSWER = re.compile(r"A(\d{1,4}):(-?\d+)\n")
STEP = re.compile(r"(?<!\d)\d+[+-]\d+(?:[+-]1)?=\d+")   # one column of work, e.g. 4+8+1=13
LOOP = re.compile(r"chk (?<!\d)\d+[+-]\d+(?:[+-]1)?=\d+")  # the same step, re-checked

@dataclass
class Reward:
    correct: list    # (N,) 1.0 where problem k's answer is right, else 0.0
    answers: list    # (N,) the parsed integer answers, None where a problem got none
    spans: list      # (start, end, k): chars start..end-1 are the work towards problem k (0-based);
                     # they cover the text and the <eos> slot after it, for per-slot credit
    loops: int       # re-check loops in the whole completion
    steps: int       # necessary steps (step patterns that are not re-checks)
    direct: list     # (N,) True where problem k was answered with no step written for it
    format_ok: bool  # exactly N answers, labelled 1..N, in order, then <eos> (not cut by the cap)
    truncated: bool  # the cap cut the completion before <eos>

    @property
    def acc(self):
        return sum(self.correct) / len(self.correct)

def score(text, problems, truncated=False):
    N = len(problems)
    answers, labels, spans, start, direct = [None] * N, [], [], 0, [False] * N
    for m in ANSWER.finditer(text):
        k = int(m.group(1)) - 1
        if not 0 <= k < N:
            continue
        labels.append(k)
        digits = m.group(2).lstrip("-")
        if answers[k] is None and len(digits) <= 30:
            answers[k], direct[k] = int(m.group(2)), not STEP.search(text, start, m.start())
        spans.append((start, m.end(), k))
        start = m.end()
    # what follows the last answer is work towards the next problem (or just <eos> when all done)
    spans.append((start, len(text) + 1, min(labels[-1] + 1, N - 1) if labels else 0))
    correct = [float(a is not None and a == answer(p)) for a, p in zip(answers, problems)]
    loops = len(LOOP.findall(text))
    return Reward(correct, answers, spans, loops, len(STEP.findall(text)) - loops, direct,
                  labels == list(range(N)) and not truncated, truncated)

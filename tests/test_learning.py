"""From nothing, in seconds on a CPU: a tiny model learns the traces, and BCR then moves it the
right way (higher reward, fewer loops, less truncation under the cap)."""
import json

import pytest

from test_train import run

SMALL = ["--n_layer=2", "--n_embd=64", "--n_head=4", "--block_size=160", "--max_digits=1", "--max_N=3",
         "--pt_steps=1000", "--pt_docs=16", "--warmup=20", "--pt_lr=3e-3", "--N=2", "--b=24", "--C=48",
         "--rl_steps=30", "--rl_lr=3e-4", "--eval_Ns=1,2"]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("small")
    assert run(SMALL + [f"--out_dir={out}", "--stage=pretrain"]) == 0
    return out


def log(path):
    return [json.loads(x) for x in open(path)]


def mean(rows, key):
    return sum(r[key] for r in rows) / len(rows)


def test_a_tiny_model_learns_in_seconds(small):
    rows = log(small / "base.jsonl")
    assert mean(rows[:5], "loss") > 2.5  # chance level over 23 tokens is ln 23 = 3.1
    assert mean(rows[-50:], "loss") < 0.3


def test_bcr_steps_move_the_reward_the_right_way(small):
    assert run(SMALL + [f"--out_dir={small}", "--stage=bcr"]) == 0
    rows = log(small / "bcr-s1.jsonl")
    first, last = rows[:5], rows[-5:]  # cap 2 x 24 tokens: the verbose base overruns it
    assert mean(last, "reward") > mean(first, "reward") + 0.15
    assert mean(last, "truncated") < 0.5 * mean(first, "truncated")
    assert mean(last, "loops") < 0.5 * mean(first, "loops")

"""train.py end to end on a tiny config: stages, exact resume, atomic saves, refusals, bad input."""
import builtins
import errno
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import arena
import bcr
import checkpoint
import model
import proc
import sample
import train

TINY = ["--n_layer=1", "--n_embd=32", "--n_head=2", "--block_size=160", "--max_digits=1", "--max_N=3",
        "--pt_steps=8", "--pt_docs=8", "--warmup=2", "--N=2", "--b=24", "--C=48", "--G=4", "--prompts=2",
        "--rl_steps=4", "--eval_problems=8", "--eval_Ns=1,2", "--eval_batch=8", "--save_every=3"]


def run(argv):
    """train.main in-process; returns the exit code (0 when it returns normally)."""
    try:
        train.main(argv)
    except SystemExit as e:
        return e.code
    return 0


def weights(folder):
    return load_file(f"{folder}/model.safetensors")


def digest(folder):
    return {f: hashlib.sha256(open(f"{folder}/{f}", "rb").read()).hexdigest() for f in sorted(os.listdir(folder))}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny base, pretrained once for the module."""
    out = tmp_path_factory.mktemp("tiny")
    assert run(TINY + [f"--out_dir={out}", "--stage=pretrain"]) == 0
    return out


def interrupt_at(monkeypatch, module, name, step):
    """Make module.name raise KeyboardInterrupt when asked for `step`: a kill mid-stage."""
    real = getattr(module, name)

    def wrapped(*args):
        if step in args:
            raise KeyboardInterrupt
        return real(*args)
    monkeypatch.setattr(module, name, wrapped)


def test_pretrain_resume_is_bitwise_identical(tmp_path, monkeypatch, tiny, capsys):
    with monkeypatch.context() as m:
        interrupt_at(m, train, "pretrain_batch", 5)  # checkpoint at step 3, killed in step 5
        assert run(TINY + [f"--out_dir={tmp_path}", "--stage=pretrain"]) == 130  # Ctrl-C: one line, exit 130
    assert run(TINY + [f"--out_dir={tmp_path}", "--stage=pretrain"]) == 2  # unfinished: needs --resume
    resume = TINY + [f"--out_dir={tmp_path}", "--stage=pretrain", "--resume"]
    # broken files are refused in one line and left as they are
    state, log = tmp_path / "base" / "state.pt", tmp_path / "base.jsonl"
    good_state, good_log = state.read_bytes(), log.read_text()
    state.write_bytes(b"")
    before = digest(tmp_path / "base")
    assert run(resume) == 2 and digest(tmp_path / "base") == before
    state.write_bytes(good_state)
    lines = good_log.splitlines(keepends=True)
    log.write_text(lines[0] + "{broken\n" + "".join(lines[1:]))  # a corrupt line inside the log
    assert run(resume) == 2 and log.read_text() == lines[0] + "{broken\n" + "".join(lines[1:])
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert "state.pt" in err[-2] and "line 2 is corrupt" in err[-1], err
    log.write_text(good_log + '{"step": 5, "lo')  # a last line cut by a kill mid-write: dropped
    assert run(resume) == 0
    a, b = weights(tmp_path / "base"), weights(tiny / "base")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [int(x.split('"step": ')[1].split(",")[0]) for x in open(tmp_path / "base.jsonl")]
    assert steps == list(range(8))  # the log reads as one run


def test_rl_resume_is_bitwise_identical(tmp_path, monkeypatch, tiny):
    """The length-penalty stage runs the same RL loop as BCR; its reward varies with length even
    for this 8-step base, so every step really updates the weights."""
    os.symlink(tiny / "base", tmp_path / "base")
    full = tmp_path / "full"
    full.mkdir()
    os.symlink(tiny / "base", full / "base")
    assert run(TINY + [f"--out_dir={full}", "--stage=lenpen"]) == 0
    with monkeypatch.context() as m:
        interrupt_at(m, bcr, "doc_rng", 3)  # checkpoint at step 3, killed in step 3
        assert run(TINY + [f"--out_dir={tmp_path}", "--stage=lenpen"]) == 130
    assert run(TINY + [f"--out_dir={tmp_path}", "--stage=lenpen", "--resume"]) == 0
    a, b = weights(tmp_path / "lenpen-s1"), weights(full / "lenpen-s1")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], weights(tiny / "base")[k]) for k in a)  # RL did change it


def test_finished_stage_is_reused_and_a_changed_config_refused(tiny, capsys):
    before = digest(tiny / "base")
    assert run(TINY + [f"--out_dir={tiny}", "--stage=pretrain"]) == 0  # reused: nothing rewritten
    assert digest(tiny / "base") == before
    assert run(TINY + [f"--out_dir={tiny}", "--stage=pretrain", "--pt_lr=0.01", "--max_loops=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pt_lr" in err and "max_loops" in err
    assert digest(tiny / "base") == before


def test_a_checkpoint_without_a_key_of_today_is_refused(tiny, tmp_path):
    """A checkpoint saved before a flag existed cannot say what it was made with: refused, named."""
    import shutil
    shutil.copytree(tiny / "base", tmp_path / "base")
    meta = json.loads((tmp_path / "base" / "config.json").read_text())
    del meta["train"]["p_direct"]
    (tmp_path / "base" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="p_direct: None there"):
        checkpoint.checked(tmp_path / "base", train.parse_config(TINY), train.BASE_KEYS, 8)


def test_fewer_bigger_micro_batches_train_the_same(tiny, tmp_path):
    """--pt_max_pad (more padding allowed, fewer micro-batches: for GPUs, where each one costs kernel
    launches) changes only how the same rows are grouped: the same losses up to float rounding."""
    assert run(TINY + [f"--out_dir={tmp_path}", "--stage=pretrain", "--pt_max_pad=100"]) == 0
    logs = [[json.loads(x) for x in open(f"{d}/base.jsonl")] for d in (tiny, tmp_path)]
    assert sum(r["micro_batches"] for r in logs[1]) < sum(r["micro_batches"] for r in logs[0])
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(*logs)) < 1e-5


@pytest.mark.parametrize("cut", [1, 2])
def test_atomic_save_survives_a_kill_during_the_swap(tmp_path, monkeypatch, tiny, cut):
    import shutil
    shutil.copytree(tiny / "base", tmp_path / "base")
    net, tok, meta = checkpoint.load(tmp_path / "base")
    calls = []
    real = os.replace

    def dying_replace(a, b):
        calls.append(a)
        if len(calls) == cut:
            raise KeyboardInterrupt  # killed after the temporary write, at the cut-th rename
        real(a, b)
    monkeypatch.setattr(os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(str(tmp_path / "base"), net, tok, {"step": 99}, {})
    monkeypatch.setattr(os, "replace", real)
    checkpoint.recover(str(tmp_path / "base"))
    _, _, again = checkpoint.load(tmp_path / "base")
    assert again["step"] == meta["step"] == 8  # the old checkpoint, whole and loadable


def test_orthogonalize_flattens_the_spectrum():
    """Muon's Newton-Schulz step: a tall or wide matrix of any scale comes out with its singular
    values near 1 (the quintic trades exactness for speed: about 0.7-1.2, not exactly 1). Five
    iterations lift singular values down to about 1e-2 of the largest; much smaller ones stay small."""
    g = torch.Generator().manual_seed(0)
    for shape in ((384, 128), (128, 512)):
        G = torch.randn(shape, generator=g) * torch.logspace(-2, 0, shape[1]) * 1e3
        s = torch.linalg.svdvals(model.orthogonalize(G))
        assert s.min() > 0.5 and s.max() < 1.3, (shape, s.min(), s.max())
        assert torch.linalg.svdvals(G).max() / torch.linalg.svdvals(G).min() > 10


def test_muon_only_on_the_blocks_matrices():
    net = model.GPT(model.GPTConfig(23, 64, 2, 2, 32))
    opt = model.new_optimizer(net, 1e-3, muon_lr=0.02)
    muon = {id(p) for g in opt.param_groups if g.get("muon") for p in g["params"]}
    names = {n for n, p in net.named_parameters() if id(p) in muon}
    assert names == {n for n, p in net.named_parameters() if n.startswith("blocks.") and p.ndim == 2}
    assert "wte.weight" not in names and len(names) == 2 * 4
    train.set_lr(opt, 5, 10, 1e-3, 0, cosine=False)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.02, 1e-3])


def test_nan_stops_the_stage_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    real = train.F.cross_entropy
    calls = []

    def poisoned(*a, **k):
        calls.append(1)
        return real(*a, **k) * (float("nan") if len(calls) > 12 else 1.0)
    monkeypatch.setattr(train.F, "cross_entropy", poisoned)
    assert run(TINY + [f"--out_dir={tmp_path}", "--stage=pretrain"]) == 2
    err = capsys.readouterr().err.strip()  # the progress bar's lines, then the one-line error
    assert err.splitlines()[-1].startswith("error: non-finite") and "Traceback" not in err
    _, _, meta = checkpoint.load(tmp_path / "base")
    assert meta["step"] in (3, 6) and not meta["done"]


def test_full_pipeline_writes_the_report(tiny, tmp_path):
    out = tmp_path / "all"
    out.mkdir()
    os.symlink(tiny / "base", out / "base")
    assert run(TINY + [f"--out_dir={out}"]) == 0
    rep = json.load(open(out / "report.json"))
    assert {r["name"] for r in rep["runs"]} == {"base", "bcr", "grpo", "lenpen"}
    assert set(rep["findings"]) == {"free_lunch", "scaling_law", "loops_vanish", "length_penalty", "beyond"}
    assert all(isinstance(v["reproduced"], bool) and v["paper"] and v["rule"] for k, v in rep["findings"].items()
               if k != "beyond")
    assert 10 < rep["concise_tokens_per_problem"] < 40  # 'Q1:47+85 7+5=12 4+8+1=13 A1:132' is 32
    C = rep["runs"][0]["eval"][0]["budget"]
    assert all(r["budget"] == C for run in rep["runs"] for r in run["eval"])
    row = rep["runs"][1]["eval"][0]
    assert row["problems"] >= 8 and len(row["acc_by_slot"]) == row["N"] and 0 <= row["acc"] <= 1
    n, acc = row["problems"], row["acc"]  # N = 1: the binomial standard error of one evaluation
    assert row["N"] == 1 and abs(row["acc_se"] - (acc * (1 - acc) / (n - 1)) ** 0.5) < 1e-6
    md = (out / "report.md").read_text()  # the findings, then mean (min, max) over seeds per model, then every row
    assert md.startswith("# nanoBCR report") and all(f"| {n} | " in md for n in ("base", "bcr", "grpo", "lenpen"))
    assert "\n|---|---|---|---|---|\n" in md and "oracle" in md  # a well-formed claims table; the sweep's lines
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"  # matplotlib is in the test requirements


def test_ablations_command(tiny, tmp_path):
    """--stage=ablations: every variant trained on the same base and evaluated, a table with one row each."""
    os.symlink(tiny / "base", tmp_path / "base")
    assert run(TINY + [f"--out_dir={tmp_path}", "--stage=ablations", "--rl_steps=2"]) == 0
    rep = json.load(open(tmp_path / "ablations.json"))
    names = {e["name"] for e in rep["runs"]}
    assert names == {"base", "bcr"} | set(train.ABLATIONS)
    for e in rep["runs"]:
        if e["name"] in train.ABLATIONS:  # each trained with its own flags, evaluated on the shared sweep
            meta = json.load(open(tmp_path / f"abl-{e['name']}-s1" / "config.json"))["train"]
            assert all(meta[k] == v for k, v in train.ABLATIONS[e["name"]][1].items())
            assert [r["N"] for r in e["eval"]] == [1, 2] and all(r["budget"] == 48 for r in e["eval"])
    table = (tmp_path / "ablations.md").read_text()
    assert all(f"| {n} |" in table for n in names)
    # a variant that cannot run with the other flags is named before any work
    assert run(TINY + [f"--out_dir={tmp_path}/small", "--stage=ablations", "--block_size=120"]) == 2


def test_frontier_command(tiny, tmp_path):
    """--stage=frontier: every penalty weight and budget on the same base, the main runs reused by
    name, each setting's categories and predictions in out/frontier.*."""
    os.symlink(tiny / "base", tmp_path / "base")
    assert run(TINY + [f"--out_dir={tmp_path}", "--stage=frontier", "--rl_steps=2"]) == 0
    rep = json.load(open(tmp_path / "frontier.json"))
    assert [r["name"] for r in rep["frontier"]] == list(arena.FRONTIER)
    assert os.path.exists(tmp_path / "bcr-s1") and os.path.exists(tmp_path / "lenpen-s1")  # the default settings
    for r in rep["frontier"]:
        assert len(r["categories"]) == 1 and r["categories"][0] in ("collapsed", "shortcut", "stable")
        # nan where this tiny base never uses a strategy (no direct answers to measure)
        assert not r["predicted_direct"] < 0 and not r["predicted_direct"] > 1 and isinstance(r["holds"], bool)
    assert {"per_column", "lambda_empty", "p_eos", "len_step"} <= set(rep["predictions"])
    assert "prediction holds" in (tmp_path / "frontier.md").read_text()
    assert (tmp_path / "frontier.png").read_bytes()[:4] == b"\x89PNG"


def test_adapt_and_arena_commands(tiny, tmp_path):
    """--stage=adapt: BCR and budget-aware BCR on the same base, judged against the
    lines their N = 1 answers predict; --stage=arena: every method of arena.ARENA, its prediction."""
    os.symlink(tiny / "base", tmp_path / "base")
    assert run(TINY + [f"--out_dir={tmp_path}", "--stage=adapt", "--adapt_steps=2"]) == 0
    rep = json.load(open(tmp_path / "adapt.json"))
    assert {e["name"] for e in rep["runs"]} == {"base", "bcr", "adapt"}
    assert set(rep["findings"]["beyond"]) == {"adapts_adapt"}
    assert json.load(open(tmp_path / "abl-adapt-s1" / "config.json"))["train"]["rl_steps"] == 2
    for e in rep["runs"]:  # every sweep row beside its predicted lines
        assert all({"acc", "oracle", "all_direct"} <= set(p) for p in e["predicted"])
    assert "oracle" in (tmp_path / "adapt.md").read_text() and (tmp_path / "adapt.png").exists()
    assert run(TINY + [f"--out_dir={tmp_path}", "--stage=arena"]) == 0
    rep = json.load(open(tmp_path / "arena.json"))
    assert [r["name"] for r in rep["arena"]] == list(arena.ARENA)
    assert isinstance(rep["findings"]["beyond"]["batching_matters"]["reproduced"], bool)
    assert json.load(open(tmp_path / "abl-gfpo-s1" / "config.json"))["train"]["G"] == 16
    assert "prediction holds" in (tmp_path / "arena.md").read_text() and (tmp_path / "arena.png").exists()


def corrupt(tiny, tmp_path, how):
    import shutil
    d = tmp_path / "ck"
    shutil.copytree(tiny / "base", d)
    if how == "missing":
        os.remove(d / "model.safetensors")
    elif how == "garbage":
        (d / "model.safetensors").write_bytes(os.urandom(2000))
    elif how == "truncated":
        data = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(data[:len(data) // 2])
    elif how == "shape":
        text = (d / "config.json").read_text().replace('"n_embd": 32', '"n_embd": 64')
        (d / "config.json").write_text(text)
    elif how == "json":
        (d / "config.json").write_text("{not json")
    elif how == "deep":  # json.load recurses once per bracket
        (d / "config.json").write_text("[" * 100_000)
    elif how == "tokenizer":
        (d / "tokenizer.json").write_text("[]")
    elif how == "normalizer":  # nanoBCR's vocabulary, but another reading of the text
        tok = json.loads((d / "tokenizer.json").read_text())
        tok["normalizer"] = {"type": "Lowercase"}
        (d / "tokenizer.json").write_text(json.dumps(tok))
    elif how == "n_layer=65536":  # more layers than this machine's memory holds
        meta = json.loads((d / "config.json").read_text())
        meta["model"].update(n_layer=65536, n_embd=256, n_head=2)
        (d / "config.json").write_text(json.dumps(meta))
    elif how in ("null", "n_head=0", "n_embd=-4", "n_layer=1.5"):  # valid JSON, not a model
        meta = json.loads((d / "config.json").read_text())
        if how != "null":
            meta["model"][how.split("=")[0]] = json.loads(how.split("=")[1])
        (d / "config.json").write_text(json.dumps(None if how == "null" else meta))
    elif how in ("int64", "nan"):  # the right names and shapes, wrong values
        sd = load_file(d / "model.safetensors")
        sd = {k: v.long() if how == "int64" else v.fill_(float("nan")) for k, v in sd.items()}
        save_file(sd, d / "model.safetensors")
    return d


BAD_TRAIN = [["--bogus=1"], ["--N=abc"], ["--N=0"], ["--b=3"], ["--C=5"], ["--C=100000"], ["--temperature=-1"],
             ["--stage=nope"], ["--eval_Ns=1,x"], ["--resume=maybe"], ["--preset=tpu"], ["--ops=*"],
             ["--n_head=3"], ["--update_dtype=fp16"],
             ["--n_head=0"], ["--n_layer=-1"], ["--block_size=1000000000000"], ["--G=1"], ["--pt_docs=0"],
             ["--rl_lr=nan"], ["--pt_lr=inf"], ["--kl=-1"], ["--pt_concise=7"], ["--max_digits=5000"],
             ["--seed=100000000000000000000"], ["--eval_Ns=1,\u00b2"], ["--device=foo"], ["--device=cuda:99"],
             ["--eval_Ns=2,1"], ["--eval_Ns=2", "--stage=report"], ["--eval_problems=1"], ["--temperature=1e300"],
             ["--temperature=0.001"], ["--pt_lr=1e38"], ["--out_dir=--"], ["--n_embd=65536"], ["--method=nope"]]


@pytest.mark.parametrize("argv", BAD_TRAIN)
def test_bad_train_flags_one_line_exit_2(argv, capsys, tiny):
    code = run(TINY + [f"--out_dir={tiny}"] + argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    name, _, value = argv[0].lstrip("-").partition("=")
    assert name in err or value in err, err  # refused for this flag, not for something else


def test_eval_and_report_check_every_run_as_reuse_would(tiny, tmp_path, capsys):
    """--stage=report needs every run before any work; an RL run made with other training flags is
    refused by --stage=eval (the evaluation's own flags, e.g. the temperature, may differ)."""
    import shutil
    shutil.copytree(tiny / "base", tmp_path / "base")  # a copy: evaluation writes into it
    assert run(TINY + [f"--out_dir={tmp_path}/empty", "--stage=eval"]) == 2  # nothing to evaluate: said
    assert "no base in" in capsys.readouterr().err
    assert run(TINY + [f"--out_dir={tmp_path}", "--stage=report"]) == 2
    assert "no bcr-s1, grpo-s1, lenpen-s1" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["base"]  # nothing written, not even the mistyped out_dir
    assert run(TINY + [f"--out_dir={tmp_path}", "--stage=bcr"]) == 0
    before = digest(tmp_path / "bcr-s1")
    assert run(TINY + [f"--out_dir={tmp_path}", "--stage=eval", "--rl_steps=5"]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert len(err) == 1 and "rl_steps: 4 there, 5 now" in err[0], err
    assert digest(tmp_path / "bcr-s1") == before
    assert run(TINY + [f"--out_dir={tmp_path}", "--stage=eval", "--temperature=0.5"]) == 0
    cache = tmp_path / "bcr-s1" / "eval.json"
    assert json.loads(cache.read_text())["key"]["temperature"] == 0.5
    kept = cache.read_bytes()  # the same flags again: the cached sweep is reused, not recomputed
    assert run(TINY + [f"--out_dir={tmp_path}", "--stage=eval", "--temperature=0.5"]) == 0
    assert cache.read_bytes() == kept
    for bad in (b"[1]", b"{not json"):  # a cache that is not one: evaluated again, the same rows
        cache.write_bytes(bad)
        assert run(TINY + [f"--out_dir={tmp_path}", "--stage=eval", "--temperature=0.5"]) == 0
        assert json.loads(cache.read_text())["rows"] == json.loads(kept)["rows"]


def test_out_dir_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert run(TINY + [f"--out_dir={f}"]) == 2 and "is a file" in capsys.readouterr().err
    assert run(TINY + [f"--out_dir={f}/sub"]) == 2  # an OSError: one line that names the path
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Not a directory" in err and str(f) in err, err


TORCHRUN = {"RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "localhost", "MASTER_PORT": "29999"}


@pytest.mark.parametrize("env, why", [({"WORLD_SIZE": "2"}, "not torchrun's ('LOCAL_RANK')"),
                                      ({"RANK": "x"}, "not torchrun's (invalid literal"),
                                      ({"WORLD_SIZE": "4", **TORCHRUN}, "4 processes need --prompts")])
def test_a_bad_process_environment_is_one_line(env, why, tiny, monkeypatch, capsys):
    """WORLD_SIZE without the rest of torchrun's variables; not an integer; more processes than prompts."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert run(TINY + [f"--out_dir={tiny}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and why in err, err


@pytest.mark.parametrize("how", ["missing", "garbage", "truncated", "shape", "json", "deep", "tokenizer", "null",
                                 "n_head=0", "n_embd=-4", "n_layer=1.5", "int64", "nan", "normalizer", "n_layer=65536"])
def test_bad_checkpoints_one_line_exit_2(how, tiny, tmp_path, capsys):
    d = corrupt(tiny, tmp_path, how)
    before = digest(d)
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(d), "--problems", "1+2"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert digest(d) == before  # nothing already saved is touched


BAD_SAMPLE = [["--problems", "4*5"], ["--problems", "4-9"], ["--temperature", "-1"], ["--top_k", "-2"],
              ["--max_new", "100000"], ["--ckpt", "/nonexistent/folder"], ["--seed", "x"], ["--nope"],
              ["--temperature", "nan"], ["--temperature", "inf"], ["--seed", "99999999999999999999999"],
              ["--problems", "9" * 30 + "+1"], ["--device", "foo"], ["--device", "cuda:99"], ["--temperature", "1e300"],
              ["--ckpt=--"]]


@pytest.mark.parametrize("argv", BAD_SAMPLE)
def test_bad_sample_flags_one_line_exit_2(argv, tiny, capsys):
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(tiny / "base")] + argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert argv[0].lstrip("-").split("=")[0] in err or argv[-1] in err, err  # refused for this flag


def test_cli_subprocesses(tiny):
    """The real entry points, as a user runs them: a good call, and bad ones with no traceback."""
    ok = proc.run([sys.executable, "sample.py", "--ckpt", str(tiny / "base"), "--problems", "3+4, 9-2", "--seed", "1"])
    assert ok.returncode == 0 and "problem 2: 9-2 ->" in ok.stdout
    cut = proc.run([sys.executable, "sample.py", "--ckpt", str(tiny / "base"), "--problems", "3+4, 9-2",
                    "--max_new", "3"])  # too short for any answer
    assert "problem 1: 3+4 -> no answer" in cut.stdout and "cut by the cap" in cut.stdout, cut.stdout
    for cmd in (["train.py", "--N=-1"], ["sample.py", "--problems", "12+é"], ["tests/bench.py", "--rounds=0"],
                ["tests/bench.py", "--ckpt", "/nonexistent"]):
        p = proc.run([sys.executable, *cmd])
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr, cmd
    # a reader that leaves before the answer is written (`| head`, `| true`): no traceback either
    with proc.started([sys.executable, "sample.py", "--ckpt", str(tiny / "base"), "--problems", "3+4"],
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE) as p:
        p.stdout.close()
        err = p.stderr.read().decode()
        assert p.wait() == 0 and "Traceback" not in err, err


# ----------------------------------------------------------------------------- reliability (issues #20, #21)

@pytest.fixture(scope="module")
def half(tmp_path_factory):
    """A tiny pretraining killed in step 5: base holds step 3 (done: false), base.jsonl steps 0-4."""
    out = tmp_path_factory.mktemp("half")
    with pytest.MonkeyPatch.context() as m:
        interrupt_at(m, train, "pretrain_batch", 5)
        assert run(TINY + [f"--out_dir={out}", "--stage=pretrain"]) == 130
    return out


def unfinished(half, out):
    """A copy of the half-trained base and its log in out; returns out."""
    shutil.copytree(half / "base", out / "base")
    shutil.copy(half / "base.jsonl", out / "base.jsonl")
    return out


def tree(folder):
    """sha256 of every file under folder, by relative path; but .lock, which any run may make."""
    return {os.path.relpath(f"{d}/{f}", folder): hashlib.sha256(open(f"{d}/{f}", "rb").read()).hexdigest()
            for d, _, names in os.walk(folder) for f in names if f != ".lock"}


def one_error(capsys, *words):
    err = capsys.readouterr().err
    lines = [x[x.index("error:"):] for x in err.splitlines() if "error:" in x]  # maybe after a progress bar
    assert len(lines) == 1 and "Traceback" not in err and all(w in lines[0] for w in words), err
    return lines[0]


FULL_ENV = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "localhost",
            "MASTER_PORT": "29999"}


@pytest.mark.parametrize("env, why", [({"RANK": "1"}, "'LOCAL_RANK'"), ({"LOCAL_RANK": "0"}, "'RANK'"),
                                      ({**FULL_ENV, "WORLD_SIZE": "0"}, "out of range"),
                                      ({**FULL_ENV, "RANK": "1"}, "out of range"),
                                      ({**FULL_ENV, "MASTER_PORT": "x"}, "invalid literal")])
def test_a_partial_torchrun_environment_is_refused_before_any_work(env, why, tmp_path, monkeypatch, capsys):
    """A stray RANK=1 used to train a process that never saves (only rank 0 saves); WORLD_SIZE=0
    and a non-numeric MASTER_PORT crashed or were ignored."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert run(TINY + [f"--out_dir={tmp_path}/out", "--stage=pretrain"]) == 2
    one_error(capsys, "not torchrun's", why)
    assert not os.path.exists(tmp_path / "out")  # refused before even the folder is made


def test_a_dependent_stage_never_builds_on_an_unfinished_base(half, tiny, tmp_path, capsys):
    out = unfinished(half, tmp_path)
    before, log = digest(out / "base"), (out / "base.jsonl").read_bytes()
    assert run(TINY + [f"--out_dir={out}", "--stage=eval", "--resume"]) == 2  # evaluating a half-trained base
    one_error(capsys, "unfinished", "step 3")
    assert digest(out / "base") == before and (out / "base.jsonl").read_bytes() == log
    assert run(TINY + [f"--out_dir={out}", "--stage=bcr", "--resume"]) == 0  # the base is finished first
    assert checkpoint.load(out / "base")[2]["done"] and checkpoint.load(out / "bcr-s1")[2]["done"]
    a, b = weights(out / "base"), weights(tiny / "base")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_refused_resume_writes_nothing(half, tmp_path, capsys):
    """A stale base.tmp that is not a folder failed the first save, after the log had been rewritten
    and steps trained; it is now refused before any of that."""
    out = unfinished(half, tmp_path)
    (out / "base.tmp").write_text("not a checkpoint")
    before = tree(out)
    assert run(TINY + [f"--out_dir={out}", "--stage=pretrain", "--resume"]) == 2
    one_error(capsys, "base.tmp")
    assert tree(out) == before


@pytest.mark.parametrize("line", [b'{"step": 1, "loss": "\xff"}', b"[" * 100_000])
def test_a_corrupt_resumed_log_line_is_one_line(line, half, tmp_path, capsys):
    """A non-UTF-8 byte (UnicodeDecodeError) or deep nesting (RecursionError) in the log."""
    out = unfinished(half, tmp_path)
    rows = (out / "base.jsonl").read_bytes().splitlines(keepends=True)
    (out / "base.jsonl").write_bytes(rows[0] + line + b"\n" + b"".join(rows[1:]))
    before = tree(out)
    assert run(TINY + [f"--out_dir={out}", "--stage=pretrain", "--resume"]) == 2
    one_error(capsys, "line 2 is corrupt")
    assert tree(out) == before


@pytest.mark.parametrize("where", ["safetensors", "tokenizer", "torch.save", "config.json"])
def test_a_full_disk_while_saving_keeps_the_last_checkpoint(where, tmp_path, monkeypatch, capsys):
    """The second save (step 6) finds the disk full: one line, step 3's checkpoint intact, no partial
    base.tmp left to fill the disk."""
    from safetensors import SafetensorError

    saves = []
    real_save_file, real_torch_save, real_open = checkpoint.save_file, torch.save, builtins.open

    def full(real, error):
        def wrapped(*a, **k):
            if len(saves) == 2:
                raise error
            return real(*a, **k)
        return wrapped
    real_save = checkpoint.save
    monkeypatch.setattr(checkpoint, "save", lambda *a, **k: (saves.append(1), real_save(*a, **k)))
    if where == "safetensors":
        monkeypatch.setattr(checkpoint, "save_file", full(real_save_file, SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')))
    elif where == "torch.save":  # what torch.save raises on a full disk
        monkeypatch.setattr(torch, "save", full(real_torch_save, RuntimeError(
            "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")))
    elif where == "tokenizer":
        real_build = train.build_tokenizer

        class Tok:
            def __init__(self):
                self.tok = real_build()

            def __getattr__(self, name):
                return getattr(self.tok, name)

            def save(self, path):
                if len(saves) == 2:
                    raise Exception("No space left on device (os error 28)")  # tokenizers' bare Exception
                self.tok.save(path)
        monkeypatch.setattr(train, "build_tokenizer", Tok)
    else:
        def opener(path, *a, **k):
            if str(path).endswith("base.tmp/config.json") and len(saves) == 2:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            return real_open(path, *a, **k)
        monkeypatch.setattr(builtins, "open", opener)
    assert run(TINY + [f"--out_dir={tmp_path}", "--stage=pretrain"]) == 2
    one_error(capsys, "cannot write a checkpoint", "untouched")
    monkeypatch.undo()
    assert checkpoint.load(tmp_path / "base")[2]["step"] == 3
    assert not os.path.exists(tmp_path / "base.tmp")


def test_an_out_dir_that_is_not_utf8_is_refused_before_training(tmp_path, capsys):
    """The tokenizer's file is saved by a UTF-8 name: such a folder used to fail at the first save."""
    out = f"{tmp_path}/o{os.fsdecode(bytes([0xff]))}"
    assert run(TINY + [f"--out_dir={out}", "--stage=pretrain"]) == 2
    one_error(capsys, "out_dir", "UTF-8")
    assert os.listdir(tmp_path) == []


def test_a_kill_while_the_log_is_rewritten_leaves_it_whole(half, tmp_path, monkeypatch):
    out = unfinished(half, tmp_path)
    log = (out / "base.jsonl").read_bytes()
    real_open = builtins.open

    def dying_open(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        if set("wx") & set(mode) and os.path.basename(str(path)).startswith("base.jsonl"):
            f.close()
            raise KeyboardInterrupt  # killed once the file is opened for writing (and truncated)
        return f
    with monkeypatch.context() as m:
        m.setattr(builtins, "open", dying_open)
        assert run(TINY + [f"--out_dir={out}", "--stage=pretrain", "--resume"]) == 130
    assert (out / "base.jsonl").read_bytes() == log
    assert run(TINY + [f"--out_dir={out}", "--stage=pretrain", "--resume"]) == 0
    assert [json.loads(x)["step"] for x in open(out / "base.jsonl")] == list(range(8))


def test_a_full_disk_while_writing_the_report_keeps_the_last_one(tiny, tmp_path, monkeypatch, capsys):
    shutil.copytree(tiny / "base", tmp_path / "base")
    assert run(TINY + [f"--out_dir={tmp_path}"]) == 0
    before = tree(tmp_path)
    real_open = builtins.open

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

        def __getattr__(self, name):
            return getattr(self.f, name)

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    def opener(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        return FullDisk(f) if set("wx") & set(mode) and os.path.basename(str(path)).startswith("report.") else f
    monkeypatch.setattr(builtins, "open", opener)
    assert run(TINY + [f"--out_dir={tmp_path}", "--stage=report"]) == 2
    monkeypatch.undo()
    one_error(capsys, "No space left on device", "report.")  # the file is named
    after = tree(tmp_path)
    assert after == before  # nothing changed, and no report.json.tmp is left behind
    assert json.load(open(tmp_path / "report.json"))["runs"]


def test_a_save_cut_between_its_renames_is_recovered_by_sample_py(tiny, tmp_path, monkeypatch, capsys):
    """Killed between the two renames, a save leaves only base.old and base.tmp: sample.py (not only
    train.py) must load base.old as the checkpoint, and leave it there."""
    shutil.copytree(tiny / "base", tmp_path / "base")
    net, tok, _ = checkpoint.load(tmp_path / "base")
    real = os.replace
    calls = []

    def dying_replace(a, b):
        calls.append(a)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(a, b)
    with monkeypatch.context() as m:
        m.setattr(os, "replace", dying_replace)
        with pytest.raises(KeyboardInterrupt):
            checkpoint.save(str(tmp_path / "base"), net, tok, {"step": 99}, {})
    assert sorted(os.listdir(tmp_path)) == ["base.old", "base.tmp"]
    sample.main(["--ckpt", str(tmp_path / "base"), "--problems", "1+2"])  # no SystemExit
    assert "problem 1: 1+2" in capsys.readouterr().out
    # a reader reads <folder>.old where it lies: moving it back is the lock holder's, or a live
    # save's next rename fails
    assert sorted(os.listdir(tmp_path)) == ["base.old", "base.tmp"]


def test_weights_made_non_finite_by_a_step_are_never_saved(tmp_path, monkeypatch, capsys):
    """A step whose loss and gradient are finite but that overflows the weights (as a huge learning
    rate would): with a save after every step they used to be saved, and nothing could load them."""
    real = torch.optim.AdamW.step

    def overflowing(self, *a, **k):
        out = real(self, *a, **k)
        with torch.no_grad():
            self.param_groups[0]["params"][0].mul_(float("inf"))
        return out
    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing)
    assert run(TINY + [f"--out_dir={tmp_path}", "--stage=pretrain", "--pt_muon_lr=0", "--save_every=1"]) == 2
    assert one_error(capsys, "non-finite", "step 0", "nothing was saved")  # there is no last checkpoint
    assert not os.path.exists(tmp_path / "base")


def test_one_out_dir_one_run(tmp_path, monkeypatch, capsys):
    """A second run into a folder in use is refused while the first goes on; a killed run's lock goes
    with it (a flock), though its .lock file stays."""
    holder = [sys.executable, "-c", "import fcntl, os, sys, time\n"
              "f = open(sys.argv[1] + '/.lock', 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
              "f.write(str(os.getpid())); f.flush(); print('locked', flush=True); time.sleep(60)", str(tmp_path)]
    with proc.started(holder, timeout=60, stdout=subprocess.PIPE, text=True) as p:
        assert p.stdout.readline() == "locked\n"
        before = digest(tmp_path)
        assert run(TINY + [f"--out_dir={tmp_path}", "--stage=pretrain"]) == 2
        one_error(capsys, f"is in use by pid {p.pid}")
        assert digest(tmp_path) == before
    second, real = [], train.pretrain_batch

    def meanwhile(*args):  # a second run starts while the first is in step 1
        if args[2] == 1 and not second:
            second.append(run(TINY + [f"--out_dir={tmp_path}", "--stage=pretrain"]))
        return real(*args)
    monkeypatch.setattr(train, "pretrain_batch", meanwhile)
    assert run(TINY + [f"--out_dir={tmp_path}", "--stage=pretrain"]) == 0 and second == [2]
    one_error(capsys, f"is in use by pid {os.getpid()}")
    assert checkpoint.load(tmp_path / "base")[2]["done"]
    with open(tmp_path / ".lock") as f:  # released when the run ended
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_a_symlinked_checkpoint_folder_saves_and_resumes(half, tiny, tmp_path):
    """out/base -> elsewhere/base: the first save used to rename the link away and the second fail."""
    out, real = tmp_path / "out", tmp_path / "elsewhere"
    unfinished(half, out)
    real.mkdir()
    shutil.move(out / "base", real / "base")
    os.symlink(real / "base", out / "base")
    assert run(TINY + [f"--out_dir={out}", "--stage=pretrain", "--resume"]) == 0  # saves at steps 6 and 8
    assert (out / "base").is_symlink() and sorted(os.listdir(real)) == ["base"]
    assert not os.path.lexists(out / "base.old") and checkpoint.load(out / "base")[2]["done"]
    a, b = weights(out / "base"), weights(tiny / "base")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- reliability (issue #33)

def test_ctrl_c_is_one_line_and_exit_130(tmp_path):
    """SIGINT in the middle of pretraining: one line saying where the checkpoint is, exit 130, and
    the checkpoint it names loads."""
    import signal
    cmd = [sys.executable, "train.py", *TINY, f"--out_dir={tmp_path}", "--stage=pretrain", "--pt_steps=100000",
           "--save_every=2"]
    with proc.started(cmd, timeout=180, stderr=subprocess.PIPE, text=True) as p:
        while not (tmp_path / "base" / "config.json").exists() and p.poll() is None:
            time.sleep(0.2)
        p.send_signal(signal.SIGINT)
        err = p.stderr.read()
        p.wait()
    lines = [x for x in err.splitlines() if x.strip() and "it/s" not in x and "s/it" not in x and "base:" not in x]
    assert p.returncode == 130 and "Traceback" not in err and len(lines) == 1, err
    assert "interrupted" in lines[0] and str(tmp_path) in lines[0] and "--resume" in lines[0]
    assert not checkpoint.load(tmp_path / "base")[2]["done"]


def disagree(half, out, how):
    """The half-trained base (step 3 of 8) with one part of it changed."""
    unfinished(half, out)
    if how == "state step":  # state.pt overwritten with a step past the end
        state = torch.load(out / "base" / "state.pt", weights_only=True)
        torch.save({**state, "step": 700}, out / "base" / "state.pt")
    elif how == "weights step":  # weights of another step beside this config
        sd = load_file(out / "base" / "model.safetensors")
        save_file(sd, out / "base" / "model.safetensors", {"step": "6"})
    elif how == "done":  # config.json calls step 3 of 8 done
        meta = json.loads((out / "base" / "config.json").read_text())
        (out / "base" / "config.json").write_text(json.dumps({**meta, "done": True}))
    elif how == "log":  # a log that lost its first steps
        rows = (out / "base.jsonl").read_text().splitlines(keepends=True)
        (out / "base.jsonl").write_text("".join(rows[2:]))
    return out


@pytest.mark.parametrize("how, words", [("state step", ("state.pt", "step 700", "config.json", "step 3")),
                                        ("weights step", ("model.safetensors", "step 6", "config.json")),
                                        ("done", ("config.json", "step 3 of 8", "done: True")),
                                        ("log", ("base.jsonl", "steps 0..2"))])
def test_a_checkpoint_whose_parts_disagree_is_refused(how, words, half, tmp_path, capsys):
    """A resume, and a stage built on the base, must not trust a checkpoint whose files disagree:
    one line naming them, exit 2, nothing changed; the bcr stage never runs on that base."""
    out = disagree(half, tmp_path, how)
    before = tree(out)
    assert run(TINY + [f"--out_dir={out}", "--stage=pretrain", "--resume"]) == 2
    one_error(capsys, *words)
    assert run(TINY + [f"--out_dir={out}", "--stage=bcr", "--resume"]) == 2
    one_error(capsys)
    assert tree(out) == before and not os.path.exists(out / "bcr-s1")


@pytest.mark.parametrize("kind", ["symlink", "fifo", "dev_full"])
def test_a_log_that_is_not_a_regular_file_is_refused(kind, half, tmp_path, capsys):
    """A log symlinked elsewhere (its target would never get the rows), a FIFO (reading it would hang)
    or a link to /dev/full: one line, nothing changed, no hang."""
    out = unfinished(half, tmp_path / "out")
    log = out / "base.jsonl"
    if kind == "fifo":
        log.unlink()
        os.mkfifo(log)
    else:
        target = tmp_path / "real.jsonl" if kind == "symlink" else "/dev/full"
        if kind == "symlink":
            shutil.move(log, target)
        else:
            log.unlink()
        os.symlink(target, log)
    assert run(TINY + [f"--out_dir={out}", "--stage=pretrain", "--resume"]) == 2
    one_error(capsys, "base.jsonl", "not a regular file")
    assert os.path.islink(log) or kind == "fifo"


def test_an_eval_cache_that_is_a_link_is_refused(tiny, tmp_path, capsys):
    shutil.copytree(tiny / "base", tmp_path / "base")
    (tmp_path / "elsewhere.json").write_text("{}")
    (tmp_path / "base" / "eval.json").unlink(missing_ok=True)  # the tiny base may have been evaluated
    os.symlink(tmp_path / "elsewhere.json", tmp_path / "base" / "eval.json")
    assert run(TINY + [f"--out_dir={tmp_path}", "--stage=eval"]) == 2
    one_error(capsys, "eval.json", "not a regular file")
    assert (tmp_path / "elsewhere.json").read_text() == "{}"
    (tmp_path / "base" / "eval.json").unlink()
    os.mkfifo(tmp_path / "base" / "eval.json")  # reading it would hang
    assert run(TINY + [f"--out_dir={tmp_path}", "--stage=eval"]) == 2
    one_error(capsys, "eval.json", "not a regular file")


def test_an_interrupted_figure_leaves_the_old_one_and_no_tmp(tiny, tmp_path, monkeypatch):
    """Every output goes through one atomic write: a kill while report.png is written leaves the
    previous figure whole and no report.png.tmp behind."""
    shutil.copytree(tiny / "base", tmp_path / "base")
    assert run(TINY + [f"--out_dir={tmp_path}"]) == 0
    png = (tmp_path / "report.png").read_bytes()
    real = os.fsync

    def dying(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("report.png.tmp"):
            raise KeyboardInterrupt
        real(fd)
    monkeypatch.setattr(os, "fsync", dying)
    assert run(TINY + [f"--out_dir={tmp_path}", "--stage=report"]) == 130
    monkeypatch.undo()
    assert (tmp_path / "report.png").read_bytes() == png and not os.path.exists(tmp_path / "report.png.tmp")


def test_nan_in_the_optimizer_state_is_never_saved(tmp_path, capsys):
    """Finite weights but NaN in Adam's moments: a checkpoint saved then would stop every resume."""
    real = torch.optim.AdamW.step

    def poisoned(self, *a, **k):
        out = real(self, *a, **k)
        if self.state and next(iter(self.state.values()))["step"] >= 4:
            next(iter(self.state.values()))["exp_avg_sq"].fill_(float("nan"))
        return out
    with pytest.MonkeyPatch.context() as m:
        m.setattr(torch.optim.AdamW, "step", poisoned)
        assert run(TINY + [f"--out_dir={tmp_path}", "--stage=pretrain", "--pt_muon_lr=0"]) == 2
    one_error(capsys, "non-finite", "optimizer state", "step 3", "untouched")
    assert checkpoint.load(tmp_path / "base")[2]["step"] == 3  # the save after step 2, not a poisoned one


ALLOC_ERRORS = [MemoryError(), RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not "
                                             "enough memory: you tried to allocate 805306368 bytes.")]


@pytest.mark.parametrize("error", ALLOC_ERRORS, ids=["MemoryError", "RuntimeError"])
def test_a_model_that_cannot_be_allocated_is_one_line(error, tiny, tmp_path, monkeypatch, capsys):
    """The size check passes but the allocation itself fails (other processes hold the memory):
    one line, exit 2, from train.py and sample.py. The failure is raised where torch allocates a
    layer, not provoked with a memory limit, under which what a torch build maps at import decides
    whether the child even starts."""
    def no_memory(*a, **k):
        raise error
    monkeypatch.setattr(torch.nn.Linear, "__init__", no_memory)
    assert run(TINY + [f"--out_dir={tmp_path}", "--stage=pretrain"]) == 2
    one_error(capsys, "memory")
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(tiny / "base"), "--problems", "1+2"])
    assert e.value.code == 2
    one_error(capsys, "memory")


# ----------------------------------------------------------------------------- the probe's holes (issue #36)

def test_weights_without_a_step_tag_are_a_disagreement(half, tmp_path, capsys):
    """Another run's weights saved without the tag used to be taken as agreeing: resumed from, trained on."""
    out = unfinished(half, tmp_path)
    save_file(load_file(out / "base" / "model.safetensors"), out / "base" / "model.safetensors")  # no metadata
    before = tree(out)
    assert run(TINY + [f"--out_dir={out}", "--stage=pretrain", "--resume"]) == 2
    one_error(capsys, "model.safetensors", "no step tag")
    assert run(TINY + [f"--out_dir={out}", "--stage=bcr", "--resume"]) == 2
    one_error(capsys, "model.safetensors", "no step tag")
    assert tree(out) == before and not os.path.exists(out / "bcr-s1")


@pytest.mark.parametrize("name", [".lock", "report.json.tmp", "base.jsonl.tmp"])
def test_a_planted_link_never_leads_a_write_out_of_the_run(name, half, tmp_path, capsys):
    """.lock, or the temporary name of an atomic write, as a link to a file outside the out_dir: that
    file is never written, and the output stays a regular file (or the run is refused in one line)."""
    out = unfinished(half, tmp_path / "out")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.symlink(victim, out / name)
    stage = {".lock": "eval", "report.json.tmp": "all", "base.jsonl.tmp": "pretrain"}[name]
    code = run(TINY + [f"--out_dir={out}", f"--stage={stage}", "--resume"])
    if name == ".lock":
        assert code == 2
        one_error(capsys, ".lock")
    else:
        assert code == 0
        output = out / name.removesuffix(".tmp")
        assert output.is_file() and not output.is_symlink()
    assert victim.read_text() == "precious"


@pytest.mark.parametrize("how", ["fifo state.pt", "fifo tokenizer.json", "tokenizer.json -> /dev/zero",
                                 "fifo config.json", "fifo .lock"])
def test_what_a_checkpoint_folder_holds_never_hangs_a_run(how, half, tmp_path):
    """Every file the project reads is a regular file of sane size, or one line: a FIFO would block
    the read for ever, /dev/zero never end it. Run as children, so that a hang fails in a minute."""
    out = unfinished(half, tmp_path)
    name = how.split()[-1] if how.startswith("fifo") else "tokenizer.json"
    path = out / name if name == ".lock" else out / "base" / name
    path.unlink(missing_ok=True)
    os.mkfifo(path) if how.startswith("fifo") else os.symlink("/dev/zero", path)
    cmds = [["train.py", *TINY, f"--out_dir={out}", "--stage=pretrain", "--resume"]]
    if name != ".lock":
        cmds += [["train.py", *TINY, f"--out_dir={out}", "--stage=bcr", "--resume"],
                 ["sample.py", "--ckpt", str(out / "base"), "--problems", "1+2"]]
    for cmd in cmds[:1] if name == "state.pt" else cmds:  # state.pt is read by a resume only
        p = proc.run([sys.executable, *cmd], timeout=90)
        err = p.stderr.strip().splitlines()
        assert p.returncode == 2 and "Traceback" not in p.stderr and name in err[-1], (cmd, p.stderr)


def test_sample_py_counts_the_cache_not_only_the_weights(tiny, tmp_path):
    """A config whose weights fit this machine's memory but whose KV cache for one prompt does not:
    refused in one line before anything is allocated (it used to grow until the kernel killed it)."""
    d = tmp_path / "big"
    shutil.copytree(tiny / "base", d)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    per_layer = 4 * 12 * 64 ** 2  # fp32 bytes of one block's weights at n_embd = 64
    meta = json.loads((d / "config.json").read_text())
    meta["model"].update(n_layer=min(int(0.6 * memory / per_layer), 65536), n_embd=64, n_head=2, block_size=1024)
    (d / "config.json").write_text(json.dumps(meta))
    p = proc.run([sys.executable, "sample.py", "--ckpt", str(d), "--problems", "1+2"], timeout=90)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "memory" in p.stderr, p.stderr


@pytest.mark.parametrize("argv", [["--eval_problems=100000000000"], ["--eval_problems=9223372036854775808"],
                                  ["--eval_Ns=2", "--stage=frontier"], ["--eval_Ns=2", "--stage=ablations"]])
def test_a_stage_is_refused_before_its_first_run(argv, tmp_path, capsys):
    """Sizes and flags the report cannot use are refused before anything is trained or written."""
    assert run(TINY + [f"--out_dir={tmp_path}/out"] + argv) == 2
    one_error(capsys, argv[0].split("=")[0].lstrip("-"))
    assert not os.path.exists(tmp_path / "out")


def test_a_variant_made_with_another_config_is_refused_before_any_training(tiny, tmp_path, capsys):
    """The frontier's variants are checked, all of them, before the first is trained."""
    os.symlink(tiny / "base", tmp_path / "base")
    assert run(TINY + [f"--out_dir={tmp_path}", "--stage=frontier", "--rl_steps=2"]) == 0
    meta = json.loads((tmp_path / "abl-b43-s1" / "config.json").read_text())
    meta["train"]["rl_lr"] = 0.5  # the last variant was made with another learning rate
    (tmp_path / "abl-b43-s1" / "config.json").write_text(json.dumps(meta))
    shutil.rmtree(tmp_path / "abl-lp0.1-s1")  # the first variant would be trained again
    assert run(TINY + [f"--out_dir={tmp_path}", "--stage=frontier", "--rl_steps=2"]) == 2
    one_error(capsys, "abl-b43-s1", "rl_lr")
    assert not os.path.exists(tmp_path / "abl-lp0.1-s1")


def test_ctrl_c_while_the_program_starts_is_one_line(tmp_path):
    """SIGINT during the imports (torch takes seconds to load): no traceback."""
    import signal
    for cmd in (["train.py", *TINY, f"--out_dir={tmp_path}"], ["sample.py", "--problems", "1+2"]):
        with proc.started([sys.executable, *cmd], timeout=60, stderr=subprocess.PIPE, text=True) as p:
            time.sleep(0.5)
            p.send_signal(signal.SIGINT)
            err = p.stderr.read()
            p.wait()
        assert p.returncode == 130 and "Traceback" not in err and len(err.strip().splitlines()) <= 1, err
    assert not os.path.exists(tmp_path / "base")


def test_a_failed_first_save_says_nothing_was_saved_and_leaves_no_tmp(tmp_path, monkeypatch, capsys):
    """The disk full at the first save (there is no last checkpoint to keep), then a rename refused
    (a read-only folder): one line each, and no <folder>.tmp left behind."""
    real_replace = os.replace
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("unexpected pos 704")))
    assert run(TINY + [f"--out_dir={tmp_path}", "--stage=pretrain"]) == 2
    one_error(capsys, "cannot write a checkpoint", "nothing was saved yet")
    assert sorted(os.listdir(tmp_path)) == [".lock", "base.jsonl"]
    monkeypatch.undo()

    def read_only(a, b):
        if str(a).endswith("base.tmp"):
            raise PermissionError(errno.EACCES, "Permission denied", str(a))
        real_replace(a, b)
    monkeypatch.setattr(os, "replace", read_only)
    assert run(TINY + [f"--out_dir={tmp_path}", "--stage=pretrain"]) == 2
    one_error(capsys, "cannot write a checkpoint", "Permission denied")
    assert not os.path.exists(tmp_path / "base.tmp")

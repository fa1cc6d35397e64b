"""Data parallel on 2 CPU processes (gloo): the same results as one process."""
import fcntl
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file

import bcr
import proc
import train
from data import doc_rng, packed_prompts
from checkpoint import load as load_checkpoint
from model import new_optimizer
from test_train import TINY, run, tiny  # noqa: F401  (the module-scoped tiny base)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank, world, port, fn, args):
    """What torchrun would set up, then fn(rank, *args) in this process."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    fn(rank, *args)
    # Skip the interpreter's teardown: a spawned child runs it after fn (multiprocessing ends with
    # sys.exit), and there gloo/c10d objects occasionally abort ("terminate called without an active
    # exception", SIGABRT with no Python frame; seen in ~1 of 20 runs, always after the results were
    # saved). The results are on disk by now, so nothing is lost by leaving at once.
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)


def spawn(fn, *args, world=2, timeout=proc.LIMIT):
    proc.spawn(worker, (world, free_port(), fn, args), world, timeout)


def pretrain_job(rank, out):
    assert train.main(TINY + [f"--out_dir={out}", "--stage=pretrain"]) is None


def test_pretraining_matches_one_process(tmp_path, tiny):  # noqa: F811
    spawn(pretrain_job, str(tmp_path))
    a, b = load_file(tmp_path / "base/model.safetensors"), load_file(tiny / "base/model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def fixed_rollouts(tiny):  # noqa: F811
    """One step's rollouts, sampled once in this process and reused by every process."""
    model, tok, _ = load_checkpoint(tiny / "base")
    cfg = train.parse_config(TINY + ["--update_dtype=fp32"])  # bf16 would round each split differently
    groups = packed_prompts(doc_rng("fixed", 0), cfg, 4, 2)
    ids, out, n, rewards = bcr.rollout(model, tok, groups, 4, 48, 1.0, torch.Generator().manual_seed(0))
    adv, _ = bcr.token_advantages(rewards, n, 4, 48, cfg)
    return cfg, ids, out, n, adv


def update(model, cfg, ids, out, n, adv, world):
    """The update half of bcr.rl_step on given rollouts, with the global token normaliser."""
    local = torch.tensor([float(n.sum())])
    if world > 1:
        dist.all_reduce(local)
    loss, _ = bcr.pg_loss_fast(model, ids, out, n, adv, local.item(), cfg)
    loss.backward()
    bcr.finish_grads(model, cfg.grad_clip, world, loss.item())
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    return model


def update_job(rank, tiny, result):  # noqa: F811
    dist.init_process_group("gloo")
    cfg, ids, out, n, adv = fixed_rollouts(Path(tiny))
    rows = slice(rank * 8, (rank + 1) * 8)  # whole groups of G=4: a group never straddles ranks
    model = update(load_checkpoint(Path(tiny) / "base")[0].train(), cfg, ids[rows], out[rows], n[rows],
                   adv[rows], 2)
    if rank == 0:
        torch.save(model.state_dict(), result)
    dist.barrier()  # gloo aborts a process that leaves while the other still talks to it
    dist.destroy_process_group()


def test_one_update_on_fixed_rollouts_matches_one_process(tmp_path, tiny):  # noqa: F811
    spawn(update_job, str(tiny), str(tmp_path / "two.pt"))
    cfg, ids, out, n, adv = fixed_rollouts(tiny)
    one = update(load_checkpoint(tiny / "base")[0].train(), cfg, ids, out, n, adv, 1).state_dict()
    two = torch.load(tmp_path / "two.pt")
    base = load_checkpoint(tiny / "base")[0].state_dict()
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5
    assert max((one[k] - base[k]).abs().max().item() for k in one) > 1e-4  # the update did something


def steps_job(rank, tiny, result):  # noqa: F811
    dist.init_process_group("gloo")
    model, tok, _ = load_checkpoint(Path(tiny) / "base")
    cfg = train.parse_config(TINY)
    opt = new_optimizer(model, 1e-3)
    for step in range(3):
        groups = packed_prompts(doc_rng("steps", step), cfg, 4, 2)[rank::2]
        gen = torch.Generator().manual_seed(100 * step + rank)  # each rank samples its own rollouts
        bcr.rl_step(model, opt, tok, groups, 48, gen, cfg, world=2)
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    both = [torch.zeros_like(flat) for _ in range(2)]
    dist.all_gather(both, flat)
    if rank == 0:
        torch.save(both, result)
    dist.barrier()  # gloo aborts a process that leaves while the other still talks to it
    dist.destroy_process_group()


def test_ranks_hold_identical_weights_after_bcr_steps(tmp_path, tiny):  # noqa: F811
    spawn(steps_job, str(tiny), str(tmp_path / "w.pt"))
    a, b = torch.load(tmp_path / "w.pt")
    assert torch.equal(a, b)


def refused_job(rank, out):
    try:
        train.main(TINY + [f"--out_dir={out}", "--stage=pretrain"])
        code = 0
    except SystemExit as e:
        code = e.code
    Path(out, f"exit{rank}").write_text(str(code))


def test_a_refusal_by_rank_0_stops_every_rank(tmp_path):
    """Only rank 0 takes the out dir's lock: when it is refused (another run holds it), every rank
    must leave with the one-line error, not wait at its first collective until gloo times out."""
    holder = open(tmp_path / ".lock", "a+")
    fcntl.flock(holder, fcntl.LOCK_EX)
    spawn(refused_job, str(tmp_path), timeout=120)  # a rank waiting at a collective fails the test
    assert [(tmp_path / f"exit{r}").read_text() for r in (0, 1)] == ["2", "2"]

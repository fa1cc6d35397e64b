"""Is the loss right? nanoBCR's loss against TRL's own GRPOTrainer loss code (`_compute_loss`, not a
re-derivation of it) on one identical batch: the same tiny model's log-probabilities, completions,
masks and advantages; beta = 0, one update per batch, so the clip is inactive. The gradients agree;
the values differ by design (TRL's is the ratio surrogate). Skipped without trl."""
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import arena
from bcr import advantages, layout, pg_loss
from data import EOS, segments
from test_bcr import cfg
from test_sample import random_gpt

try:
    from trl import GRPOTrainer
except ImportError:
    pytest.skip("trl is not installed: TRL's loss is not compared", allow_module_level=True)

CAP = 8
IDS = [[5, 6, 7], [8, 9], [7, 7, 5, 6], [4]]
TOKENS = torch.tensor([[10, 11, EOS, 0, 0, 0, 0, 0], [12, 9, 9, 9, 9, 9, 9, EOS], [6, EOS, 0, 0, 0, 0, 0, 0],
                       [9, 8, 7, EOS, 0, 0, 0, 0]])
LENGTHS = torch.tensor([3, 8, 2, 4])
REWARDS = torch.tensor([1.1, 0.1, 0.6, 0.1])  # one group of G = 4


def completion_logps(model):
    """log p of each completion token (B, CAP) and its mask, from one forward of the model."""
    x, _, _ = layout(IDS, TOKENS, LENGTHS, torch.zeros(TOKENS.shape), True, (1, 1))  # (B, T)
    n_prompt = torch.tensor([len(p) for p in IDS])                                  # (B,)
    logits = model(x[:, :-1], segments(x[:, :-1], n_prompt)).float()                # (B, T-1, V)
    logp = F.log_softmax(logits, -1).gather(-1, x[:, 1:, None]).squeeze(-1)         # (B, T-1)
    rows = [logp[i, len(p) - 1:len(p) - 1 + CAP] for i, p in enumerate(IDS)]
    logps = torch.stack([F.pad(r, (0, CAP - len(r))) for r in rows])               # (B, CAP)
    mask = (torch.arange(CAP) < LENGTHS[:, None]).long()                            # (B, CAP)
    return logps, mask


def trl_loss(model, loss_type, adv):
    """GRPOTrainer._compute_loss on a trainer with only the state that code reads; its model call
    is replaced by our model's log-probabilities (TRL's needs a Hugging Face model)."""
    logps, mask = completion_logps(model)
    t = object.__new__(GRPOTrainer)
    accelerator = SimpleNamespace(gather=lambda x: x, reduce=lambda x, reduction: x, num_processes=1)
    vars(t).update(
        model=model, loss_type=loss_type, beta=0.0, epsilon_low=0.2, epsilon_high=0.2, aux_loss_enabled=False,
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        use_vllm=False, _entropy_bonus_enabled=False, current_gradient_accumulation_steps=1,
        max_completion_length=CAP, accelerator=accelerator, _metrics={"train": defaultdict(list)},
        args=SimpleNamespace(delta=None, steps_per_generation=1, use_bias_correction_kl=False),
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None))
    prompt = torch.ones(len(IDS), 1, dtype=torch.long)  # (B, 1) unused: the log-probs are given
    inputs = dict(prompt_ids=prompt, prompt_mask=prompt, completion_ids=TOKENS, completion_mask=mask,
                  advantages=adv, num_items_in_batch=mask.sum())
    return t._compute_loss(model, inputs)


def loss_and_grad(fn):
    model = random_gpt(0)
    model.train()
    loss = fn(model)
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_the_loss_and_its_gradient_are_trls(loss_type):
    """grpo: a per-sequence mean, then a mean over sequences (token_mean=False); dapo: a mean over the
    batch's tokens (token_mean, the default); dr_grpo: no std normalisation and a token sum over
    samples x cap (arena.drgrpo)."""
    adv = advantages(REWARDS.view(1, -1), std_norm=loss_type != "dr_grpo").view(-1)  # (B,)
    ours = adv
    if loss_type == "dr_grpo":
        ours, _ = arena.drgrpo(REWARDS, None, LENGTHS, CAP, len(IDS))
    c = cfg(token_mean=loss_type != "grpo")
    norm = float(LENGTHS.sum()) if c.token_mean else float(len(IDS))
    want = loss_and_grad(lambda m: trl_loss(m, loss_type, adv))
    got = loss_and_grad(lambda m: pg_loss(m, IDS, TOKENS, LENGTHS, ours[:, None].expand(-1, CAP), norm, c)[0])
    assert torch.allclose(got[1], want[1], atol=1e-6) and want[1].abs().sum() > 0
    # the values differ by design: TRL's surrogate is the ratio exp(log p - log p_old) times A, which
    # at the sampling policy is 1, so its value is ours with log p replaced by 1
    weights = LENGTHS.float() if c.token_mean else torch.ones(len(IDS))  # (B,) tokens or 1 a sequence
    assert abs(want[0] - (-(ours * weights).sum().item() / norm)) < 1e-6

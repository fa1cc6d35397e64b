"""
A small GPT, written out by hand: pre-norm blocks, RoPE attention, tied embeddings. Training runs
forward(idx) on right-padded rows (a pad *after* the real tokens is never seen by them: plain causal
attention); decoding runs forward(idx, pos, mask, cache, t0) with per-row positions and a key mask,
writing into a preallocated KVCache (sample.py drives it, a naive loop beside it to test against).
Learned absolute position embeddings failed to learn this task in a short run where RoPE learned it.
Beside the tokens the model reads a segment index, which problem a token belongs to (prompt line k
and solution k are segment k, data.segments), added like BERT's segment embeddings: a real LLM finds
"### Problem k" in its context unaided; a 0.8M-parameter model trained for minutes learns that
lookup slowly and loses it when RL moves the solutions around. Also here: the optimizer (Muon +
AdamW) and the device, precision and process policy. Checkpoints: checkpoint.py.
"""
import contextlib
import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# cuDNN's attention (PyTorch's pick on Hopper GPUs) plans every new sequence length (pytorch#155958):
# our lengths change every micro-batch and RL step; flash attention has no per-shape cost.
torch.backends.cuda.enable_cudnn_sdp(False)

@dataclass
class GPTConfig:
    vocab_size: int = 24   # set from the tokenizer
    block_size: int = 640  # longest prompt + completion the RoPE tables cover
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    n_seg: int = 16        # segment (problem index) embeddings: up to n_seg - 2 problems

    def __post_init__(self):  # a bad shape costs one line here, not a tensor error deep in GPT()
        for k, v in asdict(self).items():
            if type(v) is not int or not 1 <= v <= 2 ** 16:
                raise ValueError(f"{k} must be an integer from 1 to 65536 (got {v!r})")
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise ValueError("n_embd must be a multiple of n_head with an even head size (RoPE)")

def rope_tables(block_size, head_dim, base=1e5):
    """Tables for rotating channel pairs (i, i + hd/2) by their position's angle, computed once:
    cos (Tmax, hd) is [cos, cos] and sin (Tmax, hd) is [-sin, sin], so that apply_rope is
    x * cos + roll(x) * sin: four ops, no split and concatenate."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)  # (hd/2,)
    angles = torch.outer(torch.arange(block_size).float(), inv_freq)          # (Tmax, hd/2)
    return angles.cos().repeat(1, 2), torch.cat((-angles.sin(), angles.sin()), 1)

def apply_rope(x, cos, sin):
    """x (..., T, hd): first half x1 * cos - x2 * sin, second half x2 * cos + x1 * sin, where
    roll(x) = [x2, x1]. The same IEEE operations as the textbook form, so bitwise the same result."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # bf16 stays bf16 on CUDA (fp32 tables would promote q, k)
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin

class KVCache:
    """Keys and values of every layer, allocated once at full length so shapes never change
    between decode steps (what lets the CUDA path capture a step in a graph)."""

    def __init__(self, cfg, batch, length, device, dtype):
        hd = cfg.n_embd // cfg.n_head
        shape = (cfg.n_layer, batch, cfg.n_head, length, hd)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (L, B, nh, S, hd)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)  # one matmul, not three
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x, cos, sin, mask, cache, layer, t0):
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        # split/unbind/squeeze, not indexing: indexing's backward writes each gradient into a zeroed
        # copy of the whole qkv tensor
        qk, v = qkv.split([2, 1])                                 # (2, B, nh, T, hd), (1, B, nh, T, hd)
        q, k = apply_rope(qk, cos, sin).unbind(0)                 # q and k rotated at once
        v = v.squeeze(0)                                          # (B, nh, T, hd) each
        if cache is not None:
            # write this chunk at cache slots t0..t0+T-1; t0 may be a 1-element tensor so that the
            # step has no Python-int dependence (graph capture). Attend over the first S slots,
            # S set by the mask's width: t0+T on the eager path, the whole cache on the static
            # path (the mask hides the slots not written yet).
            if torch.is_tensor(t0):  # index_copy_: no host sync, safe inside a CUDA graph
                idx = t0 + torch.arange(T, device=x.device)                    # (T,)
                cache.k[layer].index_copy_(2, idx, k.to(cache.k.dtype))
                cache.v[layer].index_copy_(2, idx, v.to(cache.v.dtype))
            else:
                cache.k[layer][:, :, t0:t0 + T] = k.to(cache.k.dtype)
                cache.v[layer][:, :, t0:t0 + T] = v.to(cache.v.dtype)
            S = mask.shape[-1]
            k, v = cache.k[layer][:, :, :S], cache.v[layer][:, :, :S]  # (B, nh, S, hd)
        k, v = k.to(q.dtype), v.to(q.dtype)
        if T == 1 and cache is not None:
            # decoding one token: mask is additive (B, 1, 1, S), 0 or -inf. Two small batched
            # matmuls beat the fused kernel for one query at this size on CPU
            nh, S, hd = self.n_head, k.shape[2], C // self.n_head
            att = torch.baddbmm(mask.expand(B, nh, 1, S).flatten(0, 1).to(q.dtype), q.flatten(0, 1),
                                k.flatten(0, 1).transpose(1, 2), alpha=hd ** -0.5)  # (B*nh, 1, S)
            y = torch.bmm(att.softmax(-1), v.flatten(0, 1)).view(B, nh, 1, hd)
        else:  # mask None: plain causal (training); else (B, 1, T, S) bool, True = may attend
            # CPU bf16 attention is slower than fp32 (its backward most of all): under CPU autocast
            # (the RL update) it runs in fp32, without which the bf16 update gains nothing
            if torch.is_autocast_enabled("cpu"):
                q, k, v = q.float(), k.float(), v.float()
            with torch.autocast("cpu", enabled=False):
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))                # (B, T, C)

class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd, bias=False)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd, bias=False)
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=False)
        self.out = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x, cos, sin, mask, cache, layer, t0):
        x = x + self.attn(self.ln1(x), cos, sin, mask, cache, layer, t0)
        return x + self.out(F.silu(self.fc(self.ln2(x))))  # SiLU: much cheaper than erf-GELU on CPU

class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wse = nn.Embedding(cfg.n_seg, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=False)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: fewer parameters, same quality at this size
        cos, sin = rope_tables(cfg.block_size, cfg.n_embd // cfg.n_head)
        self.register_buffer("cos", cos, persistent=False)  # (Tmax, hd)
        self.register_buffer("sin", sin, persistent=False)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: shrink the residual-branch outputs
            if name.endswith(("proj.weight", "out.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx, seg, pos=None, mask=None, cache=None, t0=0):
        """idx (B, T) -> logits (B, T, V). seg (B, T): problem index of each token (data.segments).
        pos (B, T): per-row positions (default 0..T-1).
        mask (B, 1, T, S) bool: which keys each query may see (default causal, no cache); for
        one-token decoding (T == 1 with a cache) an additive float mask, 0 or -inf.
        cache/t0: decode mode, keys and values go to cache slots t0..t0+T-1."""
        B, T = idx.shape
        if pos is None:
            cos, sin = self.cos[:T], self.sin[:T]                  # (T, hd), broadcast over B, nh
        else:
            cos, sin = self.cos[pos].unsqueeze(1), self.sin[pos].unsqueeze(1)  # (B, 1, T, hd)
        x = self.wte(idx) + self.wse(seg.clamp(max=self.cfg.n_seg - 1))  # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, mask, cache, i, t0)
        return self.lm_head(self.ln_f(x))                           # (B, T, V)

# ----------------------------------------------------------------------------- optimizer

def new_optimizer(model, lr, muon_lr=0.0):
    """AdamW for every weight; or, with muon_lr > 0 (pretraining), Muon for the blocks' matrices and
    AdamW for the rest (the embedding, also the tied head, and the norms), nanochat's split. Muon
    (K. Jordan et al., 2024) is SGD with Nesterov momentum whose update is replaced by the nearest
    semi-orthogonal matrix, so every direction of a matrix moves at one rate: the base learns in far
    fewer steps. RL keeps AdamW (its lr was tuned with it). No weight decay: it slowed copying down."""
    if muon_lr <= 0:
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
    rest, mats = [], []
    for n, p in model.named_parameters():
        (mats if n.startswith("blocks.") and p.ndim == 2 else rest).append(p)
    return MuonAdamW([{"params": mats, "muon": True, "lr_mult": muon_lr / lr}, {"params": rest}],
                     lr=lr, betas=(0.9, 0.95), weight_decay=0.0)

def orthogonalize(G, steps=5):
    """U V^T of G = U S V^T, approximately: a quintic Newton-Schulz iteration (Muon's coefficients)
    pushes every singular value towards 1 with a few matmuls, no SVD. G (m, n) -> (m, n)."""
    X = G / (G.norm() + 1e-7)
    wide = X.shape[0] <= X.shape[1]
    X = X if wide else X.T
    for _ in range(steps):
        A = X @ X.T
        X = 3.4445 * X + (-4.7750 * A + 2.0315 * A @ A) @ X
    return X if wide else X.T

class MuonAdamW(torch.optim.AdamW):
    """Muon on the param groups marked muon, AdamW on the rest. A semi-orthogonal (out, in) update
    has RMS 1/sqrt(max(out, in)); the factor sqrt(max(1, out/in)) makes it 1/sqrt(in) for every shape."""

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            if not g.get("muon"):
                continue
            for p in g["params"]:
                st = self.state[p]
                if not st:  # "step" too: AdamW's load_state_dict expects it in every state
                    st.update(step=torch.tensor(0.0), momentum=torch.zeros_like(p))
                st["step"] += 1
                buf = st["momentum"]
                buf.mul_(0.95).add_(p.grad)
                u = orthogonalize(p.grad.add(buf, alpha=0.95))
                p.add_(u, alpha=-g["lr"] * max(1.0, p.shape[0] / p.shape[1]) ** 0.5)
                p.grad = None  # AdamW below skips it
        super().step()

# ----------------------------------------------------------------------------- device, precision, processes

def pick_device(name="auto"):
    """The one place that decides the device: cuda, then mps, then cpu. A named one must be here."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device={name!r}: expected auto, cpu, cuda, cuda:K or mps") from None
    here = {"cpu": True, "mps": mps, "cuda": (device.index or 0) < torch.cuda.device_count()}
    if not here.get(device.type):
        raise ValueError(f"--device={name}: no such device on this machine")
    return device

def autocast(device, bf16=None):
    """bf16 autocast, by default on CUDA only: on CPU, one-token decoding and the small pretraining
    micro-batches are overhead-bound, and bf16's casts cost more than they save.
    bf16=True asks for it on CPU too (the RL update, see update_bf16); False: fp32."""
    if bf16 or (bf16 is None and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()

def update_bf16(update_dtype, device):
    """Whether the RL update's forward runs under bf16 autocast. auto: on CUDA, and on a CPU that
    multiplies bf16 natively (AVX512-BF16 or AMX), where this one big batch runs faster than fp32
    (tests/bench.py --what=rl; attention stays fp32, see Attention); not on other CPUs, which would
    emulate bf16. Sampling and pretraining stay fp32 on CPU."""
    if update_dtype != "auto":
        return update_dtype == "bf16"
    native = any(getattr(torch.cpu, f, lambda: False)()  # private helpers: absent ones count as no
                 for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return device.type == "cuda" or (device.type == "cpu" and native)

def setup(cfg):
    """(rank, world, device) for train.py's cfg. A no-op for one process; under torchrun, one process
    per device (CUDA: nccl, one GPU each) or per CPU share (gloo)."""
    device, env = pick_device(cfg.device), os.environ
    names = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_PORT")
    if not set(names[:4]) & set(env):
        return 0, 1, device
    try:  # torchrun sets all of these; a stray RANK alone would train a process that never saves
        v = {k: int(env[k]) for k in names if k in env}
        local_rank, rank, world, local_world, port = (v[k] for k in names)  # KeyError: the missing one
        if not (0 <= rank < world and 0 <= local_rank < local_world <= world and 0 < port < 65536
                and env["MASTER_ADDR"]):
            raise ValueError("RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE or MASTER_PORT out of range")
    except (KeyError, ValueError) as e:
        raise ValueError(f"this environment is not torchrun's ({e}): start several processes with torchrun") \
            from None
    if world > min(cfg.prompts, cfg.pt_docs):
        raise ValueError(f"{world} processes need --prompts and --pt_docs >= {world} (each takes a share)")
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        else:  # K processes on one CPU: share the cores instead of oversubscribing them
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device

def all_mean(values, world):
    """Average a dict of floats over processes (for logging)."""
    if world == 1:
        return values
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"  # NCCL reduces GPU tensors only
    t = torch.tensor([float(v) for v in values.values()], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: v / world for k, v in zip(values, t.tolist())}

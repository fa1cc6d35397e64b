"""
The sampler: a batch of *different* prompts decoded together with a preallocated KV cache.
Prompts are left-padded to one length Tp, so every row's next token goes to the same cache slot;
each row keeps its own RoPE position (slot minus its padding) and a key mask hides the pads. Rows
stop on their own: after <eos>, or at their hard cap of new tokens, a row only writes <pad>.
CUDA-aware: the decode loop asks the host for one value, "are all rows done?", every 16 tokens;
the cache, masks and RoPE tables have fixed shapes, so the one-token step can be captured in a
CUDA graph; bf16 autocast on CUDA. Three decode paths, tested to agree: eager (CPU's default:
attends over the slots written so far, drops finished rows once a quarter are done), static (over
the whole cache behind a mask, no Python int in the step) and graph (the static step captured
once, CUDA only); and generate_naive() beside them, recomputing the whole sequence every token.

CLI:  python sample.py --ckpt out/bcr-s1 --problems "47+85, 52-17"
"""
import argparse
import os
import signal
import sys
import warnings

if __name__ == "__main__":  # Ctrl-C while torch loads (seconds): out at once, nothing is written yet
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))

import torch  # noqa: E402

import checkpoint  # noqa: E402
from data import EOS, NEWLINE, PAD, encode, parse_problems, prompt, segments  # noqa: E402
from model import KVCache, autocast, pick_device  # noqa: E402

def left_pad(prompts, device):
    """idx (B, Tp) left-padded, pos (B, Tp) per-row positions, valid (B, Tp) key mask."""
    Tp = max(len(p) for p in prompts)
    idx = torch.tensor([[PAD] * (Tp - len(p)) + list(p) for p in prompts], device=device)
    pad = torch.tensor([Tp - len(p) for p in prompts], device=device)          # (B,)
    ar = torch.arange(Tp, device=device)
    return idx, (ar - pad[:, None]).clamp(min=0), ar >= pad[:, None]

def prefill_mask(valid):
    """(B, 1, T, T) bool: causal, pads hidden as keys. FOOTGUN: a pad *query* would see no key at
    all, its softmax would be NaN, and NaN keys/values in the cache poison real rows (0 * NaN is
    NaN). Letting every query see itself keeps pad rows finite; nothing real ever attends to them."""
    T = valid.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=valid.device).tril()  # (T, T)
    eye = torch.eye(T, dtype=torch.bool, device=valid.device)
    return ((causal & valid[:, None, :]) | eye)[:, None]                       # (B, 1, T, T)

def next_token(logits, temperature, top_k, generator, rows=None, batch=None):
    """logits (B', V) -> tokens (B',), never <pad>: argmax(p / E), E ~ Exp(1) from the explicit
    generator, is an exact draw from p with no host sync (unlike torch.multinomial on CUDA). rows:
    which rows of the whole batch these are once generate() dropped finished ones; E is drawn for
    the whole batch all the same, so every row gets the draw it would have had with none dropped."""
    logits = logits.float()
    logits[:, PAD] = float("-inf")
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)                                                          # (B, V)
    noise = torch.empty(batch or len(probs), probs.shape[1], device=probs.device)    # (B, V)
    noise.exponential_(generator=generator)
    return (probs / (noise if rows is None else noise[rows])).argmax(-1)

def prefill(model, prompts, length):
    """Logits (B, V) after each prompt, and a KVCache of B rows and `length` slots holding them.
    Identical prompts (the G samples of an RL group) are run once and their cache rows copied."""
    device = model.wte.weight.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    distinct = {}
    inv = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]
    inv = torch.tensor(inv, device=device)                                # (B,)
    idx, pos, valid = left_pad(list(distinct), device)                    # (U, Tp) each
    cache = KVCache(model.cfg, len(distinct), length, device, dtype)
    with autocast(device):
        logits = model(idx, segments(idx, idx.shape[1]), pos, prefill_mask(valid), cache, 0)  # (U, Tp, V)
    if len(distinct) < len(prompts):
        cache.k, cache.v = cache.k[:, inv], cache.v[:, inv]               # (L, B, nh, S, hd)
    return logits[inv, -1], cache

class Decoder:
    """generate()'s state: the cache, each row's last token, position, segment (its problem), cap
    and done flag, and a key bias over the whole cache, 0 where a slot holds a real token and -inf
    for pads and slots not written yet (one-token steps take it as their additive mask, updated in
    place). Two ways to take a step, the same tokens from each: eager and static."""

    def __init__(self, model, prompts, caps, n_steps):
        self.model, self.device, B = model, model.wte.weight.device, len(prompts)
        idx, pos, valid = left_pad(prompts, self.device)                  # (B, Tp) each
        self.Tp = idx.shape[1]
        self.logits, self.cache = prefill(model, prompts, self.Tp + n_steps)
        self.bias = torch.full((B, 1, 1, self.Tp + n_steps), float("-inf"), device=self.device)
        self.bias[:, 0, 0, :self.Tp].masked_fill_(valid, 0.0)            # (B, 1, 1, S)
        self.tok, self.pos = idx[:, -1].clone(), pos[:, -1].clone()       # (B,) each
        self.t = torch.tensor([self.Tp - 1], device=self.device)          # the slot written last
        self.seg = torch.ones(B, dtype=torch.long, device=self.device)    # the completion's first problem
        self.rows = torch.arange(B, device=self.device)                   # the rows still decoding
        self.caps, self.done = caps, torch.zeros(B, dtype=torch.bool, device=self.device)

    def eager(self, i):
        """Token i's step, attending over the slots written so far: the plainest (Python ints inside)."""
        self.pos.add_(1)
        self.bias[..., self.Tp + i] = 0.0
        with autocast(self.device):
            logits = self.model(self.tok[:, None], self.seg[:, None], self.pos[:, None],
                                self.bias[..., :self.Tp + i + 1], self.cache, self.Tp + i)  # (B', 1, V)
        self.seg.add_(self.tok == NEWLINE)  # after a newline, the next problem
        return logits[:, -1]

    def static(self, i=None):
        """The same step over the whole cache behind the bias: fixed shapes only (CUDA-graph ready)."""
        self.pos.add_(1)
        self.t.add_(1)
        self.bias.index_fill_(3, self.t, 0.0)
        with autocast(self.device):
            logits = self.model(self.tok[:, None], self.seg[:, None], self.pos[:, None], self.bias,
                                self.cache, self.t)                       # (B, 1, V)
        self.seg.add_(self.tok == NEWLINE)
        return logits[:, -1]

    def drop(self, alive, nxt):
        """Keep the rows in alive (B'',), cache included: a straggler need not keep the batch going."""
        for name in ("rows", "tok", "pos", "seg", "bias", "caps", "done"):
            setattr(self, name, getattr(self, name)[alive])
        self.cache.k, self.cache.v = self.cache.k[:, alive], self.cache.v[:, alive]  # copies
        return nxt[alive]

@torch.inference_mode()
def generate(model, prompts, max_new, temperature=1.0, top_k=0, generator=None, mode="auto", drop_done=True):
    """Decode a batch of token-id prompts of any lengths.
    max_new: int or one cap per row (the hard cap on new tokens, <eos> included).
    mode: 'eager' | 'static' | 'graph' (see the module docstring), the same tokens from each; 'auto':
    graph on CUDA, eager elsewhere.
    drop_done: eager mode drops finished rows (False keeps the batch whole: same tokens, slower).
    Returns tokens (B, max(max_new)), <pad> after each row's end, and lengths (B,): the number of
    new tokens per row, <eos> included. A row whose tokens hold no <eos> was cut by its cap."""
    # 1) prefill the left-padded prompts into a cache long enough for every new token
    device = model.wte.weight.device
    mode = ("graph" if device.type == "cuda" else "eager") if mode == "auto" else mode
    B = len(prompts)
    caps = torch.as_tensor(max_new, device=device).expand(B)              # (B,)
    n_steps = int(caps.max())
    dec = Decoder(model, prompts, caps, n_steps)
    logits = dec.logits                                                   # (B, V)
    step = dec.eager if mode == "eager" else dec.static
    # 2) graph mode: the static step captured once, replayed for every token
    if mode == "graph" and n_steps > 1:
        try:
            graph, graph_logits = capture(dec.static, (dec.pos, dec.t, dec.bias, dec.seg), device)
            step = lambda i: (graph.replay(), graph_logits)[1]  # noqa: E731
        except RuntimeError as e:  # the fallback gives the same tokens, just slower
            warnings.warn(f"CUDA graph capture failed, decoding eagerly instead ({str(e).splitlines()[0]})")
    out = torch.full((B, n_steps), PAD, device=device)
    for i in range(n_steps):
        # 3) sample the next tokens, record them, stop the rows that ended or met their cap
        nxt = next_token(logits, temperature, top_k, generator, dec.rows, B)  # (B',)
        nxt = nxt.masked_fill(dec.done, PAD)
        out[dec.rows, i] = nxt
        dec.done |= (nxt == EOS) | (dec.caps <= i + 1)
        if i + 1 == n_steps:
            break
        # 4) every 16 tokens, the loop's only host sync: which rows go on (none: stop)
        if i % 16 == 15:
            alive = (~dec.done).nonzero()[:, 0]                           # (B'',)
            if len(alive) == 0:
                break
            if mode == "eager" and drop_done and len(alive) <= 0.75 * len(dec.done):
                nxt = dec.drop(alive, nxt)
        # 5) feed the tokens back
        dec.tok.copy_(nxt)
        logits = step(i)
    return out, (out != PAD).sum(1)

def capture(step, state, device):
    """Record step() in a CUDA graph. Warm-up runs (on a side stream, as CUDA graphs require)
    advance the step's in-place state, so it is saved before and restored after, even on failure.
    The cache slots they write are hidden by the restored bias until real tokens overwrite them."""
    saved = [s.clone() for s in state]
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = step()
        return graph, logits
    finally:
        for s, v in zip(state, saved):
            s.copy_(v)

@torch.inference_mode()
def generate_naive(model, prompts, max_new, temperature=1.0, top_k=0, generator=None):
    """The obvious loop, kept as the reference: no cache, the whole sequence recomputed for every
    new token. Same layout, same sampling, so it must produce the same tokens as generate()."""
    device = model.wte.weight.device
    idx, pos, valid = left_pad(prompts, device)
    out = torch.full((len(prompts), max_new), PAD, device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    Tp = idx.shape[1]
    for i in range(max_new):
        with autocast(device):
            logits = model(idx, segments(idx, Tp), pos, prefill_mask(valid))[:, -1]  # (B, V)
        nxt = next_token(logits, temperature, top_k, generator).masked_fill(done, PAD)
        out[:, i] = nxt
        done |= nxt == EOS
        idx = torch.cat([idx, nxt[:, None]], 1)
        pos = torch.cat([pos, pos[:, -1:] + 1], 1)
        valid = torch.cat([valid, torch.ones_like(valid[:, :1])], 1)
    return out, (out != PAD).sum(1)

class ArgParser(argparse.ArgumentParser):
    """argparse whose refusals are one line (main prints it), not a usage dump."""

    def error(self, message):
        raise ValueError(f"{self.prog}: {message}")

    def parse_args(self, argv=None):
        args = super().parse_args(argv)
        for k, v in vars(args).items():  # argparse lets `--name=--` through as an empty list
            if isinstance(v, list):
                raise ValueError(f"{self.prog}: --{k}: expected one value")
        return args

def main(argv=None):
    from reward import score  # only the CLI needs it

    ap = ArgParser(prog="sample.py", description="Solve arithmetic problems with a nanoBCR checkpoint.")
    ap.add_argument("--ckpt", default="out/bcr-s1", help="checkpoint folder (model.safetensors, config.json)")
    ap.add_argument("--problems", default="47+85, 52-17", help="comma-separated problems, e.g. '47+85, 9-3'")
    ap.add_argument("--max_new", type=int, default=0, help="hard cap on new tokens (0: all the context has)")
    ap.add_argument("--temperature", type=float, default=1.0, help="0 means greedy")
    ap.add_argument("--top_k", type=int, default=0, help="sample from the k most likely tokens only (0: all)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    try:
        args = ap.parse_args(argv)
        if not (args.temperature == 0 or 0.01 <= args.temperature <= 100):
            raise ValueError("--temperature: 0 (greedy) or 0.01 to 100")
        if min(args.top_k, args.max_new, args.seed) < 0 or args.seed >= 2 ** 63:
            raise ValueError("--top_k, --max_new and --seed must be >= 0 (--seed below 2**63)")
        problems = parse_problems(args.problems)
        device = pick_device(args.device)
        model, tok, _ = checkpoint.load(args.ckpt, device)
        ids = encode(tok, [prompt(problems)])[0]
        room = model.cfg.block_size - len(ids)
        if len(problems) > model.cfg.n_seg - 2 or room < 1 or args.max_new > room:
            raise ValueError(f"{len(problems)} problems ({len(ids)} prompt tokens) leave {max(room, 0)} of "
                             f"the model's {model.cfg.block_size} context tokens for the answer (--max_new="
                             f"{args.max_new}); at most {model.cfg.n_seg - 2} problems at once")
        gen = torch.Generator(device).manual_seed(args.seed)
        out, n = generate(model, [ids], args.max_new or room, args.temperature, args.top_k, gen)
    except (ValueError, OSError) as e:  # bad input, or a file that cannot be read (named in the message)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    text = tok.decode(out[0, :n[0]].tolist())
    r = score(text, problems, truncated=EOS not in out[0].tolist())
    lines = [prompt(problems) + text]
    for k, (p, a) in enumerate(zip(problems, r.answers), 1):
        how = f"{a} ({'correct' if r.correct[k - 1] else 'wrong'}, " \
              f"{'directly' if r.direct[k - 1] else 'with steps'})"
        lines.append(f"problem {k}: {p[0]}{p[1]}{p[2]} -> {how if a is not None else 'no answer'}")
    lines.append(f"{int(n[0])} tokens, {r.loops} re-check loops, "
                 f"{'cut by the cap' if r.truncated else 'finished'}")
    try:
        print("\n".join(lines), flush=True)
    except BrokenPipeError:  # the reader left early (`| head`): no traceback, and none from exit's flush
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())

if __name__ == "__main__":
    main()

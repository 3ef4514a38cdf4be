"""Greedy generation on one process: prefill the prompt through a KV cache, then decode one token at
a time from it. Prefill is one forward over all C prompt tokens, and its end is the time to first
token (TTFT); decode (the paper's extension phase) feeds each new token back at position len(cache).
The last rank of KV-Runahead and of TSP decodes with `decode` from the cache the prefill filled.
"""
import time

import torch


def sync(device):
    """Wait until the device has done what was queued (a GPU runs behind the host)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def generate(model, prompt, max_new_tokens, cache, stop_at_eos=False):
    """Greedy decoding on one process: prefill the prompt (B, C), then one token per step. Returns
    (tokens (B, max_new_tokens), ttft_s, seconds per output token after the first)."""
    dev = prompt.device
    sync(dev)
    t0 = time.perf_counter()
    logits = model(prompt, cache, 0, last_only=True)
    tok = logits[:, -1].argmax(-1, keepdim=True)       # (B, 1)
    sync(dev)
    ttft = time.perf_counter() - t0
    out = decode(model, tok, cache, max_new_tokens - 1, stop_at_eos)
    sync(dev)
    tpot = (time.perf_counter() - t0 - ttft) / max(out.shape[1] - 1, 1)
    return out, ttft, tpot


@torch.no_grad()
def decode(model, tok, cache, steps, stop_at_eos=False, graphs=True, math_path=False):
    """The extension phase: feed back each greedy token through the KV cache. Returns (B, 1+steps).

    This loop is what runs on a CPU. On a GPU one step is a few hundred small kernels, and launching
    them takes longer than running them: unless graphs=False, fast/decode.py runs gpt-fast's static
    step instead (position a tensor, K/V written in place) and replays it as one CUDA graph; the
    tests hold its tokens to this loop's (tests/test_fast.py, tests/test_gpu.py)."""
    if graphs and cache.kv[0].is_cuda and not math_path:
        import fast.decode                             # the GPU's decode (fast/system.py: the seam)
        if fast.decode.takes(model, cache):
            return fast.decode.decode(model, tok, cache, steps, stop_at_eos)
    out = [tok]
    for _ in range(steps):
        if stop_at_eos and (tok == model.cfg.eos_token_id).all():
            break
        tok = model(tok, cache, len(cache), last_only=True, math_path=math_path)[:, -1].argmax(-1, keepdim=True)
        out.append(tok)
    return torch.cat(out, dim=1)

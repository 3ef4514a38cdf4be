"""Split-KV for a short chunk after a long prefix, measured before it is installed (it was not).

FlashAttention-2 runs one block of threads per head and 128 queries, so 128 queries of Falcon-7B's 71
heads are 71 blocks on an H200's 132 SMs, each walking the whole prefix. Split-KV cuts the prefix
into s pieces, run as s batch entries of one FA2 call (views of the cache, no copy), adds the own
block (lower-right causal) and merges the s+1 outputs by log-sum-exp. Against today's paths: FA2 in
one call and cuDNN's two blocks (fast/attention.py's `blocks`). Each timed as a CUDA graph, median of 50;
error against float64 math.

    python -m bench.split_kv [--out results/attention-split-kv.json]    (a GPU; --device cpu checks the math)
"""
import argparse
import json

import torch
import torch.nn.functional as F

import cli
from fast.attention import blocks

def fa(q, k, v, causal, scale):
    if q.is_cuda:
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, scale=scale)[:2]
    else:
        r = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(r, 1), v.repeat_interleave(r, 1)
        T, Lk = q.shape[2], k.shape[2]                  # CPU check only: lower-right causal by hand
        mask = (torch.arange(Lk) <= (Lk - T + torch.arange(T))[:, None]) if causal else torch.ones(T, Lk, dtype=bool)
        att = (q @ k.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
        lse = att.logsumexp(-1)
        o = (att - lse[..., None]).exp() @ v
    return o, lse


def split(q, k, v, start, scale, s):
    """k, v (B, n_kv, start+T, hs). The first s*m keys (m = start // s) as s non-causal pieces in one
    call, keys s*m.. with the chunk's own block lower-right causal in a second, merged."""
    B, nh, T, hs = q.shape
    m = start // s
    kp = k[:, :, :s * m].unflatten(2, (s, m)).transpose(1, 2).flatten(0, 1)   # (B*s, n_kv, m, hs): a view if B == 1
    vp = v[:, :, :s * m].unflatten(2, (s, m)).transpose(1, 2).flatten(0, 1)
    assert B > 1 or kp.data_ptr() == k.data_ptr()
    qp = q.repeat(s, 1, 1, 1) if B == 1 else q.repeat_interleave(s, 0)
    a, lse_a = fa(qp, kp, vp, False, scale)                                  # (B*s, nh, T, hs)
    b, lse_b = fa(q, k[:, :, s * m:], v[:, :, s * m:], True, scale)           # lower-right causal
    o = torch.cat([a.unflatten(0, (B, s)), b[:, None]], 1).float()          # (B, s+1, nh, T, hs)
    lse = torch.cat([lse_a.unflatten(0, (B, s)), lse_b[:, None]], 1)[..., None]   # (B, s+1, nh, T, 1)
    w = (lse - lse.logsumexp(1, keepdim=True)).exp()
    return (o * w).sum(1).to(q.dtype)


def ref(q, k, v, start, scale):
    T, Lk = q.shape[2], k.shape[2]
    r = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(r, 1).double(), v.repeat_interleave(r, 1).double()
    mask = torch.arange(Lk, device=q.device) <= (start + torch.arange(T, device=q.device))[:, None]
    return F.scaled_dot_product_attention(q.double(), k, v, attn_mask=mask, scale=scale)


def timed(fn, n=50):
    for _ in range(5):
        out = fn()
    if not out.is_cuda:                                 # the CPU run checks the math only
        return float("nan")
    g = torch.cuda.CUDAGraph()                          # graphed, as under --graphs: no launch gaps
    with torch.cuda.graph(g):
        fn()
    ts = []
    for _ in range(n):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        torch.cuda.synchronize()
        ts.append(e0.elapsed_time(e1))
    return sorted(ts)[n // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--out")
    opt = ap.parse_args()
    dev = opt.device
    dt = torch.float16 if dev == "cuda" else torch.float32
    rows = []
    shapes = {"falcon7b": (71, 1, 64), "llama7b": (32, 32, 128)}
    Ts, Ps = ((128, 256, 512, 1024), (2048, 8192, 14336)) if dev == "cuda" else ((16,), (96, 200))
    for name, (nh, nkv, hs) in shapes.items():
        for T in Ts:
            for P in Ps:
                torch.manual_seed(0)
                q = torch.randn(1, nh, T, hs, device=dev, dtype=dt)
                k = torch.randn(1, nkv, P + T, hs, device=dev, dtype=dt)
                v = torch.randn(1, nkv, P + T, hs, device=dev, dtype=dt)
                scale = hs ** -0.5
                want = ref(q, k, v, P, scale)
                fns = {"fa2": lambda: fa(q, k, v, True, scale)[0]}
                if dev == "cuda":
                    fns["cudnn2"] = lambda: blocks(q, k, v, P, scale)
                for s in (2, 3, 4, 6, 8, 12, 16):
                    fns[f"split{s}"] = lambda s=s: split(q, k, v, P, scale, s)
                row = dict(model=name, T=T, P=P)
                for n, fn in fns.items():
                    try:
                        err = (fn().double() - want).abs().max().item()
                        row[n] = (round(timed(fn), 4), f"{err:.1e}")
                    except Exception as e:                 # noqa: BLE001 (a kernel that refuses a shape)
                        row[n] = repr(e)[:80]
                rows.append(row)
                print(json.dumps(row), flush=True)
    if opt.out:
        with cli.replace_whole(opt.out) as tmp, open(tmp, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

"""On a CUDA GPU only: these are skipped on machines without one (CI has none), and were run on the
lent H200 (BENCHMARKS.md, "The GPU data path"). The CPU path and its bitwise equality with HF are
tested everywhere else; here the claims are about the GPU's own kernels and copies.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

import fast.decode
import generate
import model
from fast import attention
from fast.compiled import fuse
from fast.system import mps
from kvcache import KVCache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MPIRUN = os.path.join(os.path.dirname(sys.executable), "mpirun")
MPIRUN = MPIRUN if os.path.exists(MPIRUN) else shutil.which("mpirun")    # a GPU box's system MPI
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,P", [(2048, 14336), (1024, 15360), (4096, 4096)])
@pytest.mark.parametrize("heads", [(32, 32, 128), (32, 8, 128), (71, 1, 64)], ids=["mha", "gqa", "falcon-mq"])
def test_cudnn_blocks_are_as_close_to_fp32_as_the_unsplit_kernel(T, P, dtype, heads):
    """Bound, not bitwise: the two cuDNN blocks merged by log-sum-exp differ from the same attention
    in fp32 by at most twice what PyTorch's unsplit lower-right kernel differs, and attend() takes
    the block path for these shapes (Llama-7B's heads, grouped ones, Falcon-7B's one KV head)."""
    nh, nkv, hs = heads
    g = torch.Generator(device="cuda").manual_seed(T + P)
    q = torch.randn(1, nh, T, hs, device="cuda", dtype=dtype, generator=g)
    k, v = (torch.randn(1, nkv, P + T, hs, device="cuda", dtype=dtype, generator=g) for _ in range(2))
    cfg = model.Config(arch="llama", dim=nh * hs, n_heads=nh, n_kv_heads=nkv, head_dim=hs)
    assert attention.cudnn_blocks(q, k, P)
    mask = causal_lower_right(T, P + T)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True)
    unsplit = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    ours = model.attend(q, k, v, P, cfg)
    e_ours, e_unsplit = ((x.float() - ref).abs().max().item() for x in (ours, unsplit))
    assert e_ours <= 2 * e_unsplit, (e_ours, e_unsplit)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads", [(32, 32, 128), (32, 8, 128), (71, 1, 64)], ids=["mha", "gqa", "falcon-mq"])
def test_a_small_chunk_after_a_prefix_is_flash_attentions_lower_right_kernel(dtype, heads):
    """torch.equal: below the cuDNN blocks' size, attend() calls FlashAttention-2 itself, and gets
    what SDPA gives for CausalBias's lower-right mask (the same kernel); dense gets the masked call."""
    nh, nkv, hs = heads
    T, P = 128, 1000
    g = torch.Generator(device="cuda").manual_seed(T + P)
    q = torch.randn(1, nh, T, hs, device="cuda", dtype=dtype, generator=g)
    k, v = (torch.randn(1, nkv, P + T, hs, device="cuda", dtype=dtype, generator=g) for _ in range(2))
    cfg = model.Config(arch="llama", dim=nh * hs, n_heads=nh, n_kv_heads=nkv, head_dim=hs)
    assert not attention.cudnn_blocks(q, k, P)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(T, P + T), enable_gqa=True,
                                          scale=hs ** -0.5)
    assert torch.equal(model.attend(q, k, v, P, cfg), want)
    mask = torch.arange(P + T, device="cuda") <= torch.arange(P, P + T, device="cuda")[:, None]
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True, scale=hs ** -0.5)
    assert torch.equal(model.attend(q, k, v, P, cfg, dense=True), dense)


def test_staged_slots_on_the_gpu():
    """The staged route's shared slots with device tensors (side streams, pinned shared window):
    a 3-rank chain of 6 layers through 2 slots, then all-gathers; every tensor arrives intact."""
    code = """
import torch, transport
from fast.staged import StagedTransport
comm, dev = transport.init('cuda')
t = StagedTransport(comm, dev, polite=False)
r, p = comm.rank, comm.size
S = [1000 * (i + 1) for i in range(p)]
t.reserve(0 if r == p - 1 else S[r] * 512 * 2)
for layer in range(6):
    if r > 0:
        x = t.recv((S[r - 1], 512), torch.float16, r - 1, tag=layer)
        assert torch.equal(x, torch.full_like(x, r - 1 + layer / 8)), layer
    if r < p - 1:
        t.isend(torch.full((S[r], 512), r + layer / 8, dtype=torch.float16, device=dev), r + 1, tag=layer)
    spans = [[(64 * i * (i + 1) // 2, 64 * (i + 1))] for i in range(p)]
    g = torch.zeros(2, 64 * p * (p + 1) // 2 + 8, device=dev)[:, :-8]   # a block of a larger tensor
    g[:, spans[r][0][0]:][:, :64 * (r + 1)] = float(r + layer)
    t.allgather_into(g, spans, dim=1)
    assert torch.equal(g.cpu(), torch.cat([torch.full((2, 64 * (i + 1)), float(i + layer)) for i in range(p)], 1))
t.barrier()
assert t.window is not None and "shared by the node's ranks" in t.path
print("ok" if r == 0 else "", end="")
"""
    r = subprocess.run([MPIRUN, "-n", "3", sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1",   # a GPU box's Open MPI,
                                         "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"})          # run as root there
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr


def test_the_host_link_shared_by_three_ranks(tmp_path):
    """bench.measured link on 3 ranks of one GPU: besides rank 0 to rank 1, the host link with all
    3 copying down and up at once, its bytes the 3 ranks' together; bench.simulated fits both
    directions to a Link, as validate --shared-host replays TSP's staged gather on them."""
    out = tmp_path / "link.json"
    r = subprocess.run([MPIRUN, "-n", "3", sys.executable, "-m", "bench.measured", "link", "--mib", "4", "16",
                        "--repeats", "3", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [x for x in json.load(open(out))["rows"] if x["route"].startswith("host")]
    assert [(x["route"], x["MiB"], x["ranks"]) for x in rows] == [
        ("host down", 12, 3), ("host up", 12, 3), ("host down", 48, 3), ("host up", 48, 3)]
    from bench.simulated import measured_links
    fits = list(measured_links(str(out), ["host down", "host up"]).values())
    assert len(fits) == 2 and all(1e9 < f["bandwidth"] < 1e12 for f in fits), fits


@pytest.mark.parametrize("arch", ["llama", "falcon"])
def test_cuda_graphs_replay_the_fused_kernels_exactly(arch):
    """Bitwise: fuse(graphs=True) replays, segment by segment, the kernels fuse() launches, so the
    logits and the K/V of a whole prompt and of a chunk after it are torch.equal to the fused model's.
    Into the same cache the first forward of a shape runs eagerly, the second records, the third replays."""
    tok = torch.randint(3, 1024, (1, 384), generator=torch.Generator().manual_seed(1)).cuda()
    out = []
    for graphs in (False, True):
        m = fuse(model.builtin(arch, seed=0, dtype=torch.float16).cuda(), graphs=graphs)
        cache, ran = KVCache(m.cfg, 1, 384, torch.float16, "cuda"), []
        for _ in range(3):
            cache.reset()
            with torch.inference_mode():
                a = m(tok[:, :256], cache, 0)
                ran.append(getattr(m.forward, "ran", None))
                b = m(tok[:, 256:], cache, 256)
        out.append((a, b, torch.stack(cache.kv)))
    assert ran == ["eagerly", "recorded", "replayed"] and m.forward.ran == "replayed"
    for x, y in zip(*out):
        assert torch.equal(x, y)


def test_a_graphs_profile_times_replays_and_eviction_returns_graph_memory():
    """bench.simulated's rounds alternate more shapes than Segments keeps (4), so a shape is recorded
    again each round: the timed forwards of KV-Runahead's ranks and of TSP's emitter are still replays,
    never a recording or an eager run (TSP's other ranks gather into new memory: eagerly). And memory
    stays bounded: over 12 new shapes of 2 layers of Llama-7B dims, reserved memory stays under 1.5
    times what it was with 4 recordings alive (the evicted graphs' pools go back to the device, and
    no recording leaves a cuBLAS workspace behind; kept, it grew linearly)."""
    from bench import profiling
    from load_weights import dims_model
    m = fuse(model.builtin("llama", seed=0, dtype=torch.float16).cuda(), graphs=True)
    profiling.TIMED.clear()
    for _ in range(2):                                 # two rounds, as profile_block's
        for c in ([256, 128], [128, 128, 128], [384]):
            profiling.profile_kvr(m, c, 1, 0)
        profiling.profile_tsp(m, 384, 3, False, 1, 0)
    assert profiling.TIMED == {"replayed": 14, "eagerly": 4}, profiling.TIMED
    m = fuse(dims_model("llama7b", torch.float16, "cuda", 2), graphs=True)
    torch.cuda.empty_cache()
    base, grown = torch.cuda.memory_reserved(), []
    for n in range(12):                                # 12 new shapes of like size: 1024 tokens after 64n+1
        profiling.profile_chunk(m, 1024, 64 * n + 1, 1, 0)
        grown.append(torch.cuda.memory_reserved() - base)
    assert len(m.forward.recs) == 4
    assert grown[-1] < 1.5 * grown[3], [g >> 20 for g in grown]


def test_the_chain_replays_its_segments_as_cuda_graphs(tmp_path):
    """Bitwise: runahead.py --graphs on 3 ranks sharing the GPU (the exchange between the graphs, and
    ranks 0 and 1 ending after their last send) gives the logits and the prompt's cache of --fuse,
    and its timed prefill replays the graphs its warm-up recorded."""
    saved, printed = {}, {}
    for flag in ("--fuse", "--graphs"):
        r = subprocess.run([MPIRUN, "-n", "3", sys.executable, "runahead.py", "--device", "cuda", "--dtype", "float16",
                            "--prompt-len", "384", "--max-new-tokens", "4", flag, "--save", str(tmp_path / flag)],
                           cwd=ROOT, capture_output=True, text=True, errors="replace", timeout=400,
                           env={**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"})
        assert r.returncode == 0, r.stdout + r.stderr
        printed[flag], saved[flag] = r.stdout, torch.load(tmp_path / flag)
    assert "replayed as CUDA graphs" in printed["--graphs"], printed["--graphs"]
    assert torch.equal(saved["--fuse"]["logits"], saved["--graphs"]["logits"])
    for x, y in zip(saved["--fuse"]["past_key_values"], saved["--graphs"]["past_key_values"]):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])


@pytest.mark.timeout(900)
@pytest.mark.parametrize("route", ["staged", "direct"])
def test_the_programs_on_the_gpu_are_bitwise_one_process_doing_their_arithmetic(tmp_path, route):
    """torch.equal, logits, the prompt's cache and the tokens: runahead.py on 3 ranks sharing the GPU
    (partition 50,40,30) is one process prefilling the same chunks through its cache, and tsp.py,
    plain and zigzag, is one process doing TSP's arithmetic (tests/test_mpi.py's references, run
    here on the GPU in float16 with the same kernels), on the route asked for (KVR_ROUTE; direct
    needs a CUDA-aware MPI, and the MPI-library-built-with-CUDA run of this file takes it). The
    report names the route, and how the ranks share the GPU (through MPS or without)."""
    from test_mpi import assert_equal_run, chunked_reference, tsp_reference
    aware = subprocess.run([sys.executable, "-c", "import transport, fast.staged; transport.init(); "
                            "print(fast.staged.cuda_aware_mpi())"], cwd=ROOT, capture_output=True, text=True)
    if route == "direct" and aware.stdout.strip() != "True":   # (the query answers once MPI has started)
        pytest.skip("this MPI is not CUDA-aware: the direct route needs one (docs/gpu.md)")
    n_gpus = torch.cuda.device_count()
    m = model.builtin("llama", seed=0, dtype=torch.float16).cuda()
    ids = torch.randint(3, m.cfg.vocab_size, (120,), generator=torch.Generator().manual_seed(0))   # as --prompt-len
    tokens = ids[None].cuda()
    runs = {"runahead": (["runahead.py", "--partition", "50,40,30"], chunked_reference(m, tokens, [50, 40, 30], 4)),
            "tsp": (["tsp.py"], tsp_reference(m, tokens, 3, False, 4)),
            "zigzag": (["tsp.py", "--zigzag"], tsp_reference(m, tokens, 3, True, 4))}
    for name, (args, (logits, kv, gen)) in runs.items():
        r = subprocess.run([MPIRUN, "-n", "3", sys.executable, *args, "--device", "cuda", "--dtype", "float16",
                            "--prompt-len", "120", "--max-new-tokens", "4", "--save", str(tmp_path / name)],
                           cwd=ROOT, capture_output=True, text=True, errors="replace", timeout=300,
                           env={**os.environ, "KVR_ROUTE": route, "OMPI_ALLOW_RUN_AS_ROOT": "1",
                                "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"})
        assert r.returncode == 0, r.stdout + r.stderr
        assert ("straight to MPI" if route == "direct" else "staged through pinned host memory") in r.stdout, r.stdout
        shared = f"3 ranks share {n_gpus} GPU(s) " + ("through MPS" if mps() else "without MPS")
        assert (shared in r.stdout) == (n_gpus < 3), r.stdout      # the report says how ranks share a GPU
        assert_equal_run(torch.load(tmp_path / name), logits.cpu(), [(k.cpu(), v.cpu()) for k, v in kv], gen)


@pytest.mark.parametrize("fused", [False, True, "graphs"], ids=["eager", "fused", "fused-graphs"])
@pytest.mark.parametrize("arch", ["llama", "falcon"])
def test_decode_graphs_replay_the_static_steps_exactly(arch, fused):
    """Bitwise: decode as CUDA graphs (fast/decode.py, what generate.decode runs on a GPU) gives the
    tokens and the whole cache of the same static steps run eagerly, fused or not (with --graphs too). Against the
    teaching loop (attention over the keys so far, unmasked) the kernels differ: fp16 agrees to
    rounding, checked on the cache."""
    m = model.builtin(arch, seed=0, dtype=torch.float16).cuda()
    m = fuse(m, graphs=fused == "graphs") if fused else m
    prompt = torch.randint(3, 1024, (1, 100), generator=torch.Generator().manual_seed(3)).cuda()
    out, kv = {}, {}
    for way in ("graphs", "eager", "teaching"):
        cache = KVCache(m.cfg, 1, 100 + 40, torch.float16, "cuda")
        with torch.inference_mode():
            tok = m(prompt, cache, 0, last_only=True)[:, -1].argmax(-1, keepdim=True)
            if way == "teaching":
                out[way] = generate.decode(m, tok, cache, 30, graphs=False)
            else:
                assert fast.decode.takes(m, cache)
                out[way] = fast.decode.decode(m, tok, cache, 30, graphs=way == "graphs")
        assert len(cache) == 130
        kv[way] = torch.stack(cache.kv)
    assert torch.equal(out["graphs"], out["eager"]) and torch.equal(kv["graphs"], kv["eager"])
    n = int((out["graphs"] == out["teaching"]).cumprod(1).sum())   # the same tokens up to here
    torch.testing.assert_close(kv["graphs"][:, :, :100 + n], kv["teaching"][:, :, :100 + n], atol=2e-2, rtol=2e-2)
    assert n >= 10, n


def test_a_layers_breakdown_adds_up():
    """bench.profiling.breakdown sorts a late rank's kernels: GEMMs and attention both run, every kind
    is non-negative, at 1024 tokens the matmuls outweigh the rest, and the gaps are a share of the layer
    (a little below 0 if the profiler stretches kernels)."""
    from bench.profiling import breakdown
    from load_weights import dims_model
    m = dims_model("llama7b", torch.float16, "cuda", 2)
    b = breakdown(m, 1024, 4096, repeats=3)
    assert b["GEMMs"] > 0 and b["attention"] > 0 and b["copies"] >= 0 and b["other kernels"] > 0
    assert b["GEMMs"] + b["attention"] > b["copies"] + b["other kernels"] and -0.2 < b["gaps"] / b["layer"] < 1


def test_a_gpu_calibration_keeps_the_chunk_times_it_fitted():
    """On a GPU calibrate_model times fast/table.py's 15 (chunk, prefix) pairs and the cost model keeps
    them: at each, chunk_time is fixed + the time measured (or a longer chunk's after the same prefix,
    if that was less). Compared to rounding: fixed + t - fixed need not give t back exactly."""
    import calibrate
    import fast.table
    m = model.builtin("llama", seed=0, dtype=torch.float16).cuda()
    cost = calibrate.calibrate_model(m, "cuda", torch.float16, max_len=2048, repeats=2)
    assert sorted((c, c + P) for c, P, _ in cost.measured) == sorted(fast.table.points(2048))
    for c, P, s in cost.measured:
        least = min(t for c2, P2, t in cost.measured if P2 == P and c2 >= c)
        assert 0 < least <= s and cost.chunk_time(c, c + P) == pytest.approx(cost.fixed + least, rel=1e-12)

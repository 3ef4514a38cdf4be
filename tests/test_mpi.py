"""KV-Runahead and TSP as real `mpirun` jobs, checked against one process and against Hugging Face.

Claims, each tested below:
- bitwise: KV-Runahead on p ranks with partition c does the same arithmetic as one process
  prefilling the chunks c in order through a KV cache, so logits, the whole cache and the generated
  tokens are torch.equal (every rank and the reference run one thread); so does TSP (plain and
  zigzag) against one process running the same chunks layer by layer with the gathered K/V;
- against HF (tolerance: TSP's dense masked attention and HF's one-shot prefill round differently):
  KV-Runahead, TSP and zigzag TSP in float64 within 1e-10 and float32 within 1e-5;
- messages: per layer each chain rank sends once and receives once, TSP all-gathers once, and the
  bytes are the paper's formulas for the partition used;
- no dead work: a rank that does not emit the first token never runs the final norm or the LM head;
- failures: bad input exits non-zero on every rank with one line; a dead rank ends the job.

The runs of the programs go through tests/harness.py: one `mpirun` job per rank count runs every
case of that count through the program's own `main`, so each case costs its work, not a job's start.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import case
from generate import decode
from kvcache import KVCache, split
from load_weights import load_model
from model import builtin, rope, rope_inv_freq
from partition import chain_kv_tokens, tsp_kv_tokens
from tsp import tsp_layout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_here = os.path.join(os.path.dirname(sys.executable), "mpirun")
MPIRUN = _here if os.path.exists(_here) else "mpirun"


def mpirun(n, script, *args, timeout=180):
    cmd = [MPIRUN, "-n", str(n), sys.executable, os.path.join(ROOT, script), "--threads", "1", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def run_saved(tmp_path, n, script, *args):
    """A job of its own, and what its emitting rank saved (tests/test_smollm2.py's text runs)."""
    out = tmp_path / f"{script}-{n}.pt"
    r = mpirun(n, script, *args, "--save", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    return torch.load(out), r.stdout


PROMPT = torch.randint(3, 256, (1, 23), generator=torch.Generator().manual_seed(7))
IDS = ",".join(map(str, PROMPT[0].tolist()))
LONG = 3000          # a realistic length: one layer's K/V of the built-in model is 1.5 MB, past MPI's eager limit


# ---------------------------------------------------------------- the cases, run by tests/harness.py
# (conftest.case registers one; conftest.harness runs it with the others of its rank count)

def _partition(c):
    return ",".join(map(str, c))


BITWISE = [("llama_gqa", [23]), ("falcon7b", [23]), ("llama_gqa", [12, 11]), ("falcon7b", [1, 22]),
           ("llama_gqa", [10, 7, 6]), ("falcon40b", [8, 8, 7]), ("falcon7b", [6, 6, 6, 5]),
           ("llama_gqa", [1, 1, 20, 1]), ("llama_gqa", [3, 3, 3, 3, 3, 3, 3, 2]),
           ("falcon7b", [9, 5, 3, 2, 1, 1, 1, 1])]
for arch, c in BITWISE:
    case(f"bitwise-{arch}-{_partition(c)}", len(c), "runahead.py", "--model", "{%s}" % arch, "--prompt-ids", IDS,
         "--partition", _partition(c), "--max-new-tokens", "5")
case("bitwise-long-chain", 3, "runahead.py", "--prompt-len", str(LONG), "--partition", "1200,1000,800",
     "--max-new-tokens", "3")
for n, zigzag in [(3, False), (4, True), (2, False)]:
    case(f"bitwise-tsp-{n}{'-zigzag' * zigzag}", n, "tsp.py", "--model", "{llama_gqa}", "--prompt-ids", IDS,
         "--max-new-tokens", "4", *["--zigzag"] * zigzag)
case("bitwise-long-tsp", 2, "tsp.py", "--prompt-len", str(LONG), "--max-new-tokens", "3")

# rank counts that other cases use too: each distinct count is one more job to start
HF_RUNS = [("runahead.py", 4, ["--partition", "1,9,12,1"]), ("runahead.py", 8, ["--partition", "even"]),
           ("tsp.py", 3, []), ("tsp.py", 8, []), ("tsp.py", 4, ["--zigzag"])]
for program, n, extra in HF_RUNS:
    for arch in ("llama_gqa", "falcon7b", "falcon40b"):
        for dtype in ("float64", "float32"):
            case(f"hf-{program[:-3]}-{n}-{arch}-{dtype}", n, program, "--model", "{%s}" % arch, "--prompt-ids", IDS,
                 "--dtype", dtype, "--max-new-tokens", "6", *extra)
DYNAMIC = [("runahead.py", ["--partition", "5,11,7"]), ("tsp.py", []), ("tsp.py", ["--zigzag"])]
for program, extra in DYNAMIC:
    case(f"dynamic-{program[:-3]}{'-zigzag' * bool(extra and program == 'tsp.py')}", 3, program, "--model",
         "{llama_dynamic}", "--prompt-ids", IDS, "--dtype", "float64", *extra)
for c in ([5, 9, 6, 3], [23], [1, 22]):
    case(f"chain-messages-{_partition(c)}", len(c), "runahead.py", "--model", "{llama_gqa}", "--prompt-ids", IDS,
         "--partition", _partition(c))
for n, zigzag in [(3, False), (4, True)]:
    case(f"tsp-messages-{n}{'-zigzag' * zigzag}", n, "tsp.py", "--model", "{llama_gqa}", "--prompt-ids", IDS,
         *["--zigzag"] * zigzag)
for program, extra in [("runahead.py", ["--partition", "9,8,6"]), ("tsp.py", []), ("tsp.py", ["--zigzag"])]:
    case(f"dead-work-{program[:-3]}{'-zigzag' * bool(extra and program == 'tsp.py')}", 3, program, "--model",
         "{llama_gqa}", "--prompt-ids", IDS, "--max-new-tokens", "3", *extra, trace=True)


def chunked_reference(model, tokens, c, new_tokens):
    """One process prefilling chunks c in order through the KV cache, then decoding (on the tokens'
    device: tests/test_gpu.py holds the GPU runs to it)."""
    torch.set_num_threads(1)
    C = tokens.shape[1]
    cache = KVCache(model.cfg, 1, C + new_tokens, next(model.parameters()).dtype, tokens.device)
    S = 0
    with torch.no_grad():
        for n in c:
            logits = model(tokens[:, S:S + n], cache, S, last_only=True)[0, -1]
            S += n
        kv = [tuple(t.clone() for t in cache.layer(i)) for i in range(model.cfg.n_layers)]
        gen = decode(model, logits.argmax().view(1, 1), cache, new_tokens - 1)[0].tolist()
    return logits, kv, gen


class Gathered:
    """The K/V exchange of a TSP rank with the all-gather already done: every layer's K/V of all C
    positions, in position order."""

    def __init__(self, kv, dense):
        self.kv, self.dense = kv, dense

    def update(self, layer, k, v):
        return self.kv[layer]


def tsp_reference(model, tokens, p, zigzag, new_tokens):
    """One process doing TSP's arithmetic: layer by layer, every rank's chunk through `pre`, their K/V
    concatenated in rank order (and put in position order), every chunk's attention and `post`;
    then the emitting rank's last position, and decoding from the gathered cache."""
    torch.set_num_threads(1)
    cfg, C = model.cfg, tokens.shape[1]
    spans, emitter = tsp_layout(C, p, zigzag)
    dev = tokens.device
    positions = torch.cat([torch.arange(a, a + n, device=dev) for s in spans for a, n in s])
    order = positions.argsort() if zigzag else None
    inv = rope_inv_freq(cfg, C)
    with torch.no_grad():
        xs = [model.embed(torch.cat([tokens[:, a:a + n] for a, n in s], dim=1)) for s in spans]
        rot = [rope(torch.cat([torch.arange(a, a + n, device=dev) for a, n in s]), inv, xs[0].dtype) for s in spans]
        cache = KVCache(cfg, 1, C + new_tokens, xs[0].dtype, dev)
        for layer, block in enumerate(model.layers):
            pre = [block.pre(x, cs) for x, cs in zip(xs, rot)]
            kv = torch.cat([torch.stack((k.transpose(1, 2), v.transpose(1, 2)), dim=2) for _, _, k, v in pre],
                           dim=1)                     # (B, C, 2, n_kv, hs), as the all-gather's buffer
            kv = kv if order is None else kv[:, order]
            mine = Gathered({layer: cache.update(layer, *split(kv))}, dense=not zigzag)   # the emitter's
            theirs = Gathered({layer: split(kv)}, dense=not zigzag)                      # the others'
            xs = [block.post(x, h, block.attn(q, k, v, mine if r == emitter else theirs, s, False))
                  for r, (x, (h, q, k, v), s) in enumerate(zip(xs, pre, spans))]
        logits = model.lm_head(model.norm(xs[emitter][:, -1:]))[0, -1]
        kv = [tuple(t.clone() for t in cache.layer(i)) for i in range(cfg.n_layers)]
        gen = decode(model, logits.argmax().view(1, 1), cache, new_tokens - 1)[0].tolist()
    return logits, kv, gen


def assert_equal_run(d, logits, kv, gen):
    assert torch.equal(d["logits"], logits)
    assert len(d["past_key_values"]) == len(kv)
    for (k, v), (rk, rv) in zip(d["past_key_values"], kv, strict=True):
        assert torch.equal(k, rk) and torch.equal(v, rv)
    assert d["generated_ids"] == gen and d["first_token"] == gen[0]


# ---------------------------------------------------------------- bitwise against one process

@pytest.mark.parametrize("arch,c", BITWISE)
def test_runahead_is_bitwise_chunked_prefill(harness, checkpoints, arch, c):
    """torch.equal: same chunks, same ops, same thread count -> same bits, logits and whole cache."""
    d, _, _ = harness(f"bitwise-{arch}-{_partition(c)}")
    model = load_model(checkpoints[arch])
    logits, kv, gen = chunked_reference(model, PROMPT, c, 5)
    assert d["partition"] == c
    assert len(kv) == 2 and all(k.shape == (1, model.cfg.n_kv_heads, 23, 8) for k, _ in d["past_key_values"])
    assert_equal_run(d, logits, kv, gen)


def test_runahead_is_bitwise_at_a_realistic_length(harness):
    """3000 tokens on 3 ranks: each layer's message is 0.6 to 1.1 MB, past MPI's eager limit, so a
    send completes only when its receiver takes it; still torch.equal to the chunked prefill."""
    d, _, _ = harness("bitwise-long-chain")
    tokens = torch.randint(3, 1024, (1, LONG), generator=torch.Generator().manual_seed(0))
    assert_equal_run(d, *chunked_reference(builtin("llama"), tokens, [1200, 1000, 800], 3))
    assert d["messages"][0]["bytes_sent"] == 4 * 1200 * 512  # 4 layers, 512 bytes of K/V a token


@pytest.mark.parametrize("n,zigzag", [(3, False), (4, True), (2, False)])
def test_tsp_is_bitwise_one_process_doing_its_arithmetic(harness, checkpoints, n, zigzag):
    """torch.equal: TSP on n ranks is each rank's chunk through the same ops as one process running
    the chunks layer by layer with the gathered K/V (the all-gather moves bytes, it computes nothing);
    dense masked attention for plain TSP, causal blocks for zigzag, so a swapped `dense` shows here."""
    d, _, _ = harness(f"bitwise-tsp-{n}{'-zigzag' * zigzag}")
    assert_equal_run(d, *tsp_reference(load_model(checkpoints["llama_gqa"]), PROMPT, n, zigzag, 4))


def test_tsp_is_bitwise_at_a_realistic_length(harness):
    d, _, _ = harness("bitwise-long-tsp")
    tokens = torch.randint(3, 1024, (1, LONG), generator=torch.Generator().manual_seed(0))
    assert_equal_run(d, *tsp_reference(builtin("llama"), tokens, 2, False, 3))
    assert d["messages"][0]["bytes_recv"] == 4 * 1500 * 512


# ---------------------------------------------------------------- against Hugging Face

_HF = {}


def hf_prefill(checkpoint, dtype, new_tokens):
    """HF's one-shot prefill of PROMPT (last logits, cache) and its greedy tokens; computed once."""
    if (checkpoint, dtype, new_tokens) not in _HF:
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype).eval()
        with torch.no_grad():
            out = m(PROMPT, use_cache=True)
            gen = m.generate(PROMPT, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        _HF[checkpoint, dtype, new_tokens] = (out.logits[0, -1], [(l.keys, l.values) for l in out.cache.layers],
                                              gen[0, PROMPT.shape[1]:].tolist())
    return _HF[checkpoint, dtype, new_tokens]


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 1e-5)])
@pytest.mark.parametrize("arch", ["llama_gqa", "falcon7b", "falcon40b"])
@pytest.mark.parametrize("program,n,extra", HF_RUNS)
def test_matches_hf(harness, checkpoints, arch, dtype, tol, program, n, extra):
    """assert_close at 1e-10 (fp64) / 1e-5 (fp32): logits, whole KV cache, and generate's tokens."""
    d, _, _ = harness(f"hf-{program[:-3]}-{n}-{arch}-{dtype}")
    logits, kv, gen = hf_prefill(checkpoints[arch], getattr(torch, dtype), 6)
    torch.testing.assert_close(d["logits"], logits, atol=tol, rtol=0)
    assert len(d["past_key_values"]) == len(kv) == 2
    for (k, v), (hk, hv) in zip(d["past_key_values"], kv, strict=True):
        g = hk.shape[1] // k.shape[1]                  # falcon-40b: HF repeats each KV head
        torch.testing.assert_close(k.repeat_interleave(g, 1), hk, atol=tol, rtol=0)
        torch.testing.assert_close(v.repeat_interleave(g, 1), hv, atol=tol, rtol=0)
    assert d["generated_ids"] == gen


@pytest.mark.parametrize("program,extra", DYNAMIC)
def test_dynamic_rope_stretched_for_the_whole_prompt(harness, checkpoints, program, extra):
    """Dynamic NTK RoPE stretches its base for the prompt's length (23 > max_pos 16). Every rank must
    use the whole prompt's base, not its own last position's, to give HF's one-shot prefill (fp64)."""
    d, _, _ = harness(f"dynamic-{program[:-3]}{'-zigzag' * bool(extra and program == 'tsp.py')}")
    # the run is the one asked for: 23 tokens on 3 ranks as 5,11,7; TSP's even 8,8,7; zigzag's
    # 6 chunks of even(23, 6) = 4,4,4,4,4,3, rank r holding chunks r and 5-r: 4+3, 4+4, 4+4
    want = {"runahead.py": [5, 11, 7], "tsp.py": [7, 8, 8] if extra else [8, 8, 7]}[program]
    assert d["partition"] == want
    logits, kv, _ = hf_prefill(checkpoints["llama_dynamic"], torch.float64, 1)
    torch.testing.assert_close(d["logits"], logits, atol=1e-10, rtol=0)
    assert len(d["past_key_values"]) == len(kv) == 2
    for (k, v), (hk, hv) in zip(d["past_key_values"], kv, strict=True):
        torch.testing.assert_close(k, hk, atol=1e-10, rtol=0)
        torch.testing.assert_close(v, hv, atol=1e-10, rtol=0)


# ---------------------------------------------------------------- message accounting

@pytest.mark.parametrize("c", [[5, 9, 6, 3], [23], [1, 22]])
def test_chain_messages(harness, c):
    """Each rank but the last sends once per layer, each but the first receives once; bytes = S_i."""
    d, _, _ = harness(f"chain-messages-{_partition(c)}")
    L, per_token = 2, 2 * 2 * 8 * 4                    # layers; K+V x 2 KV heads x hs 8 x float32
    S = [sum(c[:i + 1]) for i in range(len(c))]
    assert d["partition"] == c and len(d["messages"]) == len(c)   # one record per rank
    for i, m in enumerate(d["messages"]):
        assert m["sends"] == (L if i < len(c) - 1 else 0)
        assert m["recvs"] == (L if i > 0 else 0)
        assert m["allgathers"] == 0
        assert m["bytes_sent"] == (L * S[i] * per_token if i < len(c) - 1 else 0)
        assert m["bytes_recv"] == (L * S[i - 1] * per_token if i > 0 else 0)   # the prefix before it
    total = sum(m["bytes_sent"] for m in d["messages"])
    assert total == L * chain_kv_tokens(c) * per_token // 2   # chain_kv_tokens counts K and V
    assert sum(m["bytes_recv"] for m in d["messages"]) == total  # every byte sent is received


@pytest.mark.parametrize("n,zigzag", [(3, False), (4, True)])
def test_tsp_messages(harness, n, zigzag):
    """One all-gather per layer (K and V together), no point-to-point; bytes = (p-1)/p of the cache."""
    d, _, _ = harness(f"tsp-messages-{n}{'-zigzag' * zigzag}")
    L, per_token = 2, 2 * 2 * 8 * 4
    # tokens per rank, by hand: even(23, 3) = 8,8,7; zigzag on 4 ranks: even(23, 8) = 3 x 7 then 2,
    # rank r holding chunks r and 7-r: 3+2, 3+3, 3+3, 3+3
    assert d["partition"] == ([5, 6, 6, 6] if zigzag else [8, 8, 7])
    assert len(d["messages"]) == n                     # one record per rank
    for r, m in enumerate(d["messages"]):
        assert (m["allgathers"], m["sends"], m["recvs"]) == (L, 0, 0)
        assert m["bytes_recv"] == L * (23 - d["partition"][r]) * per_token
        assert m["bytes_sent"] == L * d["partition"][r] * per_token   # its own chunk, once per layer
    total = sum(m["bytes_recv"] for m in d["messages"])
    assert total == L * tsp_kv_tokens(23, n) * per_token // 2
    assert sum(m["bytes_sent"] for m in d["messages"]) == L * 23 * per_token   # the whole cache once


# ---------------------------------------------------------------- no dead work

@pytest.mark.parametrize("program,extra,emitter", [("runahead.py", ["--partition", "9,8,6"], 2), ("tsp.py", [], 2),
                                                   ("tsp.py", ["--zigzag"], 0)])
def test_no_dead_work_after_the_last_exchange(harness, program, extra, emitter):
    """A rank that does not emit the first token stops at its last layer's K/V exchange: it never
    runs the final norm (the harness counts every rank's calls), and its trace ends there; the
    emitting rank runs the norm once for the prompt and once per decoded token (3 new tokens: 2
    decode steps), and its trace ends with the head."""
    d, ranks, trace = harness(f"dead-work-{program[:-3]}{'-zigzag' * bool(extra and program == 'tsp.py')}")
    assert [r["norm_calls"] for r in ranks] == [3 if i == emitter else 0 for i in range(3)]
    spans = {}
    for e in trace["traceEvents"]:
        if e.get("ph") == "X" and e["pid"] == 0:
            spans.setdefault(e["tid"], []).append((e["ts"], e["name"], e["args"]["layer"]))
    assert sorted(spans) == [0, 1, 2]
    exchange = "send" if program == "runahead.py" else "allgather"
    for rank, s in spans.items():
        last = max(s)[1:]
        assert last == (("compute", "head") if rank == emitter else (exchange, 1)), (rank, last)


# ---------------------------------------------------------------- the command line and its failures

case("demo", 4, "runahead.py", "--prompt-len", "512")
for spec in ("searched", "predicted"):
    case(f"partition-{spec}", 3, "runahead.py", "--prompt-len", "300", "--partition", spec, "--model", "builtin:falcon")


def test_default_demo_runs(harness):
    """No arguments: the built-in model, a prompt long enough to matter, the promised report."""
    _, ranks, _ = harness("demo")
    for key in ("partition (even): 128,128,128,128", "transport: host memory", "TTFT:", "tokens:"):
        assert key in ranks[3]["stdout"]


@pytest.mark.parametrize("spec", ["searched", "predicted"])
def test_searched_and_predicted_partitions_run(harness, spec):
    """With no table entry, the partition is searched on the calibrated cost model, then timed
    against the even split by real prefills; the faster runs and goes into the table."""
    d, ranks, _ = harness(f"partition-{spec}")
    line = re.search(rf"partition \({spec}\): ([\d,]+)  \[(.*)\]", ranks[2]["stdout"])
    c = [int(x) for x in line.group(1).split(",")]
    assert c == d["partition"] and len(c) == 3 and sum(c) == 300 and min(c) >= 1
    timed = re.search(r"timed against the even split: ([\d.]+) vs ([\d.]+) ms, (searched|even) kept", line.group(2))
    if timed is None:                                  # only if the cost model itself picked the even split
        assert c == [100, 100, 100] and "searched on calibration" in line.group(2), line.group(0)
        return
    searched_ms, even_ms, kept = float(timed.group(1)), float(timed.group(2)), timed.group(3)
    assert (kept == "even") == (c == [100, 100, 100])
    assert (searched_ms <= even_ms) if kept == "searched" else (even_ms <= searched_ms)   # as printed, rounded
    table = json.loads((ranks[0]["cache"] / "partitions.json").read_text())
    assert list(table.values())[0]["3"]["300"] == c
    assert d["messages"][2]["recvs"] == 4              # the timed run's own: 4 layers from rank 1


def test_live_search_measures_and_stores(tmp_path):
    """--search-live scores real prefills, stores the winner, and `searched` then reads it back."""
    env = {**os.environ, "KVR_CACHE": str(tmp_path)}  # its own table and calibration files
    cmd = [MPIRUN, "-n", "2", sys.executable, "runahead.py", "--threads", "1", "--prompt-len", "64"]
    r = subprocess.run(cmd + ["--search-live", "--repeats", "1"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    best = re.search(r"best (\d+(?:,\d+)+)", r.stdout).group(1)
    assert int(re.search(r"over (\d+) measured", r.stdout).group(1)) > 5
    r = subprocess.run(cmd + ["--partition", "searched"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=env)
    assert f"partition (searched): {best}  [table" in r.stdout, r.stdout + r.stderr
    assert os.path.exists(tmp_path / "partitions.json")


@pytest.mark.parametrize("n,args,message", [
    (3, ["--partition", "4,3"], "2 chunks for 3 ranks"),
    (3, ["--partition", "4,3,3"], "sums to 10"),
    (2, ["--partition", "9,0"], "empty chunk"),
    (2, ["--partition", "a,b"], "partition"),
    (4, ["--prompt-ids", "5,6,7"], "4 ranks but only 3 prompt tokens"),
    (2, ["--model", "/nonexistent"], "config.json"),
    (2, ["--model", "builtin:gpt2"], "builtin:llama"),
    (2, ["--prompt-ids", "1,99999"], "outside the vocabulary"),
    (2, ["--prompt", "Once upon a time"], "--prompt needs a checkpoint with tokenizer.json or tokenizer.model"),
    (3, ["--max-new-tokens", "0"], "argument --max-new-tokens: 0 is out of range"),
    (2, ["--threads", "0"], "argument --threads: 0 is out of range"),
])
def test_bad_input_fails_on_every_rank(n, args, message):
    prompt = [] if {"--prompt-ids", "--prompt"} & set(args) else ["--prompt-len", "9"]
    r = mpirun(n, "runahead.py", *prompt, *args, timeout=60)
    assert r.returncode != 0
    lines = [x for x in r.stderr.splitlines() if x.startswith("error")]
    assert len(lines) == n and all(message in x for x in lines), r.stderr
    assert "TTFT" not in r.stdout                      # refused before the work


def test_tsp_rejects_zigzag_without_two_tokens_per_rank():
    r = mpirun(3, "tsp.py", "--prompt-len", "5", "--zigzag", timeout=60)
    assert r.returncode != 0 and r.stderr.count("needs at least 2 tokens per rank") == 3


def test_exception_on_one_rank_aborts_the_job(tmp_path):
    """Rank 1 raises while rank 0 waits for a message that never comes: Abort ends both."""
    script = tmp_path / "boom.py"
    script.write_text(
        "import sys; sys.path.insert(0, %r)\n"
        "from mpi4py import MPI\nimport torch\nimport transport\nfrom program import abort_on_error\n"
        "comm, _ = transport.init('cpu')\n"
        "t = transport.Transport(comm, 'cpu', polite=True)\n"
        "with abort_on_error(comm):\n"
        "    if t.rank == 1: raise RuntimeError('boom')\n"
        "    t.recv((4,), torch.float32, 1, tag=0)\n" % ROOT)
    r = subprocess.run([MPIRUN, "-n", "2", sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "error (rank 1): RuntimeError: boom" in r.stderr   # a hang: the timeout


def launch(n, marker, *args):
    """runahead.py on n ranks saving to `marker`, started in a session of its own (killable whole)."""
    return subprocess.Popen([MPIRUN, "-n", str(n), sys.executable, os.path.join(ROOT, "runahead.py"), *args,
                             "--save", marker], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def rank_pid(marker, rank, launcher):
    """The pid of the rank whose command line holds `marker`, once it runs (None after 30 s)."""
    deadline = time.time() + 30
    while time.time() < deadline:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
                env = open(f"/proc/{pid}/environ", "rb").read()
            except OSError:
                continue
            if (marker.encode() in cmd and b"python" in os.path.basename(cmd[0]) and int(pid) != launcher
                    and f"PMI_RANK={rank}\0".encode() in env):
                return int(pid)
        time.sleep(0.2)
    return None


def test_killed_rank_ends_the_job(tmp_path):
    """SIGKILL rank 0 as soon as it runs (rank 1, its whole prompt but one token later, waits on it
    or will): mpirun must end, not hang. No sleep: whenever the kill lands, the job must end."""
    marker = str(tmp_path / "killme.pt")
    p = launch(2, marker, "--prompt-len", "12000", "--partition", "11999,1")
    victim = rank_pid(marker, 0, p.pid)
    assert victim, "rank 0 never started"
    os.kill(victim, signal.SIGKILL)
    p.communicate(timeout=50)                          # a hang: TimeoutExpired
    assert p.returncode != 0 and not os.path.exists(marker)


@pytest.mark.parametrize("target,after", [("rank 1", 4), ("mpirun", 4), ("rank 1", 1), ("mpirun", 1)],
                         ids=["rank-mid-prefill", "mpirun-mid-prefill", "rank-at-start", "mpirun-at-start"])
def test_ctrl_c_ends_the_job_with_a_line_and_no_traceback(tmp_path, target, after):
    """SIGINT, to the middle rank of three (kill -INT) or to the launcher (Ctrl-C, which MPICH's
    mpirun passes on to every rank), mid-prefill or while torch still loads: the whole job ends at
    once, status 130, the rank saying `interrupted (rank r)`, with no Python traceback and no
    segfault, and saves nothing."""
    marker = str(tmp_path / "interrupt.pt")
    p = launch(3, marker, "--prompt-len", "16384", "--threads", "1")
    try:
        rank1 = rank_pid(marker, 1, p.pid)
        assert rank1, "rank 1 never started"
        time.sleep(after)                              # 4 s: past setup (about 2 s here); 1 s: torch loading
        os.kill(rank1 if target == "rank 1" else p.pid, signal.SIGINT)
        out, err = p.communicate(timeout=30)           # a hang: TimeoutExpired
    finally:
        if p.poll() is None:                           # whatever failed, leave no rank running
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 130, err
    assert ("interrupted (rank 1)" if target == "rank 1" else "interrupted (rank ") in err, err
    assert "Traceback" not in err + out and "Segmentation" not in err + out, err
    assert not os.path.exists(marker)

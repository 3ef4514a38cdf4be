"""A real trained model: SmolLM2-135M-Instruct as fetch_model.py converts it, through our loader and
programs, against transformers' LlamaForCausalLM on the same directory.

Claims:
- bitwise: a full prefill of a real prompt gives HF's logits and every cached K/V exactly
  (torch.equal, float32), as on the tiny random models of test_model.py: same ops, same order;
- greedy generation of 40 tokens gives `generate`'s tokens, which read as English;
- KV-Runahead on 3 ranks and TSP on 2 print the same tokens and text as HF, and KV-Runahead's logits
  and whole cache are torch.equal to one process prefilling the same chunks.
"""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from test_mpi import chunked_reference, run_saved
from transformers import AutoTokenizer, LlamaForCausalLM

from generate import generate
from kvcache import KVCache
from load_weights import load_model, load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STORY = "Once upon a time"
PROMPT = ("The KV cache of a transformer holds the keys and values of every earlier token, so that a new "
          "token attends to them without computing them again. In a parallel prefill,")


@pytest.fixture(scope="module")
def hf(smollm2):
    return LlamaForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ours(smollm2):
    return load_model(smollm2)


@pytest.fixture(scope="module")
def hf_tok(smollm2):
    return AutoTokenizer.from_pretrained(smollm2)


@pytest.fixture(scope="module")
def prompt_ref(hf, hf_tok):
    """PROMPT's ids and generate's 40 greedy tokens after it."""
    ids = hf_tok(PROMPT)["input_ids"]
    return ids, hf_generate(hf, ids, 40)


def hf_generate(hf, ids, n):
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def test_fetched_checkpoint(smollm2):
    """The directory holds what fetch_model.py promises, with SmolLM2-135M's shape; fetching again
    changes nothing and says so."""
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(smollm2))
    cfg = json.load(open(os.path.join(smollm2, "config.json")))
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["vocab_size"], cfg["tie_word_embeddings"]) == (30, 576, 9, 3, 49152, True)
    assert "quantization_config" not in cfg
    before = os.stat(os.path.join(smollm2, "model.safetensors")).st_mtime_ns
    r = subprocess.run([sys.executable, "fetch_model.py", "smollm2", "--out", smollm2], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.endswith("is already there: nothing to do\n") and not r.stderr, r.stderr
    assert os.stat(os.path.join(smollm2, "model.safetensors")).st_mtime_ns == before


def test_prefill_bitwise(hf, ours, hf_tok):
    """torch.equal: logits (1, 36, 49152) and all 30 layers' K and V, for a 36-token real prompt."""
    ids = torch.tensor([hf_tok(PROMPT)["input_ids"]])
    assert ids.shape[1] == 36
    cache = KVCache(ours.cfg, 1, ids.shape[1], torch.float32)
    with torch.no_grad():
        out = hf(ids, use_cache=True)
        logits = ours(ids, cache, 0)
    assert torch.equal(logits, out.logits), (logits - out.logits).abs().max()
    assert len(out.cache.layers) == 30
    for i, layer in enumerate(out.cache.layers):
        k, v = cache.layer(i)
        assert torch.equal(k, layer.keys) and torch.equal(v, layer.values), i


def test_greedy_40_tokens_match_generate(smollm2, hf, ours, hf_tok):
    """Our greedy decoding through the KV cache gives generate's 40 tokens, and the story they tell."""
    ids = hf_tok(STORY)["input_ids"]
    ref = hf_generate(hf, ids, 40)
    got, _, _ = generate(ours, torch.tensor([ids]), 40, KVCache(ours.cfg, 1, len(ids) + 40, torch.float32))
    assert got[0].tolist() == ref
    text = load_tokenizer(smollm2).decode(ids + ref)
    assert text == hf_tok.decode(ids + ref, skip_special_tokens=True)
    assert text.startswith("Once upon a time, the city of Nova Haven was a thriving metropolis, with towering")


@pytest.mark.parametrize("program,n", [("runahead.py", 3), ("tsp.py", 2)])
def test_parallel_runs_print_the_text_of_one_process(tmp_path, smollm2, prompt_ref, hf_tok, ours, program, n):
    """`--prompt` on several ranks: generate's 40 tokens, the same text line as HF's decode, and for
    KV-Runahead logits and whole cache torch.equal to one process prefilling the same chunks."""
    ids, ref = prompt_ref
    d, out = run_saved(tmp_path, n, program, "--model", smollm2, "--prompt", PROMPT, "--max-new-tokens", "40")
    assert d["generated_ids"] == ref
    text = re.search(r"^text \(tokenizer\.json through tokenizers\): (.*)", out, re.S | re.M).group(1)
    assert text == hf_tok.decode(ids + ref, skip_special_tokens=True) + "\n"
    if program == "runahead.py":
        assert d["partition"] == [12, 12, 12]
        logits, kv, gen = chunked_reference(ours, torch.tensor([ids]), d["partition"], 40)
        assert torch.equal(d["logits"], logits) and gen == ref
        assert len(d["past_key_values"]) == len(kv) == 30
        for (k, v), (rk, rv) in zip(d["past_key_values"], kv, strict=True):
            assert k.shape == (1, 3, 36, 64) and torch.equal(k, rk) and torch.equal(v, rv)

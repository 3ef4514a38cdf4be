"""load_weights.py refuses bad checkpoints and configs with a message that says what is wrong and where.

Each test breaks one saved tiny checkpoint (conftest.checkpoint) in a copy, and asserts the error type
and fragments of its message; no test here needs HF to run the model.
"""
import json
import os
import shutil

import pytest
import torch
from conftest import tokens
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, FalconConfig, FalconForCausalLM

from kvcache import KVCache
from load_weights import ConfigError, LoadError, load_model, load_tokenizer


@pytest.fixture
def ckpt(checkpoint, tmp_path):
    """A writable copy of the llama_gqa safetensors checkpoint, and its tensors."""
    d = tmp_path / "ckpt"
    shutil.copytree(checkpoint("llama_gqa"), d)
    return d, load_file(d / "model.safetensors")


def edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def test_intact_copy_loads(ckpt):
    """Control for the tests below: the unbroken copy loads, so each error comes from its own edit."""
    d, _ = ckpt
    assert load_model(str(d)).cfg.n_kv_heads == 2


def test_missing_tensor(ckpt):
    """A tensor absent from the file is named, with the word 'missing' and its expected shape."""
    d, sd = ckpt
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, d / "model.safetensors")
    with pytest.raises(LoadError, match=r"1 problem\(s\): missing layers\.1\.w_up\.weight \[160, 64\]"):
        load_model(str(d))


def test_misshaped_tensor(ckpt):
    """A tensor of the wrong shape is named with the shape found and the shape expected."""
    d, sd = ckpt
    sd["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 64)
    save_file(sd, d / "model.safetensors")
    with pytest.raises(LoadError, match=r"layers\.0\.attn\.wk\.weight has shape \[8, 64\], expected \[16, 64\]"):
        load_model(str(d))


def test_all_problems_reported_at_once(ckpt):
    """One missing, one mis-shaped and one unexpected tensor all appear in a single error."""
    d, sd = ckpt
    del sd["model.norm.weight"]
    sd["model.embed_tokens.weight"] = torch.zeros(255, 64)
    sd["model.layers.0.self_attn.rotary.weight"] = torch.zeros(3)
    save_file(sd, d / "model.safetensors")
    with pytest.raises(LoadError) as e:
        load_model(str(d))
    msg = str(e.value)
    assert "3 problem(s)" in msg and "missing norm.weight [64]" in msg
    assert "embed.weight has shape [255, 64], expected [256, 64]" in msg
    assert "unexpected model.layers.0.self_attn.rotary.weight" in msg


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_safetensors(ckpt, damage):
    """A truncated or overwritten safetensors file is refused, naming the file."""
    d, _ = ckpt
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:len(data) // 2] if damage == "truncated" else os.urandom(len(data)))
    with pytest.raises(LoadError, match=r"model\.safetensors: not a readable safetensors file"):
        load_model(str(d))


class Payload:
    """Unpickling this calls open(marker, 'w'), creating the marker file: code execution."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def write_bin(d, obj):
    (d / "model.safetensors").unlink()
    torch.save(obj, d / "pytorch_model.bin")


@pytest.fixture
def unsafe_torch_default(monkeypatch):
    """torch.load's default is weights_only=True since torch 2.6, so dropping load_weights.py's explicit
    weights_only=True would change nothing by default. TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 (read by
    torch.load on every call) turns the default off, but only where the caller does not pass
    weights_only: with it, only the explicit argument protects. TORCH_FORCE_WEIGHTS_ONLY_LOAD must be
    unset, or torch.load raises for both being set (which read_tensors would report as a refusal)."""
    monkeypatch.delenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", raising=False)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")


def test_pickle_payload_never_runs(ckpt, tmp_path, unsafe_torch_default):
    """A .bin holding an object whose unpickling runs code is refused and the code does not run, even
    with torch's default forced unsafe; the same file under that default torch.load(), and under a
    plain torch.load(weights_only=False), does run it (so the check is live)."""
    d, sd = ckpt
    marker = tmp_path / "pwned"
    write_bin(d, {**sd, "model.norm.weight": Payload(str(marker))})
    with pytest.raises(LoadError, match=r"pytorch_model\.bin: refused to unpickle"):
        load_model(str(d))
    assert not marker.exists()
    with pytest.warns(UserWarning, match="TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):  # the env var is live
        torch.load(d / "pytorch_model.bin")["model.norm.weight"].close()
    assert marker.exists()
    marker.unlink()
    torch.load(d / "pytorch_model.bin", weights_only=False)["model.norm.weight"].close()
    assert marker.exists()


def test_bin_with_non_tensor_value(ckpt):
    """A .bin that is a dict but holds a plain value among the tensors is refused, naming the key."""
    d, sd = ckpt
    write_bin(d, {**sd, "model.norm.weight": [1.0, 2.0]})
    with pytest.raises(LoadError, match=r"pytorch_model\.bin: 'model\.norm\.weight' is a list, not a tensor"):
        load_model(str(d))


def test_bin_that_is_not_a_dict(ckpt):
    """A .bin holding a bare tensor instead of name -> tensor is refused."""
    d, sd = ckpt
    write_bin(d, sd["model.norm.weight"])
    with pytest.raises(LoadError, match=r"pytorch_model\.bin: expected a dict of name -> tensor, got Tensor"):
        load_model(str(d))


@pytest.mark.parametrize("variant, changes, fragment", [
    ("llama_gqa", {"model_type": "gpt2"}, r"unknown model_type 'gpt2'"),
    ("llama_gqa", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
     r"rope_type 'yarn' is not supported"),
    ("llama_gqa", {"rope_parameters": None, "rope_scaling": {"type": "yarn", "factor": 4.0}},
     r"rope_type 'yarn' is not supported"),                                # legacy key spelling
    ("falcon_7b", {"n_head": 8}, r"RW-era field 'n_head'"),
    ("falcon_40b", {"parallel_attn": False}, r"new_decoder_architecture needs parallel_attn=true"),
])
def test_config_refused(checkpoint, tmp_path, variant, changes, fragment):
    """A config we would compute wrongly is refused by ConfigError naming the field and value."""
    d = tmp_path / "ckpt"
    shutil.copytree(checkpoint(variant), d)
    load_model(str(d))                                  # control: loads before the edit
    edit_config(d, **changes)
    with pytest.raises(ConfigError, match=fragment):
        load_model(str(d))


def test_no_weights(ckpt):
    """A directory with a config but no weight file says which files it looked for."""
    d, _ = ckpt
    (d / "model.safetensors").unlink()
    with pytest.raises(LoadError, match=r"no model\.safetensors, pytorch_model\.bin"):
        load_model(str(d))


def ours_equal_hf(d):
    """Our model of checkpoint d, after asserting its logits torch.equal those of HF's from_pretrained."""
    ids = tokens()
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()(ids).logits
        model = load_model(str(d))
        assert torch.equal(model(ids, KVCache(model.cfg, *ids.shape), 0), ref)
    return model


def test_tied_config_with_stored_lm_head(checkpoint, tmp_path):
    """Bitwise: when tie_word_embeddings is true but the file holds lm_head.weight anyway, HF 5.24
    uses the stored head (checked against transformers 5.24); so must we. Compared with HF from_pretrained on the same dir."""
    d = tmp_path / "ckpt"
    shutil.copytree(checkpoint("llama_tied"), d)
    sd = load_file(d / "model.safetensors")
    sd["lm_head.weight"] = torch.randn(sd["model.embed_tokens.weight"].shape)
    save_file(sd, d / "model.safetensors")
    model = ours_equal_hf(d)
    assert torch.equal(model.lm_head.weight, sd["lm_head.weight"])


@pytest.mark.parametrize("files,fragment", [
    ({"config.json": "[1, 2]"}, r"ckpt/config\.json: expected a JSON object of fields, got a list"),
    ({"config.json": "{nope"}, r"ckpt/config\.json is not valid JSON"),
    ({"model.safetensors.index.json": "{}"}, r"ckpt/model\.safetensors\.index\.json: no \"weight_map\""),
    ({"model.safetensors.index.json": '{"weight_map": [1]}'}, r"index\.json: no \"weight_map\" of tensor name"),
])
def test_a_bad_checkpoint_file_is_named_with_its_problem(ckpt, files, fragment):
    """Before, these ended as `'list' object has no attribute 'get'` or `'weight_map'`."""
    d, _ = ckpt
    for name, text in files.items():
        (d / name).write_text(text)
    with pytest.raises(LoadError, match=fragment):
        load_model(str(d))


def test_model_pointing_at_a_file_or_nowhere_says_so(ckpt, tmp_path):
    d, _ = ckpt
    with pytest.raises(LoadError, match=r"config\.json is a file: --model takes a checkpoint directory"):
        load_model(str(d / "config.json"))                # before: Not a directory: .../config.json/config.json
    with pytest.raises(LoadError, match=r"nowhere does not exist: --model takes a checkpoint directory"):
        load_model(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("name,text,fragment", [
    ("tokenizer.json", '{"model": {"type": "Nope"}}', r"tokenizer\.json: not a tokenizer the tokenizers library can read"),
    ("tokenizer.model", "not a model", r"tokenizer\.model: not a SentencePiece model"),
])
def test_a_bad_tokenizer_is_named_with_its_problem(tmp_path, name, text, fragment):
    (tmp_path / name).write_text(text)
    with pytest.raises(LoadError, match=fragment):
        load_tokenizer(str(tmp_path))


def test_safetensors_are_preferred_to_a_bin_beside_them(ckpt):
    """As transformers reads a directory holding both: model.safetensors, not pytorch_model.bin
    (here the .bin holds other weights, so reading it would change the logits)."""
    d, sd = ckpt
    torch.save({k: torch.randn_like(v) for k, v in sd.items()}, d / "pytorch_model.bin")
    model = ours_equal_hf(d)
    assert torch.equal(model.embed.weight, sd["model.embed_tokens.weight"])


def test_new_decoder_falcon_without_num_kv_heads_has_one_per_head(tmp_path):
    """FalconConfig defaults num_kv_heads to the number of heads; a config that leaves it out must not
    be read as one KV head. Bitwise against HF on the same checkpoint."""
    torch.manual_seed(0)
    hf = FalconForCausalLM(FalconConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                                        new_decoder_architecture=True)).eval()
    hf.save_pretrained(tmp_path)
    cfg = json.load(open(tmp_path / "config.json"))
    cfg.pop("num_kv_heads", None)
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    assert ours_equal_hf(tmp_path).cfg.n_kv_heads == 8
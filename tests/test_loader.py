"""load_weights.py refuses bad checkpoints and configs with a message that says what is wrong and where.

Each test breaks one saved tiny checkpoint (conftest.checkpoint) in a copy, and asserts the error type
and fragments of its message. Older config.json forms are read as transformers' own config classes read
the same dict (rope_scaling beside rope_parameters, a theta or llama3's original length left out,
Falcon's n_embed beside hidden_size: each once read otherwise here).
"""
import copy
import json
import os
import re
import shutil

import pytest
import torch
from conftest import tokens
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, FalconConfig, FalconForCausalLM, LlamaConfig

import cli
import program
from kvcache import KVCache
from load_weights import ConfigError, LoadError, config_from_hf, load_model, load_tokenizer, named


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


def ours_equal_hf(d, length=24):
    """Our model of checkpoint d, after asserting its logits torch.equal those of HF's from_pretrained."""
    ids = tokens(length=length)
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


# ----------------------------------------------------------------------------- older config.json forms

def hf_llama_fields(d):
    """What transformers' LlamaConfig makes of config dict d, in model.Config's terms."""
    c = LlamaConfig.from_dict(copy.deepcopy(d))
    rope = {k: v for k, v in c.rope_parameters.items() if k != "type"}
    return dict(vocab_size=c.vocab_size, dim=c.hidden_size, n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads,
                n_kv_heads=c.num_key_value_heads, head_dim=c.head_dim, ffn_dim=c.intermediate_size,
                norm_eps=c.rms_norm_eps, max_position_embeddings=c.max_position_embeddings, rope=rope,
                attn_bias=c.attention_bias, mlp_bias=c.mlp_bias, tie_embeddings=c.tie_word_embeddings,
                bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id)


def ours(d, fields):
    cfg = config_from_hf(copy.deepcopy(d))
    return {k: getattr(cfg, k) for k in fields}


SMALL_LLAMA = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                   num_attention_heads=8, num_key_value_heads=2)


@pytest.mark.parametrize("d", [
    dict(SMALL_LLAMA, rope_scaling={"type": "linear", "factor": 2.0}, rope_theta=500000.0),
    dict(SMALL_LLAMA, rope_scaling={"type": "dynamic", "factor": 4.0}),                  # rope_theta absent
    dict(SMALL_LLAMA, rope_scaling={"rope_type": "linear", "factor": 3.0}, rope_theta=1e6),
    dict(SMALL_LLAMA, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64}, rope_theta=5e5),
    dict(SMALL_LLAMA, rope_scaling={"type": "linear", "factor": 2.0, "rope_theta": 7.0}, rope_theta=5e5),
    dict(SMALL_LLAMA, rope_scaling=None, rope_theta=123.0),
    dict(SMALL_LLAMA, rope_theta=123.0),
    {k: v for k, v in SMALL_LLAMA.items() if k != "num_key_value_heads"},              # MHA: as many as heads
    dict(SMALL_LLAMA, num_key_value_heads=None, head_dim=None),
    dict(SMALL_LLAMA, head_dim=16),
    dict(SMALL_LLAMA, tie_word_embeddings=True, rms_norm_eps=1e-5, max_position_embeddings=4096,
         attention_bias=True, mlp_bias=True, bos_token_id=128000, eos_token_id=128001),
    {"model_type": "llama"},                                                             # every default
], ids=["linear+theta", "dynamic", "rope_type-key", "llama3", "theta-inside", "scaling-null", "theta-only",
        "no-kv-heads", "nulls", "head_dim", "flags", "defaults"])
def test_legacy_llama_config_reads_as_transformers_does(d):
    """Older Llama config.json forms (rope_scaling with "type", a top-level rope_theta, no
    num_key_value_heads, no head_dim) and every default: model.Config's fields are what
    transformers' LlamaConfig makes of the same dict."""
    want = hf_llama_fields(d)
    assert ours(d, want) == want


FALCON = dict(model_type="falcon", vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=8)


def hf_falcon_fields(d):
    """What transformers' Falcon makes of config dict d (FalconConfig, and FalconAttention's and
    FalconDecoderLayer's reading of it), in model.Config's terms."""
    c = FalconConfig.from_dict(copy.deepcopy(d))
    n_ln = c.num_ln_in_parallel_attn or (2 if c.new_decoder_architecture else None)
    layout = "grouped" if c.new_decoder_architecture else "mq" if c.multi_query else "per_head"
    return dict(vocab_size=c.vocab_size, dim=c.hidden_size, n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads,
                n_kv_heads={"grouped": c.num_kv_heads, "mq": 1, "per_head": c.num_attention_heads}[layout],
                head_dim=c.head_dim, ffn_dim=c.ffn_hidden_size, norm_eps=c.layer_norm_epsilon,
                max_position_embeddings=c.max_position_embeddings, alibi=c.alibi,
                rope=None if c.alibi else {k: v for k, v in c.rope_parameters.items() if k != "type"},
                attn_bias=c.bias, mlp_bias=c.bias, qkv_layout=layout,
                parallel_attn=c.parallel_attn or c.new_decoder_architecture,
                # a LayerNorm of the MLP's own: ln_mlp (new architecture, 2 norms) or post_attention_layernorm
                mlp_norm=(n_ln == 2) if c.new_decoder_architecture else not c.parallel_attn,
                tie_embeddings=c.tie_word_embeddings, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id)


@pytest.mark.parametrize("d", [
    {k: v for k, v in FALCON.items() if k != "hidden_size"} | {"n_embed": 64},      # the old name of hidden_size
    dict(FALCON),                                                                    # multi_query defaults to true
    dict(FALCON, multi_query=False, parallel_attn=False, alibi=True, bias=True),    # Falcon-RW
    dict(FALCON, multi_query=False),
    dict(FALCON, new_decoder_architecture=True, num_kv_heads=2),
    dict(FALCON, new_decoder_architecture=True),                                    # num_kv_heads absent
    dict(FALCON, new_decoder_architecture=True, num_kv_heads=4, num_ln_in_parallel_attn=1),
    dict(FALCON, rope_theta=500.0, ffn_hidden_size=100, layer_norm_epsilon=1e-3),
    dict(FALCON, rope_scaling={"type": "linear", "factor": 2.0}),
    dict(FALCON, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    {"model_type": "falcon"},                                                        # every default
], ids=["n_embed", "mq-default", "rw", "per-head", "grouped", "no-kv-heads", "one-ln", "theta+ffn", "rope_scaling",
        "untied", "defaults"])
def test_legacy_falcon_config_reads_as_transformers_does(d):
    """Falcon config.json forms: n_embed for hidden_size, multi_query by default, the new decoder
    with or without num_kv_heads, a top-level rope_theta, tied embeddings by default (Llama: untied):
    model.Config's fields are what transformers' Falcon makes of the same dict."""
    want = hf_falcon_fields(d)
    assert ours(d, want) == want


@pytest.mark.parametrize("old, new", [("n_head", "num_attention_heads"), ("n_layer", "num_hidden_layers"),
                                      ("n_head_kv", "num_kv_heads")])
def test_rw_era_falcon_names_are_refused_by_name(old, new):
    """The RW-era names (n_head, n_layer, n_head_kv) are not read by transformers' FalconConfig (it
    keeps its own default), so reading them either way would be wrong: refused, naming the field."""
    assert getattr(FalconConfig.from_dict(dict(FALCON, **{old: 3})), new) != 3      # transformers ignores it
    with pytest.raises(ConfigError, match=f"RW-era field '{old}'"):
        config_from_hf(dict(FALCON, **{old: 3}))


@pytest.mark.parametrize("kind", ["RefinedWeb", "RefinedWebModel"])
def test_refined_web_model_type_is_refused_by_name(kind):
    """The pre-transformers Falcon model_types are unknown to transformers too: refused, naming the type."""
    with pytest.raises(ValueError):
        AutoConfig.for_model(kind)
    with pytest.raises(ConfigError, match=f"unknown model_type '{kind}'"):
        config_from_hf(dict(FALCON, model_type=kind))


@pytest.mark.parametrize("changes, fragment", [
    ({"hidden_act": "gelu"}, r"hidden_act 'gelu' is not supported"),
    ({"rope_scaling": {"type": "yarn", "factor": 2.0}}, r"rope_type 'yarn'"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     r"partial_rotary_factor"),
])
def test_llama_config_refusals_name_the_field(changes, fragment):
    """What model.py does not compute is a ConfigError naming the field, not a silent misreading."""
    with pytest.raises(ConfigError, match=fragment):
        config_from_hf(dict(SMALL_LLAMA, **changes))


@pytest.mark.parametrize("changes, fragment", [
    ({"activation": "relu"}, r"activation 'relu' is not supported"),
    ({"new_decoder_architecture": True, "num_kv_heads": 3}, r"num_attention_heads 8 is not a multiple of num_kv_heads 3"),
])
def test_falcon_config_refusals_name_the_field(changes, fragment):
    with pytest.raises(ConfigError, match=fragment):
        config_from_hf(dict(FALCON, **changes))


@pytest.mark.parametrize("scaling", [{"type": "linear", "factor": 2.0}, {"type": "dynamic", "factor": 2.0}])
def test_legacy_rope_scaling_checkpoint_equals_hf(ckpt, scaling):
    """Bitwise, end to end: a checkpoint whose config.json has the legacy rope_scaling + rope_theta
    instead of rope_parameters gives HF's logits (40 tokens: past max_position_embeddings 32, so
    dynamic NTK stretches the base)."""
    d, _ = ckpt
    cfg = json.loads((d / "config.json").read_text())
    del cfg["rope_parameters"]
    cfg.update(rope_scaling=scaling, rope_theta=500.0, max_position_embeddings=32)
    (d / "config.json").write_text(json.dumps(cfg))
    model = ours_equal_hf(d, length=40)
    assert model.cfg.rope == {"rope_type": scaling["type"], "factor": 2.0, "rope_theta": 500.0}


# ----------------------------------------------------------------------------- found here: not as transformers reads

def test_rope_parameters_without_theta_take_the_top_level_one(ckpt):
    """rope_parameters without rope_theta beside a top-level rope_theta: read as transformers reads it."""
    d, _ = ckpt
    edit_config(d, rope_parameters={"rope_type": "linear", "factor": 2.0}, rope_theta=500.0)
    assert ours_equal_hf(d).cfg.rope["rope_theta"] == 500.0


def test_llama3_scaling_without_original_length_uses_max_positions(ckpt):
    """Legacy llama3 rope_scaling without original_max_position_embeddings: read as transformers reads it."""
    d, _ = ckpt
    edit_config(d, rope_parameters=None, rope_theta=500.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0})
    ours_equal_hf(d)


def test_rope_scaling_beside_rope_parameters_is_applied(ckpt):
    """A legacy rope_scaling added to a config that has rope_parameters: applied, as transformers does
    (or refused); never silently dropped."""
    d, _ = ckpt
    edit_config(d, rope_scaling={"type": "linear", "factor": 2.0})
    ours_equal_hf(d)


def test_falcon_n_embed_wins_over_hidden_size():
    """Falcon's n_embed beside hidden_size: the width transformers uses."""
    d = dict(FALCON, n_embed=128)
    assert ours(d, ["dim"])["dim"] == FalconConfig.from_dict(copy.deepcopy(d)).hidden_size == 128


# ----------------------------------------------------------------------------- weights: dtype, ties, shapes, files

@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_weights_are_converted_to_the_asked_dtype(ckpt, dtype):
    """load_model(dtype=...) gives every parameter that dtype, holding the stored values cast to it."""
    d, sd = ckpt
    model = load_model(str(d), dtype=dtype)
    params = dict(model.named_parameters())
    assert {p.dtype for p in params.values()} == {dtype}
    assert torch.equal(params["layers.1.attn.wq.weight"], sd["model.layers.1.self_attn.q_proj.weight"].to(dtype))
    assert torch.equal(params["lm_head.weight"], sd["lm_head.weight"].to(dtype))


def test_tied_embeddings_share_one_parameter(checkpoint):
    """A tied checkpoint (no lm_head.weight stored) loads with the head being the embedding itself, one
    Parameter, also after a dtype conversion; an untied one keeps two."""
    for dtype in (torch.float32, torch.float64):
        model = load_model(checkpoint("llama_tied"), dtype=dtype)
        assert model.cfg.tie_embeddings and model.lm_head.weight is model.embed.weight
        assert model.lm_head.weight.dtype == dtype
    untied = load_model(checkpoint("llama_gqa"))
    assert not untied.cfg.tie_embeddings and untied.lm_head.weight is not untied.embed.weight
    falcon = load_model(checkpoint("falcon_7b"))                 # Falcon: tied unless the config says not
    assert falcon.lm_head.weight is falcon.embed.weight


def test_untied_config_without_lm_head_is_missing_it(checkpoint, tmp_path):
    """tie_word_embeddings false and no lm_head.weight in the file: the head is reported missing, with
    its shape, not silently taken from the embedding."""
    d = tmp_path / "ckpt"
    shutil.copytree(checkpoint("llama_tied"), d)
    edit_config(d, tie_word_embeddings=False)
    with pytest.raises(LoadError, match=r"1 problem\(s\): missing lm_head\.weight \[256, 64\]"):
        load_model(str(d))


def test_transposed_tensor_is_misshaped(ckpt):
    """A tensor with the right number of elements in the wrong shape (transposed) is refused."""
    d, sd = ckpt
    sd["model.layers.1.mlp.down_proj.weight"] = sd["model.layers.1.mlp.down_proj.weight"].t().contiguous()
    save_file(sd, d / "model.safetensors")
    with pytest.raises(LoadError, match=r"layers\.1\.w_down\.weight has shape \[160, 64\], expected \[64, 160\]"):
        load_model(str(d))


def test_bin_checkpoint_loads_the_same_weights(ckpt, checkpoint):
    """pytorch_model.bin (single) and .bin shards with their index give the same weights as the
    safetensors file they were written from."""
    d, sd = ckpt
    ref = load_model(str(d)).state_dict()
    write_bin(d, sd)
    assert all(torch.equal(v, ref[k]) for k, v in load_model(str(d)).state_dict().items())
    shards = load_model(checkpoint("llama_gqa", "bin_shards")).state_dict()
    assert shards.keys() == ref.keys() and all(torch.equal(shards[k], ref[k]) for k in ref)


def test_shard_named_by_the_index_but_missing(checkpoint, tmp_path):
    """A sharded checkpoint whose index names a file that is not there is refused, naming that file."""
    d = tmp_path / "ckpt"
    shutil.copytree(checkpoint("llama_gqa", "sharded_safetensors"), d)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (d / victim).unlink()
    with pytest.raises(LoadError, match=re.escape(victim) + r": named by the index but missing"):
        load_model(str(d))


def test_dims_with_a_layer_count_build_that_many_layers_at_the_papers_widths():
    """dims:NAME:L is the paper's model cut to its first L layers, named so, and filed under its own
    key: a run of four 7B ranks at 16k that fits 80 GB only at fewer layers says that it did."""
    name, model, key = program.load(cli.program("").parse_args(["--model", "dims:llama7b:1", "--dtype", "bfloat16"]),
                                    torch.device("cpu"))
    assert (model.cfg.n_layers, model.cfg.dim, model.cfg.ffn_dim, len(model.layers)) == (1, 4096, 11008, 1)
    assert name == "llama7b dimensions, 1 of its 32 layers, random weights"
    assert key == "llama-d4096-L1-h32-kv32-bfloat16-cpu"


@pytest.mark.parametrize("spec", ["dims:llama7b:0", "dims:llama7b:33", "dims:llama7b:x", "dims:llama7b:",
                                  "dims:llama7b:-1", "dims:gpt2", "dims:gpt2:4"])
def test_a_bad_dims_spec_is_refused_by_name(spec):
    with pytest.raises(ValueError, match=re.escape(f"--model {spec}: known dims are dims:llama7b, dims:falcon7b, "
                                                   "each with an optional :L for its first L layers (1 to 32)")):
        named(spec, torch.float16, "cpu")

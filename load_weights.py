"""Hugging Face checkpoints into model.py, and their tokenizers (tokenizer.json or tokenizer.model).

config.json becomes model.Config (config_from_hf): HF's field names and defaults per family, and a
clear refusal, naming the field, of anything model.py does not compute. The weights come in one
of four forms: model.safetensors, sharded safetensors with model.safetensors.index.json,
pytorch_model.bin, or sharded .bin with pytorch_model.bin.index.json. Every tensor is checked against what the config implies, and all
problems are reported at once. `.bin` files are unpickled with weights_only=True, so a checkpoint
cannot run code on load.

Timing needs a model's shapes, not its values: dims_model builds the paper's Llama-2-7B and
Falcon-7B with random weights (--model dims:llama7b).
"""
import json
import os
import re

import sentencepiece as spm
import tokenizers
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from model import Config, Transformer, builtin


class LoadError(ValueError):
    """A checkpoint directory we cannot read as it claims to be."""


class ConfigError(ValueError):
    """A config.json asking for something model.py does not compute."""


def config_from_hf(d):
    """Read a Hugging Face config.json dict; refuse what we do not implement, naming the field."""
    kind = d.get("model_type")
    if kind == "llama":
        return _llama_config(d)
    if kind == "falcon":
        return _falcon_config(d)
    raise ConfigError(f"config.json: unknown model_type {kind!r} (supported: 'llama', 'falcon')")


def _rope_params(d):
    """HF's rope_parameters, or the legacy rope_theta + rope_scaling keys, read as transformers reads them."""
    rope = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})
    rope.setdefault("rope_theta", d.get("rope_theta", 10000.0))
    rope["rope_type"] = rope.pop("type", None) or rope.get("rope_type") or "default"
    if rope["rope_type"] == "llama3":
        rope.setdefault("original_max_position_embeddings", d.get("max_position_embeddings", 2048))
    if rope["rope_type"] not in ("default", "linear", "dynamic", "llama3"):
        raise ConfigError(f"config.json: rope_type {rope['rope_type']!r} is not supported "
                          "(default, linear, dynamic, llama3)")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError("config.json: partial_rotary_factor != 1 is not supported")
    return rope


def _llama_config(d):
    if d.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"config.json: hidden_act {d['hidden_act']!r} is not supported (silu)")
    nh = d.get("num_attention_heads", 32)
    dim = d.get("hidden_size", 4096)
    return Config(
        arch="llama", vocab_size=d.get("vocab_size", 32000), dim=dim,
        n_layers=d.get("num_hidden_layers", 32), n_heads=nh,
        n_kv_heads=d.get("num_key_value_heads") or nh, head_dim=d.get("head_dim") or dim // nh,
        ffn_dim=d.get("intermediate_size", 11008), norm_eps=d.get("rms_norm_eps", 1e-6),
        max_position_embeddings=d.get("max_position_embeddings", 2048), rope=_rope_params(d),
        attn_bias=d.get("attention_bias", False), mlp_bias=d.get("mlp_bias", False),
        tie_embeddings=d.get("tie_word_embeddings", False),
        bos_token_id=d.get("bos_token_id", 1), eos_token_id=d.get("eos_token_id", 2))


def _falcon_config(d):
    for old in ("n_head", "n_layer", "n_head_kv"):
        if old in d:
            raise ConfigError(f"config.json: RW-era field {old!r} is not read by transformers; "
                              "convert the config to FalconConfig names first")
    if d.get("activation", "gelu") != "gelu":
        raise ConfigError(f"config.json: activation {d['activation']!r} is not supported (gelu)")
    nh = d.get("num_attention_heads", 71)
    dim = d.get("n_embed") or d.get("hidden_size", 4544)   # FalconConfig: n_embed wins
    new_arch = d.get("new_decoder_architecture", False)
    parallel = d.get("parallel_attn", True)
    if new_arch:
        if not parallel:
            raise ConfigError("config.json: new_decoder_architecture needs parallel_attn=true")
        layout, n_kv = "grouped", d.get("num_kv_heads") or nh
        mlp_norm = (d.get("num_ln_in_parallel_attn") or 2) == 2
        if nh % n_kv:
            raise ConfigError(f"config.json: num_attention_heads {nh} is not a multiple of num_kv_heads {n_kv}")
    elif d.get("multi_query", True):
        layout, n_kv, mlp_norm = "mq", 1, not parallel
    else:
        layout, n_kv, mlp_norm = "per_head", nh, not parallel
    bias = d.get("bias", False)
    return Config(
        arch="falcon", vocab_size=d.get("vocab_size", 65024), dim=dim,
        n_layers=d.get("num_hidden_layers", 32), n_heads=nh, n_kv_heads=n_kv, head_dim=dim // nh,
        ffn_dim=d.get("ffn_hidden_size") or 4 * dim, norm_eps=d.get("layer_norm_epsilon", 1e-5),
        max_position_embeddings=d.get("max_position_embeddings", 2048),
        rope=None if d.get("alibi", False) else _rope_params(d), alibi=d.get("alibi", False),
        attn_bias=bias, mlp_bias=bias, qkv_layout=layout, parallel_attn=parallel or new_arch,
        mlp_norm=mlp_norm, tie_embeddings=d.get("tie_word_embeddings", True),
        bos_token_id=d.get("bos_token_id", 11), eos_token_id=d.get("eos_token_id", 11))


# HF name -> our name, per family. Our names are the parameter names in model.py.
RENAMES = {
    "llama": [
        (r"^model\.embed_tokens\.", "embed."),
        (r"^model\.norm\.", "norm."),
        (r"^model\.layers\.(\d+)\.input_layernorm\.", r"layers.\1.attn_norm."),
        (r"^model\.layers\.(\d+)\.post_attention_layernorm\.", r"layers.\1.mlp_norm."),
        (r"^model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.", r"layers.\1.attn.w\2."),
        (r"^model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.", r"layers.\1.w_\2."),
    ],
    "falcon": [
        (r"^transformer\.word_embeddings\.", "embed."),
        (r"^transformer\.ln_f\.", "norm."),
        (r"^transformer\.h\.(\d+)\.(input_layernorm|ln_attn)\.", r"layers.\1.attn_norm."),
        (r"^transformer\.h\.(\d+)\.(post_attention_layernorm|ln_mlp)\.", r"layers.\1.mlp_norm."),
        (r"^transformer\.h\.(\d+)\.self_attention\.query_key_value\.", r"layers.\1.attn.wqkv."),
        (r"^transformer\.h\.(\d+)\.self_attention\.dense\.", r"layers.\1.attn.wo."),
        (r"^transformer\.h\.(\d+)\.mlp\.dense_h_to_4h\.", r"layers.\1.w_in."),
        (r"^transformer\.h\.(\d+)\.mlp\.dense_4h_to_h\.", r"layers.\1.w_out."),
    ],
}


def our_name(arch, hf_name):
    for pattern, repl in RENAMES[arch]:
        name, n = re.subn(pattern, repl, hf_name)
        if n:
            return name
    return hf_name  # lm_head.weight, and anything unexpected (reported by the caller)


def read_config(path):
    if not os.path.isdir(path):
        what = "is a file" if os.path.exists(path) else "does not exist"
        raise LoadError(f"{path} {what}: --model takes a checkpoint directory (the folder that holds config.json)")
    d = read_json(os.path.join(path, "config.json"), "a Hugging Face checkpoint directory's config.json")
    if not isinstance(d, dict):
        raise LoadError(f"{path}/config.json: expected a JSON object of fields, got a {type(d).__name__}")
    return config_from_hf(d)


def read_json(file, what):
    """A JSON file, or a LoadError naming it and saying what it should have been."""
    try:
        with open(file) as f:
            return json.load(f)
    except FileNotFoundError:
        raise LoadError(f"{os.path.dirname(file)}: no {os.path.basename(file)} (expected {what})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoadError(f"{file} is not valid JSON: {e}") from None


def weight_files(path):
    """The checkpoint's weight files, safetensors preferred."""
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if os.path.exists(os.path.join(path, index)):
            weight_map = read_json(os.path.join(path, index), "a sharded checkpoint's index")
            weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise LoadError(f"{os.path.join(path, index)}: no \"weight_map\" of tensor name -> file name")
            return [os.path.join(path, x) for x in sorted(set(weight_map.values()))]
        if os.path.exists(os.path.join(path, single)):
            return [os.path.join(path, single)]
    raise LoadError(f"{path}: no model.safetensors, pytorch_model.bin or their .index.json")


def read_tensors(file):
    """name -> tensor from one file. Refuses anything that is not a flat dict of tensors."""
    if not os.path.exists(file):
        raise LoadError(f"{file}: named by the index but missing")
    if file.endswith(".safetensors"):
        try:
            return load_file(file)
        except (SafetensorError, OSError, ValueError) as e:
            raise LoadError(f"{file}: not a readable safetensors file ({e})") from None
    try:
        sd = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses arbitrary pickles without running them
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LoadError(f"{file}: refused to unpickle: not plain tensors ({first})") from None
    if not isinstance(sd, dict):
        raise LoadError(f"{file}: expected a dict of name -> tensor, got {type(sd).__name__}")
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise LoadError(f"{file}: {k!r} is a {type(v).__name__}, not a tensor")
    return sd


def load_model(path, dtype=torch.float32, device="cpu"):
    """Build model.Transformer from an HF checkpoint directory, checking every tensor."""
    cfg = read_config(path)
    sd = {}
    for file in weight_files(path):
        sd.update({our_name(cfg.arch, k): v for k, v in read_tensors(file).items()})
    if cfg.tie_embeddings and "lm_head.weight" in sd:
        cfg.tie_embeddings = False  # HF uses a stored lm_head even when the config says tied
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()
                if not (cfg.tie_embeddings and k == "lm_head.weight")}
    problems = [f"missing {k} {list(s)}" for k, s in expected.items() if k not in sd]
    problems += [f"unexpected {k}" for k in sd if k not in expected]
    problems += [f"{k} has shape {list(sd[k].shape)}, expected {list(s)}"
                 for k, s in expected.items() if k in sd and tuple(sd[k].shape) != s]
    if problems:
        raise LoadError(f"{path}: {len(problems)} problem(s): " + "; ".join(problems))
    sd = {k: v.to(device=device, dtype=dtype) for k, v in sd.items()}
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["embed.weight"]
    model.load_state_dict(sd, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    return model.eval()


DIMS = {  # the paper's models, with random weights: timing needs their shapes, not their values
    "llama7b": dict(arch="llama", vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                    head_dim=128, ffn_dim=11008),
    "falcon7b": dict(arch="falcon", vocab_size=65024, dim=4544, n_layers=32, n_heads=71, n_kv_heads=1,
                     head_dim=64, ffn_dim=18176, qkv_layout="mq", parallel_attn=True, mlp_norm=False,
                     tie_embeddings=True),
}


def dims_model(name, dtype=torch.float16, device="cuda", n_layers=None):
    """Llama-2-7B or Falcon-7B shapes ("llama7b", "falcon7b") with random weights, or "builtin:llama".

    Built on `device` in `dtype` directly (7B fp32 on a CPU first would take 28 GB). Layers are
    identical, so a model of n_layers=4 times a layer as well as 32 do: KernelTable uses that.
    """
    if name.startswith("builtin:"):
        return builtin(name.split(":")[1], dtype=dtype).to(device)
    cfg = Config(**DIMS[name], max_position_embeddings=16384)
    cfg.n_layers = n_layers or cfg.n_layers
    with torch.device("meta"):                         # shapes only; storage comes with to_empty
        m = Transformer(cfg).to(dtype)
    m = m.to_empty(device=device)
    if cfg.tie_embeddings:
        m.lm_head.weight = m.embed.weight
    g = torch.Generator(device).manual_seed(0)        # the same weights in every run and on every rank
    with torch.no_grad():
        for pname, p in m.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.02, generator=g)
            else:                                      # norm weights 1, biases 0
                p.fill_(0.0 if pname.endswith("bias") else 1.0)
    return m.eval()


def named(spec, dtype, device):
    """(description, model) for --model: dims:NAME (the paper's shapes, random weights), dims:NAME:L
    (its first L layers: four 7B ranks at 16k fit 80 GB at 16) or a checkpoint."""
    if not spec.startswith("dims:"):
        return spec, load_model(spec, dtype, device)
    name, colon, layers = spec[5:].partition(":")
    full = DIMS[name]["n_layers"] if name in DIMS else 0
    if not full or colon and not (layers.isdigit() and 1 <= int(layers) <= full):
        raise ValueError(f"--model {spec}: known dims are " + ", ".join("dims:" + k for k in DIMS)
                         + ", each with an optional :L for its first L layers (1 to 32)")
    n = int(layers or full)
    part = "" if n == full else f", {n} of its {full} layers"
    return f"{name} dimensions{part}, random weights", dims_model(name, dtype, device, n)


def load_tokenizer(path):
    """The checkpoint's tokenizer, picked as transformers' AutoTokenizer picks it: tokenizer.json if
    there is one, else tokenizer.model; None if the directory has neither."""
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        return JSONTokenizer(path)
    if os.path.exists(os.path.join(path, "tokenizer.model")):
        return SentencePieceTokenizer(path)
    return None


class JSONTokenizer:
    """tokenizer.json (what HF checkpoints ship today) through the `tokenizers` library.

    BOS and EOS are added by the file's own post-processor, as AutoTokenizer adds them (SmolLM2's adds
    none); special tokens written in the text ("<|im_start|>") become their ids, as in transformers.
    """

    name = "tokenizer.json through tokenizers"

    def __init__(self, path):
        file = os.path.join(path, "tokenizer.json")
        try:
            self.tok = tokenizers.Tokenizer.from_file(file)
        except Exception as e:                         # the library's message names no file
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise LoadError(f"{file}: not a tokenizer the tokenizers library can read ({first})") from None

    def encode(self, text):
        return self.tok.encode(text).ids

    def decode(self, ids):
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)


class SentencePieceTokenizer:
    """tokenizer.model through sentencepiece, with BOS prepended as Llama's tokenizer does (what
    AutoTokenizer(add_bos_token=True) gives; real Llama-2 checkpoints set that flag)."""

    name = "tokenizer.model through sentencepiece"

    def __init__(self, path):
        file = os.path.join(path, "tokenizer.model") if os.path.isdir(path) else path
        if not os.path.exists(file):
            raise LoadError(f"{path}: no tokenizer.model")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=file)
        except (RuntimeError, OSError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise LoadError(f"{file}: not a SentencePiece model ({first})") from None
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()

    def encode(self, text, bos=True):
        return ([self.bos_id] if bos and self.bos_id >= 0 else []) + self.sp.encode(text)

    def decode(self, ids):
        return self.sp.decode([int(i) for i in ids])

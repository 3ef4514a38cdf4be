"""Hugging Face checkpoints into model.py, and SentencePiece tokenizers.

A checkpoint directory holds config.json and weights in one of four forms: model.safetensors,
sharded safetensors with model.safetensors.index.json, pytorch_model.bin, or sharded .bin with
pytorch_model.bin.index.json. Every tensor is checked against what the config implies, and all
problems are reported at once. `.bin` files are unpickled with weights_only=True, so a checkpoint
cannot run code on load.
"""
import json
import os
import re

import torch

from model import Config, Transformer


class LoadError(ValueError):
    pass


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
    try:
        with open(os.path.join(path, "config.json")) as f:
            return Config.from_hf(json.load(f))
    except FileNotFoundError:
        raise LoadError(f"{path}: no config.json (is this a Hugging Face checkpoint directory?)") from None
    except json.JSONDecodeError as e:
        raise LoadError(f"{path}/config.json is not valid JSON: {e}") from None


def weight_files(path):
    """The checkpoint's weight files, safetensors preferred."""
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if os.path.exists(os.path.join(path, index)):
            with open(os.path.join(path, index)) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(path, x) for x in files]
        if os.path.exists(os.path.join(path, single)):
            return [os.path.join(path, single)]
    raise LoadError(f"{path}: no model.safetensors, pytorch_model.bin or their .index.json")


def read_tensors(file):
    """name -> tensor from one file. Refuses anything that is not a flat dict of tensors."""
    if not os.path.exists(file):
        raise LoadError(f"{file}: named by the index but missing")
    if file.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
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


class Tokenizer:
    """tokenizer.model through sentencepiece, with BOS prepended like Llama's tokenizer."""

    def __init__(self, path):
        import sentencepiece as spm
        file = os.path.join(path, "tokenizer.model") if os.path.isdir(path) else path
        if not os.path.exists(file):
            raise LoadError(f"{path}: no tokenizer.model")
        self.sp = spm.SentencePieceProcessor(model_file=file)
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()

    def encode(self, text, bos=True):
        return ([self.bos_id] if bos and self.bos_id >= 0 else []) + self.sp.encode(text)

    def decode(self, ids):
        return self.sp.decode([int(i) for i in ids])

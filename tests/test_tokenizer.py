"""load_weights.Tokenizer against HF AutoTokenizer on SentencePiece models trained here (BPE, unigram).

Claim: exact equality of ids (with BOS) and of decoded text. The reference is
AutoTokenizer(add_bos_token=True), as transformers 5.24 has it: a directory holding only
tokenizer.model gets add_bos_token=False by default (real Llama-2 repositories turn it on in
tokenizer_config.json); AutoTokenizer's tokenizers-backed class reproduces sentencepiece's dummy
prefix ("  x" -> "▁▁x"), while LlamaTokenizer disagrees with sentencepiece on text that starts with a
space and forces BPE on a unigram model. Reading tokenizer.model at all needs protobuf.
"""
import io
import random

import pytest
import sentencepiece as spm
from transformers import AutoTokenizer

from load_weights import LoadError, Tokenizer

WORDS = ("the cache prefill rank token attention hello world leading space spaces doubled here three "
         "trailing digits and mixed emoji end Hello, café über naïve 中文 模型 🙂 🚀 2024 3.14 x=42 "
         "KV-Runahead déjà vu Grüße").split(" ")

CASES = [
    "Hello world",
    " leading space",
    "doubled  spaces  here",
    "   three leading, trailing   ",
    "café über déjà vu",
    "中文 模型 和 中文",
    "emoji 🙂🚀 end",
    "digits 1234567890 and 3.14159",
    "mixed: Grüße 中文 🙂 42",
    "unseen ☃ ∑ ж",
    "",
]


def corpus():
    rng = random.Random(0)
    lines = [rng.choice([" ", "  "]).join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
             for _ in range(1000)]
    return lines + [(" " if i % 2 else "  ") + line for i, line in enumerate(lines[:200])]


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def tok_dir(request, tmp_path_factory):
    """A directory holding only a tokenizer.model trained here with Llama-2's sentencepiece options."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=buf, model_type=request.param, vocab_size=600,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
        split_digits=True, add_dummy_prefix=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, hard_vocab_limit=False,
        minloglevel=2, num_threads=1)
    d = tmp_path_factory.mktemp(f"tok-{request.param}")
    (d / "tokenizer.model").write_bytes(buf.getvalue())
    return d


@pytest.fixture(scope="module")
def pair(tok_dir):
    return Tokenizer(str(tok_dir)), AutoTokenizer.from_pretrained(str(tok_dir), add_bos_token=True)


@pytest.mark.parametrize("text", CASES)
def test_encode_decode_match_hf(pair, text):
    """Exact: same ids as HF (BOS first), and both decode those ids to the same text."""
    ours, hf = pair
    ids = ours.encode(text)
    assert ids == hf(text)["input_ids"]
    assert ids[0] == 1
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)


def test_round_trip_and_byte_fallback(pair):
    """Decoding gives the text back, including characters the training text never saw (byte fallback),
    and encode(bos=False) drops only the BOS."""
    ours, _ = pair
    for text in CASES[1:]:
        assert ours.decode(ours.encode(text)) == text
        assert ours.encode(text, bos=False) == ours.encode(text)[1:]
    pieces = [ours.sp.id_to_piece(i) for i in ours.encode("☃ world")]
    assert pieces[2:5] == ["<0xE2>", "<0x98>", "<0x83>"] and ours.sp.unk_id() not in ours.encode(CASES[-2])


def test_missing_tokenizer_model(tmp_path):
    """A directory without tokenizer.model is refused by LoadError naming it."""
    with pytest.raises(LoadError, match="no tokenizer.model"):
        Tokenizer(str(tmp_path))

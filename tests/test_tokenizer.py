"""load_weights' tokenizers against HF AutoTokenizer: SentencePiece models trained here (BPE, unigram),
and two real ones, SmolLM2's tokenizer.json (byte-level BPE, the tokenizers library) and Mistral-7B
v0.1's tokenizer.model (SentencePiece BPE with byte fallback, from the mistral-common wheel).

Claim: exact equality of ids and of decoded text. For tokenizer.model the reference is
AutoTokenizer(add_bos_token=True), as transformers 5.24 has it: a directory holding only
tokenizer.model gets add_bos_token=False by default (real Llama-2 repositories turn it on in
tokenizer_config.json); AutoTokenizer's tokenizers-backed class reproduces sentencepiece's dummy
prefix ("  x" -> "▁▁x"), while LlamaTokenizer disagrees with sentencepiece on text that starts with a
space and forces BPE on a unigram model. Reading tokenizer.model at all needs protobuf. For
tokenizer.json the reference is plain AutoTokenizer, which adds what the file's post-processor adds
(for SmolLM2: no BOS).
"""
import io
import random
import shutil
import zipfile

import pytest
import sentencepiece as spm
import tokenizers
import tokenizers.processors
from transformers import AutoTokenizer

from fetch_model import Wheel, download, wheels_dir
from load_weights import JSONTokenizer, LoadError, SentencePieceTokenizer, load_tokenizer

MISTRAL = Wheel("mistral-common==1.12.0", "mistral_common-1.12.0-py3-none-any.whl",
                "fa4504b66c30c0201ae4578c0340c5ee2abd22151c271532f62e373b985a53cf",
                "mistral_common/data/tokenizer.model.v1")

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
    return SentencePieceTokenizer(str(tok_dir)), AutoTokenizer.from_pretrained(str(tok_dir), add_bos_token=True)


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
        SentencePieceTokenizer(str(tmp_path))


# ---------------------------------------------------------------- real tokenizers

PIECES = ["the", "cache", "prefill", "Hello", "world", "KV-Runahead", "café", "über", "naïve", "déjà vu",
          "Grüße", "中文", "模型", "日本語のテキスト", "Ελληνικά", "русский", "العربية", "हिन्दी", "🙂", "🚀",
          "👍🏽", "👨‍👩‍👧", "2024", "3.14159", "1234567890", "x=42", "def f(x):", "return x**2", '{"a": [1, 2]}',
          "if (a && b) { c++; }", "#include <stdio.h>", "0x1F", "$HOME/.cache", "e.g.", "don't", "I'm", "...",
          "—", "«ok»"]
SEPARATORS = [" ", " ", " ", "  ", "   ", "\t", "\n", "\n\n", ", ", ". "]


def varied_lines(n=300):
    """n lines, the same every run: words, numbers, code, non-ASCII and emoji, joined by single and
    doubled spaces, tabs and newlines, some with leading or trailing whitespace."""
    rng = random.Random(13)
    lines = []
    for _ in range(n):
        body = "".join(rng.choice(PIECES) + rng.choice(SEPARATORS) for _ in range(rng.randint(1, 10)))
        lead = rng.choice([""] * 5 + [" ", "  ", "   ", "\n", "\t"])
        lines.append(lead + body.rstrip(" ") + rng.choice(["", "", " ", "  ", "\n"]))
    return lines


def test_varied_lines_are_varied():
    """The lines below hold what they promise, so a match on them means something."""
    lines = varied_lines()
    assert len(set(lines)) == 300
    assert sum(x.startswith(" ") for x in lines) > 30 and sum("  " in x for x in lines) > 100
    for wanted in ("2024", "def f(x):", "中文", "é", "🙂", "👨‍👩‍👧"):
        assert sum(wanted in x for x in lines) > 10, wanted


@pytest.fixture(scope="module", params=["smollm2", "mistral"])
def real_pair(request, tmp_path_factory):
    """(ours, AutoTokenizer) for SmolLM2's tokenizer.json or Mistral v0.1's tokenizer.model."""
    if request.param == "smollm2":
        d = request.getfixturevalue("smollm2")
        return load_tokenizer(d), AutoTokenizer.from_pretrained(d)
    d = tmp_path_factory.mktemp("mistral")
    with zipfile.ZipFile(download(MISTRAL, wheels_dir())) as z, z.open(MISTRAL.member) as f:
        (d / "tokenizer.model").write_bytes(f.read())
    return load_tokenizer(str(d)), AutoTokenizer.from_pretrained(str(d), add_bos_token=True)


def test_real_tokenizers_match_hf(real_pair):
    """Exact, on all 300 lines: the same ids as AutoTokenizer, and the same decoded text."""
    ours, hf = real_pair
    wrong = []
    for line in varied_lines():
        ids = ours.encode(line)
        if ids != hf(line)["input_ids"] or ours.decode(ids) != hf.decode(ids, skip_special_tokens=True):
            wrong.append(line)
    assert not wrong, f"{len(wrong)} of 300 lines differ, e.g. {wrong[:3]!r}"


def test_real_tokenizers_special_tokens(real_pair):
    """BOS as AutoTokenizer adds it: Mistral's <s> (id 1) first, none for SmolLM2, whose special
    tokens typed in the text become their ids (<|im_start|> 1, <|im_end|> 2); decoding drops them."""
    ours, hf = real_pair
    if isinstance(ours, JSONTokenizer):
        assert ours.encode("Once upon a time") == [6403, 1980, 253, 655]
        ids = ours.encode("<|im_start|>user\nHi<|im_end|>")
        assert ids == hf("<|im_start|>user\nHi<|im_end|>")["input_ids"] and (ids[0], ids[-1]) == (1, 2)
        assert ours.decode(ids) == "user\nHi"
    else:
        assert ours.encode("Once upon a time")[0] == 1 == hf("Once upon a time")["input_ids"][0]
        assert ours.sp.get_piece_size() == 32000


def test_load_tokenizer_picks_tokenizer_json_first(smollm2, tok_dir, tmp_path):
    """tokenizer.json wins over tokenizer.model (as AutoTokenizer has it); neither gives None."""
    assert load_tokenizer(str(tmp_path)) is None
    shutil.copy(tok_dir / "tokenizer.model", tmp_path)
    assert isinstance(load_tokenizer(str(tmp_path)), SentencePieceTokenizer)
    shutil.copy(f"{smollm2}/tokenizer.json", tmp_path)
    assert isinstance(load_tokenizer(str(tmp_path)), JSONTokenizer)


def test_a_tokenizer_json_whose_post_processor_adds_bos(smollm2, tmp_path):
    """The file's own post-processor decides the special tokens, as AutoTokenizer has it: here one
    that puts <|endoftext|> first, which an encode without special tokens would drop."""
    tok = tokenizers.Tokenizer.from_file(f"{smollm2}/tokenizer.json")
    bos = tok.token_to_id("<|endoftext|>")
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    ours, hf = load_tokenizer(str(tmp_path)), AutoTokenizer.from_pretrained(str(tmp_path))
    for text in ("Once upon a time", "KV-Runahead fills the cache"):
        assert ours.encode(text) == hf(text)["input_ids"] and ours.encode(text)[0] == bos

"""Tokenizer: OpenAI CLIP's byte-level BPE with IRRA's special tokens (anosorae/IRRA @ cfc2378
utils/simple_tokenizer.py and the tokenize() of datasets/bases.py)."""
from __future__ import annotations

import gzip

import pytest
import torch

from utils.simple_tokenizer import SimpleTokenizer, default_vocab_path, tokenize

MASK_ID, SOT_ID, EOT_ID = 49405, 49406, 49407


def test_vocabulary_size_and_special_ids(tokenizer):
    assert len(tokenizer) == 49408
    assert len(tokenizer.encoder) == len(tokenizer.decoder) == 49408
    assert tokenizer.encoder["<|mask|>"] == MASK_ID
    assert tokenizer.encoder["<|startoftext|>"] == SOT_ID
    assert tokenizer.encoder["<|endoftext|>"] == EOT_ID
    assert (tokenizer.mask_id, tokenizer.sot_id, tokenizer.eot_id) == (MASK_ID, SOT_ID, EOT_ID)
    assert sorted(tokenizer.decoder) == list(range(49408))


def test_ids_below_mask_are_openais(tokenizer):
    """IRRA only replaces OpenAI's last merged token (jekyll</w>, id 49405): every other id is
    OpenAI's, so the pretrained embedding rows line up. Checked against the merges file itself."""
    with gzip.open(default_vocab_path(), "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1:49152 - 256 - 2 + 1]
    assert len(merges) == 48894
    assert "".join(merges[-1].split()) == "jekyll</w>"
    # OpenAI: 512 byte symbols, then one token per merge in order -> merge m has id 512 + m.
    for m in (0, 1, 1000, 30000, len(merges) - 2):
        assert tokenizer.decoder[512 + m] == "".join(merges[m].split())
    assert tokenizer.decoder[49404] == "".join(merges[-2].split())
    assert "jekyll</w>" not in tokenizer.encoder
    # byte symbols: "!" is id 0 (why MLM treats 0 as ignore), "!</w>" is 256
    assert tokenizer.decoder[0] == "!"
    assert tokenizer.decoder[256] == "!</w>"


def test_reference_caption(tokenizer):
    ids = tokenize("A woman wearing a red shirt and black pants.", tokenizer)
    expected = [49406, 320, 2308, 3309, 320, 736, 2523, 537, 1449, 5003, 269, 49407] + [0] * 65
    assert ids.dtype == torch.long
    assert ids.shape == (77,)
    assert ids.tolist() == expected
    assert int(ids.argmax()) == 11


def test_normalisation_case_whitespace_html(tokenizer):
    ref = tokenize("A woman wearing a red shirt and black pants.", tokenizer)
    assert torch.equal(tokenize("  a   WOMAN wearing\ta red\nshirt and black pants.  ", tokenizer), ref)
    # HTML entities are unescaped (twice): &amp;amp; -> &amp; -> &
    assert tokenizer.encode("black &amp;amp; white") == tokenizer.encode("black & white")


def test_long_caption_truncated_with_eot_last(tokenizer):
    words = ["red", "shirt", "blue", "jeans", "walking", "slowly"] * 20  # 120 words
    caption = " ".join(words)
    bpe = tokenizer.encode(caption)
    assert len(bpe) == 120  # each of these words is one token
    ids = tokenize(caption, tokenizer)
    assert ids.shape == (77,)
    assert ids[0] == SOT_ID
    assert ids[76] == EOT_ID
    assert int(ids.argmax()) == 76
    assert ids[1:76].tolist() == bpe[:75]  # SOT, the first 75 BPE tokens, then EOT
    assert (ids != 0).all()


def test_exactly_full_caption_not_truncated(tokenizer):
    words = ["red"] * 75
    ids = tokenize(" ".join(words), tokenizer)
    assert ids[0] == SOT_ID and ids[76] == EOT_ID
    assert ids[1:76].tolist() == [tokenizer.encoder["red</w>"]] * 75


def test_empty_caption(tokenizer):
    ids = tokenize("", tokenizer)
    assert ids.tolist() == [49406, 49407] + [0] * 75
    assert tokenize("   ", tokenizer).tolist() == [49406, 49407] + [0] * 75


def test_other_text_length(tokenizer):
    ids = tokenize("A woman wearing a red shirt and black pants.", tokenizer, text_length=8)
    assert ids.tolist() == [49406, 320, 2308, 3309, 320, 736, 2523, 49407]


def test_jekyll_encodes(tokenizer):
    """IRRA raises KeyError on "jekyll" (its merge is still ranked); we drop that merge."""
    ids = tokenizer.encode("jekyll")
    assert ids, "jekyll must encode to some tokens"
    assert MASK_ID not in ids
    assert all(0 <= i < MASK_ID for i in ids)
    assert len(ids) >= 2  # the whole-word token no longer exists
    assert tokenizer.decode(ids) == "jekyll"
    full = tokenize("dr jekyll wearing a coat", tokenizer)
    assert MASK_ID not in full.tolist()
    assert int(full.argmax()) == full.tolist().index(EOT_ID)


@pytest.mark.parametrize("text", [
    "a woman wearing a red shirt and black pants.",
    "the man's bag is 2 feet long, isn't it?",
    "café crème — naïve façade",
    "she holds a white umbrella; he carries a backpack!",
])
def test_decode_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    decoded = tokenizer.decode(ids)
    # decode puts a space after each word-final token; compare without spaces, and re-encoding
    # the decoded text must reproduce the ids
    assert decoded.replace(" ", "") == text.replace(" ", "")
    assert tokenizer.encode(decoded) == ids


def test_decode_plain_words(tokenizer):
    text = "a woman wearing a red shirt and black pants"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_tokenizer_from_explicit_vocab_path():
    tok = SimpleTokenizer(default_vocab_path())
    assert len(tok) == 49408
    assert tok.encode("red shirt") == [736, 2523]


def test_special_token_text_in_a_caption_is_read_as_characters(tokenizer):
    ids = tokenize("a man <|endoftext|> in a red <|mask|> coat <|startoftext|>", tokenizer).tolist()
    assert ids.count(tokenizer.eot_id) == 1 and ids.count(tokenizer.sot_id) == 1 and MASK_ID not in ids
    assert ids.index(tokenizer.eot_id) == max(i for i, t in enumerate(ids) if t)  # EOT stays the last token
    assert "endoftext" in tokenizer.decode(ids[1:ids.index(tokenizer.eot_id)])

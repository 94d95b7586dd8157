"""CLIP byte-level BPE tokenizer with IRRA's vocabulary convention.

OpenAI's vocabulary has 49,408 entries: 256 byte symbols, the same with the end-of-word marker,
48,894 merges, then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407). IRRA drops the last
merged token (``jekyll</w>``, id 49405) and puts ``<|mask|>`` in its place, so the size and the
SOT/EOT ids stay those of the pretrained embedding. Unlike IRRA we also drop that merge, so the
word "jekyll" encodes as smaller pieces instead of raising ``KeyError``.
"""
from __future__ import annotations

import functools
import gzip
import html
import importlib.util
from pathlib import Path

import ftfy
import regex
import torch

SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
MASK_TOKEN = "<|mask|>"
NUM_MERGES = 49152 - 256 - 2
VOCAB_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"


def default_vocab_path() -> Path:
    """The BPE merges file shipped by the ``clip-anytorch`` package (data only)."""
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"{VOCAB_FILE_NAME} not found: install the 'clip-anytorch' package (requirements.txt)")
    return Path(list(spec.submodule_search_locations)[0]) / VOCAB_FILE_NAME


@functools.lru_cache()
def bytes_to_unicode() -> dict[int, str]:
    """Reversible map from bytes to printable unicode symbols (printable Latin-1 maps to itself)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table = {b: chr(b) for b in printable}  # printable symbols first: their order sets the ids
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return table


def _clean(text: str) -> str:
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


class SimpleTokenizer:
    """Encodes text to CLIP BPE ids (49,408 entries, ``<|mask|>`` = 49405)."""

    def __init__(self, vocab_path: str | Path | None = None):
        path = Path(vocab_path) if vocab_path else default_vocab_path()
        with gzip.open(path, "rt", encoding="utf-8") as f:
            merges = f.read().split("\n")[1:NUM_MERGES + 1]
        merges = [tuple(m.split()) for m in merges]
        merges = merges[:-1]  # the merge producing 'jekyll</w>', whose id becomes <|mask|>
        self.byte_encoder = bytes_to_unicode()
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
        vocab += [MASK_TOKEN, SOT_TOKEN, EOT_TOKEN]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.decoder = {i: token for token, i in self.encoder.items()}
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self.cache = {t: t for t in (MASK_TOKEN, SOT_TOKEN, EOT_TOKEN)}
        self.pattern = regex.compile(
            r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE)
        self.sot_id = self.encoder[SOT_TOKEN]
        self.eot_id = self.encoder[EOT_TOKEN]
        self.mask_id = self.encoder[MASK_TOKEN]

    def __len__(self) -> int:
        return len(self.encoder)

    def bpe(self, token: str) -> str:
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = {(a, b) for a, b in zip(word[:-1], word[1:])}
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if best not in self.bpe_ranks:
                break
            first, second = best
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        result = " ".join(word)
        self.cache[token] = result
        return result

    def encode_words(self, text: str) -> list[tuple[str, list[int]]]:
        """Each word of the cleaned, lower-cased text (CLIP's pre-tokenisation) with its BPE ids.
        Text never yields a special id: a caption holding ``<|endoftext|>`` is read as characters
        (CLIP's tokenizer would end the caption there, and EOT would no longer be its last token)."""
        words = []
        for word in regex.findall(self.pattern, _clean(text)):
            symbols = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            words.append((word, [self.encoder[t] for t in self.bpe(symbols).split(" ")]))
        return words

    def encode(self, text: str) -> list[int]:
        return [i for _, ids in self.encode_words(text) for i in ids]

    def decode(self, ids: list[int]) -> str:
        text = "".join(self.decoder[i] for i in ids)
        raw = bytearray(self.byte_decoder[c] for c in text)
        return raw.decode("utf-8", errors="replace").replace("</w>", " ").strip()


def tokenize(caption: str, tokenizer: SimpleTokenizer, text_length: int = 77) -> torch.LongTensor:
    """SOT + BPE ids + EOT, truncated to ``text_length`` keeping EOT last, zero-padded (IRRA)."""
    return pad_ids(tokenizer.encode(caption), tokenizer, text_length)


def pad_ids(bpe_ids: list[int], tokenizer: SimpleTokenizer, text_length: int = 77) -> torch.LongTensor:
    """``tokenize`` of already encoded BPE ids."""
    ids = [tokenizer.sot_id] + bpe_ids + [tokenizer.eot_id]
    if len(ids) > text_length:
        ids = ids[:text_length]
        ids[-1] = tokenizer.eot_id
    result = torch.zeros(text_length, dtype=torch.long)
    result[:len(ids)] = torch.tensor(ids, dtype=torch.long)
    return result

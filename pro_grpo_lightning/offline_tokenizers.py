"""Tokenizers that need no files, for the tiny offline models.

Real pipelines load their tokenizers from the weights folder. The tiny models built in code
(tests, quickstart, CPU benchmarks) use these instead: the same tokenizer classes, constructed
from an in-memory vocabulary (transformers 5 accepts one in the constructor), so the encode path
is the real one.
"""

from __future__ import annotations

import string
from collections.abc import Sequence

from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTokenizer, Qwen2Tokenizer, T5TokenizerFast

#: CLIP's special tokens, as in the real vocabulary.
CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"


def byte_level_clip_tokenizer(model_max_length: int = 77, words: Sequence[str] = ()) -> CLIPTokenizer:
    """A CLIPTokenizer over the 256 byte symbols (each with and without ``</w>``), no merges.

    Vocabulary size 514: 512 byte symbols + BOS (512) + EOS (513). Every string tokenizes (one
    token per byte), so prompts never hit an unknown token.

    ``words``: lower-case words that become one token each (a small BPE, as the real CLIP vocabulary
    has for common words): their merge chains and pieces are appended after id 513, so the first
    514 ids are the same with or without words; any other text still falls back to bytes.
    """
    symbols = sorted(ByteLevel.alphabet())  # the 256 printable stand-ins for bytes
    vocab: dict[str, int] = {}
    for s in symbols:
        vocab[s] = len(vocab)
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    vocab[CLIP_BOS] = len(vocab)
    vocab[CLIP_EOS] = len(vocab)
    merges: dict[tuple[str, str], int] = {}
    for word in words:
        # Run the merges made so far on the word, then join its first two pieces with a new,
        # lowest-priority merge, until the word is one piece. Earlier words keep their tokens:
        # their merges always outrank the new ones.
        pieces = _bpe([*word[:-1], word[-1] + "</w>"], merges)
        while len(pieces) > 1:
            merges[(pieces[0], pieces[1])] = len(merges)
            vocab.setdefault(pieces[0] + pieces[1], len(vocab))
            pieces = _bpe(pieces, merges)
    return CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=model_max_length)


def _bpe(pieces: list[str], merges: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word: merge the best-ranked adjacent pair (leftmost first) until none."""
    pieces = list(pieces)
    while len(pieces) > 1:
        ranks = [merges.get(pair, len(merges)) for pair in zip(pieces, pieces[1:])]
        best = min(range(len(ranks)), key=ranks.__getitem__)
        if ranks[best] == len(merges):
            break
        pieces[best:best + 2] = [pieces[best] + pieces[best + 1]]
    return pieces


def char_level_t5_tokenizer(model_max_length: int = 256, words: Sequence[str] = ()) -> T5TokenizerFast:
    """A T5TokenizerFast with a unigram vocabulary of single printable characters.

    Ids: 0 <pad>, 1 </s>, 2 <unk>, then printable characters, then word-initial letters, then
    ``words`` as word-initial pieces ("\u2581red"), which the unigram model prefers to spelling.
    """
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(c, -1.0) for c in string.printable if c not in "\t\n\r\x0b\x0c"]
    pieces += [("\u2581", -1.0)] + [("\u2581" + c, -1.5) for c in string.ascii_lowercase]
    pieces += [("\u2581" + w, -1.0) for w in dict.fromkeys(words)]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


#: The special tokens of the Qwen2 / Qwen2.5 / Qwen3 chat vocabularies that the pipelines' prompt
#: templates use (ids after the 256 byte symbols, in this order).
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


#: A Qwen-style chat template (user / assistant turns between ``<|im_start|>`` and ``<|im_end|>``) for
#: ``byte_level_qwen_tokenizer``; the real tokenizers ship their own (Qwen3's).
QWEN_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                      "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_level_qwen_tokenizer(model_max_length: int = 2048, chat_template: str | None = None) -> Qwen2Tokenizer:
    """A Qwen2Tokenizer over the 256 byte symbols (no merges) plus Qwen's chat specials.

    Vocabulary size 259: bytes 0-255, ``<|endoftext|>`` 256 (also pad, as in Qwen's), ``<|im_start|>``
    257, ``<|im_end|>`` 258. Every string tokenizes (one token per byte); the chat markers of the
    pipelines' prompt templates are one token each, as in the real vocabulary. Right padding, as Qwen's.
    ``chat_template``: for ``apply_chat_template`` (``QWEN_CHAT_TEMPLATE`` for Z-Image's pipeline).
    """
    vocab = {s: i for i, s in enumerate(sorted(ByteLevel.alphabet()))}
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=model_max_length, chat_template=chat_template)
    tok.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIALS[1:])})
    tok.padding_side = "right"
    return tok

"""Tokenizers that need no files, for the tiny offline models.

Real pipelines load their tokenizers from the weights folder. The tiny models built in code
(tests, quickstart, CPU benchmarks) use these instead: the same tokenizer classes, constructed
from an in-memory vocabulary (transformers 5 accepts one in the constructor), so the encode path
is the real one.
"""

from __future__ import annotations

import string

from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTokenizer, T5TokenizerFast

#: CLIP's special tokens, as in the real vocabulary.
CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"


def byte_level_clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """A CLIPTokenizer over the 256 byte symbols (each with and without ``</w>``), no merges.

    Vocabulary size 514: 512 byte symbols + BOS (512) + EOS (513). Every string tokenizes (one
    token per byte), so prompts never hit an unknown token.
    """
    symbols = sorted(ByteLevel.alphabet())  # the 256 printable stand-ins for bytes
    vocab: dict[str, int] = {}
    for s in symbols:
        vocab[s] = len(vocab)
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    vocab[CLIP_BOS] = len(vocab)
    vocab[CLIP_EOS] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def char_level_t5_tokenizer(model_max_length: int = 256) -> T5TokenizerFast:
    """A T5TokenizerFast with a unigram vocabulary of single printable characters.

    Ids: 0 <pad>, 1 </s>, 2 <unk>, then printable characters, then word-initial letters.
    """
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(c, -1.0) for c in string.printable if c not in "\t\n\r\x0b\x0c"]
    pieces += [("\u2581", -1.0)] + [("\u2581" + c, -1.5) for c in string.ascii_lowercase]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=model_max_length)

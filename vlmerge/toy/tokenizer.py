"""The toy world's bilingual tokenizer, in transformers format (tokenizer.json + config, no hub access).

Pieces: an English word (a run of ASCII letters) is one token; every other character -- each kana and kanji,
each digit, each space, newline and punctuation mark -- is its own token. Spaces are tokens rather than word
prefixes, so digits and words have one id in both languages ("3" in "3 + 4" and in "3個" is the same token),
and decoding is plain concatenation: decode(encode(x)) == x for any text made of known pieces. The vocabulary
is every piece of `texts.tokenizer_corpus` (which uses every template and lexicon entry), sorted after the
special tokens, so ids are the same for every run and every seed. Encoding adds `<s>` in front (as Mistral
tokenizers do) and never `</s>`: training appends it to the completion, generation stops on it.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from vlmerge.toy.texts import tokenizer_corpus

UNK, BOS, EOS, PAD, IMAGE = "<unk>", "<s>", "</s>", "<pad>", "<image>"
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD, IMAGE)
PIECE_PATTERN = r"[A-Za-z]+|[^A-Za-z]"
MODEL_MAX_LENGTH = 512


@lru_cache(maxsize=4)
def vocabulary(seed: int = 0) -> tuple[str, ...]:
    """Special tokens (ids 0-4: unk, bos, eos, pad, image), then every corpus piece in sorted order."""
    specials = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))
    pieces: set[str] = set()
    for text in tokenizer_corpus(seed):
        for chunk in specials.split(text):
            pieces.update(re.findall(PIECE_PATTERN, chunk))
    return SPECIAL_TOKENS + tuple(sorted(pieces))


def build_tokenizer(seed: int = 0) -> PreTrainedTokenizerFast:
    """A fresh tokenizer over `vocabulary(seed)`: bos/eos/pad/unk set, `<image>` as `tok.image_token`."""
    vocab = {piece: i for i, piece in enumerate(vocabulary(seed))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(PIECE_PATTERN), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B:1", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE},
        clean_up_tokenization_spaces=False,
        model_max_length=MODEL_MAX_LENGTH,
    )


def save_tokenizer(path: str | Path, seed: int = 0) -> PreTrainedTokenizerFast:
    """Build and `save_pretrained` into `path`; returns the tokenizer."""
    tok = build_tokenizer(seed)
    tok.save_pretrained(str(path))
    return tok

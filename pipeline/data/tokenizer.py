"""Character-level tokenizer of the embedded tiny model (no hub needed).

What: a ``tokenizers`` WordLevel model over single characters (the task's symbols) plus the specials
``<pad> <s> </s> <unk>``, a pre-tokenizer that isolates every character, a ``Fuse`` decoder (so decoding
concatenates without spaces) and a post-processor that prepends ``<s>``. Wrapped in
``PreTrainedTokenizerFast`` it saves as a standard ``tokenizer.json`` that transformers and vLLM load.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIALS: tuple[str, ...] = (PAD, BOS, EOS, UNK)


def build_char_tokenizer(symbols: Sequence[str], *, max_length: int) -> PreTrainedTokenizerFast:
    """A char tokenizer with ids ``<pad>=0, <s>=1, </s>=2, <unk>=3`` then ``symbols`` in order.

    ``max_length`` becomes ``model_max_length``. Unknown characters map to ``<unk>``.
    """
    if any(len(s) != 1 for s in symbols) or len(set(symbols)) != len(symbols):
        raise ValueError(f"symbols must be distinct single characters, got {list(symbols)!r}")
    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *symbols])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=max_length,
    )

"""Text in, text out with an encoder-decoder (T5 or the recurrent one), without DeepSpeed or Ray: texts to the
ids the model reads, and the ids it writes by greedy or beam search (``lmscale.models.seq2seq_search``)."""

from __future__ import annotations

from tokenizers import Tokenizer

from lmscale.data.tokenizer import T5_EOS, T5_PAD
from lmscale.models.seq2seq_search import EncoderDecoder, decode


def input_ids(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Each text's ids followed by end of sequence, as the model saw its inputs in training."""
    eos = tok.token_to_id(T5_EOS)
    return [[*tok.encode(text, add_special_tokens=False).ids, eos] for text in texts]


def outputs(model: EncoderDecoder, tok: Tokenizer, texts: list[str], num_beams: int, max_new_tokens: int,
            batch_size: int = 16) -> list[list[int]]:  # fmt: skip
    """The output ids for each text: greedy in batches, or a beam search per text."""
    eos, pad = tok.token_to_id(T5_EOS), tok.token_to_id(T5_PAD)
    inputs = input_ids(tok, texts)
    return [out for i in range(0, len(inputs), batch_size)
            for out in decode(model, inputs[i : i + batch_size], num_beams, max_new_tokens, eos, pad)]  # fmt: skip

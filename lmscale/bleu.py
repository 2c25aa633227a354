"""BLEU and chrF with sacrebleu (corpus BLEU, by default with its 13a tokenisation, and chrF): the scores MT
papers report, shared by training (a seq2seq fine-tune's validation) and ``lmscale eval``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TranslationScore:
    bleu: float
    chrf: float
    pairs: int
    bleu_signature: str
    chrf_signature: str


def score(hypotheses: list[str], references: list[str], tokenize: str = "13a") -> TranslationScore:
    """Corpus BLEU (with sacrebleu's ``tokenize``) and chrF of ``hypotheses`` against one reference each."""
    import sacrebleu

    bleu, chrf = sacrebleu.metrics.BLEU(tokenize=tokenize), sacrebleu.metrics.CHRF()
    bleu_score, chrf_score = bleu.corpus_score(hypotheses, [references]), chrf.corpus_score(hypotheses, [references])
    return TranslationScore(bleu_score.score, chrf_score.score, len(hypotheses), str(bleu.get_signature()),
                            str(chrf.get_signature()))  # fmt: skip

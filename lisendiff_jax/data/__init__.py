"""Corpora readers, the data mix, chat formatting and batching."""

from lisendiff_jax.data.bundled import Situation, load_situations, sample_path
from lisendiff_jax.data.errors import DataError, SkippedRowsWarning
from lisendiff_jax.data.example import STYLES, Example
from lisendiff_jax.data.mix import (
    PAPER_FRACTIONS,
    Mix,
    MixSource,
    SourceReport,
    build_mix,
    count_by_source_and_style,
    count_by_style,
    summary_table,
)
from lisendiff_jax.data.readers import FORMATS, Corpus, load_corpus, load_pairs

__all__ = [
    "FORMATS",
    "PAPER_FRACTIONS",
    "STYLES",
    "Corpus",
    "DataError",
    "Example",
    "Mix",
    "MixSource",
    "Situation",
    "SkippedRowsWarning",
    "SourceReport",
    "build_mix",
    "count_by_source_and_style",
    "count_by_style",
    "load_corpus",
    "load_pairs",
    "load_situations",
    "sample_path",
    "summary_table",
]

"""Data: tokenizers, grain sources, the packing/batching pipeline and the pre-tokenisation tool."""

from diffujax.data.pipeline import DataIterator, Pipeline, PipelineOptions, build_pipeline
from diffujax.data.sources import (
    ArrayRecordSource,
    DataError,
    JsonlSource,
    ParquetSource,
    TextSource,
    TfdsSource,
    make_source,
)
from diffujax.data.tokenizer import Tokenizer, VocabMismatchError, load_tokenizer

__all__ = [
    "ArrayRecordSource", "DataError", "DataIterator", "JsonlSource", "ParquetSource", "Pipeline",
    "PipelineOptions", "TextSource", "TfdsSource", "Tokenizer", "VocabMismatchError",
    "build_pipeline", "load_tokenizer", "make_source",
]

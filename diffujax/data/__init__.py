"""Data: tokenizers (``tokenizer``), grain sources (``sources``, ``files``), the packing/batching
pipeline (``pipeline``) and the pre-tokenisation tool (``pretokenize``)."""

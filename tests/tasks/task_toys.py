"""Constants of the tiny word-level vocabulary the task tests use (importable from tests)."""

V, UNK, MASK, EOS = 64, 61, 62, 63  # w0..w60, <unk>, <mask>, <eos> (also BOS)

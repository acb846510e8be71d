"""Tokenizer face: round trips, special ids from the HF side files, pickling, vocab checks.
Independent reference: the backend libraries themselves (sentencepiece, tokenizers)."""

import json
import pickle
import shutil

import pytest

from diffujax.data.tokenizer import VocabMismatchError, load_tokenizer

TEXTS = [
    "Permission is hereby granted, free of charge, to any person.",
    "  leading spaces, tabs\tand\nnewlines ",
    "Unicode: é, ß, 漢字, emoji 🙂",
]


def test_kinds_and_special_ids(sp_tok, hf_tok):
    assert sp_tok.kind == "sentencepiece" and sp_tok.vocab_size == 400
    assert (sp_tok.bos_id, sp_tok.eos_id, sp_tok.pad_id) == (1, 2, None)
    assert sp_tok.special["unk"] == 0
    assert hf_tok.kind == "hf" and hf_tok.vocab_size == 400
    # bos/eos from tokenizer_config.json (string and AddedToken spellings), pad from the map
    assert (hf_tok.bos_id, hf_tok.eos_id, hf_tok.pad_id) == (0, 0, 1)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(any_tok, text):
    ids = any_tok.encode(text)
    assert ids and all(isinstance(i, int) and 0 <= i < any_tok.vocab_size for i in ids)
    assert any_tok.encode_batch([text, text]) == [ids, ids]
    decoded = any_tok.decode(ids)
    if any_tok.kind == "sentencepiece":
        # sentencepiece normalises whitespace runs (LLaMA-2 behaviour); compare words
        assert decoded.split() == text.split()
    else:
        assert decoded == text


def test_matches_backend(sp_dir, hf_dir, sp_tok, hf_tok):
    import sentencepiece as spm
    from tokenizers import Tokenizer

    sp = spm.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    hf = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    for text in TEXTS:
        assert sp_tok.encode(text) == sp.encode(text)
        assert hf_tok.encode(text) == hf.encode(text, add_special_tokens=False).ids


def test_special_strings_in_text_stay_text(hf_tok, sp_tok):
    from tokenizers import Tokenizer

    assert hf_tok.eos_id not in hf_tok.encode("a <|endoftext|> b")
    assert sp_tok.eos_id not in sp_tok.encode("a </s> b")
    # ... which the backend on its own would turn into the control id
    parsing = Tokenizer.from_file(hf_tok.path)
    assert hf_tok.eos_id in parsing.encode("a <|endoftext|> b", add_special_tokens=False).ids
    # also in a grain worker, which gets the tokenizer pickled
    assert hf_tok.eos_id not in pickle.loads(pickle.dumps(hf_tok)).encode("a <|endoftext|> b")


def test_pickle_ships_the_path(any_tok):
    blob = pickle.dumps(any_tok)
    assert len(blob) < 1000  # the backend is loaded again in the worker, not shipped
    clone = pickle.loads(blob)
    assert clone.encode(TEXTS[0]) == any_tok.encode(TEXTS[0])
    assert clone.special == any_tok.special and clone.vocab_size == any_tok.vocab_size


def test_load_tokenizer_choices(tmp_path, sp_dir, hf_dir):
    both = tmp_path / "both"
    both.mkdir()
    shutil.copy(sp_dir / "tokenizer.model", both)
    shutil.copy(hf_dir / "tokenizer.json", both)
    assert load_tokenizer(both).kind == "hf"  # what transformers.AutoTokenizer reads
    assert load_tokenizer(sp_dir / "tokenizer.model").kind == "sentencepiece"
    # config.json ids: below the side files, above the model's own
    sp_only = tmp_path / "sp"
    sp_only.mkdir()
    shutil.copy(sp_dir / "tokenizer.model", sp_only)
    (sp_only / "config.json").write_text(json.dumps({"eos_token_id": [3, 5], "pad_token_id": 4}))
    tok = load_tokenizer(sp_only)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.special["unk"]) == (1, 3, 4, 0)


def test_load_tokenizer_errors(tmp_path, hf_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)
    bad = tmp_path / "bad"
    shutil.copytree(hf_dir, bad)
    (bad / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    with pytest.raises(ValueError, match="not in the vocabulary"):
        load_tokenizer(bad)


def test_model_vocab_check(any_tok):
    any_tok.check_model_vocab(400)
    any_tok.check_model_vocab(512)  # padded embedding tables are fine
    with pytest.raises(VocabMismatchError, match="400 tokens.*only 300 rows"):
        any_tok.check_model_vocab(300)
    with pytest.raises(VocabMismatchError):
        load_tokenizer(any_tok.path, model_vocab_size=399)


def test_generated_text_stops_at_the_first_eos(hf_tok):
    a, b = hf_tok.encode("free"), hf_tok.encode(" software")
    eos = hf_tok.eos_id
    ids = a + [eos] + b + [eos]
    assert hf_tok.decode_generated(ids) == "free"
    assert hf_tok.decode_generated(ids, stop_at_eos=False) == hf_tok.decode(ids)
    assert hf_tok.decode_generated(a + b) == "free software"  # no EOS: everything


def test_start_id_prefers_the_tokenizers_bos(sp_dir, hf_tok):
    sp = load_tokenizer(sp_dir)
    assert sp.start_id(config_bos=7) == 1  # the tokenizer's BOS: what the pipeline used
    del sp.special["bos"]
    assert sp.start_id(config_bos=7) == 7
    assert sp.start_id() == 2  # EOS: a document boundary
    del sp.special["eos"]
    assert sp.start_id() is None
    assert hf_tok.start_id() == hf_tok.bos_id == 0

"""Tiny tokenizers trained offline, once per session, on local text."""

import json
import pathlib

import pytest

TEXT = pathlib.Path(__file__).resolve().parents[2] / "diffujax" / "assets" / "gpl-3.0.txt"


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> pathlib.Path:
    """A handful of text files: the GPL-3 text that ships with diffujax, cut into six files at
    paragraph boundaries (the same corpus on every machine)."""
    out = tmp_path_factory.mktemp("corpus")
    paragraphs = TEXT.read_text(encoding="utf-8").split("\n\n")
    size = -(-len(paragraphs) // 6)
    for i in range(6):
        chunk = paragraphs[i * size:(i + 1) * size]
        (out / f"part{i}.txt").write_text("\n\n".join(chunk) + "\n", encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def sp_dir(tmp_path_factory, corpus_dir) -> pathlib.Path:
    """LLaMA-2 style sentencepiece model: unk=0, bos=1, eos=2, no pad, byte fallback."""
    import sentencepiece as spm

    out = tmp_path_factory.mktemp("sp")
    spm.SentencePieceTrainer.train(
        input=",".join(str(p) for p in sorted(corpus_dir.iterdir())),
        model_prefix=str(out / "tokenizer"), vocab_size=400, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, minloglevel=2,
        num_threads=1,
    )
    return out


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory, corpus_dir) -> pathlib.Path:
    """GPT-2 style byte-level BPE tokenizer.json, BOS = EOS = <|endoftext|>, plus a <pad>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out = tmp_path_factory.mktemp("hf")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<pad>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train([str(p) for p in sorted(corpus_dir.iterdir())], trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|endoftext|>",
        "eos_token": {"content": "<|endoftext|>", "special": True},
    }))
    (out / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<pad>"}))
    return out


@pytest.fixture(scope="session")
def sp_tok(sp_dir):
    from diffujax.data.tokenizer import load_tokenizer

    return load_tokenizer(sp_dir)


@pytest.fixture(scope="session")
def hf_tok(hf_dir):
    from diffujax.data.tokenizer import load_tokenizer

    return load_tokenizer(hf_dir)


@pytest.fixture(params=["sentencepiece", "hf"])
def any_tok(request, sp_tok, hf_tok):
    return sp_tok if request.param == "sentencepiece" else hf_tok

import json

import pytest

from ray_dpo.core.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

TEXTS = ["plain ascii", "typographic ’quotes” • bullets", "日本語のテキスト 🙂", "", "\n\nHuman: hi\n\nAssistant:"]


def test_byte_tokenizer_round_trip_and_ids():
    tok = ByteTokenizer()
    for text in TEXTS:
        ids = tok.encode(text)
        assert all(0 <= i < 256 for i in ids)
        assert tok.decode(ids) == text
        assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == text  # specials are not text
    assert [a.tolist() for a in tok.encode_batch(TEXTS)] == [tok.encode(t) for t in TEXTS]
    assert len({tok.pad_id, tok.bos_id, tok.eos_id}) == 3 and tok.vocab_size == 259


def test_load_tokenizer_specs(tmp_path):
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    ByteTokenizer().save(tmp_path)
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    assert isinstance(load_tokenizer(tmp_path / "tokenizer.json"), ByteTokenizer)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        load_tokenizer(tmp_path / "bad.json")


def _train_bpe(path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TEXTS * 20, trainer)
    tok.decoder = __import__("tokenizers").decoders.ByteLevel()
    tok.save(str(path))


def test_hf_tokenizer_from_json(tmp_path):
    path = tmp_path / "tokenizer.json"
    _train_bpe(path)
    tok = load_tokenizer(path)
    assert isinstance(tok, HFTokenizer)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    out = tmp_path / "saved"
    out.mkdir()
    tok.save(out)
    assert load_tokenizer(out).encode(TEXTS[1]) == tok.encode(TEXTS[1])


def test_hf_tokenizer_missing_special_token_names_it(tmp_path):
    path = tmp_path / "tokenizer.json"
    _train_bpe(path)
    with pytest.raises(ValueError, match="eos='<eos>'"):
        HFTokenizer(path, eos="<eos>")
    assert json.loads(path.read_text())["model"]["type"] == "BPE"

import pytest
import torch

from ray_dpo.core.checkpoint import load_model, save_model
from ray_dpo.core.model import ModelConfig, TransformerLM
from ray_dpo.core.tokenizer import ByteTokenizer, load_tokenizer


def test_round_trip_is_bit_exact(tmp_path):
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(vocab_size=259, dim=32, depth=2, heads=2, max_seq_len=32))
    save_model(tmp_path, model, ByteTokenizer())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "model_config.json", "tokenizer.json"]

    loaded = load_model(tmp_path)
    assert loaded.config == model.config
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for name in original:
        assert torch.equal(original[name], restored[name]), name
    assert loaded.to_logits.weight is loaded.token_emb.weight  # tying survives the round trip
    tokens = torch.randint(0, 259, (2, 9))
    assert torch.equal(loaded.eval()(tokens), model.eval()(tokens))
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)


def test_weights_are_safetensors_not_pickle(tmp_path):
    save_model(tmp_path, TransformerLM(ModelConfig(dim=32, depth=1, heads=2)))
    header_len = int.from_bytes((tmp_path / "model.safetensors").read_bytes()[:8], "little")
    assert (tmp_path / "model.safetensors").read_bytes()[8:9] == b"{" and header_len > 0


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_config.json"):
        load_model(tmp_path)
    save_model(tmp_path, TransformerLM(ModelConfig(dim=32, depth=1, heads=2)))
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(tmp_path)

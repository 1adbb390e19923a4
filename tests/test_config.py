"""ModelConfig: presets are the paper's, bad values name their field, JSON round-trips."""

from __future__ import annotations

import pytest

from transformer_jax.config import ModelConfig


def test_presets_are_table_3() -> None:
    base, big = ModelConfig.preset("base"), ModelConfig.preset("big")
    assert (base.num_encoder_layers, base.d_model, base.d_ff, base.num_heads) == (6, 512, 2048, 8)
    assert (base.head_dim, base.dropout_rate) == (64, 0.1)
    assert (big.num_decoder_layers, big.d_model, big.d_ff, big.num_heads) == (6, 1024, 4096, 16)
    assert (big.head_dim, big.dropout_rate) == (64, 0.3)
    for paper in (base, big):
        assert paper.norm_position == "post"
        assert paper.position_encoding == "sinusoidal"
        assert paper.feed_forward == "relu"
        assert paper.embedding_sharing == "all"


def test_preset_overrides_and_unknown_names() -> None:
    assert ModelConfig.preset("tiny", d_model=64).d_model == 64
    with pytest.raises(ValueError, match="unknown name 'huge'"):
        ModelConfig.preset("huge")
    with pytest.raises(ValueError, match="unknown field"):
        ModelConfig.preset("base", d_modle=3)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"d_model": 500}, "d_model"),
        ({"dropout_rate": -0.1}, "dropout_rate"),
        ({"attention_dropout_rate": 1.0}, "attention_dropout_rate"),
        ({"norm_position": "middle"}, "norm_position"),
        ({"attention_impl": "flash"}, "attention_impl"),
        ({"dtype": "float64"}, "dtype"),
        ({"num_kv_heads": 3}, "num_kv_heads"),
        ({"num_encoder_layers": 0}, "num_encoder_layers"),
        ({"vocab_size": 3}, "vocab_size"),
        ({"d_ff": 2.5}, "d_ff"),
        ({"decoder_start_id": 1}, "decoder_start_id"),  # EOS cannot start the decoder
        ({"decoder_start_id": 37000}, "decoder_start_id"),
        ({"feed_forward": "geglu"}, "feed_forward"),
        (
            {"attention_impl": "dot_product", "attention_dropout_rate": 0.1},
            "attention_dropout_rate",
        ),
    ],
)
def test_invalid_values_name_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}"):
        ModelConfig.preset("base", **overrides)


def test_json_round_trip(tmp_path) -> None:
    config = ModelConfig.preset("big", norm_position="pre", num_kv_heads=4)
    config.save(tmp_path / "model_config.json")
    assert ModelConfig.load(tmp_path / "model_config.json") == config


def test_corrupt_or_foreign_json_names_the_file(tmp_path) -> None:
    bad = tmp_path / "model_config.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"model_config\.json"):
        ModelConfig.load(bad)
    bad.write_text('{"d_model": 8, "colour": "red"}')
    with pytest.raises(ValueError, match="colour"):
        ModelConfig.load(bad)


def test_config_is_frozen() -> None:
    config = ModelConfig.preset("tiny")
    with pytest.raises(AttributeError):
        config.d_model = 3  # type: ignore[misc]

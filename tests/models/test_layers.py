import pytest
import torch
from torch import nn

from qharness.core.errors import ModelLoadError
from qharness.models.layers import decoder_layers


def tiny(config_cls_name: str, **kwargs):
    import transformers

    config = getattr(transformers, config_cls_name)(**kwargs)
    return transformers.AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize(
    ("config", "kwargs", "layer_class"),
    [
        ("LlamaConfig", dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                             num_attention_heads=4), "LlamaDecoderLayer"),
        ("GPT2Config", dict(vocab_size=64, n_embd=32, n_layer=3, n_head=4), "GPT2Block"),
        ("OPTConfig", dict(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=3, num_attention_heads=4,
                           word_embed_proj_dim=32), "OPTDecoderLayer"),
        ("GPTNeoXConfig", dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                               num_attention_heads=4), "GPTNeoXLayer"),
    ],
)
def test_decoder_layers_found_across_architectures(config, kwargs, layer_class):
    torch.manual_seed(0)
    layers = decoder_layers(tiny(config, **kwargs))
    assert len(layers) == 3
    assert type(layers[0]).__name__ == layer_class


def test_no_layer_stack_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="cannot find the decoder layers of Sequential"):
        decoder_layers(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))

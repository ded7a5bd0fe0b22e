"""A model loaded from a GGUF file (weights dequantised on load) saves as a plain dense transformers model:
transformers itself refuses ("quantized with gguf and is not serializable"), which broke full fine-tuning and
``peftkit merge`` on SmolLM2."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers.quantizers.quantizer_gguf import GgufHfQuantizer  # noqa: E402
from transformers.utils.quantization_config import GgufConfig  # noqa: E402

from peftkit.train.modeling import save_transformers  # noqa: E402


def _gguf_loaded_tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(cfg).eval()
    qc = GgufConfig(gguf_file="model.gguf", dequantize=True)  # what transformers attaches on a GGUF load
    model.hf_quantizer = GgufHfQuantizer(qc)
    model.config.quantization_config = qc
    return model


def test_gguf_loaded_model_saves_dense_and_reloads_equal(tmp_path):
    model = _gguf_loaded_tiny_llama()
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "plain")  # transformers' own refusal, which save_transformers avoids
    save_transformers(model, str(tmp_path / "dense"))
    assert model.hf_quantizer is not None and hasattr(model.config, "quantization_config")  # restored
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    assert getattr(reloaded.config, "quantization_config", None) is None
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


def test_packed_weights_are_refused(tmp_path):
    model = _gguf_loaded_tiny_llama()
    model.register_parameter("packed_blocks", torch.nn.Parameter(torch.zeros(8, dtype=torch.uint8),
                                                                 requires_grad=False))
    with pytest.raises(Exception, match="GGUF-packed weights"):
        save_transformers(model, str(tmp_path / "dense"))

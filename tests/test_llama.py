"""mmtrain.models.llama against transformers' own models on tiny random checkpoints.

Each checkpoint is built with transformers' classes and written with ``save_pretrained``;
our Decoder loads it from disk (safetensors, no transformers) and must give the same
fp32 logits to 1e-5.
"""
import json

import pytest
import torch
import transformers

from mmtrain.models.llama import Decoder, DecoderSpec, causal_mask, from_pretrained, load_hf_weights

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)


def _checkpoint(tmp_path, cls_name: str, **overrides):
    torch.manual_seed(0)
    config_cls = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))
    config = config_cls(**{**TINY, **overrides})
    model = getattr(transformers, cls_name)(config).eval()
    with torch.no_grad():  # random biases/norm weights so they matter (HF initialises them to 0 / 1)
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path, safe_serialization=True)
    return model


def _ids(B=2, N=11, seed=1):
    return torch.randint(0, TINY["vocab_size"], (B, N), generator=torch.Generator().manual_seed(seed))


CASES = {
    "llama_gqa_untied": ("LlamaForCausalLM", dict(tie_word_embeddings=False)),
    "llama_tied": ("LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "llama_bias": ("LlamaForCausalLM", dict(attention_bias=True, mlp_bias=True)),
    "llama_rope_linear": ("LlamaForCausalLM", dict(rope_theta=500.0, rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "llama_rope_llama3": ("LlamaForCausalLM", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                                 "high_freq_factor": 4.0,
                                                                 "original_max_position_embeddings": 8})),
    "qwen2_qkv_bias": ("Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3_qk_norm": ("Qwen3ForCausalLM", dict(head_dim=32, tie_word_embeddings=False)),
    "mistral": ("MistralForCausalLM", dict(sliding_window=None)),
}


@pytest.fixture(params=sorted(CASES))
def pair(request, tmp_path):
    cls_name, overrides = CASES[request.param]
    ref = _checkpoint(tmp_path, cls_name, **overrides)
    ours = from_pretrained(tmp_path).eval()
    return request.param, ref, ours, tmp_path


def test_logits_equal_transformers(pair):
    name, ref, ours, _ = pair
    ids = _ids()
    with torch.no_grad():
        want = ref(input_ids=ids).logits.float()
        got = ours.forward_text(ids)
    assert got.dtype == torch.float32 and got.shape == (2, 11, TINY["vocab_size"])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_auto_model_and_features(pair):
    """The same through AutoModelForCausalLM; the spec reads the checkpoint's features."""
    name, _, ours, path = pair
    auto = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    ids = _ids(seed=2)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_text(ids), auto(input_ids=ids).logits.float(), atol=1e-5, rtol=1e-5)
    spec = ours.spec
    assert spec.num_key_value_heads == 2 and spec.num_attention_heads == 4
    assert spec.qkv_bias == (name in ("qwen2_qkv_bias", "llama_bias"))
    assert spec.o_bias == (name == "llama_bias")
    assert spec.qk_norm == (name == "qwen3_qk_norm")
    assert (ours.lm_head.weight is ours.embed_tokens.weight) == spec.tie_word_embeddings
    assert spec.tie_word_embeddings == (name in ("llama_tied", "qwen2_qkv_bias"))


def test_explicit_causal_mask_and_positions(pair):
    _, _, ours, _ = pair
    ids = _ids()
    B, N = ids.shape
    mask = causal_mask(N, N).expand(B, N, N)
    positions = torch.arange(N).expand(B, N)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_text(ids, positions=positions, mask=mask), ours.forward_text(ids),
                                   atol=1e-6, rtol=1e-6)


def test_kv_cache_decoding_equals_full_forward(pair):
    _, _, ours, _ = pair
    ids = _ids()
    with torch.no_grad():
        full = ours.forward_text(ids)
        cache = ours.new_cache()
        steps = [ours.forward_text(ids[:, :4], cache=cache, update_cache=True)]  # a prompt, then one by one
        for i in range(4, ids.shape[1]):
            steps.append(ours.forward_text(ids[:, i:i + 1], cache=cache, update_cache=True))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache[0]["k"].shape == (2, 2, ids.shape[1], ours.spec.head_dim)  # G = 2 kv heads cached, not H


def test_kv_cache_with_explicit_mask():
    """A boolean (B, N, Nk) mask over cached + new keys gives the same as the causal default."""
    spec = DecoderSpec.from_hf_config({**TINY, "model_type": "llama"})
    torch.manual_seed(0)
    dec = Decoder(spec).eval()
    ids = _ids(B=1, N=6)
    with torch.no_grad():
        full = dec.forward_text(ids)
        cache = dec.new_cache()
        a = dec.forward_text(ids[:, :3], mask=causal_mask(3, 3)[None], cache=cache, update_cache=True)
        b = dec.forward_text(ids[:, 3:], mask=causal_mask(3, 6)[None], cache=cache, update_cache=True)
    torch.testing.assert_close(torch.cat([a, b], 1), full, atol=1e-5, rtol=1e-5)


def test_sharded_checkpoint(tmp_path):
    ref = _checkpoint(tmp_path, "LlamaForCausalLM")
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    ours = from_pretrained(tmp_path / "sharded").eval()
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_text(ids), ref(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_config_errors(tmp_path):
    base = {**TINY, "model_type": "llama"}
    with pytest.raises(ValueError, match="config.json.*model_type"):
        DecoderSpec.from_hf_config({**base, "model_type": "gpt2"})
    with pytest.raises(ValueError, match="config.json.*rope_scaling"):
        DecoderSpec.from_hf_config({**base, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
    with pytest.raises(ValueError, match="config.json.*hidden_act"):
        DecoderSpec.from_hf_config({**base, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="config.json.*sliding_window"):
        DecoderSpec.from_hf_config({**base, "model_type": "mistral", "sliding_window": 4096})
    with pytest.raises(ValueError, match="config.json.*num_key_value_heads"):
        DecoderSpec.from_hf_config({**base, "num_key_value_heads": 3})
    spec = DecoderSpec.from_hf_config({**base, "rope_scaling": {"type": "linear", "factor": 4.0}})  # old "type" key
    assert spec.head_dim == 16 and spec.rope_scaling["factor"] == 4.0


def test_not_a_local_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        from_pretrained("meta-llama/Llama-3.2-1B")
    spec = DecoderSpec.from_hf_config({**TINY, "model_type": "llama"})
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_hf_weights(Decoder(spec), tmp_path / "missing")


def test_architecture_mismatch(tmp_path):
    _checkpoint(tmp_path, "LlamaForCausalLM")
    cfg = json.loads((tmp_path / "config.json").read_text())
    other = Decoder(DecoderSpec.from_hf_config({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match="another architecture"):
        load_hf_weights(other, tmp_path)


def test_flex_block_mask_equals_boolean_mask():
    """The FlexAttention path (a causal BlockMask) gives the logits of the boolean-mask path."""
    from torch.nn.attention.flex_attention import create_block_mask

    spec = DecoderSpec.from_hf_config({**TINY, "model_type": "qwen3", "head_dim": 32})
    torch.manual_seed(0)
    dec = Decoder(spec).eval()
    ids = _ids(N=16)
    block = create_block_mask(lambda b, h, q, k: k <= q, B=None, H=None, Q_LEN=16, KV_LEN=16, device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(dec.forward_text(ids, mask=block), dec.forward_text(ids), atol=1e-5, rtol=1e-5)

"""Tiny random Hugging Face models of every supported family (transformers, torch CPU), saved
as folders: the independent reference for models/hf.py."""

import torch
import transformers

COMMON = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
              num_attention_heads=6, num_key_value_heads=3, head_dim=8,
              max_position_embeddings=128, rms_norm_eps=1e-6,
              initializer_range=0.3)  # large weights: peaked attention, so masks and caps matter

FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(rope_theta=10000.0)),
    "llama3.1": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                               high_freq_factor=4.0,
                                               original_max_position_embeddings=16))),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM,
                dict(sliding_window=5)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(tie_word_embeddings=False)),
    "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM, {}),
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM, dict(
        sliding_window=5, query_pre_attn_scalar=12, attn_logit_softcapping=3.0,
        final_logit_softcapping=2.0)),
}


def make(family: str, folder: str, seed: int = 0):
  """A randomly initialised model of `family` saved to `folder`; returns the torch model."""
  config_cls, model_cls, extra = FAMILIES[family]
  torch.manual_seed(seed)
  model = model_cls(config_cls(**COMMON, **extra, attn_implementation="eager")).eval()
  with torch.no_grad():  # norms and biases away from their init, so that each one matters
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(folder)
  return model

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
    "llama-yarn": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        rope_theta=10000.0, rope_scaling=dict(rope_type="yarn", factor=8.0,
                                              original_max_position_embeddings=16))),
    "llama-longrope": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        rope_theta=10000.0, rope_scaling=dict(
            rope_type="longrope", long_factor=[1.0, 2.5, 6.0, 11.0],
            short_factor=[1.0, 1.2, 1.5, 2.0], original_max_position_embeddings=16))),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM,
                dict(sliding_window=5)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(tie_word_embeddings=False)),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
              dict(tie_word_embeddings=False)),
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM, dict(
        sliding_window=7, original_max_position_embeddings=16, pad_token_id=0, eos_token_id=1,
        bos_token_id=2,
        rope_scaling=dict(rope_type="longrope", long_factor=[1.0, 2.5, 6.0, 11.0],
                          short_factor=[1.0, 1.2, 1.5, 2.0]))),
    "olmo2": (transformers.Olmo2Config, transformers.Olmo2ForCausalLM, dict(pad_token_id=0)),
    "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM, {}),
    "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM, dict(
        sliding_window=5, query_pre_attn_scalar=12, layer_types=[
            "sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0,
                                            "rope_theta": 100000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 50.0}})),
    "bloom": (transformers.BloomConfig, transformers.BloomForCausalLM, dict(pad_token_id=0)),
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM, dict(
        sliding_window=5, query_pre_attn_scalar=12, attn_logit_softcapping=3.0,
        final_logit_softcapping=2.0)),
}


def make(family: str, folder: str, seed: int = 0):
  """A randomly initialised model of `family` saved to `folder`; returns the torch model."""
  config_cls, model_cls, extra = FAMILIES[family]
  torch.manual_seed(seed)
  common = COMMON if family != "bloom" else dict(  # BLOOM's own keys; MHA, a 4 x d MLP
      vocab_size=COMMON["vocab_size"], hidden_size=COMMON["hidden_size"],
      n_layer=COMMON["num_hidden_layers"], n_head=COMMON["num_attention_heads"],
      initializer_range=COMMON["initializer_range"])
  model = model_cls(config_cls(**common, **extra, attn_implementation="eager")).eval()
  with torch.no_grad():  # norms and biases away from their init, so that each one matters
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(folder)
  return model


# Chat templates as model folders write them (Jinja, rendered by transformers), for the two
# kinds of tokenizer below; the project's own `chatml` and `llama3` templates must render alike.
CHATML_JINJA = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
                "message['content'] + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
                "{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3_JINJA = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + "
                "message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
                "{% endfor %}{% if add_generation_prompt %}"
                "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")

# kind: (special tokens, bos, eos, does tokenizer.json's post-processor add BOS, chat template)
TOKENIZERS = {
    "qwen2": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", False,
              CHATML_JINJA),
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                "<|eot_id|>"], "<|begin_of_text|>", "<|eot_id|>", True, LLAMA3_JINJA),
}
_CORPUS = ["def mean(xs):\n    return sum(xs) / len(xs)\n", "What is 2+3? It is 5.\n",
           "The quick brown fox jumps over the lazy dog.\n", "Hello, world! print(x)\n"] * 20


def make_tokenizer(kind: str, folder: str, vocab_size: int = COMMON["vocab_size"]):
  """A byte-level BPE tokenizer of `vocab_size` ids (the tiny models' vocabulary), trained on a
  few lines, saved to `folder` through transformers as a Qwen2-like (no BOS) or Llama-3-like
  (BOS from the post-processor) folder with its chat template. Returns the transformers one.
  Make the model first when both share the folder."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

  specials, bos, eos, adds_bos, jinja = TOKENIZERS[kind]
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(_CORPUS, trainers.BpeTrainer(vocab_size=vocab_size,
                                                       special_tokens=specials, show_progress=False))
  assert tok.get_vocab_size() == vocab_size, tok.get_vocab_size()
  if adds_bos:
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
  hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos,
                                                chat_template=jinja)
  hf_tok.save_pretrained(folder)
  # Beside a model's config.json, transformers 5 rebuilds the tokenizer with the family's own
  # class (Qwen2Tokenizer's pre-tokenizer regex): saved again through it, the folder's
  # tokenizer.json is what AutoTokenizer runs, as it is in a real model folder.
  transformers.AutoTokenizer.from_pretrained(folder).save_pretrained(folder)
  return transformers.AutoTokenizer.from_pretrained(folder)


# Mixtures of experts (and Qwen3, whose attention Qwen3-MoE shares), with odd sizes: 3 heads of
# 12 (Qwen3: of 10, head_dim apart from hidden / heads) over one KV head, 5 experts of width 22,
# top 2, vocabulary 101.
MOE_COMMON = dict(vocab_size=101, hidden_size=36, intermediate_size=30, num_hidden_layers=3,
                  num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=128,
                  rms_norm_eps=1e-6, initializer_range=0.3, num_experts_per_tok=2)
_QWEN_MOE = dict(num_experts=5, moe_intermediate_size=22)
MOE_FAMILIES = {
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM,
                dict(num_local_experts=5, intermediate_size=22)),
    "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM,
                  dict(_QWEN_MOE, shared_expert_intermediate_size=14)),
    # dense layers 0 and 2 (decoder_sparse_step 2), the top k not renormalised
    "qwen2_moe_step2": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM,
                        dict(_QWEN_MOE, shared_expert_intermediate_size=14, decoder_sparse_step=2)),
    # layer 0 dense (mlp_only_layers), the top k renormalised
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
                  dict(_QWEN_MOE, head_dim=10, norm_topk_prob=True, mlp_only_layers=[0])),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
              dict(head_dim=10, tie_word_embeddings=False)),
}


def make_moe(family: str, folder: str, seed: int = 0, **config):
  """A randomly initialised model of MOE_FAMILIES[family] (with `config` changed) saved to
  `folder` as transformers writes it (one tensor per expert); returns the torch model, which
  runs its experts one by one (transformers' grouped_mm path needs 16-byte strides, which
  width 22 does not give)."""
  config_cls, model_cls, extra = MOE_FAMILIES[family]
  torch.manual_seed(seed)
  model = model_cls(config_cls(**{**MOE_COMMON, **extra, **config}, attn_implementation="eager",
                               experts_implementation="eager")).eval()
  with torch.no_grad():  # norms, biases and routers away from their init (Qwen's router: zeros)
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
      if name.endswith("mlp.gate.weight"):
        p.normal_(0.0, 0.3)
  model.save_pretrained(folder)
  return model

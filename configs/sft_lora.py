"""LoRA supervised fine-tuning of a Hugging Face model on a chat jsonl.

python -m trainer.main --config=configs/sft_lora.py:/path/to/hf_model --workdir=/tmp/lora
python -m trainer.export --workdir=/tmp/lora --format=peft --out=/tmp/lora-adapter   # for HF PEFT
python -m trainer.export --workdir=/tmp/lora --format=hf --out=/tmp/lora-merged      # merged

The argument is a Hugging Face folder (config.json, safetensors, tokenizer); its chat template
must match `data.template` (chatml here: Qwen2; llama3 or gemma for those families). LoRA r=16,
alpha=32 on every linear layer; LoRA+ with B learning 4x faster. Without an argument the recipe
runs on configs/sft_chat.py's small randomly initialised model (a smoke run: LoRA on random
weights learns little).
"""

from configs import sft_chat


def get_config(arg=None):
  c = sft_chat.get_config()
  if arg:
    c.model.init_from = f"hf:{arg}"
    c.data.tokenizer = ""  # the model's own
  c.peft.update(method="lora", targets="all-linear", rank=16, alpha=32.0, lora_plus_scale=4.0)
  c.train.update(steps=300, lr=2e-4, warmup_steps=20, eval_every=100, checkpoint_every=100)
  return c

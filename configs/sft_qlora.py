"""QLoRA supervised fine-tuning: the Hugging Face model's linear weights stored in 4 bits (NF4,
blocks of 64, double-quantized block maxima), LoRA r=16 on all of them in bfloat16 compute.

python -m trainer.main --config=configs/sft_qlora.py:/path/to/hf_model --workdir=/tmp/qlora

Input sizes of the targeted layers must be multiples of 64 (true of every released Llama,
Mistral, Qwen2 and Gemma size). Without an argument: configs/sft_lora.py's smoke model.
"""

from configs import sft_lora


def get_config(arg=None):
  c = sft_lora.get_config(arg)
  c.peft.base_quant = "nf4"
  if not arg:  # the smoke model: sizes in multiples of 64
    c.model.update(d_model=192, d_ff=512)
  c.precision.compute_dtype = "bfloat16"
  return c

"""LISA supervised fine-tuning of a Hugging Face model: full-parameter updates, but only 2
randomly drawn layers (plus embeddings, final norm and head) train at a time, redrawn every 20
steps; Adam's moments exist for those alone (trainer/lisa.py).

python -m trainer.main --config=configs/sft_lisa.py:/path/to/hf_model --workdir=/tmp/lisa
python -m trainer.export --workdir=/tmp/lisa --format=hf --out=/tmp/lisa-hf

Without an argument: configs/sft_lora.py's smoke model.
"""

from configs import sft_lora


def get_config(arg=None):
  c = sft_lora.get_config(arg)
  c.peft.update(method="lisa", lisa_activated_layers=2, lisa_step_interval=20)
  c.train.lr = 1e-5 if arg else 1e-3
  return c

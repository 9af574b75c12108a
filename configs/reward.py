"""A reward model: the decoder with a scalar score head, trained with the Bradley-Terry pairwise
loss on generated pairs with checkable answers.

The default data is data/arith_pref (trainer/data/synthetic.py). Held-out preference accuracy,
the share of pairs the model scores higher for the right answer, is `eval_accuracy`
(BENCHMARKS.md). `trainer.export --format=hf` writes a *ForSequenceClassification model
(num_labels 1) that transformers loads.

python -m trainer.main --config=configs/reward.py --workdir=/tmp/rm
python -m trainer.main --config=configs/reward.py:HF_DIR   # start from a causal LM
"""

from configs import dpo


def get_config(arg=None):
  c = dpo.get_config(arg)
  c.train.update(objective="reward", lr=5e-4, steps=1000, eval_every=250, checkpoint_every=250)
  if arg:
    c.train.update(steps=300, eval_every=50)
  return c

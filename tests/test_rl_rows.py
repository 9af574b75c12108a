"""GRPO's G completions of one prompt share it in one packed row (the prompt once, each
completion a branch that sees the prompt and not its siblings): every completion's token
log-probs equal those of prompt + completion run alone, for the xla masks and the FlashMask
kernel."""

import jax
import numpy as np
import pytest

import hf_models
from models import Context, hf
from models.config import Execution
from models import handle as handles
from trainer.data import pairs

PROMPTS = [[5, 9, 2, 7], [3, 8]]
ANSWERS = [[[11, 12, 13], [20, 21], [30], [40, 41, 42, 43]],
           [[14, 15], [22, 23, 24], [31], [33, 34]]]


# pallas: tests/test_preference.py checks its shared-prompt columns in the default suite
@pytest.mark.parametrize("impl", ["xla", pytest.param("pallas", marks=pytest.mark.slow)])
def test_groups_in_one_row_equal_separate_rows(tmp_path, impl):
  hf_models.make("llama", str(tmp_path / "base"))
  cfg, params = hf.load(str(tmp_path / "base"))
  handle = handles.model_handle(cfg, run=Execution(attention_impl=impl))
  model = handle.bind(params)
  groups = [pairs.Group(np.asarray(p), [np.asarray(a) for a in answers],
                        [np.ones(len(a)) for a in answers])
            for p, answers in zip(PROMPTS, ANSWERS)]
  n = sum(len(g.inputs) for g in groups)
  row = pairs.assemble(np.array([[0, 0, len(groups[0])], [1, 0, len(groups[1])]]), groups, None,
                       n + 3)
  batch = {k: v[None] for k, v in row.items()}
  h = model.hidden(batch["inputs"], batch["positions"], batch["segment_ids"],
                   Context(shared_prompt=4))
  logp = jax.nn.log_softmax(model.logits(h)[0], axis=-1)
  got = np.take_along_axis(np.asarray(logp), batch["targets"][0][:, None], axis=-1)[:, 0]
  at = 0
  for g, prompt, answers in zip(groups, PROMPTS, ANSWERS):
    for i, answer in enumerate(answers):
      seq = np.asarray(prompt + answer)[None]
      alone = jax.nn.log_softmax(model(seq[:, :-1])[0], axis=-1)
      want = np.asarray(alone)[np.arange(len(prompt) - 1, seq.shape[1] - 1), seq[0, len(prompt):]]
      start = at + g.first[i + 2]
      np.testing.assert_allclose(got[start:start + len(answer)], want, rtol=2e-5, atol=2e-5)
      assert np.all(batch["weights"][0][start:start + len(answer)] == 1)
    at += len(g.inputs)
  assert np.all(batch["segment_ids"][0][at:] == 0)  # padding

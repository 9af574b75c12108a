"""launch/colab.ipynb runs top to bottom on CPU (its small settings), as a user would run it."""

import json
import os

import nbformat
import pytest
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # end-to-end: .ci/run runs the slow cases after the default suite
def test_colab_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
  monkeypatch.setenv("JAXTRAIN_NOTEBOOK_SMALL", "1")
  monkeypatch.setenv("JAXTRAIN_NOTEBOOK_WORKDIR", str(tmp_path))
  monkeypatch.delenv("XLA_FLAGS", raising=False)  # one CPU device, as on Colab
  nb = nbformat.read(os.path.join(REPO, "launch", "colab.ipynb"), as_version=4)
  # Run from launch/, where a user who opens it in a checkout is; it finds the repo root.
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": os.path.join(REPO, "launch")}}).execute()

  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(o.get("output_type") != "error" for c in code for o in c.outputs)
  text = "".join(o.get("text", "") for c in code for o in c.outputs)
  for name in ("tiny", "lora"):  # every run ran to its end and wrote its metrics
    assert os.path.isfile(tmp_path / name / "metrics.jsonl")
  assert "done: step 40" in text and "done: step 20" in text
  assert os.path.isfile(tmp_path / "tiny-hf" / "model.safetensors")
  assert text.count("tokens in") == 2  # both generations reported their speed

  # The plot cell drew a figure and printed the curves it drew, which match the files.
  plot = code[-1]
  assert any("image/png" in o.get("data", {}) for o in plot.outputs)
  with open(tmp_path / "tiny" / "metrics.jsonl") as f:
    losses = [r["loss"] for r in map(json.loads, f) if "loss" in r]
  assert f"tiny loss: {losses[0]:.3f}" in text and f"-> {losses[-1]:.3f}" in text
  assert losses[-1] < losses[0]


if __name__ == "__main__":
  pytest.main([__file__, "-q"])

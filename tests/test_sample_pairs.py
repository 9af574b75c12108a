"""trainer/sample_pairs.py: which replies become chosen and rejected, and its bad input."""

import subprocess
import sys

from trainer.sample_pairs import pairs_of

CHATS = [([{"role": "user", "content": f"q{i}"}], f"a{i}") for i in range(4)]


def test_pairs_take_the_best_and_a_lowest_reply():
  replies = [["a0", "x", "y"],  # one right: chosen it, rejected a wrong one
             ["x", "y", "z"],  # none right: chosen the expected answer
             ["a2", "a2", "a2"],  # all right: no pair
             ["u", "v", "w"]]
  scores = [[1, 0, 0], [0, 0, 0], [1, 1, 1], [0.5, 0.2, 0.2]]
  out = pairs_of(CHATS, replies, scores, [1.0, 1.0, 1.0, 0.0], seed=0)
  assert [r["prompt"][0]["content"] for r in out] == ["q0", "q1", "q3"]
  assert out[0]["chosen"] == "a0" and out[0]["rejected"] in ("x", "y")
  assert out[1]["chosen"] == "a1" and out[1]["rejected"] in ("x", "y", "z")
  # the expected answer scores below the best reply there: the best reply is chosen
  assert out[2]["chosen"] == "u" and out[2]["rejected"] in ("v", "w")


def test_bad_input_is_one_line(tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
  good = "data/arith_chat/eval.jsonl"
  for args, words in ((["--prompts", good, "--out", str(tmp_path)], "exactly one"),
                      (["--hf", str(tmp_path), "--prompts", str(bad), "--out", str(tmp_path)],
                       f"{bad}:1"),
                      (["--hf", str(tmp_path), "--prompts", str(bad), "--out", str(tmp_path),
                        "--samples=1"], "--samples=1")):
    proc = subprocess.run([sys.executable, "-m", "trainer.sample_pairs", *args],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and words in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1

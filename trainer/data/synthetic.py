"""Generated chat tasks with checkable answers, for the SFT demo and tests.

Three tasks of rising difficulty: repeating a short random lowercase word, reversing one, and
adding two numbers below 100. Each record is
{"messages": [system?, user, assistant]}; the answer is exact, so held-out accuracy is measured by
exact match of the generated reply.

python -m trainer.data.synthetic --out=data/arith_chat --train=4000 --eval=200 --seed=0
"""

from __future__ import annotations

import argparse
import json
import os
import random

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def example(rng: random.Random) -> dict:
  task = rng.randrange(3)
  word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6)))
  if task == 0:
    user, answer = f"Repeat the word {word}.", word
  elif task == 1:
    user, answer = f"Reverse the word {word}.", word[::-1]
  else:
    a, b = rng.randrange(100), rng.randrange(100)
    user, answer = f"What is {a} + {b}?", str(a + b)
  messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
  if rng.random() < 0.3:
    messages.insert(0, {"role": "system", "content": "Answer with the result only."})
  return {"messages": messages}


def write(path: str, n: int, rng: random.Random, exclude: set[str]) -> set[str]:
  seen = set()
  with open(path, "w") as f:
    while len(seen) < n:
      ex = example(rng)
      key = ex["messages"][-2]["content"]
      if key in exclude or key in seen:
        continue
      seen.add(key)
      f.write(json.dumps(ex) + "\n")
  return seen


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", default="data/arith_chat")
  ap.add_argument("--train", type=int, default=4000)
  ap.add_argument("--eval", type=int, default=200)
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args()
  os.makedirs(args.out, exist_ok=True)
  rng = random.Random(args.seed)
  held = write(os.path.join(args.out, "eval.jsonl"), args.eval, rng, set())
  write(os.path.join(args.out, "train.jsonl"), args.train, rng, held)  # no eval question in train


if __name__ == "__main__":
  main()

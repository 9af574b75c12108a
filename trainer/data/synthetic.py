"""Generated chat tasks with checkable answers, for the SFT, DPO and reward-model demos and tests.

Three tasks of rising difficulty: repeating a short random lowercase word, reversing one, and
adding two numbers below 100. A chat record is {"messages": [system?, user, assistant]}; the
answer is exact, so held-out accuracy is measured by exact match of the generated reply. A
preference record (`--preference`) is {"prompt", "chosen", "rejected"}: the right answer against
a plausible wrong one (another word of the same length, the word not reversed, a sum off by 1 to
10), so held-out preference accuracy says whether the model tells right from wrong.

python -m trainer.data.synthetic --out=data/arith_chat --train=4000 --eval=200 --seed=0
python -m trainer.data.synthetic --preference --out=data/arith_pref --train=4000 --eval=200
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


def preference_example(rng: random.Random) -> dict:
  """A question with the right answer (chosen) and a plausible wrong one (rejected)."""
  task = rng.randrange(3)
  n = rng.randint(3, 6)
  word = "".join(rng.choice(LETTERS) for _ in range(n))
  if task == 0:
    other = word
    while other == word:
      other = "".join(rng.choice(LETTERS) for _ in range(n))
    prompt, chosen, rejected = f"Repeat the word {word}.", word, other
  elif task == 1:
    while word == word[::-1]:
      word = "".join(rng.choice(LETTERS) for _ in range(n))
    prompt, chosen, rejected = f"Reverse the word {word}.", word[::-1], word
  else:
    a, b = rng.randrange(100), rng.randrange(100)
    wrong = a + b + rng.choice([-1, 1]) * rng.randint(1, 10)
    prompt, chosen, rejected = f"What is {a} + {b}?", str(a + b), str(abs(wrong))
    if abs(wrong) == a + b:
      rejected = str(a + b + 1)
  return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def write(path: str, n: int, rng: random.Random, exclude: set[str],
          make=example) -> set[str]:
  seen = set()
  with open(path, "w") as f:
    while len(seen) < n:
      ex = make(rng)
      key = ex["prompt"] if "prompt" in ex else ex["messages"][-2]["content"]
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
  ap.add_argument("--preference", action="store_true", help="prompt/chosen/rejected records")
  args = ap.parse_args()
  os.makedirs(args.out, exist_ok=True)
  rng = random.Random(args.seed)
  make = preference_example if args.preference else example
  held = write(os.path.join(args.out, "eval.jsonl"), args.eval, rng, set(), make)
  # no eval question in train
  write(os.path.join(args.out, "train.jsonl"), args.train, rng, held, make)


if __name__ == "__main__":
  main()

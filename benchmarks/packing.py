"""Padding waste of each packing mode on real length distributions, and the pipeline's speed.

Lengths: every function and class of the Python standard library as an example (source code,
tokenized with a SentencePiece model trained on it): a long-tailed distribution like that of
SFT examples. Also the generated chat set in data/arith_chat (short, uniform examples).

python benchmarks/packing.py [--out FILE]
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks.host import host_info  # noqa: E402
from trainer.data import packing, pipeline, sources, stdlib_corpus, templates  # noqa: E402
from trainer.data.tokenizer import Tokenizer  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def stdlib_definitions(max_chars: int) -> list[str]:
  docs = stdlib_corpus.load_documents(max_chars, 5)[0]
  out = []
  for doc in docs:
    try:
      tree = ast.parse(doc)
    except SyntaxError:
      continue
    for node in ast.walk(tree):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        out.append(ast.get_source_segment(doc, node) or "")
  return [s for s in out if s]


def waste_table(lengths: list[int], seq_len: int, group: int) -> dict[str, float]:
  pieces = packing.fit_examples(lengths, seq_len, "truncate", {})
  return {mode: packing.padding_ratio(packing.plan_rows(pieces, seq_len, mode, group), seq_len)
          for mode in packing.MODES}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default="")
  args = ap.parse_args()
  results = {"host": host_info()}  # the speed figures below depend on the CPU

  defs = stdlib_definitions(3_000_000)
  tok = Tokenizer.train(defs, 4096)
  code_lengths = [len(x) + 2 for x in tok.encode_batch(defs)]
  chat_records = sources.load_datasets(os.path.join(REPO, "data", "arith_chat", "train.jsonl"),
                                       "chat", {}, False, {})[0]
  chat_tok = Tokenizer.train(["".join(t for t, _ in templates.get("chatml").render(r["messages"]))
                              for r in chat_records], 400, specials=templates.get("chatml").specials)
  chat_lengths = [len(templates.encode_chat(templates.get("chatml"), chat_tok, r["messages"])[0])
                  for r in chat_records]
  print(f"stdlib definitions: {len(code_lengths)} examples, median {int(np.median(code_lengths))} "
        f"tokens, p90 {int(np.percentile(code_lengths, 90))}, max {max(code_lengths)}")
  print(f"arith chat: {len(chat_lengths)} examples, median {int(np.median(chat_lengths))} tokens")
  print("| lengths | seq_len | none | concat | greedy (group 512) |")
  print("| --- | --- | --- | --- | --- |")
  for name, lengths, seq_len in (("stdlib definitions", code_lengths, 1024),
                                 ("stdlib definitions", code_lengths, 2048),
                                 ("arith chat", chat_lengths, 64),
                                 ("arith chat", chat_lengths, 256)):
    w = waste_table(lengths, seq_len, 512)
    results[f"{name} @ {seq_len}"] = w
    print(f"| {name} | {seq_len} | {w['none']:.1%} | {w['concat']:.1%} | {w['greedy']:.1%} |")

  # Pipeline speed: tokenization (done once, up front) and rows assembled by grain per second.
  t = time.perf_counter()
  ids = [np.asarray(x, np.int32) for x in tok.encode_batch(defs)]
  tps = sum(map(len, ids)) / (time.perf_counter() - t)
  results["tokenize_tokens_per_sec"] = tps
  print(f"tokenization (SentencePiece, up front): {tps:,.0f} tokens/s")
  rows = pipeline.PackedRows([(ids, [np.ones(len(x), np.float32) for x in ids])], [1.0],
                             seq_len=1024, mode="greedy", truncation="truncate", seed=0,
                             shuffle=True, group=512, stats={})
  rows.epoch(0)
  import grain
  for threads in (1, 2):
    # timed from the iterator's creation, over far more batches than grain prefetches
    t, n = time.perf_counter(), 2000
    it = iter(pipeline.batches(rows, 16).to_iter_dataset(
        grain.ReadOptions(num_threads=threads, prefetch_buffer_size=64)))
    for _ in range(n):
      next(it)
    tps = n * 16 * 1024 / (time.perf_counter() - t)
    results[f"pipeline_tokens_per_sec_threads{threads}"] = tps
    print(f"pipeline, {threads} thread(s): {tps:,.0f} tokens/s (batches of 16 x 1024, greedy)")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()

"""Memory and start-up of training from prepared shards do not grow with the corpus (issue 23).

  python benchmarks/corpus_scale.py --work=/tmp/scale [--sizes=0.3,3] [--rounds=3] [--steps=50]

1. Generates a jsonl text corpus of each size (GB of text): documents of a log-normal number of
   words drawn by a Zipf law from the words of the Python standard library's source, seeded.
2. Trains one tokenizer (configs/medium.py's 8192 pieces) on the first 20 MB of the smallest, and
   prepares every corpus with it (`python -m trainer.data.prepare --workers=2`).
3. Trains configs/medium.py's shape from each prepared folder for `--steps` steps, in alternating
   rounds (small, large, small, ...), each a fresh process: its peak RSS (the child's ru_maxrss)
   and its time from start to the first step's end (the moment the trainer reports the first
   step), and the tokens per second its steps consume.
4. Reads batches from the large folder with the streaming loader alone, 1 and 2 reader threads,
   and reports its tokens per second against what a medium step consumes.

Writes a JSON report (`--out`, default benchmarks/results/corpus_scale.json) with the host.
"""

from __future__ import annotations

import argparse
import ast
import collections
import json
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks.host import host_info  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def vocabulary(n: int = 50_000) -> list[str]:
  """The most common words of the standard library's source, most common first."""
  from trainer.data import stdlib_corpus  # noqa: PLC0415 -- benchmark-only imports
  counts = collections.Counter()
  for doc in stdlib_corpus.load_documents(20_000_000, 0)[0]:
    counts.update(re.findall(r"[A-Za-z_]+", doc))
  return [w for w, _ in counts.most_common(n)]


def make_corpus(folder: str, gigabytes: float, words: list[str], seed: int = 0) -> None:
  """jsonl files of about 100 MB each until `gigabytes` of text; skipped when already there."""
  done = os.path.join(folder, "DONE")
  if os.path.exists(done):
    return
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(seed)
  p = 1.0 / np.arange(1, len(words) + 1)  # Zipf's law
  p /= p.sum()
  vocab = np.asarray(words, dtype=object)
  target, written, k = int(gigabytes * 1e9), 0, 0
  while written < target:
    with open(os.path.join(folder, f"part-{k:04d}.jsonl"), "w") as f:
      size = 0
      while size < 100_000_000 and written + size < target:
        lengths = np.clip(rng.lognormal(6.3, 0.8, 256).astype(int), 20, 20_000)
        ids = rng.choice(len(words), int(lengths.sum()), p=p)
        at = 0
        for n in lengths:
          line = json.dumps({"text": " ".join(vocab[ids[at:at + n]])}) + "\n"
          at += n
          f.write(line)
          size += len(line)
    written += size
    k += 1
  open(done, "w").close()


def run(cmd: list[str], log: str) -> dict:
  """Run a training command; its peak RSS and the seconds to its first step's report."""
  t0 = time.perf_counter()
  first = None
  with open(log, "w") as out:
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    for line in proc.stdout:
      out.write(line)
      if first is None and "first step (compile included)" in line:
        first = time.perf_counter() - t0
    proc.wait()
  if proc.returncode:
    raise SystemExit(f"{' '.join(cmd)} failed; see {log}")
  return {"first_step_s": first, "wall_s": time.perf_counter() - t0}


def peak_rss_of(cmd: list[str], log: str) -> dict:
  """`run` in a child of a fresh Python, so that RUSAGE_CHILDREN is that child's alone."""
  code = ("import json, resource, sys; sys.path.insert(0, %r); "
          "from benchmarks.corpus_scale import run; r = run(%r, %r); "
          "r['peak_rss_mb'] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024; "
          "print(json.dumps(r))") % (REPO, cmd, log)
  return json.loads(subprocess.check_output([sys.executable, "-c", code], cwd=REPO).splitlines()[-1])


def tokens_per_sec(metrics: str) -> float:
  rows = [json.loads(x) for x in open(metrics)]
  return float(np.median([r["tokens_per_sec"] for r in rows if r.get("tokens_per_sec")]))


def loader_rate(folder: str, threads: int, batches: int = 400) -> float:
  """Tokens per second the streaming loader delivers (configs/medium.py's batch), alone."""
  from configs import medium  # noqa: PLC0415
  import grain  # noqa: PLC0415
  from trainer.data import pipeline  # noqa: PLC0415
  cfg = medium.get_config()
  cfg.data.update(source="prepared", train_files=folder)
  workdir = os.path.join(folder, "_loader")
  os.makedirs(workdir, exist_ok=True)
  data = pipeline.build(cfg, workdir, True)
  ds = pipeline.batches(data.train, cfg.train.batch_size)
  it = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=threads)))
  next(it)
  t0 = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batches * cfg.train.batch_size * cfg.train.seq_len / (time.perf_counter() - t0)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--work", required=True)
  ap.add_argument("--sizes", default="0.3,3")
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--steps", type=int, default=50)
  ap.add_argument("--prepare_only", action="store_true", help="stop after step 2")
  ap.add_argument("--runs_log", default="", help="step 3's runs from the output of an earlier "
                  "invocation (its 'round R size S: {...}' lines) instead of running them")
  ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "corpus_scale.json"))
  args = ap.parse_args()
  sizes = [float(x) for x in args.sizes.split(",")]
  os.makedirs(args.work, exist_ok=True)
  report = {"host": host_info(), "command": " ".join(sys.argv), "corpora": {}}

  words = None
  tokenizer = os.path.join(args.work, "tokenizer.model")
  for size in sizes:
    corpus = os.path.join(args.work, f"corpus-{size:g}gb")
    if not os.path.exists(os.path.join(corpus, "DONE")):
      words = words or vocabulary()
      t = time.perf_counter()
      make_corpus(corpus, size, words)
      print(f"generated {corpus} in {time.perf_counter() - t:.0f}s", flush=True)
    if not os.path.exists(tokenizer):
      from trainer.data.tokenizer import Tokenizer  # noqa: PLC0415
      texts, n = [], 0
      with open(os.path.join(corpus, "part-0000.jsonl")) as f:
        for line in f:
          texts.append(json.loads(line)["text"])
          n += len(texts[-1])
          if n > 20_000_000:
            break
      Tokenizer.train(texts, 8192).save(tokenizer)
    prepared = corpus + "-prepared"
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "trainer.data.prepare", "--config=configs/medium.py",
                    f"--out={prepared}", "--workers=2", "--config.data.source=files",
                    f"--config.data.train_files={corpus}", f"--config.data.tokenizer={tokenizer}"],
                   cwd=REPO, check=True)
    manifest = json.load(open(os.path.join(prepared, "manifest.json")))
    text_bytes = sum(os.path.getsize(os.path.join(corpus, f)) for f in os.listdir(corpus))
    report["corpora"][f"{size:g}"] = {
        "text_bytes": text_bytes, "examples": manifest["examples"], "tokens": manifest["tokens"],
        "shard_bytes": sum(s["bytes"] for ds in manifest["splits"]["train"] for s in ds["shards"]),
        "prepare_s (0 when already prepared)": round(time.perf_counter() - t, 1), "runs": []}

  if args.prepare_only:
    return
  if args.runs_log:
    for line in open(args.runs_log):
      m = re.match(r"round (\d+) size ([\d.]+): (\{.*\})$", line.strip())
      if m:
        report["corpora"][m.group(2)]["runs"].append(ast.literal_eval(m.group(3)))
  for r in range(0 if args.runs_log else args.rounds):
    for size in sizes:
      prepared = os.path.join(args.work, f"corpus-{size:g}gb-prepared")
      workdir = os.path.join(args.work, f"run-{size:g}-{r}")
      subprocess.run(["rm", "-rf", workdir], check=True)
      cmd = [sys.executable, "-m", "trainer.main", "--config=configs/medium.py",
             f"--workdir={workdir}", "--config.data.source=prepared",
             f"--config.data.train_files={prepared}", f"--config.train.steps={args.steps}",
             "--config.train.eval_every=0", "--config.train.checkpoint_every=0",
             "--config.train.eval_batches=1", "--config.train.sample_tokens=0"]
      result = peak_rss_of(cmd, workdir + ".log")
      result["tokens_per_sec"] = tokens_per_sec(os.path.join(workdir, "metrics.jsonl"))
      print(f"round {r} size {size:g}: {result}", flush=True)
      report["corpora"][f"{size:g}"]["runs"].append(result)

  large = os.path.join(args.work, f"corpus-{max(sizes):g}gb-prepared")
  report["loader_tokens_per_sec"] = {t: loader_rate(large, t) for t in (1, 2)}
  for size, c in report["corpora"].items():
    for key in ("peak_rss_mb", "first_step_s", "tokens_per_sec"):
      c[f"median_{key}"] = float(np.median([x[key] for x in c["runs"]]))
  step_rate = max(c["median_tokens_per_sec"] for c in report["corpora"].values())
  report["loader_over_step"] = {t: v / step_rate for t, v in report["loader_tokens_per_sec"].items()}
  small, big = (report["corpora"][f"{s:g}"] for s in (min(sizes), max(sizes)))
  report["ratio_large_over_small"] = {k: big[f"median_{k}"] / small[f"median_{k}"]
                                      for k in ("peak_rss_mb", "first_step_s")}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(report, f, indent=1)
  print(json.dumps({k: report[k] for k in ("loader_tokens_per_sec", "loader_over_step",
                                           "ratio_large_over_small")}, indent=1))


if __name__ == "__main__":
  main()

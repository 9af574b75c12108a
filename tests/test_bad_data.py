"""Bad data as a newcomer brings it: each fault is one line naming file:line (a record) or the
file, record-level faults are skipped and counted with data.skip_bad_records, a split with
nothing to learn is an error, and long examples or a 10 MB line are handled as data."""

import json
import os

import numpy as np
import pytest

import small_run
from trainer.data import pipeline, stdlib_corpus, templates
from trainer.data import tokenizer as tokenizer_lib
from trainer.errors import UserError
from trainer.validate import check_config

from test_cli import run_main

GOOD = {"messages": [{"role": "user", "content": "Say yes"}, {"role": "assistant", "content": "yes"}]}
PAIR = {"prompt": "1+1?", "chosen": "2", "rejected": "3"}


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
  """A SentencePiece model with the chatml specials, so that tiny files need no training."""
  path = str(tmp_path_factory.mktemp("tok") / "tok.model")
  texts = stdlib_corpus.load_documents(100_000, 5)[0]
  tokenizer_lib.Tokenizer.train(texts, 400, specials=templates.get("chatml").specials).save(path)
  return path


def jsonl(*records) -> bytes:
  return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in records)


def config(fmt, train_files, tokenizer="", eval_files="", **data):
  c = small_run.config(seq_len=32, objective={"chat": "sft", "preference": "dpo"}.get(fmt, "lm"))
  c.data.update(source="files", format=fmt, template="chatml", train_files=train_files,
                eval_files=eval_files, tokenizer=tokenizer, **{"truncation": "split", **data})
  check_config(c)  # what trainer.main checks first
  return c


def build(c, tmp_path):
  os.makedirs(tmp_path / "work", exist_ok=True)
  return pipeline.build(c, str(tmp_path / "work"), True)


def write(tmp_path, name, content: bytes) -> str:
  path = tmp_path / name
  path.write_bytes(content)
  return str(path)


# (case, data.format, file name, bad record or file, what the message says). A record-level
# fault sits on line 3 of a file of good records; a file-level one is the whole file.
RECORD_FAULTS = [
    ("bad JSON", "chat", "c.jsonl", b'{"messages": [', "malformed JSON"),
    ("not an object", "chat", "c.jsonl", b"[1, 2]", "a list, not a JSON object"),
    ("missing field", "chat", "c.jsonl", {"conversation": []}, "no field 'messages'"),
    ("messages not a list", "chat", "c.jsonl", {"messages": "hi"}, "not a list"),
    ("unknown role", "chat", "c.jsonl", {"messages": [{"role": "tool", "content": "x"}]},
     "role 'tool', not one of system, user, assistant"),
    ("content not a string", "chat", "c.jsonl",
     {"messages": [{"role": "user", "content": ["x"]}]}, "content is a list, not a string"),
    ("turn without content", "chat", "c.jsonl", {"messages": [{"role": "user"}]},
     "not a {role, content} object"),
    ("undecodable line", "chat", "c.jsonl",
     '{"messages": [{"role": "user", "content": "caf\xe9"}]}'.encode("latin-1"),
     "not UTF-8 text (byte 0xe9"),
    ("deeply nested JSON", "chat", "c.jsonl", b"[" * 100_000 + b"]" * 100_000, "malformed JSON"),
    ("text not a string", "text", "t.jsonl", {"text": 7}, "'text' is a number, not a string"),
    ("preference answer of a wrong type", "preference", "p.jsonl", {**PAIR, "chosen": 2},
     "chosen is a number, not a string or a list"),
    ("preference turn with a bad role", "preference", "p.jsonl",
     {**PAIR, "rejected": [{"role": "bot", "content": "3"}]}, "role 'bot'"),
    ("undecodable text line", "text", "t.txt", "un caf\xe9".encode("latin-1"), "not UTF-8 text"),
]


@pytest.mark.parametrize("case,fmt,name,bad,says", RECORD_FAULTS, ids=[c[0] for c in RECORD_FAULTS])
def test_a_bad_record_names_file_and_line_or_is_skipped_and_counted(case, fmt, name, bad, says,
                                                                      tmp_path, tokenizer_file):
  good = {"chat": GOOD, "text": {"text": "print('hello')"}, "preference": PAIR}[fmt]
  if name.endswith(".txt"):  # paragraphs: the bad one is on line 3
    content = b"first paragraph\n\n" + bad + b"\n\n" + b"\n\n".join([b"more text"] * 30)
  else:
    content = jsonl(good, b"", bad, *[good] * 30)  # line 2 blank
  path = write(tmp_path, name, content)
  evals = write(tmp_path, "eval_" + name, content)
  with pytest.raises(UserError) as e:
    build(config(fmt, path, tokenizer_file, evals), tmp_path)
  message = str(e.value)
  assert message.startswith(f"{path}:3: ") and says in message, message
  assert message.endswith("fix it or set data.skip_bad_records=True") and "\n" not in message
  assert len(message) < 400  # the bad value is quoted short, never whole
  data = build(config(fmt, path, tokenizer_file, evals, skip_bad_records=True), tmp_path)
  assert data.stats["bad_records"] == 2  # the one in train, the one in eval
  assert data.stats["train_examples"] == 31 and data.stats["eval_examples"] == 31
  assert data.warnings[0].startswith("skipped 2 bad records (data.skip_bad_records), the first: "
                                     f"{path}:3: ")


def test_only_bad_records_is_no_records_with_the_count(tmp_path, tokenizer_file):
  path = write(tmp_path, "c.jsonl", jsonl({"conversation": []}, {"conversation": []}))
  with pytest.raises(UserError, match=rf"no records in {path} \(2 bad records skipped, the "
                                      rf"first: {path}:1: record has no field 'messages'"):
    build(config("chat", path, tokenizer_file, skip_bad_records=True), tmp_path)


FILE_FAULTS = [
    ("binary file as chat", "chat", "c.jsonl", os.urandom(4096) + b"\0", "holds NUL bytes"),
    ("binary file as text", "text", "t.txt", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + os.urandom(999),
     "holds NUL bytes"),
    ("UTF-16 file", "chat", "c.jsonl", json.dumps(GOOD).encode("utf-16"), "(UTF-16?)"),
    ("corrupt parquet", "text", "t.parquet", b"PAR1 not really", "cannot read it as parquet"),
    ("a JSON list as chat", "chat", "c.json", json.dumps([GOOD]).encode(), "give .jsonl"),
]


@pytest.mark.parametrize("case,fmt,name,content,says", FILE_FAULTS, ids=[c[0] for c in FILE_FAULTS])
def test_a_bad_file_is_named(case, fmt, name, content, says, tmp_path, tokenizer_file):
  path = write(tmp_path, name, content)
  for skip in (False, True):  # a whole file is not a record to skip
    with pytest.raises(UserError) as e:
      build(config(fmt, path, tokenizer_file, path, skip_bad_records=skip), tmp_path)
    assert str(e.value).startswith(f"{path}: ") and says in str(e.value), str(e.value)


def test_an_empty_or_foreign_tokenizer_file_is_named(tmp_path):
  data = write(tmp_path, "c.jsonl", jsonl(*[GOOD] * 4))
  for content, says in ((b"", "the file is empty"), (b"\x0a\x00", "not a SentencePiece model")):
    model = write(tmp_path, "tok.model", content)
    with pytest.raises(UserError, match=rf"config key data.tokenizer: cannot read a tokenizer "
                                        rf"from {model} \({says}"):
      build(config("chat", data, model, data), tmp_path)


@pytest.mark.parametrize("texts,says", [
    (["hello world"] * 20, "the text is too small or too uniform for 400 pieces: it allows at most"),
    (["a" * 500] * 20, "the text is too small or too uniform for 400 pieces: it allows at most"),
    (["   ", "\t"], "the text has no non-blank line"),
], ids=["small", "one character", "blank"])
def test_text_too_small_or_degenerate_for_the_tokenizer(texts, says, tmp_path):
  path = write(tmp_path, "t.jsonl", jsonl(*[{"text": t} for t in texts]))
  c = config("text", path, eval_files=path, tokenizer_vocab_size=400)
  with pytest.raises(UserError) as e:
    build(c, tmp_path)
  message = str(e.value)
  assert message.startswith("config key data.tokenizer_vocab_size: cannot train a tokenizer of "
                            f"400 pieces on the train split ({path}): {says}"), message
  if "at most" in says:  # and the size it names is one that trains
    c.data.tokenizer_vocab_size = int(message.split("at most ")[1].split(";")[0])
    assert build(c, tmp_path / "again").tokenizer.vocab_size == c.data.tokenizer_vocab_size


def test_bad_data_end_to_end_is_one_line_and_exit_2(tmp_path):
  path = write(tmp_path, "bad.jsonl", jsonl(GOOD, {"messages": [{"role": "robot", "content": 1}]}))
  code, _, err = run_main("--config=configs/sft_chat.py", f"--config.data.train_files={path}",
                          "--config.train.steps=2", workdir=str(tmp_path / "w"))
  assert code == 2 and err.strip().splitlines() == [
      f"error: {path}:2: messages[0] has role 'robot', not one of system, user, assistant; fix "
      "it or set data.skip_bad_records=True"], err


# --- nothing to learn ------------------------------------------------------------------------


def chat(prompt_words: int, reply: str = "yes"):
  return {"messages": [{"role": "user", "content": " ".join(["word"] * prompt_words)},
                       {"role": "assistant", "content": reply}]}


def test_no_assistant_turn_is_an_error_naming_the_split(tmp_path, tokenizer_file):
  no_reply = write(tmp_path, "q.jsonl", jsonl(*[{"messages": [GOOD["messages"][0]]}] * 20))
  good = write(tmp_path, "g.jsonl", jsonl(*[GOOD] * 20))
  with pytest.raises(UserError, match=rf"^train split \({no_reply}\): nothing to learn: no record "
                                      "has an assistant turn"):
    build(config("chat", no_reply, tokenizer_file, good), tmp_path)
  with pytest.raises(UserError, match=rf"^eval split \({no_reply}\): nothing to learn"):
    build(config("chat", good, tokenizer_file, no_reply), tmp_path)
  mixed = write(tmp_path, "m.jsonl", jsonl(*[{"messages": [GOOD["messages"][0]]}] * 20, GOOD))
  build(config("chat", mixed, tokenizer_file, good), tmp_path)  # one reply is enough


def independent_fit(tokenizer_file, records, share=0.95):
  """The seq_len holding `share` of examples whole: numpy's inverted-CDF percentile of their
  positions (tokens - 1), tokenized here with the template directly."""
  tok = tokenizer_lib.Tokenizer.load(tokenizer_file)
  positions = [len(templates.encode_chat(templates.get("chatml"), tok, r["messages"])[0]) - 1
               for r in records]
  return int(np.percentile(positions, 100 * share, method="inverted_cdf"))


@pytest.mark.parametrize("truncation", ["truncate", "drop"])
def test_replies_all_beyond_seq_len_is_an_error_with_the_length_that_fits(
    truncation, tmp_path, tokenizer_file):
  records = [chat(20 + 3 * i) for i in range(20)]  # every prompt longer than 32 tokens
  path = write(tmp_path, "long.jsonl", jsonl(*records))
  with pytest.raises(UserError) as e:
    build(config("chat", path, tokenizer_file, path, truncation=truncation), tmp_path)
  message = str(e.value)
  assert message.startswith(f"train split ({path}): nothing to learn: "), message
  assert "train.seq_len=32" in message and f"data.truncation={truncation}" in message
  assert f"raise train.seq_len ({independent_fit(tokenizer_file, records)} would fit 95%" in message


@pytest.mark.parametrize("n_long,warned", [(2, False), (3, True)])
def test_more_than_a_tenth_cut_warns_with_the_share_and_the_seq_len_for_95(
    n_long, warned, tmp_path, tokenizer_file):
  records = [chat(i % 4) for i in range(20 - n_long)] + [chat(10 + i) for i in range(n_long)]
  path = write(tmp_path, "c.jsonl", jsonl(*records))
  data = build(config("chat", path, tokenizer_file, write(tmp_path, "g.jsonl", jsonl(GOOD))),
               tmp_path)
  assert data.stats["split"] == n_long  # 2 of 20 is 10%: not more than a tenth
  expected = (f"train split ({path}): {n_long / 20:.0%} of its 20 examples are longer than "
              f"train.seq_len=32 ({n_long} split); train.seq_len="
              f"{independent_fit(tokenizer_file, records)} would fit 95% of them")
  assert data.warnings == ([expected] if warned else [])


# --- a 10 MB line -----------------------------------------------------------------------------


def test_a_10_mb_line_trains_a_tokenizer_and_yields_rows(tmp_path):
  """SentencePiece skips training lines over 4192 bytes; the line is cut for its training only
  and kept whole as data (split into rows)."""
  rng = np.random.default_rng(0)
  words = np.array(["zyxwvut", "lorem", "ipsum", "dolor", "amet", "é"])
  big = " ".join(words[rng.integers(0, len(words), 1_800_000)])
  assert len(big.encode()) > 10_000_000
  chunks = list(tokenizer_lib.training_lines([big]))
  assert max(len(c.encode()) for c in chunks) <= tokenizer_lib.MAX_SENTENCE_BYTES
  assert "".join(chunks) == big  # cut before spaces, nothing lost
  docs = stdlib_corpus.load_documents(30_000, 5)[0]
  text = "\n\n".join(d.replace("\n\n", "\n") for d in docs) + "\n\n" + big + "\n\nthe end\n"
  path = write(tmp_path, "big.txt", text.encode())
  c = config("text", path, eval_percent=40.0, tokenizer_vocab_size=400)
  data = build(c, tmp_path)
  assert len(data.tokenizer.encode(" zyxwvut")) == 1  # a word of the long line only
  rows = data.train if data.train.lengths.max() > 1_000_000 else data.eval
  assert all(end - start <= 33 for _, start, end in rows.pieces[0])  # seq_len + 1 tokens each
  assert sum(end - start - 1 for _, start, end in rows.pieces[0]) == rows.lengths.sum() - len(
      rows.lengths)  # split: every target kept
  row = data.train(0)
  assert row["inputs"].shape == (32,) and row["weights"].sum() > 0

"""The data pipeline: sources, tokenizers, chat templates, packing, mixtures, resume, errors."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from models import ModelConfig
from models import handle as handles
from trainer import losses
from trainer.data import packing, pipeline, sources, stdlib_corpus, templates
from trainer.data import tokenizer as tokenizer_lib
from trainer.data.sources import DataError

import small_run

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}]


def write_jsonl(path, records):
  with open(path, "w") as f:
    for r in records:
      f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
  return str(path)


# --- sources --------------------------------------------------------------------------------


def test_every_source_kind_and_path_form(tmp_path):
  write_jsonl(tmp_path / "a.jsonl", [{"body": "one"}, {"body": "two"}])
  (tmp_path / "docs").mkdir()
  (tmp_path / "docs" / "x.txt").write_text("three")
  (tmp_path / "docs" / "y.md").write_text("four")
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.table({"body": ["five", "six"]}), tmp_path / "b.parquet")
  from array_record.python.array_record_module import ArrayRecordWriter
  w = ArrayRecordWriter(str(tmp_path / "c.arrayrecord"), "group_size:1")
  w.write(json.dumps({"body": "seven"}).encode())
  w.close()
  spec = f"{tmp_path}/a.jsonl, {tmp_path}/docs, {tmp_path}/*.parquet, {tmp_path}/c.arrayrecord"
  ds = sources.load_datasets(spec, "text", {"text": "body"}, False, {})
  texts = [[r["text"] for r in d] for d in ds]
  assert texts == [["one", "two"], ["three", "four"], ["five", "six"], ["seven"]]



def save_hf(rows, path, **kw):
  """A Hugging Face `datasets` folder, written by the library itself (the trainer reads it
  without it)."""
  hf = pytest.importorskip("datasets")
  hf.disable_progress_bars()
  hf.Dataset.from_dict(rows).save_to_disk(str(path), **kw)
  return hf


def test_hugging_face_dataset_folders_read_in_their_own_order(tmp_path):
  bodies = [f"doc {i} " + "w" * (i % 5) for i in range(11)]
  hf = save_hf({"body": bodies, "n": list(range(11))}, tmp_path / "hub" / "text", num_shards=2)
  folder = tmp_path / "hub" / "text"
  # Rename the shards so that their names sort the other way round: the rows' order is the
  # order state.json lists them in, as load_from_disk reads them.
  state = json.loads((folder / "state.json").read_text())
  assert [d["filename"] for d in state["_data_files"]] == ["data-00000-of-00002.arrow",
                                                           "data-00001-of-00002.arrow"]
  for d, new in zip(state["_data_files"], ["z.arrow", "a.arrow"]):
    (folder / d["filename"]).rename(folder / new)
    d["filename"] = new
  (folder / "state.json").write_text(json.dumps(state))
  (folder / "notes.md").write_text("not a record")  # only the dataset's shards are read
  assert hf.load_from_disk(str(folder))["body"] == bodies
  read = lambda spec: [[r["text"] for r in d]
                       for d in sources.load_datasets(spec, "text", {"text": "body"}, False, {})]
  assert read(str(folder)) == [bodies]
  # A folder walk that meets the dataset takes it whole, in its place among the other files.
  write_jsonl(tmp_path / "hub" / "a.jsonl", [{"body": "first"}])
  write_jsonl(tmp_path / "hub" / "z.jsonl", [{"body": "last"}])
  assert read(str(tmp_path / "hub")) == [["first"] + bodies + ["last"]]
  assert read(str(folder / "a.arrow")) == [bodies[6:]]  # a shard alone is a file like any
  # Chat records: a list of {role, content} structs comes back as the list of dicts.
  chats = [CHAT, CHAT[:3], [{"role": "user", "content": "?"}, {"role": "assistant", "content": "!"}]]
  save_hf({"messages": chats}, tmp_path / "chat", num_shards=2)
  ds = sources.load_datasets(str(tmp_path / "chat"), "chat", {}, False, {})
  assert [r["messages"] for r in ds[0]] == chats


def test_a_dataset_dict_is_refused_until_a_split_is_named(tmp_path):
  hf = pytest.importorskip("datasets")
  hf.disable_progress_bars()
  rows = hf.Dataset.from_dict({"text": ["a", "b", "c"]})
  hf.DatasetDict(train=rows, test=rows.select([2])).save_to_disk(str(tmp_path / "dd"))
  folder = str(tmp_path / "dd")
  for spec in (folder, str(tmp_path)):  # named, or met in a folder walk
    with pytest.raises(DataError) as e:
      sources.load_datasets(spec, "text", {}, False, {})
    assert str(e.value) == (f"{folder}: is a Hugging Face DatasetDict with splits train, test; "
                            f"name one split as the dataset, e.g. {folder}/train")
  ds = sources.load_datasets(f"{folder}/train, {folder}/test", "text", {}, False, {})
  assert [[r["text"] for r in d] for d in ds] == [["a", "b", "c"], ["c"]]


def test_a_file_that_is_not_arrow_is_one_error_naming_it(tmp_path):
  save_hf({"text": [f"row {i}" for i in range(40)]}, tmp_path / "ds")
  (shard,) = (tmp_path / "ds").glob("*.arrow")
  whole = shard.read_bytes()
  (tmp_path / "junk.arrow").write_text("hello, not arrow\n")
  (tmp_path / "short.arrow").write_bytes(whole[:len(whole) // 2])  # cut off in its batch
  for name in ("junk.arrow", "short.arrow"):
    path = str(tmp_path / name)
    with pytest.raises(DataError) as e:
      sources.load_datasets(path, "text", {}, False, {})
    message = str(e.value)
    assert message.startswith(f"{path}: cannot read it as Arrow IPC (") and "\n" not in message
  shard.write_bytes(whole[:len(whole) // 2])  # a dataset's shard is named the same way
  with pytest.raises(DataError, match=f"^{shard}: cannot read it as Arrow IPC"):
    sources.load_datasets(str(tmp_path / "ds"), "text", {}, False, {})
  (tmp_path / "ds" / "state.json").write_text('{"_data_files": [{"filename": "gone.arrow"}]}')
  with pytest.raises(DataError, match="state.json: lists .*gone.arrow, which is not there"):
    sources.load_datasets(str(tmp_path / "ds"), "text", {}, False, {})

def test_malformed_line_names_file_and_line_or_is_skipped_and_counted(tmp_path):
  path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a"}, "{not json", {"text": "b"}])
  with pytest.raises(DataError, match=r"bad.jsonl:2: malformed JSON"):
    sources.load_datasets(path, "text", {}, False, {})
  stats = {}
  ds = sources.load_datasets(path, "text", {}, True, stats)
  assert [r["text"] for r in ds[0]] == ["a", "b"] and stats["bad_records"] == 1


def test_missing_field_and_empty_data_are_errors(tmp_path):
  path = write_jsonl(tmp_path / "a.jsonl", [{"content": "x"}])
  with pytest.raises(DataError, match="no field 'text'.*data.text_field"):
    sources.load_datasets(path, "text", {}, False, {})
  with pytest.raises(DataError, match="no records"):
    sources.load_datasets(write_jsonl(tmp_path / "e.jsonl", []), "text", {}, False, {})
  with pytest.raises(DataError, match="no data files match"):
    sources.load_datasets(str(tmp_path / "nothing*.jsonl"), "text", {}, False, {})


def test_text_files_are_cut_into_documents_per_text_split(tmp_path):
  path = tmp_path / "book.txt"
  path.write_bytes(b"Chapter 1\r\nIt begins.\r\n\r\n\r\nSecond paragraph.\n \t \nThird\n  indented\n\n")
  read = lambda split: [r["text"] for r in sources.load_datasets(str(path), "text", {}, False, {},
                                                                  split)[0]]
  assert read("blank_line") == ["Chapter 1\nIt begins.", "Second paragraph.", "Third\n  indented"]
  assert read("line") == ["Chapter 1", "It begins.", "Second paragraph.", "Third", "  indented"]
  assert read("file") == ["Chapter 1\nIt begins.\n\n\nSecond paragraph.\n \t \nThird\n  indented\n\n"]
  code = tmp_path / "mod.py"  # source code: one document per file, blank lines and all
  code.write_text("import os\n\n\ndef f():\n  return 1\n")
  assert [r["text"] for r in sources.load_datasets(str(code), "text", {}, False, {},
                                                   "blank_line")[0]] == [code.read_text()]


def test_eval_percent_splits_a_single_text_file(tmp_path, spm):
  paragraphs = [f"Paragraph {i}: " + " ".join(["words"] * (i % 7 + 1)) for i in range(60)]
  (tmp_path / "one.txt").write_text("\n\n".join(paragraphs) + "\n")
  spm.save(str(tmp_path / "tok.model"))
  cfg = small_run.config(seq_len=32)
  cfg.data.update(source="files", train_files=str(tmp_path / "one.txt"), eval_percent=25.0,
                  tokenizer=str(tmp_path / "tok.model"))
  (tmp_path / "work").mkdir()
  data = pipeline.build(cfg, str(tmp_path / "work"), True)
  held = [r["text"] for r in data.eval_records]
  assert data.stats["train_examples"] + data.stats["eval_examples"] == 60
  assert 5 <= len(held) <= 25 and set(held) < set(paragraphs)


def test_preference_fields_are_mapped(tmp_path):
  path = write_jsonl(tmp_path / "p.jsonl", [{"q": "1+1", "good": "2", "bad": "3"}])
  ds = sources.load_datasets(path, "preference", {"prompt": "q", "chosen": "good",
                                                  "rejected": "bad"}, False, {})
  assert ds == [[{"prompt": "1+1", "chosen": "2", "rejected": "3"}]]


# --- tokenizers and templates ---------------------------------------------------------------


@pytest.fixture(scope="module")
def spm():
  texts = stdlib_corpus.load_documents(200_000, 5)[0]
  specials = tuple(s for t in templates.TEMPLATES.values() for s in t.specials)
  return tokenizer_lib.Tokenizer.train(texts, 600, specials=specials)


EXPECTED = {
    "llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant"
              "<|end_header_id|>\n\nHello!<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
              "2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>",
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
              "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
              "<|im_start|>assistant\n4<|im_end|>\n",
    "gemma": "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
             "Hello!<end_of_turn>\n<start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n"
             "4<end_of_turn>\n",
}
LEARNED = {"llama3": "Hello!<|eot_id|>4<|eot_id|>", "chatml": "Hello!<|im_end|>\n4<|im_end|>\n",
           "gemma": "Hello!<end_of_turn>\n4<end_of_turn>\n"}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_template_renders_the_family_format_and_masks_all_but_replies(name, spm):
  t = templates.get(name)
  assert "".join(text for text, _ in t.render(CHAT)) == EXPECTED[name]
  ids, mask = templates.encode_chat(t, spm, CHAT)
  assert spm.decode(ids.tolist()) == EXPECTED[name]
  assert spm.decode(ids[mask == 1].tolist()) == LEARNED[name]
  assert ids[mask == 1][-1 if name == "llama3" else -2] == t.stop_id(spm)


def test_plain_template_ends_replies_with_eos(spm):
  t = templates.get("plain")
  ids, mask = templates.encode_chat(t, spm, CHAT)
  assert ids[0] == spm.bos_id
  learned = ids[mask == 1].tolist()
  assert learned.count(spm.eos_id) == 2 and learned[-1] == spm.eos_id
  prompt, _ = templates.encode_chat(t, spm, CHAT[:-1], add_generation_prompt=True)
  assert spm.decode(prompt.tolist()).endswith("User: 2+2?\n\nAssistant: ")


def test_unknown_template_is_an_error():
  with pytest.raises(ValueError, match="data.template='vicuna'"):
    templates.get("vicuna")


def test_hf_tokenizer_json(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.train_from_iterator(["hello world", "hello there"] * 50, trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  from tokenizers import decoders
  tok.decoder = decoders.ByteLevel()
  tok.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
  loaded = tokenizer_lib.load(str(tmp_path))
  assert (loaded.bos_id, loaded.eos_id) == (1, 2)
  assert loaded.decode(loaded.encode("hello world")) == "hello world"
  assert loaded.vocab_size == tok.get_vocab_size()


def test_sentencepiece_keeps_code_exact(spm):
  code = "def f(x):\n    return x ** 2  # 12345 é\n"
  assert spm.decode(spm.encode(code)) == code
  assert [spm.sp.id_to_piece(i) for i in spm.encode("123")] == ["1", "2", "3"]


# --- packing --------------------------------------------------------------------------------


def pairs_of(rows, ids, seq_len):
  """Every (input, target) pair the rows train on, with the example it came from."""
  seen = []
  for row in rows:
    b = packing.assemble(row, ids, [np.ones(len(x), np.float32) for x in ids], seq_len)
    for seg in set(b["segment_ids"].tolist()) - {0}:
      at = b["segment_ids"] == seg
      assert b["positions"][at].tolist() == list(range(at.sum()))  # restart per example
      seen += list(zip(b["inputs"][at].tolist(), b["targets"][at].tolist()))
  return sorted(seen)


@pytest.mark.parametrize("mode", packing.MODES)
def test_packing_covers_every_token_pair_once(mode):
  rng = np.random.default_rng(0)
  ids = [rng.integers(0, 1000, rng.integers(2, 30)).astype(np.int32) for _ in range(200)]
  seq_len = 64
  pieces = packing.fit_examples([len(x) for x in ids], seq_len, "split", {})
  rows = packing.plan_rows(pieces, seq_len, mode, group=200)
  expected = sorted(p for x in ids for p in zip(x[:-1].tolist(), x[1:].tolist()))
  assert pairs_of(rows, ids, seq_len) == expected
  waste = packing.padding_ratio(rows, seq_len)
  if mode == "concat":
    assert all(sum(e - s - 1 for _, s, e in r) == seq_len for r in list(rows)[:-1])
  # only the last row is ever part-empty when packing
  assert {"none": waste > 0.7, "concat": waste < 1 / len(rows), "greedy": waste < 1 / len(rows)}[mode]


def test_truncation_policies_are_counted():
  lengths = [5, 40, 100]
  for policy, counts in (("truncate", {"truncated": 2}), ("drop", {"dropped": 2}),
                         ("split", {"split": 2})):
    stats = {}
    pieces = packing.fit_examples(lengths, 16, policy, stats)
    assert {k: v for k, v in stats.items() if k != "tokens_cut"} == counts
    assert all(e - s <= 17 for _, s, e in pieces)


def reference_fit_examples(lengths, seq_len, policy, stats):
  """The list implementation packing.fit_examples replaced, kept as the reference."""
  out, cap = [], seq_len + 1
  for i, n in enumerate(lengths):
    if n < 2:
      stats["too_short"] = stats.get("too_short", 0) + 1
      continue
    if n <= cap:
      out.append((i, 0, n))
    elif policy == "drop":
      stats["dropped"] = stats.get("dropped", 0) + 1
    elif policy == "truncate":
      stats["truncated"] = stats.get("truncated", 0) + 1
      stats["tokens_cut"] = stats.get("tokens_cut", 0) + n - cap
      out.append((i, 0, cap))
    else:
      stats["split"] = stats.get("split", 0) + 1
      out += [(i, s, min(s + cap, n)) for s in range(0, n - 1, seq_len)]
  return out


def reference_plan_rows(pieces, seq_len, mode, group):
  """The list implementation packing.plan_rows replaced, kept as the reference."""
  import bisect
  if mode == "none":
    return [[p] for p in pieces]
  if mode == "concat":
    rows, row, room = [], [], seq_len
    for ex, start, end in pieces:
      while end - start > 1:
        take = min(room, end - start - 1)
        row.append((ex, start, start + take + 1))
        start, room = start + take, room - take
        if room == 0:
          rows.append(row)
          row, room = [], seq_len
    return rows + ([row] if row else [])
  rows = []
  for g in range(0, len(pieces), group):
    chunk = sorted(pieces[g:g + group], key=lambda p: p[2] - p[1], reverse=True)
    group_rows, open_rows = [], []
    for piece in chunk:
      need = piece[2] - piece[1] - 1
      k = bisect.bisect_left(open_rows, (need, -1))
      if k < len(open_rows):
        room, r = open_rows.pop(k)
      else:
        room, r = seq_len, len(group_rows)
        group_rows.append([])
      group_rows[r].append(piece)
      if room - need > 0:
        bisect.insort(open_rows, (room - need, r))
    rows += group_rows
  return rows


@pytest.mark.parametrize("seq_len", [1, 2, 7, 16, 64])
def test_numpy_packing_equals_the_list_reference(seq_len):
  rng = np.random.default_rng(seq_len)
  edges = [0, 1, seq_len, seq_len + 1, seq_len + 2, 5 * seq_len]
  for trial in range(4):
    if trial % 2:  # few distinct lengths: many ties for greedy's sort
      lengths = rng.choice(edges + [2, 3], 300).tolist()
    else:
      lengths = (rng.integers(0, 6 * seq_len + 3, 300).tolist() + edges)
    rng.shuffle(lengths)
    for policy in packing.TRUNCATION:
      want_stats, got_stats = {"bad_records": 1}, {"bad_records": 1}
      want = reference_fit_examples(lengths, seq_len, policy, want_stats)
      got = packing.fit_examples(np.asarray(lengths) if trial else lengths, seq_len, policy,
                                 got_stats)
      assert got.dtype == np.int64 and got.shape == (len(want), 3)
      assert [tuple(p) for p in got.tolist()] == want
      assert list(got_stats.items()) == list(want_stats.items())  # same keys in the same order
      assert all(type(v) is int for v in got_stats.values())
      shuffled = rng.permutation(len(want))  # as an epoch's order hands them over
      for mode in packing.MODES:
        for group in (1, 5, 64, 10_000):
          if mode != "greedy" and group != 64:
            continue
          ref = reference_plan_rows([want[k] for k in shuffled], seq_len, mode, group)
          rows = packing.plan_rows(got[shuffled], seq_len, mode, group)
          assert len(rows) == len(ref) and rows.pieces.dtype == np.int64
          assert [[tuple(p) for p in row.tolist()] for row in rows] == ref, (policy, mode, group)
          used = sum(e - s - 1 for row in ref for _, s, e in row)
          assert packing.padding_ratio(rows, seq_len) == 1.0 - used / max(1, len(ref) * seq_len)
    positions = sorted(n - 1 for n in lengths)
    for share in (0.0, 0.5, 0.95, 1.0):
      import math
      want = positions[max(0, math.ceil(round(share * len(positions), 9)) - 1)]
      assert packing.length_to_fit(lengths, share) == want
  assert packing.length_to_fit([], 0.95) == 0
  assert len(packing.plan_rows(packing.fit_examples([], seq_len, "split", {}), seq_len, "concat")) == 0


def test_packed_row_gives_each_example_its_own_loss():
  cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                    max_seq_len=64, rope_theta=10000.0)
  handle = handles.model_handle(cfg)
  model = handle.bind(handles.init_params(handle, seed=0))
  rng = np.random.default_rng(1)
  ids = [rng.integers(0, 50, n).astype(np.int32) for n in (9, 14, 6)]
  masks = [np.ones(len(x), np.float32) for x in ids]
  row = packing.assemble([(i, 0, len(x)) for i, x in enumerate(ids)], ids, masks, 32)
  b = {k: jnp.asarray(v)[None] for k, v in row.items()}
  nll = losses.token_nll(model(b["inputs"], b["positions"], b["segment_ids"]), b["targets"])[0]
  for seg, x in enumerate(ids, 1):
    alone = losses.token_nll(model(jnp.asarray(x[None, :-1])), jnp.asarray(x[None, 1:]))[0]
    np.testing.assert_allclose(nll[row["segment_ids"] == seg], alone, atol=1e-5)


# --- mixtures and resume --------------------------------------------------------------------


def make_rows(datasets, weights, seed=0, mode="greedy"):
  exs = [([np.full(n, d, np.int32) for n in lens], [np.ones(n, np.float32) for n in lens])
         for d, lens in enumerate(datasets)]
  return pipeline.PackedRows(exs, weights, seq_len=16, mode=mode, truncation="split", seed=seed,
                             shuffle=True, group=32, stats={})


def test_mixture_follows_weights_and_is_deterministic():
  rows = make_rows([[6] * 100, [6] * 100], [3.0, 1.0])
  tokens = np.concatenate([rows(i)["inputs"][rows(i)["segment_ids"] > 0]
                           for i in range(len(rows.epoch(0)))])
  share = (tokens == 0).mean()
  assert share == pytest.approx(0.75, abs=0.01)
  again = make_rows([[6] * 100, [6] * 100], [3.0, 1.0])
  for i in range(60):  # into the second epoch too
    np.testing.assert_array_equal(rows(i)["inputs"], again(i)["inputs"])
  other_seed = make_rows([[6] * 100, [6] * 100], [3.0, 1.0], seed=1)
  assert any(not np.array_equal(rows(i)["inputs"], other_seed(i)["inputs"]) for i in range(10))


def test_only_the_last_two_epochs_plans_are_kept_and_an_old_one_is_planned_again():
  rows = make_rows([list(range(2, 40)), [5, 9] * 20], [2.0, 1.0], mode="concat")
  fresh = make_rows([list(range(2, 40)), [5, 9] * 20], [2.0, 1.0], mode="concat")
  n = len(rows.epoch(0))
  late = [rows(i)["inputs"] for i in range(5 * n, 5 * n + 8)]  # plans epochs 0..5 on the way
  assert len(rows.starts) >= 7 and len(rows.plans) == 2
  for i in list(range(0, n, 3)) + list(range(5 * n, 5 * n + 8)):  # epoch 0 again, then back
    np.testing.assert_array_equal(rows(i)["inputs"], fresh(i)["inputs"])
  assert len(rows.plans) == 2
  np.testing.assert_array_equal(np.stack(late), np.stack([fresh(i)["inputs"] for i in
                                                          range(5 * n, 5 * n + 8)]))


def test_iterator_state_resumes_at_the_next_batch():
  rows = make_rows([list(range(2, 40)) * 5], [1.0])
  ds = pipeline.batches(rows, 4)
  it = iter(ds.to_iter_dataset())
  for _ in range(7):
    next(it)
  state = it.get_state()
  expected = [next(it)["inputs"] for _ in range(30)]  # crosses into later epochs
  resumed = iter(ds.to_iter_dataset())
  resumed.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(next(resumed)["inputs"], want)


def test_sft_run_learns_only_replies(tmp_path):
  from trainer import train
  records = [{"messages": [{"role": "user", "content": f"Say {w}"},
                           {"role": "assistant", "content": w}]} for w in ("yes", "no") * 40]
  path = write_jsonl(tmp_path / "chat.jsonl", records)
  cfg = small_run.config(steps=30, eval_exact_match=20, sample_tokens=0)
  cfg.data.update(source="files", format="chat", template="chatml", packing="greedy",
                  truncation="truncate", train_files=path, tokenizer_vocab_size=300,
                  eval_percent=25.0)
  out = train.run(cfg, str(tmp_path / "run"))
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    evals = [l for l in map(json.loads, f) if "eval_exact_match" in l]
  assert evals[0]["step"] == 0 and evals[-1]["step"] == 30
  assert out["eval_exact_match"] >= 0.0 and out["padding_ratio"] < 0.5


def test_a_short_eval_set_is_topped_up_with_padding_rows():
  rows = make_rows([[10, 12, 9]], [1.0], mode="none")  # 3 rows
  ds = pipeline.batches(rows, 8, repeat=False)
  assert len(ds) == 1
  b = ds[0]
  assert (b["weights"].sum(1) > 0).tolist() == [True] * 3 + [False] * 5
  assert (b["segment_ids"][3:] == 0).all()

"""Parquet input: a parquet file, a folder of Hub shards, a quoted glob and a datasets save_to_disk
folder read to the same records as the same rows written as JSONL (the reference: its reader is
tests/test_data.py's), bad rows named by file, row and field, and train_sft.py and train_dpo.py run on them.

    python -m pytest -q tests/test_parquet.py
"""
import dataclasses
import json
import os
import sys
from decimal import Decimal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import data
from conftest import run_python
from data import load_preferences, load_prompt_records, load_sft
from files import DataError


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def write_jsonl(path, rows):
    """The rows as JSONL, a missing key where parquet has a null (as datasets' to_json writes them)."""
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps({k: v for k, v in row.items() if v is not None}) + "\n")
    return str(path)


def same_records(parquet_records, jsonl_records, parquet_wheres, jsonl_path):
    """Every field equal but `where`, which names each file's row (parquet) or line (JSONL)."""
    assert [r.where for r in parquet_records] == parquet_wheres
    assert [r.where for r in jsonl_records] == [f"{jsonl_path}:{i}" for i in range(1, len(jsonl_records) + 1)]
    without_where = [{**dataclasses.asdict(r), "where": None} for r in parquet_records]
    assert without_where == [{**dataclasses.asdict(r), "where": None} for r in jsonl_records]


def ultrafeedback_rows(n, first=0):
    """UltraFeedback-binarized's train_prefs layout: whole conversations as chosen and rejected,
    some with a system turn or an earlier exchange, and float scores."""
    rows = []
    for i in range(first, first + n):
        before = ([{"role": "system", "content": f"be brief {i}"}] if i % 3 == 1 else []) + (
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}] if i % 3 == 2 else [])
        prompt = [{"role": "user", "content": f"question {i}?"}]
        rows.append({"prompt": f"question {i}?", "prompt_id": f"{i:064x}",
                     "chosen": before + prompt + [{"role": "assistant", "content": f"good answer {i}"}],
                     "rejected": before + prompt + [{"role": "assistant", "content": f"bad answer {i}"}],
                     "messages": before + prompt + [{"role": "assistant", "content": f"good answer {i}"}],
                     "score_chosen": 8.5 + i, "score_rejected": 2.25})
    return rows


def test_an_ultrafeedback_parquet_reads_to_the_pairs_of_the_same_jsonl(tmp_path):
    rows = ultrafeedback_rows(6)
    path = write_parquet(tmp_path / "train_prefs-00000-of-00001.parquet", rows)
    assert pq.read_schema(path).field("chosen").type == pa.list_(pa.struct([("role", pa.string()),
                                                                              ("content", pa.string())]))
    pairs = load_preferences(path)
    same_records(pairs, load_preferences(write_jsonl(tmp_path / "p.jsonl", rows)),
                 [f"{path}:row {i}" for i in range(1, 7)], tmp_path / "p.jsonl")
    assert (pairs[2].prompt, pairs[2].chosen, pairs[2].rejected) == ("question 2?", "good answer 2", "bad answer 2")
    assert pairs[2].prompt_messages == rows[2]["chosen"][:-1]


def test_sft_and_prompt_parquets_read_to_the_records_of_the_same_jsonl(tmp_path):
    chats = [{"prompt": f"q{i}", "messages": [{"role": "user", "content": f"q{i}"},
                                               {"role": "assistant", "content": f"a{i}"}] * (1 + i % 2)}
             for i in range(4)]
    sft = write_parquet(tmp_path / "sft.parquet", chats)
    same_records(load_sft(sft), load_sft(write_jsonl(tmp_path / "sft.jsonl", chats)),
                 [f"{sft}:row {i}" for i in range(1, 5)], tmp_path / "sft.jsonl")
    assert load_sft(sft)[1].messages == chats[1]["messages"]
    # other fields go to reward functions: a null one is the field missing, as in the JSONL
    prompts = [{"prompt": "2+2?", "answer": 4}, {"prompt": "3+3?", "answer": None}, {"prompt": "4+4?", "answer": 8}]
    for rows in (prompts, [{**p, "prompt": [{"role": "user", "content": p["prompt"]}]} for p in prompts]):
        records = load_prompt_records(write_parquet(tmp_path / "prompts.parquet", rows))
        assert records == load_prompt_records(write_jsonl(tmp_path / "prompts.jsonl", rows))
        assert records[1] == (rows[1]["prompt"], {}) and records[2] == (rows[2]["prompt"], {"answer": 8})


def two_shards(folder, bad_row=None):
    """UltraFeedback rows 0-4 in shard 0 and 5-9 in shard 1, shard 1 written first; `bad_row` (0-based
    within shard 1) has no rejected conversation."""
    rows = ultrafeedback_rows(10)
    if bad_row is not None:
        rows[5 + bad_row]["rejected"] = None
    os.makedirs(folder, exist_ok=True)
    write_parquet(folder / "train_prefs-00001-of-00002.parquet", rows[5:])
    write_parquet(folder / "train_prefs-00000-of-00002.parquet", rows[:5])
    return rows


def test_a_folder_of_shards_reads_in_shard_order_and_a_glob_picks_one_split(tmp_path):
    folder = tmp_path / "data"
    rows = two_shards(folder)
    reference = load_preferences(write_jsonl(tmp_path / "all.jsonl", rows))
    shard_rows = [f"{folder}/train_prefs-0000{s}-of-00002.parquet:row {i}" for s in (0, 1) for i in range(1, 6)]
    same_records(load_preferences(str(folder)), reference, shard_rows, tmp_path / "all.jsonl")

    # older datasets put a hash after the shard number (UltraChat-200k's test_sft-00000-of-00001-f7dfac4afe5b93.parquet)
    write_parquet(folder / "test_prefs-00000-of-00001-f7dfac4afe5b93.parquet", ultrafeedback_rows(2, first=100))
    with pytest.raises(DataError) as e:
        load_preferences(str(folder))
    assert str(e.value) == (f"{folder}: parquet files of 2 splits; name one with a quoted pattern: "
                            f'"{folder}/test_prefs-*.parquet" or "{folder}/train_prefs-*.parquet"')
    same_records(load_preferences(f"{folder}/train_prefs-*.parquet"), reference, shard_rows, tmp_path / "all.jsonl")
    assert [p.chosen for p in load_preferences(f"{folder}/test_*.parquet")] == ["good answer 100", "good answer 101"]
    r = run_python("data.py", "--check", f"{folder}/train_prefs-*.parquet", "--kind", "preference")
    assert (r.returncode, r.stdout) == (0, f"ok: 10 preference records in {folder}/train_prefs-*.parquet\n")


def test_a_bad_row_is_named_by_its_file_row_and_field_and_skip_bad_skips_it(tmp_path, capsys):
    folder = tmp_path / "data"
    two_shards(folder, bad_row=2)
    shard = f"{folder}/train_prefs-00001-of-00002.parquet"
    message = f"{shard}:row 3: field 'rejected': expected a non-empty list of messages"
    with pytest.raises(DataError) as e:
        load_preferences(str(folder))
    assert str(e.value) == message
    pairs = load_preferences(str(folder), skip_bad=True)
    assert [p.chosen for p in pairs] == [f"good answer {i}" for i in range(10) if i != 7]
    assert f"skipped 1 bad records in {folder} (first: {message})" in capsys.readouterr().err
    # a plain record's null is a missing field, as datasets writes a JSON record without it
    plain = write_parquet(tmp_path / "plain.parquet", [{"prompt": "p", "chosen": "a", "rejected": r}
                                                       for r in ("b", "c", None)])
    with pytest.raises(DataError, match=rf"^{plain}:row 3: field 'rejected': missing$"):
        load_preferences(plain)


@pytest.mark.parametrize("column, got", [(pa.array([b"a", b"b"]), "bytes"),
                                         (pa.array([0, 1], pa.timestamp("s")), "datetime"),
                                         (pa.array([Decimal("1.5"), Decimal("2.5")]), "Decimal")])
def test_values_json_never_has_are_refused_as_wrong_types(column, got, tmp_path):
    path = str(tmp_path / "odd.parquet")
    pq.write_table(pa.table({"prompt": ["p", "q"], "completion": column}), path)
    with pytest.raises(DataError, match=rf"^{path}:row 1: field 'completion': expected a string, got {got}$"):
        load_sft(path)


def test_a_row_longer_than_the_record_bound_is_refused_like_a_long_line(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MAX_RECORD_BYTES", 100)
    rows = [{"prompt": "p", "completion": "short"}, {"prompt": "p", "completion": "é" * 50},
            {"prompt": "p", "completion": "also short"}]  # row 2: 83 characters as JSON, 133 bytes in UTF-8
    path = write_parquet(tmp_path / "long.parquet", rows)
    with pytest.raises(DataError, match=rf"^{path}:row 2: a record of more than 100 bytes"):
        load_sft(path)
    assert [e.completion for e in load_sft(path, skip_bad=True)] == ["short", "also short"]


def test_a_file_that_is_not_parquet_is_one_line(tmp_path):
    renamed = tmp_path / "renamed.parquet"
    renamed.write_text('{"prompt": "p", "completion": "c"}\n')
    good = write_parquet(tmp_path / "good.parquet", [{"prompt": "p", "completion": f"c{i}"} for i in range(100)])
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(open(good, "rb").read()[:-40])
    for path in (renamed, truncated):
        r = run_python("data.py", "--check", str(path))
        assert r.returncode == 2
        assert r.stderr.startswith(f"error: {path}: not a parquet file, or a damaged one (pyarrow: ")
        assert r.stderr.count("\n") == 1, r.stderr


def test_without_pyarrow_a_parquet_file_is_one_line_saying_how_to_install_it(tmp_path, monkeypatch):
    path = write_parquet(tmp_path / "sft.parquet", [{"prompt": "p", "completion": "c"}])
    jsonl = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "p", "completion": "c"}])
    for module in ("pyarrow", "pyarrow.parquet", "pyarrow.ipc"):
        monkeypatch.setitem(sys.modules, module, None)  # `import pyarrow` raises ImportError
    with pytest.raises(DataError) as e:
        load_sft(path)
    assert str(e.value) == f"{path}: reading parquet needs pyarrow (pip install pyarrow)"
    assert load_sft(jsonl)[0].completion == "c"  # JSONL never needs it
    r = run_python("-c", f"import sys, data; data.load_sft({jsonl!r}); print('pyarrow' in sys.modules)")
    assert r.stdout == "False\n", r.stderr


def save_to_disk(folder, rows, names=("data-00000-of-00001.arrow",)):
    """What datasets' save_to_disk writes: Arrow IPC stream files and a state.json naming them."""
    os.makedirs(folder, exist_ok=True)
    table = pa.Table.from_pylist(rows)
    for name in names:
        with pa.OSFile(os.path.join(folder, name), "wb") as f, pa.ipc.new_stream(f, table.schema) as writer:
            writer.write_table(table, max_chunksize=2)
    with open(os.path.join(folder, "state.json"), "w") as f:
        json.dump({"_data_files": [{"filename": n} for n in names], "_split": "train"}, f)
    with open(os.path.join(folder, "dataset_info.json"), "w") as f:
        json.dump({"features": {}}, f)
    return str(folder)


def test_a_save_to_disk_folder_reads_its_arrow_files_and_nothing_outside_it(tmp_path):
    rows = ultrafeedback_rows(5)
    folder = save_to_disk(tmp_path / "saved", rows)
    same_records(load_preferences(folder), load_preferences(write_jsonl(tmp_path / "p.jsonl", rows)),
                 [f"{folder}/data-00000-of-00001.arrow:row {i}" for i in range(1, 6)], tmp_path / "p.jsonl")
    save_to_disk(tmp_path, rows, names=("outside.arrow",))  # a readable Arrow file beside the folder
    os.symlink(tmp_path / "outside.arrow", tmp_path / "saved" / "link.arrow")
    for name in ("../outside.arrow", str(tmp_path / "outside.arrow"), "link.arrow", "."):
        with open(tmp_path / "saved" / "state.json", "w") as f:
            json.dump({"_data_files": [{"filename": name}]}, f)
        with pytest.raises(DataError) as e:
            load_preferences(folder)
        assert str(e.value) == f"{folder}/state.json: data file {name!r} is not in the folder"


def test_training_scripts_run_on_parquet_and_a_bad_row_stops_them_before_anything_is_written(toy_dir, tmp_path):
    """train_sft.py on a prompt-completion parquet file, then train_dpo.py from its checkpoint on an
    UltraFeedback parquet shard named by a glob, as a user types them."""
    rows = [{"prompt": f"the movie {i}", "completion": "was great ." if i % 2 else "was dull ."} for i in range(40)]
    args = ["--device=cpu", "--batch_size=8", "--max_iters=2", "--eval_interval=2", "--print_samples=0",
            "--max_length=48"]
    sft = write_parquet(tmp_path / "sft.parquet", rows)
    r = run_python("train_sft.py", f"--train_file={sft}", f"--tokenizer={toy_dir}/tokenizer.model",
                   f"--out_dir={tmp_path / 'sft'}", "--eval_samples=0", *args)
    assert r.returncode == 0, r.stderr
    assert f"the last 2 of the 40 records of {sft} are held out" in r.stdout
    prefs = write_parquet(tmp_path / "train_prefs-00000-of-00001.parquet", ultrafeedback_rows(40))
    dpo = ["train_dpo.py", f"--sft_ckpt={tmp_path / 'sft' / 'ckpt.pt'}", "--gold_eval=false", *args]
    shards = f"{tmp_path}/train_prefs-*.parquet"  # a quoted glob, as the Hub's split is named
    r = run_python(*dpo, f"--train_file={shards}", f"--out_dir={tmp_path / 'dpo'}")
    assert r.returncode == 0, r.stderr
    assert f"the last 2 of the 40 records of {shards} are held out" in r.stdout
    assert os.path.isfile(tmp_path / "dpo" / "ckpt.pt")

    rows[2]["completion"] = "   "
    bad = write_parquet(tmp_path / "bad.parquet", rows)
    r = run_python("train_sft.py", f"--train_file={bad}", f"--tokenizer={toy_dir}/tokenizer.model",
                   f"--out_dir={tmp_path / 'bad_sft'}", *args)
    assert (r.returncode, r.stderr) == (2, f"error: {bad}:row 3: field 'completion': empty\n")
    bad_rows = ultrafeedback_rows(40)
    bad_rows[2]["chosen"] = bad_rows[2]["rejected"]
    bad = write_parquet(tmp_path / "bad_prefs.parquet", bad_rows)
    r = run_python(*dpo, f"--train_file={bad}", f"--out_dir={tmp_path / 'bad_dpo'}")
    assert (r.returncode, r.stderr) == (2, f"error: {bad}:row 3: field 'rejected': identical to 'chosen'\n")
    assert not os.path.exists(tmp_path / "bad_sft") and not os.path.exists(tmp_path / "bad_dpo")

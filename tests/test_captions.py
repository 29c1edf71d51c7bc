"""Caption loading: every format, stable ids, seeded order, shards, and the error messages."""

from __future__ import annotations

import json

import pytest

from generator_service.captions import load_captions

CAPTIONS = ["a dog on a beach", "two cats", "a red bicycle, leaning", "snow at night", "a bowl of ramen"]


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def txt_file(tmp_path):
    # Blank and whitespace-only lines are skipped and do not consume ids.
    return _write(tmp_path / "captions.txt", "a dog on a beach\n\ntwo cats\n   \na red bicycle, leaning\nsnow at night\na bowl of ramen\n")


def test_txt(txt_file):
    captions = load_captions(txt_file)
    assert captions.captions == CAPTIONS
    assert captions.caption_ids == [0, 1, 2, 3, 4]
    assert captions.skipped_empty == 2 and captions.total == 5 and len(captions) == 5
    assert list(captions)[2] == (2, "a red bicycle, leaning")
    assert captions.caption_of(3) == "snow at night"


def test_csv_with_quotes_and_empty_cells(tmp_path):
    rows = ['"a dog on a beach",1', "two cats,2", ",3", '"a red bicycle, leaning",4', "snow at night,5", "a bowl of ramen,6"]
    path = _write(tmp_path / "c.csv", "caption,score\n" + "\n".join(rows) + "\n")
    captions = load_captions(path)
    assert captions.captions == CAPTIONS and captions.skipped_empty == 1


def test_official_stablerep_csv(tmp_path):
    body = "".join(f"images/{i:05d}.jpg,{c if ',' not in c else chr(34) + c + chr(34)}\n" for i, c in enumerate(CAPTIONS))
    captions = load_captions(_write(tmp_path / "official.csv", "path,caption\n" + body))
    assert captions.captions == CAPTIONS


def test_tsv_other_column(tmp_path):
    body = "".join(f"{i}\t{c}\n" for i, c in enumerate(CAPTIONS))
    captions = load_captions(_write(tmp_path / "c.tsv", "id\ttext\n" + body), column="text")
    assert captions.captions == CAPTIONS and captions.column == "text"


def test_jsonl(tmp_path):
    lines = [json.dumps({"caption": c, "url": "x"}) for c in CAPTIONS[:2]] + ["", json.dumps({"caption": None})]
    lines += [json.dumps(c) for c in CAPTIONS[2:]]  # bare strings are captions too
    captions = load_captions(_write(tmp_path / "c.jsonl", "\n".join(lines) + "\n"))
    assert captions.captions == CAPTIONS and captions.skipped_empty == 2


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"caption": CAPTIONS[:2] + [None, ""] + CAPTIONS[2:], "n": list(range(7))}), path)
    captions = load_captions(path)
    assert captions.captions == CAPTIONS and captions.skipped_empty == 2
    with pytest.raises(ValueError, match=r"c\.parquet: no column 'text'; available columns: 'caption', 'n'"):
        load_captions(path, column="text")


def test_seeded_shuffle_is_deterministic_and_keeps_ids(tmp_path):
    path = _write(tmp_path / "many.txt", "".join(f"caption number {i}\n" for i in range(30)))
    first = load_captions(path, seed=3)
    again = load_captions(path, seed=3)
    other = load_captions(path, seed=4)
    assert first.caption_ids == again.caption_ids
    assert first.caption_ids != other.caption_ids
    assert first.caption_ids != list(range(30))
    assert sorted(first.caption_ids) == list(range(30))
    assert all(text == f"caption number {i}" for i, text in first)


@pytest.mark.parametrize("seed", [None, 11])
def test_shards_are_disjoint_and_cover_everything(tmp_path, seed):
    path = _write(tmp_path / "many.txt", "".join(f"caption number {i}\n" for i in range(23)))
    shards = [load_captions(path, seed=seed, shard=(i, 4)) for i in range(4)]
    ids = [i for shard in shards for i in shard.caption_ids]
    assert sorted(ids) == list(range(23))
    assert all(abs(len(shard) - 23 / 4) < 1 for shard in shards)
    for shard in shards:
        assert all(text == f"caption number {i}" for i, text in shard)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="caption file not found: .*nope.txt"):
        load_captions(tmp_path / "nope.txt")


@pytest.mark.parametrize("name, text", [("e.txt", ""), ("blank.txt", "\n  \n"), ("e.csv", ""), ("h.csv", "caption\n,\n")])
def test_empty_file(tmp_path, name, text):
    with pytest.raises(ValueError, match=rf"{name.replace('.', '[.]')}: (no captions|empty file)"):
        load_captions(_write(tmp_path / name, text))


def test_unknown_column_lists_available(tmp_path):
    path = _write(tmp_path / "c.csv", "path,text\na.jpg,hello\n")
    with pytest.raises(ValueError, match=r"c\.csv: no column 'caption'; available columns: 'path', 'text'"):
        load_captions(path)


def test_jsonl_errors_name_the_line(tmp_path):
    path = _write(tmp_path / "c.jsonl", '{"caption": "ok"}\n{"text": "no caption key"}\n')
    with pytest.raises(ValueError, match=r"c\.jsonl:2: no key 'caption'; available keys: 'text'"):
        load_captions(path)
    path = _write(tmp_path / "d.jsonl", '{"caption": "ok"}\n{broken\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:2: not valid JSON"):
        load_captions(path)


def test_unknown_format_and_bad_shard(tmp_path, txt_file):
    with pytest.raises(ValueError, match=r"unknown caption file type '\.xml'"):
        load_captions(_write(tmp_path / "c.xml", "<a/>"))
    with pytest.raises(ValueError, match="shard 4/4 is invalid"):
        load_captions(txt_file, shard=(4, 4))


@pytest.mark.parametrize("suffix", [".txt", ".csv", ".jsonl"])
def test_a_binary_caption_file_names_the_file_and_line(tmp_path, suffix):
    path = tmp_path / f"captions{suffix}"
    first = {".txt": b"a cat\n", ".csv": b"caption\na cat\n", ".jsonl": b'{"caption": "a cat"}\n'}[suffix]
    path.write_bytes(first + b"ok \xff\xfe binary\n")
    line = first.count(b"\n") + 1
    with pytest.raises(ValueError, match=rf"^{path}:{line}: not UTF-8 text \(byte 0xff at column 4\)"):
        load_captions(path)


def test_each_caption_knows_its_line_for_messages(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_text("first\n\n  \nsecond\n")
    captions = load_captions(path, seed=3)
    assert captions.where(1) == f"{path} line 4" and captions.where(0) == f"{path} line 1"
    table = tmp_path / "captions.csv"
    table.write_text("caption\n\nfirst\n\"two\nlines\"\n")
    assert load_captions(table).where(0) == f"{table} line 3"  # csv skips the blank line; the count does not
    assert load_captions(table).where(1) == f"{table} line 5"  # a record over two lines: its last line

"""What counts as a drop for the scheduled retrain, and the "no new data" error in each of its cases.

The three cases the error tells apart: the drops folder does not exist, it holds no drop file, or
every drop in it was consumed by an earlier run. Local folders and ``s3://`` prefixes alike.
"""

import re

import pytest

from conftest import PROJECT_ROOT
from steps import retrain, storage
from steps.config import recipe_from_dict

# The example drop name in the message: a UTC timestamp first, so that names sort by time.
EXAMPLE_DROP = r"\d{4}-\d\d-\d\dT\d{4}-events\.jsonl"


def recipe_for(drops: str, force: bool = False):
    return recipe_from_dict({"retrain": {"drops": drops, "force": force}})


def no_new_data(drops: str, consumed=(), last_run=None, force=False) -> str:
    with pytest.raises(retrain.NoNewData) as err:
        retrain.select_drops(recipe_for(drops, force), list(consumed), last_run)
    return str(err.value)


def test_drops_are_jsonl_jsonl_gz_and_parquet_files_at_any_depth_sorted_by_path(tmp_path):
    drops = tmp_path / "drops"
    for name in ["2026-01-02T0900-events.jsonl", "2026-01-01T0900-events.jsonl.gz",
                 "2026-01-03-export/part-0.parquet", "2026-01-03-export/part-1.parquet",
                 "notes.txt", "2026-01-04.json", "2026-01-05.csv"]:
        (drops / name).parent.mkdir(parents=True, exist_ok=True)
        (drops / name).write_bytes(b"")
    expected = [str(drops / name) for name in ["2026-01-01T0900-events.jsonl.gz", "2026-01-02T0900-events.jsonl",
                                               "2026-01-03-export/part-0.parquet",
                                               "2026-01-03-export/part-1.parquet"]]
    assert retrain.list_drops(str(drops)) == expected
    assert retrain.select_drops(recipe_for(str(drops)), [], None) == expected


def test_a_drop_is_known_by_its_path_so_any_unconsumed_name_is_new(tmp_path):
    """The watermark is the set of consumed paths, not a time: a late file that sorts first is still new."""
    drops = tmp_path / "drops"
    drops.mkdir()
    (drops / "2026-01-02.jsonl").write_text("{}\n")
    (drops / "2026-01-01-late.jsonl").write_text("{}\n")
    assert retrain.select_drops(recipe_for(str(drops)), [str(drops / "2026-01-02.jsonl")], "RetrainFlow/3") == [
        str(drops / "2026-01-01-late.jsonl")]


def test_missing_folder_says_which_path_and_how_to_make_a_drop(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    message = no_new_data(".posttrain/drops")
    assert message.startswith("no new data under retrain.drops='.posttrain/drops': that folder (")
    assert f"({tmp_path / '.posttrain' / 'drops'}) does not exist" in message  # where a relative path points
    assert "A drop is a .jsonl, .jsonl.gz or .parquet file (or a folder of them)" in message
    assert re.search(rf"e\.g\. \.posttrain/drops/{EXAMPLE_DROP}; see docs/production\.md", message), message
    assert "consumed" not in message and "retrain.force" not in message  # force cannot help here
    assert message == no_new_data(".posttrain/drops", force=True)


def test_empty_folder_says_it_is_empty(tmp_path):
    (tmp_path / "drops").mkdir()
    message = no_new_data(str(tmp_path / "drops"))
    assert f"retrain.drops='{tmp_path / 'drops'}': the folder is empty. A drop is a .jsonl" in message
    assert re.search(EXAMPLE_DROP, message) and "docs/production.md" in message


def test_folder_without_drop_files_lists_what_it_holds(tmp_path):
    drops = tmp_path / "drops"
    (drops / "sub").mkdir(parents=True)
    for name in ["a.csv", "b.json", "c.txt", "d.tsv", "e.xml", "f.yaml", "sub/g.jsonl.bak"]:
        (drops / name).write_text("x")
    message = no_new_data(str(drops))
    assert ("the folder holds no drop file, only 7 other file(s): a.csv, b.json, c.txt, d.tsv, e.xml "
            "and 2 more. A drop is a .jsonl, .jsonl.gz or .parquet file") in message
    (drops / "f.yaml").unlink()
    (drops / "sub/g.jsonl.bak").unlink()
    assert "5 other file(s): a.csv, b.json, c.txt, d.tsv, e.xml. A drop" in no_new_data(str(drops))


def test_all_consumed_names_the_last_run_and_the_newest_consumed_drop(tmp_path):
    drops = tmp_path / "drops"
    (drops / "2026-01-02T0900-export").mkdir(parents=True)
    consumed = [str(drops / "2026-01-01T0900-events.jsonl"), str(drops / "2026-01-02T0900-export" / "part-0.parquet")]
    for uri in consumed:
        open(uri, "w").close()
    message = no_new_data(str(drops), consumed, "RetrainFlow/12")
    assert ("2 drop(s) there, all consumed by RetrainFlow/12 (newest: 2026-01-02T0900-export/part-0.parquet). "
            "Add a new drop there, or set retrain.force: true to retrain on all of them anyway; "
            "see docs/production.md") in message
    assert "does not exist" not in message and "A drop is" not in message
    assert "all consumed by earlier runs" in no_new_data(str(drops), consumed, None)
    assert retrain.select_drops(recipe_for(str(drops), force=True), consumed, "RetrainFlow/12") == sorted(consumed)


def test_the_page_the_error_points_at_explains_drops():
    page, section = retrain.HELP_PAGE.split(", ")
    text = (PROJECT_ROOT / page).read_text(encoding="utf-8")
    assert f"## {section.strip(chr(39))}" in text
    assert all(word in text for word in ("retrain.drops", ".jsonl.gz", ".parquet", "consumed_drops", "watermark"))


def test_s3_prefix_cases(s3_bucket):
    root = f"s3://{s3_bucket}/posttrain/drops"
    message = no_new_data(root)  # the bucket exists, nothing under the prefix
    assert message.startswith(f"no new data under retrain.drops='{root}': that prefix does not exist.")
    assert re.search(rf"e\.g\. {re.escape(root)}/{EXAMPLE_DROP}; see docs/production\.md", message), message
    assert "that prefix does not exist" in no_new_data(f"s3://no-such-bucket-{s3_bucket}/drops")

    storage.write_bytes(f"{root}/README.txt", b"drops go here")
    storage.write_bytes(f"{root}-other/2026-01-01.jsonl", b"{}\n")  # a sibling prefix is not under the folder
    message = no_new_data(root)
    assert "the folder holds no drop file, only 1 other file(s): README.txt. A drop is" in message

    drops = [f"{root}/2026-01-01T0900-events.jsonl", f"{root}/2026-01-02T0900/part-0.parquet"]
    for uri in drops:
        storage.write_bytes(uri, b"")
    assert retrain.select_drops(recipe_for(root), [], None) == drops
    assert retrain.select_drops(recipe_for(root + "/"), drops[:1], "RetrainFlow/1") == drops[1:]
    message = no_new_data(root, drops, "RetrainFlow/2")
    assert "2 drop(s) there, all consumed by RetrainFlow/2 (newest: 2026-01-02T0900/part-0.parquet)" in message

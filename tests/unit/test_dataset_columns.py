"""Pure rules of dataset exports: the type a metadata column takes, the names of metadata
columns beside the file's own, where a one-file export (parquet, jsonl, csv) goes, split folders."""

from __future__ import annotations

import pytest

from pipeline.datasets import (
    RESERVED,
    cell,
    column_name,
    file_target,
    merged_kind,
    split_folder,
    value_kind,
)


def kind_of(*values: object) -> str | None:
    kind = None
    for value in values:
        kind = merged_kind(kind, value_kind(value))
    return kind


@pytest.mark.parametrize(("values", "kind"), [
    ((1, 2, None), "int"),
    ((1, 0.5), "float"),  # a score written 1 then 0.5 loads as a float column
    ((True, None, False), "bool"),
    ((True, 1), "json"),  # bool is not an int here: True would load as 1
    (("a", 1), "json"),
    ((["a"], ["b"]), "json"),
    (({"x": 1},), "json"),
    ((2**63,), "json"),  # past int64: JSON text, never an overflow
    ((None, None), None),
])
def test_a_metadata_column_takes_the_type_all_its_values_share(values, kind):
    assert kind_of(*values) == kind


def test_cells_hold_values_as_their_column_types_them():
    assert cell(["a", "é"], "json") == '["a", "é"]'
    assert cell(1, "float") == 1.0 and isinstance(cell(1, "float"), float)
    assert cell(None, "json") is None
    assert cell("x", "string") == "x"


def test_a_metadata_key_named_like_a_file_column_gets_a_prefix():
    assert column_name("label", set()) == "label"
    assert column_name("seed", set()) == "metadata_seed"
    assert column_name("file_name", set()) == "metadata_file_name"
    assert column_name("seed", {"metadata_seed"}) is None  # never two columns of one name
    assert "metadata_seed" not in RESERVED


@pytest.mark.parametrize(("dest", "where"), [
    ("out.parquet", (".", "out.parquet")),
    ("a/b/out.PARQUET", ("a/b", "out.PARQUET")),
    ("/x.jsonl", ("/", "x.jsonl")),
    ("s3://bucket/p/x.parquet", ("s3://bucket/p", "x.parquet")),
    ("s3://bucket", ("s3://bucket/", "job-000001.parquet")),
    ("folder/", ("folder/", "job-000001.parquet")),
    ("s3://bucket/p/", ("s3://bucket/p/", "job-000001.parquet")),
])
def test_a_one_file_dest_is_that_file_or_a_folder_ending_in_a_slash(dest, where):
    assert file_target(dest, "job-000001.parquet") == where


def test_splits_become_safe_folder_names():
    assert split_folder("train") == "train"
    assert split_folder("../../etc") == "etc"
    assert split_folder("Test Set") == "test-set"
    assert split_folder(None) == split_folder("") == split_folder("///") == "train"

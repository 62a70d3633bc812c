"""The one tolerant reader of a run's JSON records, and what its callers make of a damaged one."""

from __future__ import annotations

import json

import pytest

from sslkit.config_backbone import recorded_backbone
from sslkit.init.continued import _run_checkpoint
from sslkit.output_file import read_json, write_json_atomic


@pytest.mark.parametrize("text", [None, "", "{not json", "[1, 2]", '"a string"', "\xff\xfe"])
def test_read_json_gives_an_empty_record_for_a_missing_or_damaged_file(tmp_path, text):
    path = tmp_path / "run.json"
    if text is not None:
        path.write_bytes(text.encode("latin-1"))
    assert read_json(path) == {}


def test_read_json_reads_what_write_json_atomic_wrote(tmp_path):
    write_json_atomic(tmp_path / "run.json", {"task": "mae", "config": {"backbone": "timm:x"}})
    assert read_json(tmp_path / "run.json") == {"task": "mae", "config": {"backbone": "timm:x"}}


@pytest.mark.parametrize("text", ["[1, 2]", '{"config": [1]}', '{"config": {"backbone_options": 3}}', "{"])
def test_a_damaged_init_run_json_is_no_recorded_backbone_and_no_task_parts(tmp_path, text):
    (tmp_path / "run.json").write_text(text)
    assert recorded_backbone(tmp_path / "run.json") is None
    tensors, name, why = _run_checkpoint(tmp_path, "mae")
    assert (tensors, name) == ({}, "")
    assert why == "task parts not restored: the init run's task is None, not 'mae'"


def test_a_recorded_backbone_is_read_from_run_json(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps(
        {"task": "mae", "config": {"backbone": "timm:vit_tiny_patch16_224", "backbone_options": {"depth": 6}}}))
    assert recorded_backbone(tmp_path / "run.json") == ("timm:vit_tiny_patch16_224", {"depth": 6})

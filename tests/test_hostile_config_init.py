"""Hostile config files and ``--init`` weights: each is one short line (a UsageError), found before
anything big is built: a YAML alias bomb, values of megabytes, nesting deeper than the parsers
recurse, a FIFO given as the config, a zip bomb as weights, a safetensors file of no tensors.
Every crafted file here is a few KB."""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path

import pytest
import torch

from sslkit import config
from sslkit.errors import UsageError

SHORT = 400  # characters: a line a terminal shows whole


def _laughs(levels: int) -> str:
    """``levels`` nested YAML aliases, each nine of the one before (9**levels strings)."""
    rows = ['&a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    rows += [f"&a{i} [{','.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    return "task: simclr\nlr: [" + ", ".join(rows) + "]\n"


def _refusal(path: Path) -> str:
    with pytest.raises(UsageError) as info:
        config.read_file(path)
    message = str(info.value)
    assert len(message) < SHORT and "\n" not in message, message[:500]
    return message


def test_yaml_aliases_are_refused_before_they_expand(tmp_path, cli):
    f = tmp_path / "laughs.yaml"
    f.write_text(_laughs(3))  # 9**3 strings expanded; the auditor's 9 levels ran out of memory
    assert "uses YAML aliases (&/*)" in _refusal(f) and "line 2" in _refusal(f)
    r = cli("pretrain", "--config", f, "--data", "x", "--out", tmp_path / "run")
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and "YAML aliases" in lines[0], r.output[:500]


def test_a_yaml_anchor_without_an_alias_still_reads(tmp_path):
    f = tmp_path / "anchor.yaml"
    f.write_text("task: simclr\nlr: &x 0.5\n")
    assert config.read_file(f) == {"task": "simclr", "lr": 0.5}
    f.write_text("task: simclr\nlr: &x 0.5\nbase_lr: *x\n")
    assert "YAML aliases" in _refusal(f)


@pytest.mark.parametrize("line, expected", [
    ('batch_size = "' + "z" * 200_000 + '"', "batch_size must be an integer, got 'zzz"),
    ("lr = [" + ", ".join(['"' + "y" * 1000 + '"'] * 200) + "]", "lr must be a number, got ['yyy"),
    ("quiet = [" + ", ".join(["[1, 2, 3, 4, 5, 6, 7, 8]"] * 500) + "]", "quiet must be true or false, got [[1, 2"),
])
def test_a_bad_value_is_quoted_in_a_few_characters(tmp_path, line, expected):
    f = tmp_path / "big.toml"
    f.write_text(f"task = 'simclr'\n{line}\n")
    message = _refusal(f)
    assert expected in message and "..." in message


def test_shown_walks_a_bounded_number_of_items():
    from sslkit.errors import shown

    bomb: object = ["lol"] * 9
    for _ in range(30):  # 9**31 items by reference: walking them all would never end
        bomb = [bomb] * 9
    assert len(shown(bomb)) <= 70
    assert len(shown(b"\x00" * 5_000_000)) <= 70 and len(shown("x" * 5_000_000)) <= 70
    assert shown("lars") == "'lars'" and shown(0.5) == "0.5" and shown({"a": 1}) == "{'a': 1}"


def test_a_long_unknown_name_gets_no_did_you_mean(monkeypatch, tmp_path):
    import difflib

    from sslkit.errors import unknown_name_message

    def no_difflib(*args, **kwargs):
        raise AssertionError("difflib ran over a name of megabytes")

    monkeypatch.setattr(difflib, "get_close_matches", no_difflib)
    message = unknown_name_message("task", "x" * 5_000_000, ["mae", "simclr"])
    assert len(message) < SHORT and message.startswith("unknown task 'xxx") and "choose from: mae, simclr" in message
    monkeypatch.undo()
    assert "(did you mean 'mae'?)" in unknown_name_message("task", "maee", ["mae", "simclr"])
    f = tmp_path / "key.yaml"
    f.write_text("task: simclr\n5: 1\n")  # a key that is no string: no did-you-mean, no TypeError
    with pytest.raises(UsageError, match="unknown setting 5; choose from: task,"):
        config.read_file(f)


@pytest.mark.parametrize("name, text, kind", [
    ("deep.toml", "x = " + "[" * 50_000 + "]" * 50_000 + "\n", "TOML"),
    ("deep_tbl.toml", "x = " + "{a = " * 5_000 + "1" + "}" * 5_000 + "\n", "TOML"),
    ("deep.yaml", "x: " + "[" * 50_000 + "]" * 50_000 + "\n", "YAML"),
])
def test_nesting_too_deep_is_one_line(tmp_path, name, text, kind):
    f = tmp_path / name
    f.write_text(text)
    assert _refusal(f) == f"{f}: invalid {kind}: nested too deeply"


def test_numbers_too_big_for_a_float_or_an_int_are_one_line(tmp_path):
    f = tmp_path / "big.yaml"
    f.write_text("task: simclr\nlr: 1" + "0" * 400 + "\n")  # an int float() overflows on
    assert "lr must be a number" in _refusal(f)
    f.write_text("task: simclr\nlr: 1" + "0" * 5000 + "\n")  # more digits than Python converts
    assert _refusal(f) == f"{f}: invalid YAML: an integer of more than 4300 digits"
    t = tmp_path / "big.toml"
    t.write_text("lr = 1" + "0" * 5000 + "\n")
    assert _refusal(t) == f"{t}: invalid TOML: an integer of more than 4300 digits"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_config_that_is_a_fifo_is_not_read(tmp_path):
    fifo = tmp_path / "run.toml"
    os.mkfifo(fifo)  # opening it to read would block for ever
    assert _refusal(fifo) == f"config file {str(fifo)!r} is not a regular file"
    assert "does not exist" in _refusal(tmp_path / "none.toml")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_init_weights_that_are_a_fifo_are_not_read(tmp_path):
    from sslkit.init.resolve import resolve_init

    fifo = tmp_path / "w.pth"
    os.mkfifo(fifo)
    with pytest.raises(UsageError, match=r"is not a regular file or folder"):
        resolve_init(str(fifo))


def _deflated(tmp_path: Path) -> Path:
    """A real torch.save file with its records deflated: a zip bomb in miniature."""
    plain = tmp_path / "ok.pth"
    torch.save({"conv1.weight": torch.zeros(4096)}, plain)
    bomb = tmp_path / "bomb.bin"
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    assert bomb.stat().st_size < plain.stat().st_size // 4
    return bomb


def test_a_compressed_torch_zip_is_refused_before_torch_reads_it(tmp_path, monkeypatch):
    from sslkit.init.read import read_file
    from sslkit.plain_pickle import NotPlainData, load_plain

    bomb = _deflated(tmp_path)
    assert set(read_file(tmp_path / "ok.pth", "ok.pth")[0]) == {"conv1.weight"}  # torch.save's own: read
    calls = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a) or {})
    with pytest.raises(NotPlainData, match=r"bomb\.bin: record '.*' is compressed"):
        load_plain(bomb)
    with pytest.raises(UsageError, match=r"^--init bomb\.bin: .*is compressed") as info:
        read_file(bomb, "bomb.bin")
    assert "\n" not in str(info.value) and not calls  # refused before torch.load


def test_records_declaring_more_than_the_file_holds_are_refused(tmp_path, monkeypatch):
    from sslkit.plain_pickle import NotPlainData, load_plain

    f = tmp_path / "lie.pth"
    torch.save({"w": torch.zeros(16)}, f)
    data = bytearray(f.read_bytes())
    entry = data.index(b"PK\x01\x02")  # the first central directory entry: its uncompressed size
    data[entry + 24:entry + 28] = (2**31).to_bytes(4, "little")
    f.write_bytes(bytes(data))
    monkeypatch.setattr(torch, "load", lambda *a, **k: {})
    with pytest.raises(NotPlainData, match=re.escape("lie.pth: its records declare")):
        load_plain(f)


def test_a_safetensors_file_of_no_tensors_says_so(tmp_path):
    from safetensors.torch import save_file

    from sslkit.init.read import read_file

    f = tmp_path / "empty.safetensors"
    save_file({}, str(f), metadata={"format": "pt"})
    with pytest.raises(UsageError, match=re.escape("--init empty.safetensors: the safetensors file holds no tensors")):
        read_file(f, "empty.safetensors")

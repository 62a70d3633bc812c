"""``config.toml`` and ``config_sha256`` (sslkit.run_record) hold the same settings: run.json's config
without ``out`` and the session flags, the data's location absolute."""

from __future__ import annotations

import tomllib
from pathlib import Path

from sslkit.config_values import check_values, defaults, plain
from sslkit.run_record import CONFIG_MARK, config_sha256, recorded_config, write_config_toml


def _config(data: str, **changes) -> dict:
    return {**defaults(), "task": "simclr", "data": data, "out": "runs/a", "task_options": {"temperature": 0.2},
            **changes}


def _written(folder: Path, config: dict) -> bytes:
    folder.mkdir()
    why, sha = write_config_toml(folder, recorded_config(config))
    assert why is None and len(sha) == 64
    return (folder / "config.toml").read_bytes()


def test_config_toml_holds_the_settings_the_hash_is_of(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "img").mkdir()
    config = _config("folder:img", seed=7)
    text = _written(tmp_path / "run", config).decode()
    assert text.startswith(CONFIG_MARK + "\n")
    loaded = check_values(tomllib.loads(text), "config.toml")
    expected = {k: v for k, v in plain(config).items()
                if v is not None and k not in ("out", "resume", "overwrite", "allow_data_change")}
    expected["data"] = f"folder:{tmp_path / 'img'}"
    assert plain(loaded) == expected
    # the file's settings, with the unset ones it leaves out, hash as the run's do
    unset = {k: None for k, v in config.items() if v is None}
    assert config_sha256({**unset, **loaded}) == config_sha256(config)


def test_session_flags_and_out_change_neither_the_file_nor_the_hash(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "img").mkdir()
    first = _config("folder:img")
    session = _config(f"folder:{tmp_path / 'img'}", out="elsewhere", resume=True, overwrite=True,
                      allow_data_change=True)
    assert _written(tmp_path / "a", first) == _written(tmp_path / "b", session)
    assert config_sha256(first) == config_sha256(session)
    assert config_sha256(_config("folder:img", seed=1)) != config_sha256(first)  # a setting does change it

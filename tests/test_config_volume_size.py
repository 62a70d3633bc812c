"""A config file's 2D sample side (``image_size``, ``cache_size``) on a ``--sample volume`` run: refused in one
line naming the file's key, as ``--image-size`` is on the command line (it was dropped without a word),
unless it is the value the run has anyway (what sslkit's own config files write for every run)."""

from __future__ import annotations

import pytest

from sslkit import config
from sslkit.run_record import write_config_toml
from tests.test_volume_config_errors import SIZES, VOLUME, _one_line, nii  # noqa: F401 (nii: the fixture)


@pytest.mark.parametrize("name,text,said", [
    ("c.toml", "image_size = 32\n", "image_size = 32 sets"),
    ("c.yaml", "image_size: 32\n", "image_size = 32 sets"),
    ("c.yaml", "cache_size: 64\n", "cache_size = 64 sets"),
    ("c.toml", "image_size = 32\ncache_size = 64\n", "image_size = 32, cache_size = 64 set"),
])
def test_a_config_files_2d_side_on_a_volume_run_is_one_line(cli, nii, tmp_path, name, text, said):  # noqa: F811
    file = tmp_path / name
    file.write_text(text)
    keys = " and ".join(line.split(":")[0].split("=")[0].strip() for line in text.splitlines())
    want = f"error: {file}: {said} {SIZES}: drop {keys}"
    result = cli("pretrain", "--config", file, "--data", f"nifti:{nii}", "--out", tmp_path / "r", *VOLUME)
    assert _one_line(result) == want
    assert not (tmp_path / "r").exists()
    result = cli("pretrain", "--print-config", "--config", file, "--data", f"nifti:{nii}", *VOLUME)
    assert _one_line(result) == want


def test_sslkits_own_config_files_of_a_volume_run_load_back_and_slabs_keep_the_side(nii, tmp_path):  # noqa: F811
    """``--print-config`` and a run's ``config.toml`` write ``image_size = 224`` for every run: both load
    back for the volume run they were written for; a slab run takes the file's side."""
    given = {"task": "simclr", "data": f"nifti:{nii}", "out": str(tmp_path / "r"), "max_steps": 1,
             "backbone": "monai:resnet10", "source_options": {"sample": "volume", "volume_size": "8,8,8"}}
    printed = tmp_path / "printed.toml"
    printed.write_text(config.print_config(given))
    assert "\nimage_size = 224\n" in printed.read_text()
    cfg = config.resolve({"out": str(tmp_path / "r2")}, str(printed))
    assert (cfg.image_size, cfg.cache_size, cfg.source_options["sample"]) == (224, None, "volume")
    run = tmp_path / "run"
    run.mkdir()
    assert write_config_toml(run, config.resolve(given).to_dict())[0] is None
    cfg = config.resolve({"out": str(tmp_path / "r3")}, str(run / "config.toml"))
    assert (cfg.image_size, cfg.source_options["volume_size"]) == (224, "8,8,8")
    slabs = tmp_path / "slabs.toml"
    slabs.write_text("image_size = 32\ncache_size = 64\n")
    cfg = config.resolve({**given, "backbone": "timm:resnet10t", "source_options": {"sample": "slab:3"}}, str(slabs))
    assert (cfg.image_size, cfg.cache_size) == (32, 64)

"""Out-of-range values of --backbone-opt, --augment-opt, --task-opt, --seed and config settings:
each is one line on stderr, exit code 2, refused before any data is decoded (the data here are
files that are not images: decoding them would fail with another message) and before the run
folder is made. Formerly each was a traceback, a failure at step 1, or a run that trained silently."""

from __future__ import annotations

import pytest

from tests.test_cli_errors import _assert_user_error, _pretrain


CNN = ("--backbone", "timm:resnet10t")


@pytest.fixture(scope="module")
def not_images(tmp_path_factory):
    bad = tmp_path_factory.mktemp("not-images")
    for i in range(3):
        (bad / f"{i}.png").write_bytes(b"not a png at all")
    return f"folder:{bad}"


def _refused(cli, data, tmp_path, args, line):
    proc = _pretrain(*args, "--data", data, out=tmp_path / "r", run=cli)
    _assert_user_error(proc)
    assert proc.stderr.strip() == f"error: {line}"
    assert not (tmp_path / "r").exists()


SET = "sslkit sets it"
RATE = "must be a number in [0, 1), got"


@pytest.mark.parametrize("task, opt, line", [
    ("simclr", "drop_rate=abc", f"--backbone-opt drop_rate {RATE} 'abc'"),
    ("simclr", "drop_path_rate=5", f"--backbone-opt drop_path_rate {RATE} 5"),
    ("simclr", "drop_rate=-1", f"--backbone-opt drop_rate {RATE} -1"),
    ("simclr", "drop_rate=1", f"--backbone-opt drop_rate {RATE} 1"),
    ("simclr", "num_classes=5", f"--backbone-opt num_classes: {SET} (0: the encoder's features, no classifier); "
                                "remove it (eval fits classifiers on the features)"),
    ("simclr", "pretrained=true", f"--backbone-opt pretrained: {SET} (false: weights are never downloaded); "
                                  "start from weights with --init (e.g. --init timm:MODEL.TAG)"),
    ("simclr", "in_chans=5", f"--backbone-opt in_chans: {SET} from the data's channels; "
                             "give --channels 1 or 3 instead"),
    ("simclr", "image_size=64", f"--backbone-opt image_size: {SET} from --image-size; give --image-size instead"),
    ("simclr", "foo=1", "cannot build timm:resnet10t for 1x32x32 input with foo=1: "
                        "ResNet.__init__() got an unexpected keyword argument 'foo'"),
    ("mae", "patch_size=0", "--backbone-opt patch_size must be an integer >= 1, got 0"),
    ("mae", "depth=-2", "--backbone-opt depth must be an integer >= 1, got -2"),
    ("mae", "img_size=64", f"--backbone-opt img_size: {SET} (from --image-size); give --image-size instead"),
    ("mae", "patch_size=64", "--image-size 32 is not a multiple of timm:vit_tiny_patch16_224's patch size 64; "
                             "use --image-size 64, or another patch_size"),
    ("mae", "patch_size=12", "--image-size 32 is not a multiple of timm:vit_tiny_patch16_224's patch size 12; "
                             "use --image-size 24 or 36, or another patch_size"),
])
def test_bad_backbone_options(cli, not_images, tmp_path, task, opt, line):
    backbone = CNN if task == "simclr" else ()
    _refused(cli, not_images, tmp_path, ("--task", task, *backbone, "--channels", "1", "--backbone-opt", opt), line)


PAIR = "must be two area fractions low,high with 0 < low <= high <= 1, got"
PROB = "must be a probability in [0, 1], got"


@pytest.mark.parametrize("opt, line", [
    ("scale=0.5", f"scale {PAIR} 0.5"),
    ("scale=0.9,0.1", f"scale {PAIR} 0.9,0.1"),
    ("scale=0.1,0.5,0.9", f"scale {PAIR} 0.1,0.5,0.9"),
    ("scale=0,0", f"scale {PAIR} 0.0,0.0"),
    ("cutout_scale=2,3", f"cutout_scale {PAIR} 2.0,3.0"),
    ("size=0", "size is set by --image-size (a task's smaller crops follow it)"),  # any size
    ("size=-5", "size is set by --image-size (a task's smaller crops follow it)"),
    ("vflip_p=2", f"vflip_p {PROB} 2.0"),
    ("vflip_p=-1", f"vflip_p {PROB} -1.0"),
    ("blur_p=nan", f"blur_p {PROB} nan"),
    ("noise_std=-1", "noise_std must be two numbers low,high with 0 <= low <= high, got -1.0"),
    ("jitter=-1", "jitter must be a number >= 0, got -1.0"),
    ("hue=5", "hue must be a number in [0, 0.5], got 5.0"),
    ("rotate_degrees=inf", "rotate_degrees must be a number of degrees in [0, 180], got inf"),
    ("saturation=-1", "saturation must be a number >= 0 (or unset: as jitter), got -1.0"),
])
def test_bad_augment_options(cli, not_images, tmp_path, opt, line):
    _refused(cli, not_images, tmp_path, ("--task", "simclr", *CNN, "--augment-opt", opt), f"--augment-opt: {line}")


@pytest.mark.parametrize("task, args, line", [
    ("rotation", ("--augment-opt", "rotate_p=1", "--augment-opt", "rotate_degrees=180"),
     "rotation predicts 90-degree turns; --augment-opt rotate_degrees=180 would make its labels ambiguous "
     "(free rotations, rotate_p, below 45 degrees are fine)"),
    ("dino", ("--task-opt", "local_crops=2", "--task-opt", "local_size=32"),
     "dino's local crops must be smaller than the global ones: --task-opt local_size=32 is not below --image-size 32"),
    ("dino", ("--augment-opt", "scale=0.4,1"),
     "dino: --augment-opt scale would give the global and local crops one scale; use --task-opt "
     "global_scale_min=... and local_scale_max=..."),
])
def test_views_that_would_undo_a_task(cli, not_images, tmp_path, task, args, line):
    """A free rotation of up to 180 degrees under rotation's 90-degree labels, and dino "local" crops as
    large as the global ones (or given the global crops' scale), used to train without a word."""
    _refused(cli, not_images, tmp_path, ("--task", task, *CNN, "--image-size", "32", *args), line)


@pytest.mark.parametrize("task, opt, line", [
    ("simclr", "proj_dim=-5", "proj_hidden_dim and proj_dim must be >= 1, got 2048 and -5"),
    ("simclr", "proj_dim=0", "proj_hidden_dim and proj_dim must be >= 1, got 2048 and 0"),
    ("simclr", "temperature=inf", "temperature must be a finite number > 0, got inf"),
    ("simclr", "temperature=nan", "temperature must be a finite number > 0, got nan"),
    ("moco", "proj_dim=-1", "proj_dim must be >= 1, got -1"),
    ("moco", "temperature=inf", "temperature must be a finite number > 0, got inf"),
    ("barlowtwins", "lambd=nan", "lambd must be a finite number >= 0, got nan"),
    ("vicreg", "mu=nan", "lambd, mu and nu must be finite numbers >= 0, got 25.0, nan, 1.0"),
    ("denoising", "noise_std=inf", "noise_std must be a finite number >= 0, got inf"),
    ("dino", "teacher_temp=nan", "student_temp, teacher_temp and warmup_teacher_temp must be finite numbers > 0, "
                                 "got 0.1, nan, 0.04"),
    ("inpainting", "rec_weight=nan", "rec_weight must be a finite number > 0 and adv_weight >= 0, got nan and 0.0"),
    ("vae", "beta=inf", "beta must be a finite number >= 0, got inf"),
    ("jigsaw", "permutation_seed=-1", "permutation_seed must be >= 0, got -1"),
    ("mae", "decoder_dim=-8", "decoder_dim must be >= 1, got -8"),
    ("simmim", "visible_weight=nan", "visible_weight must be a finite number >= 0, got nan"),
])
def test_bad_task_options(cli, not_images, tmp_path, task, opt, line):
    backbone = CNN if task not in ("mae", "simmim") else ()
    _refused(cli, not_images, tmp_path, ("--task", task, *backbone, "--task-opt", opt), f"task {task!r}: {line}")


@pytest.mark.parametrize("seed", ["-1", "4294967296", "99999999999999999999"])
def test_seed_out_of_range(cli, not_images, tmp_path, seed):
    proc = _pretrain("--task", "simclr", *CNN, "--seed", seed, "--data", not_images, out=tmp_path / "r", run=cli)
    _assert_user_error(proc, f"Invalid value for '--seed': {seed} is not in the range 0<=x<=4294967295.")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("setting, line", [
    ("momentum = 5", "momentum must be a number in [0, 1), got 5.0"),
    ("momentum = -0.1", "momentum must be a number in [0, 1), got -0.1"),
    ("seed = -1", "seed must be an integer in [0, 4294967295], got -1"),
    ("seed = 4294967296", "seed must be an integer in [0, 4294967295], got 4294967296"),
])
def test_config_file_settings_out_of_range(cli, not_images, tmp_path, setting, line):
    file = tmp_path / "c.toml"
    file.write_text(setting + "\n")
    _refused(cli, not_images, tmp_path, ("--task", "simclr", *CNN, "--config", file), f"{file}: {line}")


def test_config_file_backbone_and_augment_tables(cli, not_images, tmp_path):
    file = tmp_path / "c.toml"
    file.write_text("[backbone_options]\nin_chans = 5\n")
    _refused(cli, not_images, tmp_path, ("--task", "simclr", *CNN, "--config", file),
             f"--backbone-opt in_chans: {SET} from the data's channels; give --channels 1 or 3 instead")
    file.write_text("[augment_options]\nhue = 0.9\n")
    _refused(cli, not_images, tmp_path, ("--task", "simclr", *CNN, "--config", file),
             "--augment-opt: hue must be a number in [0, 0.5], got 0.9")


def test_an_empty_init_and_an_image_too_small_for_mae(cli, not_images, tmp_path):
    """`--init ''` used to be dropped silently (a run from random init); MAE on one patch token
    had no visible token and failed at step 1 with a NaN loss and advice to lower the LR."""
    _refused(cli, not_images, tmp_path, ("--task", "simclr", *CNN, "--init", ""),
             "command line: init must be weights to start from, not empty, got ''")
    _refused(cli, not_images, tmp_path, ("--task", "mae", "--image-size", "8"),
             "task 'mae' cannot run here: MAE at --image-size 8 with 8-px patches has 1 patch token(s), fewer than "
             "4: use --image-size 16 or more, or a smaller --backbone-opt patch_size")

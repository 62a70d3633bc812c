"""``Task.embedding``: a task's preferred embedding, recorded as the backbone options that
give it, so every consumer of the run (embed, eval, export) embeds the same way."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from sslkit.engine.setup import with_task_embedding
from sslkit.registry import create_backbone
from sslkit.run import RunConfig, load_run


VIT = ["--backbone", "timm:vit_tiny_patch16_224", "--backbone-opt", "patch_size=8", "--backbone-opt", "depth=2"]
MEAN = {"global_pool": "avg", "fc_norm": False}


def _mae(cli, data, out, *extra):
    result = cli("pretrain", "--task", "mae", "--data", f"folder:{data}", "--out", out, *VIT, "--image-size", "32",
                 "--batch-size", "8", "--max-steps", "1", "--quiet", *extra)
    assert result.exit_code == 0, result.output
    return out


def test_mae_run_embeds_and_exports_the_mean_of_its_normed_patch_tokens(rgb_folder, tmp_path, cli):
    run = _mae(cli, rgb_folder, tmp_path / "r")
    info = json.loads((run / "run.json").read_text())
    assert info["backbone_options"] == {"patch_size": 8, "depth": 2, **MEAN}
    assert info["config"]["backbone_options"] == info["backbone_options"]  # what a resume rebuilds
    encoder = load_run(run).build_encoder()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        tokens = encoder.model.forward_features(x)  # (B, 1 + 16, D), after the final norm
        want = tokens[:, 1:].mean(1)
        torch.testing.assert_close(encoder(x), want)
        assert not torch.allclose(want, tokens[:, 0], atol=1e-3)
    assert cli("export", run, "--out", tmp_path / "e.onnx").exit_code == 0  # takes normalised pixels, as the encoder
    got = ort.InferenceSession(str(tmp_path / "e.onnx")).run(["embedding"], {"pixels": x.numpy()})[0]
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4)


def test_the_users_backbone_option_wins_over_the_tasks_embedding(rgb_folder, tmp_path, cli):
    run = _mae(cli, rgb_folder, tmp_path / "r", "--backbone-opt", "global_pool=token")
    assert json.loads((run / "run.json").read_text())["backbone_options"] == {"patch_size": 8, "depth": 2,
                                                                             "global_pool": "token"}
    encoder = load_run(run).build_encoder()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), encoder.model.forward_features(x)[:, 0])


def test_the_embedding_options_change_no_parameter_and_only_vits_offer_them():
    """The same seed draws the same weights with or without the options (so a run's random
    baseline and its --init loading are unchanged); a CNN offers no patch mean."""
    torch.manual_seed(0)
    token = create_backbone("timm:vit_tiny_patch16_224", in_chans=3, image_size=32, patch_size=8, depth=2)
    torch.manual_seed(0)
    mean = create_backbone("timm:vit_tiny_patch16_224", in_chans=3, image_size=32, patch_size=8, depth=2, **MEAN)
    a, b = token.state_dict(), mean.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert token.embedding_options("patch_mean") == MEAN
    assert mean.embedding_options("patch_mean") is None  # already so
    assert token.embedding_options("something else") is None
    assert create_backbone("timm:resnet10t", in_chans=3, image_size=32).embedding_options("patch_mean") is None


def test_a_resume_and_a_task_without_a_preference_keep_the_options_they_have():
    probe = create_backbone("timm:vit_tiny_patch16_224", in_chans=3, image_size=32, patch_size=8, depth=2)
    cfg = RunConfig(task="mae", data="folder:x", out="r", backbone_options={"patch_size": 8, "depth": 2})
    assert with_task_embedding(cfg, probe).backbone_options == {"patch_size": 8, "depth": 2, **MEAN}
    resumed = dataclasses.replace(cfg, resume=True)  # a run from before: its run.json's options stand
    assert with_task_embedding(resumed, probe) is resumed
    simclr = dataclasses.replace(cfg, task="simclr")
    assert with_task_embedding(simclr, probe) is simclr

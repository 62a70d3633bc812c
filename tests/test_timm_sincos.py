"""``--backbone-opt pos_embed=sincos``: a timm ViT with MAE's fixed 2-D sine-cosine position
embeddings, kept through training, the random baseline and the exports."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from timm.layers import build_sincos2d_pos_embed

from sslkit.optim import param_groups
from sslkit.registry import create_backbone
from sslkit.run import load_run


OPTS = {"patch_size": 8, "depth": 2}


def test_the_table_is_filled_in_frozen_and_left_by_the_optimizer():
    torch.manual_seed(0)
    learned = create_backbone("timm:vit_tiny_patch16_224", in_chans=3, image_size=32, **OPTS)
    torch.manual_seed(0)
    fixed = create_backbone("timm:vit_tiny_patch16_224", in_chans=3, image_size=32, pos_embed="sincos", **OPTS)
    pe = fixed.model.pos_embed
    assert pe.shape == (1, 1 + 16, 192) and not pe.requires_grad
    assert torch.equal(pe[0, 0], torch.zeros(192))  # the class token's position
    torch.testing.assert_close(pe[0, 1:], build_sincos2d_pos_embed([4, 4], 192))
    assert pe[0, 1:].abs().max() == pytest.approx(1.0, abs=1e-3) and not torch.equal(pe[0, 1], pe[0, 2])
    # every other weight is the one the same seed draws without the option (a fair random baseline)
    a, b = learned.state_dict(), fixed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if k != "model.pos_embed")
    grouped = {id(p) for g in param_groups(fixed, 0.05) for p in g["params"]}
    assert id(pe) not in grouped and id(fixed.model.patch_embed.proj.weight) in grouped


def test_mae_keeps_the_table_and_timm_loads_the_export(rgb_folder, tmp_path, cli):
    run = tmp_path / "r"
    result = cli("pretrain", "--task", "mae", "--data", f"folder:{rgb_folder}", "--out", run,
                 "--backbone", "timm:vit_tiny_patch16_224", "--backbone-opt", "patch_size=8",
                 "--backbone-opt", "depth=2", "--backbone-opt", "pos_embed=sincos", "--image-size", "32",
                 "--batch-size", "8", "--max-steps", "3", "--base-lr", "0.1", "--quiet")
    assert result.exit_code == 0, result.output
    assert json.loads((run / "run.json").read_text())["backbone_options"]["pos_embed"] == "sincos"
    trained = load_file(str(run / "encoder.safetensors"))
    table = build_sincos2d_pos_embed([4, 4], 192)
    assert torch.equal(trained["model.pos_embed"][0, 1:], table)  # three steps at a large LR moved nothing
    assert not torch.equal(trained["model.blocks.0.attn.qkv.weight"],
                           load_run(run).build_encoder(False).state_dict()["model.blocks.0.attn.qkv.weight"])

    out = tmp_path / "e.safetensors"
    assert cli("export", run, "--format", "safetensors", "--out", out).exit_code == 0
    with safe_open(str(out), "pt") as f:
        header = json.loads(f.metadata()["timm_create_model"])
    assert header["pos_embed"] == "learn"  # what timm takes; the table's values are in the weights
    model = timm.create_model(num_classes=0, pretrained=True, pretrained_cfg_overlay=dict(file=str(out)),
                              **header).eval()
    encoder = load_run(run).build_encoder().eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), encoder(x))


def test_a_cnn_is_refused_in_one_line(rgb_folder, tmp_path, cli):
    result = cli("pretrain", "--task", "simclr", "--data", f"folder:{rgb_folder}", "--out", tmp_path / "r",
                 "--backbone", "timm:resnet10t", "--backbone-opt", "pos_embed=sincos", "--max-steps", "1", "--quiet")
    assert result.exit_code == 2
    assert "pos_embed" in result.output and "Traceback" not in result.output

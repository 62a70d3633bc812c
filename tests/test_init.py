"""--init: weights from a file, a run, the Hugging Face cache or a timm tag; key mapping and adaptation.

Every weights file is built here from a randomly initialised model (no download).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from sslkit.errors import UsageError
from sslkit.init import load_init
from sslkit.registry import create_backbone
from tests.conftest import make_images, run_sslkit

TINY_VIT = dict(depth=2, embed_dim=24, num_heads=2)  # a dinov2-shaped ViT, small enough for a test


def _vit(in_chans: int = 3, size: int = 28, seed: int = 0, name: str = "vit_small_patch14_dinov2"):
    torch.manual_seed(seed)
    return create_backbone(f"timm:{name}", in_chans=in_chans, image_size=size, **TINY_VIT).eval()


def _random_like(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Every float tensor of ``module``'s state dict replaced by random values (so copies are visible)."""
    g = torch.Generator().manual_seed(seed)
    out = {k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
           for k, v in module.state_dict().items()}
    return {k: v.abs() + 0.5 if k.endswith("running_var") else v for k, v in out.items()}


def _assert_loaded(module: torch.nn.Module, expected: dict[str, torch.Tensor], skip=()):
    own = module.state_dict()
    for k, v in expected.items():
        if k not in skip:
            torch.testing.assert_close(own[k], v, rtol=0, atol=0, msg=k)


# --- layouts ---------------------------------------------------------------------------------
def test_timm_state_dict_with_prefix_and_head_loads_exactly(tmp_path):
    src = create_backbone("timm:resnet18", in_chans=3, image_size=32)
    weights = _random_like(src.model, 1)
    file = tmp_path / "r18.safetensors"
    save_file({**{f"module.backbone.{k}": v for k, v in weights.items()},
               "module.head.fc.weight": torch.zeros(10, 512)}, str(file))
    dst = create_backbone("timm:resnet18", in_chans=3, image_size=32)
    rec = load_init(str(file), dst)
    _assert_loaded(dst.model, weights)
    assert rec["layout"] == "timm" and rec["prefix_removed"] == "module.backbone."
    assert rec["missing"] == [] and rec["unexpected"] == ["module.head.fc.weight"] and rec["adapted"] == []
    assert rec["source"] == "r18.safetensors" and len(rec["sha256"]) == 64
    assert str(tmp_path) not in json.dumps(rec)  # no local path in the record


def test_torchvision_resnet18_pth_loads_into_timm_resnet18(tmp_path):
    import torchvision

    torch.manual_seed(3)
    tv = torchvision.models.resnet18(num_classes=7)
    with torch.no_grad():
        for m in tv.modules():  # non-trivial running stats, so BatchNorm buffers are compared too
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    file = tmp_path / "tv.pth"
    torch.save(tv.state_dict(), file)
    dst = create_backbone("timm:resnet18", in_chans=3, image_size=32)
    rec = load_init(str(file), dst)
    _assert_loaded(dst.model, {k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")})
    assert sorted(rec["unexpected"]) == ["fc.bias", "fc.weight"] and rec["missing"] == []
    x = torch.randn(2, 3, 64, 64)
    tv.fc = torch.nn.Identity()
    torch.testing.assert_close(dst.eval()(x), tv.eval()(x), rtol=1e-5, atol=1e-5)


def _hf_dinov2(timm_sd: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """The Hugging Face ``Dinov2Model`` key names of a timm dinov2 state dict (written out by hand)."""
    hf = {"embeddings.cls_token": timm_sd["cls_token"], "embeddings.position_embeddings": timm_sd["pos_embed"],
          "embeddings.mask_token": torch.zeros(1, timm_sd["cls_token"].shape[-1]),
          "embeddings.patch_embeddings.projection.weight": timm_sd["patch_embed.proj.weight"],
          "embeddings.patch_embeddings.projection.bias": timm_sd["patch_embed.proj.bias"],
          "layernorm.weight": timm_sd["norm.weight"], "layernorm.bias": timm_sd["norm.bias"]}
    for i in range(TINY_VIT["depth"]):
        b, e = f"blocks.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            q, k, v = timm_sd[f"{b}attn.qkv.{kind}"].chunk(3, 0)
            hf.update({f"{e}attention.attention.query.{kind}": q, f"{e}attention.attention.key.{kind}": k,
                       f"{e}attention.attention.value.{kind}": v,
                       f"{e}attention.output.dense.{kind}": timm_sd[f"{b}attn.proj.{kind}"],
                       f"{e}norm1.{kind}": timm_sd[f"{b}norm1.{kind}"], f"{e}norm2.{kind}": timm_sd[f"{b}norm2.{kind}"],
                       f"{e}mlp.fc1.{kind}": timm_sd[f"{b}mlp.fc1.{kind}"],
                       f"{e}mlp.fc2.{kind}": timm_sd[f"{b}mlp.fc2.{kind}"]})
        hf[f"{e}layer_scale1.lambda1"] = timm_sd[f"{b}ls1.gamma"]
        hf[f"{e}layer_scale2.lambda1"] = timm_sd[f"{b}ls2.gamma"]
    return {prefix + k: v.clone() for k, v in hf.items()}


def test_hf_dinov2_layout_maps_to_timm_and_gives_the_same_embeddings(tmp_path):
    ref = _vit(seed=0)
    weights = _random_like(ref.model, 2)
    ref.model.load_state_dict(weights)
    file = tmp_path / "model.safetensors"
    save_file(_hf_dinov2(weights, prefix="dinov2."), str(file))  # as Dinov2ForImageClassification saves it
    dst = _vit(seed=5)
    rec = load_init(str(file), dst)
    assert rec["layout"] == "hf-vit" and rec["missing"] == [] and rec["unexpected"] == ["mask_token"]
    _assert_loaded(dst.model, weights)
    x = torch.randn(2, 3, 28, 28)
    torch.testing.assert_close(dst(x), ref(x), rtol=0, atol=0)


def test_hf_vit_names_layernorm_before_intermediate_output(tmp_path):
    ref = create_backbone("timm:vit_tiny_patch16_224", in_chans=3, image_size=32, depth=1).eval()
    w = _random_like(ref.model, 4)
    hf = {"vit.embeddings.cls_token": w["cls_token"], "vit.embeddings.position_embeddings": w["pos_embed"],
          "vit.embeddings.patch_embeddings.projection.weight": w["patch_embed.proj.weight"],
          "vit.embeddings.patch_embeddings.projection.bias": w["patch_embed.proj.bias"],
          "vit.layernorm.weight": w["norm.weight"], "vit.layernorm.bias": w["norm.bias"],
          "vit.pooler.dense.weight": torch.zeros(192, 192), "classifier.weight": torch.zeros(2, 192)}
    for kind in ("weight", "bias"):
        q, k, v = w[f"blocks.0.attn.qkv.{kind}"].chunk(3, 0)
        e = "vit.encoder.layer.0."
        hf.update({f"{e}attention.attention.query.{kind}": q, f"{e}attention.attention.key.{kind}": k,
                   f"{e}attention.attention.value.{kind}": v,
                   f"{e}attention.output.dense.{kind}": w[f"blocks.0.attn.proj.{kind}"],
                   f"{e}layernorm_before.{kind}": w[f"blocks.0.norm1.{kind}"],
                   f"{e}layernorm_after.{kind}": w[f"blocks.0.norm2.{kind}"],
                   f"{e}intermediate.dense.{kind}": w[f"blocks.0.mlp.fc1.{kind}"],
                   f"{e}output.dense.{kind}": w[f"blocks.0.mlp.fc2.{kind}"]})
    torch.save({"state_dict": {k: v.clone() for k, v in hf.items()}}, tmp_path / "pytorch_model.bin")
    dst = create_backbone("timm:vit_tiny_patch16_224", in_chans=3, image_size=32, depth=1)
    rec = load_init(str(tmp_path / "pytorch_model.bin"), dst)
    _assert_loaded(dst.model, w)
    assert rec["layout"] == "hf-vit" and rec["missing"] == []
    assert sorted(rec["unexpected"]) == ["classifier.weight", "pooler.dense.weight"]


# --- adaptation --------------------------------------------------------------------------------
def test_three_to_one_channel_stem_sums_and_keeps_grey_responses(tmp_path):
    src = create_backbone("timm:resnet18", in_chans=3, image_size=32).eval()  # timm's init: sane magnitudes
    save_file(src.model.state_dict(), str(tmp_path / "rgb.safetensors"))
    dst = create_backbone("timm:resnet18", in_chans=1, image_size=32).eval()
    rec = load_init(str(tmp_path / "rgb.safetensors"), dst)
    assert rec["adapted"] == ["conv1.weight: input channels 3 -> 1 (summed)"]
    torch.testing.assert_close(dst.model.conv1.weight, src.model.conv1.weight.sum(1, keepdim=True))
    grey = torch.rand(2, 1, 48, 48)
    torch.testing.assert_close(dst(grey), src(grey.repeat(1, 3, 1, 1)), rtol=1e-4, atol=1e-4)


def test_one_to_three_channel_patch_embed_repeats_over_three(tmp_path):
    src = _vit(in_chans=1, seed=0)
    src.model.load_state_dict(_random_like(src.model, 7))
    save_file(src.model.state_dict(), str(tmp_path / "grey.safetensors"))
    dst = _vit(in_chans=3, seed=1)
    rec = load_init(str(tmp_path / "grey.safetensors"), dst)
    assert rec["adapted"] == ["patch_embed.proj.weight: input channels 1 -> 3 (repeated, scaled by 1/3)"]
    torch.testing.assert_close(dst.model.patch_embed.proj.weight, src.model.patch_embed.proj.weight.repeat(1, 3, 1, 1) / 3)
    grey = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(dst(grey.repeat(1, 3, 1, 1)), src(grey), rtol=1e-4, atol=1e-4)


def test_position_embeddings_are_resampled_to_the_run_grid(tmp_path):
    src = _vit(size=70, seed=0)  # 5 x 5 patches of 14 px
    w = _random_like(src.model, 8)
    save_file(w, str(tmp_path / "vit.safetensors"))
    dst = _vit(size=112, seed=1)  # 8 x 8
    rec = load_init(str(tmp_path / "vit.safetensors"), dst)
    assert rec["adapted"] == ["pos_embed: 5x5 -> 8x8 patch grid (bicubic)"]
    pe, d = w["pos_embed"], w["pos_embed"].shape[-1]
    grid = pe[:, 1:].reshape(1, 5, 5, d).permute(0, 3, 1, 2)  # row-major patches -> (1, D, 5, 5)
    want = F.interpolate(grid, size=(8, 8), mode="bicubic", antialias=True, align_corners=False)
    want = torch.cat([pe[:, :1], want.permute(0, 2, 3, 1).reshape(1, 64, d)], 1)
    torch.testing.assert_close(dst.model.pos_embed, want, rtol=1e-5, atol=1e-5)
    # the class token's position is kept as it was; every other tensor is copied unchanged
    _assert_loaded(dst.model, w, skip=("pos_embed",))


def test_class_position_dropped_for_a_backbone_without_class_token(tmp_path):
    src = _vit(size=28, seed=0)
    w = _random_like(src.model, 9)
    save_file(w, str(tmp_path / "vit.safetensors"))
    dst = create_backbone("timm:vit_small_patch14_dinov2", in_chans=3, image_size=28, class_token=False,
                          global_pool="avg", **TINY_VIT)
    rec = load_init(str(tmp_path / "vit.safetensors"), dst)
    torch.testing.assert_close(dst.model.pos_embed, w["pos_embed"][:, 1:])
    assert rec["adapted"] == ["pos_embed: 1 prefix position(s) dropped (the backbone has no such token)"]
    assert "cls_token" in rec["unexpected"]


@pytest.mark.parametrize("layout", ["hf", "meta"])
def test_dinov2_with_registers_folds_the_class_position_into_its_token_as_timm_does(tmp_path, layout):
    """DINOv2 with registers embeds a class position; timm's model embeds none for its prefix tokens
    (no_embed_class): timm's own converter adds it to cls_token, and so must we (the audit's case)."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    name = "vit_small_patch14_reg4_dinov2"
    sd = _random_like(_vit(name=name).model, 3)
    g = torch.Generator().manual_seed(4)
    meta = {k: v for k, v in sd.items() if k not in ("reg_token", "pos_embed")}
    meta |= {"register_tokens": sd["reg_token"], "pos_embed": torch.randn(1, 1 + 4, 24, generator=g),
             "mask_token": torch.zeros(1, 24)}  # Meta's names: 1 class + 2x2 patch positions
    ref = _vit(name=name, seed=1)
    ref.model.load_state_dict(checkpoint_filter_fn(dict(meta), ref.model))
    weights = meta
    if layout == "hf":
        weights = _hf_dinov2({**meta, "reg_token": meta["register_tokens"]})
        weights["embeddings.register_tokens"] = meta["register_tokens"]
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp_path / "w.safetensors"))
    dst = _vit(name=name, seed=2)
    rec = load_init(str(tmp_path / "w.safetensors"), dst)
    assert rec["adapted"] == ["pos_embed: 1 prefix position(s) (class) added to their tokens "
                              "(the backbone embeds none for them)"] and rec["missing"] == []
    _assert_loaded(dst.model, ref.model.state_dict())
    x = torch.randn(2, 3, 28, 28)
    torch.testing.assert_close(dst(x), ref(x), rtol=0, atol=0)


def test_patch_size_14_weights_resampled_for_patch_16(tmp_path):
    src = _vit(size=28, seed=0)
    save_file(_random_like(src.model, 10), str(tmp_path / "p14.safetensors"))
    dst = create_backbone("timm:vit_small_patch16_224", in_chans=3, image_size=32, **TINY_VIT)
    rec = load_init(str(tmp_path / "p14.safetensors"), dst)
    assert "patch_embed.proj.weight: patch size 14x14 -> 16x16 (kernel resampled)" in rec["adapted"]
    assert dst.model.patch_embed.proj.weight.shape[-1] == 16


# --- what cannot be loaded ------------------------------------------------------------------------
def test_weights_of_another_architecture_are_one_line_errors(tmp_path):
    save_file(create_backbone("timm:resnet18", in_chans=3, image_size=32).model.state_dict(),
              str(tmp_path / "r18.safetensors"))
    # 180: resnet34's tensors without its 36 BatchNorm step counters, which are never counted missing either
    with pytest.raises(UsageError, match="does not fit timm:resnet34: 80 of its 180 tensors are not in the weights"):
        load_init(str(tmp_path / "r18.safetensors"), create_backbone("timm:resnet34", in_chans=3, image_size=32))
    with pytest.raises(UsageError, match=r"conv1.weight \(64, 3, 7, 7\) vs \(64, 3, 3, 3\)"):
        load_init(str(tmp_path / "r18.safetensors"),
                  create_backbone("timm:resnet18", in_chans=3, image_size=32, cifar_stem=True))


def test_weights_with_blocks_the_backbone_lacks_are_refused(tmp_path, cli):
    """The audit's case: torchvision ResNet-34 weights loaded into a ResNet-18 with exit 0 and 98
    tensors 'unused' (layer1.2, layer2.2, ...: the blocks of the deeper model, silently dropped)."""
    import torchvision

    torch.manual_seed(0)
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "r34_tv.pth")
    dst = create_backbone("timm:resnet18", in_chans=3, image_size=32)
    before = {k: v.clone() for k, v in dst.model.state_dict().items()}
    # 96: the 98 unused tensors but fc.weight and fc.bias, a head that is never counted
    with pytest.raises(UsageError, match=r"^--init r34_tv.pth does not fit timm:resnet18: 96 of its tensors are in "
                                         r"blocks timm:resnet18 lacks: layer1.2, layer2.2, layer2.3, layer3.2 "
                                         r"\(\+4 more\); --backbone names the architecture the weights were made for$"):
        load_init(str(tmp_path / "r34_tv.pth"), dst)
    _assert_loaded(dst.model, before)  # nothing was loaded
    # a ViT of one block more than the run's
    deeper = create_backbone("timm:vit_small_patch14_dinov2", in_chans=3, image_size=28, **{**TINY_VIT, "depth": 3})
    save_file(deeper.model.state_dict(), str(tmp_path / "vit3.safetensors"))
    with pytest.raises(UsageError, match=r"tensors are in blocks timm:vit_small_patch14_dinov2 lacks: blocks\.2;"):
        load_init(str(tmp_path / "vit3.safetensors"), _vit())
    # through the CLI: one line, exit 2, no run
    data = make_images(tmp_path / "imgs", n_per_class=2, size=32, channels=1)
    result = cli("pretrain", "--task", "simclr", "--data", f"folder:{data}", "--out", tmp_path / "r34",
                 "--init", tmp_path / "r34_tv.pth", "--max-steps", 1, "--image-size", 32, "--batch-size", 4,
                 "--no-cache", "--quiet")
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "in blocks timm:resnet18 lacks: layer1.2" in lines[0], \
        result.output
    assert not (tmp_path / "r34").exists()


def test_only_numbered_blocks_beside_the_backbones_own_count_as_another_architecture():
    from sslkit.init.adapt import extra_blocks

    target = {k: torch.zeros(1) for k in ("blocks.0.norm1.weight", "blocks.1.norm1.weight", "blocks.1.attn.qkv.weight",
                                          "head.norm.weight", "stem.0.weight", "norm.weight", "cls_token")}
    unexpected = ["blocks.2.norm1.weight", "blocks.2.mlp.fc1.weight",  # a block the backbone lacks
                  "stem.3.weight",  # a stem of more layers
                  "blocks.10.norm1.weight",
                  "head.0.weight", "fc.weight", "classifier.bias",  # heads, even under the backbone's own head
                  "mask_token", "pooler.dense.weight", "teacher.blocks.0.norm1.weight",  # not the backbone's parts
                  "blocks.1.attn.relative_position_index",  # a buffer an older version kept, in an existing block
                  "blocks.1.ls1.gamma", "norm.extra.0.weight"]  # named parts; norm has no numbered children
    assert extra_blocks(unexpected, target) == ["blocks.2", "stem.3", "blocks.10"]
    assert extra_blocks(["fc.weight", "fc.bias"], target) == []


def test_pickled_code_is_never_run_and_blocked_modules_are_refused(tmp_path, capsys):
    """A pickle that calls a function to build an object: the function becomes an inert placeholder
    (the tensors load, the call never happens, the record names it); ``os``/``sys`` globals are refused."""
    import os

    class Calls:
        def __init__(self, fn):
            self.fn = fn

        def __reduce__(self):
            return (self.fn, ("echo ran",))

    w = _random_like(create_backbone("timm:resnet18", in_chans=3, image_size=32).model, 21)
    torch.save({"state_dict": w, "obj": Calls(print)}, tmp_path / "calls.pth")
    dst = create_backbone("timm:resnet18", in_chans=3, image_size=32)
    rec = load_init(str(tmp_path / "calls.pth"), dst)
    assert "ran" not in capsys.readouterr().out
    _assert_loaded(dst.model, w)
    assert rec["not_read"] == ["builtins.print"] and rec["summary"].endswith("pickled objects not read: builtins.print")
    torch.save({"state_dict": w, "obj": Calls(os.system)}, tmp_path / "evil.pth")
    refused = r"evil.pth: cannot be read as plain weights .* \(Trying to load unsupported GLOBAL (os|posix).system"
    with pytest.raises(UsageError, match=refused) as err:
        load_init(str(tmp_path / "evil.pth"), create_backbone("timm:resnet18", in_chans=3, image_size=32))
    assert "weights_only` set to `False`" not in str(err.value)  # torch's preface is not passed on as advice
    assert "ran" not in capsys.readouterr().out
    (tmp_path / "damaged.pth").write_bytes(b"PK")  # a truncated file: the reason, not the preface
    with pytest.raises(UsageError, match=r"damaged.pth: cannot be read .* \(Unsupported operand"):
        load_init(str(tmp_path / "damaged.pth"), create_backbone("timm:resnet18", in_chans=3, image_size=32))
    (tmp_path / "notes.bin").write_text("hello, not weights\n")  # said '(101)'
    with pytest.raises(UsageError, match=r"notes.bin: .*\(not a torch weights file \(byte \d+ is no pickle opcode\)\)"):
        load_init(str(tmp_path / "notes.bin"), create_backbone("timm:resnet18", in_chans=3, image_size=32))
    import pickle
    import warnings

    with open(tmp_path / "p4.bin", "wb") as f:  # a plain pickle of protocol 4: refused without torch's warning
        pickle.dump({"fc.weight": [1.0]}, f, protocol=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UsageError, match=r"p4.bin: cannot be read"):
            load_init(str(tmp_path / "p4.bin"), create_backbone("timm:resnet18", in_chans=3, image_size=32))


# --- Hugging Face cache and timm tags ---------------------------------------------------------------
def _fake_hub(cache: Path, repo: str, tensors: dict[str, torch.Tensor], rev: str = "0123456789abcdef") -> Path:
    folder = cache / f"models--{repo.replace('/', '--')}"
    snap = folder / "snapshots" / rev
    snap.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(rev)
    save_file(tensors, str(snap / "model.safetensors"))
    return snap / "model.safetensors"


def test_hub_id_and_timm_tag_resolve_from_the_local_cache_only(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = create_backbone("timm:resnet18", in_chans=3, image_size=32)
    w = _random_like(src.model, 11)
    _fake_hub(cache, "acme/xray-r18", w)
    _fake_hub(cache, "timm/resnet18.a1_in1k", w)
    for init in ("acme/xray-r18", "hf-hub:acme/xray-r18", "timm:resnet18.a1_in1k"):
        dst = create_backbone("timm:resnet18", in_chans=1, image_size=32)
        rec = load_init(init, dst)
        assert rec["source"] in ("acme/xray-r18", "timm:resnet18.a1_in1k")
        assert rec["kind"] == ("timm" if init.startswith("timm:") else "hub")
        _assert_loaded(dst.model, w, skip=("conv1.weight",))
    with pytest.raises(UsageError, match="not in the local Hugging Face cache.*--allow-download"):
        load_init("acme/other", create_backbone("timm:resnet18", in_chans=3, image_size=32))
    with pytest.raises(UsageError, match="not in the local Hugging Face cache"):
        load_init("timm:resnet18.tv_in1k", create_backbone("timm:resnet18", in_chans=3, image_size=32))
    # a tag timm does not know (timm itself raises a RuntimeError): one line naming the tags it has
    with pytest.raises(UsageError, match=r"unknown timm pretrained tag 'resnet18.a1_in1kk' \(did you mean "
                                         r"'resnet18.a1_in1k'\?\); choose from: .*resnet18.tv_in1k"):
        load_init("timm:resnet18.a1_in1kk", create_backbone("timm:resnet18", in_chans=3, image_size=32))


# --- through pretrain and export ------------------------------------------------------------------
def test_allow_download_fetches_into_the_cache_or_fails_in_one_line(tmp_path, monkeypatch):
    """``--allow-download``: a file the Hub gives lands in the cache and loads like a cached one;
    a Hub that cannot be reached (offline here) is one line naming the repo and the files tried."""
    import huggingface_hub

    from sslkit.init.resolve import HUB_FILES, resolve_init

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    # no network: the real download fails at once (the client read HF_HUB_OFFLINE when it was imported)
    from huggingface_hub import constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UsageError) as err:
        resolve_init("acme/nowhere", allow_download=True)
    msg = str(err.value)
    assert msg.startswith(f"--init acme/nowhere: cannot download acme/nowhere ({', '.join(HUB_FILES)}): ")
    assert "\n" not in msg
    w = _random_like(create_backbone("timm:resnet18", in_chans=3, image_size=32).model, 12)
    asked = []

    def download(repo, name, revision=None, cache_dir=None):  # what the Hub client does: into the cache
        asked.append((repo, name, revision, cache_dir))
        if name != "model.safetensors":
            raise FileNotFoundError(name)
        return str(_fake_hub(Path(cache_dir), repo, w, rev="fedcba9876543210"))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    found = resolve_init("acme/xray-r18@v2", allow_download=True)
    assert (found.kind, found.name) == ("hub", "acme/xray-r18@v2")
    assert asked == [("acme/xray-r18", "model.safetensors", "v2", str(cache))]
    dst = create_backbone("timm:resnet18", in_chans=3, image_size=32)
    load_init(str(found.path), dst)
    _assert_loaded(dst.model, w)
    with pytest.raises(UsageError, match=r"--init: unknown timm model 'resnet1800' \(did you mean 'resnet18"):
        resolve_init("timm:resnet1800.a1_in1k")


def test_a_failed_download_says_why_in_a_few_words(tmp_path, monkeypatch):
    """The audit's line ended mid-sentence ("... make sure your Internet connection"): the Hub
    client's paragraph, cut at 200 characters. Now the reason itself, in one line."""
    import types

    import huggingface_hub
    from huggingface_hub import constants as hub_constants
    from huggingface_hub import errors as hub_errors

    from sslkit.init import hub
    from sslkit.init.resolve import resolve_init

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UsageError) as err:
        resolve_init("acme/other", allow_download=True)
    assert str(err.value).endswith("): HF_HUB_OFFLINE is set, so nothing is downloaded; unset it, or give a local "
                                   "weights file"), str(err.value)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "check_reachable", lambda what: None)  # no network here: the Hub "answered"
    monkeypatch.setattr(hub, "check_file", lambda repo, revision, name: None)
    asked = []
    response = types.SimpleNamespace(headers={}, request=None)
    for raised, why in [(hub_errors.LocalEntryNotFoundError("An error happened while trying to locate the file on "
                                                            "the Hub and we cannot find the requested files in the "
                                                            "local cache. Please check your connection and try "
                                                            "again or make sure your Internet connection is on."),
                         "the Hugging Face Hub (https://"),
                        (hub_errors.RepositoryNotFoundError("404 Client Error. " * 20, response=response),
                         "no such repository on the Hub (a private one needs a login: hf auth login)"),
                        (hub_errors.RevisionNotFoundError("404", response=response),
                         "the repository has no such revision")]:
        def download(repo, name, revision=None, cache_dir=None, **kw):
            asked.append(name)
            raise raised

        monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
        asked.clear()
        with pytest.raises(UsageError) as err:
            resolve_init("acme/other", allow_download=True)
        msg = str(err.value)
        assert msg.startswith("--init acme/other: cannot download acme/other (model.safetensors, ") and why in msg
        assert "\n" not in msg and "Internet connection" not in msg and "404 Client" not in msg, msg
        assert asked == ["model.safetensors"]  # no other file name can succeed: one try


def test_pretrain_init_is_recorded_in_run_json_and_export_metadata(tmp_path):
    from sslkit.engine import pretrain
    from sslkit.export import export_metadata
    from sslkit.run import RunConfig, load_run

    data = make_images(tmp_path / "imgs", n_per_class=4, size=32, channels=1)
    src = create_backbone("timm:resnet18", in_chans=3, image_size=32)
    w = _random_like(src.model, 12)
    save_file(w, str(tmp_path / "imagenet.safetensors"))
    cfg = RunConfig(task="simclr", data=str(data), out=str(tmp_path / "run"), backbone="timm:resnet18",
                    init=str(tmp_path / "imagenet.safetensors"), epochs=1, batch_size=8, image_size=32,
                    max_steps=1, lr=1e-12, progress=False, cache_dir="")
    pretrain(cfg)
    run = load_run(tmp_path / "run")
    rec = run.info["init"]
    assert rec["source"] == "imagenet.safetensors" and rec["adapted"] == ["conv1.weight: input channels 3 -> 1 (summed)"]
    import hashlib

    assert rec["sha256"] == hashlib.sha256((tmp_path / "imagenet.safetensors").read_bytes()).hexdigest()
    enc = run.build_encoder().model.state_dict()  # one step at lr 1e-12: still the init weights
    torch.testing.assert_close(enc["layer4.1.conv2.weight"], w["layer4.1.conv2.weight"], rtol=1e-5, atol=1e-6)
    meta = export_metadata(run)
    assert meta["init"]["sha256"] == rec["sha256"] and meta["init"]["source"] == "imagenet.safetensors"
    assert str(tmp_path) not in json.dumps(meta["init"])


def test_cli_init_that_does_not_fit_fails_before_decoding(tmp_path, cli, monkeypatch):
    data = make_images(tmp_path / "imgs", n_per_class=2, size=32, channels=1)
    save_file(create_backbone("timm:resnet18", in_chans=3, image_size=32).model.state_dict(),
              str(tmp_path / "r18.safetensors"))
    cache = tmp_path / "cache"
    args = ["pretrain", "--task", "simclr", "--data", data, "--out", tmp_path / "run", "--backbone", "timm:resnet34",
            "--image-size", 32, "--quiet"]
    proc = run_sslkit(*args, "--init", tmp_path / "r18.safetensors", env={"SSLKIT_CACHE_DIR": str(cache)})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "does not fit timm:resnet34" in lines[0], proc.stderr
    assert lines[0].endswith("; --backbone names the architecture the weights were made for")
    monkeypatch.setenv("SSLKIT_CACHE_DIR", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    (tmp_path / "damaged.pth").write_bytes(b"PK")
    for init, message in [(tmp_path / "nope.safetensors", "does not exist"),
                          ("acme/none", "not in the local Hugging Face cache"),
                          ("timm:resnet34.a1_in1kk", "unknown timm pretrained tag 'resnet34.a1_in1kk' (did you mean"),
                          (tmp_path / "damaged.pth", "(Unsupported operand")]:
        result = cli(*args, "--init", init)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.output
    assert not (tmp_path / "run").exists()  # nothing written, nothing decoded into the cache
    assert not cache.exists() or not any(p.is_file() and "headers" not in p.parts for p in cache.rglob("*"))


def test_torchvision_vit_layout_maps_to_timm_and_gives_the_same_embeddings(tmp_path):
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(13)
    tv = VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=3, hidden_dim=192, mlp_dim=768)
    with torch.no_grad():  # non-zero position embeddings and biases, so a misplaced tensor shows
        for p in tv.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    torch.save(tv.state_dict(), tmp_path / "vit_tv.pth")
    dst = create_backbone("timm:vit_tiny_patch16_224", in_chans=3, image_size=32, depth=2).eval()
    rec = load_init(str(tmp_path / "vit_tv.pth"), dst)
    assert rec["layout"] == "torchvision-vit" and rec["missing"] == []
    assert sorted(rec["unexpected"]) == ["heads.head.bias", "heads.head.weight"]
    tv.heads = torch.nn.Identity()  # torchvision's ViT then returns the normed class token, as timm's does
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(dst(x), tv.eval()(x), rtol=1e-4, atol=1e-4)


# --- continued pretraining: task parts, encoder LR scale, warm-up freeze ------------------------------------
def _tiny_mae_config(images: Path, out: Path, **kw):
    from sslkit.run import RunConfig

    base = dict(task="mae", data=f"folder:{images}", out=str(out), backbone="timm:vit_tiny_patch16_224",
                backbone_options={"depth": 2, "patch_size": 4}, image_size=16, batch_size=8, epochs=2, seed=1,
                deterministic=True, progress=False, warmup_epochs=0.5, cache_dir="")
    return RunConfig(**{**base, **kw})


@pytest.fixture
def mae_init(tmp_path):
    """24 images and a finished 2-step MAE run on them (the --init of the tests below)."""
    from sslkit.engine import pretrain

    images = make_images(tmp_path / "img", n_per_class=12, size=20)
    pretrain(_tiny_mae_config(images, tmp_path / "first", max_steps=2))
    return images, tmp_path / "first"


def test_group_lr_scale_and_freeze_steps_leave_the_encoder_still_then_slow():
    from sslkit.optim import build_optimizer, set_lr

    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"encoder": torch.nn.Linear(4, 4), "head": torch.nn.Linear(4, 1)})
    opt = build_optimizer(model, "sgd", 0.5, 0.0, momentum=0.0, lr_scale=lambda n: 0.1 if n.startswith("encoder.") else 1.0,
                          freeze_steps=lambda n: 2 if n.startswith("encoder.") else 0)
    x = torch.randn(8, 4)
    for step in range(3):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        set_lr(opt, 0.5, step)
        assert sorted(g["lr"] for g in opt.param_groups) == ([0.0, 0.0, 0.5, 0.5] if step < 2 else [0.05, 0.05, 0.5, 0.5])
        model["head"](model["encoder"](x)).square().mean().backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
        for k, v in model.state_dict().items():  # plain SGD: w - lr * scale * g (0 while frozen)
            lr = 0.5 if k.startswith("head") else (0.0 if step < 2 else 0.05)
            torch.testing.assert_close(v, before[k] - lr * grads[k], rtol=0, atol=1e-7)


def test_layer_decay_scales_by_depth_from_the_top():
    from sslkit.init.continued import lr_scale_fn

    fn = lr_scale_fn({"encoder_lr_scale": 0.1, "layer_decay": 0.5, "depth": 2})
    assert fn("decoder_pred.weight") == 1.0
    assert fn("encoder.model.norm.weight") == pytest.approx(0.1)
    assert fn("encoder.model.blocks.1.attn.qkv.weight") == pytest.approx(0.05)
    assert fn("encoder.model.blocks.0.mlp.fc1.weight") == pytest.approx(0.025)
    assert fn("encoder.model.patch_embed.proj.weight") == fn("encoder.model.cls_token") == pytest.approx(0.0125)


def test_init_run_dir_restores_the_decoder_and_records_the_continue_settings(mae_init, tmp_path):
    from sslkit.checkpoint import list_checkpoints
    from sslkit.engine import build
    from sslkit.run import RunConfig  # noqa: F401

    images, first = mae_init
    s = build(_tiny_mae_config(images, tmp_path / "cont", init=str(first)), torch.device("cpu"))
    rec = s.info["init"]
    assert rec["task_parts"]["restored"] == ["decoder_blocks", "decoder_embed", "decoder_norm", "decoder_pred",
                                             "mask_token"] and rec["task_parts"]["from"] == "first/checkpoints/step-00000002"
    from safetensors.torch import load_file

    saved = load_file(str(list_checkpoints(first / "checkpoints")[-1] / "model.safetensors"))
    own = s.task.state_dict()
    for k, v in saved.items():  # the whole task as the first run left it, encoder and decoder
        torch.testing.assert_close(own[k], v, rtol=0, atol=0, msg=k)
    cont = rec["continue"]
    assert cont["encoder_lr_scale"] == 0.1 and cont["freeze_steps"] == 0 and cont["layer_decay"] is None
    enc = {id(p) for p in s.task.encoder.parameters()}
    for g in s.optimizer.param_groups:  # encoder groups at 0.1 x, the decoder at the full LR
        assert g["lr_scale"] == (0.1 if all(id(p) in enc for p in g["params"]) else 1.0)
    assert str(tmp_path) not in json.dumps(rec)

    # the encoder file alone: no task parts, so the encoder waits 10 % of the run (6 steps -> 1) for the decoder
    s2 = build(_tiny_mae_config(images, tmp_path / "cont2", init=str(first / "encoder.safetensors")),
               torch.device("cpu"))
    assert s2.info["init"]["task_parts"]["restored"] == [] and s2.info["init"]["continue"]["freeze_steps"] == 1


def test_task_parts_of_another_task_are_not_restored(mae_init, tmp_path):
    from sslkit.init.continued import restore_task_parts
    from sslkit.registry import create_task
    from sslkit.spec import InputSpec

    _, first = mae_init
    backbone = create_backbone("timm:vit_tiny_patch16_224", in_chans=3, image_size=16, depth=2, patch_size=4)
    task = create_task("simmim", backbone, InputSpec(3, 16, (0.5,) * 3, (0.25,) * 3))
    rec = restore_task_parts(str(first), task, "simmim")
    assert rec["restored"] == [] and "the init run's task is 'mae'" in rec["skipped"][0]


def test_resume_across_the_freeze_boundary_repeats_the_uninterrupted_run(mae_init, tmp_path):
    import csv
    import os
    import signal
    import threading
    import time

    from sslkit.engine import pretrain

    images, first = mae_init
    kw = dict(init=str(first / "encoder.safetensors"), init_freeze_steps=4, init_lr_scale=0.5)

    def rows(run: Path):
        with open(run / "metrics.csv", newline="") as f:
            return [(r["step"], r["loss"], r["lr"]) for r in csv.DictReader(f)]

    ref = pretrain(_tiny_mae_config(images, tmp_path / "ref", **kw))
    assert ref["steps"] == 6
    out = tmp_path / "run"

    def watch() -> None:  # SIGINT once the first step is logged: the run stops inside the freeze
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if (out / "metrics.csv").exists() and len((out / "metrics.csv").read_text().splitlines()) > 1:
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    part = pretrain(_tiny_mae_config(images, out, **kw))
    watcher.join()
    assert part["interrupted"] and 1 <= part["steps"] < 6, part
    pretrain(_tiny_mae_config(images, out, resume=True, **kw))
    assert rows(out) == rows(tmp_path / "ref")
    from safetensors.torch import load_file

    a, b = load_file(str(out / "encoder.safetensors")), load_file(str(tmp_path / "ref" / "encoder.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    info = json.loads((out / "run.json").read_text())
    assert info["init"]["continue"]["freeze_steps"] == 4 and info["config"]["init_lr_scale"] == 0.5


def test_continue_options_refused_without_init_or_out_of_range(tmp_path, cli):
    data = make_images(tmp_path / "imgs", n_per_class=2, size=20, channels=1)
    args = ["pretrain", "--task", "mae", "--data", data, "--out", tmp_path / "run", "--image-size", 16, "--quiet"]
    for extra, message in [(["--init-freeze-steps", 3], "applies to continued pretraining only; give --init"),
                           (["--init-lr-scale", 0.1], "applies to continued pretraining only"),
                           (["--init", tmp_path / "x.safetensors", "--init-lr-scale", 1.5], "0<x<=1"),
                           (["--init", tmp_path / "x.safetensors", "--layer-decay", 0], "0<x<=1")]:
        result = cli(*args, *extra)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.output
    assert not (tmp_path / "run").exists()


def test_init_from_a_default_run_continues_its_fitted_vit(tmp_path, cli):
    """A run that built mae's default ViT fitted to 16-px images (8-px patches, 6 blocks), given as
    --init without --backbone, is continued in that architecture: every tensor loads, nothing adapted."""
    images = make_images(tmp_path / "img", n_per_class=4, size=16)
    common = ("--task", "mae", "--data", f"folder:{images}", "--image-size", "16", "--batch-size", "4",
              "--max-steps", "1", "--epochs", "1", "--quiet")
    assert cli("pretrain", *common, "--out", tmp_path / "first").exit_code == 0
    result = cli("pretrain", *common, "--out", tmp_path / "cont", "--init", tmp_path / "first")
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "cont" / "run.json").read_text())
    options = info["config"]["backbone_options"]
    assert (options["patch_size"], options["depth"]) == (8, 6), options
    assert info["init"]["missing"] == [] and info["init"]["adapted"] == [], info["init"]


def test_continue_flags_the_run_cannot_use_are_refused_before_decoding(tmp_path, cli, monkeypatch):
    """--layer-decay on a CNN and an --init-freeze-steps not below --max-steps were refused only after
    the data was decoded (and the weights loaded); now before, in one line."""
    import timm
    from safetensors.torch import save_file

    from sslkit.data import prepare

    weights = tmp_path / "r10.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("resnet10t").state_dict().items()}, str(weights))
    data = make_images(tmp_path / "imgs", n_per_class=2, size=20)
    monkeypatch.setattr(prepare, "prepare", lambda *a, **k: pytest.fail("decoded before refusing"))
    args = ["pretrain", "--task", "simclr", "--backbone", "timm:resnet10t", "--data", data, "--out", tmp_path / "run",
            "--image-size", 16, "--quiet", "--no-cache", "--init", weights]
    for extra, message in [(["--layer-decay", 0.7, "--max-steps", 5], "--layer-decay needs a ViT backbone"),
                           (["--init-freeze-steps", 5, "--max-steps", 5],
                            "--init-freeze-steps 5 leaves the encoder frozen for the whole run of at most 5 steps")]:
        result = cli(*args, *extra)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.output
    assert not (tmp_path / "run" / "run.json").exists()


def test_init_from_the_run_directory_overwrite_replaces_is_refused(tmp_path, cli):
    """``--init RUN --out RUN --overwrite`` read the weights, then deleted them: the run recorded
    weights that no longer exist. Refused in one line, nothing deleted."""
    images = make_images(tmp_path / "img", n_per_class=4, size=16)
    common = ("--task", "simclr", "--backbone", "timm:resnet10t", "--data", f"folder:{images}", "--image-size", "16",
              "--batch-size", "4", "--max-steps", "1", "--quiet", "--no-cache")
    assert cli("pretrain", *common, "--out", tmp_path / "r").exit_code == 0
    before = sorted(p.name for p in (tmp_path / "r").iterdir())
    for init in (tmp_path / "r", tmp_path / "r" / "encoder.safetensors"):
        result = cli("pretrain", *common, "--out", tmp_path / "r", "--overwrite", "--init", init)
        assert result.exit_code == 2 and "is in the run directory --overwrite replaces" in result.stderr, result.output
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == before


def test_a_fixed_sincos_table_keeps_its_values_under_init(tmp_path):
    """``--backbone-opt pos_embed=sincos`` freezes a sine-cosine table; weights with a learned table
    loaded into it silently, leaving a frozen copy of the learned one. The run's own table stays, and
    the record says so; every other tensor loads."""
    import timm

    src = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=16, num_classes=0)
    with torch.no_grad():
        src.pos_embed.normal_()
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "learned.safetensors"))
    dst = create_backbone("timm:vit_tiny_patch16_224", in_chans=3, image_size=32, pos_embed="sincos", patch_size=16)
    table = dst.model.pos_embed.detach().clone()
    rec = load_init(str(tmp_path / "learned.safetensors"), dst)
    assert torch.equal(dst.model.pos_embed, table) and not dst.model.pos_embed.requires_grad
    assert torch.equal(dst.model.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    assert rec["kept"] == ["pos_embed"] and "kept the backbone's own fixed pos_embed" in rec["summary"]


def test_a_checkpoint_init_does_not_call_the_parts_it_restores_unused(mae_init, tmp_path):
    """``--init RUN/checkpoints/step-N`` reads the whole task: its decoder keys were listed as 'unused'
    on the line before the one that said they were restored."""
    from sslkit.checkpoint import list_checkpoints
    from sslkit.engine import build

    images, first = mae_init
    step = list_checkpoints(first / "checkpoints")[-1]
    s = build(_tiny_mae_config(images, tmp_path / "cont", init=str(step)), torch.device("cpu"))
    rec = s.info["init"]
    assert "decoder_pred" in rec["task_parts"]["restored"]
    assert not [k for k in rec["unexpected"] if k.split(".")[0] in rec["task_parts"]["restored"]], rec["unexpected"]
    assert "unused: none" in rec["summary"], rec["summary"]


def test_a_model_saved_whole_says_to_save_its_state_dict(tmp_path):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "whole.pth")  # torch.save(model): a pickled class, never run
    with pytest.raises(UsageError, match=r"holds no state dict of tensors \(.*torch\.save\(model\.state_dict\(\), FILE\)"):
        load_init(str(tmp_path / "whole.pth"), create_backbone("timm:resnet18", in_chans=3, image_size=32))

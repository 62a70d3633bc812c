"""Where ``--init`` weights come from beyond one file: a Hugging Face model folder, a model in
shards (folder and Hub cache), and training checkpoints of other frameworks (PyTorch Lightning's
``.ckpt``, as solo-learn and lightly write). Every file is built here; nothing is downloaded."""

from __future__ import annotations

import argparse
import hashlib
import json
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sslkit.errors import UsageError
from sslkit.init import load_init
from sslkit.init.resolve import resolve_init
from sslkit.registry import create_backbone
from tests.conftest import make_images
from tests.test_init import _assert_loaded, _fake_hub, _hf_dinov2, _random_like, _vit


def _dinov2_weights(seed: int = 2) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A reference timm ViT holding random weights, and those weights."""
    ref = _vit(seed=0)
    weights = _random_like(ref.model, seed)
    ref.model.load_state_dict(weights)
    return ref, weights


def _save_shards(folder: Path, state: dict[str, torch.Tensor], parts: int = 2) -> list[Path]:
    """``state`` as ``save_pretrained`` writes a large model: shards and ``model.safetensors.index.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(state)
    names = [f"model-{i + 1:05d}-of-{parts:05d}.safetensors" for i in range(parts)]
    weight_map = {}
    for i, name in enumerate(names):
        part = keys[i::parts]
        save_file({k: state[k].contiguous() for k in part}, str(folder / name))
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
         "weight_map": weight_map}))
    return [folder / n for n in names]


# --- a Hugging Face model folder ------------------------------------------------------------------
def test_a_hugging_face_model_folder_is_an_init(tmp_path):
    """``hf download ORG/NAME --local-dir rad-dino`` or a ``git clone`` gives a folder, not a cache entry."""
    ref, weights = _dinov2_weights()
    folder = tmp_path / "rad-dino"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "dinov2"}))
    save_file(_hf_dinov2(weights), str(folder / "model.safetensors"))
    dst = _vit(seed=5)
    rec = load_init(str(folder), dst)
    assert (rec["source"], rec["kind"], rec["layout"]) == ("rad-dino/model.safetensors", "file", "hf-vit")
    assert rec["missing"] == [] and rec["not_read"] == []
    x = torch.randn(2, 3, 28, 28)
    torch.testing.assert_close(dst(x), ref(x), rtol=0, atol=0)
    # the older format alone (pytorch_model.bin): the same weights
    (folder / "model.safetensors").unlink()
    torch.save(_hf_dinov2(weights), folder / "pytorch_model.bin")
    dst = _vit(seed=6)
    assert load_init(str(folder), dst)["source"] == "rad-dino/pytorch_model.bin"
    torch.testing.assert_close(dst(x), ref(x), rtol=0, atol=0)
    (folder / "pytorch_model.bin").unlink()
    with pytest.raises(UsageError, match=r"is a folder without encoder.safetensors or model.safetensors; .* or a "
                                         r"Hugging Face model folder$"):
        resolve_init(str(folder))


# --- shards ----------------------------------------------------------------------------------------
def test_a_sharded_model_loads_whole_from_a_folder(tmp_path):
    ref, weights = _dinov2_weights(seed=7)
    shards = _save_shards(tmp_path / "big", _hf_dinov2(weights), parts=3)
    dst = _vit(seed=5)
    rec = load_init(str(tmp_path / "big"), dst)
    assert rec["source"] == "big/model.safetensors.index.json" and rec["missing"] == []
    x = torch.randn(2, 3, 28, 28)
    torch.testing.assert_close(dst(x), ref(x), rtol=0, atol=0)
    # the record's sha256 is of the weights' bytes: the shards one after another, in name order
    assert rec["sha256"] == hashlib.sha256(b"".join(p.read_bytes() for p in sorted(shards))).hexdigest()


def test_a_shard_index_that_cannot_be_used_is_one_line(tmp_path):
    _, weights = _dinov2_weights()
    hf = _hf_dinov2(weights)
    shards = _save_shards(tmp_path / "big", hf)
    index = tmp_path / "big" / "model.safetensors.index.json"
    shards[1].unlink()
    with pytest.raises(UsageError, match=r"^--init big/model.safetensors.index.json: 1 of the 2 shards that "
                                         r"model.safetensors.index.json names are missing \(first: "
                                         r"model-00002-of-00002.safetensors\)$"):
        load_init(str(tmp_path / "big"), _vit())
    # a crafted index cannot make sslkit read a file outside the model's folder
    save_file({"w": torch.zeros(1)}, str(tmp_path / "elsewhere.safetensors"))
    for crafted in ("../elsewhere.safetensors", str(tmp_path / "elsewhere.safetensors")):
        index.write_text(json.dumps({"weight_map": {"w": crafted}}))
        with pytest.raises(UsageError, match=r"index.json is not a shard index with a weight_map of file names beside "
                                             r"it$"):
            load_init(str(tmp_path / "big"), _vit())
    index.write_text("{not json")
    with pytest.raises(UsageError, match=r"index.json is not a shard index with a weight_map"):
        load_init(str(tmp_path / "big"), _vit())
    # two shards holding the same tensor: which one would win is not a guess sslkit makes
    save_file({k: hf[k] for k in list(hf)[:3]}, str(shards[1]))
    index.write_text(json.dumps({"weight_map": {**{k: shards[0].name for k in hf},
                                                **{k: shards[1].name for k in list(hf)[3:]}}}))
    save_file({k: v.contiguous() for k, v in hf.items()}, str(shards[0]))
    with pytest.raises(UsageError, match=r"model-00002-of-00002.safetensors repeats tensors of another shard"):
        load_init(str(tmp_path / "big"), _vit())


def test_a_sharded_model_in_the_hub_cache_needs_every_shard_cached(tmp_path, monkeypatch):
    import huggingface_hub

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ref, weights = _dinov2_weights(seed=8)
    hf = _hf_dinov2(weights)
    snap = _fake_hub(cache, "acme/xray-vit", {"x": torch.zeros(1)}).parent
    (snap / "model.safetensors").unlink()  # this repository is stored in shards only
    shards = _save_shards(snap, hf)
    dst = _vit(seed=5)
    rec = load_init("acme/xray-vit", dst)
    assert (rec["source"], rec["kind"]) == ("acme/xray-vit", "hub")
    x = torch.randn(2, 3, 28, 28)
    torch.testing.assert_close(dst(x), ref(x), rtol=0, atol=0)
    kept = shards[1].read_bytes()
    shards[1].unlink()
    with pytest.raises(UsageError, match=r"^--init acme/xray-vit: 1 of the 2 shards of acme/xray-vit are not in the "
                                         r"local Hugging Face cache \(first: model-00002-of-00002.safetensors\); "
                                         r"pass --allow-download to fetch them$"):
        resolve_init("acme/xray-vit")
    asked = []

    def download(repo, name, revision=None, cache_dir=None):  # the Hub client puts it beside the index
        asked.append(name)
        (Path(cache_dir) / f"models--{repo.replace('/', '--')}" / "snapshots" / snap.name / name).write_bytes(kept)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    dst = _vit(seed=6)
    load_init("acme/xray-vit", dst, allow_download=True)
    assert asked == ["model-00002-of-00002.safetensors"]  # only the missing shard is fetched
    torch.testing.assert_close(dst(x), ref(x), rtol=0, atol=0)


# --- training checkpoints of other frameworks -------------------------------------------------------
class _Config:  # a class of the training code that wrote the checkpoint (not importable at load time here)
    def __init__(self, **kw):
        self.__dict__.update(kw)


def _lightning_checkpoint(online: dict[str, torch.Tensor], momentum: dict[str, torch.Tensor]) -> dict:
    """What ``Trainer.save_checkpoint`` writes for a solo-learn BYOL module: the online and the momentum
    backbones and the heads in ``state_dict``, the training's settings as objects in ``hyper_parameters``."""
    state = OrderedDict({f"backbone.{k}": v for k, v in online.items()})
    state.update({f"momentum_backbone.{k}": v for k, v in momentum.items()})
    state.update({"projector.0.weight": torch.randn(64, 512), "classifier.weight": torch.randn(10, 512)})
    return {"epoch": 99, "global_step": 19500, "pytorch-lightning_version": "2.5.0", "state_dict": state,
            "loops": {"fit_loop": {"state_dict": {}}}, "callbacks": {"ModelCheckpoint": {"best_model_path": "/x"}},
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.3, "params": [0, 1]}]}],
            "lr_schedulers": [{"last_epoch": 99}],
            "hyper_parameters": {"cfg": argparse.Namespace(method="byol", backbone=_Config(name="resnet18"))}}


def test_a_lightning_checkpoint_gives_its_online_backbone_and_names_what_it_did_not_read(tmp_path, capsys):
    src = create_backbone("timm:resnet18", in_chans=3, image_size=32)
    online, momentum = _random_like(src.model, 31), _random_like(src.model, 32)
    torch.save(_lightning_checkpoint(online, momentum), tmp_path / "byol-ep99.ckpt")
    dst = create_backbone("timm:resnet18", in_chans=3, image_size=32)
    rec = load_init(str(tmp_path / "byol-ep99.ckpt"), dst)
    _assert_loaded(dst.model, online)
    assert rec["prefix_removed"] == "backbone." and rec["missing"] == []
    assert rec["not_read"] == ["argparse.Namespace", f"{__name__}._Config"]
    assert "pickled objects not read: argparse.Namespace, tests.test_init_sources._Config" in rec["summary"]
    assert "momentum_backbone.conv1.weight" in rec["unexpected"] and "classifier.weight" in rec["unexpected"]


def test_a_real_lightning_checkpoint_continues_in_pretrain(tmp_path, cli):
    """A checkpoint written by PyTorch Lightning itself (its hyper-parameters saved as the module's
    ``hparams``), given to ``sslkit pretrain --init``: the run starts from its backbone."""
    pl = pytest.importorskip("pytorch_lightning")

    class Module(pl.LightningModule):
        def __init__(self, cfg):
            super().__init__()
            self.save_hyperparameters({"cfg": cfg})
            self.backbone = create_backbone("timm:resnet18", in_chans=1, image_size=32).model

        def training_step(self, batch, _):
            return self.backbone(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    module = Module(argparse.Namespace(method="simclr", max_epochs=1))
    batches = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 1, 32, 32)), batch_size=2)
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", default_root_dir=str(tmp_path))
    trainer.fit(module, batches)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    data = make_images(tmp_path / "imgs", n_per_class=4, size=32, channels=1)
    out = tmp_path / "run"
    result = cli("pretrain", "--task", "simclr", "--data", data, "--out", out, "--backbone", "timm:resnet18",
                 "--init", tmp_path / "last.ckpt", "--image-size", 32, "--batch-size", 8, "--max-steps", 1,
                 "--lr", 1e-12, "--quiet")
    assert result.exit_code == 0, result.stderr
    rec = json.loads((out / "run.json").read_text())["init"]
    assert rec["source"] == "last.ckpt" and rec["prefix_removed"] == "backbone." and rec["missing"] == []
    assert "argparse.Namespace" in rec["not_read"]
    from sslkit.run import load_run

    enc = load_run(out).build_encoder().model.state_dict()  # one step at lr 1e-12: still the checkpoint's
    own = module.backbone.state_dict()
    torch.testing.assert_close(enc["layer4.1.conv2.weight"], own["layer4.1.conv2.weight"], rtol=1e-5, atol=1e-6)


# --- the architecture the weights name, when no --backbone is given ----------------------------------
def test_the_backbone_follows_the_weights_when_none_is_named(tmp_path, monkeypatch):
    from sslkit.config_backbone import hf_backbone, init_backbone

    assert init_backbone("timm:vit_small_patch14_dinov2.lvd142m") == ("timm:vit_small_patch14_dinov2", {})
    dinov2 = {"model_type": "dinov2", "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
              "patch_size": 14, "mlp_ratio": 4}
    assert hf_backbone(dinov2) == ("timm:vit_base_patch14_dinov2", {})
    assert hf_backbone({**dinov2, "model_type": "dinov2_with_registers", "num_register_tokens": 4}) == \
        ("timm:vit_base_patch14_reg4_dinov2", {})
    assert hf_backbone({**dinov2, "hidden_size": 1536, "num_hidden_layers": 40, "num_attention_heads": 24,
                        "use_swiglu_ffn": True}) == ("timm:vit_giant_patch14_dinov2", {})
    assert hf_backbone({**dinov2, "num_hidden_layers": 6}) == \
        ("timm:vit_base_patch14_dinov2", {"embed_dim": 768, "depth": 6, "num_heads": 12})
    vit = {"model_type": "vit", "hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6,
           "patch_size": 16, "intermediate_size": 1536}
    assert hf_backbone(vit) == ("timm:vit_small_patch16_224", {})
    assert hf_backbone({**vit, "patch_size": 32}) == ("timm:vit_small_patch32_224", {})
    for other in ({**dinov2, "patch_size": 16}, {**dinov2, "model_type": "swin"}, {"model_type": "dinov2"}, {}):
        assert hf_backbone(other) is None  # not a layout sslkit maps: the task's default, then --init's check
    # the same from a config.json in the Hub cache
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snap = _fake_hub(cache, "acme/xray-dino", {"x": torch.zeros(1)}).parent
    (snap / "config.json").write_text(json.dumps(dinov2))
    assert init_backbone("acme/xray-dino") == init_backbone("hf-hub:acme/xray-dino") == \
        ("timm:vit_base_patch14_dinov2", {})
    assert init_backbone("acme/not-cached") is None and init_backbone(str(tmp_path / "w.pth")) is None


def test_pretrain_builds_the_architecture_of_a_model_folder_or_a_checkpoint(tmp_path, cli):
    """``--init rad-dino`` with no ``--backbone``: the ViT its config.json describes (not the task's
    ResNet default), loaded from its weights; ``--init RUN/checkpoints/step-N``: that run's backbone."""
    from sslkit.run import load_run

    ref, weights = _dinov2_weights(seed=9)
    folder = tmp_path / "rad-dino"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "dinov2", "hidden_size": 24, "num_hidden_layers": 2, "num_attention_heads": 2,
        "patch_size": 14, "mlp_ratio": 4}))
    save_file(_hf_dinov2(weights), str(folder / "model.safetensors"))
    data = make_images(tmp_path / "imgs", n_per_class=4, size=28, channels=3)
    args = ("--task", "simclr", "--data", data, "--image-size", 28, "--batch-size", 8, "--max-steps", 1,
            "--lr", 1e-12, "--quiet")
    result = cli("pretrain", *args, "--out", tmp_path / "run", "--init", folder)
    assert result.exit_code == 0, result.stderr
    run = load_run(tmp_path / "run")
    assert run.info["config"]["backbone"] == "timm:vit_small_patch14_dinov2"
    assert run.info["config"]["backbone_options"] == {"embed_dim": 24, "depth": 2, "num_heads": 2}
    enc = run.build_encoder().model.state_dict()  # one step at lr 1e-12: the folder's weights
    torch.testing.assert_close(enc["blocks.1.attn.qkv.weight"], weights["blocks.1.attn.qkv.weight"],
                               rtol=1e-5, atol=1e-6)
    step = sorted((tmp_path / "run" / "checkpoints").iterdir())[-1]
    result = cli("pretrain", *args, "--out", tmp_path / "again", "--init", step)
    assert result.exit_code == 0, result.stderr
    again = load_run(tmp_path / "again").info["config"]
    assert (again["backbone"], again["backbone_options"]) == (run.info["config"]["backbone"],
                                                              run.info["config"]["backbone_options"])

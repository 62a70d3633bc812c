"""lightly 1.6.0's recipes around sslkit's backbone, optimizer and schedule, saved as sslkit run dirs.

One function per method builds lightly's recipe as its documented example
(``examples/pytorch/<method>.py``) writes it: lightly's transform, heads, loss and momentum
(EMA) updates. :func:`train` wraps any of them in what the sslkit run of the same task used
(read from its ``run.json``): the backbone (built by sslkit, same architecture and options),
the optimizer (AdamW, weight decay, betas, and the peak LR of ``base_lr x batch / 256``), the
warm-up + cosine schedule, batch size, image size, the data's mean / std, and the number of
steps. The encoder is saved as ``encoder.safetensors`` with the sslkit run's ``run.json``, so
sslkit's own scoring code (``knn_correctness``, ``probe``) reads it as any run.

Where the examples differ from a small CPU run, and what was done:

* their optimizer (SGD / Adam / AdamW at the example's LR) is replaced by sslkit's run's;
* their input size (224 or 32) is the run's; Gaussian blur is off (lightly's own CIFAR-10
  benchmark and sslkit both turn it off below 96 px); DINO's local crops are
  ``round(size x 96 / 224)`` px, as sslkit scales them;
* their per-epoch schedules (10 epochs) run per step over the run: the momentum
  ``cosine_schedule(step, steps, 0.996, 1)``, DINO's frozen last layer for the first tenth;
* the data loader runs in the training process (``num_workers=0``) so that the process
  CPU time is the whole cost, as on the sslkit side.

``simclr`` keeps ``benchmarks/cifar10.py``'s settings (lightly's CIFAR-10 benchmark
transform, colour-jitter strength 0.5; projection hidden width a parameter: the example's
512, cifar10.py's 2048).
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import acc_se, bits, cpu_seconds, knn_correct_string, paired_se  # noqa: E402

LIGHTLY_VERSION = "1.6.0"


@dataclass
class Recipe:
    """A method: ``transform`` (PIL image -> list of views), ``model`` (every module the
    optimizer trains, momentum copies frozen inside it), ``loss(views, step)``, and hooks
    ``after_backward(step)`` / ``before_step(step)`` (EMA updates) where the example has them."""

    transform: Callable
    model: nn.Module
    loss: Callable[[list, int], torch.Tensor]
    before_step: Callable[[int], None] | None = None
    after_backward: Callable[[int], None] | None = None


def _norm(mean, std) -> dict:
    return {"mean": list(mean), "std": list(std)}


def _frozen(module: nn.Module, copy_it: bool = True) -> nn.Module:
    """A momentum (target) network: a copy of ``module`` (or ``module`` itself) without gradients."""
    from lightly.models.utils import deactivate_requires_grad

    twin = copy.deepcopy(module) if copy_it else module
    deactivate_requires_grad(twin)
    return twin


def _momentum_hook(pairs: list[tuple[nn.Module, nn.Module]], steps: int) -> Callable[[int], None]:
    """The examples' ``update_momentum(online, target, cosine_schedule(t, T, 0.996, 1))``
    before each step's forward pass; the schedule by step of this run."""
    from lightly.models.utils import update_momentum
    from lightly.utils.scheduler import cosine_schedule

    def hook(step: int) -> None:
        m = cosine_schedule(step, steps, 0.996, 1)
        for online, target in pairs:
            update_momentum(online, target, m=m)
    return hook


def _byol_views(size: int, norm: dict):
    from lightly.transforms import BYOLTransform, BYOLView1Transform, BYOLView2Transform

    return BYOLTransform(view_1_transform=BYOLView1Transform(input_size=size, gaussian_blur=0.0, normalize=norm),
                         view_2_transform=BYOLView2Transform(input_size=size, gaussian_blur=0.0, normalize=norm))


def simclr(backbone: nn.Module, size: int, norm: dict, steps: int, hidden: int = 512) -> Recipe:
    """``SimCLRTransform`` (CIFAR-10 benchmark: jitter strength 0.5, no blur), ``SimCLRProjectionHead``
    (features, ``hidden``, 128), ``NTXentLoss`` (temperature 0.5)."""
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead
    from lightly.transforms import SimCLRTransform

    head = SimCLRProjectionHead(backbone.num_features, hidden, 128)
    criterion = NTXentLoss(temperature=0.5)
    transform = SimCLRTransform(input_size=size, cj_prob=0.8, cj_strength=0.5, min_scale=0.08, random_gray_scale=0.2,
                                gaussian_blur=0.0, normalize=norm)
    return Recipe(transform, nn.ModuleDict({"backbone": backbone, "head": head}),
                  lambda v, s: criterion(head(backbone(v[0])), head(backbone(v[1]))))


def moco(backbone: nn.Module, size: int, norm: dict, steps: int) -> Recipe:
    """MoCo v2: ``MoCoV2Transform``, ``MoCoProjectionHead(512, 512, 128)``, momentum copies,
    ``NTXentLoss(memory_bank_size=(4096, 128))`` (query vs the key of the other view)."""
    from lightly.loss import NTXentLoss
    from lightly.models.modules import MoCoProjectionHead
    from lightly.transforms import MoCoV2Transform

    head = MoCoProjectionHead(backbone.num_features, 512, 128)
    key_backbone, key_head = _frozen(backbone), _frozen(head)
    criterion = NTXentLoss(memory_bank_size=(4096, 128))

    def loss(v, step):
        return criterion(head(backbone(v[0])), key_head(key_backbone(v[1])).detach())
    return Recipe(MoCoV2Transform(input_size=size, gaussian_blur=0.0, normalize=norm),
                  nn.ModuleDict({"backbone": backbone, "head": head, "kb": key_backbone, "kh": key_head}), loss,
                  before_step=_momentum_hook([(backbone, key_backbone), (head, key_head)], steps))


def byol(backbone: nn.Module, size: int, norm: dict, steps: int) -> Recipe:
    """``BYOLTransform`` (asymmetric views), ``BYOLProjectionHead(512, 1024, 256)``,
    ``BYOLPredictionHead(256, 1024, 256)``, ``NegativeCosineSimilarity``, symmetrised."""
    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead

    proj = BYOLProjectionHead(backbone.num_features, 1024, 256)
    pred = BYOLPredictionHead(256, 1024, 256)
    t_backbone, t_proj = _frozen(backbone), _frozen(proj)
    criterion = NegativeCosineSimilarity()

    def loss(v, step):
        p0, p1 = pred(proj(backbone(v[0]))), pred(proj(backbone(v[1])))
        z0, z1 = t_proj(t_backbone(v[0])).detach(), t_proj(t_backbone(v[1])).detach()
        return 0.5 * (criterion(p0, z1) + criterion(p1, z0))
    return Recipe(_byol_views(size, norm), nn.ModuleDict({"backbone": backbone, "proj": proj, "pred": pred,
                                                         "tb": t_backbone, "tp": t_proj}), loss,
                  before_step=_momentum_hook([(backbone, t_backbone), (proj, t_proj)], steps))


def barlowtwins(backbone: nn.Module, size: int, norm: dict, steps: int) -> Recipe:
    """``BYOLTransform`` views, ``BarlowTwinsProjectionHead(512, 2048, 2048)``, ``BarlowTwinsLoss``."""
    from lightly.loss import BarlowTwinsLoss
    from lightly.models.modules import BarlowTwinsProjectionHead

    head = BarlowTwinsProjectionHead(backbone.num_features, 2048, 2048)
    criterion = BarlowTwinsLoss()
    return Recipe(_byol_views(size, norm), nn.ModuleDict({"backbone": backbone, "head": head}),
                  lambda v, s: criterion(head(backbone(v[0])), head(backbone(v[1]))))


def vicreg(backbone: nn.Module, size: int, norm: dict, steps: int) -> Recipe:
    """``VICRegTransform``, ``VICRegProjectionHead(512, 2048, 2048, num_layers=2)``, ``VICRegLoss``."""
    from lightly.loss import VICRegLoss
    from lightly.models.modules.heads import VICRegProjectionHead
    from lightly.transforms import VICRegTransform

    head = VICRegProjectionHead(backbone.num_features, 2048, 2048, num_layers=2)
    criterion = VICRegLoss()
    return Recipe(VICRegTransform(input_size=size, gaussian_blur=0.0, normalize=norm),
                  nn.ModuleDict({"backbone": backbone, "head": head}),
                  lambda v, s: criterion(head(backbone(v[0])), head(backbone(v[1]))))


def dino(backbone: nn.Module, size: int, norm: dict, steps: int) -> Recipe:
    """``DINOTransform`` (2 global, 6 local crops), ``DINOProjectionHead(512, 512, 64, 2048,
    freeze_last_layer=1)``, teacher: a momentum copy of the backbone and a head of its own
    (as the example: built apart, then EMA-updated), ``DINOLoss(output_dim=2048)``."""
    from lightly.loss import DINOLoss
    from lightly.models.modules import DINOProjectionHead
    from lightly.transforms import DINOTransform

    head = DINOProjectionHead(backbone.num_features, 512, 64, 2048, freeze_last_layer=1)
    t_backbone, t_head = _frozen(backbone), _frozen(DINOProjectionHead(backbone.num_features, 512, 64, 2048), False)
    criterion = DINOLoss(output_dim=2048, warmup_teacher_temp_epochs=5)
    transform = DINOTransform(global_crop_size=size, local_crop_size=max(8, round(size * 96 / 224)),
                              gaussian_blur=(0.0, 0.0, 0.0), normalize=norm)
    frozen_until = max(1, steps // 10)  # the example: last layer frozen for epoch 0 of 10

    def loss(v, step):
        teacher = [t_head(t_backbone(x)) for x in v[:2]]
        student = [head(backbone(x)) for x in v]
        return criterion(teacher, student, epoch=0)
    return Recipe(transform, nn.ModuleDict({"backbone": backbone, "head": head, "tb": t_backbone, "th": t_head,
                                            "loss": criterion}), loss,
                  before_step=_momentum_hook([(backbone, t_backbone), (head, t_head)], steps),
                  after_backward=lambda step: head.cancel_last_layer_gradients(int(step >= frozen_until)))


def mae(backbone: nn.Module, size: int, norm: dict, steps: int) -> Recipe:
    """``MaskedVisionTransformerTIMM`` around the timm ViT, ``MAEDecoderTIMM`` (512 wide, 1 block,
    16 heads; deprecated in 1.6.0 for ``MaskedVisionTransformerDecoderTIMM``, the example
    ``mae_timm.py`` uses it), mask ratio 0.75, MSE on the masked patches, ``MAETransform``."""
    from lightly.models import utils
    from lightly.models.modules import MAEDecoderTIMM, MaskedVisionTransformerTIMM
    from lightly.transforms import MAETransform

    vit = backbone.model
    p = int(vit.patch_embed.patch_size[0])
    encoder = MaskedVisionTransformerTIMM(vit=vit)
    decoder = MAEDecoderTIMM(num_patches=vit.patch_embed.num_patches, patch_size=p, embed_dim=vit.embed_dim,
                             decoder_embed_dim=512, decoder_depth=1, decoder_num_heads=16, mlp_ratio=4.0,
                             proj_drop_rate=0.0, attn_drop_rate=0.0)
    seq = encoder.sequence_length
    criterion = nn.MSELoss()

    def loss(v, step):
        x = v[0]
        keep, masked = utils.random_token_mask(size=(x.shape[0], seq), mask_ratio=0.75, device=x.device)
        tokens = decoder.embed(encoder.encode(images=x, idx_keep=keep))
        full = utils.set_at_index(utils.repeat_token(decoder.mask_token, (x.shape[0], seq)), keep,
                                  tokens.type_as(decoder.mask_token))
        pred = decoder.predict(utils.get_at_index(decoder.decode(full), masked))
        return criterion(pred, utils.get_at_index(utils.patchify(x, p), masked - 1))
    return Recipe(MAETransform(input_size=size, normalize=norm),
                  nn.ModuleDict({"backbone": backbone, "encoder": encoder, "decoder": decoder}), loss)


def simmim(backbone: nn.Module, size: int, norm: dict, steps: int) -> Recipe:
    """``MaskedVisionTransformerTIMM`` (masked tokens replaced by its mask token), a linear
    decoder to pixels, mask ratio 0.75, L1 on the masked patches, ``MAETransform``."""
    from lightly.models import utils
    from lightly.models.modules import MaskedVisionTransformerTIMM
    from lightly.transforms import MAETransform

    vit = backbone.model
    p = int(vit.patch_embed.patch_size[0])
    encoder = MaskedVisionTransformerTIMM(vit=vit)
    decoder = nn.Linear(vit.embed_dim, p * p * backbone.in_chans)
    seq = encoder.sequence_length
    criterion = nn.L1Loss()

    def loss(v, step):
        x = v[0]
        _, masked = utils.random_token_mask(size=(x.shape[0], seq), mask_ratio=0.75, device=x.device)
        out = decoder(utils.get_at_index(encoder.encode(images=x, idx_mask=masked), masked))
        return criterion(out, utils.get_at_index(utils.patchify(x, p), masked - 1))
    return Recipe(MAETransform(input_size=size, normalize=norm),
                  nn.ModuleDict({"backbone": backbone, "encoder": encoder, "decoder": decoder}), loss)


METHODS: dict[str, Callable[..., Recipe]] = {"simclr": simclr, "moco": moco, "byol": byol,
                                             "barlowtwins": barlowtwins, "vicreg": vicreg, "dino": dino,
                                             "mae": mae, "simmim": simmim}


def train(method: str, train_dir: Path, sslkit_run: Path, out: Path, steps: int, seed: int = 0,
          log_every: int = 10, save_every: int = 25, **options) -> dict:
    """lightly's ``method`` recipe for ``steps`` steps with the sslkit run's backbone, optimizer,
    LR, warm-up + cosine schedule, batch, input and precision (``bf16``: the step under CPU
    autocast, as lightly's benchmarks run mixed precision); the encoder saved in ``out`` as a
    run dir. Returns process CPU seconds, wall seconds and the mean loss of the last 10 steps.

    Resumable: every ``save_every`` steps the models, optimizer, schedule, data position and
    RNG states go to ``out/resume.pt``; a later call continues from there (a loss's own
    state, e.g. MoCo's memory bank, starts empty again). Each epoch's order is a permutation
    seeded by ``(seed, epoch)``, so a resumed run sees the images an uninterrupted one would."""
    import torchvision

    from sslkit.optim import build_optimizer, warmup_cosine
    from sslkit.registry import create_backbone

    info = json.loads((sslkit_run / "run.json").read_text())
    spec, cfg, opt_info = info["input_spec"], info["config"], info.get("optimization", {})
    size, batch = int(spec["image_size"]), int(cfg["batch_size"])
    torch.manual_seed(seed)
    backbone = create_backbone(info["backbone"], int(spec["channels"]), size, **(info.get("backbone_options") or {}))
    recipe = METHODS[method](backbone, size, _norm(spec["mean"], spec["std"]), steps, **options)
    dataset = torchvision.datasets.ImageFolder(str(train_dir), transform=recipe.transform)
    per_epoch = len(dataset) // batch
    lr = opt_info.get("lr") or cfg.get("lr") or cfg["base_lr"] * batch / 256
    opt = build_optimizer(recipe.model.train(), cfg.get("optimizer", "adamw"), lr, cfg["weight_decay"],
                          betas=tuple(cfg.get("betas", (0.9, 0.95))))
    warmup = opt_info.get("warmup_steps", min(int(cfg.get("warmup_epochs", 1.0) * per_epoch), steps // 2))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, steps, warmup))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.get("precision") == "bf16")
    ckpt, step, losses, spent = out / "resume.pt", 0, [], {"cpu_s": 0.0, "wall_s": 0.0}
    if ckpt.exists():
        step, losses, spent = _restore(ckpt, {"model": recipe.model, "opt": opt, "sched": sched})
        print(f"  lightly {method}: resumed at step {step}/{steps}", flush=True)
    c0, t0 = cpu_seconds(), time.time()

    def elapsed() -> dict:
        return {"cpu_s": spent["cpu_s"] + cpu_seconds() - c0, "wall_s": spent["wall_s"] + time.time() - t0}

    def save() -> None:
        _save(ckpt, {"model": recipe.model, "opt": opt, "sched": sched}, step, losses, elapsed())

    while step < steps:
        epoch, first = divmod(step, per_epoch)
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=order[first * batch:].tolist(),
                                             drop_last=True, num_workers=0, generator=torch.Generator())
        # (its own generator: a loader draws a seed from the global RNG, which the transforms use)
        for views, _ in loader:
            if recipe.before_step:
                recipe.before_step(step)
            with autocast:
                loss = recipe.loss(views, step)
            opt.zero_grad()
            loss.backward()
            if recipe.after_backward:
                recipe.after_backward(step)
            opt.step()
            sched.step()
            step += 1
            losses.append(float(loss.detach()))
            if step % log_every == 0 or step == steps:
                print(f"  lightly {method} step {step}/{steps} loss {np.mean(losses[-10:]):.4f}", flush=True)
            if step % save_every == 0 and step < steps:
                save()
            if step >= steps:
                break
    used = elapsed()
    cost = {"cpu_s": round(used["cpu_s"], 1), "wall_s": round(used["wall_s"], 1),
            "final_loss": float(np.mean(losses[-10:])), "steps": steps, "lr": lr, "warmup_steps": warmup,
            "precision": cfg.get("precision", "fp32")}
    save_run(backbone, info, sslkit_run, out, f"{method} (lightly {LIGHTLY_VERSION})", cost)
    ckpt.unlink(missing_ok=True)
    return cost


def _save(ckpt: Path, parts: dict, step: int, losses: list, spent: dict) -> None:
    """``train``'s resume file: ``parts``' state dicts, progress and every RNG the step draws from."""
    import random

    ckpt.parent.mkdir(parents=True, exist_ok=True)
    state = {**{k: v.state_dict() for k, v in parts.items()}, "step": step, "losses": losses, "spent": spent,
             "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}}
    torch.save(state, ckpt.with_suffix(".tmp"))
    ckpt.with_suffix(".tmp").replace(ckpt)


def _restore(ckpt: Path, parts: dict) -> tuple[int, list, dict]:
    """Load :func:`_save`'s file into ``parts`` and the RNGs; returns (step, losses, spent)."""
    import random

    state = torch.load(ckpt, weights_only=False)  # our own file, written by _save
    for k, v in parts.items():
        v.load_state_dict(state[k])
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
    return state["step"], state["losses"], state["spent"]


def save_run(backbone: nn.Module, info: dict, sslkit_run: Path, out: Path, task: str, cost: dict) -> None:
    """``out/encoder.safetensors`` + the sslkit run's ``run.json`` (task renamed, summary replaced, and
    ``encoder_sha256`` that of lightly's own file: sslkit refuses an encoder whose hash is not the recorded one)."""
    from safetensors.torch import save_file

    from sslkit.output_file import file_sha256

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(out / "encoder.safetensors"))
    sha = file_sha256([out / "encoder.safetensors"])
    (out / "run.json").write_text(json.dumps({**info, "task": task, "summary": cost, "encoder_sha256": sha},
                                             indent=2))
    shutil.copy(sslkit_run / "run.json", out / "sslkit_run.json")


def table_run(st, work: Path, task: str, sslkit: dict, pretrain_dir: Path, bank: Path, test: Path, seed: int) -> dict:
    """``benchmarks/task_table.py --lightly``: lightly's recipe of ``task`` beside the sslkit run
    ``sslkit`` (its ``run``, ``steps``), the same number of steps; kNN correctness on ``test``."""
    run = Path(sslkit["run"])
    name = f"lightly-{run.name}"
    out = work / "runs" / name
    cost = st.run(f"pretrain-{name}", lambda: train(task, pretrain_dir, run, out, int(sslkit["steps"]), seed))
    correct = st.run(f"knn-{name}", lambda: knn_correct_string(out, bank, test, True, seed))
    return {**cost, "correct": correct}


def diff_cells(sslkit: dict, lightly: dict | None) -> str:
    """The chosen-defaults table's ``lightly | sslkit - lightly (SE)`` cells (``-`` without lightly)."""
    if lightly is None:
        return " - | - |"
    d, se = paired_se(bits(sslkit["correct"]), bits(lightly["correct"]))
    return f" {100 * acc_se(lightly['correct'])[0]:.1f} | {100 * d:+.1f} ({100 * se:.1f}) |"


def report(sslkit: dict, lightly: dict) -> str:
    """Per task: steps, each side's cost, kNN %, gains over random and sslkit - lightly, paired SEs. The
    sslkit CPU seconds are the whole ``sslkit pretrain`` command (start-up, data cache, loop), lightly's
    its training loop (JPEG decoding and transforms included); both loops' wall seconds, one thread."""
    if not lightly:
        return ""
    lines = ["", "", f"lightly {LIGHTLY_VERSION} beside each task's chosen default: same backbone, optimizer, LR, "
             "schedule, batch, input and number of steps; CIFAR-10 kNN (k=20) top-1 %, paired SEs on the same "
             "test images", "",
             "| task | steps | sslkit CPU s (command) | lightly CPU s (loop) | loop wall s sslkit / lightly | "
             "sslkit kNN % | lightly kNN % | random | lightly - random (SE) | sslkit - lightly (SE) | beyond SE |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | :---: |"]
    for task, lt in lightly.items():
        sk = sslkit[task]
        g, gse = paired_se(bits(lt["correct"]), bits(sk["random"]))
        d, dse = paired_se(bits(sk["correct"]), bits(lt["correct"]))
        beyond = ("sslkit ahead" if d > dse else "lightly ahead" if -d > dse else "no")
        cpu = sk.get("cpu_s")
        loop = json.loads((Path(sk["run"]) / "run.json").read_text()).get("summary", {}).get("seconds")
        lines.append(f"| {task} | {lt['steps']} | {'-' if cpu is None else f'{cpu:.0f}'} | {lt['cpu_s']:.0f} | "
                     f"{'-' if loop is None else f'{loop:.0f}'} / {lt['wall_s']:.0f} | "
                     f"{100 * acc_se(sk['correct'])[0]:.1f} | {100 * acc_se(lt['correct'])[0]:.1f} | "
                     f"{100 * acc_se(sk['random'])[0]:.1f} | {100 * g:+.1f} ({100 * gse:.1f}) | "
                     f"{100 * d:+.1f} ({100 * dse:.1f}) | {beyond} |")
    return "\n".join(lines)


if __name__ == "__main__":
    from _common import not_a_script

    not_a_script("lightly_tasks.py", "task_table.py --lightly or cifar10.py")

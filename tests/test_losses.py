"""Task losses against independent references on fixed inputs.

lightly (a test-only dependency) implements NT-Xent, the MoCo memory-bank InfoNCE, BYOL's
negative cosine, DINO, Barlow Twins and VICReg; each must agree with ours to 1e-5. Where
lightly has no loss (MoCo v3's scaled contrastive term, the VAE's KL, jigsaw labels), the
reference is written out by hand here.
"""

from __future__ import annotations

import math

import pytest
import torch

lightly_loss = pytest.importorskip("lightly.loss")
lightly_utils = pytest.importorskip("lightly.models.utils")

from sslkit.spec import InputSpec  # noqa: E402
from sslkit_plugins.tasks.barlowtwins import barlow_twins_loss  # noqa: E402
from sslkit_plugins.tasks.byol import byol_loss  # noqa: E402
from sslkit_plugins.tasks.dino import dino_loss  # noqa: E402
from sslkit_plugins.tasks.jigsaw import cut_tiles, max_hamming_permutations, shuffle_tiles  # noqa: E402
from sslkit_plugins.tasks.mae import MAE, MAEOptions, patchify  # noqa: E402
from sslkit_plugins.tasks.moco import MoCo, MoCoOptions, moco_infonce, moco_v3_contrastive  # noqa: E402
from sslkit_plugins.tasks.simclr import nt_xent_loss  # noqa: E402
from sslkit_plugins.tasks.vae import gaussian_kl  # noqa: E402
from sslkit_plugins.tasks.vicreg import vicreg_loss  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)


def _z(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_nt_xent_matches_lightly(temperature):
    z1, z2 = _z(8, 16, seed=1), _z(8, 16, seed=2)
    ref = lightly_loss.NTXentLoss(temperature=temperature)(z1, z2)
    torch.testing.assert_close(nt_xent_loss(z1, z2, temperature), ref, **TOL)


def test_moco_infonce_and_queue_match_lightly():
    k_size, dim, b = 12, 16, 4
    ref = lightly_loss.NTXentLoss(temperature=0.2, memory_bank_size=(k_size, dim))
    queue = ref.memory_bank.bank.clone()  # (K, d) unit rows
    q, k = _z(b, dim, seed=3).requires_grad_(), _z(b, dim, seed=4)
    expected = ref(q, k)  # scores against the bank as it was, then enqueues k
    torch.testing.assert_close(moco_infonce(q, k, queue, 0.2), expected, **TOL)

    # The task's queue evolves like lightly's bank (K a multiple of the batch).
    spec = InputSpec(1, 16, (0.5,), (0.25,))
    from sslkit.registry import create_backbone
    task = MoCo(create_backbone("timm:resnet10t", 1, 16), MoCoOptions(queue_size=k_size, proj_dim=dim), spec)
    task.queue.copy_(queue)
    task._keys = [torch.nn.functional.normalize(k, dim=1)]  # the step's keys, one tensor per micro-batch
    task.on_step_end(1, 10)
    for step in range(2, 5):
        keys = torch.nn.functional.normalize(_z(b, dim, seed=10 + step), dim=1)
        ref(_z(b, dim, seed=20 + step).requires_grad_(), keys)
        task._keys = [keys]
        task.on_step_end(step, 10)
    torch.testing.assert_close(task.queue, ref.memory_bank.bank, **TOL)


def test_moco_v3_contrastive_hand_computed():
    q, k, tau = _z(5, 8, seed=5), _z(5, 8, seed=6), 0.7
    qn, kn = q / q.norm(dim=1, keepdim=True), k / k.norm(dim=1, keepdim=True)
    terms = []
    for i in range(5):
        logits = [float(qn[i] @ kn[j]) / tau for j in range(5)]
        terms.append(-logits[i] + math.log(sum(math.exp(v) for v in logits)))
    expected = sum(terms) / 5 * 2 * tau
    assert moco_v3_contrastive(q, k, tau).item() == pytest.approx(expected, rel=1e-5)


def test_byol_loss_matches_lightly():
    p, z = _z(8, 32, seed=7), _z(8, 32, seed=8)
    ref = 2 + 2 * lightly_loss.NegativeCosineSimilarity()(p, z)
    torch.testing.assert_close(byol_loss(p, z), ref, **TOL)


@pytest.mark.parametrize("n_local", [0, 3])
def test_dino_loss_and_center_match_lightly(n_local):
    k, b = 64, 6
    teacher = [_z(b, k, seed=30 + i) for i in range(2)]
    student = [_z(b, k, seed=40 + i) for i in range(2 + n_local)]
    center = _z(1, k, seed=9) * 0.1
    ref = lightly_loss.DINOLoss(output_dim=k, teacher_temp=0.06, student_temp=0.1, center_momentum=0.9)
    ref.center.copy_(center.view(1, 1, k))
    expected = ref(teacher, student)
    torch.testing.assert_close(dino_loss(torch.stack(teacher), student, center, 0.06, 0.1), expected, **TOL)


def test_dino_task_center_update_matches_lightly():
    from sslkit.registry import create_backbone
    from sslkit_plugins.tasks.dino import DINO, DINOOptions

    torch.manual_seed(0)
    spec = InputSpec(1, 32, (0.5,), (0.25,))
    opts = DINOOptions(out_dim=32, hidden_dim=32, bottleneck_dim=16, local_crops=2, local_size=16)
    task = DINO(create_backbone("timm:resnet10t", 1, 32), opts, spec)
    views = task.views(spec)(torch.rand(4, 1, 32, 32))
    task(views)
    with torch.no_grad():
        t = task.teacher_head(task.teacher_encoder(torch.cat(views[:2]))).view(2, 4, -1)
    ref = lightly_loss.DINOLoss(output_dim=32, center_momentum=0.9)
    ref(list(t), list(t))  # updates lightly's centre from the teacher outputs
    task.on_step_end(1, 10)
    torch.testing.assert_close(task.center, ref.center.view(1, -1), **TOL)


def test_barlow_twins_matches_lightly():
    z1, z2 = _z(10, 12, seed=11), _z(10, 12, seed=12)
    ref = lightly_loss.BarlowTwinsLoss(lambda_param=5e-3)(z1, z2)
    torch.testing.assert_close(barlow_twins_loss(z1, z2, 5e-3), ref, **TOL)


def test_vicreg_matches_lightly():
    z1, z2 = _z(10, 12, seed=13), _z(10, 12, seed=14) * 0.3
    ref = lightly_loss.VICRegLoss(lambda_param=25.0, mu_param=25.0, nu_param=1.0)(z1, z2)
    torch.testing.assert_close(vicreg_loss(z1, z2)["loss"], ref, **TOL)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_mae_loss_matches_lightly_style(norm_pix):
    """Patches in lightly's layout; MSE on masked patches only (norm_pix: per-patch mean/var)."""
    from sslkit.registry import create_backbone

    x = _z(2, 3, 32, 32, seed=15)
    assert torch.equal(patchify(x, 8), lightly_utils.patchify(x, 8))
    spec = InputSpec(3, 32, (0.5,) * 3, (0.25,) * 3)
    backbone = create_backbone("timm:vit_tiny_patch16_224", 3, 32, patch_size=8, depth=1)
    task = MAE(backbone, MAEOptions(norm_pix_loss=norm_pix, decoder_dim=32, decoder_depth=1, target="pixels"), spec)
    pred = _z(2, 16, 8 * 8 * 3, seed=16)
    mask = torch.zeros(2, 16)
    mask[0, [1, 5, 7]] = 1
    mask[1, [0, 2, 3, 15]] = 1
    target = lightly_utils.patchify(x, 8)
    if norm_pix:  # the MAE authors' code: unbiased per-patch variance, eps 1e-6
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    m = mask.bool()
    ref = torch.nn.MSELoss()(pred[m], target[m])
    torch.testing.assert_close(task.forward_loss(x, pred, mask), ref, **TOL)


def test_vae_kl_hand_computed():
    mu = torch.tensor([[1.0, 0.0]])
    sigma = torch.tensor([[1.0, 2.0]])
    # 1/2 (mu^2 + s^2 - 1 - log s^2) summed: 1/2 (1 + 1 - 1 - 0) + 1/2 (0 + 4 - 1 - log 4)
    expected = 0.5 + 0.5 * (3 - math.log(4))
    assert gaussian_kl(mu, 2 * sigma.log()).item() == pytest.approx(expected, rel=1e-6)
    assert gaussian_kl(torch.zeros(3, 4), torch.zeros(3, 4)).abs().max().item() == 0.0


def test_jigsaw_labels_name_the_applied_permutation():
    """Tile i is filled with value i; the puzzle for label y reads ``perms[y]`` position by position."""
    tile = 4
    x = torch.zeros(3, 1, 3 * tile, 3 * tile)
    for i in range(9):
        r, c = divmod(i, 3)
        x[:, :, r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] = i
    perms = torch.from_numpy(max_hamming_permutations(10, seed=3))
    labels = torch.tensor([0, 7, 9])
    puzzles = shuffle_tiles(cut_tiles(x, tile, torch.zeros(3, 9, 2, dtype=torch.long)), perms, labels)
    seen = puzzles.amax(dim=(2, 3, 4)).long()  # (B, 9): which tile sits at each position
    assert torch.equal(seen, perms[labels])


def test_jigsaw_permutation_set_is_spread_out():
    perms = max_hamming_permutations(30, seed=0)
    assert len({tuple(p) for p in perms}) == 30
    assert all(sorted(p) == list(range(9)) for p in perms)
    d = (perms[:, None, :] != perms[None, :, :]).sum(-1)
    off = d[~torch.eye(30, dtype=torch.bool).numpy()]
    assert off.min() >= 7  # a random set of 30 has pairs at distance 2-4
    assert (max_hamming_permutations(30, seed=0) == perms).all()  # reproducible

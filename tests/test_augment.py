"""Batched augmentations against torchvision.transforms.v2.functional, sample by sample."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode
from scipy import ndimage

from sslkit import augment as A
from sslkit.errors import UsageError


@pytest.fixture
def x():
    torch.manual_seed(0)
    base = torch.rand(4, 3, 24, 24)
    return torch.nn.functional.avg_pool2d(base, 3, 1, 1)  # some spatial structure


def _per_sample(fn, x, *params):
    return torch.stack([fn(x[i], *(p[i] for p in params)) for i in range(x.shape[0])])


def test_blur_matches_torchvision(x):
    sigma = torch.tensor([0.3, 0.8, 1.5, 2.0])
    k = A.blur_kernel_size(24, 24, 0.25)
    ref = _per_sample(lambda im, s: TF.gaussian_blur(im, [k, k], [float(s), float(s)]), x, sigma)
    torch.testing.assert_close(A.blur(x, sigma, k), ref, atol=1e-6, rtol=0)


def test_rotation_matches_torchvision(x):
    angles = torch.tensor([0.0, 17.0, -40.0, 90.0])
    rot = lambda im, a: TF.rotate(im, float(a), interpolation=InterpolationMode.BILINEAR)  # noqa: E731
    ref = _per_sample(rot, x, angles)
    torch.testing.assert_close(A.rotate(x, angles), ref, atol=1e-5, rtol=0)
    wide = torch.rand(2, 1, 16, 28)  # non-square: pixel geometry, not normalised coordinates
    a2 = torch.tensor([30.0, -75.0])
    torch.testing.assert_close(A.rotate(wide, a2), _per_sample(rot, wide, a2), atol=1e-5, rtol=0)


def test_rotate90_matches_torchvision(x):
    k = torch.tensor([0, 1, 2, 3])
    ref = _per_sample(lambda im, q: TF.rotate(im, 90.0 * int(q)), x, k)
    torch.testing.assert_close(A.rotate90(x, k), ref, atol=1e-6, rtol=0)


def test_erase_matches_torchvision(x):
    boxes = torch.tensor([[0, 0, 5, 7], [10, 3, 8, 2], [20, 20, 4, 4], [0, 0, 0, 0]])
    ref = _per_sample(lambda im, b: TF.erase(im, *map(int, b), v=torch.tensor(0.0)), x, boxes)
    torch.testing.assert_close(A.erase(x, boxes), ref)


def test_resized_crop_matches_torchvision(x):
    boxes = torch.tensor([[0, 0, 24, 24], [3, 5, 12, 16], [10, 2, 14, 9], [6, 6, 6, 6]])
    ref = _per_sample(lambda im, b: TF.resized_crop(im, *map(int, b), [16, 16], antialias=False), x, boxes)
    torch.testing.assert_close(A.resized_crop(x, boxes, 16), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("channels", [1, 3])
def test_intensity_ops_match_torchvision(x, channels):
    x = x[:, :channels]
    g = torch.tensor([0.5, 0.8, 1.0, 1.9])
    torch.testing.assert_close(A.adjust_gamma(x, g), _per_sample(lambda im, v: TF.adjust_gamma(im, float(v)), x, g))
    f = torch.tensor([0.6, 1.0, 1.3, 0.0])
    torch.testing.assert_close(A.adjust_contrast(x, f),
                               _per_sample(lambda im, v: TF.adjust_contrast(im, float(v)), x, f), atol=1e-6, rtol=0)


def test_hue_and_grayscale_match_torchvision(x):
    shift = torch.tensor([0.0, 0.1, -0.25, 0.45])
    ref = _per_sample(lambda im, h: TF.adjust_hue(im, float(h)), x, shift)
    torch.testing.assert_close(A._hue_shift(x, shift), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(A._gray(x), TF.rgb_to_grayscale(x), atol=1e-6, rtol=0)


def test_sobel_matches_scipy(x):
    y = A.sobel(x).numpy()
    for i in range(2):
        for c in range(3):
            im = x[i, c].numpy().astype(np.float64)
            mag = np.hypot(ndimage.sobel(im, 1, mode="nearest"), ndimage.sobel(im, 0, mode="nearest"))
            np.testing.assert_allclose(y[i, c], mag / (4 * math.sqrt(2)), atol=1e-6)


def test_random_ops_draw_per_sample_parameters(x):
    torch.manual_seed(1)
    out = A.random_rotation(x, p=1.0, degrees=45)
    assert not torch.allclose(out[0], out[1]) and out.shape == x.shape
    same = x[:1].expand(8, -1, -1, -1).contiguous()
    cut = A.cutout(same, p=1.0, scale=(0.05, 0.2))
    erased = (cut == 0).all(1).flatten(1).sum(1)  # erased pixels per sample
    assert (erased > 0).all() and len(set(erased.tolist())) > 1  # different box per sample
    assert torch.equal(A.cutout(same, p=0.0), same)
    noisy = A.gaussian_noise(torch.full((64, 1, 16, 16), 0.5), p=1.0, std=(0.05, 0.05))
    assert abs(float((noisy - 0.5).std()) - 0.05) < 0.005
    r90 = A.random_rotate90(same, p=1.0)
    assert all(any(torch.equal(r90[i], torch.rot90(same[0], q, (1, 2))) for q in (1, 2, 3)) for i in range(8))


def test_colour_ops_leave_grayscale_alone():
    g = torch.rand(4, 1, 16, 16)
    torch.manual_seed(0)
    assert torch.equal(A.grayscale(g, p=1.0), g)
    out = A.color_jitter(g, 0.0, 0.0, 0.9, 0.4, p=1.0)  # saturation and hue only: no-ops on 1 channel
    torch.testing.assert_close(out, g)
    v = A.ViewRecipe(12, **A.RECIPES["everything"])(g)
    assert v.shape == (4, 1, 12, 12) and 0 <= v.min() and v.max() <= 1


def test_three_channels_that_are_not_colour_planes_get_no_colour_ops():
    """A slab:3 (three adjacent slices) or three stacked windows went through random grayscale,
    saturation and hue as if RGB: 48 of 200 views had three identical slices. With colour=False the
    ops are the same for every channel, so each pixel keeps its slices' order."""
    from sslkit.engine.model_setup import views_on_device
    from sslkit.run import RunConfig
    from sslkit.spec import InputSpec

    x = torch.stack([torch.full((16, 16), v) for v in (0.2, 0.5, 0.8)])[None].repeat(64, 1, 1, 1)
    strong = dict(jitter_p=1.0, jitter=0.4, hue=0.5, gray_p=1.0, gamma_p=1.0)
    torch.manual_seed(0)
    rgb = A.ViewRecipe(16, **strong)(x)
    assert torch.equal(rgb[:, 0], rgb[:, 2])  # grayscale: RGB's rule
    torch.manual_seed(0)
    v = A.ViewRecipe(16, colour=False, **strong)(x)
    assert bool((v[:, 0] < v[:, 1]).all() and (v[:, 1] < v[:, 2]).all())

    class Task(torch.nn.Module):
        def views(self, spec):
            return A.MultiView([A.ViewRecipe(16, hue=0.1)], spec.mean, spec.std)

    def colour(**kw) -> list[bool]:
        spec = InputSpec(3, 16, (0.5,) * 3, (0.25,) * 3, **kw)
        return [r.colour for r in views_on_device(RunConfig(task="simclr", data="", out=""), Task(), spec, torch.device("cpu")).recipes]

    assert colour() == [True] and colour(sample="slab:3") == [False]
    assert colour(graph_preprocessing={"kind": "window", "lower": [-1000, 0, 0], "upper": [0, 100, 1000]}) == [False]


def test_augment_opt_size_is_refused():
    """--augment-opt size=16 at --image-size 32 crashed reconstruction tasks with a traceback."""
    with pytest.raises(UsageError, match="--augment-opt: size is set by --image-size"):
        A.MultiView([A.ViewRecipe(32)], [0.5], [0.2]).override(size="16")


def test_new_fields_do_not_change_existing_recipes():
    """Off-by-default ops draw no random numbers: old recipes give the same views."""
    x = torch.rand(4, 3, 20, 20)
    torch.manual_seed(5)
    a = A.ViewRecipe(16)(x)
    torch.manual_seed(5)
    b = A.ViewRecipe(16, vflip_p=0.0, rotate_p=0.0, noise_p=0.0, cutout_p=0.0, sobel_p=0.0)(x)
    assert torch.equal(a, b)


def test_byol_family_jitters_saturation_by_0_2(monkeypatch):
    """BYOL's Table 6 (also Barlow Twins', VICReg's, MoCo v3's and DINO's): brightness and contrast 0.4,
    saturation 0.2, hue 0.1; one `jitter` field used to give saturation 0.4. SimCLR's recipe keeps 0.4."""
    import sslkit.views as V

    calls = []
    monkeypatch.setattr(V, "color_jitter", lambda x, *args: calls.append(args) or x)
    for r in A.byol_recipes(32):
        r(torch.rand(2, 3, 40, 40))
    A.ViewRecipe(32)(torch.rand(2, 3, 40, 40))
    assert calls == [(0.4, 0.4, 0.2, 0.1, 0.8, True)] * 2 + [(0.4, 0.4, 0.4, 0.1, 0.8, True)]


def test_named_recipes_and_overrides():
    r = A.recipe("xray", 32, blur_p="0", scale="0.5,1.0", rotate_degrees=5)
    assert (r.size, r.blur_p, r.scale, r.rotate_degrees, r.hue) == (32, 0.0, (0.5, 1.0), 5.0, 0.0)
    with pytest.raises(UsageError, match="unknown augmentation recipe 'xrays'"):
        A.recipe("xrays", 32)
    with pytest.raises(UsageError, match="unknown option 'blurr_p' \\(did you mean 'blur_p'\\?\\)"):
        A.recipe("simclr", 32, blurr_p=0)
    mv = A.MultiView([A.ViewRecipe(8), A.ViewRecipe(8, blur_p=0.2)], [0.5], [0.2]).override(noise_p="0.3")
    assert [v.noise_p for v in mv.recipes] == [0.3, 0.3] and mv.recipes[1].blur_p == 0.2
    views = mv(torch.rand(2, 1, 10, 10))
    assert len(views) == 2 and views[0].shape == (2, 1, 8, 8)


def test_recipe_values_are_checked_by_their_meaning():
    """Every named and BYOL recipe is in range; a value out of it is one UsageError naming the field,
    the value and the range (formerly a crash at the first batch, or silently accepted)."""
    for name in A.RECIPES:
        A.recipe(name, 32)
    A.byol_recipes(8)
    cases = {"scale": ("0.9,0.1", "scale must be two area fractions low,high with 0 < low <= high <= 1, got 0.9,0.1"),
             "gray_p": ("1.5", "gray_p must be a probability in [0, 1], got 1.5"),
             "hue": ("0.6", "hue must be a number in [0, 0.5], got 0.6"),
             "noise_std": ("0.2,0.1", "noise_std must be two numbers low,high with 0 <= low <= high, got 0.2,0.1")}
    for field, (value, message) in cases.items():
        with pytest.raises(UsageError) as err:
            A.recipe("simclr", 32, **{field: value})
        assert str(err.value) == f"--augment-opt: {message}"
    with pytest.raises(ValueError, match=r"^size must be an integer >= 8 \(pixels, as --image-size\), got 4$"):
        A.ViewRecipe(4)
    assert A.recipe("simclr", 32, hue="0.5", scale="1,1", noise_std="0,0").hue == 0.5  # the bounds are valid


def test_volume_recipe_values_are_checked():
    from sslkit.augment3d import VolumeViews, pair_volume_recipes

    views = VolumeViews(pair_volume_recipes((8, 8, 8)), [0.5], [0.2])
    for overrides, message in [({"flip_p": "2"}, "flip_p must be a probability in [0, 1], got 2.0"),
                               ({"scale": "0.5"}, "scale must be two volume fractions low,high with 0 < low <= high "
                                                  "<= 1, got 0.5"),
                               ({"flip_axes": "3"}, "flip_axes must be axes among 0, 1, 2 (D, H, W), got 3"),
                               ({"noise_p": "x"}, "noise_p expects numbers, got 'x'"),
                               ({"flip": "1"}, "unknown 3D view option 'flip' (did you mean 'flip_p'?); choose from: "
                                               "scale, flip_axes, flip_p, intensity_p, gamma_p, noise_p, blur_p")]:
        with pytest.raises(ValueError) as err:
            views.override(**overrides)
        assert str(err.value) == message
    assert views.override(flip_axes="0,2", noise_p="0").recipes[0].flip_axes == (0, 2)


def test_views_of_narrow_range_data_act_as_on_full_range_data():
    """12-bit content in 16-bit files (values up to 0.0625 after / 65535) got a gamma many times stronger
    than full-range data and a solarization that never fired: the run's ``value_range`` rescales the
    data to [0, 1] for the views, whose outputs are then exactly those of the full-range data."""
    import dataclasses

    from sslkit.data.prepare import SCALE, value_range
    from sslkit.engine.model_setup import views_on_device
    from sslkit.run import RunConfig
    from sslkit.spec import InputSpec

    class Task:
        def views(self, spec):
            return A.MultiView([A.ViewRecipe(12, gamma_p=1.0, solarize_p=1.0, noise_p=1.0)], spec.mean, spec.std)

    full = torch.rand(8, 1, 16, 16)
    full[:, :, 0, 0], full[:, :, 0, 1] = 0.0, 1.0
    narrow = full * (4095 / 65535)
    cached = np.rint(narrow.numpy() * SCALE).astype(np.uint16)
    assert value_range(cached) == (0.0, round(4095 / 65535, 6))
    assert value_range(np.rint(full.numpy() * SCALE).astype(np.uint16)) == (0.0, 1.0)  # full range: as it is
    cfg = RunConfig(task="simclr", data="folder:x", out="y")
    wide = InputSpec(1, 12, (0.4,), (0.2,))
    tight = dataclasses.replace(wide, mean=(0.4 * 4095 / 65535,), std=(0.2 * 4095 / 65535,),
                                value_range=(0.0, 4095 / 65535))
    torch.manual_seed(3)
    (want,) = views_on_device(cfg, Task(), wide, torch.device("cpu"))(full)
    torch.manual_seed(3)
    (got,) = views_on_device(cfg, Task(), tight, torch.device("cpu"))(narrow)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert InputSpec.from_dict(tight.to_dict()) == tight and InputSpec.from_dict(
        {k: v for k, v in wide.to_dict().items() if k != "value_range"}).value_range == (0.0, 1.0)  # older runs


def test_a_run_on_12_bit_pngs_records_their_value_range(tmp_path, cli):
    """The engine computes the range from the decoded data and records it in run.json's input_spec."""
    import json

    from PIL import Image

    rng = np.random.default_rng(0)
    (tmp_path / "d").mkdir()
    for i in range(8):
        Image.fromarray((rng.random((20, 20)) * 4095).astype(np.uint16)).save(tmp_path / "d" / f"{i}.png")
    r = cli("pretrain", "--task", "simclr", "--backbone", "timm:resnet10t", "--data", f"folder:{tmp_path / 'd'}",
            "--out", tmp_path / "run", "--image-size", "16", "--batch-size", "4", "--max-steps", "1", "--quiet",
            "--no-cache")
    assert r.exit_code == 0, r.output
    low, high = json.loads((tmp_path / "run" / "run.json").read_text())["input_spec"]["value_range"]
    assert 0 <= low < 0.01 and 0.05 < high <= 4095 / 65535 + 1e-6

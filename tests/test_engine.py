"""The Fore-Back engine (Algorithm 1): budget, determinism, per-image invariance, step semantics, reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TEST_DEVICE, LiveBuffers, engine_noise_keys, make_tiny_model
from preempt_cli import engine as engine_module
from preempt_cli.engine import PRESETS, FastPreemption, ForeBackConfig, native_bf16, parse_eps, project, resolve_precision
from preempt_cli.errors import ConfigError, InputError
from preempt_cli.imageio import levels_to_float

# float32 slack for "within eps": x0 +- eps is itself rounded to float32.
TOL = 1e-6


def _ce(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image cross-entropy of ``model`` (no grad)."""
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


def _input_grad(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    xs = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(F.cross_entropy(model(xs), y, reduction="sum"), xs)
    return grad


def _clip(v: torch.Tensor, center: torch.Tensor, eps: float) -> torch.Tensor:
    """Reference projection, written independently of ``engine.project``."""
    return torch.max(torch.min(v, center + eps), center - eps).clamp(0.0, 1.0)


def _saturated_batch() -> torch.Tensor:
    """Images full of exact 0s and 1s (and a few mid values): the [0, 1] clip must act."""
    g = torch.Generator().manual_seed(123)
    x = (torch.rand(3, 3, 32, 32, generator=g) > 0.5).float()
    x[2] = torch.rand(3, 32, 32, generator=g)
    return x


# -- budget and range ---------------------------------------------------------------------------------------

BUDGET_CONFIGS = {
    "paper-8/255": ForeBackConfig(samples=4),
    "eps4-eta1.5-F2B0": ForeBackConfig(eps=4 / 255, eta=1.5, forward_steps=2, backward_steps=0, samples=4),
    "eps16-eta0.3-F0B3": ForeBackConfig(eps=16 / 255, eta=0.3, forward_steps=0, backward_steps=3, samples=3),
    "eps0.0314-F3B3": ForeBackConfig(eps=0.0314, eta=0.9, forward_steps=3, backward_steps=3, samples=2),
    "mspd": ForeBackConfig.from_preset("mspd", samples=4),
    "pgd-samples": ForeBackConfig(samples=2, inner_steps=3),
}


@pytest.mark.parametrize("cfg", list(BUDGET_CONFIGS.values()), ids=list(BUDGET_CONFIGS))
def test_budget_and_range_hold(cfg: ForeBackConfig, tiny_backbone, cifar_batch) -> None:
    x, y = cifar_batch
    for images, labels, real in ((x, y, True), (_saturated_batch().to(x.device), y[:3], False)):
        out = FastPreemption(tiny_backbone, config=cfg, seed=7).perturb(images, labels)
        assert out.shape == images.shape and out.dtype == torch.float32
        assert torch.isfinite(out).all()
        assert out.min() >= 0.0 and out.max() <= 1.0
        delta = (out - images).abs()
        assert delta.max() <= cfg.eps + TOL
        # A real perturbation, not a no-op: some pixels move by a sizeable part of the budget, and on
        # real images most pixels move (saturated 0/1 pixels pushed outward are clipped in place).
        assert delta.max() > 0.25 * cfg.eps
        if real:
            assert (delta > 0).float().mean() > 0.5


def test_mspd_preset_matches_documented_settings() -> None:
    cfg = ForeBackConfig.from_preset("mspd")
    assert (cfg.eta, cfg.forward_steps, cfg.backward_steps, cfg.samples) == (1.0, 1, 1, 20)
    assert cfg.sample_projection == "iterate"
    paper = ForeBackConfig.from_preset("paper")
    assert paper == ForeBackConfig()  # the defaults are the paper's Table 3
    assert (paper.eps, paper.eta, paper.forward_steps, paper.backward_steps, paper.samples) == (
        8 / 255, 0.7, 1, 2, 20,
    )  # fmt: skip
    assert paper.eta * (paper.forward_steps + paper.backward_steps) > 1  # the paper's rule
    # Overrides win, None overrides are ignored.
    tuned = ForeBackConfig.from_preset("mspd", eps=4 / 255, samples=None)
    assert tuned.eps == 4 / 255 and tuned.samples == 20 and tuned.sample_projection == "iterate"
    assert set(PRESETS) >= {"paper", "mspd"}


# -- determinism and per-image invariance ---------------------------------------------------------------------


def test_same_seed_is_bitwise_equal_and_other_seed_differs(tiny_backbone, cifar_batch) -> None:
    x, y = cifar_batch
    cfg = ForeBackConfig(samples=4)
    a = FastPreemption(tiny_backbone, config=cfg, seed=3).perturb(x, y)
    b = FastPreemption(tiny_backbone, config=cfg, seed=3).perturb(x, y)
    assert torch.equal(a, b)
    c = FastPreemption(tiny_backbone, config=cfg, seed=4).perturb(x, y)
    assert not torch.equal(a, c)
    # Each image gets a different result with another seed (not just one of them).
    assert all(not torch.equal(a[i], c[i]) for i in range(len(x)))
    # Other noise seeds for the images also change the result.
    d = FastPreemption(tiny_backbone, config=cfg, seed=3).perturb(x, y, noise_seeds=[s + 100 for s in range(len(x))])
    assert not torch.equal(a, d)
    # The global RNG plays no part.
    torch.manual_seed(999)
    e = FastPreemption(tiny_backbone, config=cfg, seed=3).perturb(x, y)
    assert torch.equal(a, e)


def test_image_alone_equals_image_in_batch(tiny_backbone, cifar_batch) -> None:
    x, y = cifar_batch
    cfg = ForeBackConfig(samples=4)
    seeds = [1000 + 17 * i for i in range(len(x))]
    engine = FastPreemption(tiny_backbone, config=cfg, seed=5)
    batched = engine.perturb(x, y, noise_seeds=seeds)
    for i in range(len(x)):
        alone = engine.perturb(x[i : i + 1], y[i : i + 1], noise_seeds=[seeds[i]])
        torch.testing.assert_close(alone[0], batched[i], atol=1e-6, rtol=0)
    # Another batch composition (reversed, partial) gives the same per-image results.
    order = [5, 2, 7, 0]
    partial = engine.perturb(x[order], y[order], noise_seeds=[seeds[i] for i in order])
    torch.testing.assert_close(partial, batched[order], atol=1e-6, rtol=0)
    # Default noise seeds come from each image's pixels, not its place in the batch.
    default = engine.perturb(x, y)
    alone = engine.perturb(x[3:4], y[3:4])
    assert torch.equal(alone[0], default[3])
    assert not torch.equal(engine.perturb(x[3:4], y[3:4], noise_seeds=[3])[0], default[3])


def test_noise_is_uniform_in_budget_and_per_image(tiny_backbone, monkeypatch) -> None:
    cfg = ForeBackConfig(eps=8 / 255, samples=16)
    engine = FastPreemption(tiny_backbone, config=cfg, seed=2, device=TEST_DEVICE)
    like = torch.zeros(3, 3, 32, 32, device=TEST_DEVICE)
    keys = engine_noise_keys(engine, [10, 11, 12])  # [images, steps, samples]
    assert keys.shape == (3, cfg.forward_steps + cfg.backward_steps, 16)
    noise = engine._noise(like, keys[:, 0])
    assert noise.shape == (3, 16, 3, 32, 32) and noise.dtype == torch.float32
    assert noise.abs().max() <= cfg.eps
    assert noise.min() < -0.999 * cfg.eps and noise.max() > 0.999 * cfg.eps  # spans the whole interval
    assert abs(noise.mean().item()) < 0.02 * cfg.eps
    assert noise.std().item() == pytest.approx(cfg.eps / math.sqrt(3), rel=0.02)  # std of U(-eps, eps)
    counts = torch.histc(noise.cpu(), bins=20, min=-cfg.eps, max=cfg.eps)
    assert (counts - counts.mean()).abs().max() < 0.05 * counts.mean()  # flat: 2,458 values a bin expected
    # Independent: 48 rows (3 images x 16 samples) and the next step's, pairwise uncorrelated (|r| ~ 0.018)
    rows = torch.cat([noise, engine._noise(like, keys[:, 1])], dim=1).flatten(2).flatten(0, 1).cpu()
    r = torch.corrcoef(rows.double()) - torch.eye(len(rows), dtype=torch.float64)
    assert r.abs().max() < 0.1, r.abs().max()
    # The same per-image seed draws the same noise whatever the batch, any samples of it alone the same,
    # and the block size (memory) changes nothing.
    single = engine._noise(like[:1], engine_noise_keys(engine, [11])[:, 0])
    assert torch.equal(single[0], noise[1])
    assert torch.equal(engine._noise(like, keys[:, 0, 5:9]), noise[:, 5:9])
    monkeypatch.setitem(engine_module.NOISE_BLOCK_ELEMENTS, TEST_DEVICE.type, 1000)  # element and sample blocks
    assert torch.equal(engine._noise(like, keys[:, 0]), noise)
    # Other step, base seed or image seed: other noise
    assert not torch.equal(engine._noise(like, keys[:, 1]), noise)
    other_seed = FastPreemption(tiny_backbone, config=cfg, seed=3, device=TEST_DEVICE)
    assert not torch.equal(other_seed._noise(like, engine_noise_keys(other_seed, [10, 11, 12])[:, 0]), noise)
    assert not torch.equal(engine._noise(like[:1], engine_noise_keys(engine, [13])[:, 0])[0], noise[1])
    with pytest.raises(ValueError, match="noise seeds"):
        engine.perturb(like, torch.zeros(3, dtype=torch.long, device=TEST_DEVICE), noise_seeds=[1, 2])


def test_hash_noise_is_fixed_integer_arithmetic() -> None:
    # The noise is a documented function of its inputs, the same bits on every device and torch version:
    # a value computed by hand from lowbias32 (see engine.hash_noise) for key (lo, hi), step 2, sample 3
    def mix(v: int) -> int:
        v ^= v >> 16
        v = (v * 0x21F0AAAD) & 0xFFFFFFFF
        v ^= v >> 15
        v = (v * 0x735A2D97) & 0xFFFFFFFF
        return v ^ (v >> 15)

    lo, hi, step, sample, element = 123456789, 987654321, 2, 3, 7
    key = mix(mix(mix((sample + mix(step)) & 0xFFFFFFFF) ^ lo) ^ hi)
    expected = ((mix(mix(element) ^ key) >> 8) * 2.0**-24) * 2 * 0.5 - 0.5
    keys = engine_module.noise_keys(torch.tensor([[lo, hi]], device=TEST_DEVICE), step + 1, sample + 1)
    assert keys[0, step, sample].item() == key
    noise = engine_module.hash_noise(keys[:, step], 10, 0.5, block=1 << 20)
    assert noise[0, sample, element].item() == pytest.approx(expected, abs=1e-7)


@pytest.mark.parametrize("size", [32, 40], ids=["native", "resized-in-chunks"])
def test_every_step_draws_fresh_noise_for_every_sample(tiny_backbone, monkeypatch, size: int) -> None:
    # Algorithm 1 draws N new samples at each step: reusing one step's noise (or one sample's for all N)
    # would still give a deterministic, in-budget result, so only the draws themselves can show it
    cfg = ForeBackConfig(samples=3, forward_steps=1, backward_steps=2)
    drawn: list[torch.Tensor] = []
    real_noise, real_sample_noise = FastPreemption._noise, FastPreemption._sample_noise

    def noise(self, like, keys):
        drawn.append(real_noise(self, like, keys))
        return drawn[-1].clone()

    def sample_noise(self, like, generators, samples):
        drawn.append(real_sample_noise(self, like, generators, samples))
        return drawn[-1].clone()

    monkeypatch.setattr(FastPreemption, "_noise", noise)
    monkeypatch.setattr(FastPreemption, "_sample_noise", sample_noise)
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)).to(TEST_DEVICE)
    FastPreemption(tiny_backbone, config=cfg).perturb(x, torch.tensor([1, 2], device=TEST_DEVICE))
    assert len(drawn) == cfg.forward_steps + cfg.backward_steps  # one draw per step (one chunk each here)
    for i, a in enumerate(drawn):
        assert a.shape == (2, cfg.samples, 3, size, size)
        for j in range(cfg.samples):
            for k in range(j):
                assert not torch.equal(a[:, j], a[:, k])  # the N samples differ
        for b in drawn[:i]:
            assert not torch.equal(a, b)  # and each step's differ from the earlier steps'


def test_content_seeds_tell_images_apart_and_only_by_their_pixels() -> None:
    from preempt_cli.protect import content_seed

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(50)]
    seeds = [content_seed(im) for im in images]
    assert len(set(seeds)) == len(images)
    assert content_seed(images[0].copy()) == seeds[0]
    nudged = images[0].copy()
    nudged[5, 5, 1] ^= 1
    assert content_seed(nudged) != seeds[0]


# -- the semantics of one step ------------------------------------------------------------------------------


def test_forward_step_lowers_backbone_loss(tiny_backbone, cifar_batch) -> None:
    x, y = cifar_batch
    cfg = ForeBackConfig(forward_steps=1, backward_steps=0, samples=8)
    out = FastPreemption(tiny_backbone, config=cfg).perturb(x, y)
    before, after = _ce(tiny_backbone, x, y), _ce(tiny_backbone, out, y)
    assert (after < before).all(), (before, after)
    # The step goes down the loss: its delta has a negative inner product with the loss gradient.
    grad = _input_grad(tiny_backbone, x, y)
    assert ((out - x) * grad).flatten(1).sum(1).lt(0).all()


def test_backward_step_moves_against_the_predicted_attack(tiny_backbone, cifar_batch) -> None:
    x, y = cifar_batch
    cfg = ForeBackConfig(forward_steps=0, backward_steps=1, samples=8)
    engine = FastPreemption(tiny_backbone, config=cfg)
    out = engine.perturb(x, y)
    grad = _input_grad(tiny_backbone, x, y)
    fgsm = project(x + cfg.eps * grad.sign(), x, cfg.eps)
    assert (_ce(tiny_backbone, fgsm, y) > _ce(tiny_backbone, x, y)).all()  # the attack works...
    assert (_ce(tiny_backbone, out, y) < _ce(tiny_backbone, fgsm, y)).all()  # ...the step goes the other way
    assert ((out - x) * grad.sign()).flatten(1).sum(1).lt(0).all()

    # Same from a later iterate x_t (after a forward step), one backward step taken by the engine.
    x_t = FastPreemption(tiny_backbone, config=cfg.with_(forward_steps=1, backward_steps=0)).perturb(x, y)
    bounds = engine_module._Ball(x.unsqueeze(1), cfg.eps)
    keys = engine_noise_keys(engine, range(len(x)))[:, 0]
    x_next = engine._step(x_t, bounds, y.repeat_interleave(cfg.samples), keys, direction=+1.0)
    grad_t = _input_grad(tiny_backbone, x_t, y)
    fgsm_t = project(x_t + cfg.eps * grad_t.sign(), x, cfg.eps)
    assert (_ce(tiny_backbone, x_next, y) < _ce(tiny_backbone, fgsm_t, y)).all()
    assert ((x_next - x_t) * grad_t.sign()).flatten(1).sum(1).lt(0).all()
    assert (x_next - x).abs().max() <= cfg.eps + TOL


# -- the batched algorithm equals a per-sample loop -------------------------------------------------------------


def _reference_perturb(model, x, y, cfg: ForeBackConfig, noises: list[torch.Tensor]) -> torch.Tensor:
    """Algorithm 1 written as plain loops: one image, one sample, one gradient at a time."""
    x0 = x.clone()
    x_t = x.clone()
    directions = [-1.0] * cfg.forward_steps + [+1.0] * cfg.backward_steps
    assert len(noises) == len(directions)
    step_size = cfg.eps if cfg.inner_steps == 1 else 2.5 * cfg.eps / cfg.inner_steps
    for direction, noise in zip(directions, noises):
        nxt = torch.empty_like(x_t)
        for b in range(x.shape[0]):
            samples = []
            for n in range(cfg.samples):
                s = (x_t[b] + noise[b, n]).clamp(0.0, 1.0)
                start = s.clone()
                for _ in range(cfg.inner_steps):
                    grad = _input_grad(model, s[None], y[b : b + 1])[0]
                    s = s + direction * step_size * grad.sign()
                    if cfg.inner_steps > 1:
                        s = _clip(s, start, cfg.eps)
                if cfg.sample_projection == "iterate":
                    s = _clip(s, x_t[b], cfg.eps)
                samples.append(_clip(s, x0[b], cfg.eps))
            delta = torch.stack(samples).mean(dim=0) - x_t[b]
            # forward: x + eta * delta_r; backward: x - eta * delta_a
            nxt[b] = _clip(x_t[b] - direction * cfg.eta * delta, x0[b], cfg.eps)
        x_t = nxt
    return x_t


REFERENCE_CONFIGS = {
    "paper": ForeBackConfig(samples=3),
    "mspd": ForeBackConfig.from_preset("mspd", samples=3),
    "F2B1-eta0.5": ForeBackConfig(eps=6 / 255, eta=0.5, forward_steps=2, backward_steps=1, samples=2),
    "pgd2": ForeBackConfig(forward_steps=1, backward_steps=1, samples=2, inner_steps=2),
}


@pytest.mark.parametrize("cfg", list(REFERENCE_CONFIGS.values()), ids=list(REFERENCE_CONFIGS))
def test_batched_samples_equal_per_sample_loop(cfg, tiny_backbone, cifar_batch, monkeypatch) -> None:
    x, y = cifar_batch
    x, y = x[:3], y[:3]
    g = torch.Generator().manual_seed(42)
    steps = cfg.forward_steps + cfg.backward_steps
    noises = [torch.empty(3, cfg.samples, 3, 32, 32).uniform_(-cfg.eps, cfg.eps, generator=g).to(x.device)
              for _ in range(steps)]  # fmt: skip
    served = iter(noises)

    def fake_noise(self, like, keys):
        noise = next(served)
        assert noise.shape == (like.shape[0], self.config.samples, *like.shape[1:]) and keys.shape == noise.shape[:2]
        return noise.clone()

    monkeypatch.setattr(FastPreemption, "_noise", fake_noise)
    out = FastPreemption(tiny_backbone, config=cfg).perturb(x, y)
    assert next(served, None) is None  # one noise draw per step, no more
    ref = _reference_perturb(tiny_backbone, x, y, cfg, noises)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    assert not torch.equal(out, x)


def test_backbone_runs_batched_once_per_step(tiny_backbone, cifar_batch) -> None:
    x, y = cifar_batch
    cfg = ForeBackConfig(samples=5)
    rows: list[int] = []
    handle = tiny_backbone.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0]))
    try:
        FastPreemption(tiny_backbone, config=cfg).perturb(x, y)
    finally:
        handle.remove()
    assert rows == [len(x) * cfg.samples] * (cfg.forward_steps + cfg.backward_steps)
    assert sum(rows) == len(x) * cfg.passes_per_image


# -- gradients, inputs and shapes ---------------------------------------------------------------------------


def test_gradients_only_with_respect_to_the_input(cifar_batch) -> None:
    model = make_tiny_model(0, frozen=False)  # trainable params: perturb must still leave them alone
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = cifar_batch
    x_copy = x.clone()
    x.requires_grad_(False)
    out = FastPreemption(model, config=ForeBackConfig(samples=3)).perturb(x, y)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(x, x_copy)  # the input is not modified in place
    assert x.grad is None and not out.requires_grad and out.grad_fn is None


def test_resize_path_keeps_budget_at_full_resolution(tiny_backbone) -> None:
    # A 64x48 (W x H) image through a 32x32 backbone: the model resizes inside, differentiably.
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 48), torch.linspace(0, 1, 64), indexing="ij")
    x = torch.stack([xx, yy, (xx + yy) / 2]).unsqueeze(0)
    x = (0.8 * x + 0.2 * torch.rand(1, 3, 48, 64, generator=g)).clamp(0, 1).to(TEST_DEVICE)
    y = torch.tensor([3], device=TEST_DEVICE)
    cfg = ForeBackConfig(samples=4)
    out = FastPreemption(tiny_backbone, config=cfg).perturb(x, y)
    assert out.shape == (1, 3, 48, 64)
    delta = (out - x).abs()
    assert delta.max() <= cfg.eps + TOL
    assert out.min() >= 0 and out.max() <= 1
    # Gradients reach every region of the full-resolution image, not only a 32x32 subset.
    assert (delta > 0).float().mean() > 0.9
    assert delta.max() > 0.5 * cfg.eps
    # The forward half alone lowers the loss of the resized image, as at native size.
    fwd = FastPreemption(tiny_backbone, config=cfg.with_(backward_steps=0, samples=8)).perturb(x, y)
    assert _ce(tiny_backbone, fwd, y) < _ce(tiny_backbone, x, y)


def _photo_batch(b: int = 2, h: int = 40, w: int = 56) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.rand(b, 3, h, w, generator=g).to(TEST_DEVICE), torch.arange(b, device=TEST_DEVICE) % 10


@pytest.mark.parametrize("cfg", list(REFERENCE_CONFIGS.values()), ids=list(REFERENCE_CONFIGS))
def test_images_the_model_resizes_go_in_chunks_that_equal_the_per_sample_loop(cfg, tiny_backbone,
                                                                               monkeypatch) -> None:  # fmt: skip
    # Photos take the chunked step: the same algorithm, with at most SAMPLE_CHUNK_ELEMENTS per pass.
    x, y = _photo_batch()
    one_per_chunk = 2 * x[0].numel() - 1  # one sample of one image per pass
    monkeypatch.setitem(engine_module.SAMPLE_CHUNK_ELEMENTS, TEST_DEVICE.type, one_per_chunk)
    g = torch.Generator().manual_seed(7)
    steps = cfg.forward_steps + cfg.backward_steps
    noises = [torch.empty(len(x), cfg.samples, *x.shape[1:]).uniform_(-cfg.eps, cfg.eps, generator=g).to(x.device)
              for _ in range(steps)]  # fmt: skip
    served = iter(noises)
    current: list[torch.Tensor] = []
    image_of: dict[int, int] = {}  # an image's row of generators (the same list in every pass) -> its index

    def fake_sample_noise(self, like, generators, samples):
        first = image_of.setdefault(id(generators[0]), len(image_of))
        if samples.start == 0 and first == 0:  # a step begins
            current[:] = [next(served)]
        return current[0][first : first + len(generators), samples.start : samples.stop].clone()

    monkeypatch.setattr(FastPreemption, "_sample_noise", fake_sample_noise)
    rows: list[int] = []
    handle = tiny_backbone.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0]))
    try:
        out = FastPreemption(tiny_backbone, config=cfg).perturb(x, y)
    finally:
        handle.remove()
    assert next(served, None) is None
    assert max(rows) == 1  # one sample of one image per pass, never all N
    assert sum(rows) == len(x) * cfg.passes_per_image
    torch.testing.assert_close(out, _reference_perturb(tiny_backbone, x, y, cfg, noises), atol=1e-6, rtol=0)


def test_the_chunk_size_never_changes_a_photos_result(tiny_backbone, monkeypatch) -> None:
    x, y = _photo_batch()
    cfg = ForeBackConfig(samples=5)
    whole = FastPreemption(tiny_backbone, config=cfg, seed=3).perturb(x, y, noise_seeds=[11, 12])
    for per_chunk in (1, 2, 4):
        monkeypatch.setitem(engine_module.SAMPLE_CHUNK_ELEMENTS, TEST_DEVICE.type, per_chunk * x[0].numel() * len(x))
        chunked = FastPreemption(tiny_backbone, config=cfg, seed=3).perturb(x, y, noise_seeds=[11, 12])
        torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=0)
    # an image's result does not depend on its batch either (its own noise streams)
    alone = FastPreemption(tiny_backbone, config=cfg, seed=3).perturb(x[1:], y[1:], noise_seeds=[12])
    torch.testing.assert_close(alone[0], whole[1], atol=1e-6, rtol=0)
    other_seed = FastPreemption(tiny_backbone, config=cfg, seed=4).perturb(x, y, noise_seeds=[11, 12])
    assert not torch.equal(other_seed, whole)


def test_a_photos_bits_do_not_depend_on_how_many_photos_share_its_batch(tiny_backbone, monkeypatch) -> None:
    """The chunks of an image's samples were sized by the whole batch: a photo alone and the same photo in
    a batch of three (a larger --batch-size, another shard) summed its samples in other groups, and its
    file differed by a level in places."""
    x, y = _photo_batch(3)
    cfg = ForeBackConfig(samples=6)
    monkeypatch.setitem(engine_module.SAMPLE_CHUNK_ELEMENTS, TEST_DEVICE.type, 4 * x[0].numel())
    batch = FastPreemption(tiny_backbone, config=cfg, seed=3).perturb(x, y, noise_seeds=[11, 12, 13])
    for i in range(3):
        alone = FastPreemption(tiny_backbone, config=cfg, seed=3).perturb(x[i : i + 1], y[i : i + 1],
                                                                           noise_seeds=[11 + i])  # fmt: skip
        assert torch.equal(alone[0], batch[i]), i


def test_a_photo_is_protected_with_five_buffers_of_its_size_at_most(tiny_backbone, monkeypatch) -> None:
    """A photo's peak memory is the buffers of its size alive at once: the input, the iterate, the sum of the
    samples, a sample and its gradient. The engine also held a copy of the input as the first iterate, the
    budget's two bounds, and the outer step's two temporaries: 8 such buffers (96 bytes a pixel at 12 MP)."""
    x, y = _photo_batch(1, 120, 160)
    # one sample per pass, and its budget in blocks of a tenth of it, as a 12-megapixel photo goes
    monkeypatch.setitem(engine_module.SAMPLE_CHUNK_ELEMENTS, TEST_DEVICE.type, x[0].numel())
    monkeypatch.setitem(engine_module.BOUND_BLOCK_ELEMENTS, TEST_DEVICE.type, x[0].numel() // 10)
    x_before = x.clone()
    rows: list[int] = []
    handle = tiny_backbone.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0]))
    try:
        with LiveBuffers(x[0].numel() * x.element_size()) as live:
            live.track(x)
            out = FastPreemption(tiny_backbone, config=ForeBackConfig(samples=3)).perturb(x, y, noise_seeds=[1])
    finally:
        handle.remove()
    assert rows == [1] * 9  # the path a large photo takes: one sample at a time
    assert live.peak <= 5
    assert torch.equal(x, x_before)  # the input, the first iterate, is not written
    assert (out - x).abs().max() <= ForeBackConfig().eps + TOL and not torch.equal(out, x)


def test_a_photo_from_its_levels_takes_four_buffers_of_its_size_at_most(tiny_backbone, monkeypatch) -> None:
    """A caller of perturb holds its images, and the engine held them through every step as the center of the
    budget: 5 float32 buffers of a photo's size at once. Given the levels, the engine makes the floats, frees
    them once the first step has made the next iterate, and computes the bounds from the levels: 4."""
    levels = torch.randint(0, 256, (1, 120, 160, 3), generator=torch.Generator().manual_seed(2),
                           dtype=torch.uint8).permute(0, 3, 1, 2).to(TEST_DEVICE)  # fmt: skip
    y = torch.tensor([3], device=TEST_DEVICE)
    # one sample per pass, and its budget in blocks of a tenth of it, as a 12-megapixel photo goes
    monkeypatch.setitem(engine_module.SAMPLE_CHUNK_ELEMENTS, TEST_DEVICE.type, levels[0].numel())
    monkeypatch.setitem(engine_module.BOUND_BLOCK_ELEMENTS, TEST_DEVICE.type, levels[0].numel() // 10)
    levels_before = levels.clone()
    engine = FastPreemption(tiny_backbone, config=ForeBackConfig(samples=3))
    with LiveBuffers(levels.numel() * 4) as live:
        out = engine.perturb_levels(levels, 255, y, noise_seeds=[1])
    assert live.peak <= 4
    assert torch.equal(levels, levels_before)
    assert torch.equal(out, engine.perturb(levels_to_float(levels, 255), y, noise_seeds=[1]))


@pytest.mark.parametrize("cfg", list(REFERENCE_CONFIGS.values()), ids=list(REFERENCE_CONFIGS))
def test_images_given_as_levels_get_the_bits_of_their_floats(cfg, tiny_backbone, monkeypatch) -> None:
    # perturb_levels protects the floats levels_to_float makes, an 8-bit photo's budget computed from its levels
    # (in the pipeline's NHWC layout, in blocks of any size): perturb's bits, as for 16-bit photos (whose floats
    # stay the center) and images at the input size
    g = torch.Generator().manual_seed(6)
    photo8 = torch.randint(0, 256, (2, 40, 56, 3), generator=g, dtype=torch.uint8).permute(0, 3, 1, 2)
    photo16 = torch.randint(0, 65536, (2, 3, 40, 56), generator=g, dtype=torch.int32)
    small = torch.randint(0, 256, (2, 3, 32, 32), generator=g, dtype=torch.uint8)
    y = torch.tensor([1, 4], device=TEST_DEVICE)
    engine = FastPreemption(tiny_backbone, config=cfg, seed=3)
    for levels, max_value in ((photo8, 255), (photo16, 65535), (small, 255)):
        levels = levels.to(TEST_DEVICE)
        expected = engine.perturb(levels_to_float(levels, max_value), y, noise_seeds=[11, 12])
        assert not torch.equal(expected, levels_to_float(levels, max_value))
        for block in (1, 7 * 56 * 3, levels.numel() * cfg.samples):
            monkeypatch.setitem(engine_module.BOUND_BLOCK_ELEMENTS, TEST_DEVICE.type, block)
            assert torch.equal(engine.perturb_levels(levels, max_value, y, noise_seeds=[11, 12]), expected)
    with pytest.raises(InputError, match="integer"):
        engine.perturb_levels(levels_to_float(photo8, 255).to(TEST_DEVICE), 255, y)


@pytest.mark.parametrize("cfg", list(REFERENCE_CONFIGS.values()), ids=list(REFERENCE_CONFIGS))
def test_a_photos_budget_computed_in_blocks_gives_the_bits_of_the_whole(cfg, tiny_backbone, monkeypatch) -> None:
    # A photo's budget is computed a block of rows at a time where it is clipped to (see BOUND_BLOCK_ELEMENTS):
    # a block of one row and one of the whole photo give the same bits, as do photos cut into other blocks.
    x, y = _photo_batch(2, 40, 56)
    results = []
    for block in (1, 7 * 56 * 3, x.numel() * cfg.samples):
        monkeypatch.setitem(engine_module.BOUND_BLOCK_ELEMENTS, TEST_DEVICE.type, block)
        results.append(FastPreemption(tiny_backbone, config=cfg, seed=3).perturb(x, y, noise_seeds=[11, 12]))
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
    assert (results[0] - x).abs().max() <= cfg.eps + TOL and not torch.equal(results[0], x)


def test_more_samples_than_a_pass_holds_go_in_chunks_of_the_same_noise(tiny_backbone, monkeypatch) -> None:
    """Images at the input size took all N samples in one pass, whatever N: a large --samples ended in an
    out-of-memory kill. Beyond one pass they go in chunks of samples, sized by the image alone, with the
    same (hashed) noise: the result equals the one-pass result but for the order of the sum, and an
    image's bits do not depend on its batch."""
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(4)).to(TEST_DEVICE)
    y = torch.tensor([1, 4, 7], device=TEST_DEVICE)
    cfg = ForeBackConfig(samples=7)
    whole = FastPreemption(tiny_backbone, config=cfg, seed=3).perturb(x, y, noise_seeds=[11, 12, 13])
    monkeypatch.setattr(engine_module, "MIN_SAMPLES_PER_PASS", 1)
    monkeypatch.setitem(engine_module.SAMPLE_PASS_ELEMENTS, TEST_DEVICE.type, 3 * x[0].numel())  # 3 samples
    rows: list[int] = []
    handle = tiny_backbone.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0]))
    try:
        chunked = FastPreemption(tiny_backbone, config=cfg, seed=3).perturb(x, y, noise_seeds=[11, 12, 13])
    finally:
        handle.remove()
    assert max(rows) == 3 and sum(rows) == len(x) * cfg.passes_per_image  # never all 7 (or 21) at once
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=0)
    assert not torch.equal(chunked, x)
    for i in range(3):
        alone = FastPreemption(tiny_backbone, config=cfg, seed=3).perturb(x[i : i + 1], y[i : i + 1],
                                                                           noise_seeds=[11 + i])  # fmt: skip
        assert torch.equal(alone[0], chunked[i]), i
    # up to one pass, the step is the one it was (the default settings' bits are unchanged)
    monkeypatch.setitem(engine_module.SAMPLE_PASS_ELEMENTS, TEST_DEVICE.type, 7 * x[0].numel())
    assert torch.equal(FastPreemption(tiny_backbone, config=cfg, seed=3).perturb(x, y, noise_seeds=[11, 12, 13]), whole)


def test_grayscale_input_through_rgb_backbone(tiny_backbone) -> None:
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(1)).to(TEST_DEVICE)
    cfg = ForeBackConfig(samples=3)
    out = FastPreemption(tiny_backbone, config=cfg).perturb(x, torch.tensor([0, 1]))
    assert out.shape == x.shape
    assert (out - x).abs().max() <= cfg.eps + TOL and (out != x).float().mean() > 0.5


def test_perturb_rejects_bad_shapes(tiny_backbone) -> None:
    engine = FastPreemption(tiny_backbone, config=ForeBackConfig(samples=1))
    with pytest.raises(ValueError, match="NCHW"):
        engine.perturb(torch.rand(3, 32, 32), torch.tensor([0]))
    with pytest.raises(ValueError, match="labels"):
        engine.perturb(torch.rand(2, 3, 32, 32), torch.tensor([0]))
    with pytest.raises(ValueError, match="noise seeds"):
        engine.perturb(torch.rand(2, 3, 32, 32), torch.tensor([0, 1]), noise_seeds=[1])


def test_project() -> None:
    center = torch.tensor([0.0, 0.5, 1.0, 0.02])
    v = torch.tensor([-0.3, 0.9, 0.5, 0.2])
    assert torch.allclose(project(v, center, 0.1), torch.tensor([0.0, 0.6, 0.9, 0.12]))


# -- parsing and validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("8/255", 8 / 255), ("0.0314", 0.0314), ("8", 8 / 255), (" 4/255 ", 4 / 255), ("255", 1.0),
     (0.03, 0.03), (16, 16 / 255),
     # a bare 1 is one level (it once meant the whole range and destroyed images); a written fraction is literal
     ("1", 1 / 255), ("1.0", 1 / 255), (1, 1 / 255), ("255/255", 1.0), ("1/1", 1.0), ("5/510", 2.5 / 255)],
)  # fmt: skip
def test_parse_eps_accepts(text, expected) -> None:
    assert parse_eps(text) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("text", ["abc", "0", "-1", "", "1/0", "8/255/2", "300", "-8/255", "nan", "inf", "300/255",
                                  "2/1", float("nan"), float("inf"), "2.5", 1.5])
def test_parse_eps_rejects(text) -> None:
    with pytest.raises(ConfigError) as info:
        parse_eps(text)
    assert "eps" in str(info.value)


@pytest.mark.parametrize(
    "changes",
    [
        dict(eps=0.0), dict(eps=-0.1), dict(eps=1.5), dict(eps=1), dict(eps=8), dict(eta=0.0), dict(eta=-1.0), dict(eta=float("nan")),
        dict(eta=float("inf")), dict(eps=float("nan")),
        dict(forward_steps=-1), dict(backward_steps=-2), dict(forward_steps=0, backward_steps=0),
        dict(samples=0), dict(sample_projection="nearest"), dict(inner_steps=0),
    ],
)  # fmt: skip
def test_config_rejects_invalid_values(changes) -> None:
    with pytest.raises(ConfigError):
        ForeBackConfig(**changes)
    with pytest.raises(ConfigError):
        ForeBackConfig().with_(**changes)


def test_unknown_preset_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="paper"):
        ForeBackConfig.from_preset("fastest")


def test_passes_per_image() -> None:
    assert ForeBackConfig().passes_per_image == 60  # (1 + 2) * 20, as in the paper
    assert ForeBackConfig.from_preset("mspd").passes_per_image == 40
    assert ForeBackConfig(forward_steps=3, backward_steps=0, samples=7).passes_per_image == 21
    assert ForeBackConfig(samples=4, inner_steps=5).passes_per_image == 3 * 4 * 5


def test_config_round_trips_as_dict() -> None:
    cfg = ForeBackConfig.from_preset("mspd", eps=4 / 255)
    assert ForeBackConfig(**cfg.as_dict()) == cfg


# -- precision --------------------------------------------------------------------------------------------
def test_bf16_keeps_budget_determinism_and_mostly_the_fp32_result(tiny_backbone, cifar_batch) -> None:
    x, y = cifar_batch
    fp32 = FastPreemption(tiny_backbone, precision="fp32").perturb(x, y)
    bf16 = FastPreemption(tiny_backbone, precision="bf16").perturb(x, y)
    again = FastPreemption(tiny_backbone, precision="bf16").perturb(x, y)
    assert torch.equal(bf16, again)
    assert (bf16 - x).abs().max() <= 8 / 255 + 1e-6 and bf16.min() >= 0 and bf16.max() <= 1
    # bf16 changes the backbone's arithmetic, not the algorithm: the perturbations point the same way
    d32, d16 = (fp32 - x).flatten(1), (bf16 - x).flatten(1)
    assert F.cosine_similarity(d32, d16).min() > 0.8


def test_precision_names_resolve() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    assert resolve_precision("auto", cpu) == ("bf16" if native_bf16(cpu) else "fp32")
    with pytest.raises(ConfigError, match="precision"):
        resolve_precision("fp8", cpu)


# -- torch.compile ------------------------------------------------------------------------------------------
def test_compiled_backbone_gives_the_eager_result(tiny_backbone, cifar_batch) -> None:
    """``compile="default"`` (Inductor; ~30 s to compile on 2 CPU cores) runs the same algorithm: within the
    budget, reproducible, and equal to eager up to a rare gradient sign flipped by float rounding."""
    x, y = cifar_batch
    cfg = ForeBackConfig(samples=3)
    eager = FastPreemption(tiny_backbone, config=cfg, seed=1).perturb(x, y)
    engine = FastPreemption(tiny_backbone, config=cfg, seed=1, compile="default")
    out = engine.perturb(x, y)
    assert torch.equal(out, engine.perturb(x, y))
    assert (out - x).abs().max() <= cfg.eps + TOL
    assert ((out - eager).abs() <= 1e-5).float().mean() > 0.99
    with pytest.raises(ConfigError, match="compile"):
        FastPreemption(tiny_backbone, compile="fast")


def test_a_backbone_left_in_train_mode_runs_in_eval_mode_and_gets_its_mode_back(cifar_batch) -> None:
    from conftest import tiny_config
    from preempt_cli.models import ImageModel, create_arch

    torch.manual_seed(0)
    net = create_arch("cifar_resnet20", num_classes=10, shortcut="pad_end")
    for m in net.modules():  # non-trivial running statistics, as after training
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    model = ImageModel(net, tiny_config()).to(TEST_DEVICE).train()  # e.g. mid-training, in a library
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = cifar_batch[0][:3], cifar_batch[1][:3]
    engine = FastPreemption(model, config=ForeBackConfig(samples=2), device=TEST_DEVICE)
    together = engine.perturb(x, y, noise_seeds=[1, 2, 3])
    alone = engine.perturb(x[:1], y[:1], noise_seeds=[1])
    # with batch statistics the first image's result would depend on the other two
    torch.testing.assert_close(together[:1], alone, rtol=0, atol=1e-6)
    assert all(torch.equal(v, stats[k]) for k, v in model.state_dict().items())  # running stats untouched
    assert all(m.training for m in model.modules())


def test_threads_sharing_a_training_model_keep_its_eval_mode_until_the_last_leaves() -> None:
    """The first thread to leave eval_mode gave a training model its train mode back while another was still
    inside: that thread's BatchNorm then took batch statistics (47 of 48 shared-protector results differed,
    and the running statistics changed for good)."""
    import threading

    from preempt_cli.engine import eval_mode

    model = torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.Dropout()).train()
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen: list[bool] = []

    def first() -> None:
        with eval_mode(model):
            first_in.set()
            second_in.wait(10)
        first_out.set()

    def second() -> None:
        first_in.wait(10)
        with eval_mode(model):
            second_in.set()
            first_out.wait(10)
            seen.append(any(m.training for m in model.modules()))  # the first has left; this one has not

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert seen == [False]
    assert all(m.training for m in model.modules())  # back once both left


def test_a_classifier_naming_the_classes_in_another_order_is_refused(tiny_backbone, tiny_classifier) -> None:
    from dataclasses import replace

    from preempt_cli.protect import Protector

    Protector(tiny_backbone, tiny_classifier)  # the same classes, the same order
    shuffled = tuple(reversed(tiny_classifier.config.classes))
    tiny_classifier.config = replace(tiny_classifier.config, classes=shuffled)
    with pytest.raises(ConfigError, match="different order"):
        Protector(tiny_backbone, tiny_classifier)


def test_the_library_default_budget_follows_the_backbones_dataset(tiny_backbone) -> None:
    from dataclasses import replace

    from preempt_cli.protect import Protector

    assert Protector(tiny_backbone).config.eps == 8 / 255
    tiny_backbone.config = replace(tiny_backbone.config, dataset="imagenet-1k")
    assert Protector(tiny_backbone).config.eps == 4 / 255

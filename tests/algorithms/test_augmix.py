import pytest
import torch
from conftest import SeenInputs, bad_arguments_test, fit_small_cnn, plan_of, random_images
from speedup.algorithms.augmix import AugMix, augmix_batch, augmix_weights
from speedup.algorithms.randaugment import MAX_ENHANCE, RandAugment

from speedup.data import TensorBatchLoader
from speedup.event import Event

# -- the math ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("width", "alpha"), [(3, 1.0), (4, 0.5)])
def test_mixing_weights_are_dirichlet_and_beta(width, alpha):
    chains, original = augmix_weights(20_000, width, alpha, torch.Generator().manual_seed(0))
    assert chains.shape == (20_000, width) and original.shape == (20_000,)
    assert chains.min() >= 0 and original.min() >= 0 and original.max() <= 1
    torch.testing.assert_close(chains.sum(-1), torch.ones(20_000))
    torch.testing.assert_close(chains.mean(0), torch.full((width,), 1 / width), atol=0.01, rtol=0)
    # Dirichlet(alpha) marginals are Beta(alpha, (width - 1) alpha)
    a, b = alpha, (width - 1) * alpha
    expected_var = a * b / ((a + b) ** 2 * (a + b + 1))
    assert chains[:, 0].var().item() == pytest.approx(expected_var, rel=0.06)
    assert original.mean().item() == pytest.approx(0.5, abs=0.01)


def test_chains_of_identity_mix_back_to_the_image():
    x = torch.randn(8, 3, 10, 10)
    out = augmix_batch(x, augmentation_set="identity", generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)  # the weights sum to one


def test_each_image_is_a_convex_blend_of_its_chains():
    # With one brightness op per chain and no clipping, every chain is the image times a factor
    # in [1 - 0.9 * 0.3, 1 + 0.9 * 0.3] (severity 3), so the blend is the image times a
    # per-image factor in that range.
    g = torch.Generator().manual_seed(0)
    x = 0.1 + 0.6 * torch.rand(64, 3, 8, 8, generator=g)
    out = augmix_batch(
        x, 3, depth=1, width=3, augmentation_set="brightness", generator=g, value_range=(0, 1)
    )
    ratio = (out / x).flatten(1)
    spread = MAX_ENHANCE * 0.3
    assert torch.all(ratio.std(dim=1) < 1e-5)  # one factor per image
    factor = ratio[:, 0]
    assert factor.min() >= 1 - spread - 1e-5 and factor.max() <= 1 + spread + 1e-5
    assert factor.std() > 0.02  # images blend differently


def test_results_repeat_with_a_generator_and_stay_in_range():
    x = torch.randn(16, 3, 12, 12)
    a = augmix_batch(x, generator=torch.Generator().manual_seed(0))
    b = augmix_batch(x, generator=torch.Generator().manual_seed(0))
    c = augmix_batch(x, augmentation_set="all", generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.allclose(a, x)
    low, high = x.amin(dim=(0, 2, 3)), x.amax(dim=(0, 2, 3))
    assert torch.all(a.amin(dim=(0, 2, 3)) >= low - 1e-5)
    assert torch.all(a.amax(dim=(0, 2, 3)) <= high + 1e-5)
    fixed = augmix_batch(x, depth=2, width=1, generator=torch.Generator().manual_seed(0))
    assert fixed.shape == x.shape and torch.isfinite(fixed).all()


test_bad_arguments_raise_naming_the_argument = bad_arguments_test(
    AugMix,
    [
        ({"severity": 0}, r"augmix.severity must be in \(0, 10\], got 0"),
        ({"depth": 0}, "augmix.depth must be -1"),
        ({"width": 0}, "augmix.width must be an integer >= 1, got 0"),
        ({"alpha": -1.0}, "augmix.alpha must be > 0"),
        ({"augmentation_set": "wild"}, "augmix.augmentation_set 'wild'"),
    ],
)


def test_declaration_orders_it_after_randaugment():
    algorithms = [AugMix(), RandAugment()]
    plan = plan_of(algorithms, data_kind="image")
    assert plan.conflicts == []
    assert plan.order[Event.AFTER_DATALOADER] == ["randaugment", "augmix"]
    declared = AugMix().declare()
    assert declared.events[Event.AFTER_DATALOADER].writes == {"batch.inputs"}
    assert {"cutout", "colout", "mixup", "cutmix", "progressive_resizing"} <= declared.runs_before
    assert declared.data_kinds == {"image"}


# -- in a run ---------------------------------------------------------------------------------


def test_twenty_steps_train_on_augmixed_images_and_eval_is_clean():
    data = random_images(32, 12, 10)
    seen = SeenInputs()
    fit_small_cnn(data, AugMix(), 20, [seen], eval_data=data, eval_batch_size=32)
    assert len(seen.losses) == 20 and all(torch.isfinite(loss) for loss in seen.losses)
    clean = TensorBatchLoader(data, 8, shuffle=True, drop_last=True)
    clean.set_epoch(0)
    for batch, inputs in zip(clean, seen.train):
        assert (inputs != batch["inputs"]).flatten(1).any(1).all()  # every image is blended
    assert seen.eval and all(torch.equal(inputs, data["inputs"]) for inputs in seen.eval)

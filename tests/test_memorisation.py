"""The memorisation test: copies (exact, noisy, resized) are flagged, new images are not, in both spaces."""

from __future__ import annotations

import pytest
import torch

from moas.eval.memorisation import memorisation_report, memorised, nearest_ratio
from moas.eval.tag_model import TagModel, prepare, resize_images


def smooth_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """uint8 (n, 3, size, size): random 4×4 colour fields, upsampled, so images differ at every scale."""
    low = torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed)) * 255
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear").round().to(torch.uint8)


@pytest.fixture(scope="module")
def features():
    torch.manual_seed(0)
    model = TagModel(3).eval()  # untrained: a copy has the same features whatever the weights

    @torch.no_grad()
    def fn(images):
        return model.features(prepare(images))

    return fn


def test_nearest_ratio_by_hand():
    train = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 30.0]])
    gen = torch.tensor([[1.0, 0.0], [5.0, 0.0]])
    ratio, nearest = nearest_ratio(gen, train)
    assert ratio.tolist() == pytest.approx([1 / 9, 1.0]) and nearest.tolist()[0] == 0
    assert memorised(gen, train).tolist() == [True, False]
    assert memorised(gen, train, threshold=0.1).tolist() == [False, False]
    # equal to two identical training samples: 0 / 0 counts as a copy
    assert nearest_ratio(torch.zeros(1, 2), torch.zeros(3, 2))[0].tolist() == [0.0]


def test_copies_are_flagged_and_new_images_are_not(features):
    train = smooth_images(20, seed=1)
    noisy = train[7].int() + torch.randint(-3, 4, train[7].shape, generator=torch.Generator().manual_seed(2))
    gen = [
        train[3],  # an exact copy
        noisy.clamp(0, 255).to(torch.uint8),  # a copy with a little noise
        resize_images(train[11], 64)[0],  # a copy at another size
        *smooth_images(3, seed=99),  # new images
    ]
    gen_f, train_f = features(gen), features(train)
    rep = memorisation_report(gen, train, gen_f, train_f)
    copies = [True, True, True, False, False, False]
    assert memorised(gen_f, train_f).tolist() == copies
    assert rep["nearest_features"][:3] == [3, 7, 11] and rep["nearest_pixels"][:3] == [3, 7, 11]
    assert rep["features"]["count"] == 3 and rep["pixels"]["count"] == 3
    assert rep["combined"]["rate"] == pytest.approx(0.5) and rep["flagged"] == [0, 1, 2]
    assert rep["n_generated"] == 6 and rep["n_train"] == 20 and rep["pixels"]["size"] == 16


def test_each_space_catches_what_the_other_misses():
    train = smooth_images(10, seed=3)
    gen = smooth_images(2, seed=4)
    cloud = torch.rand(9, 8, generator=torch.Generator().manual_seed(5)) + 5  # features 5..6
    train_f = torch.cat([torch.zeros(1, 8), cloud])
    gen_f = torch.stack(
        [torch.zeros(8), torch.full((8,), 5.5)]
    )  # a copy of training image 0; the cloud's centre
    rep = memorisation_report(gen, train, gen_f, train_f)
    assert rep["features"]["count"] == 1 and rep["pixels"]["count"] == 0 and rep["flagged"] == [0]
    far = torch.full((2, 8), 50.0)  # features equally far from every training image
    rep = memorisation_report(torch.stack([train[4], gen[1]]), train, far, train_f)
    assert rep["features"]["count"] == 0 and rep["pixels"]["count"] == 1 and rep["flagged"] == [0]


def test_too_few_training_images_is_a_clear_error(features):
    one = smooth_images(1)
    with pytest.raises(ValueError, match="at least 2 training images"):
        memorisation_report(one, one, features(one), features(one))

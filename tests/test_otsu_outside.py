"""The adaptive threshold against implementations from outside the project, on real joints.

The joints are the shipped reference model's (heads' top-50 over the paper's prompts and a
few from its own domain, weighted by its co-occurrence masks): the peaked, mostly-zero grids
the sampler really thresholds. Otsu's split is held to scikit-image's `threshold_otsu` and the
blur to scipy.ndimage's n-dimensional correlation with the whole binomial kernel, neither of which the runtime uses for these steps
(runtime/otsu.py bins and blurs by hand for speed).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage.filters import threshold_otsu
from tokenizers import Tokenizer

from dynamo_bench.prompts import PAPER_PROMPTS
from dynamo_export import DynaMoForCausalLM
from runtime import CooccurrenceMask, SamplingConfig
from runtime.dynamic import DynamicSampler
from runtime.grid import Scratch
from runtime.marginals import heads_topk
from runtime.otsu import OTSU_BINS, blurred_grid, otsu_split

T3 = Path(__file__).resolve().parents[1] / "artifacts" / "reference-t3"
PROMPTS = (*PAPER_PROMPTS, "The os module provides", "def read_file(path):", "import os\n")
BEFORE_OTSU = SamplingConfig(adaptive=False, blur=0, repetition_penalty=1.0)  # J as Otsu receives it


@pytest.fixture(scope="module")
def real_joints() -> list[np.ndarray]:
    """J over the 50 x 50 x 50 grid of heads 1..3 at the last position of every prompt."""
    model = DynaMoForCausalLM.from_pretrained(T3).eval()
    tokenizer = Tokenizer.from_file(str(T3 / "tokenizer.json"))
    masks = CooccurrenceMask.load(T3 / "cooccurrence", expected_vocab_size=tokenizer.get_vocab_size())
    joints = []
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt).ids
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits  # (batch, heads, positions, vocab)
        rows = logits[0, :, -1].numpy().astype(np.float32)
        topks = heads_topk(rows, BEFORE_OTSU.top_k, BEFORE_OTSU.temperature)
        joints.append(DynamicSampler().joint(topks, ids, masks, BEFORE_OTSU).copy())
    return joints


def test_otsus_split_is_scikit_images_on_real_joints(real_joints):
    """Our split of the 256-bin histogram is the bin whose centre threshold_otsu returns."""
    for joint in real_joints:
        blurred = blurred_grid(joint, 3, Scratch())
        counts, edges = np.histogram(blurred, bins=OTSU_BINS)  # the histogram threshold_otsu builds
        centres = (edges[:-1] + edges[1:]) / 2
        assert threshold_otsu(blurred, nbins=OTSU_BINS) == pytest.approx(
            centres[otsu_split(counts)], rel=1e-12
        )


def test_the_blur_is_scipys_correlation_with_the_binomial_kernel(real_joints):
    """One 3 x 3 x 3 correlation with the outer product of [1, 2, 1] / 4, borders mirrored (OpenCV's
    3-tap Gaussian and default border), against the runtime's three passes along the axes."""
    kernel = np.einsum("i,j,k->ijk", *[np.array([0.25, 0.5, 0.25])] * 3)
    for joint in real_joints:
        ours = blurred_grid(joint, 3, Scratch()) / 2.0**joint.ndim  # blurred_grid keeps a 2 ** ndim factor
        theirs = ndimage.correlate(joint, kernel, mode="mirror")
        np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-18)


def test_the_joints_are_worth_thresholding(real_joints):
    """The grids are the sparse, peaked kind the sampler meets (else the tests above prove little)."""
    for joint in real_joints:
        assert joint.shape == (50, 50, 50)
        assert 0 < np.count_nonzero(joint) < joint.size / 4

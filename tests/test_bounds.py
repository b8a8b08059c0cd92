"""Bounds on every option and input (issue 19, item 4): each is refused up front with the runtime's
typed error naming the option and its range, never a bare numpy/ORT/tokenizers error, a hang, or a
silent change of behaviour."""

from __future__ import annotations

import time

import pytest

from runtime import DynaMoRuntime, InputError, ProviderError, SamplingConfig, SamplingConfigError
from runtime.config import MAX_ALPHA_C, MAX_BLUR, MAX_TEMPERATURE
from runtime.engine import MAX_GRID_CELLS, _check_grid


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"blur": 100_001}, "blur"),  # never finished, and ignored the time limit
        ({"blur": MAX_BLUR + 2}, "blur"),
        ({"alpha_c": 200.0}, "alpha_c"),  # W ** 200 overflowed to NaN and silently became ar
        ({"alpha_c": MAX_ALPHA_C * 1.01}, "alpha_c"),
        ({"temperature": 2**1100}, "temperature"),  # an int too large for a float: OverflowError
        ({"temperature": MAX_TEMPERATURE + 1}, "temperature"),
        ({"top_k": 10**400}, "top_k"),
    ],
)
def test_sampling_options_have_upper_bounds(changes, named):
    with pytest.raises(SamplingConfigError, match=rf"\b{named}=.{{0,40}} is out of range"):
        SamplingConfig(**changes)


def test_the_bounds_admit_their_edges():
    config = SamplingConfig(blur=MAX_BLUR, alpha_c=MAX_ALPHA_C, temperature=MAX_TEMPERATURE)
    assert (config.blur, config.alpha_c, config.temperature) == (MAX_BLUR, MAX_ALPHA_C, MAX_TEMPERATURE)


@pytest.fixture(scope="module")
def runtime(tiny_artifact) -> DynaMoRuntime:
    return DynaMoRuntime.load(tiny_artifact.out)


@pytest.mark.parametrize("seed", ["abc", b"x", -1, 2**128, 1.5, True])
def test_seeds_must_be_integers_in_range(runtime, seed):
    with pytest.raises(InputError, match=r"seed=.* must be None or an integer"):
        runtime.generate([5, 6], 4, seed=seed)


@pytest.mark.parametrize("threads", [10**4, "abc", 0, 2.0, True])
def test_thread_counts_are_bounded(tiny_artifact, threads):
    with pytest.raises(ProviderError, match=r"threads=.* must be an integer in 1\.\."):
        DynaMoRuntime.load(tiny_artifact.out, threads=threads)


def test_a_lone_surrogate_prompt_is_an_input_error(bpe_models):
    rt = DynaMoRuntime.load(bpe_models / "t3-onnx")
    with pytest.raises(InputError, match="not valid Unicode"):
        rt.generate("abc\ud800def", 4)


def test_a_huge_prompt_is_refused_before_tokenizing(bpe_models):
    rt = DynaMoRuntime.load(bpe_models / "t3-onnx")
    prompt = "word " * 2_000_000  # 10 MB
    start = time.perf_counter()
    with pytest.raises(InputError, match="characters, more than the model's context can hold"):
        rt.generate(prompt, 4)
    assert time.perf_counter() - start < 1.0  # tokenizing it took seconds and 1.6 GB


def test_a_prompt_at_the_character_bound_is_still_tokenized(bpe_models):
    rt = DynaMoRuntime.load(bpe_models / "t3-onnx")
    # Not refused early: short enough to be tokenized, then refused for its token count.
    prompt = "x" * (rt.manifest.model.context_length + 5)
    with pytest.raises(InputError, match=r"the prompt has .* tokens but the model's context"):
        rt.generate(prompt, 4)


def test_dynamic_grids_are_bounded_by_heads_and_top_k():
    _check_grid(SamplingConfig(top_k=50), 4)  # 6.25M cells: fits
    _check_grid(SamplingConfig(mode="verify", top_k=50), 5)  # verify builds no grid
    _check_grid(SamplingConfig(top_k=50, eps_b=1.0), 5)  # eps_b = 1 never builds one
    with pytest.raises(InputError, match=r"50\^5-cell grid.*use top_k <= 24, or mode='verify'"):
        _check_grid(SamplingConfig(top_k=50), 5)
    assert 24**5 <= MAX_GRID_CELLS < 25**5


def test_masks_larger_than_the_memory_limit_are_refused_before_reading(tiny_artifact):
    from runtime import CooccurrenceFileError
    from runtime.cooccurrence_file import load_cooccurrence, loaded_bytes

    meta, _ = load_cooccurrence(tiny_artifact.out / "cooccurrence")
    need = loaded_bytes(meta)
    with pytest.raises(
        CooccurrenceFileError, match=r"declares .* n-grams, .* bytes once loaded, over max_memory"
    ):
        DynaMoRuntime.load(tiny_artifact.out, max_memory_bytes=need - 1)
    DynaMoRuntime.load(tiny_artifact.out, max_memory_bytes=need + 10**6)  # the limit admits what fits


def test_a_deeply_nested_artifact_is_walked_without_recursion(tiny_artifact, tmp_path):
    import shutil

    from runtime import ArtifactFileError
    from runtime.manifest import walk

    root = tmp_path / "nested"
    shutil.copytree(tiny_artifact.out, root)
    deep = root
    for _ in range(1100):  # rglob recursed once per level: RecursionError past ~1000
        deep = deep / "d"
        deep.mkdir()
    (deep / "stowaway.bin").write_bytes(b"x")
    try:
        with pytest.raises(ArtifactFileError, match=r"stowaway\.bin"):
            DynaMoRuntime.load(root)
    finally:  # shutil.rmtree (and pytest's own clean-up) recurse as deep as the tree
        for path in sorted(walk(root / "d"), key=lambda p: len(p.parts), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
        (root / "d").rmdir()

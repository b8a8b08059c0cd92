"""Sampling options of the runtime, checked once when they are made.

Defaults are the paper's (DynaMo, Tuli et al. 2024, see docs/METHOD.md): top-k 50,
temperature 0.7, repetition penalty 1.1, alpha_c 1.0, Otsu thresholding after a
3-wide Gaussian blur. Two values the paper leaves open are ours:

- eps_b = 0.6: the fastest setting of the eps_b sweep (0, 0.1, ..., 1) that kept
  ar's quality on the shipped reference model (`make bench`: MAUVE, self-BLEU and
  judged PPL each within ar's seed-to-seed spread; 1.21 tokens per pass, 1.12x
  wall-clock; at 0.5 self-BLEU already leaves ar's band: the text repeats itself).
  The paper reports its 7.3B results and ablation at 0.5, where a far larger
  model's heads are confident enough; rerun the sweep for your model.
- static_threshold = 0.0 (off): the paper names a static threshold on the joint
  but gives no value. Otsu's adaptive threshold already removes the tail of the
  grid, so the static one stays off unless asked for.

A config is frozen and validated in `__post_init__`, so every config that
exists is valid; `replace` makes a changed copy through the same checks. All
problems are reported together, each naming the option and what it accepts.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from typing import Any

from runtime.errors import SamplingConfigError

MODES = ("dynamic", "ar", "verify")
# The joint grid has top_k ** n entries: 100 ** 3 is a million float64 cells (8 MB
# per buffer) and already far slower than a forward pass of a small model.
MAX_TOP_K = 100
# A blur wider than the grid only mirrors the same cells again.
MAX_BLUR = 2 * MAX_TOP_K - 1
# W ** alpha_c: co-occurrence weights reach ~1e10 for rare n-grams, so a power past 8 can
# overflow float64 and turn the joint into infinities and zeros.
MAX_ALPHA_C = 8.0
# Past this the softmax is flat to the last bit; huge values only overflow.
MAX_TEMPERATURE = 100.0


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to pick tokens from the heads' logits (modes and Algorithm 1's knobs).

    mode: "dynamic" (Algorithm 1), "ar" (head 1 alone, one token per pass) or
        "verify" (heads 2..n draft, head 1 verifies with speculative sampling).
    eps_b: back-off strength in [0, 1]; the sampler emits n tokens only if some
        joint entry exceeds eps_b ** (n - 1). 0 always emits n, 1 is plain AR.
    top_k: candidates kept per head, 1..MAX_TOP_K.
    temperature: in [0, MAX_TEMPERATURE]; 0 means greedy (argmax of the same joint/distribution).
    repetition_penalty: >= 1; probabilities of already generated tokens are divided by it.
    alpha_c: in [0, MAX_ALPHA_C]; exponent of the co-occurrence weights (0 disables masking).
    adaptive: Otsu's threshold on the joint on/off.
    blur: Gaussian (binomial) kernel size for the blur before Otsu; 0 = off, else odd, <= MAX_BLUR.
    static_threshold: joint entries below it are zeroed, in [0, 1).
    stop: token ids and/or strings that end generation.
    """

    mode: str = "dynamic"
    eps_b: float = 0.6
    top_k: int = 50
    temperature: float = 0.7
    repetition_penalty: float = 1.1
    alpha_c: float = 1.0
    adaptive: bool = True
    blur: int = 3
    static_threshold: float = 0.0
    stop: tuple[int | str, ...] = ()

    def __post_init__(self) -> None:
        # A lone stop string must not become a tuple of its characters.
        stop = (self.stop,) if isinstance(self.stop, (str, numbers.Integral)) else self.stop
        if isinstance(stop, (list, tuple)):
            object.__setattr__(self, "stop", tuple(int(s) if _is_int(s) else s for s in stop))
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def validate(self) -> None:
        """Raise SamplingConfigError listing every invalid or conflicting option."""
        problems = [
            *_choice("mode", self.mode, MODES),
            *_real("eps_b", self.eps_b, "a number in [0, 1]", lambda v: 0 <= v <= 1),
            *_integer("top_k", self.top_k, f"an integer in 1..{MAX_TOP_K}", lambda v: 1 <= v <= MAX_TOP_K),
            *_real(
                "temperature",
                self.temperature,
                f"a number in [0, {MAX_TEMPERATURE:g}] (0 = greedy)",
                lambda v: 0 <= v <= MAX_TEMPERATURE,
            ),
            *_real(
                "repetition_penalty",
                self.repetition_penalty,
                "a finite number >= 1 (below 1 repeated tokens would gain mass and the joint "
                "would stop being a probability)",
                lambda v: v >= 1,
            ),
            *_real(
                "alpha_c",
                self.alpha_c,
                f"a number in [0, {MAX_ALPHA_C:g}] (0 disables masking; larger powers overflow)",
                lambda v: 0 <= v <= MAX_ALPHA_C,
            ),
            *_boolean("adaptive", self.adaptive),
            *_integer(
                "blur",
                self.blur,
                f"0 (off) or an odd kernel size in 1..{MAX_BLUR}",
                lambda v: v == 0 or (0 < v <= MAX_BLUR and v % 2 == 1),
            ),
            *_real("static_threshold", self.static_threshold, "a number in [0, 1)", lambda v: 0 <= v < 1),
            *_stops(self.stop),
        ]
        if _is_int(self.blur) and self.blur > 0 and self.adaptive is False:
            problems.append(
                f"blur={self.blur} conflicts with adaptive=False: the blur only feeds Otsu's "
                "threshold; set blur=0, or adaptive=True"
            )
        if problems:
            raise SamplingConfigError("invalid SamplingConfig: " + "; ".join(problems))

    def replace(self, **changes: Any) -> SamplingConfig:
        """A copy with `changes` applied, validated like a new config."""
        _reject_unknown(changes, "SamplingConfig.replace")
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_manifest_defaults(cls, defaults: Mapping[str, Any]) -> SamplingConfig:
        """The config an artifact's manifest `sampling_defaults` describes; missing keys keep the paper's."""
        _reject_unknown(defaults, "manifest sampling_defaults")
        return cls(**dict(defaults))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, the inverse of `from_manifest_defaults` (what an exporter writes)."""
        values = dataclasses.asdict(self)
        values["stop"] = list(self.stop)
        return values


def _reject_unknown(names: Mapping[str, Any], where: str) -> None:
    known = [f.name for f in dataclasses.fields(SamplingConfig)]
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise SamplingConfigError(f"{where}: unknown options {unknown}; accepted: {known}")


def _is_int(value: Any) -> bool:
    # numbers.Integral admits numpy integers (token ids often come from arrays); bool is not a count.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _choice(name: str, value: Any, accepted: tuple[str, ...]) -> list[str]:
    return [] if value in accepted else [f"{name}={value!r} is not one of {list(accepted)}"]


def _real(name: str, value: Any, accepted: str, ok) -> list[str]:
    number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    try:
        finite = number and math.isfinite(value)
    except OverflowError:  # an int too large for a float
        finite = False
    if finite and ok(value):
        return []
    return [f"{name}={_short(value)} is out of range: expected {accepted}"]


def _short(value: Any) -> str:
    """repr of a value, cut short: a 10**400 in a message helps nobody."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def _integer(name: str, value: Any, accepted: str, ok) -> list[str]:
    return (
        []
        if _is_int(value) and ok(value)
        else [f"{name}={_short(value)} is out of range: expected {accepted}"]
    )


def _boolean(name: str, value: Any) -> list[str]:
    return [] if isinstance(value, bool) else [f"{name}={value!r} must be True or False"]


def _stops(stop: Any) -> list[str]:
    if not isinstance(stop, tuple):
        return [f"stop={stop!r} must be a sequence of token ids and/or strings"]
    bad = [s for s in stop if not ((_is_int(s) and s >= 0) or (isinstance(s, str) and s))]
    if bad:
        return [f"stop has invalid entries {bad!r}: expected token ids >= 0 or non-empty strings"]
    return []

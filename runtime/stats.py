"""What a generation did, as numbers users read: passes, emissions, verify's acceptance, time split.

The verify figures are those ONNX Runtime GenAI's speculative-decoding benchmark reports:
the acceptance rate (accepted drafts over drafted ones), acceptance per draft position
(position j is checked only when the drafts before it passed, so its rate is conditional),
and the mean number of tokens emitted per pass ("per round").
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GenerationStats:
    forward_passes: int = 0
    # tokens the sampler emitted in one pass -> passes
    emissions: dict[int, int] = field(default_factory=dict)
    backoffs: int = 0  # dynamic: times n was lowered, summed over passes
    drafted: int = 0  # verify: drafts fed to the graph
    accepted: int = 0  # verify: drafts accepted
    checked_at: list[int] = field(default_factory=list)  # verify: per draft position, times it was checked
    accepted_at: list[int] = field(default_factory=list)  # verify: per draft position, times it passed
    # verify: the n-gram order whose weights shaped a draft's q (1: the marginal) -> drafts
    draft_orders: dict[int, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    new_tokens: int = 0
    first_pass_tokens: int = 0
    prefill_s: float = 0.0  # first pass: prompt through the graph + first sampling
    decode_s: float = 0.0  # every later pass
    decode_ort_s: float = 0.0
    decode_sampling_s: float = 0.0
    stop_reason: str = ""  # max_new_tokens | stop | context

    def record_check(self, drafts: int, accepted: int) -> None:
        """One verify pass checked `drafts` drafts and accepted the first `accepted` of them."""
        if len(self.checked_at) < drafts:
            grow = drafts - len(self.checked_at)
            self.checked_at.extend([0] * grow)
            self.accepted_at.extend([0] * grow)
        for j in range(min(accepted + 1, drafts)):  # the first rejected one was checked too
            self.checked_at[j] += 1
        for j in range(accepted):
            self.accepted_at[j] += 1
        self.drafted += drafts
        self.accepted += accepted

    @property
    def tokens_per_pass(self) -> float:
        return self.new_tokens / self.forward_passes if self.forward_passes else 0.0

    @property
    def mean_emitted(self) -> float:
        """Tokens the sampler emitted per pass, before stop and length cuts (GenAI's per round)."""
        passes = sum(self.emissions.values())
        return sum(n * count for n, count in self.emissions.items()) / passes if passes else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def acceptance_by_position(self) -> list[float]:
        """Per draft position, accepted over checked (given that every earlier draft passed)."""
        return [a / c if c else 0.0 for a, c in zip(self.accepted_at, self.checked_at, strict=True)]

    @property
    def tokens_per_s(self) -> float:
        total = self.prefill_s + self.decode_s
        return self.new_tokens / total if total > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first pass over the time after it: the steady-state speed."""
        later = self.new_tokens - self.first_pass_tokens
        return later / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def sampling_share(self) -> float:
        """Sampling time over ONNX Runtime time during decode."""
        return self.decode_sampling_s / self.decode_ort_s if self.decode_ort_s > 0 else 0.0

    def merge(self, other: GenerationStats) -> None:
        """Add another generation's counts and times (its stop reason is dropped)."""
        for name in ("forward_passes", "backoffs", "prompt_tokens", "new_tokens", "first_pass_tokens"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in ("prefill_s", "decode_s", "decode_ort_s", "decode_sampling_s"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for mine, theirs in ((self.emissions, other.emissions), (self.draft_orders, other.draft_orders)):
            for key, count in theirs.items():
                mine[key] = mine.get(key, 0) + count
        for j, (checked, accepted) in enumerate(zip(other.checked_at, other.accepted_at, strict=True)):
            if j == len(self.checked_at):
                self.checked_at.append(0)
                self.accepted_at.append(0)
            self.checked_at[j] += checked
            self.accepted_at[j] += accepted
        self.drafted += other.drafted
        self.accepted += other.accepted

    def to_dict(self) -> dict:
        fields_ = {k: v for k, v in vars(self).items() if k not in ("emissions", "draft_orders")}
        return {
            **fields_,
            "emissions": {str(k): v for k, v in sorted(self.emissions.items())},
            "draft_orders": {str(k): v for k, v in sorted(self.draft_orders.items())},
            "tokens_per_pass": self.tokens_per_pass,
            "mean_emitted": self.mean_emitted,
            "acceptance_rate": self.acceptance_rate,
            "acceptance_by_position": self.acceptance_by_position,
            "tokens_per_s": self.tokens_per_s,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "sampling_share": self.sampling_share,
        }

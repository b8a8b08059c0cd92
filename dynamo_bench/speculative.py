"""verify mode's figures, as ONNX Runtime GenAI's speculative-decoding benchmark reports them.

Per verify runner (the artifact's conditioned drafts, and alpha_c = 0's marginal drafts as
the comparison), from the first timed round's decoder stats:
- acceptance_rate: accepted drafts over drafted ones;
- acceptance_by_position: per draft position, accepted over checked; position j is checked
  only when every draft before it passed, so these are conditional rates a_1, a_2, ...;
- mean_emitted: tokens emitted per pass ("per round"), before stop and length cuts;
- estimated_speedup: what the acceptance alone predicts against `ar`,
  (1 + a_1 + a_1 a_2 + ...) / (verify's decode ms per pass / ar's), the pass times measured
  in the same run; observed_speedup: the measured median wall-clock tokens/s over ar's. The
  gap between the two is what neither counts: prefill, the loop's bookkeeping, short
  generations that stop mid-pass.
And one check over every prompt: greedy verify emits greedy ar's tokens, token for token.
"""

from __future__ import annotations

from collections.abc import Sequence

from dynamo_bench.prompts import Prompt
from runtime import DynaMoRuntime


def figures(runs: dict[str, dict], speedups: dict[str, dict]) -> dict[str, dict]:
    """{verify runner: its speculative figures} (see the module docstring)."""
    ar_pass = runs.get("ar", {}).get("latency", {}).get("decode_ms_per_pass", {}).get("median")
    out = {}
    for label, run in runs.items():
        if run.get("mode") != "verify":
            continue
        lat = run["latency"]
        expected, reach = 1.0, 1.0
        for rate in lat.get("acceptance_by_position") or []:
            reach *= rate
            expected += reach
        own_pass = lat["decode_ms_per_pass"]["median"]
        cost = own_pass / ar_pass if own_pass and ar_pass else None
        out[label] = {
            "alpha_c": run["sampling"]["alpha_c"],
            "acceptance_rate": lat.get("acceptance_rate"),
            "acceptance_by_position": lat.get("acceptance_by_position"),
            "mean_emitted": lat.get("mean_emitted"),
            "tokens_per_pass": lat.get("tokens_per_pass"),
            "pass_cost_vs_ar": cost,
            "estimated_speedup": expected / cost if cost else None,
            "observed_speedup": speedups.get(label, {}).get("vs_ar"),
        }
    return out


def greedy_agreement(rt: DynaMoRuntime, prompts: Sequence[Prompt], max_new_tokens: int) -> dict:
    """Greedy verify against greedy ar on every prompt: how many agree token for token."""
    greedy = rt.default_config.replace(temperature=0.0)
    differ = []
    for index, prompt in enumerate(prompts):
        ar = rt.generate(list(prompt.ids), max_new_tokens, greedy.replace(mode="ar"), seed=0).token_ids
        verify = rt.generate(
            list(prompt.ids), max_new_tokens, greedy.replace(mode="verify"), seed=0
        ).token_ids
        if verify != ar:
            differ.append(index)
    return {"prompts": len(prompts), "equal": len(prompts) - len(differ), "differing_prompts": differ}

"""The default model (9 query heads, 3 KV heads) served by 1, 2, 3 and 4 shards through the real launcher.

2 shards split the heads unevenly by GQA group (6+3 / 2+1), 3 shards take one
KV head each, 4 shards replicate a KV head. Every shard count must give the
same greedy tokens as one shard, and the same first-step log-probabilities
(top-5 through the public API's token details) to fp32 tolerance. Tokens may
differ only where one shard's own top-2 log-probabilities (whose gap equals
the logit gap) are within 1e-3: a near-tie that summation order can flip.
One server per shard count, all prompts in one call, one server at a time.

Seeded sampling (temperature, top-k, top-p) must give the same tokens on
every shard count too: the router sends each request's seed to every rank,
so all ranks draw the same numbers from the same distribution.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import pytest

from .conftest import ServerProcess

# Four launches of the default model happen inside the first test's fixture.
pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(3600)]

PROMPTS = [
    "The capital of France is",
    "Water boils at a temperature of",
    "def fibonacci(n):",
    "The three primary colors are",
    "Once upon a time, in a small village,",
]
NEW_TOKENS = 24
TOP_N = 5
SHARD_COUNTS = (1, 2, 3, 4)
NEAR_TIE = 1e-3
# Logprobs of a 135M-parameter fp32 model summed in another order (all-reduce) differ by
# ~1e-6 to 2e-5 (largest seen on 2-4 shards: 1.5e-5, recorded in the figures).
LOGPROB_ATOL = 1e-4
EXPECTED_PLANS = {
    2: "q heads 6/3, kv heads 2/1 (uneven GQA split)",
    3: "q heads 3/3/3, kv heads 1/1/1",
    4: "q heads 2/1/3/3, kv heads 1/1/1/1 (KV heads replicated, uneven GQA split)",
}


@dataclass
class Served:
    """What one shard count answered, plus its launcher log."""

    tokens: list[list[str]]  # per prompt, the generated token strings
    logprobs: list[list[float]]  # per prompt, logprob of each generated token
    top: list[list[list[tuple[str, float]]]]  # per prompt, per step, the top-N (text, logprob)
    log: str
    sampled: list[list[str]]  # per prompt, tokens of a seeded sampling run
    sampled_logprobs: list[list[float]]


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> dict[int, Served]:
    results: dict[int, Served] = {}
    for n in SHARD_COUNTS:
        # float32: the tolerances above are float32's (the default launch serves 16-bit weights).
        args = ["--dtype", "float32"] + ([] if n == 1 else ["--sharded", "true", "--num-shard", str(n)])
        server = ServerProcess(tmp_path_factory.mktemp(f"tp{n}"), args).start(timeout=900)
        try:
            answer = server.greedy(PROMPTS, NEW_TOKENS, TOP_N, timeout=600)
            tokens, logprobs, top = answer.tokens, answer.logprobs, answer.top
            sampled = server.sample(PROMPTS[:3], NEW_TOKENS, seed=1234, timeout=600)
        finally:
            code = server.stop()
        log = server.log_path.read_text(errors="replace")
        assert code == 0, server.log_tail()
        results[n] = Served(tokens, logprobs, top, log, sampled.tokens, sampled.logprobs)
    return results


def first_divergence(a: list[str], b: list[str]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)


@pytest.mark.parametrize("n", SHARD_COUNTS[1:])
def test_greedy_tokens_equal_one_shard_except_at_a_shown_near_tie(served, n):
    one, many = served[1], served[n]
    ties = []
    for p, prompt in enumerate(PROMPTS):
        assert len(many.tokens[p]) == NEW_TOKENS, (prompt, many.tokens[p])
        i = first_divergence(one.tokens[p], many.tokens[p])
        if i is None:
            continue
        top2 = [lp for _, lp in one.top[p][i][:2]]
        gap = top2[0] - top2[1]
        ties.append((prompt, i, one.tokens[p][i], many.tokens[p][i], gap))
        assert gap < NEAR_TIE, (
            f"{n} shards, {prompt!r}: token {i} is {many.tokens[p][i]!r}, one shard chose "
            f"{one.tokens[p][i]!r} with a top-2 gap of {gap:.2e} (not a near-tie)"
        )
        # Where the first pick is a near-tie, both ranks' picks are among the tied pair.
        assert many.tokens[p][i] in [t for t, _ in one.top[p][i][:2]]
    # Shown in the test report (-rA) when a near-tie was hit.
    for prompt, i, mine, theirs, gap in ties:
        print(f"near-tie: {n} shards, {prompt!r} token {i}: {theirs!r} vs one shard's {mine!r}, gap {gap:.2e}")


@pytest.mark.parametrize("n", SHARD_COUNTS[1:])
def test_first_step_top_logprobs_agree_to_fp32_tolerance(served, n, record_property):
    one, many = served[1], served[n]
    worst = 0.0
    for p, prompt in enumerate(PROMPTS):
        ref, got = dict(one.top[p][0]), dict(many.top[p][0])
        assert len(ref) == TOP_N and len(got) == TOP_N, (ref, got)
        # Same top-N set unless the N-th place is a near-tie.
        for text in set(ref) & set(got):
            worst = max(worst, abs(ref[text] - got[text]))
            assert abs(ref[text] - got[text]) <= LOGPROB_ATOL, (n, prompt, text, ref[text], got[text])
        missing = set(ref) ^ set(got)
        if missing:
            last = sorted(ref.values())[:2]
            assert abs(last[1] - last[0]) < NEAR_TIE, (n, prompt, ref, got)
    print(f"{n} shards: largest first-step top-{TOP_N} logprob difference from one shard {worst:.2e}")
    record_property(f"figures: {n} shards, largest first-step top-{TOP_N} logprob difference", f"{worst:.2e}")


@pytest.mark.parametrize("n", SHARD_COUNTS[1:])
def test_chosen_token_logprobs_agree_until_any_divergence(served, n):
    one, many = served[1], served[n]
    for p in range(len(PROMPTS)):
        stop = first_divergence(one.tokens[p], many.tokens[p])
        stop = NEW_TOKENS if stop is None else stop
        for i in range(stop):
            assert abs(one.logprobs[p][i] - many.logprobs[p][i]) <= LOGPROB_ATOL, (n, PROMPTS[p], i)


@pytest.mark.parametrize("n", SHARD_COUNTS[1:])
def test_seeded_sampling_draws_the_same_tokens_on_every_shard_count(served, n):
    one, many = served[1], served[n]
    for p in range(len(one.sampled)):
        assert len(many.sampled[p]) == NEW_TOKENS
        # A draw landing within ~1e-6 of a probability boundary could flip a token; with
        # 72 draws that is far rarer than any real divergence between ranks.
        assert many.sampled[p] == one.sampled[p], (n, PROMPTS[p], one.sampled[p], many.sampled[p])
        for a, b in zip(one.sampled_logprobs[p], many.sampled_logprobs[p], strict=True):
            assert abs(a - b) <= LOGPROB_ATOL
    # The seed matters: sampling is not greedy decoding in disguise.
    assert any(one.sampled[p] != one.tokens[p] for p in range(len(one.sampled)))


def test_the_greedy_answer_is_still_paris_on_every_shard_count(served):
    for n in SHARD_COUNTS:
        assert "Paris" in "".join(served[n].tokens[0]).replace("Ġ", " "), (n, served[n].tokens[0])


@pytest.mark.parametrize("n", SHARD_COUNTS[1:])
def test_start_up_log_states_the_head_split(served, n):
    assert EXPECTED_PLANS[n] in served[n].log, re.findall(r"tp plan: .*", served[n].log)


@pytest.mark.parametrize("n", SHARD_COUNTS)
def test_each_shard_runs_its_share_of_the_cpu_threads(served, n):
    share = max(1, len(os.sched_getaffinity(0)) // n)
    for rank in range(n):
        found = re.findall(rf"shard-{rank}[ \t].*?(\d+) torch threads", served[n].log)
        assert found == [str(share)], (rank, found)


READY = re.compile(
    # [ \t], not \s: a line that ends in "shard-1" (a socket path) must not join the next one
    r"shard-(\d+)[ \t].*Model ready: .*parameters ([\d.]+) MiB on this rank, peak RSS ([\d.]+) MiB, "
    r"private RSS ([\d.]+) MiB"
)


def shard_memory(log: str) -> dict[int, tuple[float, float, float]]:
    """Per rank: parameter MiB, peak RSS MiB and private RSS MiB once loaded, from its start-up line."""
    return {int(m[1]): (float(m[2]), float(m[3]), float(m[4])) for m in READY.finditer(log)}


@pytest.mark.parametrize("n", SHARD_COUNTS[1:])
def test_each_shard_holds_about_its_share_of_the_weights(served, n, record_property):
    one = shard_memory(served[1].log)
    many = shard_memory(served[n].log)
    assert sorted(many) == list(range(n)), many
    params_one, _, private_one = one[0]
    shares = [many[r][0] / params_one for r in range(n)]
    # Every rank holds a slice: the uneven GQA split (2 shards: 6 and 3 query heads) and
    # replicated KV heads (4 shards) put a rank above 1/N, never near the whole model.
    bound = {2: 0.56, 3: 0.36, 4: 0.30}[n]
    assert max(shares) <= bound, (n, shares)
    assert sum(shares) >= 0.99, (n, shares)  # nothing is missing
    # Private memory right after loading follows the parameters: whatever a rank saves in
    # weights it saves in resident memory (no full copy read then sliced).
    for r in range(n):
        saved = params_one - many[r][0]
        assert many[r][2] <= private_one - 0.8 * saved, (n, r, many[r], one[0])
    figures = ", ".join(
        f"rank {r} {many[r][0]:.0f} MiB params / {many[r][2]:.0f} MiB private / {many[r][1]:.0f} MiB peak"
        for r in range(n)
    )
    record_property(
        f"figures: {n} shards memory once loaded (1 shard: {params_one:.0f} MiB params / "
        f"{private_one:.0f} MiB private / {one[0][1]:.0f} MiB peak)",
        figures,
    )

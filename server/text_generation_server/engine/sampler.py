"""Next-token choice for a batch: logits processors, warpers, seeded sampling.

Semantics follow transformers' own processors, in the order ``generate`` applies
them: repetition penalty and the min-new-tokens mask (processors, also for
greedy), then temperature, top-k, top-p, typical-p (warpers, sampling only).
Each step works on the whole ``[N, vocab]`` batch with per-row parameters;
only the uniform for the draw is taken per sampling row, because every
request owns its random generator (seeded once by the router, advanced one
draw per step), which is what makes all shards draw the same token.

The reported logprob, rank and top-n tokens come from the model's own
distribution (log-softmax of the raw logits), not from the processed one, so
they describe what the model predicted regardless of sampling settings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

NEG_INF = float("-inf")


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling settings; the defaults mean greedy."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            ("temperature", self.temperature, self.temperature > 0, "> 0"),
            ("top_k", self.top_k, self.top_k >= 0, ">= 0 (0 disables it)"),
            ("top_p", self.top_p, 0 < self.top_p <= 1, "in (0, 1]"),
            ("typical_p", self.typical_p, 0 < self.typical_p <= 1, "in (0, 1]"),
            ("repetition_penalty", self.repetition_penalty, self.repetition_penalty > 0, "> 0"),
        ]
        for name, value, ok, allowed in checks:
            if not ok or (isinstance(value, float) and math.isnan(value)):
                raise ValueError(
                    f"sampling parameter {name}={value} is invalid; it must be {allowed}"
                )

    @classmethod
    def from_pb(cls, pb) -> SamplingParams:
        """From a ``generate.v1.SamplingParameters``; proto3 zeros mean "unset".

        An unset temperature with ``do_sample`` means greedy (as TGIS treats
        temperature 0); unset top_p / typical_p / repetition_penalty disable them.
        """
        do_sample = bool(pb.do_sample)
        temperature = float(pb.temperature)
        if temperature == 0.0:
            do_sample, temperature = False, 1.0
        return cls(
            do_sample=do_sample,
            temperature=temperature,
            top_k=int(pb.top_k),
            top_p=float(pb.top_p) if pb.top_p != 0 else 1.0,
            typical_p=float(pb.typical_p) if pb.typical_p != 0 else 1.0,
            repetition_penalty=float(pb.repetition_penalty) if pb.repetition_penalty != 0 else 1.0,
            seed=int(pb.seed),
        )

    def make_generator(self, device: torch.device) -> torch.Generator | None:
        """The request's own random stream (None for greedy)."""
        if not self.do_sample:
            return None
        generator = torch.Generator(device=device)
        generator.manual_seed(self.seed)
        return generator


@dataclass
class SampleRow:
    """What the sampler needs from one request for one step."""

    params: SamplingParams
    generator: torch.Generator | None = None
    # Prompt + generated ids, for the repetition penalty (only read when it is on).
    token_ids: list[int] = field(default_factory=list)
    # Ids that may not be chosen this step (EOS / stop ids before min_new_tokens).
    banned_ids: list[int] = field(default_factory=list)
    top_n: int = 0


@dataclass(frozen=True)
class SampledToken:
    id: int
    logprob: float
    rank: int  # 1-based rank of ``id`` under the model's distribution
    top_tokens: list[tuple[int, float]]


# ---- processors and warpers (per-row parameters, whole batch at once) -------------


def apply_repetition_penalty(
    scores: torch.Tensor, token_ids: list[list[int]], penalties: torch.Tensor
) -> torch.Tensor:
    """Divide positive / multiply negative scores of already seen ids by the row's penalty."""
    vocab = scores.shape[-1]
    width = max((len(ids) for ids in token_ids), default=0)
    if width == 0:
        return scores
    # Pad with an id one past the vocabulary, which lands in a scratch column.
    padded = torch.full((len(token_ids), width), vocab, dtype=torch.int64)
    for i, ids in enumerate(token_ids):
        if ids:
            padded[i, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
    padded = padded.clamp_(max=vocab).to(scores.device)
    wide = torch.nn.functional.pad(scores, (0, 1))
    seen = wide.gather(1, padded)
    penalty = penalties.to(scores.device, scores.dtype).unsqueeze(1)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return wide.scatter(1, padded, seen)[:, :vocab]


def apply_temperature(scores: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
    return scores / temperatures.to(scores.device, scores.dtype).unsqueeze(1)


def apply_top_k(scores: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep each row's ``k`` best scores (ties with the k-th kept); ``k == 0`` keeps all."""
    vocab = scores.shape[-1]
    enabled = top_k > 0
    if not bool(enabled.any()):
        return scores
    k = torch.where(enabled, top_k.clamp(max=vocab), torch.ones_like(top_k)).to(scores.device)
    kth = torch.topk(scores, int(k.max()), dim=-1).values.gather(1, (k - 1).unsqueeze(1))
    remove = (scores < kth) & enabled.to(scores.device).unsqueeze(1)
    return scores.masked_fill(remove, NEG_INF)


# Candidate counts tried before sorting the whole vocabulary for top-p: with a
# peaked distribution the nucleus lies in the first few hundred tokens, and a
# partial top-k is far cheaper than a full sort of every row.
_TOP_P_CANDIDATES = (256, 4096)


def _top_p_remove(
    scores: torch.Tensor, top_p: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Removal mask from the ``k`` best tokens of each row, and which rows it is exact for.

    transformers removes a token when the probability mass of it and every
    token below it (ascending cumulative sum) is <= 1 - p. Tokens outside the
    ``k`` candidates all sit below the candidates; when their total mass is
    itself <= 1 - p they are all removed, and the candidates' ascending sums
    start from that mass.
    """
    probs = scores.softmax(dim=-1)
    values, index = torch.topk(probs, k, dim=-1)  # descending
    tail = (probs.sum(dim=-1) - values.sum(dim=-1)).clamp_(min=0.0)
    limit = (1 - top_p).unsqueeze(1)
    ascending = values.flip(-1).cumsum(dim=-1) + tail.unsqueeze(1)
    remove_ascending = ascending <= limit
    remove_ascending[:, -1] = False  # the best token always stays
    remove = torch.ones_like(scores, dtype=torch.bool)
    remove.scatter_(1, index, remove_ascending.flip(-1))
    exact = tail.unsqueeze(1) <= limit
    return remove, exact.squeeze(1)


def apply_top_p(scores: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of best tokens whose probability reaches ``p`` (1.0 keeps all)."""
    top_p = top_p.to(scores.device, scores.dtype)
    rows = torch.nonzero(top_p < 1.0).flatten()
    if rows.numel() == 0:
        return scores
    vocab = scores.shape[-1]
    remove = torch.zeros_like(scores, dtype=torch.bool)
    for k in (c for c in _TOP_P_CANDIDATES if c < vocab):
        part, exact = _top_p_remove(scores[rows], top_p[rows], k)
        remove[rows[exact]] = part[exact]
        rows = rows[~exact]
        if rows.numel() == 0:
            return scores.masked_fill(remove, NEG_INF)
    # Flat distributions: sort the whole vocabulary, exactly as transformers does.
    sorted_scores, order = torch.sort(scores[rows], descending=False)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - top_p[rows]).unsqueeze(1)
    remove_sorted[:, -1] = False
    remove[rows] = remove_sorted.scatter(1, order, remove_sorted)
    return scores.masked_fill(remove, NEG_INF)


def apply_typical_p(scores: torch.Tensor, typical_p: torch.Tensor) -> torch.Tensor:
    """Locally typical sampling: keep tokens whose surprise is closest to the entropy, up to mass ``p``."""
    enabled = (typical_p < 1.0).to(scores.device)
    if not bool(enabled.any()):
        return scores
    logp = torch.log_softmax(scores, dim=-1)
    entropy = -(logp * logp.exp()).nansum(-1, keepdim=True)
    shifted = torch.abs(-logp - entropy)
    sorted_shifted, order = torch.sort(shifted, descending=False)
    cumulative = scores.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
    mass = typical_p.to(scores.device, scores.dtype).unsqueeze(1)
    last = (cumulative < mass).sum(dim=1).clamp_(max=scores.shape[-1] - 1)
    remove_sorted = sorted_shifted > sorted_shifted.gather(1, last.view(-1, 1))
    remove_sorted[:, :1] = False
    remove = remove_sorted.scatter(1, order, remove_sorted) & enabled.unsqueeze(1)
    return scores.masked_fill(remove, NEG_INF)


def warp(scores: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k, top-p, typical-p for sampling rows (transformers' warper order)."""
    if any(p.temperature != 1.0 for p in params):
        scores = apply_temperature(scores, torch.tensor([p.temperature for p in params]))
    if any(p.top_k > 0 for p in params):
        scores = apply_top_k(scores, torch.tensor([p.top_k for p in params], dtype=torch.int64))
    if any(p.top_p < 1.0 for p in params):
        scores = apply_top_p(scores, torch.tensor([p.top_p for p in params]))
    if any(p.typical_p < 1.0 for p in params):
        scores = apply_typical_p(scores, torch.tensor([p.typical_p for p in params]))
    return scores


def process(scores: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    """Repetition penalty and banned ids: what transformers applies for greedy and sampling alike."""
    penalized = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
    if penalized:
        index = torch.tensor(penalized, device=scores.device)
        scores = scores.clone()
        scores[index] = apply_repetition_penalty(
            scores[index],
            [rows[i].token_ids for i in penalized],
            torch.tensor([rows[i].params.repetition_penalty for i in penalized]),
        )
    banned_rows = [i for i, r in enumerate(rows) for _ in r.banned_ids]
    if banned_rows:
        banned_ids = [t for r in rows for t in r.banned_ids]
        if not penalized:
            scores = scores.clone()
        vocab = scores.shape[-1]
        pairs = [(i, t) for i, t in zip(banned_rows, banned_ids, strict=True) if 0 <= t < vocab]
        if pairs:
            r_idx, t_idx = zip(*pairs, strict=True)
            scores[list(r_idx), list(t_idx)] = NEG_INF
    return scores


# ---- the step ----------------------------------------------------------------------


def choose(scores: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    """``[N]`` chosen ids: argmax for greedy rows, a seeded draw for sampling rows."""
    chosen = scores.argmax(dim=-1)
    sampling = [i for i, r in enumerate(rows) if r.params.do_sample]
    if not sampling:
        return chosen
    index = torch.tensor(sampling, device=scores.device)
    warped = warp(scores[index], [rows[i].params for i in sampling])
    chosen[index] = draw(warped.softmax(dim=-1), [rows[i].generator for i in sampling])
    return chosen


def draw(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row of ``probs`` ``[S, V]``, by inverse CDF on one uniform per row.

    Each row's uniform comes from its own generator, so a request's draws
    depend on its seed and step only, never on its neighbours in the batch.
    """
    uniforms = torch.stack(
        [torch.rand((), generator=g, device=probs.device) for g in generators]
    ).to(probs.dtype)
    cumulative = probs.cumsum(dim=-1)
    targets = (uniforms * cumulative[:, -1]).unsqueeze(1)
    # right=True: the first token whose cumulative mass exceeds the target, so
    # zero-probability tokens (filtered out by the warpers) are never chosen.
    picked = torch.searchsorted(cumulative, targets, right=True).squeeze(1)
    return picked.clamp_(max=probs.shape[-1] - 1)


def token_stats(
    logprobs: torch.Tensor, ids: torch.Tensor, top_n: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Logprob and 1-based rank of ``ids`` ``[N]`` under ``logprobs`` ``[N, V]``, plus top-n."""
    chosen = logprobs.gather(1, ids.view(-1, 1))
    ranks = (logprobs > chosen).sum(dim=-1) + 1
    top_values = top_ids = None
    if top_n > 0:
        top_values, top_ids = torch.topk(logprobs, min(top_n, logprobs.shape[-1]), dim=-1)
    return chosen.view(-1), ranks, top_values, top_ids


def _plain_greedy(row: SampleRow) -> bool:
    """Greedy on the raw logits: no sampling, no repetition penalty, nothing banned."""
    return not row.params.do_sample and row.params.repetition_penalty == 1.0 and not row.banned_ids


def sample(logits: torch.Tensor, rows: list[SampleRow]) -> list[SampledToken]:
    """Choose one token per row of ``logits`` ``[N, vocab]`` (float32, raw model output)."""
    if logits.shape[0] != len(rows):
        raise ValueError(f"{logits.shape[0]} logit rows for {len(rows)} requests")
    logits = logits.float()
    max_top = max((r.top_n for r in rows), default=0)
    if max_top == 0 and all(_plain_greedy(r) for r in rows):
        # The argmax of the raw logits: its logprob is max - logsumexp and its rank 1, in two
        # passes over the vocabulary instead of a log_softmax, a gather and a comparison.
        values, chosen = logits.max(dim=-1)
        lp = values - torch.logsumexp(logits, dim=-1)
        ranks = torch.ones_like(chosen)
        top_values = top_ids = None
    else:
        scores = process(logits, rows)
        chosen = choose(scores, rows)
        logprobs = torch.log_softmax(logits, dim=-1)
        lp, ranks, top_values, top_ids = token_stats(logprobs, chosen, max_top)
    ids_list, lp_list, rank_list = chosen.tolist(), lp.tolist(), ranks.tolist()
    top_v = top_values.tolist() if top_values is not None else None
    top_i = top_ids.tolist() if top_ids is not None else None
    out = []
    for i, row in enumerate(rows):
        tops: list[tuple[int, float]] = []
        if row.top_n > 0 and top_i is not None and top_v is not None:
            tops = list(zip(top_i[i][: row.top_n], top_v[i][: row.top_n], strict=True))
        out.append(
            SampledToken(id=ids_list[i], logprob=lp_list[i], rank=rank_list[i], top_tokens=tops)
        )
    return out

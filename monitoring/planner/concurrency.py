"""How many people at once, at what context: several sequences sharing one KV pool.

A model worker keeps one llama.cpp context. Its KV cache of n_ctx tokens is one
pool (llama.cpp's unified KV cache) that n_parallel sequences share: chats, and up
to job_sequences long-context job passes. Each decode step reads the weights once
for every sequence in the batch and each sequence's own KV cache, so more sequences
give more tokens per second in all, and fewer to each.

For a mixture of experts a step does not read B x n_experts_used experts per layer:
B tokens, each routed to k of E experts, touch E * (1 - (1 - k/E)^B) distinct
experts on average (each expert is missed by one token with probability 1 - k/E,
by all B with that to the B-th power; routing taken as independent and uniform).
For Mixtral (k=2, E=8) 4 tokens touch 5.5 experts, not 8; 8 tokens touch 7.2.

Pure arithmetic, like compute.py: no Django and no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .compute import CONTEXT_STEP_TOKENS, Architecture, Device, Plan, PlanError, Weights

# The context planned for one person's chat: a long conversation. The suggested
# number of people is as many such chats as half the pool holds; the other half is
# left to one job (documents of tens of thousands of tokens).
CHAT_CONTEXT_TOKENS = 8192
# Sequences kept for long-context job passes (the LanguageModel default).
JOB_SEQUENCES = 1
# The least context per person a split may give.
MIN_CHAT_CONTEXT_TOKENS = CONTEXT_STEP_TOKENS


def experts_touched(n_experts: int, n_experts_used: int, batch: int) -> float:
    """Expected distinct experts per layer when `batch` tokens each pick
    `n_experts_used` of `n_experts`: E * (1 - (1 - k/E)^B). 1 for a dense model."""
    if n_experts <= 1:
        return 1.0
    return n_experts * (1 - (1 - n_experts_used / n_experts) ** batch)


@dataclass(frozen=True)
class DecodeStep:
    """One decode step of a batch: one token for each of its sequences."""

    batch: int
    experts_touched: float
    weights_read_bytes: float
    kv_read_bytes: float
    seconds: float
    limited_by: str  # "memory bandwidth" or "compute"

    @property
    def tokens_per_s(self) -> float:
        return self.batch / self.seconds


def decode_step(
    weights: Weights,
    arch: Architecture,
    device: Device,
    *,
    contexts: list[int],
    kv_bytes_per_token: float,
    efficiency: float,
    compute_efficiency: float | None,
) -> DecodeStep:
    """The time of one step for sequences at these contexts (tokens each).

    Memory: the shared weights and output head once, the experts the batch touches,
    and every sequence's KV cache, at the device's bandwidth x efficiency. Compute
    (on a GPU with a known FP16 throughput): 2 FLOPs per active weight per token plus
    attention over each context, at the throughput x compute_efficiency. The step
    takes the longer of the two.
    """
    batch = len(contexts)
    touched = experts_touched(arch.n_experts, arch.n_experts_used, batch)
    extra_experts = touched - (arch.n_experts_used if arch.is_moe else 1)
    weights_read = weights.read_per_token_bytes + weights.expert_bytes * extra_experts / max(
        arch.n_experts, 1
    )
    kv_read = kv_bytes_per_token * sum(contexts)
    memory_s = (weights_read + kv_read) / (device.bandwidth_bytes_per_s * efficiency)
    compute_s = 0.0
    if device.fp16_flops_per_s and compute_efficiency:
        attention = 4 * arch.n_layers * arch.n_heads * arch.head_dim * sum(contexts)
        flops = batch * 2 * arch.params_active + attention
        compute_s = flops / (device.fp16_flops_per_s * compute_efficiency)
    return DecodeStep(
        batch=batch,
        experts_touched=touched,
        weights_read_bytes=weights_read,
        kv_read_bytes=kv_read,
        seconds=max(memory_s, compute_s),
        limited_by="compute" if compute_s > memory_s else "memory bandwidth",
    )


@dataclass(frozen=True)
class Concurrency:
    """The answer to "how many people at once, at what context"."""

    kv_free_bytes: int  # memory left after the weights, compute buffer and overhead
    kv_tokens_left: int  # that memory in KV tokens
    pool_tokens: int  # the KV pool: n_ctx, shared by every sequence
    pool_limited_by: str  # "the context planned" or "memory"
    users: int
    users_suggested: bool  # True: the planner chose; False: asked for (--users)
    chat_context_tokens: int
    job_sequences: int
    job_context_tokens: int
    n_parallel: int
    full: DecodeStep  # every sequence at its whole context
    empty: DecodeStep  # every sequence at the start of its context
    single_tokens_per_s: float  # one sequence alone at a chat's whole context

    @property
    def aggregate_decode_tokens_per_s(self) -> float:
        return self.full.tokens_per_s

    @property
    def per_sequence_decode_tokens_per_s(self) -> float:
        return self.full.tokens_per_s / self.n_parallel


def concurrency(
    plan: Plan, *, users: int | None = None, compute_efficiency: float | None = None
) -> Concurrency | None:
    """Split the plan's KV pool between `users` chats and one job, and estimate the
    aggregate decode speed of that batch, with every layer on the device. The pool is
    the plan's context, or what memory holds when that is less. None when the
    weights leave no room for a KV cache (the plan offloads; see its offloading row).

    users None: as many CHAT_CONTEXT_TOKENS chats as half the pool holds (at least
    one). Each chat gets CHAT_CONTEXT_TOKENS, or an even share of the pool when
    that is less; the job gets what the chats leave, up to the trained context.
    """
    # The plan's total is every layer on the device, whether or not it offloads.
    free = plan.device.memory_bytes - (plan.total_bytes - plan.kv_bytes)
    kv_tokens_left = max(0, math.floor(free / plan.kv_bytes_per_token))
    if kv_tokens_left < MIN_CHAT_CONTEXT_TOKENS * (1 + JOB_SEQUENCES):
        return None
    pool = min(plan.n_ctx, kv_tokens_left)
    limited_by = "memory" if kv_tokens_left < plan.n_ctx else "the context planned"

    suggested = users is None
    if suggested:
        users = max(1, pool // 2 // CHAT_CONTEXT_TOKENS)
    if users < 1:
        raise PlanError(f"the number of users at once is at least 1, not {users}")
    most = pool // MIN_CHAT_CONTEXT_TOKENS - JOB_SEQUENCES
    if pool // (users + JOB_SEQUENCES) < MIN_CHAT_CONTEXT_TOKENS:
        raise PlanError(
            f"{users} users at once would get less than {MIN_CHAT_CONTEXT_TOKENS} tokens "
            f"each of a {pool:,}-token KV pool; at most {most} users"
        )
    chat = min(CHAT_CONTEXT_TOKENS, pool // (users + JOB_SEQUENCES))
    job = pool - users * chat
    if plan.arch.context_length_trained:
        job = min(job, plan.arch.context_length_trained)
    n_parallel = users + JOB_SEQUENCES

    def step(contexts: list[int]) -> DecodeStep:
        return decode_step(
            plan.weights,
            plan.arch,
            plan.device,
            contexts=contexts,
            kv_bytes_per_token=plan.kv_bytes_per_token,
            efficiency=plan.decode_efficiency.factor,
            compute_efficiency=compute_efficiency,
        )

    return Concurrency(
        kv_free_bytes=max(0, free),
        kv_tokens_left=kv_tokens_left,
        pool_tokens=pool,
        pool_limited_by=limited_by,
        users=users,
        users_suggested=suggested,
        chat_context_tokens=chat,
        job_sequences=JOB_SEQUENCES,
        job_context_tokens=job,
        n_parallel=n_parallel,
        full=step([chat] * users + [job] * JOB_SEQUENCES),
        empty=step([0] * n_parallel),
        single_tokens_per_s=step([chat]).tokens_per_s,
    )

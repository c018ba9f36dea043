"""Which blocks each pipeline stage owns and which rank runs it; the schedules and what they need (no torch).

``parallel.pp`` ranks run ``S = pp * chunks`` stages. Stage 0 also owns the embedding, stage S - 1 the final
norm, the head and the MTP modules; every stage owns a contiguous, non-empty range of main blocks, given by
``parallel.pp_layout`` (blocks per stage, or each stage's layer ids) or balanced from a cost estimate.
Placement: looped (stage s on rank s % pp) for GPipe, 1F1B and Interleaved1F1B; V-shaped (rank r holds stages r
and S - 1 - r, so the first and last stage share rank 0) for ZBVZeroBubble and DualPipeV.
"""

from __future__ import annotations

from dataclasses import dataclass

from moetrain.model.config import ModelConfig, require


@dataclass(frozen=True)
class ScheduleSpec:
    name: str  # the torch.distributed.pipelining class is Schedule<name>
    chunks: int  # stages per rank by default (V-shaped: exactly 2)
    v_shaped: bool

    def min_microbatches(self, pp: int, chunks: int) -> int:
        """Fewest micro-batches per step the schedule runs with (torch's own checks, made before launch)."""
        if self.name == "1F1B":
            return pp
        if self.name == "DualPipeV":
            return pp * chunks
        return 1

    def check_microbatches(self, m: int, pp: int, chunks: int, key: str) -> None:
        need = self.min_microbatches(pp, chunks)
        require(m >= need, key, f"{m} micro-batch(es) per step, but parallel.pp_schedule={self.name} with pp={pp} "
                                f"needs at least {need}: raise train.global_batch_size or lower "
                                "train.micro_batch_size (micro-batches = global batch / (micro batch * dp))")
        if self.name == "Interleaved1F1B":  # torch runs whole rounds of pp micro-batches
            rounds = max(1, m // pp)
            require(m % rounds == 0, key, f"{m} micro-batches per step is not a whole number of Interleaved1F1B's "
                                          f"{rounds} rounds (pp={pp}); use a multiple of pp={pp}")

    def bubble_formula(self, pp: int, m: int, chunks: int) -> tuple[float | None, str]:
        """The schedule's idle fraction per rank in theory (equal stage times), with the formula."""
        if self.name in ("GPipe", "1F1B"):
            return (pp - 1) / (m + pp - 1), "(pp - 1) / (m + pp - 1)"
        if self.name == "Interleaved1F1B":
            return (pp - 1) / (chunks * m + pp - 1), "(pp - 1) / (v * m + pp - 1)"
        if self.name == "ZBVZeroBubble":
            return 0.0, "0 when forward, input-backward and weight-backward take equal time"
        return None, "DualPipe's (pp/2 - 1)(F&B + B - 3W), a time not a fraction"


SCHEDULES = {s.name: s for s in (ScheduleSpec("GPipe", 1, False), ScheduleSpec("1F1B", 1, False),
                                 ScheduleSpec("Interleaved1F1B", 2, False), ScheduleSpec("ZBVZeroBubble", 2, True),
                                 ScheduleSpec("DualPipeV", 2, True))}


def schedule_spec(name: str) -> ScheduleSpec:
    require(name in SCHEDULES, "parallel.pp_schedule", f"must be one of {', '.join(SCHEDULES)}, got {name!r}")
    return SCHEDULES[name]


def chunks_per_rank(spec: ScheduleSpec, pp_chunks: int) -> int:
    """``parallel.pp_chunks`` (0: the schedule's default), checked against what the schedule can run."""
    chunks = pp_chunks or spec.chunks
    require(chunks >= 1, "parallel.pp_chunks", f"must be >= 1 (or 0 for the schedule's default), got {pp_chunks}")
    if spec.v_shaped:
        require(chunks == 2, "parallel.pp_chunks", f"{spec.name} is V-shaped: it runs exactly 2 stages per rank, got "
                                                   f"parallel.pp_chunks={pp_chunks}")
    elif spec.name != "Interleaved1F1B":
        require(chunks == 1, "parallel.pp_chunks", f"{spec.name} runs 1 stage per rank, got parallel.pp_chunks="
                                                   f"{pp_chunks}; use Interleaved1F1B for several")
    return chunks


def stage_ranks(pp: int, n_stages: int, v_shaped: bool) -> list[int]:
    """The pipeline rank of every stage."""
    if v_shaped:
        return [s if s < pp else n_stages - 1 - s for s in range(n_stages)]
    return [s % pp for s in range(n_stages)]


def stages_of_rank(pp_rank: int, pp: int, n_stages: int, v_shaped: bool) -> list[int]:
    return [s for s, r in enumerate(stage_ranks(pp, n_stages, v_shaped)) if r == pp_rank]


def resolve_layout(cfg: ModelConfig, n_stages: int, pp_layout: list | None, seq_len: int) -> list[list[int]]:
    """Each stage's main-block ids: ``pp_layout`` checked, or balanced when it is None."""
    n = cfg.n_layers
    require(n_stages <= n, "parallel.pp", f"{n_stages} pipeline stages but the model has only {n} blocks "
                                          f"(model.n_layers={n}); every stage needs at least one")
    if pp_layout is None:
        return balanced_layout(cfg, n_stages, seq_len)
    key = "parallel.pp_layout"
    require(len(pp_layout) == n_stages, key, f"has {len(pp_layout)} entries, but there are {n_stages} stages "
                                             "(parallel.pp x chunks per rank)")
    if all(isinstance(c, int) for c in pp_layout):  # blocks per stage
        require(all(c >= 1 for c in pp_layout), key, f"every stage needs at least one block, got {pp_layout}")
        require(sum(pp_layout) == n, key, f"gives {sum(pp_layout)} blocks in all, the model has {n} (model.n_layers)")
        starts = [sum(pp_layout[:i]) for i in range(n_stages)]
        return [list(range(s, s + c)) for s, c in zip(starts, pp_layout)]
    require(all(isinstance(ids, (list, tuple)) and ids for ids in pp_layout), key,
             f"must be blocks per stage (ints) or each stage's layer ids (non-empty lists), got {pp_layout}")
    flat = [i for ids in pp_layout for i in ids]
    seen = set()
    for i in flat:
        require(isinstance(i, int) and 0 <= i < n, key, f"layer {i!r} is not a block of the model (0..{n - 1})")
        require(i not in seen, key, f"repeats layer {i}")
        seen.add(i)
    missing = sorted(set(range(n)) - seen)
    require(not missing, key, f"skips layer(s) {missing}")
    require(flat == list(range(n)), key, f"stages must hold contiguous blocks in order, got {pp_layout}")
    return [list(ids) for ids in pp_layout]


def balanced_layout(cfg: ModelConfig, n_stages: int, seq_len: int) -> list[list[int]]:
    """Contiguous ranges minimising the largest stage cost, a stage's cost being its share of the model's FLOPs
    plus its share of the parameters (so the embedding and head weigh in by memory as well as compute)."""
    from moetrain.plan import pipeline_unit_costs

    blocks, first, last = pipeline_unit_costs(cfg, seq_len)
    total_flops = sum(f for f, _ in blocks) + first[0] + last[0]
    total_params = sum(p for _, p in blocks) + first[1] + last[1]

    def cost(unit: tuple[float, int]) -> float:
        return unit[0] / total_flops + unit[1] / total_params

    c = [cost(b) for b in blocks]
    n, inf = len(c), float("inf")
    prefix = [0.0]
    for x in c:
        prefix.append(prefix[-1] + x)

    def stage_cost(s: int, lo: int, hi: int) -> float:  # stage s owning blocks [lo, hi)
        return prefix[hi] - prefix[lo] + (cost(first) if s == 0 else 0.0) + (cost(last) if s == n_stages - 1 else 0.0)

    # best[s][j]: the smallest max cost of stages 0..s-1 holding blocks [0, j); cut[s][j] the start of stage s-1.
    best = [[inf] * (n + 1) for _ in range(n_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, n_stages + 1):
        for j in range(s, n - (n_stages - s) + 1):
            for i in range(s - 1, j):
                v = max(best[s - 1][i], stage_cost(s - 1, i, j))
                if v < best[s][j] - 1e-12:
                    best[s][j], cut[s][j] = v, i
    bounds, j = [], n
    for s in range(n_stages, 0, -1):
        i = cut[s][j]
        bounds.append((i, j))
        j = i
    return [list(range(lo, hi)) for lo, hi in reversed(bounds)]

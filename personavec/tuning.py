"""Tuning knobs of personavec's pipelines (extraction above all; also the budget of every forward run under
:mod:`personavec.hooks`, group commits and block reads), in one frozen dataclass passed in (never module constants
to patch).

``run_extraction(ws, config, tuning=Tuning(rest_windows=(2, 3)))``: every field has the value measured best (see
docs/PERFORMANCE.md); tests inject small values instead of monkeypatching modules. Unlike
:class:`personavec.extract.ExtractConfig`, a ``Tuning`` is not stored with the run: it never changes what is
computed, only how the work is cut and scheduled.

Pure standard library: the compute core imports it on a bare GPU box.
"""

from __future__ import annotations

from dataclasses import dataclass

from personavec.errors import ConfigError


@dataclass(frozen=True)
class Tuning:
    """How the pipelines cut and schedule their work.

    Attributes:
        cpu_batch_tokens: default token budget of a batch on CPU (small batches stay in cache: 1,024 beat 2,048 to
            16,384 by 10-40% on 2 cores).
        gpu_batch_tokens: default token budget of a batch on GPU (on an H100 16,384 and 65,536 tie).
        compile_pad: with ``compile``, batch widths are padded to a multiple of this (8: ~1% padded tokens, bf16
            rows 16-byte aligned; 64 cost ~11% padded tokens).
        in_flight_bytes: computed rows that may wait in memory for the writer threads (assembled units or units
            being written), in bytes; at least two units per writer thread. Past it the model waits.
        min_units: a new run (without ``chunk_rows``) has at least this many write units (shards) when each can
            still hold one inner chunk of rows, so units are written while later batches compute.
        plan_inline_max: a session with at most this many rows to plan plans them on the model's own thread (no
            thread competes with the model's for the GIL); a larger one on a planner thread, in windows.
        rest_windows: sizes (rows) of the windows the rows after the first batch are planned in, the last repeated:
            the first windows are quick to plan, so the model soon has work; later ones use parallel processes.
        parallel_from: rows to plan from which tokenizing is spread over spawned processes (one per spare core).
        mark_interval_s: written rows are marked done in the catalog at most this often (one commit ~5-50 ms).
        units_per_rank: data parallel: a new run has at least this many write units per process (shares are whole
            units).
        pool_fraction: data parallel: share of the tokens (the cheapest units) claimed unit by unit as the run goes,
            so that ranks of different speeds finish together.
        weight_memory_fraction: data parallel with ``gpus_per_process > 1``: share of each GPU ``device_map`` may
            fill with weights.
        shard_bytes: target size of a write unit (shard) of whole rows x every layer.
        chunk_bytes: target size of one inner chunk (rows x one layer) inside a shard.
        commit_interval_s: stages landing endpoint answers (generate, judge) group-commit at most this often.
        read_block_bytes: the vector stage reads activations from Zarr in blocks of about this many bytes.
        prefill_padding: the steering server prefills requests joining its batch in groups of similar prompt
            length, each within the batch token budget (:meth:`batch_tokens`; a longer prompt alone): a group may
            be at most this share padding (or 1/64 of the budget, under which one more forward costs more).
        fsync_writes: extraction fsyncs each shard it writes (and the directories above it) before its rows are
            marked done, so a power cut never leaves a done row without its activations (local stores; an object
            store's write is durable when it returns). Off: faster only where fsync is slow (some network
            filesystems); ``personavec verify`` then finds what a crash lost.
    """

    cpu_batch_tokens: int = 1024
    gpu_batch_tokens: int = 16384
    compile_pad: int = 8
    in_flight_bytes: int = 4 << 30
    min_units: int = 8
    plan_inline_max: int = 2048
    rest_windows: tuple[int, ...] = (1024, 4096, 16384, 65536)
    parallel_from: int = 20_000
    mark_interval_s: float = 1.0
    units_per_rank: int = 16
    pool_fraction: float = 0.25
    weight_memory_fraction: float = 0.9
    shard_bytes: int = 64 << 20
    chunk_bytes: int = 1 << 20
    commit_interval_s: float = 0.1
    read_block_bytes: int = 64 << 20
    prefill_padding: float = 0.25
    fsync_writes: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "rest_windows", tuple(int(w) for w in self.rest_windows))
        positive = ("cpu_batch_tokens", "gpu_batch_tokens", "compile_pad", "in_flight_bytes", "min_units",
                    "units_per_rank", "shard_bytes", "chunk_bytes", "read_block_bytes")  # fmt: skip
        bad = [name for name in positive if getattr(self, name) < 1]
        if bad or not self.rest_windows or min(self.rest_windows) < 1:
            raise ConfigError(f"tuning values must be >= 1: {', '.join(bad) or 'rest_windows'}")
        if min(self.plan_inline_max, self.mark_interval_s, self.parallel_from, self.commit_interval_s) < 0:
            raise ConfigError("plan_inline_max, parallel_from, mark_interval_s and commit_interval_s must be >= 0")
        if not 0 <= self.pool_fraction < 1 or not 0 < self.weight_memory_fraction <= 1:
            raise ConfigError("pool_fraction must be in [0, 1) and weight_memory_fraction in (0, 1]")
        if not 0 <= self.prefill_padding <= 1:
            raise ConfigError(f"prefill_padding must be in [0, 1], got {self.prefill_padding}")

    def batch_tokens(self, device: object) -> int:
        """The default token budget of a batch for a model on ``device``."""
        return self.cpu_batch_tokens if str(device).startswith("cpu") else self.gpu_batch_tokens

    def windows(self, n: int) -> list[tuple[int, int]]:
        """``(start, stop)`` of the windows ``n`` rows are planned in (:attr:`rest_windows`, the last size
        repeated); none when ``n`` is 0.

        Example:
            >>> Tuning(rest_windows=(2, 3)).windows(9)
            [(0, 2), (2, 5), (5, 8), (8, 9)]
        """
        out: list[tuple[int, int]] = []
        start = 0
        while start < n:
            size = self.rest_windows[min(len(out), len(self.rest_windows) - 1)]
            out.append((start, min(start + size, n)))
            start = out[-1][1]
        return out


#: The measured defaults.
DEFAULT = Tuning()

"""What an extraction run computes and reports: :class:`ExtractConfig` (stored with the run), the rule for
resuming it (:func:`resume_config`), :class:`ExtractionProgress`, :class:`ExtractionResult`, and how a config loads
its model and renders its conversations."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from personavec.arrays import STORAGE_DTYPES
from personavec.config import DTYPES, default_layer, resumed_config
from personavec.errors import ConfigError
from personavec.modeling import LoadedModel, load_model
from personavec.spans import PROMPT_FORMATS, SPAN_RULES, Rendered, conversation, render, render_many
from personavec.store import extraction as xs

if TYPE_CHECKING:
    from personavec.store.engine import Catalog
    from personavec.workspace import Workspace


@dataclass(frozen=True)
class ExtractConfig:
    """Configuration of an extraction run (serialised into the run row).

    Attributes:
        responses_run: the responses run (``generate`` / ``ingest-responses``) to extract; required for a new run.
        model: hub id, local directory, ``.gguf`` file or ``"smollm2-135m-instruct"``.
        layers: layers to extract (``hidden_states`` indices), or None for the seed's default
            :func:`personavec.config.default_layer` of ``layer_fraction``.
        layer_fraction: used when ``layers`` is None.
        dtype: ``"auto"`` (bf16 on CUDA, float32 on CPU), ``"float32"``, ``"bfloat16"``, ``"float16"``.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        device_map: ``from_pretrained``'s ``device_map`` for models larger than one device (e.g. ``"auto"``).
        max_batch_tokens: token budget per batch, counted as ``batch_size * longest_sequence`` (padding included);
            None = :func:`personavec.extract.core.default_batch_tokens` for the device (1,024 on CPU, 16,384 on GPU).
        max_batch_size: most conversations per batch.
        span: ``"exact"`` (response tokens via offsets) or ``"seed"`` (the seed's rule, see :mod:`personavec.spans`).
        prompt_format: ``"chat"`` (chat template) or ``"raw"`` (seed's plaintext format).
        max_length: context to truncate to; None = the model's position limit.
        attn_implementation: passed to ``from_pretrained`` (``"sdpa"`` by default).
        chunk_rows: Zarr rows per shard, the write unit; None = ``arrays.shard_rows_for(...)`` (~64 MB of rows).
        compile: ``torch.compile`` each decoder block that runs (regional compilation: the blocks share code, so they
            compile once), with sequence widths padded to a multiple of 8. For GPUs: 1.6x the eager throughput on
            an H100 (gemma-3-27b shapes) after a one-off compile of ~25 s paid by the first batches; same means up to
            rounding. Needs a C++ compiler on CPU (inductor) and gains little there. Off by default.
        personas: only responses of these personas (names), or None for all.
        questions: only responses to these questions (0-based positions in the question set), or None for all.
        layers_path: attribute path of the model's decoder-block ModuleList (e.g. ``"model.layers"``), for a model
            whose blocks auto-detection does not find; None = auto-detect.
        gpus_per_process: with several processes (data parallel, :mod:`personavec.extract.distributed`), the GPUs
            each process shards its replica over with ``device_map`` (process ``r`` of a node takes GPUs
            ``r*K .. r*K+K-1``); 1 = one whole replica per GPU.
        storage_dtype: how activations are stored: ``"float32"`` (default), ``"float16"`` or ``"bfloat16"`` (half
            the bytes; a value float16 cannot hold fails the run, never stored as inf).
        writer_threads: threads writing shards while the model computes.
        flush_seconds, flush_rows: durability bound: partly filled shards are written (and their rows marked done)
            once this many seconds or computed rows have passed since the last time, whichever comes first; a kill
            loses at most that much work.
    """

    responses_run: int | None = None
    model: str = "smollm2-135m-instruct"
    layers: tuple[int, ...] | None = None
    layer_fraction: float = 0.65
    dtype: str = "auto"
    device: str = "auto"
    device_map: str | None = None
    max_batch_tokens: int | None = None
    max_batch_size: int = 64
    span: str = "exact"
    prompt_format: str = "chat"
    max_length: int | None = None
    attn_implementation: str | None = "sdpa"
    chunk_rows: int | None = None
    compile: bool = False
    personas: tuple[str, ...] | None = None
    questions: tuple[int, ...] | None = None
    layers_path: str | None = None
    gpus_per_process: int = 1
    storage_dtype: str = "float32"
    writer_threads: int = 4
    flush_seconds: float = 30.0
    flush_rows: int = 8192

    def __post_init__(self) -> None:
        for name in ("personas", "questions"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))
                if not value:
                    raise ConfigError(f"{name} filter is empty: leave it out (None) to take every response")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.span not in SPAN_RULES:
            raise ConfigError(f"span must be one of {', '.join(SPAN_RULES)}, got {self.span!r}")
        if self.prompt_format not in PROMPT_FORMATS:
            raise ConfigError(
                f"prompt_format (--format) must be one of {', '.join(PROMPT_FORMATS)}, got {self.prompt_format!r}"
            )
        if (self.max_batch_tokens is not None and self.max_batch_tokens <= 0) or self.max_batch_size <= 0:
            raise ConfigError("max_batch_tokens and max_batch_size must be > 0")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
            if not self.layers or len(set(self.layers)) != len(self.layers) or min(self.layers) < 0:
                raise ConfigError(f"layers (--layer) must be distinct non-negative integers, got {self.layers}")
        if self.chunk_rows is not None and self.chunk_rows <= 0:
            raise ConfigError("chunk_rows must be > 0")
        if not isinstance(self.compile, bool):
            raise ConfigError(f"compile must be true or false, got {self.compile!r}")
        if not isinstance(self.gpus_per_process, int) or self.gpus_per_process < 1:
            raise ConfigError(f"gpus_per_process must be an integer >= 1, got {self.gpus_per_process!r}")
        if self.storage_dtype not in STORAGE_DTYPES:
            raise ConfigError(
                f"storage_dtype (--storage-dtype) must be one of {', '.join(STORAGE_DTYPES)}, "
                f"got {self.storage_dtype!r}"
            )
        if self.writer_threads < 1 or self.flush_seconds <= 0 or self.flush_rows < 1:
            raise ConfigError("writer_threads and flush_rows must be >= 1 and flush_seconds > 0")
        if self.layers_path is not None and not self.layers_path.strip(". "):
            raise ConfigError("layers_path is empty: give the decoder blocks' path (e.g. 'model.layers') or None")

    def resolve_layers(self, n_layers: int) -> tuple[int, ...]:
        """The requested layers, or the seed's default layer for a model of ``n_layers`` blocks; validated."""
        layers = self.layers if self.layers is not None else (default_layer(n_layers, self.layer_fraction),)
        bad = [x for x in layers if x > n_layers]
        if bad:
            raise ConfigError(f"layers {bad} out of range: the model has {n_layers} layers (valid 0..{n_layers})")
        return layers


#: Fields that define what a run computes; a resumed run keeps them (the others are how it runs: device, batching,
#: compilation, attention kernel, where the decoder blocks are).
IDENTITY_FIELDS = (
    "responses_run",
    "model",
    "layers",
    "layer_fraction",
    "dtype",
    "span",
    "prompt_format",
    "max_length",
    "chunk_rows",
    "personas",
    "questions",
    "storage_dtype",
)


def load_for(config: ExtractConfig, *, max_memory: dict[int | str, int | str] | None = None) -> LoadedModel:
    """Load the model an :class:`ExtractConfig` names (``max_memory``: per-device budget for ``device_map``)."""
    return load_model(
        config.model,
        dtype=config.dtype,
        device=config.device,
        device_map=config.device_map,
        attn_implementation=config.attn_implementation,
        layers_path=config.layers_path,
        max_memory=max_memory,
    )


def encode_response(
    loaded: LoadedModel, system_prompt: str | None, question: str, response: str, config: ExtractConfig
) -> Rendered:
    """Render one seed-style conversation (system, user, assistant) under the config's format, rule and context."""
    return render(
        loaded.tokenizer,
        conversation(system_prompt, question, response),
        config.prompt_format,
        config.span,
        max_length=config.max_length or loaded.context_length,
    )


def encode_responses(
    loaded: LoadedModel, conversations: Iterable[tuple[str | None, str, str]], config: ExtractConfig
) -> list[Rendered]:
    """:func:`encode_response` for many ``(system_prompt, question, response)`` at once (batched tokenization,
    shared prefixes rendered once; the same result)."""
    return render_many(
        loaded.tokenizer,
        [conversation(sp, q, r) for sp, q, r in conversations],
        config.prompt_format,
        config.span,
        max_length=config.max_length or loaded.context_length,
    )


#: Renders ``(system prompt, question, response)`` conversations for a run's plan, in order. The default renders them
#: here (batched, :func:`encode_responses`); the data-parallel path (:mod:`personavec.extract.distributed`) spreads
#: them over its processes.
Renderer = Callable[[LoadedModel, ExtractConfig, Sequence[tuple[str | None, str, str]]], list[Rendered]]


def render_all(
    loaded: LoadedModel, config: ExtractConfig, conversations: Sequence[tuple[str | None, str, str]]
) -> list[Rendered]:
    """Render every ``(system prompt, question, response)`` with :func:`encode_responses` (the default Renderer)."""
    return encode_responses(loaded, conversations, config)


@dataclass(frozen=True)
class ExtractionProgress:
    """What the progress callback receives after each batch."""

    run_id: int
    done_examples: int
    total_examples: int
    tokens: int
    elapsed_s: float

    @property
    def tok_s(self) -> float:
        return self.tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclass(frozen=True)
class ExtractionResult:
    """What :func:`run_extraction` did. ``n_no_span``: examples with no tokens to average (empty answers), done
    without a row of activations; ``n_adopted``: rows a resumed session found written but not marked done and kept.
    ``timings``: seconds before the model starts (``plan_s``: opening the run, a new one selected and recorded,
    and planning its first window), from then to the last row written (``compute_s``), of which waiting for the writers
    while the model could have computed (``stall_s``) and writing after the last batch (``drain_s``), and closing
    the run in the catalog (``close_s``)."""

    run_id: int
    zarr_group: str
    layers: tuple[int, ...]
    n_examples: int
    n_computed: int
    n_tokens: int
    tok_s: float
    n_truncated: int
    n_no_span: int = 0
    n_adopted: int = 0
    timings: dict[str, float] = field(default_factory=dict)


def stored_config(ws: Workspace, run_id: int) -> ExtractConfig:
    """The config an extraction run was made with, rebuilt from its run row (layers as resolved then).

    Example: resume on another device with ``dataclasses.replace(stored_config(ws, 3), device="cuda:1")``."""
    return resume_config(ws.catalog(), run_id, None)


def resume_config(catalog: Catalog, run_id: int, given: ExtractConfig | None) -> ExtractConfig:
    """The config a resumed session of ``run_id`` runs with: the stored one, with ``given``'s operational fields
    (:func:`personavec.config.resumed_config`: the :data:`IDENTITY_FIELDS` must match; ``responses_run`` and
    ``layers`` None ask for the run's; with ``layers`` given, ``layer_fraction`` is not compared)."""
    info = xs.get_extraction_run(catalog, run_id)
    identity = [f for f in IDENTITY_FIELDS if not (f == "layer_fraction" and given is not None and given.layers)]
    return resumed_config(
        xs.extraction_run_config(catalog, run_id),
        given,
        ExtractConfig,
        identity,
        what=f"extraction run {run_id}",
        unset_means_stored=("responses_run", "layers"),
        layers=info.layers,
        responses_run=info.source_run_id,
    )

"""The continuous-batching engine of the steering server: one model thread, requests join and leave per step.

Each answer (a request's ``n`` answers are ``n`` sequences) is a row of one running batch. The batch keeps one KV
cache (``transformers``' ``DynamicCache``) with **left padding**: every row's tokens are right-aligned, so a decoding
step feeds one token per row at the same column, with a 2D attention mask hiding each row's padding and explicit
``position_ids`` (each row's own token count). A loop iteration:

1. admits new requests (tokenize, check lengths, resolve interventions; a bad one is refused, the rest go on),
2. drops cancelled and finished rows (``batch_select_indices``) and trims the columns no row uses any more,
3. prefills waiting joiners in groups of similar prompt length (:func:`prefill_groups`: each group left-padded,
   within the batch token budget, little of it padding), the longest-waiting first and about one budget of them
   per iteration (the rest wait for the next, after a decoding step: the rows answering keep answering while a
   wave of long prompts joins), samples each group's first tokens, and merges its cache into the running one
   (both left-padded to the wider of the two),
4. runs one decoding step over every row and samples each row's next token.

Sliding-window models (Gemma 2 and 3, Mistral with ``sliding_window``...) are served with the same cache of full
layers: the model builds its sliding-window mask from the 2D attention mask and the cache's columns (query column
``q`` sees key column ``k`` when ``q - window < k <= q``), and since every row's tokens are contiguous and right-aligned
(left padding; each group of joiners is left-padded as a block; trimming removes whole columns from the left),
column distance is token distance for every row, so each row sees exactly its own last ``window`` tokens. The keys
that fell out of the window stay in the cache (the memory of a full-attention layer; the window is 1024 tokens or
more in real models).
Models whose cache has other layer kinds (linear attention, chunked attention, shared KV) are refused at start.

Interventions are per row: one forward hook per decoder block (registered once, for the server's life) applies
:func:`personavec.steering.interventions.apply_rows` with ``[B, d]`` unit and added vectors and ``[B]`` ablate
flags and cap thresholds built for the current batch (zeros and ``inf`` for rows without one, which are left
exactly as they were). ``positions="generated"`` interventions are off in the prefill pass and on in decoding
steps; ``positions="response"`` ones change only the last column of the prefill pass (each joiner's last prompt
token: rows are right-aligned) and are on in decoding steps, as in :class:`personavec.steering.interventions.Steerer`.

Sampling is per row: greedy at temperature 0, else temperature and ``top_p`` with the row's own
``torch.Generator`` (seeded with ``seed + i`` for answer ``i``), so an answer does not depend on what else is in the
batch.
"""

from __future__ import annotations

import inspect
import itertools
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from personavec.errors import ConfigError, ModelError
from personavec.hooks import patch
from personavec.serving.requests import BadRequest, InterventionSpec, ServeRequest
from personavec.tuning import DEFAULT, Tuning

if TYPE_CHECKING:
    from personavec.modeling import LoadedModel
    from personavec.steering.interventions import LayerIntervention
    from personavec.workspace import Workspace


# ---------------------------------------------------------------------------------------------------- events


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's logprob and its top alternatives (``(token text, logprob)``)."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Admitted:
    prompt_tokens: int


@dataclass(frozen=True)
class Refused:
    error: BaseException


@dataclass(frozen=True)
class Delta:
    """New text of answer ``index`` (may be empty when a token is held back), with its tokens' logprobs."""

    index: int
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Finished:
    """Answer ``index`` is complete: its whole text (what the deltas add up to) and why it stopped."""

    index: int
    text: str
    finish_reason: str
    completion_tokens: int
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()


Event = Admitted | Refused | Delta | Finished


@dataclass(frozen=True)
class ResolvedIntervention:
    """An :class:`InterventionSpec` resolved to numbers: one :class:`LayerIntervention` per layer."""

    spec: InterventionSpec
    layers: tuple[LayerIntervention, ...]
    vector_run_id: int | None = None
    tau_source: str | None = None


class Ticket:
    """A submitted request: where its events go, and a flag the HTTP layer sets when the client goes away."""

    def __init__(self, request: ServeRequest, sink: Callable[[Event], object]) -> None:
        self.request = request
        self.sink = sink
        self.cancelled = False
        self.prompt: list[int] = []
        self.interventions: tuple[ResolvedIntervention, ...] = ()
        self.submitted = time.perf_counter()

    def cancel(self) -> None:
        self.cancelled = True


# ---------------------------------------------------------------------------------------------------- resolving


def model_identity(name: str) -> str:
    """What identifies a model across names: the resolved directory of a local model or alias, else the name."""
    from personavec.modeling import local_model_path

    try:
        path = local_model_path(name)
    except Exception:  # not a local model: compare names as given
        return name
    return str(path.resolve()) if path.is_dir() else name


class InterventionResolver:
    """Resolves :class:`InterventionSpec` s against a workspace's vectors runs for one served model, cached per
    vector (the plan of a named vector at coefficient 1; a request's coefficient scales it)."""

    def __init__(self, ws: Workspace | None, loaded: LoadedModel, *, catalog_lock: Any = None) -> None:
        self.ws = ws
        self.loaded = loaded
        # DuckDB refuses a second connection to the file from this process while one is open: every thread of the
        # server that opens a unit of work holds this lock.
        self.catalog_lock = catalog_lock if catalog_lock is not None else threading.Lock()
        self.identity = model_identity(loaded.name)
        self._plans: dict[Any, Any] = {}

    def resolve(self, specs: Sequence[InterventionSpec]) -> tuple[ResolvedIntervention, ...]:
        return tuple(self._one(spec, f"interventions[{i}]") for i, spec in enumerate(specs))

    def _layers_ok(self, layers: Sequence[int], where: str) -> None:
        n = self.loaded.n_layers
        bad = [x for x in layers if not 1 <= x <= n - 1]
        if bad:
            raise BadRequest(
                f"{where}.layers {bad} out of range: {self.loaded.name} has {n} layers, steerable 1..{n - 1}",
                f"{where}.layers",
            )

    def _one(self, spec: InterventionSpec, where: str) -> ResolvedIntervention:
        from personavec.steering.interventions import LayerIntervention

        self._layers_ok(spec.layers, where)
        if spec.inline:
            vec = np.asarray(spec.vector, dtype=np.float64)
            if vec.shape[0] != self.loaded.d_model:
                raise BadRequest(
                    f"{where}.vector has {vec.shape[0]} values, {self.loaded.name} has d_model {self.loaded.d_model}",
                    f"{where}.vector",
                )
            taus: tuple[float | None, ...]
            if spec.kind == "cap":
                taus = spec.tau * len(spec.layers) if len(spec.tau) == 1 else spec.tau
            else:
                taus = (None,) * len(spec.layers)
            layers = tuple(
                LayerIntervention(
                    layer=layer,
                    kind=spec.kind,
                    vector=vec,
                    scale=spec.coef if spec.kind != "cap" else 0.0,
                    tau=tau,
                    positions=spec.positions,
                )
                for layer, tau in zip(spec.layers, taus, strict=True)
            )
            return ResolvedIntervention(spec, layers, None, "given" if spec.kind == "cap" else None)
        if self.ws is None:
            raise BadRequest(f"{where}.vector names a vectors run but the server has no workspace (-w)",
                             f"{where}.vector")  # fmt: skip
        plan = self._plan(spec, where)
        layers = tuple(
            replace(iv, scale=spec.coef * iv.scale) if spec.kind != "cap" else iv for iv in plan.interventions
        )
        return ResolvedIntervention(spec, layers, plan.vector_run_id, plan.tau_source)

    def _plan(self, spec: InterventionSpec, where: str) -> Any:
        from personavec.steering.interventions import SteeringConfig, plan_steering

        assert isinstance(spec.vector, str) and self.ws is not None
        try:
            config = SteeringConfig(
                vector=spec.vector,
                kind=spec.kind,
                layers=spec.layers,
                coef=0.0 if spec.kind == "cap" else 1.0,
                positions=spec.positions,
                normalize=spec.normalize,
                tau=spec.tau,
                percentile=spec.percentile,
                reference_run=spec.reference_run,
            )
        except ConfigError as exc:
            raise BadRequest(f"{where}: {exc}", where) from None
        if config not in self._plans:
            try:
                with self.catalog_lock:
                    plan = plan_steering(
                        self.ws, config, n_layers=self.loaded.n_layers, d_model=self.loaded.d_model, loaded=self.loaded
                    )
            except (ConfigError, LookupError) as exc:
                raise BadRequest(f"{where}.vector: {exc}", f"{where}.vector") from None
            if model_identity(plan.vector_model) != self.identity:
                raise BadRequest(
                    f"{where}.vector: vectors run {plan.vector_run_id} was computed on model {plan.vector_model!r}, "
                    f"this server serves {self.loaded.name!r}: steer with vectors of the served model",
                    f"{where}.vector",
                )
            self._plans[config] = plan
        return self._plans[config]


# ---------------------------------------------------------------------------------------------------- rows


@dataclass(eq=False)
class _Row:
    ticket: Ticket
    index: int
    prompt_len: int
    max_tokens: int
    generator: Any
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    emitted: int = 0  # characters of text already sent
    sent: str = ""  # the text already sent
    sent_logprobs: int = 0
    length: int = 0  # valid tokens in the cache for this row
    done: bool = False
    serial: int = 0  # names the row in the hook state's cache key

    @property
    def request(self) -> ServeRequest:
        return self.ticket.request


class _PerRow:
    """The hook state of one pass: for each steered layer, a list of ``(unit, add, ablate, tau, last)`` batched
    tensors; ``last`` (``[B]`` bool, or None when no row needs it) marks the rows whose intervention in that slot
    changes only the last position of a prefill pass (``positions="response"``)."""

    def __init__(self) -> None:
        self.by_layer: dict[int, list[tuple[Any, Any, Any, Any, Any]]] = {}


def _build_state(rows: Sequence[_Row], *, decoding: bool, dtype: Any, devices: dict[int, Any]) -> _PerRow:
    import torch

    state = _PerRow()
    per_layer: dict[int, list[list[LayerIntervention]]] = {}
    for i, row in enumerate(rows):
        for resolved in row.ticket.interventions:
            for iv in resolved.layers:
                if iv.positions == "generated" and not decoding:
                    continue
                per_layer.setdefault(iv.layer, [[] for _ in rows])[i].append(iv)
    b = len(rows)
    for layer, lists in per_layer.items():
        depth = max(len(x) for x in lists)
        slots = []
        for k in range(depth):
            d = None
            units: list[np.ndarray | None] = []
            adds: list[np.ndarray | None] = []
            ablates: list[float] = []
            taus: list[float] = []
            last: list[bool] = []
            for ivs in lists:
                last.append(k < len(ivs) and ivs[k].positions == "response" and not decoding)
                if k < len(ivs):
                    iv = ivs[k]
                    v = iv.as_numpy()
                    norm = float(np.linalg.norm(v))
                    d = v.shape[0]
                    units.append(v / norm if norm > 0 else np.zeros_like(v))
                    adds.append(v * float(iv.scale) if iv.kind != "cap" else np.zeros_like(v))
                    ablates.append(1.0 if iv.kind == "ablate" else 0.0)
                    taus.append(float(iv.tau) if iv.kind == "cap" and iv.tau is not None else math.inf)
                else:
                    units.append(None)
                    adds.append(None)
                    ablates.append(0.0)
                    taus.append(math.inf)
            assert d is not None
            zero = np.zeros(d)
            device = devices[layer]
            slots.append(
                (
                    torch.as_tensor(
                        np.stack([u if u is not None else zero for u in units]), dtype=dtype, device=device
                    ),
                    torch.as_tensor(np.stack([a if a is not None else zero for a in adds]), dtype=dtype, device=device),
                    torch.tensor(ablates, dtype=dtype, device=device),
                    torch.tensor(taus, dtype=dtype, device=device),
                    torch.tensor(last, dtype=torch.bool, device=device) if any(last) else None,
                )
            )
        assert all(s[0].shape[0] == b for s in slots)
        state.by_layer[layer] = slots
    return state


# ---------------------------------------------------------------------------------------------------- engine


def prefill_groups(lengths: Sequence[int], max_tokens: int, max_padding: float) -> list[list[int]]:
    """The indices of prompts of ``lengths`` cut into the groups prefilled together (each one forward over its
    prompts left-padded to its longest): in length order, a group grows while its padded block (rows x longest)
    stays within ``max_tokens`` (a longer prompt is a group alone) and its padding within ``max_padding`` of the
    block or ``max_tokens // 64`` cells, below which one more forward costs more than the padding.

    Example:
        >>> prefill_groups([300, 12, 10, 290], 1024, 0.25)
        [[2, 1], [3, 0]]
    """
    groups: list[list[int]] = []
    group: list[int] = []
    tokens = 0
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        n = lengths[i]  # the longest so far: the block's width if i joins
        cells = (len(group) + 1) * n
        if group and (cells > max_tokens or cells - tokens - n > max(max_padding * cells, max_tokens // 64)):
            groups.append(group)
            group, tokens = [], 0
        group.append(i)
        tokens += n
    if group:
        groups.append(group)
    return groups


class Scheduler:
    """The model thread. ``submit`` a request with a sink for its events; ``start`` / ``stop`` the thread.

    Args:
        loaded: the served model.
        resolver: resolves interventions (None: requests with interventions are refused).
        max_batch: rows (answers) decoded together; more wait for a free row.
        max_new_tokens: the default and largest ``max_tokens``.
        on_finished: called on the model thread with ``(ticket, [Finished...])`` when every answer of a request is
            complete (the recorder); never for a cancelled request.
        tuning: its batch token budget (:meth:`personavec.tuning.Tuning.batch_tokens`) and ``prefill_padding`` cut
            the prefill of joining requests (:func:`prefill_groups`).
    """

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        resolver: InterventionResolver | None = None,
        max_batch: int = 64,
        max_new_tokens: int = 1024,
        on_finished: Callable[[Ticket, list[Finished]], None] | None = None,
        tuning: Tuning = DEFAULT,
    ) -> None:
        import torch

        from personavec.generation.local import stop_ids

        self.loaded = loaded
        self.tok = loaded.tokenizer
        self.resolver = resolver
        self.max_batch = max_batch
        self.max_new_tokens = max_new_tokens
        self.on_finished = on_finished
        self.stops = stop_ids(loaded)
        self.context = loaded.context_length or 2048
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else (self.tok.eos_token_id or 0)
        self._inbox: queue.Queue[Ticket | None] = queue.Queue()
        self._rows: list[_Row] = []
        self._joining: list[_Row] = []  # rows being prefilled
        self._waiting: list[_Row] = []  # admitted rows not prefilled yet
        self._cache: Any = None
        self._mask: Any = None  # [B, W] long
        self._state: _PerRow | None = None
        self._state_key: tuple | None = None
        self._finished: dict[int, list[Finished | None]] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._hooks: Any = None  # hooks.patch over every steerable block, while started
        self._token_text: dict[int, str] = {}
        self.error: BaseException | None = None
        params = inspect.signature(loaded.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_kw = "logits_to_keep" in params
        self.dtype = torch.float64 if loaded.model.dtype == torch.float64 else torch.float32
        self.devices = {i + 1: next(block.parameters()).device for i, block in enumerate(loaded.layers)}
        self._serials = itertools.count()
        self.steps = 0  # decoding steps run
        self.peak = 0  # the most rows one decoding step has run (reset it to watch a window)
        self.prefill_budget = tuning.batch_tokens(loaded.input_device)
        self.prefill_padding = tuning.prefill_padding
        self.prefills = 0  # prefill forwards run
        self.prefill_tokens = 0  # prompt tokens they computed
        self.prefill_cells = 0  # cells they computed: prompt tokens and padding

    # ------------------------------------------------------------------ public

    def start(self) -> None:
        self._check_cache()  # refuse at start what we cannot batch
        self._hooks = patch(self.loaded.layers, {layer: self._edit(layer) for layer in range(1, self.loaded.n_layers)})
        self._hooks.__enter__()
        self._thread = threading.Thread(target=self._run, name="personavec-serve-model", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout=30)
        hooks, self._hooks = self._hooks, None
        if hooks is not None:
            hooks.__exit__(None, None, None)

    def submit(self, request: ServeRequest, sink: Callable[[Event], object]) -> Ticket:
        """Queue a request; its events (first :class:`Admitted` or :class:`Refused`) go to ``sink`` from the model
        thread."""
        if self.error is not None:
            raise ModelError(f"the model thread failed: {self.error}")
        ticket = Ticket(request, sink)
        self._inbox.put(ticket)
        return ticket

    @property
    def active(self) -> int:
        """Answers in progress: decoding, or admitted and waiting for their prefill."""
        return len(self._rows) + len(self._joining) + len(self._waiting)

    # ------------------------------------------------------------------ hooks

    def _edit(self, layer: int) -> Any:
        from personavec.steering.interventions import apply_rows

        def edit(h: Any) -> Any:
            import torch

            state = self._state
            slots = state.by_layer.get(layer) if state is not None else None
            if not slots:
                return h
            x = h if h.dtype == slots[0][0].dtype else h.to(slots[0][0].dtype)
            for unit, add, ablate, tau, last in slots:
                mask = None
                if last is not None and x.shape[1] > 1:  # rows are right-aligned: the last column ends each prompt
                    final = torch.arange(x.shape[1], device=x.device) == x.shape[1] - 1
                    mask = (final.view(1, -1) | ~last.view(-1, 1)).unsqueeze(-1)
                x = apply_rows(x, unit, add, ablate, tau, mask)
            return x.to(h.dtype)

        return edit

    def _set_state(self, rows: Sequence[_Row], *, decoding: bool) -> None:
        key = (decoding, tuple(r.serial for r in rows))
        if key == self._state_key:
            return
        self._state_key = key
        if not any(r.ticket.interventions for r in rows):
            self._state = None
            return
        self._state = _build_state(rows, decoding=decoding, dtype=self.dtype, devices=self.devices)

    # ------------------------------------------------------------------ loop

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._waiting.extend(self._admit())
                self._drop()
                if self._waiting:
                    groups = self._next_prefill()
                    self._joining = [row for group in groups for row in group]
                    for group in groups:
                        self._prefill_group(group)
                    self._joining = []
                    self._drop()
                if self._rows:
                    self._decode()
        except BaseException as exc:  # surface the failure to every waiting client, then stop
            self.error = exc
            failed = Refused(ModelError(f"the model thread failed: {type(exc).__name__}: {exc}"))
            tickets = {id(r.ticket): r.ticket for r in (*self._rows, *self._joining, *self._waiting)}
            while True:
                try:
                    waiting = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if waiting is not None:
                    tickets[id(waiting)] = waiting
            for ticket in tickets.values():
                ticket.sink(failed)
            raise

    def _admit(self) -> list[_Row]:
        joiners: list[_Row] = []
        block = not self._rows and not self._waiting
        while len(self._rows) + len(self._waiting) + len(joiners) < self.max_batch:
            try:
                ticket = self._inbox.get(block=block and not joiners, timeout=0.5 if block and not joiners else None)
            except queue.Empty:
                break
            if ticket is None:
                break
            if ticket.cancelled:
                continue
            try:
                rows = self._accept(ticket)
            except BadRequest as exc:
                ticket.sink(Refused(exc))
                continue
            ticket.sink(Admitted(len(ticket.prompt)))
            joiners.extend(rows)
            if self.max_batch - len(self._rows) - len(self._waiting) - len(joiners) < 0:
                break
        return joiners

    def _accept(self, ticket: Ticket) -> list[_Row]:
        import torch

        req = ticket.request
        ticket.prompt = self._prompt_ids(req)
        max_tokens = req.max_tokens if req.max_tokens is not None else self.max_new_tokens
        if max_tokens > self.max_new_tokens:
            raise BadRequest(f"max_tokens {max_tokens} is more than this server allows ({self.max_new_tokens})",
                             "max_tokens")  # fmt: skip
        if req.max_tokens is None:
            max_tokens = max(1, min(max_tokens, self.context - len(ticket.prompt)))
        if len(ticket.prompt) + max_tokens > self.context:
            raise BadRequest(
                f"the prompt ({len(ticket.prompt)} tokens) plus max_tokens ({max_tokens}) exceeds the model's context "
                f"of {self.context} tokens",
                "max_tokens" if len(ticket.prompt) < self.context else "messages",
            )
        if req.n > self.max_batch:
            raise BadRequest(f"n {req.n} is more than the server's batch ({self.max_batch})", "n")
        if req.interventions:
            if self.resolver is None:
                raise BadRequest("this server takes no interventions", "interventions")
            self._state_key = None  # the resolver may run the model (cap thresholds): rebuild the state after
            self._state = None
            ticket.interventions = self.resolver.resolve(req.interventions)
        rows = []
        for i in range(req.n):
            gen = None
            if req.temperature > 0:
                gen = torch.Generator(device=self.loaded.input_device)
                if req.seed is not None:
                    gen.manual_seed(int(req.seed) + i)
                else:
                    gen.seed()
            rows.append(_Row(ticket, i, len(ticket.prompt), max_tokens, gen, serial=next(self._serials)))
        self._finished[id(ticket)] = [None] * req.n
        return rows

    def _prompt_ids(self, req: ServeRequest) -> list[int]:
        if req.messages is not None:
            if not getattr(self.tok, "chat_template", None):
                raise BadRequest(f"{self.loaded.name} has no chat template: use /v1/completions", "messages")
            messages = [{"role": r, "content": c} for r, c in req.messages]
            try:
                text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception as exc:  # the template's own checks (roles, order)
                raise BadRequest(f"the chat template refused the messages: {exc}", "messages") from None
            ids = list(self.tok(text, add_special_tokens=False)["input_ids"])
        else:
            ids = list(self.tok(req.prompt)["input_ids"])
        if not ids:
            raise BadRequest("the prompt is empty", "prompt")
        return ids

    # ------------------------------------------------------------------ batch bookkeeping

    def _drop(self) -> None:
        """Remove finished and cancelled rows from the batch (and cancelled ones from those waiting) and trim padding
        columns no row needs."""
        import torch

        for row in self._waiting:
            if row.ticket.cancelled:
                self._finished.pop(id(row.ticket), None)
        self._waiting = [r for r in self._waiting if not r.ticket.cancelled]

        for row in self._rows:
            if row.ticket.cancelled and not row.done:
                row.done = True
                self._finished.pop(id(row.ticket), None)
        keep = [i for i, r in enumerate(self._rows) if not r.done]
        if len(keep) == len(self._rows):
            return
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._cache = self._mask = None
            self._state, self._state_key = None, None  # an idle server steers nothing
            return
        index = torch.tensor(keep, dtype=torch.long)
        self._mask = self._mask[index]
        width = max(r.length for r in self._rows)
        for layer in self._cache.layers:
            layer.keys = layer.keys[index.to(layer.keys.device), :, -width:, :]
            layer.values = layer.values[index.to(layer.values.device), :, -width:, :]
        self._mask = self._mask[:, -width:]

    def _forward(self, ids: Any, mask: Any, positions: Any, cache: Any, keep_last: bool) -> Any:
        import torch

        device = self.loaded.input_device
        kwargs = {self._cache_kw: cache, "use_cache": True}
        if keep_last and self._keep_kw:
            kwargs["logits_to_keep"] = 1
        with torch.inference_mode():
            out = self.loaded.model(
                input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device), **kwargs
            )
        return out.logits[:, -1, :]

    def _next_prefill(self) -> list[list[_Row]]:
        """The groups of waiting rows to prefill in this loop iteration (:func:`prefill_groups`), the group of the
        longest-waiting row first, while their cells stay within the batch token budget (at least one group). The
        rest wait for the next iteration, after a decoding step: a wave of long prompts joining does not stall the
        rows already answering for all of its prefill."""
        waiting = self._waiting
        groups = prefill_groups([r.prompt_len for r in waiting], self.prefill_budget, self.prefill_padding)
        groups.sort(key=lambda g: min(waiting[i].serial for i in g))
        taken: list[list[_Row]] = []
        cells = 0
        for group in groups:
            size = max(waiting[i].prompt_len for i in group) * len(group)
            if taken and cells + size > self.prefill_budget:
                break
            taken.append([waiting[i] for i in group])
            cells += size
        chosen = {id(row) for group in taken for row in group}
        self._waiting = [r for r in waiting if id(r) not in chosen]
        return taken

    def _prefill_group(self, joiners: list[_Row]) -> None:
        import torch
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        width = max(r.prompt_len for r in joiners)
        self.prefills += 1
        self.prefill_tokens += sum(r.prompt_len for r in joiners)
        self.prefill_cells += width * len(joiners)
        ids = torch.full((len(joiners), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(joiners), width), dtype=torch.long)
        for i, row in enumerate(joiners):
            ids[i, width - row.prompt_len :] = torch.tensor(row.ticket.prompt, dtype=torch.long)
            mask[i, width - row.prompt_len :] = 1
            row.length = row.prompt_len
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        cache = DynamicCache()  # full layers for every layer kind, sliding ones included (see the module docstring)
        self._set_state(joiners, decoding=False)
        logits = self._forward(ids, mask, positions, cache, keep_last=True)
        if len(cache.layers) != self.loaded.model.config.get_text_config().num_hidden_layers or any(
            type(layer) is not DynamicLayer for layer in cache.layers
        ):
            raise ModelError(f"{self.loaded.name} filled its KV cache in a way the steering server cannot batch")
        self._merge(joiners, cache, mask)
        self._sample(joiners, logits)

    def _check_cache(self) -> None:
        """Refuse a model whose layers are not all full or sliding-window attention (by its own cache's layers and
        its config's layer types: chunked attention has a sliding layer's cache but a mask the batch would shift)."""
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

        config = self.loaded.model.config.get_text_config()
        kinds = {type(layer).__name__ for layer in DynamicCache(config=self.loaded.model.config).layers
                 if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer)}  # fmt: skip
        kinds |= set(getattr(config, "layer_types", None) or ()) - {"full_attention", "sliding_attention"}
        if getattr(config, "attention_chunk_size", None):
            kinds.add("chunked_attention")
        if kinds:
            raise ModelError(
                f"{self.loaded.name} has {', '.join(sorted(kinds))} layers; the steering server batches models whose "
                f"layers are all full or sliding-window attention (Llama, Qwen, Mistral, Gemma 2 and 3...)"
            )

    def _merge(self, joiners: list[_Row], cache: Any, mask: Any) -> None:
        import torch

        if not self._rows:
            self._rows, self._cache, self._mask = list(joiners), cache, mask
            return
        old_w, new_w = self._mask.shape[1], mask.shape[1]
        width = max(old_w, new_w)

        def pad(t: Any, w: int) -> Any:  # left-pad the sequence dimension (-2 for K/V, -1 for masks)
            if w == width:
                return t
            if t.dim() == 2:
                return torch.cat([torch.zeros((t.shape[0], width - w), dtype=t.dtype, device=t.device), t], dim=1)
            shape = (t.shape[0], t.shape[1], width - w, t.shape[3])
            return torch.cat([torch.zeros(shape, dtype=t.dtype, device=t.device), t], dim=2)

        for mine, theirs in zip(self._cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([pad(mine.keys, old_w), pad(theirs.keys, new_w)], dim=0)
            mine.values = torch.cat([pad(mine.values, old_w), pad(theirs.values, new_w)], dim=0)
        self._mask = torch.cat([pad(self._mask, old_w), pad(mask, new_w)], dim=0)
        self._rows.extend(joiners)

    def _decode(self) -> None:
        import torch

        rows = self._rows
        ids = torch.tensor([[r.tokens[-1]] for r in rows], dtype=torch.long)
        positions = torch.tensor([[r.length] for r in rows], dtype=torch.long)
        self._mask = torch.cat([self._mask, torch.ones((len(rows), 1), dtype=torch.long)], dim=1)
        for r in rows:
            r.length += 1
        self._set_state(rows, decoding=True)
        logits = self._forward(ids, self._mask, positions, self._cache, keep_last=False)
        self.steps += 1
        self.peak = max(self.peak, len(rows))
        self._sample(rows, logits)

    # ------------------------------------------------------------------ sampling and output

    def _sample(self, rows: Sequence[_Row], logits: Any) -> None:
        import torch

        logits = logits.to(self.dtype)
        chosen = logits.argmax(-1).tolist()
        finite = torch.isfinite(logits).all(-1).tolist()
        want_lp = [r.request.logprobs for r in rows]
        logp = torch.log_softmax(logits, dim=-1) if any(want_lp) else None
        for i, row in enumerate(rows):
            if not finite[i]:
                self._refuse_row(row)
                continue
            req = row.request
            if req.temperature > 0:
                scaled = logits[i] / req.temperature
                probs = torch.softmax(scaled, dim=-1)
                if req.top_p < 1.0:
                    sorted_p, order = probs.sort(descending=True)
                    cut = sorted_p.cumsum(-1) - sorted_p >= req.top_p  # keep the smallest set reaching top_p
                    sorted_p[cut] = 0.0
                    probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
                chosen[i] = int(torch.multinomial(probs, 1, generator=row.generator))
            token = int(chosen[i])
            if logp is not None and want_lp[i]:
                top: tuple[tuple[str, float], ...] = ()
                if req.top_logprobs:
                    values, idx = logp[i].topk(req.top_logprobs)
                    top = tuple((self._text(t), float(v)) for v, t in zip(values.tolist(), idx.tolist(), strict=True))
                row.logprobs.append(TokenLogprob(self._text(token), float(logp[i, token]), top))
            row.tokens.append(token)
            self._advance(row)

    def _refuse_row(self, row: _Row) -> None:
        """A row whose logits are NaN or inf leaves the batch with its request refused (sampling from them raised and
        took the model thread down, so every later request failed; greedy answered an empty text)."""
        if not row.ticket.cancelled:
            if row.ticket.interventions:
                error: BaseException = BadRequest(
                    f"the model's logits became NaN/inf at token {len(row.tokens) + 1} under this request's "
                    f"interventions: they push the residual stream past what {self.dtype} holds; lower the coef "
                    "(or the vector's norm)",
                    "interventions",
                )
            else:
                error = ModelError(f"the model's logits became NaN/inf at token {len(row.tokens) + 1} (unsteered)")
            row.ticket.sink(Refused(error))
            row.ticket.cancel()  # its other answers (n > 1) leave too
        row.done = True

    def _text(self, token: int) -> str:
        if token not in self._token_text:
            self._token_text[token] = self.tok.decode([token])
        return self._token_text[token]

    def _advance(self, row: _Row) -> None:
        """After a new token: finish the row (end-of-turn token, stop string, max_tokens) or send the new text."""
        req = row.request
        ended = row.tokens[-1] in self.stops and not req.ignore_eos
        body = row.tokens[:-1] if ended else row.tokens
        text = self.tok.decode(body, skip_special_tokens=True)
        reason = "stop" if ended else None
        for s in req.stop:
            at = text.find(s)
            if at >= 0:
                text, reason = text[:at], "stop"
        if reason is None and len(row.tokens) >= row.max_tokens:
            reason = "length"
        if row.ticket.cancelled:
            row.done = True
            return
        if reason is not None:
            row.done = True
            # The streamed pieces add up to ``text`` (what was sent is a prefix of it but in the rare case of a
            # tokenizer whose decoding of a prefix is not a prefix of the whole).
            new = text[len(row.sent) :] if text.startswith(row.sent) else ""
            row.ticket.sink(Delta(row.index, new, tuple(row.logprobs[row.sent_logprobs :])))
            done = Finished(row.index, text, reason, len(row.tokens), tuple(row.tokens), tuple(row.logprobs))
            slots = self._finished.get(id(row.ticket))
            if slots is not None:
                slots[row.index] = done
                if all(s is not None for s in slots):
                    del self._finished[id(row.ticket)]
                    # handed to the recorder before the client hears its last answer: a recorder.flush() after the
                    # response waits for it
                    if self.on_finished is not None:
                        self.on_finished(row.ticket, [s for s in slots if s is not None])
            row.ticket.sink(done)
            return
        # Hold back what could still change: an incomplete UTF-8 character, or the start of a stop string.
        safe = len(text)
        if text.endswith("\ufffd"):
            safe = len(text.rstrip("\ufffd"))
        if req.stop:
            safe = min(safe, len(text) - max(len(s) for s in req.stop) + 1)
        if safe > row.emitted:
            piece = text[row.emitted : safe]
            row.emitted = safe
            row.sent += piece
            row.ticket.sink(Delta(row.index, piece, tuple(row.logprobs[row.sent_logprobs :])))
            row.sent_logprobs = len(row.logprobs)
        elif req.logprobs and len(row.logprobs) > row.sent_logprobs:
            row.ticket.sink(Delta(row.index, "", tuple(row.logprobs[row.sent_logprobs :])))
            row.sent_logprobs = len(row.logprobs)

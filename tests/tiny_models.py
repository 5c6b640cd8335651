"""Tiny random-weight models of several architectures, built from configs (no downloads), for extraction tests; and
the dtype the tests run the embedded model in.

Tokenizers come from the embedded model's converted directory (local) with the chat template swapped for the style
under test, so spans are tested against real templates of each family. The tiny models carry that tokenizer cut to
its first ``TINY_VOCAB`` tokens (the same byte-level BPE, fewer merges): a 49k-token vocabulary made a 64-wide model
mostly embedding and lm_head, and its tokenizer slower to load than the model.
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from personavec.modeling import local_model_path

TINY_VOCAB = 2048  # the tiny models' tokenizer: the embedded one's first 2,048 tokens (its specials, bytes, merges)
VOCAB = TINY_VOCAB + 64  # the tiny models' embedding rows: their tokenizer plus the turn markers of the templates below
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    pad_token_id=2,
    bos_token_id=1,
    eos_token_id=2,
)

# Gemma style: system merged into the first user turn, BOS in the template, "model" role.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}{%- endif -%}{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') + message['content'] | trim"
    " + '<end_of_turn>\n' }}{%- endfor -%}{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
# Llama-3 style: BOS in the template, header ids, content trimmed.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# ChatML (Qwen), no default system prompt.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TURN_MARKERS = ["<start_of_turn>", "<end_of_turn>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
TEMPLATES = {"gemma": GEMMA_TEMPLATE, "llama3": LLAMA3_TEMPLATE, "chatml": CHATML_TEMPLATE, "smollm2": None}


def tiny_config(arch: str):
    """A 4-layer, 64-wide config of an architecture family."""
    from transformers import (
        Gemma2Config,
        Gemma3Config,
        Gemma3TextConfig,
        GPT2Config,
        LlamaConfig,
        MistralConfig,
        Olmo2Config,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    if arch == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=4, n_head=4, bos_token_id=1, eos_token_id=2)
    if arch == "gemma3":  # multimodal wrapper with text_config
        return Gemma3Config(
            text_config=dict(_COMMON, head_dim=16),
            vision_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=28,
                patch_size=14,
            ),
            mm_tokens_per_image=4,
        )
    if arch == "gpt_neox":  # GPTNeoXForCausalLM: the class name does not spell the model type
        from transformers import GPTNeoXConfig

        return GPTNeoXConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            bos_token_id=1, eos_token_id=2, pad_token_id=2,
        )  # fmt: skip
    if arch == "qwen3_moe":  # Qwen3MoeForCausalLM: 4 experts, 2 per token
        from transformers import Qwen3MoeConfig

        return Qwen3MoeConfig(
            **_COMMON,
            head_dim=16,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            decoder_sparse_step=1,
        )
    if arch == "olmo3":
        from transformers import Olmo3Config

        return Olmo3Config(**_COMMON)
    classes = {
        "llama": LlamaConfig,
        "mistral": MistralConfig,
        "qwen2": Qwen2Config,
        "qwen3": Qwen3Config,
        "gemma2": Gemma2Config,
        "gemma3text": Gemma3TextConfig,
        "olmo2": Olmo2Config,
        "phi3": Phi3Config,
    }
    extra = {"head_dim": 16} if arch in ("qwen3", "gemma2", "gemma3text") else {}
    return classes[arch](**_COMMON, **extra)


def template_tokenizer(template: str, vocab: int | None = None):
    """The embedded tokenizer with a chat template of another family and that family's turn markers; with ``vocab``,
    cut to its first ``vocab`` tokens (see :func:`_cut_tokenizer_dir`)."""
    source = local_model_path("smollm2-135m-instruct") if vocab is None else _cut_tokenizer_dir(vocab)
    tok = AutoTokenizer.from_pretrained(source)
    if TEMPLATES[template] is not None:
        tok.chat_template = TEMPLATES[template]
    # Real Gemma/Llama-3 tokenizers know their turn markers as special tokens; so must ours.
    # transformers 5 renamed the keyword (replace_additional_special_tokens in 4.x); both keep the existing ones.
    try:
        tok.add_special_tokens({"additional_special_tokens": TURN_MARKERS}, replace_extra_special_tokens=False)
    except TypeError:
        tok.add_special_tokens({"additional_special_tokens": TURN_MARKERS}, replace_additional_special_tokens=False)
    return tok


@functools.cache
def _cut_tokenizer_dir(vocab: int) -> Path:
    """The embedded tokenizer's files with its BPE cut to the first ``vocab`` ids. Its vocabulary is ordered as BPE
    builds one (special tokens, the 235 byte symbols, then one token per merge, in merge order: merge ``i`` makes id
    ``252 + i``), so the first ``vocab`` ids and the merges that make them are a complete tokenizer of their own."""
    source = local_model_path("smollm2-135m-instruct")
    out = Path(tempfile.mkdtemp(prefix=f"personavec-tokenizer-{vocab}-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    spec = json.loads((source / "tokenizer.json").read_text())
    model = spec["model"]
    model["vocab"] = {token: i for token, i in model["vocab"].items() if i < vocab}
    model["merges"] = [
        m for m in model["merges"] if "".join(m if isinstance(m, list) else m.split(" ")) in model["vocab"]
    ]
    assert len(model["vocab"]) == vocab and all(t["id"] < vocab for t in spec["added_tokens"])
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    return out


def save_template_tokenizer(template: str, out: Path) -> None:
    """``template_tokenizer(template, TINY_VOCAB).save_pretrained(out)``, built once per process: later calls copy
    its files."""
    saved = _SAVED_TOKENIZERS.get(template)
    if saved is None or not saved.is_dir():
        saved = Path(tempfile.mkdtemp(prefix=f"personavec-tokenizer-{template}-"))
        atexit.register(shutil.rmtree, saved, ignore_errors=True)
        template_tokenizer(template, TINY_VOCAB).save_pretrained(saved)
        _SAVED_TOKENIZERS[template] = saved
    out.mkdir(parents=True, exist_ok=True)
    for f in saved.iterdir():
        shutil.copyfile(f, out / f.name)


def tiny_model_dir(root: Path, arch: str, template: str = "chatml", seed: int = 0) -> Path:
    """Save a random tiny model of ``arch`` with the cut embedded tokenizer and ``template`` (a TEMPLATES key) to a
    dir."""
    out = root / f"{arch}-{template}"
    if (out / "config.json").is_file():
        return out
    built = _BUILT.get((arch, template, seed))
    if built is not None and (built / "config.json").is_file():  # built under another root in this process: copy
        shutil.copytree(built, out)  # (a copy, not a link: a test may change its model's files)
        return out
    torch.manual_seed(seed)
    config = tiny_config(arch)
    if arch == "gemma3":
        from transformers import Gemma3ForConditionalGeneration

        model = Gemma3ForConditionalGeneration(config)
    else:
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    save_template_tokenizer(template, out)
    _BUILT[arch, template, seed] = out
    return out


#: Every tiny model built in this process: building one (random init, save, tokenizer) takes seconds on a loaded
#: machine, copying its directory milliseconds; the same (arch, template, seed) always has the same weights.
_BUILT: dict[tuple[str, str, int], Path] = {}
_SAVED_TOKENIZERS: dict[str, Path] = {}


@functools.cache
def embedded_dtype() -> str:
    """The embedded model's dtype in the tests that share it (conftest's ``embedded_loaded``, ``steering_server``)
    and in those starting it themselves: bfloat16 forwards ~1.5x and decodes ~1.9x faster than
    float32 on this project's build machines (AVX512-BF16, one thread); float32 where the CPU lacks native bfloat16
    (emulated there, slower). The tests asserting on these answers pass in both (the pirate trait's AUROC: 0.981 and
    0.971 in bfloat16, 0.981 and 0.973 in float32); a test whose margin is thin in bfloat16 loads its own float32
    copy (test_steering.py)."""
    return "bfloat16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "float32"


def tiny_gguf(out: Path, seed: int = 0) -> Path:
    """A tiny llama written as a GGUF file (float32 tensors, the cut tokenizer with ChatML): a model file
    ``local_model_path`` converts in about half a second, where the embedded model takes ~15 s."""
    import gguf

    spec = json.loads((_cut_tokenizer_dir(TINY_VOCAB) / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.__getitem__)
    torch.manual_seed(seed)
    config = tiny_config("llama")
    config.vocab_size = len(tokens)  # one embedding row per token the file lists
    model = AutoModelForCausalLM.from_config(config)
    special = {t["id"] for t in spec["added_tokens"]}
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])  # control / normal
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]])
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_chat_template(CHATML_TEMPLATE)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        base, suffix = name.rsplit(".", 1)
        mapped = names.get_name(base) or names.get_name(base.removeprefix("model."))  # older gguf: full names only
        if mapped is None:
            raise AssertionError(f"this gguf package has no GGUF name for {name}")
        writer.add_tensor(f"{mapped}.{suffix}", tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def llama8(out: Path, seed: int) -> str:
    """An 8-layer, 64-wide random llama (``seed``) with a ChatML template, saved to ``out``: the synthetic
    extraction's model size."""
    torch.manual_seed(seed)
    config = tiny_config("llama")
    config.num_hidden_layers = 8
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    save_template_tokenizer("chatml", out)
    return str(out)

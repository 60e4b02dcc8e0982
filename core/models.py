"""Load tokenizers and models (hub id, local dir, or the built-in tiny config), and add LoRA.

Remote code is never run unless `model.trust_remote_code=true`; weights are read and written
as safetensors.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    MODEL_FOR_CAUSAL_LM_MAPPING,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from core import dist  # noqa: E402
from core.config import PRECISIONS, plain  # noqa: E402
from data.collate import pack_pairs

log = logging.getLogger(__name__)

BUILTIN = "builtin"
TRAIN_TOKENIZER = "train"
PAD_TOKEN = "<|pad|>"

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ModelError(ValueError):
    """A user-fixable problem with a model or tokenizer setting."""


def resolve_precision(precision: str) -> str:
    """auto -> bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU."""
    if precision not in PRECISIONS:
        raise ModelError(f"train.precision must be {'|'.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        if precision != "fp32" and not torch.cuda.is_available():
            raise ModelError(f"train.precision={precision} needs a GPU; use fp32 (or auto) on CPU")
        return precision
    if not torch.cuda.is_available():
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def torch_dtype(precision: str) -> torch.dtype:
    return _DTYPES[resolve_precision(precision)]


def load_tokenizer(
    tokenizer: str | None, name_or_path: str | None, trust_remote_code: bool, revision: str | None = None
):
    """The tokenizer at `tokenizer` (or at the model's path), with a pad token that is not EOS.

    Padding with EOS is a known trap (the model stops learning to stop when EOS is masked as
    padding). Order of preference: the tokenizer's own pad token; its UNK when distinct from
    EOS/BOS; else a new `<|pad|>` token (the model's embeddings are resized to match).
    """
    source = tokenizer or name_or_path
    if source is None:
        raise ModelError(
            "model.tokenizer is null and model.name_or_path is null: nothing to load a tokenizer from"
        )
    if source == BUILTIN:
        from data.builtin.tokenizer import build_tokenizer

        tok = build_tokenizer()
    elif source == TRAIN_TOKENIZER:
        raise ModelError(
            "model.tokenizer=train trains a tokenizer on the SFT data and only the sft stage does that; "
            "the later stages take the tokenizer saved in the export they start from (leave model.tokenizer=null)"
        )
    else:
        try:
            tok = AutoTokenizer.from_pretrained(
                source, trust_remote_code=trust_remote_code, revision=revision
            )
        except (OSError, ValueError) as e:
            raise ModelError(f"model.tokenizer: cannot load a tokenizer from {source!r}: {e}") from None
    if tok.eos_token_id is None:
        raise ModelError(f"tokenizer {source!r} has no EOS token; responses must end with one")
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        specials = {tok.eos_token_id, tok.bos_token_id}
        if tok.unk_token_id is not None and tok.unk_token_id not in specials:
            tok.pad_token = tok.unk_token
        else:
            tok.add_special_tokens({"pad_token": PAD_TOKEN})
        log.info("tokenizer: pad token set to %r (id %d), distinct from EOS", tok.pad_token, tok.pad_token_id)
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2's scheme) trained on `texts` with the `tokenizers` library.

    Specials: <pad>, <s> (BOS, prepended to every encoding), </s> (EOS), <unk>. Byte-level means no
    text is ever unknown, so it also encodes text outside the training corpus.
    """
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors, trainers
    from tokenizers import models as tok_models

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    tok = Tokenizer(tok_models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])  # fmt: skip
    log.info("tokenizer: trained a byte-level BPE tokenizer of %d tokens", tok.get_vocab_size())
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", padding_side="right", model_max_length=1024)  # fmt: skip


HEADS = {"lm": AutoModelForCausalLM, "score": AutoModelForSequenceClassification}
MAPPINGS = {"lm": MODEL_FOR_CAUSAL_LM_MAPPING, "score": MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING}


def load_model(
    name_or_path: str | None,
    arch: dict[str, Any],
    tokenizer,
    precision: str,
    *,
    head: str = "lm",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    revision: str | None = None,
) -> PreTrainedModel:
    """A model from the hub / a local dir, or a fresh one from `arch` (e.g. the built-in tiny Llama).

    head="lm": a causal LM. head="score": the same backbone with a scalar head (sequence
    classification with one label); from a causal-LM checkpoint (an SFT export) the head is new.
    Call inside `core.deepspeed.zero3_init(...)` so ZeRO-3 partitions it as it is created.
    Embeddings grow to the tokenizer's size when it gained a pad token.
    """
    if head not in HEADS:
        raise ModelError(f"head must be one of {sorted(HEADS)}, got {head!r}")
    auto_class = HEADS[head]
    dtype = torch_dtype(precision)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if head == "score":
        kwargs["num_labels"] = 1
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if name_or_path is None:
        if "model_type" not in arch:
            raise ModelError("model.arch needs a `model_type` (e.g. llama) when model.name_or_path is null")
        arch = dict(arch)
        if "vocab_size" in arch:
            raise ModelError("model.arch.vocab_size is set from the tokenizer's length; leave it out")
        try:
            config = AutoConfig.for_model(arch.pop("model_type"), vocab_size=len(tokenizer), **arch)
        except (ValueError, TypeError) as e:
            raise ModelError(f"model.arch: {e}") from None
        config.pad_token_id, config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
        config.bos_token_id = tokenizer.bos_token_id
        config.num_labels = kwargs.pop("num_labels", config.num_labels)
        model = auto_class.from_config(config, **kwargs)
    elif is_adapter_export(name_or_path):  # a LoRA run's export: its adapters merged into their base
        merged = merged_adapter_export(name_or_path, trust_remote_code)
        if isinstance(merged, Path):  # the run wrote its merged copy
            return load_model(str(merged), {}, tokenizer, precision, head=head, trust_remote_code=trust_remote_code,
                              attn_implementation=attn_implementation)  # fmt: skip
        config, state = merged
        config.num_labels = kwargs.pop("num_labels", config.num_labels)
        # the model class itself: an Auto class takes no state dict without a path (transformers 5.24); built
        # whole, as transformers' ZeRO-3 loading takes no state dict either: ZeRO-3 partitions it in its engine
        from core import deepspeed as ds  # core.deepspeed imports this module

        if type(config) not in MAPPINGS[head]:  # a custom-code architecture: no class to build it from here
            raise ModelError(
                f"{name_or_path}: a LoRA export of a {type(config).__name__} model, which transformers cannot "
                f"build without its own code; export it merged (peft.merge_on_export=true in its run)"
            )
        with ds.zero3_init_disabled():
            model = MAPPINGS[head][type(config)].from_pretrained(
                None, config=config, state_dict=state, **kwargs
            )
        model.config._name_or_path = name_or_path  # where it came from (a LoRA actor's adapter names it)
    else:
        try:  # safetensors only: a pickled `pytorch_model.bin` is never unpickled
            with _no_safetensors_conversion():
                model = auto_class.from_pretrained(
                    name_or_path, revision=revision, use_safetensors=True, **kwargs
                )
        except (OSError, ValueError) as e:  # ValueError: an unknown model type, or custom code refused
            pickled = Path(name_or_path, "pytorch_model.bin").is_file() or "safetensors" in str(e)
            hint = (
                " (only safetensors weights are loaded; a checkpoint with just a pickled pytorch_model.bin: load "
                "it in transformers where you trust it and save_pretrained() it, which writes safetensors)"
                if pickled
                else " (custom model code runs only with model.trust_remote_code=true, for repos you trust)"
                if "trust_remote_code" in str(e) and not trust_remote_code
                else ""
            )
            raise ModelError(f"model.name_or_path: cannot load {name_or_path!r}{hint}: {e}") from None
    if _ds_rows(model) < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


ADAPTER_CONFIG = "adapter_config.json"


def is_adapter_export(path: str) -> bool:
    """A local peft adapter directory without a model of its own: a LoRA run's `export/`."""
    return Path(path, ADAPTER_CONFIG).is_file() and not Path(path, "config.json").is_file()


def merged_adapter_export(path: str, trust_remote_code: bool) -> Path | tuple[Any, dict[str, torch.Tensor]]:
    """A LoRA export (`core.checkpoint.export_model`) as a full model: its `merged/` copy when the run
    wrote one (`peft.merge_on_export`), else (config, state dict) of its adapters merged by peft into
    their base (the export's `base/` when the base was built from a config, else the base its
    `export_info.json` records, found beside it in a tree moved or copied whole, else the adapter's
    `base_model_name_or_path`). The merge runs on a plain CPU copy on every rank (ZeRO-3 or not), and the
    next stage starts from the policy LoRA trained."""
    from core import deepspeed as ds  # core.deepspeed imports this module

    root = Path(path)
    if (root / "merged" / "config.json").is_file():
        return root / "merged"
    if not (root / "adapter_model.safetensors").is_file():
        raise ModelError(
            f"{path}: a peft adapter without adapter_model.safetensors (only safetensors are loaded)"
        )
    from core.checkpoint import EXPORT_INFO, resolve_reference  # core.checkpoint imports this module

    adapter = json.loads((root / ADAPTER_CONFIG).read_text())
    info = json.loads((root / EXPORT_INFO).read_text()) if (root / EXPORT_INFO).is_file() else {}
    if (root / "base" / "config.json").is_file():
        base: Path | str | None = root / "base"
    elif "adapter_base" in info:  # this project's export: the base beside it when the tree moved whole
        base = resolve_reference(info["adapter_base"], root)
    else:
        base = adapter.get("base_model_name_or_path")
    if not base:
        raise ModelError(f"{path}: a LoRA adapter that names no base model and has no base/ beside it")
    # the revision the LoRA run loaded its hub base at (`add_lora`), not the hub's newest
    revision = {"revision": adapter["revision"]} if adapter.get("revision") and isinstance(base, str) else {}
    score = adapter.get("task_type") == "SEQ_CLS"
    head = AutoModelForSequenceClassification if score else AutoModelForCausalLM
    # a reward model's base may be an LM (an SFT export): its config would give the new head 2 labels, and
    # the adapter's trained 1-row score (modules_to_save) would not fit in it
    labels = {"num_labels": 1} if score else {}
    with ds.zero3_init_disabled():
        try:
            with _no_safetensors_conversion():
                model = head.from_pretrained(
                    str(base), use_safetensors=True, trust_remote_code=trust_remote_code, **labels, **revision
                )
        except (OSError, ValueError) as e:
            raise ModelError(f"{path}: cannot load the LoRA adapter's base {str(base)!r}: {e}") from None
        # the run grew the base's embeddings for its tokenizer (`load_model`: a pad token GPT-2 lacked), and
        # peft saved the grown matrices in the adapter: grow the base alike before loading them
        try:  # an export has its tokenizer beside the adapter; an adapter from elsewhere may not
            rows = len(AutoTokenizer.from_pretrained(str(root), trust_remote_code=trust_remote_code))
        except (OSError, ValueError):  # transformers 5 raises ValueError for a directory without one
            rows = 0
        if model.get_input_embeddings().weight.shape[0] < rows:
            model.resize_token_embeddings(rows)
        model = PeftModel.from_pretrained(model, str(root)).merge_and_unload()  # its .safetensors (above)
    log.info("%s: LoRA adapters merged into their base (%s)", path, base)
    return model.config, model.state_dict()


@contextlib.contextmanager
def _no_safetensors_conversion() -> Iterator[None]:
    """Online, transformers answers a hub repo without safetensors by loading the weights from a
    conversion bot's pull-request branch instead of the commit asked for; this turns that off, so
    such a repo fails to load like a local pickled checkpoint."""
    key = "DISABLE_SAFETENSORS_CONVERSION"
    before = os.environ.get(key)
    os.environ[key] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ[key]
        else:
            os.environ[key] = before


def last_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last valid token, for left or right padding: [B, T] bool -> [B].

    Read from the mask, never from pad ids, so a tokenizer whose pad is its EOS still scores
    at the real EOS.
    """
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask).argmax(dim=-1)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 at each row's first valid token (left padding shifts them): [B, T]."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def token_scores(
    model,
    head: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The scalar head applied at every position: values [B, T] (float32).

    `model` is the callable (a DeepSpeed engine or the module), `head` its `score` layer. The
    head sees the final (normed) hidden state, exactly what transformers' own pooling sees.
    Padded rows give `attention_mask` [B, T] (True = valid); packed rows give `position_ids`
    [B, T] only (restarting at each sequence, see data.collate.pack_sequences), or with pairs
    packed by data.collate.pack_pairs also their 4-D mask [B, 1, T, T] (True = may attend).
    """
    if attention_mask is not None and attention_mask.dim() == 4:
        if position_ids is None:
            raise ValueError("token_scores with a 4-D attention_mask needs position_ids")
        attention_mask = additive_mask(model, attention_mask)
    elif attention_mask is not None:
        position_ids = positions_from_mask(attention_mask)
    elif position_ids is None:
        raise ValueError("token_scores needs attention_mask (padded rows) or position_ids (packed rows)")
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                output_hidden_states=True, use_cache=False)  # fmt: skip
    return head(out.hidden_states[-1]).squeeze(-1).float()  # [B, T]


def additive_mask(model, mask: torch.Tensor) -> torch.Tensor:
    """A bool 4-D mask (True = may attend) as the float one transformers adds to attention scores.

    transformers passes a 4-D mask on as it is: sdpa would take a bool one, but eager attention adds
    the mask to the scores, so only 0 / dtype-min in the model's compute dtype serves both.
    """
    module = getattr(model, "module", model)
    embeddings = module.get_input_embeddings() if hasattr(module, "get_input_embeddings") else None
    dtype = embeddings.weight.dtype if embeddings is not None else torch.float32
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
        ~mask, torch.finfo(dtype).min
    )


@torch.no_grad()
def packing_error(model, first: list[int], second: list[int], device: torch.device) -> float:
    """How far `second`'s final hidden states move when it follows `first` in a packed row.

    Relative difference (norm of the change / norm of the states): rounding-level (measured on CPU,
    Llamas of 4-24 layers: about 2e-7 in fp32, 3e-3 to 5e-3 in bf16) when the model keeps packed
    sequences apart by their restarting position ids, as transformers' Llama, Qwen2, GPT-2 and
    GPT-NeoX do with sdpa or eager attention; order 0.1-1 when it attends across them. The row is
    sent as a batch of two, as training sends several rows: transformers' FlashAttention-2 keeps
    packed sequences apart only in a batch of one row, and must fail this check. `model` is called
    in whatever mode it is in (put it in eval mode for dropout).
    """
    row = torch.tensor([first + second] * 2, device=device)  # [2, T]
    positions = torch.tensor([list(range(len(first))) + list(range(len(second)))] * 2, device=device)
    packed = model(input_ids=row, position_ids=positions, output_hidden_states=True, use_cache=False)
    alone_ids = torch.tensor([second], device=device)
    alone = model(input_ids=alone_ids, attention_mask=torch.ones_like(alone_ids),
                  output_hidden_states=True, use_cache=False)  # fmt: skip
    a = alone.hidden_states[-1][0].float()
    p = packed.hidden_states[-1][0, len(first) :].float()
    return ((p - a).norm() / a.norm().clamp(min=1e-12)).item()


@torch.no_grad()
def pair_packing_error(model, pairs: list[tuple[list[int], list[int]]], device: torch.device) -> float:
    """How far each sequence's final hidden state at its end moves when `pairs` share one row.

    The row is laid out by `data.collate.pack_pairs` (each pair's common start once, under its 4-D
    mask), with padding after, and sent as a batch of two rows like `packing_error`. Relative
    difference to each sequence run alone: rounding-level when the model applies the mask as given.
    """
    rows = pack_pairs(pairs, sum(len(a) + len(b) for a, b in pairs), pad_id=0, device=device)  # one row
    mask = additive_mask(model, rows.attention_mask.repeat(2, 1, 1, 1))  # [2, 1, W, W]
    ids, positions = rows.input_ids.repeat(2, 1).to(device), rows.position_ids.repeat(2, 1).to(device)
    packed = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                   output_hidden_states=True, use_cache=False)  # fmt: skip
    hidden = packed.hidden_states[-1][0].float()  # [W, d]; row 0, so flat ends are columns
    ends = hidden[rows.ends.to(device)]  # [2N, d]
    seqs = [a for a, _ in pairs] + [b for _, b in pairs]
    alone = []
    for s in seqs:
        ids = torch.tensor([s], device=device)
        out = model(
            input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True, use_cache=False
        )
        alone.append(out.hidden_states[-1][0, -1].float())
    alone = torch.stack(alone)  # [2N, d]
    return ((ends - alone).norm() / alone.norm().clamp(min=1e-12)).item()


def output_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The causal LM's output layer on final (normed) hidden states: [..., d] -> [..., V].

    For reading logits at a few gathered positions of packed rows instead of at every token. It
    equals the model's own logits only when those are the output embeddings applied to
    `hidden_states[-1]`; `lm_head_error` checks that (logit soft-capping or scaling breaks it).
    """
    module = getattr(model, "module", model)
    head = module.get_output_embeddings()
    if head is None:
        raise ModelError(f"{type(module).__name__} has no output embeddings to read packed logits with: "
                         "set data.packing=false")  # fmt: skip
    return head(hidden)


@torch.no_grad()
def lm_head_error(model, ids: list[int], device: torch.device) -> float:
    """Relative difference between a causal LM's logits and `output_logits` of its last hidden states."""
    row = torch.tensor([ids], device=device)
    out = model(
        input_ids=row, attention_mask=torch.ones_like(row), output_hidden_states=True, use_cache=False
    )
    mine = output_logits(model, out.hidden_states[-1]).float()
    return ((mine - out.logits.float()).norm() / out.logits.float().norm().clamp(min=1e-12)).item()


def check_packing(
    model, first: list[int], second: list[int], device: torch.device, *, lm: bool = False
) -> None:
    """Stop before training if `model` cannot score packed rows (data.packing=true).

    It must take position ids and keep packed sequences apart (`packing_error` at rounding level);
    with `lm`, its logits must also be its output layer on its last hidden states (`lm_head_error`),
    since packed rows read them at gathered positions. Call it without dropout (eval mode).
    """
    name = type(getattr(model, "module", model)).__name__
    try:
        error = packing_error(model, first, second, device)
    except TypeError as e:  # a forward without position_ids
        raise ModelError(f"data.packing=true needs position_ids, which {name} does not take ({e}): "
                         "set data.packing=false") from e  # fmt: skip
    if error > 0.05:
        raise ModelError(
            f"data.packing=true, but {name} does not keep packed sequences apart (a sequence's hidden "
            f"states move by {error:.2f} relative when another precedes it in the row): set data.packing=false"
        )
    if lm and (head := lm_head_error(model, second, device)) > 1e-3:
        raise ModelError(
            f"data.packing=true reads logits at gathered positions, but {name}'s logits are not its output "
            f"embeddings applied to its last hidden state (relative difference {head:.2g}; logit "
            "soft-capping or scaling?): set data.packing=false"
        )


def check_pair_packing(model, pairs: list[tuple[list[int], list[int]]], device: torch.device) -> None:
    """Stop before training if `model` cannot score rows of pairs (the reward stage's data.packing=true).

    It must take position ids and a 4-D attention mask and apply the mask as given
    (`pair_packing_error` at rounding level). Call it without dropout (eval mode).
    """
    name = type(getattr(model, "module", model)).__name__
    try:
        error = pair_packing_error(model, pairs, device)
    except (TypeError, ValueError, RuntimeError) as e:  # no position_ids, a mask it cannot take, or else
        raise ModelError(f"data.packing=true packs each pair with its prompt once under a 4-D attention mask "
                         f"and position ids; {name} failed on such a row ({type(e).__name__}: {e}): "
                         "set data.packing=false") from e  # fmt: skip
    if error > 0.05:
        raise ModelError(
            f"data.packing=true, but {name} does not keep packed sequences apart under a 4-D attention mask "
            f"(a reply's final hidden state moves by {error:.2f} relative when it shares its prompt with the "
            "other reply of its pair, after another pair; FlashAttention-2 takes no such mask): "
            "set data.packing=false or model.attn_implementation=sdpa"
        )


def forward_flops(model) -> tuple[float, float]:
    """Forward FLOPs per token: (in the weights, per position the token attends).

    The usual estimate (Kaplan et al. 2020, table 1, with both attention matmuls counted): 2 x the
    non-embedding parameters, and 4 x layers x hidden size for each attended position (the query-key
    product and the weighted sum of values). Backward is about twice both, so ratios hold for training.
    """
    module = getattr(model, "module", model)
    numel = lambda p: getattr(p, "ds_numel", p.numel())  # noqa: E731 (ZeRO-3 empties partitioned params)
    weights = sum(numel(p) for p in module.parameters()) - numel(module.get_input_embeddings().weight)
    return 2.0 * weights, 4.0 * module.config.num_hidden_layers * module.config.hidden_size


def has_onednn_linear() -> bool:
    """Whether this torch has oneDNN's prepacked linear (the ops torch.compile's CPU freezing uses)."""
    try:
        return torch.backends.mkldnn.is_available() and all(
            hasattr(torch.ops.mkldnn, op) for op in ("_reorder_linear_weight", "_linear_pointwise")
        )
    except (AttributeError, RuntimeError):
        return False


class _OneDNNProducts(torch.autograd.Function):
    """y = x W^T + b with its two gradients, each one of oneDNN's fp32 CPU products.

    x: [..., in], W: [out, in], b: [out] or None -> y: [..., out]. torch's own CPU linear multiplies
    with its BLAS (MKL on x86), which on AMD cores runs its AVX2 kernels; oneDNN runs AVX-512 where the
    core has it. On the 2-core AMD EPYC (Zen 5) of 2026-11-26, on the bench models' layers, oneDNN took
    0.43-0.49 of MKL's time for the output, about 0.45 for the input's gradient and 0.63-0.76 for the
    weight's, the transposed copies the gradients need included (README, "Configuration groups").
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])  # [N, in]
        ctx.save_for_backward(rows, weight)
        ctx.has_bias = bias is not None
        y = torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "none", [], "")
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        rows, weight = ctx.saved_tensors
        g = grad_y.reshape(-1, grad_y.shape[-1])  # [N, out]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:  # [N, out] @ [out, in]: oneDNN's "weight" is W^T, [in, out]
            grad_x = torch.ops.mkldnn._linear_pointwise(g, weight.t().contiguous(), None, "none", [], "")
            grad_x = grad_x.reshape(*grad_y.shape[:-1], weight.shape[1])
        if ctx.needs_input_grad[1]:  # [out, N] @ [N, in]
            grad_w = torch.ops.mkldnn._linear_pointwise(
                g.t().contiguous(), rows.t().contiguous(), None, "none", [], ""
            )
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b


class OneDNNLinear(torch.nn.Linear):
    """`nn.Linear` whose fp32 CPU products (forward and backward) are oneDNN's (`use_onednn_products`);
    anything else (another device or dtype, autocast, a ZeRO-3 weight not gathered) is nn.Linear's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (
            x.dtype == w.dtype == torch.float32
            and x.device.type == w.device.type == "cpu"
            and w.shape == (self.out_features, self.in_features)
            and not torch.is_autocast_enabled("cpu")
        ):
            return _OneDNNProducts.apply(x, w, self.bias)
        return super().forward(x)


def use_onednn_products(model: torch.nn.Module) -> int:
    """Make the model's plain `nn.Linear` layers `OneDNNLinear`s (in place: the same parameters, state
    dict and hooks) where this torch has oneDNN's linear; returns how many."""
    if not has_onednn_linear():
        return 0
    layers = [m for m in model.modules() if type(m) is torch.nn.Linear]
    for layer in layers:
        layer.__class__ = OneDNNLinear
    return len(layers)


def _packable(m: torch.nn.Module) -> bool:
    """A plain fp32 CPU linear layer holding its whole weight, its own forward not replaced (e.g. by accelerate)."""
    return (
        type(m) in (torch.nn.Linear, OneDNNLinear)
        and (m.weight.device.type, m.weight.dtype) == ("cpu", torch.float32)
        and m.weight.shape == (m.out_features, m.in_features)  # ZeRO-3 leaves partitioned weights empty
        and "forward" not in vars(m)
    )


@contextlib.contextmanager
def prepacked_linears(model: torch.nn.Module, rows: int) -> Iterator[int]:
    """While inside, the model's fp32 CPU `nn.Linear` layers multiply by oneDNN-prepacked weights.

    Decoding multiplies a few rows (one token per sequence) by every weight matrix once per token.
    For such skinny products the BLAS call spends about 40 % of its time (bench models, 32 rows)
    packing the weight into its blocked layout, on every call. Packing each weight once for a whole
    `generate` call (what torch.compile's freezing does on CPU) made generation 15-25 % faster on
    the PPO bench workloads, the same tokens with logits within 3e-6. Wide products (a forward over
    whole sequences) gain less, and re-packing on each call eats it on small models: a `tiny` bench
    forward took 79 -> 71 ms on packed weights, but 82.5 -> 82.7 ms counting the packing (README,
    "tried and left out"); so a trained model uses it for generation only, while PPO's frozen
    reference and reward model, packed once for the whole run (`rollout.prepack_frozen`), score on
    it too (their bench forwards 9-10 % faster). `rows` is the expected rows per product (the batch);
    oneDNN's choice barely depends on it.

    Costs one copy of the weights while it lasts, and the weights must not change inside. Layers
    on another device or dtype, with a partitioned (ZeRO-3) weight, or whose forward something else
    has replaced, run as they are; so does everything when this torch has no oneDNN. Yields how
    many layers run prepacked.
    """
    layers = [m for m in model.modules() if _packable(m)] if has_onednn_linear() else []
    patched = []
    try:
        for layer in layers:
            packed = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), rows)

            def forward(x, packed=packed, bias=layer.bias):
                return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")

            layer.forward = forward  # the instance attribute shadows nn.Linear.forward until deleted
            patched.append(layer)
        yield len(layers)
    finally:
        for layer in patched:
            del layer.forward


def score_head(model: torch.nn.Module) -> torch.nn.Module:
    """The scalar head (`score`) of a sequence-classification model, also inside a peft wrapper."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    head = getattr(base, "score", None)
    if head is None:
        raise ModelError(
            f"{type(base).__name__} has no `score` head; the reward model must be a sequence classifier"
        )
    return head


def _ds_rows(model: PreTrainedModel) -> int:
    """Embedding rows, also when ZeRO-3 has partitioned the weight (its .shape is then empty)."""
    weight = model.get_input_embeddings().weight
    return int(getattr(weight, "ds_shape", weight.shape)[0])


def add_lora(
    model: PreTrainedModel,
    r: int,
    alpha: int,
    dropout: float,
    target_modules: Any,
    task_type: str,
    revision: str | None = None,
) -> PeftModel:
    """Wrap `model` with LoRA adapters; only the adapters (and `modules_to_save`) train. `revision`: the
    hub revision the base was loaded at, saved in the adapter's config for whoever merges it later."""
    if r <= 0:
        raise ModelError(f"peft.r must be positive for LoRA, got {r}")
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        task_type=task_type,
        revision=revision,
    )
    try:
        model = get_peft_model(model, config)
    except ValueError as e:
        raise ModelError(f"peft.target_modules: {e}") from None
    return model


def build_model(
    model_cfg, peft_cfg, tokenizer, precision: str, *, head: str, onednn_products: bool = False
) -> PreTrainedModel:
    """The trainable model of a stage from its `model` and `peft` groups: load, LoRA, checkpointing;
    with `onednn_products` (`train.onednn_products`) on a CPU run, its linear layers' fp32 products are oneDNN's.

    Call inside `core.deepspeed.zero3_init(...)`.
    """
    model = load_model(
        model_cfg.name_or_path, plain(model_cfg.arch), tokenizer, precision, head=head,
        trust_remote_code=model_cfg.trust_remote_code, attn_implementation=model_cfg.attn_implementation,
        revision=model_cfg.revision,
    )  # fmt: skip
    if peft_cfg.type == "lora":
        task_type = {"lm": "CAUSAL_LM", "score": "SEQ_CLS"}[head]
        model = add_lora(
            model,
            peft_cfg.r,
            peft_cfg.alpha,
            peft_cfg.dropout,
            peft_cfg.target_modules,
            task_type,
            revision=model_cfg.revision,
        )
    elif peft_cfg.type != "none":
        raise ModelError(f"peft.type must be none or lora, got {peft_cfg.type!r}")
    if model_cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    # a GPU run keeps plain nn.Linear layers (OneDNNLinear would only check and fall back on every call)
    if onednn_products and dist.device().type == "cpu" and (n := use_onednn_products(model)):
        log.info("train.onednn_products: %d linear layers multiply with oneDNN on the CPU", n)
    return model


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout to p = 0 (as TRL and OpenRLHF do for PPO), the attention's own rate included.

    With dropout, the update's forward would not reproduce the rollout's log-probs and values
    even before any step, so PPO's ratio would start away from 1.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        # attention layers that pass a rate to the attention function (Llama's, Qwen's: `attention_dropout`)
        for name, value in vars(module).items():
            if name.endswith("dropout") and isinstance(value, float):
                setattr(module, name, 0.0)


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if isinstance(model, PeftModel):
        # frozen embeddings produce no grad; LoRA layers downstream still need one to flow
        model.enable_input_require_grads()


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) element counts, also for ZeRO-3 partitioned parameters."""
    trainable = total = 0
    for p in model.parameters():
        n = int(getattr(p, "ds_numel", p.numel()))
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total

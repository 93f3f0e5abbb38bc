"""course_lib — the reference implementations the Neurons to LLMs chapters import.

Small modules by topic:

- :mod:`course_lib.device`   — pick CUDA/CPU (MPS on request), seeding, autocast dtype
- :mod:`course_lib.quick`    — the quick-mode switch (``COURSE_QUICK=1``) that shrinks training for CI
- :mod:`course_lib.data`     — sklearn digits, 2-D toy sets, the Shakespeare corpus
- :mod:`course_lib.training` — the one training loop (``train_epochs``) and ``fit``, with a ``tqdm.auto``
  progress bar and a history; chapters 5 and 6's loops are callers of it
- :mod:`course_lib.plotting` — loss curves, decision boundaries, image grids
- :mod:`course_lib.checks`   — student-facing checks for visible tests, and ``forbidden`` for hidden ones
- :mod:`course_lib.sizing`   — parameter, memory and compute arithmetic for models (chapter 0)
- :mod:`course_lib.mlp`      — a two-layer MLP with hand-written backprop (chapter 1)
- :mod:`course_lib.activations` — activations, their derivatives, deep-net gradient probes (chapter 2)
- :mod:`course_lib.losses`   — regression and classification losses, stable cross-entropy (chapter 3)
- :mod:`course_lib.optimizers` — SGD, momentum, Adagrad, RMSProp, Adam(W), schedules, clipping (chapter 4)
- :mod:`course_lib.regularization` — dropout, batch/layer/RMS norm, initialisation, early stopping (chapter 5)
- :mod:`course_lib.cnn`      — convolution as im2col, pooling, residual blocks, small CNNs (chapter 6)
- :mod:`course_lib.embeddings` — word vectors (skip-gram, CBOW), an LSTM cell, a char LSTM (chapter 7)
- :mod:`course_lib.attention` — masks, multi-head attention from weights, positions, RoPE (chapter 8)
- :mod:`course_lib.vit`      — image patches as tokens, a small vision transformer (chapter 8)
- :mod:`course_lib.data_prep` — shingles, Jaccard, MinHash, near duplicates, grouped splits (chapter 9)
- :mod:`course_lib.pretraining` — next-token loss, MLM masking, accumulation (chapter 10)
- :mod:`course_lib.parallel` — gradient all-reduce, data, tensor and pipeline parallelism (chapter 11;
  its memory arithmetic is in :mod:`course_lib.sizing`)
- :mod:`course_lib.launch`   — starting ranks from a notebook or with torchrun, and finding which failed
- :mod:`course_lib.bert`     — a BERT encoder and all-MiniLM-L6-v2 loaded into it (chapter 12)
- :mod:`course_lib.finetuning` — labelled passages, task heads, freezing, class weights, metrics, LoRA (ch 12)
- :mod:`course_lib.instruction` — instruction pairs, chat template, prompt loss mask, BLEU (chapter 13)
- :mod:`course_lib.hf_bridge` — the course GPT and MiniLM loaded into ``transformers``' models (chapter 12)
- :mod:`course_lib.model_selection` — k-fold splits, grid and random search (chapter 13)
- :mod:`course_lib.compression` — pruning, distillation, int8/int4 quantization, fake quantization
  (chapter 14)
- :mod:`course_lib.interpret` — saliency, integrated gradients, Grad-CAM, permutation importance, probes,
  logit lens, activation patching, induction scores (chapter 15)
- :mod:`course_lib.adversarial` — FGSM, PGD, accuracy under attack (chapters 15 and 16)
- :mod:`course_lib.privacy`  — membership inference, canary exposure, DP-SGD checked against Opacus
  (chapter 16)
- :mod:`course_lib.safety`   — prompt injection and defences, WEAT, Paillier scoring, adversarial training
  (chapter 16)
- :mod:`course_lib.inference` — KV-cache size, padded batches, continuous batching, speculative decoding,
  export to ONNX (chapter 17)
- :mod:`course_lib.serving`  — a FastAPI server on loopback, a load test, monitoring, drift, a model registry
  (chapter 17)
- :mod:`course_lib.retrieval` — passages, BM25, dense and FAISS search, rank fusion, retrieval metrics,
  grounded answers (chapter 18)
- :mod:`course_lib.tokenizers`, :mod:`course_lib.lm_data`, :mod:`course_lib.gpt`,
  :mod:`course_lib.lm_train` — the language-model engine (chapters 8 onwards)
"""

from course_lib.device import autocast_dtype, describe_device, get_device, seed_everything
from course_lib.quick import QUICK_ENV, is_quick, pick

__all__ = [
    "QUICK_ENV",
    "autocast_dtype",
    "describe_device",
    "get_device",
    "is_quick",
    "pick",
    "seed_everything",
]
__version__ = "0.1.0"

"""Pretrain a GPT on the Shakespeare corpus and export it for the chapters.

The course's shipped checkpoint is made by exactly this command, on one GPU, from the course folder:

    .venv/bin/python scripts/pretrain_gpt.py --preset gpu

It writes ``course_lib/checkpoints/shakespeare-gpt/``: ``model.safetensors`` (bf16 weights, at
most 25 MB), ``config.json`` (the model's shape), ``tokenizer.json`` (the byte-level BPE it was
trained with) and ``metrics.json`` (this command, the validation loss reached, the time it took,
a sample, the loss curve). :func:`course_lib.lm_train.load_pretrained` reads that folder.

The laptop recipe — a character-level model sized to learn words and verse lines in minutes on a
laptop CPU (1,500 steps of 2,048 characters; ``metrics.json`` records the time it really took):

    .venv/bin/python scripts/pretrain_gpt.py --preset cpu

Several GPUs: ``torchrun --nproc_per_node 8 scripts/pretrain_gpt.py --preset gpu`` (each
process draws its own batches; gradients are averaged; process 0 writes the files).
Every option of a preset can be overridden (``--steps``, ``--batch-size``, ``--lr``, ...).
"""

from __future__ import annotations

import argparse
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from course_lib.device import describe_device, seed_everything
from course_lib.gpt import GPT, GPTConfig
from course_lib.lm_data import LMData, cache_dir, prepare_data
from course_lib.lm_train import (
    PRETRAINED_NAME,
    PRETRAINED_ROOT,
    WEIGHTS_FILE,
    DistributedContext,
    TrainConfig,
    Trainer,
    exact_loss,
    export_model,
    init_distributed,
    load_model,
)

MAX_CHECKPOINT_BYTES = 25 * 1024 * 1024
SAMPLE_PROMPT = "KING.\n"

PRESETS = {
    # The shipped checkpoint: 11.5 M parameters, 23 MB in bf16. The corpus is small (1.6 M BPE
    # tokens of training text), so the model would overfit: dropout 0.2, and we keep the weights
    # of the evaluation with the lowest validation loss.
    "gpu": {
        "tokenizer": "bpe", "vocab_size": 2048,
        "model": dict(block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.2),
        "train": dict(max_steps=4000, batch_size=64, lr=1e-3, min_lr=1e-4, warmup_steps=200,
                      weight_decay=0.1, grad_clip=1.0, eval_every=250, eval_batches=50,
                      log_every=50, compile=True),
        "out": str(PRETRAINED_ROOT / PRETRAINED_NAME),
        "export_dtype": "bf16",
    },
    # A laptop in minutes: 0.47 M parameters, characters (a vocabulary of 87, so no parameters
    # spent on a large embedding), a short context, and a learning rate a small model tolerates.
    "cpu": {
        "tokenizer": "char", "vocab_size": 0,
        "model": dict(block_size=128, n_layer=4, n_head=4, n_embd=96, dropout=0.0),
        "train": dict(max_steps=1500, batch_size=16, lr=3e-3, min_lr=3e-4, warmup_steps=50,
                      weight_decay=0.1, grad_clip=1.0, eval_every=100, eval_batches=10,
                      log_every=25, compile=False),
        "out": None,  # the course's cache folder: models/shakespeare-char-cpu
        "export_dtype": "fp32",
    },
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="gpu")
    parser.add_argument("--out", help="folder to export to (default: the preset's)")
    parser.add_argument("--steps", type=int, help="optimiser steps")
    parser.add_argument("--batch-size", type=int, help="sequences per micro-batch and process")
    parser.add_argument("--grad-accum", type=int, help="micro-batches per step")
    parser.add_argument("--lr", type=float, help="peak learning rate")
    parser.add_argument("--eval-every", type=int)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the model (default: the preset's)")
    parser.add_argument("--include-folio", action="store_true",
                        help="also train on the First Folio editions (both editions of a play "
                             "stay on the same side of the split)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", help="cuda, cpu, ... (default: the GPU when there is one)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch")
    parser.add_argument("--run-dir", help="write a resumable checkpoint here at every evaluation")
    parser.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def start_processes(args: argparse.Namespace) -> tuple[DistributedContext | None, bool, torch.device]:
    """``(distributed context or None, is this process 0, device)`` for this run."""
    if args.threads:
        torch.set_num_threads(args.threads)
    distributed = init_distributed(device_type=torch.device(args.device).type if args.device else None)
    is_main = distributed is None or distributed.is_main
    device = distributed.device if distributed else torch.device(
        args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return distributed, is_main, device


def load_corpus(preset: dict, args: argparse.Namespace, distributed: DistributedContext | None,
                is_main: bool) -> LMData:
    """The corpus as token ids. Process 0 builds the token cache; the others wait, then read it."""
    if distributed and not is_main:
        dist.barrier()
    data = prepare_data(preset["tokenizer"], vocab_size=preset["vocab_size"],
                        include_folio=args.include_folio)
    if distributed and is_main:
        dist.barrier()
    return data


def train_config(preset: dict, args: argparse.Namespace) -> TrainConfig:
    """The preset's training settings with the command line's overrides."""
    train_values = dict(preset["train"])
    for key, value in (("max_steps", args.steps), ("batch_size", args.batch_size),
                       ("grad_accum", args.grad_accum), ("lr", args.lr),
                       ("eval_every", args.eval_every), ("compile", args.compile)):
        if value is not None:
            train_values[key] = value
    if args.lr is not None and "min_lr" in train_values:
        train_values["min_lr"] = args.lr / 10
    return TrainConfig(seed=args.seed, **train_values)


def build_trainer(preset: dict, args: argparse.Namespace, data: LMData, device: torch.device,
                  distributed: DistributedContext | None, is_main: bool) -> Trainer:
    """A new model and its trainer, resumed from ``--run-dir`` when asked."""
    config = train_config(preset, args)
    model_config = GPTConfig(vocab_size=data.tokenizer.vocab_size, **preset["model"])
    seed_everything(args.seed)
    model = GPT(model_config)
    trainer = Trainer(model, data, config, device=device, distributed=distributed)
    if is_main:
        print(f"{describe_device(device)} x{trainer.world_size} | {data.describe()} | "
              f"{model.num_params():,} parameters | {trainer.tokens_per_step:,} tokens a step", flush=True)
    if args.resume and args.run_dir and (Path(args.run_dir) / WEIGHTS_FILE).exists():
        trainer.load(args.run_dir)
        if is_main:
            print(f"resumed at step {trainer.step}", flush=True)
    return trainer


class KeepBest:
    """The trainer's evaluation callback: keeps the weights of the lowest validation loss, prints
    each evaluation (process 0) and saves a resumable checkpoint to ``run_dir`` when given."""

    def __init__(self, is_main: bool, run_dir: str | None) -> None:
        self.is_main, self.run_dir = is_main, run_dir
        self.best = {"val_loss": math.inf, "step": 0, "state": None}

    def __call__(self, trainer: Trainer, result: dict) -> None:
        best = self.best
        if result["val_loss"] < best["val_loss"]:
            best.update(val_loss=result["val_loss"], step=result["step"], train_loss=result["train_loss"],
                        state={k: v.detach().clone() for k, v in trainer.raw_model.state_dict().items()})
        if self.is_main:
            print(f"step {result['step']:>6}  train {result['train_loss']:.4f}  "
                  f"val {result['val_loss']:.4f}  ({trainer._elapsed:.0f} s)", flush=True)
        if self.run_dir:
            trainer.save(self.run_dir)

    def restore(self, trainer: Trainer) -> dict:
        """Put the best weights back into the model (a resumed run that evaluated nothing keeps
        its last weights, evaluated now); returns the best evaluation."""
        best = self.best
        if best["state"] is not None:
            trainer.raw_model.load_state_dict(best["state"])
        else:
            best.update(val_loss=trainer.evaluate("val"), train_loss=trainer.evaluate("train"),
                        step=trainer.step)
        return best


def run_metrics(args: argparse.Namespace, trainer: Trainer, data: LMData, device: torch.device,
                history, best: dict, train_seconds: float) -> dict:
    """``metrics.json``: how the model was made and how good it was at its best evaluation."""
    model = trainer.raw_model
    steady = sorted(history.tokens_per_s[1:] or history.tokens_per_s)  # the first includes compiling
    tokens_per_s = steady[len(steady) // 2] if steady else float("nan")
    return {
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "preset": args.preset,
        "git_commit": git_commit(),
        "torch": torch.__version__,
        "device": describe_device(device),
        "processes": trainer.world_size,
        "params": model.num_params(),
        "model": model.config.to_dict(),
        "train": trainer.config.to_dict(),
        "tokenizer": f"{type(data.tokenizer).__name__} ({data.tokenizer.vocab_size} tokens)",
        "train_tokens": len(data.train),
        "val_tokens": len(data.val),
        "val_works": list(data.split.val),
        "steps": trainer.step,
        "tokens_seen": trainer.step * trainer.tokens_per_step,
        "train_seconds": round(train_seconds, 1),
        "tokens_per_s": round(tokens_per_s),
        "mfu": trainer.mfu(tokens_per_s),
        "best_step": best["step"],
        "val_loss_sampled": round(best["val_loss"], 4),
        "train_loss_sampled": round(best["train_loss"], 4),
        "curve": {"step": history.eval_step, "train_loss": history.train_loss,
                  "val_loss": history.val_loss, "elapsed_s": history.elapsed_s},
    }


def export_and_measure(model: GPT, data: LMData, out: Path, metrics: dict, dtype: torch.dtype,
                       device: torch.device) -> int:
    """Export the model, then measure what was exported: the validation loss of the rounded
    weights (fp32, every validation token) and a sample, written into ``metrics.json`` too.
    Returns the size of the weights file in bytes."""
    export_model(model, data.tokenizer, out, metrics, dtype=dtype)
    size = (out / WEIGHTS_FILE).stat().st_size
    exported, tokenizer, _ = load_model(out, device=device)
    metrics["val_loss"] = round(exact_loss(exported, data.val, batch_size=64), 4)
    metrics["val_perplexity"] = round(math.exp(metrics["val_loss"]), 3)
    metrics["weights_bytes"] = size
    prompt = torch.tensor([tokenizer.encode(SAMPLE_PROMPT)], device=device)
    sample = exported.generate(prompt, 300, temperature=0.8, top_k=50,
                               generator=torch.Generator(device=device).manual_seed(0))
    metrics["sample"] = tokenizer.decode(sample[0].tolist())
    export_model(model, data.tokenizer, out, metrics, dtype=dtype)
    return size


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    preset = PRESETS[args.preset]
    distributed, is_main, device = start_processes(args)
    data = load_corpus(preset, args, distributed, is_main)
    trainer = build_trainer(preset, args, data, device, distributed, is_main)
    keep_best = KeepBest(is_main, args.run_dir)

    start = time.perf_counter()
    history = trainer.fit(progress=not args.no_progress, callback=keep_best)
    train_seconds = time.perf_counter() - start
    if distributed:
        dist.barrier()
    if not is_main:
        dist.destroy_process_group()
        return None

    best = keep_best.restore(trainer)
    metrics = run_metrics(args, trainer, data, device, history, best, train_seconds)
    out = Path(args.out or preset["out"] or cache_dir() / "models" / "shakespeare-char-cpu")
    size = export_and_measure(trainer.raw_model, data, out, metrics, DTYPES[preset["export_dtype"]], device)
    print(f"\nexported to {out} ({size / 1e6:.1f} MB): validation loss {metrics['val_loss']} "
          f"(perplexity {metrics['val_perplexity']}) after {trainer.step} steps, "
          f"{train_seconds / 60:.1f} min, {metrics['tokens_per_s']:,} tokens/s\n\n{metrics['sample']}")
    if args.preset == "gpu" and size > MAX_CHECKPOINT_BYTES:
        raise SystemExit(f"the weights take {size / 2**20:.1f} MiB, over the 25 MiB the repository allows")
    if distributed:
        dist.destroy_process_group()
    return metrics


if __name__ == "__main__":
    main()

"""Throughput of course_lib's language-model engine. One JSON line per measurement on stdout.

    python benchmarks/lm_benchmark.py                 # every benchmark for this machine's device
    python benchmarks/lm_benchmark.py --device cpu    # force the CPU set
    python benchmarks/lm_benchmark.py --only train    # or: --only generate

On a GPU (bf16 autocast, the real training step of :class:`course_lib.lm_train.Trainer`, random
tokens so that data loading is not what is measured):

- training tokens/s and MFU of the GPT-2 124M shape (12 layers, 12 heads, 768 wide, block 1024,
  vocabulary 50,304) and of the 10M character shape (6 layers, 6 heads, 384 wide, block 256,
  batch 64), each eager and compiled;
- generation tokens/s of the 124M shape, 512 new tokens, with and without the KV cache, and with
  the cache and the compiled (CUDA-graph) decoding step.

On the CPU: training tokens/s of the laptop recipe's shape (``scripts/pretrain_gpt.py --preset
cpu``, fp32), and generation with and without the cache for a small model. MFU is ``null``
wherever the device has no peak in :data:`course_lib.gpt.PEAK_BF16_FLOPS` (every CPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from course_lib.device import describe_device, get_device
from course_lib.gpt import CHAR_10M, GPT, GPT2_124M, GPTConfig, peak_bf16_flops
from course_lib.lm_data import LMData
from course_lib.lm_train import TrainConfig, Trainer
from course_lib.tokenizers import CharTokenizer

# The shape of the laptop recipe (scripts/pretrain_gpt.py --preset cpu), vocabulary padded.
CPU_SMALL = GPTConfig(vocab_size=128, block_size=128, n_layer=4, n_head=4, n_embd=96)
# For CPU generation: a context long enough to show what the cache saves.
CPU_GENERATE = GPTConfig(vocab_size=128, block_size=512, n_layer=4, n_head=4, n_embd=128)


def random_data(vocab_size: int, n_tokens: int = 2_000_000, seed: int = 0) -> LMData:
    tokens = np.random.default_rng(seed).integers(0, vocab_size, n_tokens).astype(np.uint16)
    # The trainer never decodes; a tokenizer is only needed to fill the slot.
    return LMData(CharTokenizer(["a"]), tokens, tokens[: n_tokens // 10])


def attention_backend() -> str:
    flags = {name: getattr(torch.backends.cuda, f"{name}_sdp_enabled")()
             for name in ("flash", "cudnn", "mem_efficient", "math")}
    return "auto" if all(flags.values()) else "+".join(k for k, v in flags.items() if v)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_train(name: str, config: GPTConfig, device: torch.device, batch_size: int, grad_accum: int,
                compile_model: bool, warmup_steps: int, timed_steps: int,
                compile_mode: str = "default", profile: bool = False) -> dict:
    torch.manual_seed(0)
    model = GPT(config)
    train = TrainConfig(max_steps=10**9, batch_size=batch_size, grad_accum=grad_accum, warmup_steps=10,
                        compile=compile_model, compile_mode=compile_mode, precision="auto")
    trainer = Trainer(model, random_data(config.vocab_size), train, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(warmup_steps):  # the first steps compile, autotune and fill allocator caches
        trainer.train_step()
    sync(device)
    warmup_s = time.perf_counter() - start
    trainer._pending_losses.clear()
    start = time.perf_counter()
    for _ in range(timed_steps):
        loss = trainer.train_step()  # no host sync inside: the CPU queues ahead of the GPU
    sync(device)
    seconds = time.perf_counter() - start
    tokens_per_s = timed_steps * trainer.tokens_per_step / seconds
    if profile:
        print_profile(trainer, device, name)
    result = {
        "bench": "lm_train", "shape": name, "device": describe_device(device),
        "compiled": compile_model, "compile_mode": compile_mode if compile_model else None,
        "precision": str(trainer.dtype).replace("torch.", ""),
        "params": model.num_params(), "block_size": config.block_size, "batch_size": batch_size,
        "grad_accum": grad_accum, "tokens_per_step": trainer.tokens_per_step,
        "step_ms": round(1000 * seconds / timed_steps, 2), "tokens_per_s": round(tokens_per_s),
        "flops_per_token": model.flops_per_token(), "mfu": trainer.mfu(tokens_per_s),
        "peak_flops": peak_bf16_flops(device), "warmup_s": round(warmup_s, 1),
        "final_loss": round(float(loss), 3), "torch": torch.__version__,
        "attention_backend": attention_backend(),
    }
    if result["mfu"] is not None:
        result["mfu"] = round(result["mfu"], 4)
    if device.type == "cuda":
        result["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
    trainer._pending_losses.clear()
    del trainer, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def print_profile(trainer: Trainer, device: torch.device, name: str, steps: int = 3) -> None:
    """Where a training step's time goes: the kernels that take the most GPU time, and how busy
    the GPU was (kernel time over wall time; well under 1 means the CPU cannot keep it fed)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        sync(device)
        wall = time.perf_counter() - start
    trainer._pending_losses.clear()
    events = prof.key_averages()
    kernel_us = sum(e.device_time_total for e in events if e.device_type.name == "CUDA")
    print(f"# profile {name}: {1000 * wall / steps:.1f} ms a step, GPU kernels "
          f"{kernel_us / 1000 / steps:.1f} ms a step (busy {kernel_us / 1e6 / wall:.0%})", file=sys.stderr)
    print(events.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=70),
          file=sys.stderr)


def bench_generate(name: str, config: GPTConfig, device: torch.device, new_tokens: int,
                   prompt_len: int, batch: int, modes: list[str]) -> list[dict]:
    torch.manual_seed(0)
    model = GPT(config).to(device).eval()
    prompt = torch.randint(config.vocab_size, (batch, prompt_len), device=device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    results, seconds_by_mode = [], {}
    for mode in modes:
        use_cache, compiled = mode != "none", mode == "kv+compiled"
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            warm = 2 if compiled else 1  # compiled: the first calls compile and record the graph
            for _ in range(warm):
                model.generate(prompt, min(new_tokens, 16 if not compiled else new_tokens),
                               temperature=0, use_cache=use_cache, compiled=compiled)
            sync(device)
            start = time.perf_counter()
            out = model.generate(prompt, new_tokens, temperature=0, use_cache=use_cache, compiled=compiled)
            sync(device)
        seconds = time.perf_counter() - start
        seconds_by_mode[mode] = seconds
        results.append({
            "bench": "lm_generate", "shape": name, "device": describe_device(device), "cache": mode,
            "precision": str(dtype).replace("torch.", ""), "batch": batch, "prompt_tokens": prompt_len,
            "new_tokens": new_tokens, "seconds": round(seconds, 3),
            "tokens_per_s": round(batch * new_tokens / seconds, 1), "output_shape": list(out.shape),
            "torch": torch.__version__,
        })
    if "none" in seconds_by_mode:
        for result in results:
            result["speedup_vs_no_cache"] = round(seconds_by_mode["none"] / result["seconds"], 2)
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", help="cuda or cpu (default: the GPU when there is one)")
    parser.add_argument("--only", choices=["train", "generate"])
    parser.add_argument("--steps", type=int, help="timed training steps (default: 30 GPU, 10 CPU)")
    parser.add_argument("--gpt2-batch", type=int, default=16, help="micro-batch of the 124M shape")
    parser.add_argument("--gpt2-accum", type=int, default=4)
    parser.add_argument("--no-eager", action="store_true", help="skip the eager (uncompiled) runs")
    parser.add_argument("--eager-only", action="store_true", help="skip the compiled runs")
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode of the compiled runs")
    parser.add_argument("--gen-batch", type=int, default=1, help="sequences generated at once")
    parser.add_argument("--gen-modes", nargs="+", choices=["none", "kv", "kv+compiled"],
                        default=["none", "kv", "kv+compiled"], help="generation modes (GPU)")
    parser.add_argument("--shapes", nargs="+", choices=["gpt2-124m", "char-10m"],
                        default=["gpt2-124m", "char-10m"], help="GPU training shapes to measure")
    parser.add_argument("--threads", type=int, help="CPU threads for torch")
    parser.add_argument("--char-batch", type=int, default=64, help="batch of the 10M character shape")
    parser.add_argument("--attention-backend", default="auto",
                        choices=["auto", "flash", "cudnn", "efficient"],
                        help="restrict F.scaled_dot_product_attention to one kernel family")
    parser.add_argument("--profile", action="store_true", help="print the top GPU kernels of 3 steps")
    return parser.parse_args(argv)


def restrict_attention(backend_name: str) -> None:
    """Let ``F.scaled_dot_product_attention`` use only one kernel family ("auto": all of them)."""
    if backend_name == "auto":
        return
    for backend in ("flash", "cudnn", "mem_efficient", "math"):
        enabled = backend == backend_name or (backend == "mem_efficient" and backend_name == "efficient")
        getattr(torch.backends.cuda, f"enable_{backend}_sdp")(enabled)


def emit(row: dict) -> None:
    print(json.dumps(row), flush=True)


def gpu_benchmarks(args: argparse.Namespace, device: torch.device) -> None:
    """The GPU set: the 124M and 10M shapes' training, eager and compiled; 124M generation."""
    compiled_modes = ([] if args.no_eager else [False]) + ([] if args.eager_only else [True])
    steps = args.steps or 30
    if args.only in (None, "train"):
        for compile_model in compiled_modes:
            if "gpt2-124m" in args.shapes:
                emit(bench_train("gpt2-124m", GPT2_124M, device, args.gpt2_batch, args.gpt2_accum,
                                 compile_model, warmup_steps=10, timed_steps=steps,
                                 compile_mode=args.compile_mode, profile=args.profile))
            if "char-10m" in args.shapes:
                emit(bench_train("char-10m", CHAR_10M, device, args.char_batch, 1, compile_model,
                                 warmup_steps=20, timed_steps=5 * steps,
                                 compile_mode=args.compile_mode, profile=args.profile))
    if args.only in (None, "generate"):
        for row in bench_generate("gpt2-124m", GPT2_124M, device, new_tokens=512, prompt_len=16,
                                  batch=args.gen_batch, modes=args.gen_modes):
            emit(row)


def cpu_benchmarks(args: argparse.Namespace, device: torch.device) -> None:
    """The CPU set: the laptop recipe's training shape; a small model's generation."""
    steps = args.steps or 10
    if args.only in (None, "train"):
        emit(bench_train("cpu-small", CPU_SMALL, device, 16, 1, False, warmup_steps=3,
                         timed_steps=steps, profile=args.profile))
    if args.only in (None, "generate"):
        for row in bench_generate("cpu-generate", CPU_GENERATE, device, new_tokens=256,
                                  prompt_len=16, batch=args.gen_batch, modes=["none", "kv"]):
            emit(row)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = get_device(args.device)
    restrict_attention(args.attention_backend)
    if device.type == "cuda":
        gpu_benchmarks(args, device)
    else:
        cpu_benchmarks(args, device)


if __name__ == "__main__":
    main()

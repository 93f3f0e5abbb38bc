"""Throughput of course_lib's training loop: an MLP on the digits, samples per second.

Prints one JSON line per (device, batch size). Usage: python benchmarks/train_throughput.py
"""

from __future__ import annotations

import json
import time

import torch
from torch import nn

from course_lib.data import load_digits
from course_lib.device import describe_device, get_device
from course_lib.training import fit


def measure(device: torch.device, batch_size: int, epochs: int = 5) -> dict:
    digits = load_digits()
    x = digits.train.x.repeat(8, 1)  # ~10k rows so an epoch is long enough to time
    y = digits.train.y.repeat(8)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                          nn.Linear(256, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = nn.CrossEntropyLoss()
    fit(model, (x, y), loss_fn=loss_fn, optimizer=opt, epochs=1, batch_size=batch_size,
        device=device, progress=False)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    history = fit(model, (x, y), loss_fn=loss_fn, optimizer=opt, epochs=epochs,
                  batch_size=batch_size, device=device, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"bench": "fit_mlp_digits", "device": describe_device(device), "batch_size": batch_size,
            "samples_per_s": round(epochs * len(x) / seconds), "final_train_loss":
            round(history.last("train_loss"), 4)}


def main() -> None:
    devices = [torch.device("cpu")]
    if get_device().type != "cpu":
        devices.append(get_device())
    for device in devices:
        for batch_size in (64, 512):
            print(json.dumps(measure(device, batch_size)), flush=True)


if __name__ == "__main__":
    main()

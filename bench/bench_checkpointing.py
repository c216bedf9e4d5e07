"""Gradient checkpointing at long sequences: activation memory and step time, with and without.

    python bench/bench_checkpointing.py                  # small LTG-BERT, 4 x 512, fp32, AdamW
    python bench/bench_checkpointing.py --tiny           # seconds; the smoke test

Goal (performance issue): >= 50% less activation memory for <= 35% more step time at T=512.

Memory is resident memory (Linux /proc/self/status), with malloc told to serve every block over 64 KiB by
mmap, so that a freed activation leaves the resident set at once; gradients stay allocated between steps
(zero_grad(set_to_none=False)), so neither they nor the optimizer state are counted:
  held   resident memory after the forward minus before it: what autograd keeps for backward;
  peak   peak resident memory (VmHWM, reset through /proc/self/clear_refs) during forward + backward minus
         the memory before the forward: held plus the largest transient (recomputation, backward buffers).
Without checkpointing, the exact bytes of the tensors saved for backward (torch.autograd.graph.
saved_tensors_hooks, each storage once, parameters excluded) are printed too, as a check on `held`.
Modes run in interleaved rounds in one process; times are medians, ratios are medians of per-round ratios.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402

from ltgbert.checkpointing import enable_activation_checkpointing  # noqa: E402

MODES = ("none", "full", "selective")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--steps", type=int, default=1, help="training steps per mode per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--layers", type=int, default=None, help="override the layer count")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {MODES}")
    p.add_argument("--tiny", action="store_true", help="tiny shapes, one round: a smoke test")
    p.add_argument("--json", type=str, default=None)
    args = p.parse_args(argv)
    if args.tiny:
        args.seq_len, args.batch_size, args.rounds = 64, 2, 2
    args.modes = [m for m in args.modes.split(",") if m]
    for m in args.modes:
        if m not in MODES:
            p.error(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    return args


# ---------------------------------------------------------------- memory measurement


def _return_freed_memory_to_the_system() -> None:
    """Large allocations through mmap (fixed 64 KiB threshold): freed activations leave the resident set."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD; also stops glibc's dynamic threshold from growing
    except OSError:
        pass


def _rss_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
        return True
    except OSError:
        return False


class SavedTensorMeter:
    """Counts the bytes autograd saves for backward, once per storage; parameters are not activations."""

    def __init__(self, model):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.live: dict[int, int] = {}
        self.peak = 0

    def pack(self, tensor):
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in self.params and ptr not in self.live:
            self.live[ptr] = tensor.untyped_storage().nbytes()
            self.peak = max(self.peak, sum(self.live.values()))
        return tensor

    @staticmethod
    def unpack(tensor):
        return tensor

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


# ---------------------------------------------------------------- models and steps


def build(args, mode: str, shape: common.Shape, batch):
    """A model in this checkpointing mode and a step closure returning (held, peak) bytes or Nones."""
    torch.manual_seed(0)
    model = common.ltg_model(shape, args.seq_len)
    if mode != "none":
        model.config.gradient_checkpointing_mode = mode
        enable_activation_checkpointing(model, use_reentrant=False)  # what --gradient_checkpointing calls
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        before = _rss_bytes("VmRSS")
        measured = before is not None and _reset_peak_rss()
        loss = common.mlm_loss(model, batch)
        held = _rss_bytes("VmRSS") - before if measured else None
        loss.backward()
        peak = _rss_bytes("VmHWM") - before if measured else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # gradients stay allocated: not part of the measured memory
        return held, peak

    return model, step


def saved_bytes(model, batch) -> int:
    """Peak bytes saved for backward during the forward of one step (the activations a step keeps)."""
    meter = SavedTensorMeter(model)
    with meter.hooks():
        loss = common.mlm_loss(model, batch)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return meter.peak


def main(argv=None) -> dict:
    args = parse_args(argv)
    _return_freed_memory_to_the_system()
    shape = common.Shape.tiny() if args.tiny else common.Shape()
    if args.layers is not None:
        shape.layers = args.layers
    batch = common.mlm_batch(shape.vocab, args.batch_size, args.seq_len)
    built = {mode: build(args, mode, shape, batch) for mode in args.modes}
    for _, step in built.values():  # warm-up: optimizer state and gradients get allocated
        step()
    exact = saved_bytes(built["none"][0], batch) if "none" in built else None

    which = common.clock()  # process CPU time with one thread: other jobs on the machine do not inflate it
    memory = {mode: {"held": [], "peak": []} for mode in args.modes}
    seconds = {mode: [] for mode in args.modes}
    for r in range(args.rounds):
        for mode in args.modes if r % 2 == 0 else reversed(args.modes):
            step = built[mode][1]
            start = common.now(which)
            for _ in range(args.steps):
                held, peak = step()
            seconds[mode].append((common.now(which) - start) / args.steps)
            if held is not None:
                memory[mode]["held"].append(held)
                memory[mode]["peak"].append(peak)

    results = {
        "shape": vars(shape),
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "clock": which,
        "exact_saved_bytes_none": exact,
        "modes": {},
    }
    for mode in args.modes:
        entry = {"step_s": statistics.median(seconds[mode])}
        for kind in ("held", "peak"):
            entry[f"{kind}_bytes"] = statistics.median(memory[mode][kind]) if memory[mode][kind] else None
        if mode != "none" and "none" in args.modes:
            entry["time_vs_none"] = common.median_ratio(seconds[mode], seconds["none"])
            for kind in ("held", "peak"):
                if entry[f"{kind}_bytes"] is not None and results["modes"]["none"][f"{kind}_bytes"]:
                    entry[f"{kind}_vs_none"] = entry[f"{kind}_bytes"] / results["modes"]["none"][f"{kind}_bytes"]
        results["modes"][mode] = entry
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


def report(results: dict) -> None:
    mib = 1024 * 1024
    print(
        f"LTG-BERT {results['shape']['layers']} layers, hidden {results['shape']['hidden']}, "
        f"batch {results['batch_size']} x {results['seq_len']}, fp32, {results['threads']} threads, "
        f"clock {results['clock']}"
    )
    if results["exact_saved_bytes_none"] is not None:
        exact = results["exact_saved_bytes_none"] / mib
        print(f"exact bytes saved for backward without checkpointing: {exact:.1f} MiB")
    print(f"{'mode':<11}{'held MiB':>10}{'vs none':>9}{'peak MiB':>10}{'vs none':>9}{'step s':>9}{'vs none':>9}")
    for mode, e in results["modes"].items():
        held, peak = (e[k] or 0 for k in ("held_bytes", "peak_bytes"))
        print(
            f"{mode:<11}{held / mib:>10.1f}{e.get('held_vs_none', 1.0):>9.2f}{peak / mib:>10.1f}"
            f"{e.get('peak_vs_none', 1.0):>9.2f}{e['step_s']:>9.2f}{e.get('time_vs_none', 1.0):>9.2f}"
        )


if __name__ == "__main__":
    main()

"""Smoke tests of the model benchmarks: each runs in its tiny mode and reports complete, sane figures.

Timings are never asserted (the machine is shared); only that every variant ran and the outputs hold
together.
"""

import json
import sys
import types
from pathlib import Path

import pytest
import torch

from ltgbert.optimization import Lamb

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_bias_gather  # noqa: E402
import bench_checkpointing  # noqa: E402
import bench_dropout  # noqa: E402
import bench_loader  # noqa: E402
import bench_model  # noqa: E402
import bench_pretrain  # noqa: E402
import gpu  # noqa: E402


def test_bench_model_tiny(tmp_path, capsys):
    out = tmp_path / "model.json"
    results = bench_model.main(["--tiny", "--baseline", "--json", str(out)])
    assert set(results["models"]) == {"ltg", "ltg_before", "ltg_nn_dropout", "bert"}
    for entry in results["models"].values():
        assert entry["tokens_per_s"] > 0 and 0 < entry["mfu_fp32_peak"] < 1.5
        assert len(entry["seconds_per_step_by_round"]) == len(results["peak_fp32_flops_by_round"]) == 2
    assert set(results["ratios"]) == {"ltg/bert", "ltg_before/bert", "ltg/ltg_before", "ltg/ltg_nn_dropout"}
    assert set(results["ratios_fastest_rounds"]) == set(results["ratios"])
    rounds = {name: e["seconds_per_step_by_round"] for name, e in results["models"].items()}
    assert results["ratios_fastest_rounds"]["ltg/bert"] == pytest.approx(min(rounds["bert"]) / min(rounds["ltg"]))
    assert json.loads(out.read_text())["n_masked"] == results["n_masked"] > 0
    assert "speed ratio ltg/bert" in capsys.readouterr().out


def test_bench_model_compile_tiny():
    """--compile runs both models with their layers compiled beside the eager ones (AOTAutograd here; the
    bench's default backend, inductor, is exercised by tests/test_model_perf.py)."""
    import torch

    torch._dynamo.reset()
    results = bench_model.main(["--tiny", "--compile", "--compile_backend", "aot_eager"])
    assert set(results["models"]) == {"ltg", "ltg_compiled", "bert", "bert_compiled"}
    assert set(results["ratios"]) == {"ltg/bert", "ltg_compiled/bert", "ltg_compiled/bert_compiled", "ltg_compiled/ltg"}
    assert all(r > 0 for r in results["ratios"].values()) and results["compile"]


def test_bench_model_base_size_with_lamb():
    """--size base builds the published width (one layer here, to stay fast); --optimizer picks what steps
    every variant: lamb is ours, adamw is the fused kernel launch/ uses, adamw_unfused torch's CPU default."""
    results = bench_model.main(
        [
            "--size",
            "base",
            "--layers",
            "1",
            "--batch_size",
            "2",
            "--seq_len",
            "16",
            "--steps",
            "1",
            "--rounds",
            "1",
            "--matmul_size",
            "256",
            "--optimizer",
            "lamb",
        ]
    )
    assert results["shape"]["hidden"] == 768 and results["shape"]["heads"] == 12 and results["optimizer"] == "lamb"
    assert results["models"]["ltg"]["params"] == pytest.approx(results["models"]["bert"]["params"], rel=0.05)
    model = torch.nn.Linear(4, 4)
    assert isinstance(bench_model.make_optimizer("lamb", model), Lamb)
    assert bench_model.make_optimizer("adamw", model).defaults["fused"] is True
    assert not bench_model.make_optimizer("adamw_unfused", model).defaults["fused"]


@pytest.mark.parametrize("vs_compile", [False, True])
def test_bench_pretrain_vs_tree_alternates_the_two_checkouts(monkeypatch, tmp_path, capsys, vs_compile):
    """--vs_tree runs the other checkout's launch/pretrain.py and this one's in alternating order, with the same
    flags, and reports this / other. The entry point itself is replaced by a recorder here (bench_pretrain's
    runs take minutes); what is checked is which tree and flags each run gets."""
    import ltgbert.demo_data
    import ltgbert.tokenization

    calls = []

    def fake_run_once(
        workdir,
        corpus,
        tokenizer,
        preset,
        steps,
        processes,
        config,
        batch,
        seq_len,
        tag,
        extra=(),
        tree=bench_pretrain.ROOT,
    ):
        calls.append((tag, tuple(extra), Path(tree)))
        return (200.0 if Path(tree) == bench_pretrain.ROOT else 100.0), 0.5

    monkeypatch.setattr(bench_pretrain, "run_once", fake_run_once)
    monkeypatch.setattr(ltgbert.demo_data, "ensure_demo_data", lambda *a, **k: types.SimpleNamespace(corpus_train=None))
    monkeypatch.setattr(ltgbert.tokenization, "train_tokenizer", lambda *a, **k: None)
    other = tmp_path / "before"
    bench_pretrain.main(
        ["--compile_rounds", "3", "--rounds", "0", "--vs_tree", str(other)] + (["--vs_compile"] if vs_compile else [])
    )
    flags = ("--torch_compile",) if vs_compile else ()
    assert [(tag, tree) for tag, _, tree in calls[1:]] == [
        ("vs_tree-0", other),
        ("this_tree-0", bench_pretrain.ROOT),
        ("this_tree-1", bench_pretrain.ROOT),
        ("vs_tree-1", other),
        ("vs_tree-2", other),
        ("this_tree-2", bench_pretrain.ROOT),
    ]
    assert all(extra == flags for _, extra, _ in calls[1:])
    assert "this_tree / vs_tree: 2.000x" in capsys.readouterr().out


@pytest.mark.parametrize("native", [True, False])
def test_bench_model_bf16_tiny(monkeypatch, capsys, native):
    """With bf16 matrix instructions MFU is reported against both peaks; without them (bf16 emulated, as on AVX2)
    the bench says so and reports MFU against the fp32 rate only."""
    monkeypatch.setattr(bench_model, "cpu_has_native", lambda precision: native)
    results = bench_model.main(["--tiny", "--dtype", "bf16", "--no_bert"])
    ltg = results["models"]["ltg"]
    assert results["native_dtype"] is native and ltg["tokens_per_s"] > 0
    assert ("peak_bf16_flops" in results) is native and ("mfu_bf16_peak" in ltg) is native
    assert ("no bf16 matrix instructions" in capsys.readouterr().out) is not native
    low, high = ltg["mfu_fp32_peak_range"]
    assert 0 < low <= ltg["mfu_fp32_peak"] <= high
    assert results["peak_fp32_flops"] == max(results["peak_fp32_flops_by_round"])


def test_bench_dropout_tiny_and_its_baseline_drops_the_same_elements():
    import torch

    from ltgbert.modeling_ltgbert import LtgBertDropout

    results = bench_dropout.main(["--tiny"])
    assert len(results) == 2
    for entry in results.values():
        assert set(entry) == {"ltg", "bool_mask", "torch"} and all(e["ms"] > 0 for e in entry.values())
    # The frozen baseline reads the same random numbers: with one seed both give the same output and gradient,
    # bit for bit, in fp32 and in bf16 (the scale is applied last in both, so a bf16 product is rounded once).
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(5, 7, 9, dtype=dtype, requires_grad=True)
        outputs = []
        for module in (LtgBertDropout(0.2), bench_dropout.BoolMaskDropout(0.2)):
            torch.manual_seed(1)
            y = module.train()(x)
            (grad,) = torch.autograd.grad(y, x, torch.ones_like(y))
            outputs.append((y, grad))
        assert torch.equal(outputs[0][0], outputs[1][0]) and torch.equal(outputs[0][1], outputs[1][1]), dtype
        assert (outputs[0][0] == 0).any()


def test_bench_bias_gather_tiny():
    results = bench_bias_gather.main(["--tiny"])
    assert set(results) == {"through_fp32", "direct_16bit", "fp32_tables"}
    assert all(e["ms"] > 0 and e["speed_vs_direct_16bit"] > 0 for e in results.values())


def test_bench_bias_gather_compiled_tiny():
    """--compile: the compiled layer's gather form and the eager path's flat index, equal in value and
    gradient (the bench checks that before it times)."""
    torch._dynamo.reset()
    results = bench_bias_gather.main(["--tiny", "--compile", "--compile_backend", "aot_eager"])
    assert set(results) == {"gather", "flat_index"} and all(e["ms"] > 0 for e in results.values())


def test_bench_checkpointing_tiny(tmp_path):
    results = bench_checkpointing.main(["--tiny", "--json", str(tmp_path / "ckpt.json")])
    assert set(results["modes"]) == {"none", "full", "selective"}
    assert results["exact_saved_bytes_none"] > 0
    for mode in ("full", "selective"):
        assert results["modes"][mode]["step_s"] > 0 and results["modes"][mode]["time_vs_none"] > 0


def test_bench_checkpointing_rejects_unknown_mode():
    with pytest.raises(SystemExit):
        bench_checkpointing.main(["--tiny", "--modes", "none,layers"])


def test_gpu_bench_tiny_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    results = gpu.main(["--tiny", "--no_compile", "--seq_lens", "32", "--no-entry_points"])
    saved = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert saved["device"] == "cpu" and saved["peak_matmul_flops"] > 0
    assert results["checks"]["sdpa"]["ok"] and results["checks"]["flex"]["ok"]
    by_variant = {e["variant"]: e for e in results["throughput"]}
    assert set(by_variant) == {"eager", "sdpa", "flex"}
    for variant in ("eager", "sdpa"):  # flex has no CPU backward: recorded as an error, the run goes on
        assert by_variant[variant]["tokens_per_s"] > 0
    assert 0 < by_variant["sdpa"]["optimizer_share"] < 1
    assert "error" in by_variant["flex"] or by_variant["flex"]["tokens_per_s"] > 0


def test_bench_loader_tiny_gives_identical_batches_for_every_worker_count():
    results = bench_loader.main(["--tiny", "--workers", "0", "2", "--fetch", "rows"])
    assert results["identical_batches"] and set(results["loader"]) == {"rows workers=0", "rows workers=2"}
    assert all(e["tokens_per_s"] > 0 for e in results["loader"].values())

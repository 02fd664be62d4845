"""The benchmark scripts run end to end on the synthetic graph (their numbers are not checked here; their plumbing is:
a phase that crashes reports nothing)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SPEED = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"


def _speed():
    spec = importlib.util.spec_from_file_location("dsom_bench_speed", SPEED)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("batching,state,rewards", [("triples", "summary", "all"), ("pairs", "logits", "holdout")])
def test_speed_benchmark_stage_phases_run_and_report(tmp_path, batching, state, rewards):
    out = tmp_path / "speed.json"
    res = _speed().main(["synthetic", "--rank", "8", "--batches", "2", "--batching", batching, "--policy-state", state,
                         "--rewards", rewards, "--skip", "pykeen,eval", "--profile-steps", "1", "--precision", "fp32",
                         "--json", str(out)])
    saved = json.loads(out.read_text())
    for phase in ("dsom_complex", "dsom_teachers", "dsom_distill"):
        assert res[phase]["epoch_s"] > 0 and saved[phase]["batching"] == batching
    d = saved["dsom_distill"]
    assert d["rewards"] == rewards and (d["temperatures"] is None) == (rewards == "all")
    assert (d["reward_rows_fraction"] < 0.5) == (rewards == "holdout")
    assert (d["policy_flop_per_epoch"] > 0) == (state == "logits")
    assert d["summary_cache"] == ("read" if state == "summary" else "computed")
    assert d["reward_cache"] == "read"
    # the logits state reads every teacher on every row; the summary state and the cached reward CEs leave only the
    # rows the sampled subsets read (every row rewarded, as from the second epoch)
    assert (d["teacher_rows_scored"] == 1.0) == (state == "logits")
    assert d["score_rows_per_epoch"] <= d["batches_per_epoch"] * 10**6 and d["profile"]["step_s"] > 0
    assert all(saved[p]["median_epoch_s"] > 0 for p in ("dsom_complex", "dsom_teachers", "dsom_distill"))
    # plain ComplEx's score rows: one per query, or per batch's distinct pair (pairs cut at train.pair_max_queries=4)
    from collections import Counter

    from dsom.data import registry

    queries = registry.load("synthetic").queries("train")
    per_pair = Counter((int(h), int(r)) for h, r, _ in queries)
    rows = saved["dsom_complex"]["score_rows_per_epoch"]
    if batching == "pairs":
        assert len(per_pair) < rows <= sum(-(-c // 4) for c in per_pair.values()) < len(queries)
    else:
        assert rows == len(queries)
    # each timed step's rows: batches 1 and 2 of epoch 1 (after the warm-up batch 0), counted from the batches
    from dsom.config import Config, set_value
    from dsom.train.loop import ComplExTrainer

    cfg = Config()
    for k, v in {"model.rank": 8, "train.batching": batching, "train.precision": "fp32"}.items():
        set_value(cfg, k, v)
    tr = ComplExTrainer(registry.load("synthetic"), cfg, tmp_path / "tr", progress=False)
    order, offsets = tr.epoch_batches(1)
    q = tr.train_queries_cpu
    expect = [len({(int(h), int(r)) for h, r, _ in q[order[offsets[b]:offsets[b + 1]]]}) if batching == "pairs"
              else offsets[b + 1] - offsets[b] for b in (1, 2)]
    assert saved["dsom_complex"]["profile"]["timed_step_rows"] == expect
    assert len(saved["dsom_complex"]["profile"]["timed_step_s"]) == 2


def test_speed_benchmark_rejects_an_unknown_phase_to_skip(capsys):
    with pytest.raises(SystemExit) as exc:
        _speed().main(["synthetic", "--skip", "pykeen,stage2"])
    assert exc.value.code == 2 and "unknown phase(s) stage2" in capsys.readouterr().err


def test_speed_benchmark_can_skip_the_complex_phase(tmp_path):
    res = _speed().main(["synthetic", "--rank", "8", "--batches", "1", "--skip", "complex,pykeen,teachers,eval",
                         "--profile-steps", "0", "--precision", "fp32"])
    assert "dsom_complex" not in res and res["dsom_distill"]["epoch_s"] > 0


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"dsom_bench_{name}", SPEED.parent / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_kd_mask_benchmark_times_every_dtype_asked():
    res = _script("kd_mask").main(["--batch", "6", "--entities", "40", "--teachers", "2", "--repeats", "1",
                                   "--dtypes", "bool,bfloat16"])
    assert set(res) == {"bool", "bfloat16"}
    assert all(v > 0 for row in res.values() for v in row.values()) and len(res["bool"]) == 4


def test_outside_floor_benchmark_reports_the_floor_as_the_sum_of_its_passes():
    t = _script("outside_floor").main(["--entities", "50", "--rank", "4", "--batch", "6", "--repeats", "1"])
    assert t["floor_outside"] == pytest.approx(t["lse_t"] + t["softmax_grad_t"] + t["adagrad_fused"])
    assert t["products"] == pytest.approx(t["mm_forward"] + t["mm_d_query"] + t["mm_d_table"])
    assert t["today_outside_subset"] == pytest.approx(t["lse_t"] + t["softmax_grad_t"] + t["adagrad_with_shadow"]
                                                      + t["copy_grad_to_fp32"])
    assert t["floor_outside"] > 0


def test_split_profile_keeps_the_fastest_round_and_resets_before_each():
    import time

    import torch

    durations = iter([0.06, 0.06, 0.005, 0.005, 0.03, 0.03])  # per call: round 2 is the fastest
    resets, calls = [], []

    def run() -> None:
        calls.append(len(resets))
        time.sleep(next(durations))

    prof = _speed().split_profile(run, torch.device("cpu"), steps=2, rounds=3, reset=lambda: resets.append(1))
    assert len(resets) == 3 and calls == [1, 1, 2, 2, 3, 3]
    assert prof["rounds"] == 3 and len(prof["round_step_s"]) == 3
    assert prof["step_s"] == pytest.approx(min(prof["round_step_s"]), abs=1e-4)
    assert prof["step_s"] < 0.02 < prof["round_step_s"][0]


def test_profile_accounting_keeps_device_kernels_out_of_the_ops_and_sums_them_as_the_gpus_busy_time():
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    def ev(i, name, cpu_us, dev_us, device=DeviceType.CPU):
        return SimpleNamespace(id=i, name=name, device_type=device, self_cpu_time_total=cpu_us,
                               self_device_time_total=dev_us, cpu_parent=None, sequence_nr=-1)

    events = [ev(0, "aten::mm", 30.0, 100.0), ev(1, "gemm_kernel", 0.0, 100.0, DeviceType.CUDA),
              ev(2, "aten::add", 9.0, 20.0), ev(3, "add_kernel", 0.0, 20.0, DeviceType.CUDA),
              ev(4, "aten::copy_", 7.0, 5.0), ev(5, "Memcpy HtoD (Pinned -> Device)", 0.0, 5.0, DeviceType.CUDA),
              ev(6, "ProfilerStep#1", 50.0, 0.0)]
    acc = _speed().account_events(events, cuda=True)  # kernel time, each counted once, on the op that launched it
    assert acc["matmul_us"] == 100.0 and acc["device_busy_us"] == 125.0
    assert acc["top_outside"] == {"aten::add": 20.0, "aten::copy_": 5.0}
    assert list(acc["top_kernels"]) == ["add_kernel", "Memcpy HtoD (Pinned -> Device)"]
    cpu = _speed().account_events([e for e in events if e.device_type == DeviceType.CPU], cuda=False)
    assert cpu["matmul_us"] == 30.0 and cpu["device_busy_us"] == 0.0
    assert cpu["top_outside"] == {"aten::add": 9.0, "aten::copy_": 7.0}
    # a replayed CUDA graph: its kernels hang under one launch, no aten::mm; the products are known by their names
    replay = [ev(0, "cudaGraphLaunch", 15.0, 0.0), ev(1, "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn", 0.0, 80.0,
                                                      DeviceType.CUDA),
              ev(2, "nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_TNT", 0.0, 40.0, DeviceType.CUDA),
              ev(3, "triton_red_fused_exp_sum_0", 0.0, 30.0, DeviceType.CUDA)]
    acc = _speed().account_events(replay, cuda=True)
    assert acc["matmul_us"] == 120.0 and acc["device_busy_us"] == 150.0
    assert acc["top_kernels"] == {"triton_red_fused_exp_sum_0": 30.0}


def test_profile_names_compiled_graphs_by_the_dsom_function_forward_and_backward():
    import torch
    from torch.profiler import ProfilerActivity, profile

    from dsom.perf import MaybeCompiled, _profiling

    def soft_total(x, w):
        return torch.logsumexp(x @ w, -1).sum()

    fn = MaybeCompiled(soft_total, True)
    assert fn.label == "dsom:soft_total" and not _profiling()
    x, w = torch.randn(8, 4), torch.randn(4, 16, requires_grad=True)
    fn(x, w).backward()  # compile outside the profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        assert _profiling()
        fn(x, w).backward()
    events = prof.events()
    labels = _speed().compiled_graph_labels(events)
    graphs = [ev.id for ev in events if ev.name.startswith("## Call CompiledFxGraph")]
    assert sorted(labels[i] for i in graphs) == ["compiled soft_total", "compiled soft_total backward"]
    expected = torch.func.grad(lambda w_: torch.logsumexp(x @ w_, -1).sum())(w.detach())
    assert torch.allclose(w.grad, 2 * expected, atol=1e-5)  # two backward passes, same function compiled as eager


def test_score_layout_benchmark_times_both_layouts_interleaved(tmp_path):
    from dsom.models import products

    default = products.COLUMN_MIN_QUERIES
    out = tmp_path / "layout.json"
    res = _script("score_layout").main(["synthetic", "--rank", "8", "--batch-size", "100", "--rounds", "2",
                                        "--steps", "1", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert set(res["stage2_median_step_s"]) == {"row", "column"} and min(res["stage2_median_step_s"].values()) > 0
    assert {k: len(v) for k, v in saved["steps_s"].items()} == {"row": 2, "column": 2}
    assert products.COLUMN_MIN_QUERIES == default  # the module is left as it was


@pytest.mark.parametrize("selector", ["single:structure", "rl"])
def test_teacher_rows_benchmark_times_every_mode_and_counts_the_rows_scored(tmp_path, selector):
    out = tmp_path / "rows.json"
    res = _script("teacher_rows").main(["synthetic", "--rank", "8", "--batch-size", "100", "--rounds", "2",
                                        "--steps", "1", "--selector", selector, "--modes", "all,stacked,chosen",
                                        "--json", str(out)])
    saved = json.loads(out.read_text())
    assert {k: len(v) for k, v in saved["steps_s"].items()} == {"all": 2, "stacked": 2, "chosen": 2}
    assert min(res["stage2_median_step_s"].values()) > 0
    share = res["teacher_rows_scored"]
    assert share["all"] == 1.0
    for mode in ("stacked", "chosen"):  # (the policy learns between steps: not the same subsets in both modes)
        if selector == "rl":  # chosen subsets, every teacher on the reward rows only
            assert 0.1 < share[mode] < 1.0
        else:  # one teacher of three
            assert share[mode] == pytest.approx(1 / 3)
    with pytest.raises(SystemExit, match="--modes"):
        _script("teacher_rows").main(["synthetic", "--rank", "8", "--modes", "chosen"])


def test_teacher_rows_benchmark_reads_the_reward_cache_in_its_cached_mode():
    res = _script("teacher_rows").main(["synthetic", "--rank", "8", "--batch-size", "100", "--rounds", "2",
                                        "--steps", "1", "--rewards", "all", "--modes", "chosen,cached"])
    share = res["teacher_rows_scored"]
    # every row rewarded: the reward CEs computed from every teacher everywhere, or read and only the chosen subsets
    assert share["chosen"] == 1.0 and 0.1 < share["cached"] < 1.0


def test_terms_layout_benchmark_times_both_layouts_with_the_same_values(tmp_path):
    out = tmp_path / "terms.json"
    res = _script("terms_layout").main(["--batch", "24", "--entities", "50", "--rounds", "2", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert set(saved["row_ms"]) == {"terms_forward", "terms_backward", "reward_ces", "reward_ces_fused"}
    assert min(res["row_ms"].values()) > 0 and min(res["col_ms"].values()) > 0
    # the same losses, gradient and reward CEs whichever layout the scores are stored in, and from the fused pass
    assert max(res["max_abs_diff"].values()) < 1e-4


def test_teacher_rows_benchmark_times_padded_and_unpadded_widths():
    from dsom.models import products

    pad = products.COLUMN_PAD
    res = _script("teacher_rows").main(["synthetic", "--rank", "8", "--widths", "70,64", "--rounds", "2"])
    assert set(res) == {"70", "64"} and all(set(v) == {"padded", "unpadded"} for v in res.values())
    assert min(c["min_ms"] for v in res.values() for c in v.values()) > 0
    assert products.COLUMN_PAD == pad  # the module is left as it was


def test_reward_ces_benchmark_times_both_functions_on_each_row_count():
    res = _script("reward_ces").main(["synthetic", "--rows", "12,5", "--rounds", "2"])
    assert set(res) == {"12", "5"}
    assert all(set(v) == {"whole", "two passes"} and min(c["min_ms"] for c in v.values()) > 0 for v in res.values())


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="reads glibc's allocator")
def test_alloc_faults_benchmark_counts_each_round_of_each_allocator():
    res = _script("alloc_faults").main(["--mb", "2", "--repeats", "2"])
    assert set(res) == {"malloc", "posix_memalign(64)", "torch.empty"}
    assert all(len(v) == 2 and min(v) >= 0 for v in res.values())
    assert max(max(v) for v in res.values()) <= 2 * (2 * 10**6 // 4096) + 200  # at most every page, with slack


def test_gemm_layouts_benchmark_times_the_preallocated_fp32_products():
    import torch

    mod = _script("gemm_layouts")
    res = mod.main(["--queries", "70", "--entities", "300", "--dim", "8", "--repeats", "1", "--dtypes", "float32"])
    for name in ("fwd q @ T^T into S", "fwd column blocks into S", "fwd query blocks into S", "dT G^T @ q into dT",
                 "dT column blocks", "(E,P) fwd T @ padded q^T"):
        assert res[f"torch.float32 {name}"] > 0
    g, q = torch.randn(70, 300), torch.randn(70, 8)
    torch.testing.assert_close(mod._blocked_grad(g, q, torch.empty(300, 8), 64), g.T @ q)  # 4 blocks + a short one
    t = torch.randn(300, 8)
    torch.testing.assert_close(mod._query_blocked_scores(q, t, torch.empty(70, 300), 16), q @ t.T)  # 4 + a short one


def test_host_overhead_benchmark_counts_the_ops_and_compiled_graphs_of_a_step():
    res = _script("host_overhead").main(["--phases", "complex", "--compile", "on,off", "--precision", "fp32",
                                         "--warmup", "3", "--steps", "3", "--profile-steps", "2"])
    on, off = res["complex/on"], res["complex/off"]
    assert on["median_step_ms"] > 0 and off["median_step_ms"] > 0
    assert on["compiled_graphs_per_step"] >= 1 and off["compiled_graphs_per_step"] == 0
    assert off["aten_ops_per_step"] > on["aten_ops_per_step"] > 0  # compiled graphs dispatch fewer ops


def test_cuda_graphs_benchmark_trains_both_ways_and_compares_the_models(tmp_path):
    from toy import clustered_graph, write_canonical

    write_canonical(clustered_graph(num_entities=90), tmp_path / "toy")  # (the embedded graph takes a minute here)
    res = _script("cuda_graphs").main([str(tmp_path / "toy"), "--device", "cpu", "--capture", "rerun", "--phases",
                                       "complex,distill", "--rank", "4", "--batch-size", "64", "--epochs", "2",
                                       "--precision", "fp32", "--compile", "off"])
    for phase, captures in (("complex", 1), ("distill", 2)):  # stage 2: again once its caches seal
        off, on = res[f"{phase}/off"], res[f"{phase}/on"]
        assert len(off["epoch_s"]) == len(on["epoch_s"]) == 2 and off["replays"] == 0
        full = off["batches_per_epoch"] - 1  # the synthetic graph's last batch is short: eager
        assert on["captures"] == captures and on["capture_failed"] is None
        assert on["replays"] == 2 * full - 2 * captures > 0  # (two eager warm-up steps before each capture)
        assert max(res[f"{phase}/max_abs_diff"].values()) == 0.0, phase  # (both runs update the same way)


def test_host_reads_records_each_read_of_device_data_and_stands_in_for_it():
    import torch

    hr = _script("host_reads")
    mode = hr.HostReads()
    with mode:
        x = torch.ones(8, device="meta")
        idx = (x > 0).nonzero()
        picked = x[x > 0]
        n = int(x.sum())
        y = torch.ones(8)  # host tensors pass through unrecorded
        host = int((y > 0).nonzero().shape[0]) + int(y.sum())
    assert idx.shape == (2, 1) and picked.shape == (2,) and n == 1 and host == 16
    assert sorted(op for op, _ in mode.found) == ["boolean-mask indexing", "item / bool / int of a tensor", "nonzero"]


def test_host_reads_finds_none_in_the_gpu_steps_of_complex_stage_one_and_stage_two():
    hr = _script("host_reads")
    res = hr.main(["--phases", "complex,teachers,distill"])
    assert res == {"complex": [], "teachers": [], "distill": []}
    for extra in (["--set", "distill.selector=single:text"], ["--set", "distill.policy_state=summary"]):
        assert hr.main(["--phases", "distill", "--sealed", *extra]) == {"distill": []}
    # as a CUDA graph records stage 2 (the neighbour pairs built on the device), caches filling and sealed
    for extra in ([], ["--sealed"]):
        assert hr.main(["--phases", "distill", "--captured", *extra]) == {"distill": []}
    # the tool does find reads where there are some: pair batching groups the batch with torch.unique
    pairs = hr.main(["--phases", "complex", "--batching", "pairs"])["complex"]
    assert any(r["op"] == "unique" and "pairs.py" in r["where"] for r in pairs)


def test_neighbour_pairs_benchmark_times_the_three_ways():
    res = _script("neighbour_pairs").main(["synthetic", "--batch-size", "64", "--batches", "3", "--repeats", "1"])
    assert set(res["ms"]) == {"host list", "host count", "device list (count)", "device list (capacity)"}
    assert all(v > 0 for v in res["ms"].values()) and res["capacity"] > res["pairs_per_batch"] > 0


def test_pair_pieces_counts_the_rows_of_each_cut():
    from collections import Counter

    from dsom.data import registry

    res = _script("pair_pieces").main(["synthetic", "--k", "1,2,5"])["synthetic"]
    q = registry.load("synthetic").queries("train")
    per_pair = Counter((int(h), int(r)) for h, r, _ in q)
    assert res["pairs"] == len(per_pair) < res["triples"] == len(q)
    for k in (1, 2, 5):
        assert res[f"K={k}"] == sum(-(-c // k) for c in per_pair.values())
    assert res["K=1"] == len(q)


def test_stage2_setup_times_the_temperatures_and_the_reliability_table(tmp_path):
    import torch

    from dsom.cli import main
    from dsom.data import registry
    from dsom.distill.holdout import entity_reliability
    from dsom.runs.pipeline import selection_inputs
    from dsom.runs.setup import build_config
    from dsom.train.teachers import load_frozen_teachers

    run = tmp_path / "teachers"
    assert main(["pretrain", "synthetic", "-o", str(run), "--modalities", "structure,text", "--rank", "4", "--epochs",
                 "1", "--set", "ensemble.models=[]", "-q"]) == 0
    res = _script("stage2_setup").main(["synthetic", "--teachers", str(run), "--save", str(tmp_path / "s.pt")])
    assert res["temperatures"] > 0 and res["reliability"] > 0
    ds = registry.load("synthetic")
    frozen, _ = load_frozen_teachers(run)
    saved = torch.load(tmp_path / "s.pt")
    assert saved.shape == (ds.num_entities, 2)
    # the reliability of the teachers calibrated as stage 2 calibrates them (the run's own held-out triples)
    cfg = build_config("synthetic", config_file=str(run / "config.yaml"))
    _, temperatures, _ = selection_inputs(frozen, ds, cfg, torch.device("cpu"))
    queries = torch.from_numpy(ds.queries("train"))
    torch.testing.assert_close(saved, entity_reliability(frozen, queries, ds.num_entities, temperatures))
    assert not torch.allclose(saved, entity_reliability(frozen, queries, ds.num_entities))


@pytest.mark.parametrize("batching", ["triples", "pairs"])
def test_scale_benchmark_trains_a_chunked_graph_and_evaluates_it(tmp_path, batching):
    """A graph whose score block exceeds train.block_mb trains through the entity-chunked loss and is evaluated."""
    mod = _script("scale")
    out = tmp_path / "scale.json"
    rows = mod.main(["--entities", "600", "--rank", "4", "--batch-size", "50", "--batches", "2", "--test", "20",
                     "--relations", "5", "--block-mb", "0.01", "--batching", batching, "--device", "cpu",
                     "--json", str(out)])
    (point,) = rows
    assert point["chunk"] < point["entities"] == 600  # 0.01 MB of 50-query rows: 52 entities per block
    assert point["train"]["batching"] == batching
    assert point["train"]["s_per_batch"] > 0 and point["train"]["epoch_s_projected"] > point["train"]["s_per_batch"]
    assert point["eval"]["queries_per_s"] > 0
    assert json.loads(out.read_text())["points"][0]["entities"] == 600


def test_eval_layout_benchmark_ranks_alike_in_both_layouts_and_restores_the_column_one():
    import dsom.models.interaction as interaction

    before = interaction.column_scores
    res = _script("eval_layout").main(["--entities", "300", "--rank", "4", "--rounds", "1", "--batch-size", "100"])
    assert len(res["seconds"]["row"]) == len(res["seconds"]["column"]) == 1
    assert res["mrr"]["row"] == pytest.approx(res["mrr"]["column"], rel=1e-6) and res["mrr"]["row"] > 0
    assert interaction.column_scores is before


def test_step_profile_benchmark_times_the_steps_of_a_random_graph():
    res = _script("step_profile").main(["--entities", "400", "--rank", "4", "--batch-size", "50", "--batching",
                                        "triples", "--precision", "fp32", "--warmup", "1", "--steps", "2"])
    assert len(res["step_s"]) == 2 and all(s > 0 for s in res["step_s"]) and res["rows"] == [50, 50]

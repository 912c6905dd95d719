"""The latency benchmark's bookkeeping on CPU (a tiny architecture; the numbers themselves come from a GPU):
every cell is measured once, results resume, FLOPs follow the budgets, the page reports the targets, and bad
input is refused with a way out."""

from __future__ import annotations

import json

import pytest
import tiny_models
import torch
import transformers
from pruning_zoo.strategies.baselines import RandomSubset
from typer.testing import CliRunner

import pruning_zoo
from pruning_zoo.bench import architectures, latency, report
from pruning_zoo.bench.segmented import SegmentedPrefill
from pruning_zoo.cli import app
from pruning_zoo.engine.run import prune
from pruning_zoo.engine.timing import median_ms
from pruning_zoo.errors import PruningZooError
from pruning_zoo.provenance import device_description
from pruning_zoo.strategy import Selection

TINY = architectures.Architecture("tiny-llava", "a tiny LLaVA", tiny_models.llava_config,
                                  architectures.llava_prompt(3, 4), 16)
STRATEGIES = ["none", "random", "pool", "visionzip", "fastv", "transprune", "learnpruner"]


def plan(**changes) -> latency.LatencyPlan:
    options = dict(arch="tiny-llava", batches=[1, 2], budgets=[8, 4, 16],
                   strategies={name: pruning_zoo.get_strategy(name) for name in STRATEGIES},
                   modes=["eager", "compiled"], repeats=2, decode_tokens=3, fusion="aot_eager")  # inductor: GPU runs
    return latency.LatencyPlan(**{**options, **changes})


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    out = tmp_path_factory.mktemp("latency")
    results = latency.run_benchmark(plan(), out, "cpu", "pruning-zoo bench latency (test)", arch=TINY, dtype=torch.float32)
    return out, results


def test_every_cell_is_measured_once_with_its_figures(measured):
    _, results = measured
    cells = [entry["cell"] for entry in results["cells"]]
    # 2 batches x 2 modes x (none once + 6 strategies x 2 budgets below 16)
    assert len(cells) == 2 * 2 * (1 + 6 * 2)
    assert len({json.dumps(c, sort_keys=True) for c in cells}) == len(cells)
    for entry in results["cells"]:
        assert entry["ttft_ms"] > 0 and entry["selection_ms"] >= 0 and entry["clock"].startswith("CPU")
        assert entry["seconds"] > 0
        assert entry["ttft_ms"] >= entry["selection_ms"]
        assert (entry["decode_ms_per_token"] is not None) == (entry["cell"]["mode"] == "eager")
        if entry["cell"]["mode"] == "compiled" and entry["cell"]["strategy"] != "random":
            assert entry["agreement_with_eager"]["max_abs_logit_difference"] < 1e-4
            assert entry["agreement_with_eager"]["same_first_token"]
    assert results["git_sha"] and results["versions"]["torch"] and results["device"].startswith("CPU")


def test_flops_follow_the_budget(measured):
    _, results = measured
    llm = {(e["cell"]["strategy"], e["cell"]["budget"], e["cell"]["batch"]): e["flops"]["llm"]
           for e in results["cells"] if e["cell"]["mode"] == "eager"}
    for batch in (1, 2):
        for name in ("random", "pool", "fastv"):
            assert llm[("none", 16, batch)] > llm[(name, 8, batch)] > llm[(name, 4, batch)]
        assert llm[("none", 16, 2)] == 2 * llm[("none", 16, 1)]


def test_the_compiled_mode_counts_the_vision_blocks_it_skips(measured):
    """Tiny LLaVA reads its penultimate CLIP block (of 2): compiled cells skip the last and count one block."""
    _, results = measured
    vision = {e["cell"]["mode"]: e["flops"]["vision"] for e in results["cells"]
              if e["cell"]["strategy"] == "none" and e["cell"]["batch"] == 1}
    config = tiny_models.llava_config().vision_config
    patches = (config.image_size // config.patch_size) ** 2
    n, d, m = patches + 1, config.hidden_size, config.intermediate_size
    assert vision["eager"] - vision["compiled"] == 2 * (4 * n * d * d + 2 * n * n * d + 2 * n * d * m)  # FLOPs: 2 x MACs
    assert {e.get("skipped_vision_blocks") for e in results["cells"]} == {1, None}


def test_a_rerun_measures_nothing_again_and_a_larger_plan_only_the_new_cells(measured):
    out, results = measured
    before = json.loads((out / "tiny-llava.json").read_text())
    again = latency.run_benchmark(plan(), out, "cpu", "again", arch=TINY, dtype=torch.float32)
    assert again["cells"] == before["cells"]
    seen = []
    latency.run_benchmark(plan(budgets=[8, 4, 2], strategies={"pool": pruning_zoo.get_strategy("pool")}), out, "cpu",
                          "more", arch=TINY, dtype=torch.float32, on_cell=lambda cell, _: seen.append(cell))
    assert sorted((c.mode, c.batch, c.budget) for c in seen) == sorted(
        (mode, batch, 2) for mode in ("eager", "compiled") for batch in (1, 2))


def test_the_page_shows_every_strategy_and_the_targets(measured):
    out, _ = measured
    page = (out / "tiny-llava.md").read_text()
    assert "## Targets" in page and "selection <= 3% of TTFT" in page
    assert "## Batch 1" in page and "## Batch 2" in page
    for name in STRATEGIES:
        assert f"| {name} " in page
    assert "pruning-zoo bench latency (test)" in page or "more" in page


def test_the_page_lists_each_run_with_its_command_commit_and_cells(tmp_path):
    pool = {"pool": pruning_zoo.get_strategy("pool")}
    latency.run_benchmark(plan(batches=[1], budgets=[8], strategies=pool, modes=["eager"]), tmp_path, "cpu",
                          "bench first", arch=TINY, dtype=torch.float32)
    results = latency.run_benchmark(plan(batches=[1], budgets=[8, 4], strategies=pool, modes=["eager"]), tmp_path,
                                    "cpu", "bench second", arch=TINY, dtype=torch.float32)
    assert [entry["command"] for entry in results["cells"]] == ["bench first", "bench second"]
    sha = results["git_sha"]
    page = report.markdown(results)
    assert f"  - `bench first` at git `{sha}`: 1 cell\n" in page and f"  - `bench second` at git `{sha}`: 1 cell\n" in page
    assert f"- last run: `bench second` at git `{sha}`" in page
    del results["cells"][0]["command"]  # as cells made before they recorded their command
    assert f"  - git `{sha}`: 1 cell, command not recorded in the cells" in report.markdown(results)


def test_the_batch_8_target_reads_the_llm_prefill_and_shows_ttft_beside_it():
    def cell(strategy, budget, ttft, llm):
        return {"cell": {"batch": 8, "strategy": strategy, "budget": budget, "mode": "compiled"}, "ttft_ms": ttft,
                "llm_ms": llm, "vision_ms": 10.0, "selection_ms": 0.1, "selection_share": 0.1 / ttft}

    checks = report.targets({"cells": [cell("none", 576, 120.0, 100.0), cell("pool", 64, 40.0, 24.0),
                                       cell("fastv", 64, 50.0, 35.0)]})
    rows = {target.split(" at ")[0]: (measured, met) for target, measured, met in checks if "batch 8" in target}
    assert rows == {"pool": ("4.17x (TTFT 3.00x)", True), "fastv": ("2.86x (TTFT 2.40x)", False)}
    # Where the cells count FLOPs, the LLM's FLOPs cut is shown beside: what bounds a compute-bound prefill.
    with_flops = [{**cell("none", 576, 120.0, 100.0), "flops": {"vision": 1, "llm": 900}},
                  {**cell("transprune", 64, 60.0, 45.0), "flops": {"vision": 1, "llm": 400}}]
    measured = [m for target, m, _ in report.targets({"cells": with_flops}) if "batch 8" in target]
    assert measured == ["2.22x (TTFT 2.00x; LLM FLOPs cut 2.25x)"]


def test_the_compiled_cells_name_their_fusion_and_another_is_never_mixed_in(measured):
    out, results = measured
    assert {(e["cell"]["mode"], e["cell"]["fusion"]) for e in results["cells"]} == {("eager", None), ("compiled", "aot_eager")}
    assert ("decoder layers, vision blocks and selections through torch.compile (aot_eager), q/k/v and gate/up projections "
            "multiplied as one matrix each" in (out / "tiny-llava.md").read_text())
    assert {e["packed_projection_groups"] for e in results["cells"] if e["cell"]["mode"] == "compiled"} == {2 * 4 + 2}
    assert {tuple(e["fused"]) for e in results["cells"] if e["cell"]["mode"] == "compiled"} == {
        ("decoder layers", "vision blocks", "selections")}
    before = (out / "tiny-llava.json").read_text()
    with pytest.raises(PruningZooError, match="fusion aot_eager, not None; choose another --out"):
        latency.run_benchmark(plan(fusion=None), out, "cpu", "x", arch=TINY, dtype=torch.float32)
    assert (out / "tiny-llava.json").read_text() == before


def test_a_cell_that_fails_to_compile_is_recorded_the_rest_measured_and_a_rerun_retries_it(tmp_path, monkeypatch):
    measure = latency.measure

    def failing(model, inputs, strategy, budget, mode, *args):
        if strategy.name == "pool" and mode == "compiled":
            raise torch._dynamo.exc.InternalTorchDynamoError("no compiler here")
        return measure(model, inputs, strategy, budget, mode, *args)

    small = plan(batches=[1], budgets=[8], strategies={name: pruning_zoo.get_strategy(name) for name in ("none", "pool")})
    monkeypatch.setattr(latency, "measure", failing)
    results = latency.run_benchmark(small, tmp_path, "cpu", "x", arch=TINY, dtype=torch.float32)
    errors = {(e["cell"]["strategy"], e["cell"]["mode"]): e.get("error") for e in results["cells"]}
    assert len(errors) == 4 and errors[("pool", "eager")] is None
    assert "torch.compile (aot_eager) failed" in errors[("pool", "compiled")]
    assert "torch.compile (aot_eager) failed" in (tmp_path / "tiny-llava.md").read_text()
    monkeypatch.setattr(latency, "measure", measure)
    seen = []
    again = latency.run_benchmark(small, tmp_path, "cpu", "x", arch=TINY, dtype=torch.float32,
                                  on_cell=lambda cell, _: seen.append((cell.strategy, cell.mode)))
    assert seen == [("pool", "compiled")]
    assert len(again["cells"]) == 4 and not any("error" in e for e in again["cells"])


class RepeatingRandom(RandomSubset):
    """Test strategy: random's selection with its last index replaced by its first, a repeated index."""

    def select_images(self, contexts):
        return [Selection(keep=torch.cat([s.keep[:-1], s.keep[:1]]), features=s.features)
                for s in super().select_images(contexts)]


def test_a_strategy_selecting_invalid_indices_fails_its_cells_only_and_says_how(tmp_path):
    strategies = {"none": pruning_zoo.get_strategy("none"), "random": RepeatingRandom(), "pool": pruning_zoo.get_strategy("pool")}
    small = plan(batches=[1], budgets=[8], strategies=strategies)
    results = latency.run_benchmark(small, tmp_path, "cpu", "x", arch=TINY, dtype=torch.float32)
    errors = {(e["cell"]["strategy"], e["cell"]["mode"]): e.get("error") for e in results["cells"]}
    assert len(errors) == 6
    assert errors[("none", "compiled")] is None and errors[("pool", "compiled")] is None and errors[("pool", "eager")] is None
    for mode in ("eager", "compiled"):
        assert errors[("random", mode)].startswith(f"the {mode} mode's timed runs: strategy 'random' selected invalid "
                                                    "indices before the LLM: keep 8")
        assert "(0 outside, 1 repeated, 1 not above the one before)" in errors[("random", mode)]


def test_an_unknown_fusion_backend_is_refused(tmp_path):
    with pytest.raises(PruningZooError, match="unknown fusion 'inductr'.*inductor"):
        latency.run_benchmark(plan(fusion="inductr"), tmp_path, "cpu", "x", arch=TINY, dtype=torch.float32)
    assert not any(tmp_path.iterdir())


def test_results_of_another_device_are_never_mixed(tmp_path):
    (tmp_path / "tiny-llava.json").write_text(json.dumps({"device": "NVIDIA H100 80GB HBM3", "cells": [{"cell": {}}]}))
    with pytest.raises(PruningZooError, match="another --out"):
        latency.run_benchmark(plan(), tmp_path, "cpu", "x", arch=TINY, dtype=torch.float32)


def test_results_of_another_dtype_are_never_mixed(tmp_path):
    (tmp_path / "tiny-llava.json").write_text(json.dumps({"device": device_description("cpu"), "dtype": "bfloat16",
                                                          "cells": [{"cell": {}}]}))
    with pytest.raises(PruningZooError, match="in bfloat16, not float32; choose another --out"):
        latency.run_benchmark(plan(), tmp_path, "cpu", "x", arch=TINY, dtype=torch.float32)


def test_a_budget_above_the_visual_tokens_is_refused(tmp_path):
    with pytest.raises(PruningZooError, match=r"budgets \[17\] exceed the 16 visual tokens"):
        latency.run_benchmark(plan(budgets=[8, 17]), tmp_path, "cpu", "x", arch=TINY, dtype=torch.float32)
    assert not any(tmp_path.iterdir())


def test_a_damaged_results_file_is_a_clear_error(tmp_path):
    (tmp_path / "tiny-llava.json").write_text("{not json")
    with pytest.raises(PruningZooError, match="move it away"):
        latency.run_benchmark(plan(), tmp_path, "cpu", "x", arch=TINY, dtype=torch.float32)


@pytest.mark.parametrize("args, message", [
    (["--arch", "llava7b", "--device", "cuda"], "did you mean 'llava-1.5-7b'"),
    (["--device", "cpu"], "run it on a GPU"),
    (["--device", "cuda", "--modes", "graphs"], "unknown mode 'graphs'"),
    (["--device", "cuda", "--batch", "0"], "--batch: '0' is not a whole number from 1 to 4,096"),
    (["--device", "cuda", "--strategies", "fastvv"], "fastv"),
    (["--device", "cuda", "--fusion", "inductr"], "unknown fusion 'inductr'"),
    (["--device", "cuda", "--dtype", "fp8"], "dtype 'fp8' is not one of"),
])
def test_bad_options_are_refused_before_anything_is_built(args, message):
    result = CliRunner().invoke(app, ["bench", "latency", *args])
    assert result.exit_code != 0
    assert message in result.output


def test_the_options_are_checked_into_a_plan_with_every_problem_at_once(tmp_path):
    options = dict(arch="llava-1.5-7b", batch="1,8", budgets="64", strategies="none,fastv", params=["fastv.k=3"],
                   modes="eager,compiled", fusion="none", repeats=2, decode_tokens=0, dtype="bfloat16", out=tmp_path)
    with pytest.raises(PruningZooError) as refused:
        latency.plan_from_options(**{**options, "batch": "0", "strategies": "none,fastvv", "modes": "graphs"},
                                  device="cpu")
    for problem in ("--batch: '0' is not a whole number", "fastvv", "unknown mode 'graphs'", "run it on a GPU"):
        assert problem in str(refused.value)
    if torch.cuda.is_available():
        plan, device, dtype = latency.plan_from_options(**options, device=None)
        assert (plan.batches, list(plan.strategies), plan.fusion, dtype) == ([1, 8], ["none", "fastv"], None, torch.bfloat16)
        assert plan.strategies["fastv"].params.k == 3 and device.startswith("cuda")


def test_the_7b_architectures_are_the_published_shapes():
    llava = architectures.llava_1_5_7b_config()
    assert (llava.text_config.hidden_size, llava.text_config.num_hidden_layers, llava.vision_config.image_size) == (4096, 32, 336)
    qwen = architectures.qwen2_vl_7b_config()
    assert (qwen.text_config.hidden_size, qwen.text_config.num_key_value_heads, qwen.vision_config.depth) == (3584, 4, 32)


def test_the_llava_next_prompt_holds_the_packed_tokens_and_runs_segmented():
    """LLaVA-NeXT-7B's geometry (336 px crops, its pinpoints) at tiny widths: the 672 x 672 prompt holds the
    2928 packed tokens the architecture declares, and the segmented prefill gives the engine's logits."""
    config = architectures.llava_next_7b_config()
    assert (config.text_config.hidden_size, config.text_config.num_hidden_layers) == (4096, 32)
    config.vision_config.update(dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2))
    config.text_config.update(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                                   num_key_value_heads=2))
    torch.manual_seed(0)
    model = transformers.LlavaNextForConditionalGeneration(config).eval()
    architecture = architectures.architecture("llava-next-7b")
    inputs = architecture.prompt(model, 2, torch.Generator().manual_seed(0))
    assert int((inputs["input_ids"][0] == 32000).sum()) == architecture.num_visual == 2928
    with torch.no_grad(), prune(model, pruning_zoo.get_strategy("fastv"), 64):
        expected = model(**inputs).logits[:, -1]
    segmented = SegmentedPrefill(model, pruning_zoo.get_strategy("fastv"), 64, inputs)
    segmented.run()
    torch.testing.assert_close(segmented.logits, expected, atol=1e-5, rtol=1e-4)


def test_median_ms_times_a_call_by_its_clock_on_a_cpu():
    calls = []
    assert median_ms(lambda: calls.append(1), 5, torch.device("cpu")) >= 0
    assert len(calls) == 6  # a warm-up call, then the timed ones

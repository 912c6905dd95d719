"""Every built-in strategy on every family's tiny model on a CUDA device, in bfloat16 with SDPA: a batch of 3
padded prompts through a forward and through generate() with the KV cache. Checks that nothing lands on the
wrong device, logits are finite, every image achieves its budget and keep-all reproduces the unpruned logits.
First, the compiled mode's GPU-only numerics (`numerics_rows`): tensor-core fp32 products, pairwise top-k and the
patch embedding as a matmul, eager and through inductor.

    python scripts/gpu_check.py [OUT_JSON]

This is a check, not a benchmark: nothing is timed. The CPU test suite checks the same code in float32.
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import tiny_models  # noqa: E402

import pruning_zoo  # noqa: E402
from pruning_zoo.engine.patch_matmul import patch_matmul_forward  # noqa: E402
from pruning_zoo.engine.run import prune  # noqa: E402
from pruning_zoo.provenance import git_sha  # noqa: E402
from pruning_zoo.strategy import fp32_products, top_k_mask  # noqa: E402
from pruning_zoo.strategy.budget import BudgetMeaning, resolve_budget  # noqa: E402

STRATEGIES = ["none", "random", "pool", "fastv", "visionzip", "transprune", "learnpruner"]


def to_device(inputs: dict, device, dtype) -> dict:
    return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}


def numerics_rows(device) -> list[dict]:
    """The compiled mode's GPU-only paths against plain references, eager and through inductor: fp32_products'
    tensor-core products (bf16 operands, fp32 sums) against float64, top_k_mask's pairwise ranks against
    torch.topk, and the patch embedding as a matmul against the convolution, in bf16."""
    generator = torch.Generator(device).manual_seed(0)
    a = torch.randn(32, 28, 128, device=device, generator=generator).bfloat16()
    b = torch.randn(32, 128, 640, device=device, generator=generator).bfloat16()
    reference = a.double() @ b.double()
    scores = torch.randn(8, 576, device=device, generator=generator)
    expected = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, torch.topk(scores, 64).indices, True)
    conv = torch.nn.Conv2d(3, 1024, 14, stride=14).to(device, torch.bfloat16)
    image = torch.randn(2, 3, 336, 336, device=device, generator=generator).bfloat16()
    rows = []
    for compiled in (False, True):
        wrap = (lambda f: torch.compile(f, backend="inductor", dynamic=False)) if compiled else (lambda f: f)
        with torch.no_grad():
            product = wrap(fp32_products)(a, b)
            mask = wrap(top_k_mask)(scores, 64)
            patches, convolved = wrap(patch_matmul_forward(conv))(image).float(), conv(image).float()
        rows.append({
            "check": "numerics", "compiled": compiled,
            "fp32_products_dtype": str(product.dtype),
            "fp32_products_max_relative_error": float(((product.double() - reference).abs() / reference.abs().max()).max()),
            "top_k_mask_equals_topk": bool(torch.equal(mask, expected)),
            "patch_matmul_max_difference": float((patches - convolved).abs().max()),
            "conv_output_max": float(convolved.abs().max()),
        })
        # fp32 sums of exact products: errors of fp32 rounding, not of bf16 (2^-8)
        rows[-1]["ok"] = (rows[-1]["fp32_products_dtype"] == "torch.float32" and rows[-1]["fp32_products_max_relative_error"] < 1e-6
                          and rows[-1]["top_k_mask_equals_topk"]
                          and rows[-1]["patch_matmul_max_difference"] <= 0.02 * rows[-1]["conv_output_max"])
        print(("ok  " if rows[-1]["ok"] else "FAIL"), json.dumps(rows[-1]), flush=True)
    return rows


def main(out: Path) -> int:
    device, dtype = torch.device("cuda"), torch.bfloat16
    rows = numerics_rows(device)
    failures = sum(not row["ok"] for row in rows)
    for family in tiny_models.FAMILIES.values():
        with tempfile.TemporaryDirectory() as folder:
            model = family.build(folder).to(device, dtype)
        inputs = to_device(family.inputs(3), device, dtype)
        with torch.no_grad():
            reference = model(**inputs).logits
        for name in STRATEGIES:
            strategy = pruning_zoo.get_strategy(name)
            row = {"family": family.name, "strategy": name}
            try:
                with torch.no_grad(), prune(model, strategy, 0.5) as run:
                    logits = model(**inputs).logits
                    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
                record = run.records[0]
                achieved = []
                for image in record.images:
                    wanted = resolve_budget(0.5, image.num_visual)
                    got = image.entering_llm if strategy.budget_meaning == BudgetMeaning.ENTERING_LLM else image.kept_per_layer[-1]
                    achieved.append(name == "none" or got == wanted)
                row.update(
                    finite=bool(torch.isfinite(logits).all()),
                    budgets_met=all(achieved),
                    generated=list(generated.shape),
                    exact=bool(torch.equal(logits, reference)) if name == "none" else None,
                    kept_per_layer=[image.kept_per_layer for image in record.images],
                )
                ok = row["finite"] and row["budgets_met"] and row["exact"] is not False
            except Exception as error:  # a check script reports every failure, then exits non-zero
                row["error"] = f"{type(error).__name__}: {error}"
                ok = False
            row["ok"] = ok
            failures += not ok
            rows.append(row)
            print(("ok  " if ok else "FAIL"), family.name, name, row.get("error", ""), flush=True)
    report = {
        "git_sha": git_sha(),
        "command": "python scripts/gpu_check.py",
        "device": torch.cuda.get_device_name(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()},
        "dtype": "bfloat16",
        "attention": "sdpa",
        "rows": rows,
    }
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{len(rows) - failures}/{len(rows)} passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("gpu_check.json")))

"""On a GPU, before the latency benchmark: ToMe's stage inside the vision tower under CUDA graphs. For the tiny
LLaVA, Qwen2-VL and Qwen2.5-VL of tests/tiny_models.py in bfloat16, the segmented prefill is captured and replayed
(plain and with inductor fusion) and compared with the hook engine's logits. Not yet run: the device time of the
session that wrote it ran out. Usage on the device: python3 scripts/check_vision_stage_capture.py"""
import sys
import tempfile
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import tiny_models
from test_segmented import UNIFORM

import pruning_zoo
from pruning_zoo.bench.segmented import SegmentedPrefill
from pruning_zoo.engine.run import prune

dev, dtype = torch.device("cuda"), torch.bfloat16
for fam in ("llava", "qwen2_vl", "qwen2_5_vl"):
    model = tiny_models.FAMILIES[fam].build(tempfile.mkdtemp()).to(dev, dtype)
    for params, budget in (({}, 6), ({"fastv_k": 1}, 6), ({}, 1)):
        inputs = {k: (v.to(dev, dtype) if v.is_floating_point() else v.to(dev)) for k, v in UNIFORM[fam](2).items()}
        with torch.no_grad(), prune(model, pruning_zoo.get_strategy("tome", **params), budget):
            expected = model(**inputs).logits[:, -1].float()
        for fusion in (None, "inductor"):
            try:
                torch._dynamo.reset()
                seg = SegmentedPrefill(model, pruning_zoo.get_strategy("tome", **params), budget, inputs, fusion=fusion)
                seg.capture()
                for _ in range(3):
                    seg.replay()
                torch.cuda.synchronize()
                seg.check_kept()
                err = (seg.logits.float() - expected).abs().max().item()
                print(fam, params, budget, fusion, "graphs", seg.graphs(), "eager", seg.eager_segments(),
                      "max err", round(err, 4), "argmax equal", bool((seg.first_token == expected.argmax(-1)).all()), flush=True)
            except Exception:
                print(fam, params, budget, fusion, "FAILED", flush=True)
                traceback.print_exc()

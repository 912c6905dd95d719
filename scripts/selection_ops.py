"""How much work each strategy's selection launches, counted on a CPU: a proxy for its cost in the compiled
mode, where a CUDA graph replays one kernel per operation however small.

LLaVA-1.5-7B's layout (32 decoder layers, 576 visual tokens of 640) at width 256 with random weights; the
segmented prefill (`pruning_zoo.bench.segmented`) runs eagerly, and the profiler counts the top-level aten operations
of its selection segments, views left out. It is a count, not a timing.

    python scripts/selection_ops.py --batch 1,8 --budget 64 [--strategies fastv,transprune]
"""

from __future__ import annotations

import argparse
import json

import torch
import transformers
from torch.profiler import ProfilerActivity, profile

import pruning_zoo
from pruning_zoo.bench.architectures import llava_prompt
from pruning_zoo.bench.segmented import SegmentedPrefill
from pruning_zoo.provenance import git_sha, versions

#: Operations that make views or empty tensors: no kernel runs for them.
VIEWS = {"aten::view", "aten::slice", "aten::select", "aten::narrow", "aten::as_strided", "aten::reshape",
         "aten::expand", "aten::transpose", "aten::t", "aten::unsqueeze", "aten::squeeze", "aten::permute",
         "aten::chunk", "aten::split", "aten::detach", "aten::alias", "aten::lift_fresh", "aten::empty",
         "aten::unflatten", "aten::flatten", "aten::_reshape_alias", "aten::expand_as", "aten::view_as", "aten::unbind"}


def narrow_llava() -> transformers.LlavaForConditionalGeneration:
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                    num_attention_heads=2, image_size=336, patch_size=14,
                                                    projection_dim=64),
        text_config=transformers.LlamaConfig(vocab_size=32064, hidden_size=256, intermediate_size=688,
                                             num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                                             bos_token_id=1, pad_token_id=32001),
        image_token_index=32000, vision_feature_layer=-2, image_seq_length=576,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return transformers.LlavaForConditionalGeneration(config).eval()


def selection_operations(model, strategy: str, budget: int, batch: int) -> int:
    inputs = llava_prompt(35, 28)(model, batch, torch.Generator().manual_seed(0))
    segmented = SegmentedPrefill(model, pruning_zoo.get_strategy(strategy), budget, inputs)
    segmented.run()  # the first run validates; count a later one
    count = 0
    with torch.no_grad():
        for segment in segmented.segments:
            if not segment.selection:
                segment.run()
                continue
            with profile(activities=[ProfilerActivity.CPU]) as profiler:
                segment.run()
            count += sum(1 for event in profiler.events()
                         if event.name.startswith("aten::") and event.cpu_parent is None and event.name not in VIEWS)
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--budget", type=int, default=64)
    parser.add_argument("--strategies", default="fastv,learnpruner,transprune,visionzip,pool,random")
    args = parser.parse_args()
    model = narrow_llava()
    counts = {name: {batch: selection_operations(model, name, args.budget, int(batch)) for batch in args.batch.split(",")}
              for name in args.strategies.split(",")}
    print(json.dumps({"what": "top-level non-view aten operations in the selection segments (scripts/selection_ops.py)",
                      "budget": args.budget, "git_sha": git_sha(), "versions": versions(), "operations": counts},
                     indent=1))


if __name__ == "__main__":
    main()

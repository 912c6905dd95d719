"""Where TransPrune's sub-block summaries (TTV) cost least, on a GPU: a diagnostic for the selection target, not the
benchmark.

    python scripts/summary_placement.py --out DIR [--arch llava-1.5-7b] [--budget 64] [--batch 1]

For each watched layer of the fused segmented prefill (on the inputs its prefill left), CUDA graphs replayed
alone, medians of CUDA events (`pruning_zoo.engine.timing.median_ms`):
- own: the layer's compiled forward, no summary;
- in layer: `sublayer_forward` and the whole summary compiled together (the summary fused into the layer);
- tensors out: `sublayer_forward` compiled, returning the four sub-block tensors (as the prefill runs it), and the
  summary compiled apart on them (as a stage computes it; there fused with the other layers' summaries);
- token values out: the layer compiled returning each token's magnitude and direction terms (no softmax), and
  the softmax over the tokens compiled apart.
Writes DIR/summary-placement-ARCH.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import pruning_zoo
from pruning_zoo.bench.architectures import architecture, build_random
from pruning_zoo.bench.segmented import SegmentedPrefill
from pruning_zoo.engine.observe import sublayer_forward
from pruning_zoo.engine.timing import median_ms
from pruning_zoo.provenance import device_description, git_sha, versions
from pruning_zoo.strategy import SublayerIO


def token_values(io: SublayerIO) -> torch.Tensor:
    """[B, L, 4]: each sub-block's |y|/|x| and 1 - cos(x, y) (TransPrune's TTV before its softmax over tokens)."""
    values = []
    for x, y in ((io.attn_in, io.attn_out), (io.mlp_in, io.mlp_out)):
        x, y = x.float(), y.float()
        values += [y.norm(dim=-1) / x.norm(dim=-1), 1 - F.cosine_similarity(x, y, dim=-1)]
    return torch.stack(values, dim=-1)


def from_token_values(values: torch.Tensor) -> torch.Tensor:
    return values[..., 0] * values[..., 1].softmax(dim=-1) + values[..., 2] * values[..., 3].softmax(dim=-1)


def summarized(summarize):
    """`sublayer_forward` returning `summarize` of its sub-block tensors instead of them."""

    def forward(layer, hidden_states, **kwargs):
        hidden_states, io = sublayer_forward(layer, hidden_states, **kwargs)
        return hidden_states, summarize(io)

    return forward


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="llava-1.5-7b")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=100)
    args = parser.parse_args()
    arch = architecture(args.arch)
    model = build_random(arch, "cuda")
    strategy = pruning_zoo.get_strategy("transprune")
    inputs = arch.prompt(model, args.batch, torch.Generator().manual_seed(args.batch))
    inputs = {k: v.to("cuda", dtype=torch.bfloat16 if v.is_floating_point() else v.dtype) for k, v in inputs.items()}
    segmented = SegmentedPrefill(model, strategy, args.budget, inputs, fusion="inductor")
    segmented.capture()
    compile_static = functools.partial(torch.compile, backend="inductor", dynamic=False)
    in_layer = compile_static(summarized(strategy.summarize_sublayers))
    tensors_out = compile_static(sublayer_forward)
    values_out = compile_static(summarized(token_values))
    summary_apart = compile_static(strategy.summarize_sublayers)
    softmax_apart = compile_static(from_token_values)
    rows = []
    with segmented._forwards(), torch.no_grad():
        for index, (hidden, kwargs) in sorted(segmented._watched_inputs.items()):
            layer = segmented.adapter.layers[index]

            def timed(call):
                return median_ms(call, args.repeats, hidden.device)

            def fresh():
                return segmented._fresh_cache(kwargs)

            parts = tensors_out(layer, hidden, **fresh())[1]
            values = values_out(layer, hidden, **fresh())[1]
            row = {
                "layer": index, "rows": hidden.shape[1],
                "own_ms": timed(lambda: layer(hidden, **fresh())),
                "in_layer_ms": timed(lambda: in_layer(layer, hidden, **fresh())),
                "tensors_out_ms": timed(lambda: tensors_out(layer, hidden, **fresh())),
                "summary_apart_ms": timed(lambda: summary_apart(parts)),
                "token_values_out_ms": timed(lambda: values_out(layer, hidden, **fresh())),
                "softmax_apart_ms": timed(lambda: softmax_apart(values)),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"arch": args.arch, "device": device_description("cuda"), "git_sha": git_sha(), "versions": versions(),
              "command": " ".join(["scripts/summary_placement.py", *sys.argv[1:]]), "budget": args.budget,
              "batch": args.batch, "layers": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"summary-placement-{args.arch}.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

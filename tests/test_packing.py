"""Packed projections (the compiled mode's q/k/v and gate/up as one matrix each): the same model, the same
outputs, one matrix multiplication per group."""

from __future__ import annotations

import pytest
import tiny_models
import torch
from torch import nn

from pruning_zoo.bench.forwards import shadowed_forwards
from pruning_zoo.engine.adapters import adapter_for
from pruning_zoo.engine.packing import PackedProjections, own_linear
from pruning_zoo.errors import PruningZooError


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    return tiny_models.FAMILIES["llava"].build(tmp_path_factory.mktemp("llava"))


def layer_inputs(adapter, batch: int = 2, tokens: int = 12):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(batch, tokens, adapter.text_config.hidden_size, generator=generator)
    positions = torch.arange(tokens)[None].expand(batch, -1)
    return hidden, dict(attention_mask=None, position_ids=positions, position_embeddings=adapter.rotary_embedding(hidden, positions))


def output_of(layer, hidden, kwargs):
    output = layer(hidden, **kwargs)
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def test_packing_keeps_the_parameters_and_their_values_in_one_storage(tiny_llava):
    layer = adapter_for(tiny_llava).layers[0]
    attention = layer.self_attn
    members = [attention.q_proj, attention.k_proj, attention.v_proj]
    parameters = [linear.weight for linear in members]
    before = [parameter.clone() for parameter in parameters]
    hidden, kwargs = layer_inputs(adapter_for(tiny_llava))
    expected = output_of(layer, hidden, kwargs)
    pack = PackedProjections(members)
    assert [linear.weight for linear in members] == parameters  # the same Parameter objects
    assert all(torch.equal(parameter, old) for parameter, old in zip(parameters, before))
    storages = {parameter.untyped_storage().data_ptr() for parameter in parameters}
    assert storages == {pack.weight.untyped_storage().data_ptr()}  # views of the packed matrix: no second copy
    torch.testing.assert_close(output_of(layer, hidden, kwargs), expected, rtol=0, atol=0)  # own forwards
    again = PackedProjections(members)  # as the next prefill packs them: a view of the same matrix, no copy
    assert again.weight.data_ptr() == pack.weight.data_ptr() and torch.equal(again.weight, pack.weight)
    assert [linear.weight.data_ptr() for linear in members] == [parameter.data_ptr() for parameter in parameters]


@torch.no_grad()
def test_a_compiled_layer_multiplies_each_group_once_and_computes_the_same(tiny_llava):
    adapter = adapter_for(tiny_llava)
    hidden, kwargs = layer_inputs(adapter)
    expected = [output_of(layer, hidden, kwargs) for layer in adapter.layers]
    packs = [PackedProjections(group) for group in adapter.packable_projections()]
    linears_per_graph = []

    def backend(graph_module, example_inputs):
        linears_per_graph.append(sum(node.target is torch.nn.functional.linear for node in graph_module.graph.nodes))
        return graph_module.forward

    torch._dynamo.reset()
    shadows = {layer: torch.compile(layer.forward, backend=backend) for layer in adapter.layers}
    for pack in packs:
        shadows.update(pack.forwards())
    with shadowed_forwards(shadows):
        packed = [output_of(layer, hidden, kwargs) for layer in adapter.layers]
    # q/k/v, o, gate/up, down: 4 products instead of 7; one graph serves every layer
    assert linears_per_graph == [4]
    for ours, theirs in zip(packed, expected):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert all(not pack._pending and pack._input is None for pack in packs)  # nothing kept between calls
    assert not any("forward" in linear.__dict__ for pack in packs for linear in pack.linears)


@torch.no_grad()
def test_a_member_called_alone_or_on_another_input_gets_its_own_product(tiny_llava):
    attention = adapter_for(tiny_llava).layers[1].self_attn
    members = [attention.q_proj, attention.k_proj, attention.v_proj]
    pack = PackedProjections(members)
    first, other = torch.randn(3, 32), torch.randn(5, 32)
    forwards = pack.forwards()
    torch.testing.assert_close(forwards[attention.k_proj](first), own_linear(attention.k_proj, first))
    # q pending for `first`; called on another input it must not hand that back
    torch.testing.assert_close(forwards[attention.q_proj](other), own_linear(attention.q_proj, other))
    torch.testing.assert_close(forwards[attention.v_proj](other), own_linear(attention.v_proj, other))
    torch.testing.assert_close(forwards[attention.k_proj](other), own_linear(attention.k_proj, other))
    assert not pack._pending and pack._input is None


@pytest.mark.parametrize("family, vision_groups", [("llava", 2), ("qwen2_vl", 0), ("qwen2_5_vl", 2)])
def test_every_family_names_its_groups(family, vision_groups, tmp_path):
    """q/k/v and gate/up of every decoder layer; in the vision blocks that run, what they hold apart: CLIP's
    q/k/v (the tiny tower's third block is never read), Qwen2.5-VL's gate/up (Qwen's q/k/v are one matrix
    already, Qwen2-VL's MLP has no gate)."""
    adapter = adapter_for(tiny_models.FAMILIES[family].build(tmp_path))
    groups = adapter.packable_projections()
    assert len(groups) == 2 * adapter.num_layers + vision_groups
    assert all(len({linear.in_features for linear in group}) == 1 for group in groups)


def test_mismatched_layers_are_refused():
    with pytest.raises(PruningZooError, match="groups of two or more nn.Linear of one input width"):
        PackedProjections([nn.Linear(4, 4), nn.Linear(5, 4)])
    with pytest.raises(PruningZooError, match="groups of two or more"):
        PackedProjections([nn.Linear(4, 4)])

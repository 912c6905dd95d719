"""lmms-eval's model entry point (group `lmms_eval.models`): exposes `PrunedVLM` as model `pruning_zoo`.
Loaded by lmms-eval only, so importing lmms-eval here costs nothing for pruning-zoo's own commands."""

from __future__ import annotations


def manifests():
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="pruning_zoo", simple_class_path="pruning_zoo.eval.lmms_model.PrunedVLM",
                         aliases=("pruning-zoo",))

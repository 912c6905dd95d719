"""Training what a strategy learns (LearnPruner's pruning module) on a frozen VLM."""

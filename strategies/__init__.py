"""The built-in strategies, each module a plugin registered through the `pruning_zoo` entry-point group."""

"""Suite definitions: YAML data files read by pruning_zoo.suites."""

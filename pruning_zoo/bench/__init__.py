"""The latency benchmark (`pruning-zoo bench latency`): random-weight models of real shapes, eager and compiled
prefill, time to first token against the physical floor.

`latency` holds the plan and the run (cells, the resumable results file, the command's options checked into a
plan); `architectures` the configs and prompts timed; `measure` one cell's measurements; `floor` the device's
peaks and the physical floor; `report` the results page. The compiled mode is `segmented` (the prefill as
segments), `capture` (their capture in CUDA graphs and replay) and `forwards` (the model's modules as it runs
them)."""

"""``python -m bench``: the pipeline's benchmark, every figure measured in the same run.

See ``docs/benchmarks.md`` for what each figure means and ``bench.cli`` for the options.
"""

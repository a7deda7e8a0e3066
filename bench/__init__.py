"""Benchmark suite: ``pytest bench/ --benchmark-only``, then ``python -m bench.report``.

* :mod:`bench.workloads` - the shapes, the 11 dataset workloads and the FLOP formulas.
* :mod:`bench.providers` - the layer providers, the step models and the references that
  every benchmark checks against before it is timed.
* :mod:`bench.measure` - timing (``triton.testing.do_bench`` on CUDA), peak memory and
  the ``extra_info`` each benchmark records.
* :mod:`bench.report` - Markdown tables, ratios vs ``fused``, targets and plots.
"""

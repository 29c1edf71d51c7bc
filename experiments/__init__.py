"""The project's experiments: the embedded demo (``stablerep-bench demo``, ``make demo``) and the
method study (``stablerep-bench study``), with their probe sets, generator processes and reports.

Top floor, beside ``benchmarks``: it uses the generator service and the trainer, nothing uses it.
"""

"""iia evaluation: accuracy and quality benchmarks, and the PyTorch eager baseline of `iia-bench`.

It sits on top of every other package (models, calibration, compiler, runtime) and nothing imports it.
"""

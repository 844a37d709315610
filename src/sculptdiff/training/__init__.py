"""What the training script and the benchmarks share: data, model card, push, evaluation.

Nothing is imported here on purpose: `data` and `evaluation` need the `train` extra (datasets, scikit-learn),
which `import sculptdiff` must not require. Import the submodules directly.
"""

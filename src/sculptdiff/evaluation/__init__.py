"""How good generated images are: `digits` scores samples of the built-in digits in a digits classifier's features.

The benchmarks and the training script's optional `--eval_steps` use it; nothing else in the package depends on it.
Nothing is imported here on purpose: `digits` needs the `train` extra (datasets, scikit-learn), which
`import sculptdiff` must not require. Import the submodule directly.
"""

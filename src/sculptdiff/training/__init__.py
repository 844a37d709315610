"""The training machinery the scripts and the benchmarks share, one module per job.

- `recipe`: the default U-Net shape, noise scheduler, optimiser and EMA settings, defined once.
- `objective`: the denoising loss (epsilon, v, sample or rectified-flow targets; Min-SNR; offset noise).
- `checkpointing`: checkpoints with the run's fingerprint, trial-loading, rotation, resume, save/load hooks.
- `guard`: the divergence guard (finite loss and weights after every update, and before the final save).
- `validation`: sample grids from a fixed seed.
- `data`, `card`, `publish`: the dataset, the model card, the Hub push (`evaluation` re-exports the digits evaluator,
  which lives in `sculptdiff.evaluation.digits`).
- `atomic_files`: writes renamed into place.

Nothing is imported here on purpose: `data` needs the `train` extra (datasets, scikit-learn),
which `import sculptdiff` must not require. Import the submodules directly.
"""

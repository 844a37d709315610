"""The training machinery the scripts and the benchmarks share, one module per job.

- `arguments`: the flag groups every script's parser is built from (data, optimisation, run, checkpoints, logs, Hub).
- `runtime`: the accelerator, the CPU threads, logging and trackers.
- `recipe`: the default U-Net and DiT shapes, noise scheduler, optimiser and EMA settings, defined once.
- `optimization`: AdamW, the seeded loader and the LR schedule through `accelerator.prepare`; the optimiser step.
- `lora`: LoRA adapters on any supported denoiser, saved in diffusers' format.
- `objective`: the denoising loss (epsilon, v, sample or rectified-flow targets; Min-SNR; offset noise).
- `checkpointing`: checkpoints with the run's fingerprint, trial-loading, rotation, resume, the batches of a run.
- `guard`: the divergence guard (finite loss and weights after every update, and before the final save).
- `validation`: sample grids from a fixed seed.
- `data`, `card`, `publish`: the dataset, the model card, the Hub push (`evaluation` re-exports the digits evaluator,
  which lives in `sculptdiff.evaluation.digits`).
- `atomic_files`: writes renamed into place.

Nothing is imported here on purpose: `data` needs the `train` extra (datasets, scikit-learn),
which `import sculptdiff` must not require. Import the submodules directly.
"""

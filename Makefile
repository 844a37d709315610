# Targets mirror diffusers' Makefile: `style` rewrites, `quality` only checks (CI-safe).
check_dirs := src tests training_scripts benchmarks

.PHONY: style quality test bench

style:
	ruff check --fix $(check_dirs)
	ruff format $(check_dirs)

quality:
	ruff check $(check_dirs)
	ruff format --check $(check_dirs)

test:
	python -m pytest -n 2

bench:  # needs the bench extra: pip install -e ".[bench]"
	python benchmarks/bench_metric.py
	python benchmarks/bench_unet.py
	python benchmarks/bench_speed.py
	python benchmarks/bench_quality.py

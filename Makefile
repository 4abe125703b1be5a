.PHONY: test lint docs docs-serve bench demo
test:
	python -m pytest -q
lint:
	ruff check tmcgraph apg tests benchmarks examples
	mypy tmcgraph apg
docs:
	NO_MKDOCS_2_WARNING=1 mkdocs build --strict -d site
docs-serve:
	NO_MKDOCS_2_WARNING=1 mkdocs serve
bench:
	python benchmarks/contract.py --threads 1 2 --repeats 9 --json benchmarks/results/contract.json
demo:
	tmcgraph demo

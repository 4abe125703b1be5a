.PHONY: test bench lint demo
test:
	python -m pytest -q
bench:
	python benchmarks/contract.py --threads 1 2 --repeats 9 --json benchmarks/results/contract.json
lint:
	ruff check tmcgraph apg tests benchmarks examples
	mypy tmcgraph
demo:
	tmcgraph demo

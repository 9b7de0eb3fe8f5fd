# meterlink: `make demo` runs the full demo, `make test` runs the test suite. Both install what
# they need first (Debian packages, .venv with the project) through scripts/bootstrap.sh.
.PHONY: demo test bench proto bootstrap

bootstrap:
	bash scripts/bootstrap.sh

demo: bootstrap
	.venv/bin/python scripts/demo.py

test:
	bash scripts/test.sh

bench: bootstrap
	.venv/bin/python bench/run.py

proto: bootstrap
	.venv/bin/python scripts/gen_proto.py

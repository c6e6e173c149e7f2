# Two commands for a fresh machine (see README): `make demo` and `make test`.
# Both create or update .venv idempotently first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mmtrain-installed

.PHONY: install demo test java slurm gpu-wheels clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip wheel setuptools
	# pinned for this machine: the CUDA build that runs on CPU, installed from local disk
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[dev]'
	@$(MAKE) --no-print-directory java
	# DeepSpeed's native ops for this machine's accelerator, built once here instead of on the first
	# training start (about a minute each on 2 cores): CPU Adam (train.offload) and the CPU ranks'
	# shared-memory collectives; where the accelerator has no such op it is skipped
	$(PY) -c 'from deepspeed.accelerator import get_accelerator as acc; \
		builders = [acc().create_op_builder(n) for n in ("CPUAdamBuilder", "ShareMemCommBuilder")]; \
		[b.load(verbose=False) for b in builders if b is not None and b.is_compatible()]; \
		print("deepspeed ops:", ", ".join(b.NAME for b in builders if b is not None and b.is_compatible()) or "none to build")'
	touch $(STAMP)

# caption metrics run Java (pycocoevalcap's PTB tokenizer and METEOR): a headless runtime from
# Debian's packages when none is on PATH and this runs as root with apt-get; otherwise it says so
java:
	@if command -v java >/dev/null; then \
		echo "java: $$(java -version 2>&1 | head -n 1)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -q default-jre-headless >/dev/null \
			|| { apt-get update -q >/dev/null && apt-get install -y -q default-jre-headless >/dev/null; } \
			&& echo "java: installed $$(java -version 2>&1 | head -n 1)"; \
	else \
		echo "java: none on PATH: caption metrics (mmtrain eval caption) and their tests need a Java runtime," \
			"e.g. apt-get install default-jre-headless"; \
	fi

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mmtrain demo --out demo_out

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider --durations=15

# Slurm for tests/test_slurm.py (a one-node cluster the tests start): Debian's packages, installed
# when missing and this runs as root with apt-get; otherwise those tests are skipped, saying why
slurm:
	@if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then \
		echo "slurm: installed ($$(slurmctld -V))"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -q slurmctld slurmd slurm-client munge >/dev/null \
			|| { apt-get update -q >/dev/null && apt-get install -y -q slurmctld slurmd slurm-client munge >/dev/null; } \
			&& echo "slurm: installed ($$(slurmctld -V))"; \
	else \
		echo "slurm: not installed (needs root and apt-get); tests/test_slurm.py will be skipped"; \
	fi

# wheels for the GPU machine (no registry there): what benchmarks/gpu_check.py needs beyond its image
gpu-wheels: $(STAMP)
	$(PY) benchmarks/gpu_wheels.py --out .whl

clean:
	rm -rf $(VENV) demo_out

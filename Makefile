# relaygw: `make run` starts the gateway on its embedded default config;
# `make test` runs the whole trial suite (including the interop tier with
# real Postfix, swaks, nginx and HAProxy, installed from Debian packages).

VENV ?= .venv
# The venv is built on the system's Python 3 when it is 3.11 or newer and
# can make venvs: a distribution's build (profile-guided and link-time
# optimized) runs relaygw faster than a plain source build such as pyenv's
# (bench/RESULTS.md, levers).  PYTHON=... overrides.
PYTHON ?= $(shell /usr/bin/python3 -c 'import sys, ensurepip; assert sys.version_info >= (3, 11)' 2>/dev/null && echo /usr/bin/python3 || echo python3)
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: setup run test peers bench clean

setup:
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PIP) install -q --disable-pip-version-check '.[test]'
	@# Regenerate Twisted's plugin cache so `twistd --help` lists relaygw.
	@$(PY) -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"

run: setup
	$(VENV)/bin/twistd -n --pidfile= relaygw

peers:
	@sh scripts/install-peers

test: setup peers
	$(PY) -m twisted.trial --temp-directory=$(CURDIR)/_trial_temp tests

bench: setup peers
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) build *.egg-info _trial_temp var

# The team stack on one host (scripts/team.py, docs/team.md): PostgreSQL, SeaweedFS (S3), an MLflow server.
#   eval "$$(make -s team-up)"   start it in the background (or find it up); stdout: only `export NAME=value` lines
#   make team-env               the exports of the running stack, again
#   make team-join              in any clone, with the exports set: the team bucket becomes its default DVC remote
#   make team-status            what runs, on which ports
#   make team-down              stop every process team-up started (the data stays in TEAM_DIR)
# Settings: TEAM_DIR (default .team/), TEAM_PG_PORT, TEAM_S3_PORT, TEAM_MLFLOW_PORT (default: free ports,
# kept across restarts), TEAM_PG_BIN, TEAM_TIMEOUT; e.g. make team-up TEAM_DIR=/srv/kdprune-team TEAM_MLFLOW_PORT=5000.

# Included before the Makefile's first rule: leave its default goal alone.
_team_default_goal := $(.DEFAULT_GOAL)

TEAM_DIR ?= $(CURDIR)/.team
TEAM_PY = $(BIN)/python $(CURDIR)/scripts/team.py

.PHONY: team-up team-env team-join team-status team-down

# .venv first, with all of its output on stderr, so that `eval "$(make team-up)"` sees only the exports.
team-up team-env team-join team-status team-down:
	@$(MAKE) --no-print-directory -s $(VENV)/.installed >&2
	@TEAM_DIR='$(TEAM_DIR)' $(TEAM_PY) $(patsubst team-%,%,$@)

.DEFAULT_GOAL := $(_team_default_goal)

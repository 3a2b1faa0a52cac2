"""Shared test set-up: this directory is on sys.path, so tests in subdirectories (tests/distributed/)
import the helpers here (_dist, _cli_data, _method_stats, _study_records) as the others do."""

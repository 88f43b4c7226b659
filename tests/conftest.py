"""tests/ mirrors the package: layer/, kernels/, train/, data/, experiments/, tools/. Shared
helpers and assertions live in tests/helpers.py (importable by name: pytest puts this folder on
sys.path); the checkout itself is on sys.path through pyproject.toml's pythonpath."""

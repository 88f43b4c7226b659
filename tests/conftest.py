"""tests/ mirrors the package: layer/, kernels/, train/, data/, experiments/, tools/. Shared
helpers and assertions live in tests/helpers.py (importable by name: pytest puts this folder on
sys.path); the checkout itself is on sys.path through pyproject.toml's pythonpath."""
import inspect

import pytest


def pytest_collection_modifyitems(items):
    """Mark `slow` every test that runs a train.py or another program as a subprocess (they take
    most of the suite's time: deselect them with -m 'not slow'), and `gpu` every test that
    needs CUDA (tests/kernels/test_gpu_tiers.py's CUDA-only ones)."""
    for item in items:
        source = inspect.getsource(item.function) if hasattr(item, "function") else ""
        if "run_train(" in source or "subprocess." in source or "torchrun" in source:
            item.add_marker(pytest.mark.slow)
        if any(m.name == "skipif" and "GPU" in str(m.kwargs.get("reason", "")) for m in item.iter_markers()):
            item.add_marker(pytest.mark.gpu)

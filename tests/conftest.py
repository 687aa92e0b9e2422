import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _streamlit_bound_locally():
    """AppTest runs the app without a server and reads no config file next to it, so the
    app's bind guard (dashboard/bind.py) would find ``server.address`` unset; give it the
    address ``streamlit run`` reads from dashboard/.streamlit/config.toml."""
    try:
        from streamlit import config
    except ImportError:  # the dashboard extra is not installed: no app tests run
        yield
        return
    config.set_option("server.address", "127.0.0.1")
    yield

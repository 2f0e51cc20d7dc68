"""`covrl train` ends on a run-ending error with its message and an exit code (2 bad input, 1 the run
failed), and re-raises anything else: a bug keeps its traceback."""

import pytest

from pipeline.data.datasets import DataError
from pipeline.driver.checkpoint import CheckpointError
from pipeline.driver.config_io import ConfigError
from pipeline.driver.roles import RoleFailure, RoleStartError
from pipeline.driver.trainer import TrainingDiverged
from pipeline.train import InputError, exit_code


@pytest.mark.parametrize(
    "error, code",
    [
        (ConfigError("learner.lr: bad"), 2),
        (InputError("model.path: no such directory"), 2),
        (DataError("row 3: bad"), 2),
        (CheckpointError("cannot write"), 1),
        (RoleStartError("learner: timeout"), 1),
        (RoleFailure("generator", "died"), 1),
        (TrainingDiverged("nan"), 1),
        (ValueError("a bug"), None),
        (KeyError("a bug"), None),
    ],
)
def test_exit_code(error, code):
    assert exit_code(error) == code

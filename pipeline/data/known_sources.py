"""Verifiers for the ``data_source`` names that verl's dataset scripts write, so their parquet files are
scored right without a routing config.

verl picks a scorer by ``data_source`` (its ``default_compute_score``); covrl routes by the same field
(``verifier.routes``). These are verl's math sources; covrl scores them all with math-verify (``math``:
boxed answers, LaTeX and plain numbers, so GSM8K's ``#### 72`` and MATH's ``\\boxed{}`` both parse).
verl's code sources are left out on purpose: their test cases use formats covrl's ``code`` verifier does
not read, so they need an explicit route. A route in ``verifier.routes`` always wins over these.
"""

from __future__ import annotations

from schemas.data_config import DataConfig
from schemas.verifier_config import VerifierSpec

MATH_SOURCES: tuple[str, ...] = (
    "openai/gsm8k",
    "lighteval/MATH",
    "HuggingFaceH4/MATH-500",
    "DigitalLearningGMLab/eurus2_math",
    "math_dapo",
    "math_dapo_reasoning",
    "aime2024",
    "aime2025",
    "numina_aops_forum",
    "numina_synthetic_math",
    "numina_amc_aime",
    "numina_synthetic_amc",
    "numina_cn_k12",
    "numina_olympiads",
)


def known_source_routes(data: DataConfig) -> dict[str, VerifierSpec]:
    """data_source -> verifier for verl's math sources, when the run reads files (else {})."""
    if not data.train_files:
        return {}
    return {source: VerifierSpec(name="math") for source in MATH_SOURCES}

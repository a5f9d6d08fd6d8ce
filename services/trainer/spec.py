"""What one training job runs, as one typed record: the trainer service writes it beside the
checkpoint (`.<job>.spec.json`), the job (job.py) and every Ray Train worker read it back
with this class. The training section is the one the request carried, whole (services/common/sections.py)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from ..common.config import TrainingConfig
from .loss_log import LossTarget


class TrainingJobSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: str
    run_id: str
    dataset_uri: str
    base_model: str
    model_uri: str
    progress_uri: str
    cancel_uri: str
    commit_uri: str
    trust_remote_code: bool
    builtin_cache_dir: str
    prompt_format: str
    seed_tag: str  # backtranslation.seed_tag, the replica's: how seed data is marked in every stage
    seed: int  # the round's: config.seed + k
    augmented_tag: str  # backtranslation.tag: prefixed to prompts of backtranslated data
    training: TrainingConfig
    loss_log: LossTarget | None = None  # where rank 0 logs its loss per step; None: nowhere


class WorkerConfig(BaseModel):
    """Ray Train's train_loop_config: the spec, plus what the job decided for its workers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    spec: TrainingJobSpec
    store_root: str
    staging_uri: str  # rank 0 saves here; the job commits it to spec.model_uri

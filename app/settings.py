"""All configuration of warmtune, read once from the environment (prefix WARMTUNE_)."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Role = Literal["predict", "annotate", "admin"]

ITERATIONS_PATTERN = re.compile(r"^(update-size|epochs:\d*\.?\d+|\d+)$")


class Settings(BaseSettings):
    """Every knob of the service, the worker, the CLI and the experiments."""

    model_config = SettingsConfigDict(env_prefix="WARMTUNE_", extra="ignore")

    # Storage
    home: Path = Field(Path("var"), description="Sample store, snapshots and locks live here.")

    # Model
    arch: str = Field("alexnet", description="torchvision classification model name.")
    base_weights: str = Field("none", description="Initial weights: none (random), imagenet (torchvision's), or a state-dict path.")
    image_size: int = Field(224, ge=16, description="Side of the square model input in pixels.")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    head_init: Literal["mean", "random"] = Field(
        "mean", description="How rows for new classes start: mean of the old rows, or torch's default init."
    )

    # The method (Käding et al. 2016 defaults)
    lr: float | None = Field(
        None,
        gt=0,
        description="SGD learning rate of the first version and of a consolidation (training on the whole memory); "
        "unset: 0.01 from random weights (base weights none), the paper's 0.001 from imagenet or a state dict.",
    )
    finetune_lr: float | None = Field(
        None, gt=0, description="SGD learning rate of the short fine-tune with replay; unset: WARMTUNE_LR's rate."
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    weight_decay: float = Field(0.0005, ge=0, description="L2 weight decay.")
    batch_size: int = Field(64, ge=1, description="Minibatch size of the fine-tune.")
    replay_lambda: float = Field(0.75, ge=0, le=1, description="Probability of drawing a sample from old data D_{t-1} (λ).")
    iterations: str = Field(
        "update-size",
        description="SGD iterations per update: update-size (|U_t|), epochs:<fraction> of D_t, or a number.",
    )
    finetune_batchnorm: Literal["train", "frozen"] = Field(
        "train",
        description="BatchNorm in the short fine-tune: train (running statistics follow each batch, torch's train mode) or "
        "frozen (the statistics of the version it starts from are kept; its scale and shift still train). The first "
        "version and a consolidation always train them. No effect on networks without BatchNorm (AlexNet).",
    )
    bootstrap_max_epochs: int = Field(100, ge=1, description="Most epochs the first version trains for.")
    bootstrap_patience: int = Field(10, ge=1, description="The first version stops after this many epochs without a lower holdout loss.")
    consolidate_growth: float = Field(
        1.5,
        ge=0,
        description="A step retrains on the whole replay memory (the first version's schedule, warm-started) once the "
        "lineage's training samples have grown by this factor since the last such training; 0: never (the paper's "
        "short fine-tune only).",
    )
    consolidate_weak_recall: float = Field(
        0.3,
        ge=0,
        le=1,
        description="A step also retrains on the whole memory when the current version calls fewer than this share of "
        "some old class's holdout samples (3 or more) by their label, once that class's samples have grown by 10 % "
        "since the last such training; 0: off. Needs WARMTUNE_CONSOLIDATE_GROWTH above 0.",
    )
    holdout_fraction: float = Field(0.1, ge=0, lt=1, description="Fraction of each update set kept for the gate.")
    gate_max_old_drop: float = Field(
        0.05, ge=0, description="Largest drop of holdout accuracy on old data a candidate may show (0.05 = 5 points)."
    )
    gate_drop_alpha: float = Field(
        0.05,
        ge=0,
        lt=1,
        description="The old-data drop must also be significant: an exact one-sided sign test on the holdout samples "
        "lost and won, at this level (0: margin only).",
    )
    gate_holdout_per_class: int = Field(
        50,
        ge=1,
        description="The gate reads at most this many old holdout samples per class (a stratified draw that a new "
        "set changes only by its own samples), and the label check about as many recent answers per class from the "
        "lineage's record, so a step's cost does not grow with all data ever accepted.",
    )
    gate_label_alpha: float = Field(
        0.01,
        ge=0,
        lt=1,
        description="Refuse a set whose labels of a known class agree with the current model less often than its "
        "recall of the class explains, at this significance; 0: no agreement test.",
    )
    gate_relabel_share: float = Field(
        0.4,
        ge=0,
        lt=1,
        description="Refuse a set labelled as a known class (5 or more of its images, 20 or more stored) when at most this "
        "share of them lie nearest the mean of that class's stored images in the current model's features, and more lie "
        "nearest another class's; 0: no nearest-mean test.",
    )
    gate_relabel_factor: float = Field(
        0.0,
        ge=0,
        description="Refuse a set labelled as a known class when the current model's answers for its images are this "
        "many times likelier for images of another known class (a Bayes factor); 0: no such test (the nearest-mean test "
        "replaced it as the default; 10 was its setting).",
    )
    retry_auto_max: int = Field(
        2, ge=0, description="Times a rejected set is reconsidered by itself after more data of its classes is applied."
    )
    gate_corroborate: int = Field(
        3,
        ge=0,
        description="When this many sets stand refused by the label checks on the same label (this step's included), "
        "they are applied together without those checks: annotators who keep giving a label to images the model "
        "places elsewhere are read as teaching it, not as slipping. The check after training still judges them. "
        "0: off.",
    )
    seed: int | None = Field(None, description="Seed for sampling and head init; unset means random.")
    log_every: int = Field(50, ge=1, description="Training logs a line every this many iterations.")

    # When a step runs (Continuum's trigger policies, SoCC 2018)
    trigger: Literal["best-effort", "batched"] = Field(
        "best-effort",
        description="best-effort: a step as soon as sets are pending; batched: once enough samples are pending "
        "or the oldest set has waited long enough (fewer, larger steps and snapshots).",
    )
    trigger_samples: int = Field(100, ge=1, description="batched: a step once this many samples are pending.")
    trigger_wait_s: float = Field(300.0, ge=0, description="batched: a step once the oldest pending set has waited this many seconds.")

    # Retention: which versions keep their weights (every version keeps its metadata)
    retain_versions: int = Field(
        10, ge=1, description="The newest versions that keep their weights, besides the current one and pinned ones."
    )
    retain_seconds: float = Field(0.0, ge=0, description="A rollback window: versions younger than this keep their weights too (0: none).")

    # Input limits
    max_image_pixels: int = Field(
        16_000_000, ge=1, description="Largest width*height of one image (a 12-megapixel phone photo fits; decompression bombs do not)."
    )
    max_request_pixels: int = Field(
        256_000_000, ge=1, description="Most pixels all images of one request may hold together, read from their headers."
    )
    max_label_length: int = Field(100, ge=1, description="Longest class label in characters.")
    max_images_per_request: int = Field(256, ge=1, description="Most images in one /predict or /updates request.")
    max_request_bytes: int = Field(64 * 1024 * 1024, ge=1, description="Largest request body in bytes.")
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="A request's line and headers must arrive within this many seconds of the connection opening or of "
        "the previous response (slow clients get 408 and are disconnected).",
    )
    body_timeout_s: float = Field(
        60.0, gt=0, description="A request body must arrive within this many seconds of the request (slow clients get 408)."
    )
    max_connections: int = Field(
        1000, ge=1, description="Open connections and requests one server takes; beyond it answers 503 (uvicorn's limit)."
    )

    # Serving
    max_batch_size: int = Field(32, ge=1, description="Most images in one forward pass of /predict.")
    max_batch_wait_ms: float = Field(0.0, ge=0, description="Extra wait for a batch to fill; 0 takes what is queued (no added latency).")
    decode_threads: int = Field(
        4, ge=1, description="Images decoded at once: threads for /predict, and as many again for validating /updates."
    )
    max_top_k: int = Field(100, ge=1, description="Largest top_k a client may ask for.")
    gil_switch_interval_ms: float = Field(
        0.2,
        gt=0,
        description="How long the event loop may hold the GIL while the forward thread waits for it (the "
        "interpreter's switch interval; Python's default is 5 ms). Set by `warmtune serve` for its process.",
    )

    # Auth
    api_keys: dict[str, list[Role]] = Field(
        default_factory=dict,
        description='Bearer keys and their roles, JSON: {"key": ["predict", "annotate", "admin"]}. Empty: loopback only.',
    )

    # Label Studio as the annotation front end (app.labelstudio)
    labelstudio_url: str | None = Field(
        None,
        description="Base URL of the Label Studio that uses warmtune as its ML backend; task images are fetched from "
        "there only. Unset: the /labelstudio routes answer 503.",
    )
    labelstudio_token: SecretStr | None = Field(
        None, description="Label Studio API token that task images are fetched with (sent as 'Authorization: Token ...')."
    )
    labelstudio_timeout_s: float = Field(
        30.0, gt=0, description="Longest wait for Label Studio when fetching a task image or the project's annotations."
    )
    labelstudio_retry_s: float = Field(
        30.0, gt=0, description="How often annotations whose image Label Studio could not give are tried again."
    )

    # Distributed mode
    redis_url: str | None = Field(None, description="Set to run updates on RQ workers through this Redis.")
    queue_name: str = Field("warmtune", description="RQ queue and Redis key prefix.")
    lock_lease_s: float = Field(30.0, gt=0, description="Lineage lock lease; it expires this long after its holder dies.")
    job_timeout_s: int = Field(3600, ge=1, description="RQ job timeout in seconds.")
    poll_interval_s: float = Field(2.0, gt=0, description="How often each API replica checks the snapshot pointer.")

    def learning_rate(self, base_weights: str, short_fine_tune: bool = False) -> float:
        """The rate of a lineage that started from these base weights: of its short fine-tunes, or
        of its trainings on the whole memory (the first version's)."""
        if short_fine_tune and self.finetune_lr is not None:
            return self.finetune_lr
        if self.lr is not None:
            return self.lr
        # Random weights need a far larger rate than the paper's fine-tuning rate to move at all.
        return 0.01 if base_weights == "none" else 0.001

    @field_validator("iterations")
    @classmethod
    def _check_iterations(cls, value: str) -> str:
        if not ITERATIONS_PATTERN.match(value):
            raise ValueError("iterations must be 'update-size', 'epochs:<fraction>' or a whole number")
        return value

    @field_validator("consolidate_growth")
    @classmethod
    def _check_growth(cls, value: float) -> float:
        if 0 < value <= 1:
            raise ValueError("consolidate_growth must be 0 (never) or above 1")
        return value

    @field_validator("home")
    @classmethod
    def _absolute_home(cls, value: Path) -> Path:
        return value.expanduser().absolute()


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read from the environment once."""
    return Settings()

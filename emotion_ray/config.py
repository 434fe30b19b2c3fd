"""Typed configuration for every stage, validated before any cluster work starts.

Each stage has one config model. Values come from (lowest to highest precedence) the
defaults here, an optional YAML file (`--config`), and command-line overrides. Unknown
keys are errors, so a typo never silently falls back to a default. Defaults run on a laptop.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from emotion_ray.errors import ConfigError  # noqa: F401 - re-exported: callers catch it from here

CPU_SCORE_BATCH, GPU_SCORE_BATCH = 64, 256


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def default_tracking_uri() -> str:
    """MLflow's own MLFLOW_TRACKING_URI when set (a flag or config key still wins), else
    sqlite:///<cwd>/mlflow.db: MLflow 3 rejects the old ./mlruns file store, and an absolute
    path also survives Tune changing the working directory of each trial."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return "sqlite:///" + str(Path(os.environ.get("EMOTION_RAY_HOME", Path.cwd())).resolve() / "mlflow.db")


class StorageConfig(StrictModel):
    """Where `s3://` paths live. Credentials come from the usual AWS chain, never from here."""

    s3_endpoint_url: str | None = Field(
        default_factory=lambda: os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
        description="S3-compatible endpoint (MinIO, moto, ...); unset means AWS itself.",
    )


class DecodeLimits(StrictModel):
    """What a file may be before decoding refuses it: the one definition prepare and score share."""

    max_pixels: int = Field(50_000_000, gt=0, description="Images with more pixels are rejected "
                            "(~7000x7000; more is a decompression-bomb risk, not a face photo).")
    max_file_bytes: int = Field(50 * 1024 * 1024, gt=0, description="Larger files are rejected unread.")

    def decode_limits(self) -> DecodeLimits:
        """Just the limits (what decode tasks need), not the whole stage config."""
        return DecodeLimits(max_pixels=self.max_pixels, max_file_bytes=self.max_file_bytes)


class FaceConfig(StrictModel):
    """Face detection in the one preprocessing path (emotion_ray/faces.py; bench/RESULTS.md, faces)."""

    mode: Literal["none", "largest", "all"] = Field(
        "none", description="none: the whole image (squashed to the model's size); largest: the largest face "
        "of each picture; all: every face (score writes a row per face).")
    detector: Literal["blazeface", "haar", "mtcnn"] = Field(
        "blazeface", description="blazeface (MediaPipe's BlazeFace, Bazarevsky et al. 2019; LiteRT, no "
        "TensorFlow): the fastest, as accurate as mtcnn on photos, but false boxes on smooth or blurred "
        "backgrounds; mtcnn (Zhang et al. 2016): ~6-10x the CPU, TensorFlow in each decode worker, no such false "
        "boxes; haar (Viola-Jones): for models trained on its crops (more misses and false boxes).")
    tiles: Literal["no_face", "always", "never"] = Field(
        "no_face", description="blazeface only: look again at a picture of 400 px or more in overlapping tiles, "
        "for faces under ~1/10 of its side: no_face (when the whole picture showed none), always (also small "
        "faces beside large ones; up to 17x the detection CPU), never.")
    margin: float | None = Field(None, ge=0, le=1, description="Share of the face box's longer side added on "
                                 "every side of the square crop; default: the detector's own margin that frames "
                                 "faces as FER2013 does (blazeface 0.1, haar and mtcnn 0).")
    min_size: int = Field(0, ge=0, description="Faces smaller than this (pixels of the original) are ignored.")
    no_face: Literal["error", "whole_image"] = Field(
        "error", description="A picture with no face: an error row (reason no_face), or the whole image, "
        "flagged by a null face_index.")

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    @property
    def crop_margin(self) -> float:
        """The margin crops use: `margin`, else the detector's FER2013-like one (faces.FER_MARGIN)."""
        from emotion_ray.faces import FER_MARGIN

        return FER_MARGIN[self.detector] if self.margin is None else self.margin


class PrepareConfig(DecodeLimits):
    inputs: list[str] = Field(min_length=1, description="Roots laid out as <root>/<label>/**/<image>.")
    output: str = Field(description="Folder or s3:// prefix for the prepared dataset.")
    classes: list[str] | None = Field(
        None, description="Classes to keep, in label order, matched case-insensitively to the class folders. "
        "Unset: every class folder found, sorted (as Keras' image_dataset_from_directory).")
    image_size: int = Field(256, ge=8, le=2048)
    splits: dict[str, float] = Field(default_factory=lambda: {"train": 0.7, "val": 0.2, "test": 0.1})
    split_by: Literal["hash", "folder"] = Field(
        "hash", description="hash: splits from each file's sha256 and `splits`; folder: each input holds "
        "train/, val/ and test/ folders (as FER2013 and many published sets do), then the class folders; an "
        "input without val/ (Kaggle's FER2013: train/ and test/) gets its validation split from train/ "
        "(val_from_train).")
    # FER2013's own val/ (PublicTest) is 11 % of its train/ + val/; a tenth of train/ is as many faces.
    val_from_train: float = Field(
        0.1, gt=0, lt=1, description="split_by folder, for an input with no val/ folder: the share of its train/ "
        "pictures that becomes the validation split, chosen as hash splits are (by group: copies, near-duplicates "
        "and group keys stay on one side; deterministic). Inputs with a val/ folder keep it.")
    # Bits of 64. The default groups resized, re-encoded and slightly cropped copies while unrelated
    # faces rarely chain into large groups, which 8 or 10 bits did (figures: README, "What pHash
    # catches"). pHash sets exactly 32 of its 64 bits, so distances are even: 6 and 7 group the same pairs.
    near_duplicate_distance: int = Field(
        6, ge=0, le=32, description="Pictures whose perceptual hashes (pHash, 64 bits) differ in at most this "
        "many bits share a group, and so a split. 0: off (exact copies still share one).")
    group_pattern: str | None = Field(
        None, description="Regular expression searched in each file's path within its class folder; its first "
        "capture group is the file's group key (e.g. the person: `^([a-z]+)_\\d+`). Files with one key share a split.")
    group_file: str | None = Field(
        None, description="CSV (local or s3://) with a header row and columns `path` (relative to the input root, "
        "or the full path) and `group`: files with one group share a split.")
    shard_bytes: int = Field(
        128 * 1024**2, ge=1024**2, description="Decoded pixels gathered into one write; each split's Parquet "
        "file gets its share of them (raw pixels barely compress: ~90 MB train, ~25 MB val and ~13 MB test "
        "files at the default splits), so files stay tens of MB at any image size.")
    faces: FaceConfig = Field(default_factory=FaceConfig)
    overwrite: bool = Field(False, description="Replace an existing prepared dataset at `output`.")
    storage: StorageConfig = Field(default_factory=StorageConfig)

    @field_validator("group_pattern")
    @classmethod
    def _pattern_has_a_group(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            compiled = re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression ({exc}): {value!r}") from None
        if compiled.groups < 1:
            raise ValueError(f"needs a capture group, the group key, e.g. ^([a-z]+)_\\d+ ; got {value!r}")
        return value

    @property
    def split_fractions(self) -> dict[str, float]:
        """The fractions a sha256 point is cut by (prepare_tasks.split_of): `splits`, or with split_by
        folder those that carve val from a train/ folder (the test split is always given there)."""
        if self.split_by == "folder":
            return {"train": 1.0 - self.val_from_train, "val": self.val_from_train, "test": 0.0}
        return self.splits

    @property
    def grouping(self) -> bool:
        """Whether splits need the global grouping pass (near-duplicates or user groups)."""
        return self.near_duplicate_distance > 0 or self.group_pattern is not None or self.group_file is not None

    @field_validator("classes")
    @classmethod
    def _classes_unique(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return value
        if len(value) < 2:
            raise ValueError("need at least two classes")
        if len({v.lower() for v in value}) != len(value):
            raise ValueError(f"classes must be unique (case-insensitively), got {value}")
        return value

    @field_validator("splits")
    @classmethod
    def _splits_sum_to_one(cls, value: dict[str, float]) -> dict[str, float]:
        if set(value) != {"train", "val", "test"}:
            raise ValueError(f"splits must name exactly train, val and test, got {sorted(value)}")
        if any(v < 0 for v in value.values()) or abs(sum(value.values()) - 1.0) > 1e-6:
            raise ValueError(f"split fractions must be >= 0 and sum to 1, got {value}")
        if value["train"] <= 0:
            raise ValueError("the train split cannot be empty")
        return value


class AugmentationConfig(StrictModel):
    """Random layers active only while training (Keras skips them at inference)."""

    enabled: bool = False
    flip: bool = True
    rotation: float = Field(0.05, ge=0, le=0.5, description="Fraction of a full turn.")
    zoom: float = Field(0.1, ge=0, lt=1)
    contrast: float = Field(0.1, ge=0, lt=1)
    translation: float = Field(
        0.0, ge=0, lt=1, description="Largest shift, as a fraction of the image side, in each direction. 0: none."
    )
    brightness: float = Field(
        0.0, ge=0, le=1, description="Largest brightness change, as a fraction of the full [0, 1] range. 0: none."
    )


# Architectures built on a tf.keras.applications backbone (model.py), which `backbone_weights` and
# `grey` apply to. MobileNetV2: Sandler et al. 2018; MobileNetV3: Howard et al. 2019; EfficientNet:
# Tan & Le 2019.
BACKBONE_ARCHITECTURES = ("mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0")
# Smallest image side each architecture takes: Keras refuses backbones under 32x32; face_cnn pools
# three times by 2.
MIN_IMAGE_SIZE = {"face_cnn": 16, **{name: 32 for name in BACKBONE_ARCHITECTURES}}


ConvsInStage = Annotated[int, Field(ge=1, le=4)]


class ModelConfig(StrictModel):
    architecture: Literal["seed_cnn", "wide_cnn", "face_cnn", "mobilenet_v2", "mobilenet_v3_small",
                          "efficientnet_b0"] = "seed_cnn"
    dense_units: int = Field(256, ge=8, description="Hidden Dense layer of the head (face_cnn and the backbones "
                             "have none).")
    filter_multiplier: float = Field(1.0, gt=0, le=8)
    convs_per_stage: tuple[ConvsInStage, ConvsInStage, ConvsInStage, ConvsInStage] = Field(
        (1, 1, 1, 1), description="face_cnn: 3x3 convolutions in each of its four stages (48, 24, 12 and 6 px at "
        "48 px input). A second one in the last two stages adds depth where it costs least.")
    dropout: float = Field(0.0, ge=0, lt=1)
    augmentation: AugmentationConfig = Field(default_factory=AugmentationConfig)
    backbone_weights: str | None = Field(
        None,
        description="The backbone's initial weights (mobilenet_v2, mobilenet_v3_small, efficientnet_b0; ignored "
        "by the others): imagenet (Keras' ImageNet file, downloaded once by the driver into Keras' cache), a "
        "local or s3:// HDF5 file written by the backbone's save_weights, or none (unset): random weights.",
    )
    grey: bool = Field(False, description="Backbones: turn pictures into their BT.601 luma (on all three channels) "
                       "before the backbone, so colour photos look like grey training faces (face_cnn always does).")
    init_from: str | None = Field(
        None, description="Start from an earlier model (transfer learning): a run directory, a .keras file with "
        "labels.json beside it (local or s3://) or models:/name/version. Every layer but its classifier is "
        "reused (architecture options above are then ignored); the classifier is rebuilt for this run's "
        "classes, keeping the weights of classes it shares by name (case-insensitive).")
    freeze_epochs: int = Field(0, ge=0, description="With init_from or a pretrained backbone (backbone_weights "
                               "set): train only the new classifier for this many epochs first (the reused "
                               "layers, or the backbone, frozen), then every layer.")
    fine_tune_learning_rate: float | None = Field(
        None, gt=0, lt=1, description="With init_from or a pretrained backbone: the learning rate while the reused "
        "layers train. Unset: a tenth of learning_rate (large steps would undo what they learned).")
    test_time_flip: bool = Field(
        False, description="Test-time augmentation: every prediction (test evaluation, score, predict, the MLflow "
        "model) averages the probabilities of the image and its mirror image, for twice the inference compute. "
        "Recorded in labels.json; for models trained with flip augmentation.")
    test_time_shift: float = Field(
        0.0, ge=0, le=0.25, description="Test-time augmentation: every prediction also averages the image moved by "
        "this fraction of its side up, down, left and right (at least 1 px; edge pixels repeated), each mirrored "
        "too with test_time_flip: 5 views, or 10 with the flip, for as many times the inference compute. "
        "Recorded in labels.json; for models trained with translation augmentation. 0: no shifted views.")

    @field_validator("backbone_weights")
    @classmethod
    def _no_weights_is_none(cls, value: str | None) -> str | None:
        if value is None or value.strip().lower() in ("", "none"):
            return None
        return "imagenet" if value.strip().lower() == "imagenet" else value.strip()

    @property
    def pretrained_backbone(self) -> bool:
        """Whether the run starts from backbone weights (the backbone is then the reused part)."""
        return not self.init_from and self.architecture in BACKBONE_ARCHITECTURES and self.backbone_weights is not None

    def image_size_problem(self, image_size: int) -> str | None:
        """Why this architecture cannot take `image_size` px images, or None (init_from: the earlier model's
        size is checked against the dataset instead)."""
        least = MIN_IMAGE_SIZE.get(self.architecture, 0)
        if self.init_from or image_size >= least:
            return None
        return f"model.architecture {self.architecture} needs image_size >= {least}, got {image_size}"


class MlflowConfig(StrictModel):
    enabled: bool = True
    tracking_uri: str = Field(default_factory=default_tracking_uri)
    experiment: str = "emotion_ray"
    registered_model_name: str | None = "emotion_cnn"


class TrainConfig(StrictModel):
    data: str = Field(description="A prepared dataset (has manifest.json) or an image folder to prepare on the fly.")
    output: str = Field("runs", description="Folder or s3:// prefix that holds run directories.")
    run_name: str | None = Field(None, description="Defaults to a timestamped name.")
    resume: bool = Field(False, description="Continue run `run_name` from its latest checkpoint.")
    workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float | None = Field(
        None,
        gt=0,
        description="CPUs reserved per worker. Unset: 1, or less on a small CPU-only cluster so that one "
        "CPU stays free for Ray Data's read tasks (otherwise training waits forever for its data).",
    )
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1, description="Global batch: split evenly over the workers.")
    learning_rate: float = Field(1e-3, gt=0, lt=1, description="Peak learning rate (the constant one, or after warmup).")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant",
        description="cosine: linear warmup over warmup_epochs to learning_rate, then cosine decay to 0 at the "
        "last of `epochs` (needs the total number of steps: epochs x steps per epoch).",
    )
    warmup_epochs: float = Field(0.0, ge=0, description="With lr_schedule=cosine: epochs of linear warmup from 0.")
    weight_decay: float = Field(
        0.0, ge=0, lt=1, description="0: Adam. Above 0: AdamW with this decoupled weight decay (scaled by the learning rate)."
    )
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Of the categorical cross-entropy training loss.")
    class_weight: Literal["none", "balanced"] = Field(
        "none",
        description="balanced: each class's loss weighted by n / (k x its count) in train (scikit-learn's "
        "definition), so every class weighs the same in total.",
    )
    early_stopping_patience: int = Field(3, ge=1, description="Epochs without a lower val_loss before a run stops.")
    # Measured (README, train): the seed CNN on 192 demo faces sat at chance for 4-15 epochs before its
    # val_loss fell; patience alone stopped such runs with their chance-level first epochs kept.
    early_stopping_chance_margin: float | None = Field(
        0.05, ge=0, lt=1, description="Early stopping ends a run only once it has learned: its best val_loss at "
        "least this fraction below chance level (metrics.chance_loss: the val loss of answering every picture "
        "with the training split's class shares; ln 3 = 1.099 for three balanced classes). Until then the run "
        "goes on, up to `epochs`. null: early stopping from the first epoch, whatever the loss.")
    max_failures: int = Field(2, ge=0, description="Worker failures survived by resuming from the last checkpoint.")
    input_stall_timeout_s: float = Field(
        300.0,
        gt=0,
        description="Seconds a Train worker waits for the next batch of its input (Ray Data) before the run fails "
        "with an InputStallError naming the CPU reservations it waited on (retried like a worker failure, "
        "max_failures). The clock runs only while the worker waits and restarts with every batch, so a slow "
        "pipeline never trips it, a stuck one does (e.g. reads waiting for CPUs that placement groups hold).",
    )
    data_read_cpus: float = Field(
        0.0,
        ge=0,
        description="CPUs each Ray Data read task of the input reserves (Ray Data's own default is 1). 0: reads "
        "never wait for CPUs held by placement groups (a trial's, its workers', an earlier trial's); they share "
        "the cores with the workers either way.",
    )
    image_size: int | None = Field(None, ge=8, le=2048, description="Only when preparing on the fly.")
    seed: int = 0
    cache_in_memory: bool | None = Field(
        None,
        description="Keep each worker's shard in memory after the first epoch (later epochs skip Ray Data's "
        "per-epoch start-up). Unset: on when a worker's share of train+val is under 2 GiB.",
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.batch_size % self.workers:
            raise ValueError(
                f"batch_size {self.batch_size} is the global batch and must divide evenly over {self.workers} workers"
            )
        if self.resume and not self.run_name:
            raise ValueError("resume needs run_name: the run to continue")
        problem = self.image_size and self.model.image_size_problem(self.image_size)
        if problem:
            raise ValueError(problem)
        if self.warmup_epochs and self.lr_schedule != "cosine":
            raise ValueError("warmup_epochs needs lr_schedule: cosine")
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs {self.warmup_epochs} must be below epochs {self.epochs}")
        return self


class CrossValidationConfig(TrainConfig):
    """`emotion-ray evaluate`: group k-fold cross-validation of one train config (crossval.py).

    Every TrainConfig key means what it means to `train` (a `best_train_config.yaml` from tune is
    accepted as it is), except: `data` must be a prepared dataset, `output` is the cross-validation's
    own folder, `run_name` names its MLflow parent run (default cv_<output's name>), and `workers`,
    `use_gpu`, `cpus_per_worker` are each fold's."""

    output: str = Field(description="Folder (or s3:// prefix) of this cross-validation: cv.json, the folds' "
                        "datasets and results, their training runs.")
    folds: int = Field(5, ge=2, description="K: trainings, each holding out one fold of whole groups.")
    pool: Literal["all", "train_val"] = Field(
        "all", description="The rows dealt into folds: all: every labelled row (train, val and test splits); "
        "train_val: the train and val splits, leaving the test split untouched (for a last check after "
        "choosing between configs with cross-validation).")
    inner_parts: int = Field(
        5, ge=2, description="Each fold's training groups are dealt (as the folds are) into this many parts; "
        "one part is its validation split (early stopping, temperature): 5 -> a fifth.")
    max_concurrent_trials: int | None = Field(None, ge=1, description="Folds trained at once. Unset: as many as "
                                              "the cluster fits (as tune decides).")
    overwrite: bool = Field(False, description="Replace an earlier cross-validation in `output`.")

    @model_validator(mode="after")
    def _fresh_start(self) -> CrossValidationConfig:
        if self.resume:
            raise ValueError("resume: a cross-validation starts over; pass overwrite to replace an earlier one")
        return self

    def fold_train_config(self, fold: int, dataset_uri: str, output: str) -> TrainConfig:
        """The TrainConfig of fold `fold`: this config on the fold's dataset, its run `fold_<k>`."""
        data = self.model_dump(exclude={"folds", "pool", "inner_parts", "max_concurrent_trials", "overwrite"})
        data.update(data=dataset_uri, output=output, run_name=f"fold_{fold}", resume=False)
        return TrainConfig.model_validate(data)


class InferenceConfig(DecodeLimits):
    """What `score` and `predict` share: the model, its batches and where it comes from."""

    model: str = Field(description="Run directory, .keras file (local or s3://) or models:/name/version.")
    batch_size: int | None = Field(
        None, ge=1, description=f"Images per model call. Unset: {CPU_SCORE_BATCH} on CPU, {GPU_SCORE_BATCH} with use_gpu."
    )
    faces: FaceConfig | None = Field(
        None, description="Unset: as the model was trained (its labels.json), else whole images.")
    min_confidence: float | None = Field(
        None, ge=0, le=1, description="Abstention: rows whose top (calibrated) probability is below this are "
        "labelled `uncertain`, their probabilities still written, and counted. Unset: off. metrics.json's "
        "calibration.suggested_min_confidence is one chosen on the validation split.")
    mlflow_tracking_uri: str = Field(default_factory=default_tracking_uri)
    storage: StorageConfig = Field(default_factory=StorageConfig)


class PredictConfig(InferenceConfig):
    inputs: list[str] = Field(min_length=1, description="Image files (local, s3:// or archive members).")
    annotate: str | None = Field(
        None, description="Folder (or s3:// prefix) for each picture with its faces boxed and labelled, named "
        "after its path relative to the inputs' common folder (annotate.py). Unset: nothing is written.")
    overwrite: bool = Field(False, description="With annotate: replace the pictures an earlier predict wrote "
                            "there (only those its marker lists).")

    @model_validator(mode="after")
    def _default_batch(self) -> PredictConfig:
        if self.batch_size is None:
            self.batch_size = CPU_SCORE_BATCH  # the same padded batch as score on CPU: the same outputs
        if self.overwrite and not self.annotate:
            raise ValueError("overwrite: only with annotate (the one folder predict writes)")
        return self


class ScoreConfig(InferenceConfig):
    inputs: list[str] = Field(min_length=1, description="Folders, s3:// prefixes, .zip/.tar archives, or .txt files listing paths.")
    output: str = Field(description="Folder or s3:// prefix for the Parquet predictions.")
    use_gpu: bool = False
    num_predictors: int | None = Field(
        None,
        ge=1,
        description="Predictor actors, one model copy each. Unset: 1 on CPU (TensorFlow spreads one model "
        "over every core of its node); with use_gpu, one per GPU free at the start, and more while work "
        "queues as GPUs appear (an autoscaler adding nodes).",
    )
    gpus_per_predictor: float = Field(
        1.0, gt=0, description="With use_gpu: a fraction (0.5) puts several predictors on one GPU."
    )
    cpus_per_predictor: float = Field(1.0, ge=0)
    gpu_wait_seconds: float = Field(
        900,
        gt=0,
        description="With use_gpu: how long the initial predictors may take to start (an autoscaler adding "
        "GPU nodes included) before the job fails with a clear error instead of waiting forever for GPUs.",
    )
    rows_per_file: int = Field(
        1_000_000, ge=1, description="Rows per output Parquet file: a million rows is about 25 MB (more with long, "
        "varied paths), a size data lakes like (10,000 rows made 0.26 MB files). Smaller part files written on "
        "the way are merged at the end.")
    flush_seconds: float = Field(
        600, gt=0, description="Rows wait in memory at most this long before they go to a part file: the most "
        "scoring an interruption can lose (a re-run scores the rest).")
    overwrite: bool = Field(False, description="Delete the predictions already in `output` and score everything "
                            "again (the way to score into an output that another model wrote).")
    retry_errors: bool = Field(True, description="A re-run scores again the files that failed for a reason that "
                               "may pass (unreadable: missing, permissions, credentials, network).")
    max_inflight_bytes: int = Field(
        1024**3,
        ge=64 * 1024**2,
        description="Object-store bytes the pipeline may hold at once (decoded images waiting for a "
        "predictor): keeps memory flat however many files there are.",
    )

    @model_validator(mode="after")
    def _device_defaults(self) -> ScoreConfig:
        # Bigger batches keep a GPU busy between round trips to the host; on a CPU, 64 already
        # fills the cores (128 and 256 cost the same per image). Assigning re-runs this
        # validator once, which then finds the fields set.
        if self.batch_size is None:
            self.batch_size = GPU_SCORE_BATCH if self.use_gpu else CPU_SCORE_BATCH
        if self.num_predictors is None and not self.use_gpu:
            self.num_predictors = 1
        return self


def set_dotted(target: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for key in keys[:-1]:
        node = target.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {dotted}: {key} is not a section")
        target = node
    target[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value), the value read as YAML (so 3, true, [a, b] work)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value")
    key, raw = text.split("=", 1)
    if not raw.strip():
        raise ConfigError(f"override {text!r} has no value (to use the default, leave the key out)")
    return key.strip(), yaml.safe_load(raw)


def read_yaml(path: str | Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return loaded


def format_validation_error(model: type[BaseModel], exc: ValidationError) -> str:
    lines = [f"invalid {model.__name__}:"]
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = "unknown key (check the spelling)" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"  {where}: {msg}")
    return "\n".join(lines)


def build_config(model: type[BaseModel], base: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None):
    """Merge `base` (e.g. YAML) with dotted `overrides` and validate, or raise ConfigError."""
    data: dict[str, Any] = dict(base or {})
    for dotted, value in (overrides or {}).items():
        if value is not None:
            set_dotted(data, dotted, value)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(model, exc)) from None


def load_config(model: type[BaseModel], yaml_path: str | None = None, overrides: dict[str, Any] | None = None):
    return build_config(model, read_yaml(yaml_path) if yaml_path else {}, overrides)


# ----------------------------------------------------------------------------- tune
DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice", "grid")


class Distribution(StrictModel):
    """Exactly one of: loguniform [lo, hi], uniform [lo, hi], randint [lo, hi), choice [...], grid [...]."""

    loguniform: list[float] | None = None
    uniform: list[float] | None = None
    randint: list[int] | None = None
    choice: list[Any] | None = None
    grid: list[Any] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Distribution:
        given = [k for k in DISTRIBUTIONS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(DISTRIBUTIONS)}; got {given or 'none'}")
        kind = given[0]
        values = getattr(self, kind)
        if kind in ("loguniform", "uniform", "randint"):
            if len(values) != 2 or not values[0] < values[1]:
                raise ValueError(f"{kind} needs [low, high] with low < high, got {values}")
            if kind == "loguniform" and values[0] <= 0:
                raise ValueError(f"loguniform needs low > 0, got {values}")
        elif not values:
            raise ValueError(f"{kind} needs at least one value")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in DISTRIBUTIONS if getattr(self, k) is not None)

    def examples(self) -> list[Any]:
        """Values used to validate the space against TrainConfig before any trial starts."""
        values = getattr(self, self.kind)
        if self.kind == "randint":
            return [values[0], values[1] - 1]
        return list(values)


class SearchConfig(StrictModel):
    algorithm: Literal["random", "grid", "optuna"] = "random"
    seed: int = 0


class SchedulerConfig(StrictModel):
    type: Literal["asha", "none"] = "asha"
    grace_period: int = Field(1, ge=1, description="Epochs every trial gets before ASHA may stop it.")
    reduction_factor: float = Field(2, gt=1)


class TrialResources(StrictModel):
    workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float | None = Field(None, gt=0)


class TuneConfig(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Experiment name; re-use it to resume.")
    data: str
    output: str = "tune_runs"
    metric: str = "val_loss"
    mode: Literal["min", "max"] = "min"
    num_samples: int = Field(4, ge=1, description="Trials to sample (per grid point when grids are used).")
    max_concurrent_trials: int | None = Field(None, ge=1, description="Unset: as many as the cluster fits.")
    time_budget_s: float | None = Field(None, gt=0, description="Stop starting/continuing trials after this.")
    search: SearchConfig = Field(default_factory=SearchConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    trial: TrialResources = Field(default_factory=TrialResources)
    base: dict[str, Any] = Field(default_factory=dict, description="Train config keys shared by all trials.")
    space: dict[str, Distribution] = Field(min_length=1)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)

    @field_validator("base")
    @classmethod
    def _base_has_no_owned_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        owned = {"data", "output", "run_name", "resume", "workers", "use_gpu", "cpus_per_worker", "mlflow", "storage"}
        clash = sorted(owned & set(value))
        if clash:
            raise ValueError(f"set {clash} at the top level or under trial:, not under base:")
        return value

    @model_validator(mode="after")
    def _space_fits_train_config(self) -> TuneConfig:
        if self.search.algorithm == "optuna" and any(d.kind == "grid" for d in self.space.values()):
            raise ValueError("grid values need search.algorithm random or grid; Optuna samples, it does not grid")
        if self.search.algorithm == "grid" and any(d.kind not in ("grid", "choice") for d in self.space.values()):
            raise ValueError("search.algorithm grid takes only grid/choice values")
        # Every key and every example value must make a valid TrainConfig, now, not at 3 a.m.
        for key, dist in self.space.items():
            for value in dist.examples():
                self.train_config({key: value})
        return self

    def train_config(self, sampled: dict[str, Any], run_name: str | None = None) -> TrainConfig:
        from emotion_ray import storage

        data: dict[str, Any] = {}
        for key, value in self.base.items():
            set_dotted(data, key, copy.deepcopy(value))  # a section of base (model: {...}) is never written to
        for key, value in sampled.items():
            set_dotted(data, key, value)
        data.update(
            data=self.data,
            output=storage.join(self.experiment_dir, "train_runs"),
            run_name=run_name,
            workers=self.trial.workers,
            use_gpu=self.trial.use_gpu,
            cpus_per_worker=self.trial.cpus_per_worker,
            mlflow=self.mlflow.model_dump(),
            storage=self.storage.model_dump(),
        )
        return build_config(TrainConfig, data)

    @property
    def experiment_dir(self) -> str:
        from emotion_ray import storage

        out = self.output if storage.is_s3(self.output) else os.path.abspath(self.output)
        return storage.join(out, self.name)

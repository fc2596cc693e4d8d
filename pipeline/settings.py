"""A run's settings (``RunSettings``): what the CLI's options of ``run`` become, validated."""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass

from freecustom_core.schedulers import spec_identity
from freecustom_core.topology import SDXL_KEY_PREFIX, has_sdxl_keys
from stages.inputs.control import CANNY_HIGH, CANNY_LOW, ControlSettings
from stages.inputs.http import HTTP_TIMEOUT_S, MAX_DOWNLOAD_BYTES
from stages.inputs.read import InputSettings
from stages.inputs.subject import SubjectSettings
from stages.masks.segment import SegmentConfig
from stages.output.locations import open_location
from stages.params import GenParams, Limits
from stages.reference.family import ModelFamily, model_family
from stages.scoring.score import SCORE_NAMES, SIGNAL_NAMES, threshold_name
from stages.scoring.score_models import ScoreModels

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
IMAGE_FORMATS = ("png", "jpg", "webp")
DTYPES = ("auto", "float16", "bfloat16", "float32")  # "auto": float16 on CUDA, float32 on the CPU
REFERENCE_ACTORS = ("auto", "always", "never")
DEVICES = ("auto", "cuda", "cpu")


@dataclass(frozen=True)
class RunSettings:
    manifest: str
    out: str
    model: str = DEFAULT_MODEL
    model_config: str | None = None  # a single-file --model's local diffusers config folder (--model-config)
    model_revision: str | None = None  # a hub id's commit (pipeline.preflight resolves it); None: a local path
    defaults: GenParams = GenParams()
    limits: Limits = Limits()
    root: str | None = None
    allow_roots: tuple[str, ...] = ()
    max_pixels: int = 64_000_000
    http_timeout: float = HTTP_TIMEOUT_S  # seconds per http(s) image read (connect to last byte)
    max_download_bytes: int = MAX_DOWNLOAD_BYTES
    kv_cache: str | None = None
    samples_per_shard: int = 256
    image_format: str = "png"
    address: str | None = None
    gpus_per_worker: float = 1.0
    cpus_per_worker: float = 1.0
    max_workers: int | None = None
    batch_size: int | None = None
    overwrite: bool = False
    dtype: str = "auto"
    scheduler: str | None = None
    channels_last: bool = False
    compile: bool = False
    mask_policy: str = "fail"
    sam_checkpoint: str | None = None
    sam_model_type: str = "vit_b"
    detector: str | None = None
    # who computes reference K/V: "auto" = the generation actor itself when the run has one (one model
    # load), a reference actor pool before generation when it has several; "always" / "never" force
    # either way (both give the same K/V files and images; tests cover both)
    reference_actors: str = "auto"
    reuse: tuple[str, ...] = ()  # previous output folders whose samples with the same record are copied
    device: str = "auto"  # auto | cuda | cpu: see pipeline.plan.resolve_device
    gpu_wait: float = 3600.0  # seconds --device cuda waits for a GPU before it gives up (exit 2)
    faults: dict | None = None  # test-only fault injection (stages/faults.py); never set in production
    # quality (--score): the scorers' models, None = no scoring; --min-score NAME=VALUE pairs (they imply
    # scoring): a sample below one goes to rejected/ instead of shards/
    score_models: ScoreModels | None = None
    min_score: tuple[tuple[str, float], ...] = ()
    # BLIP-Diffusion (a --model whose family is "blip"): the subject of rows without a blip_subject column
    # (its image, a path or URI, and category; the word the prompt names it by, default the category).
    # blip_subject_references: the release's references, whose prompts get the subject too (K/V per
    # (concept set, subject)); False: the references keep their own prompts (K/V per concept set)
    blip_subject: str | None = None
    blip_category: str | None = None
    blip_target_category: str | None = None
    blip_subject_references: bool = True
    # --save-attention: per sample a <key>.attn.png member with the concepts' attention maps
    save_attention: bool = False
    # training-ready samples (stages.generation.embed, stages.generation.annotate): --embed-references puts each reference and mask, as
    # the engine took them, into the sample; --annotate adds where each concept landed (box, mask, confidence,
    # presence, overlap) from the attention maps, refined with --sam-checkpoint / --detector when given
    embed_references: bool = False
    annotate: bool = False
    # ControlNet (--controlnet, repeatable): every row then gives a control image per ControlNet; canny maps
    # use these thresholds; control_references: the release's references through ControlNet (K/V per
    # (concept set, control image)); a row's control_references column wins
    controlnet: tuple[str, ...] = ()
    canny_low: float = CANNY_LOW
    canny_high: float = CANNY_HIGH
    control_references: bool = False
    # manifest columns declared pass-through (--passthrough): never taken for a misspelled known column
    passthrough: tuple[str, ...] = ()

    def __post_init__(self):
        if self.scheduler is None:
            # spelled out, so the output identity names the sampler: an output folder written under another
            # default is refused, never mixed (BLIP-Diffusion: the checkpoint's own, as the release samples)
            object.__setattr__(self, "scheduler", self.family.default_scheduler)
        if os.path.isfile(self.model) and not self.model.lower().endswith(".safetensors"):
            raise ValueError(f"--model {self.model}: a single-file checkpoint must be .safetensors (pickled "
                             ".ckpt/.bin files can run code when loaded)")
        if os.path.isfile(self.model) and not self.model_config and has_sdxl_keys(self.model):
            raise ValueError(f"--model {self.model}: an SDXL checkpoint ({SDXL_KEY_PREFIX}* keys) needs --model-config, "
                             "a local SDXL diffusers config folder (only SD1.5's configs ship with the package)")
        if self.model_config and not os.path.isfile(self.model):
            raise ValueError(f"--model-config is for a single-file --model; {self.model} is a folder or hub id")
        if self.model_config and not os.path.isfile(os.path.join(self.model_config, "model_index.json")):
            raise ValueError(f"--model-config {self.model_config}: not a diffusers config folder (no model_index.json)")
        if self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard={self.samples_per_shard}: must be >= 1")
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format={self.image_format!r}: expected png, jpg or webp")
        if self.gpus_per_worker < 0:
            raise ValueError(f"gpus_per_worker={self.gpus_per_worker}: must be >= 0")
        if self.reference_actors not in REFERENCE_ACTORS:
            raise ValueError(f"reference_actors={self.reference_actors!r}: expected auto, always or never")
        open_location(self.out, option="-o/--out")  # a URI pyarrow cannot open is refused before anything starts
        if self.kv_cache:
            open_location(self.kv_cache, option="--kv-cache")
        for previous in self.reuse:
            open_location(previous, option="--reuse", writable=False)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: expected one of {', '.join(DTYPES)}")
        if self.device not in DEVICES:
            raise ValueError(f"device={self.device!r}: expected auto, cuda or cpu")
        if self.gpu_wait < 0:
            raise ValueError(f"gpu_wait={self.gpu_wait}: must be >= 0 seconds")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size}: must be >= 1")
        if (self.blip_subject is None) != (self.blip_category is None):
            raise ValueError("--blip-subject and --blip-category go together: the subject image and its category")
        if self.blip_category is not None and not self.blip_category.strip():
            raise ValueError("--blip-category: must name the subject's category (e.g. 'dog')")
        if self.blip_target_category is not None and self.blip_subject is None:
            raise ValueError("--blip-target-category: needs --blip-subject and --blip-category")
        names = [name for name, _ in self.min_score]
        for name, value in self.min_score:
            if threshold_name(name) not in SCORE_NAMES + SIGNAL_NAMES:
                raise ValueError(f"--min-score {name}={value}: unknown score {name!r}; one of "
                                 f"{', '.join(SCORE_NAMES + SIGNAL_NAMES)}")
            if threshold_name(name) in SIGNAL_NAMES and not self.annotate:
                raise ValueError(f"--min-score {name}{'' if name.endswith('<') else '='}{value}: "
                                 f"{threshold_name(name)} comes from --annotate; add it")
            if names.count(name) > 1:
                raise ValueError(f"--min-score {name}: given {names.count(name)} times; give each score once")
        if not 0 <= self.canny_low <= self.canny_high < float("inf"):
            raise ValueError(f"--canny-low {self.canny_low}, --canny-high {self.canny_high}: need 0 <= low <= high")
        if not self.controlnet and (self.control_references or (self.canny_low, self.canny_high) != (CANNY_LOW, CANNY_HIGH)):
            raise ValueError("--control-references, --canny-low and --canny-high need --controlnet ID_OR_FOLDER")
        if any(threshold_name(n) in SCORE_NAMES for n, _ in self.min_score) and self.score_models is None:
            object.__setattr__(self, "score_models", ScoreModels())

    @functools.cached_property
    def family(self) -> ModelFamily:
        """The model family of ``model`` (``stages.reference.family``): read once, from its config files."""
        return model_family(self.model, self.model_config)

    def check_family(self) -> None:
        """Options that only some model families take, checked against ``family`` (reads the model's config)."""
        refused = self.family.refusals(scheduler=self.scheduler, channels_last=self.channels_last,
                                       compile=self.compile, controlnet=self.controlnet,
                                       control_references=self.control_references,
                                       save_attention=self.save_attention, annotate=self.annotate,
                                       blip_subject=self.blip_subject)
        if refused:
            raise ValueError(f"--model {self.model}: " + "; ".join(refused))

    def blip(self) -> dict | None:
        """The run's BLIP-Diffusion subject as a row's ``blip_subject`` struct (``image``, ``category``,
        ``target_category``), None without."""
        if self.blip_subject is None:
            return None
        return {"image": self.blip_subject, "category": self.blip_category,
                "target_category": self.blip_target_category}

    def subject(self) -> SubjectSettings:
        """The BLIP-Diffusion subject options as row validation reads them."""
        return SubjectSettings(default=self.blip(), references=self.blip_subject_references)

    def thresholds(self) -> dict[str, float]:
        """``--min-score`` as score name -> minimum."""
        return {name: float(value) for name, value in self.min_score}

    def control(self) -> ControlSettings:
        """The ControlNet options as row validation reads them."""
        return ControlSettings(controlnet=tuple(self.controlnet), canny=(self.canny_low, self.canny_high),
                               references=self.control_references)

    def checked_mask_policy(self) -> str | None:
        """The mask policy row validation applies: None where a detector can mask any concept from its
        prompt (--detector with --sam-checkpoint), so only the run can tell."""
        return None if self.detector and self.sam_checkpoint else self.mask_policy

    def inputs(self) -> InputSettings:
        return InputSettings(root=self.root, allow_roots=tuple(self.allow_roots), max_pixels=self.max_pixels,
                             http_timeout=self.http_timeout, max_download_bytes=self.max_download_bytes)

    def output_identity(self) -> dict:
        """Settings that change what is written (not where or how fast); ``_run.json`` holds them."""
        return {
            "model": self.model, **({"model_config": self.model_config} if self.model_config else {}),
            **({"model_revision": self.model_revision} if self.model_revision else {}),
            "dtype": self.dtype, "scheduler": self.scheduler_identity(),
            "defaults": self._defaults_identity(), "samples_per_shard": self.samples_per_shard,
            "image_format": self.image_format, "mask_policy": self.mask_policy, "batch_size": self.batch_size,
            "sam_checkpoint": self.sam_checkpoint, "sam_model_type": self.sam_model_type, "detector": self.detector,
            # only when on: the identity of a run without them stays the same
            **({"channels_last": True} if self.channels_last else {}),
            **({"compile": True} if self.compile else {}),
            **({"blip_subject": self.blip()} if self.blip_subject else {}),
            **({"blip_subject_references": False} if not self.blip_subject_references else {}),
            **({"score": {"models": self.score_models.identity(), "min_score": self.thresholds()}}
               if self.score_models else {}),
            **({"save_attention": True} if self.save_attention else {}),
            **({"embed_references": True} if self.embed_references else {}),
            **({"annotate": True} if self.annotate else {}),
            **({"min_score": self.thresholds()} if self.min_score and not self.score_models else {}),
            **({"controlnet": {"ids": list(self.controlnet), "canny": [self.canny_low, self.canny_high],
                               "control_references": self.control_references}} if self.controlnet else {}),
        }

    def _defaults_identity(self) -> dict:
        """The run's GenParams; ``loras`` only when set, so folders written before it existed still resume."""
        defaults = dataclasses.asdict(self.defaults)
        if not defaults["loras"]:
            del defaults["loras"]
        return defaults

    def scheduler_identity(self) -> str:
        """``--scheduler`` as identities record it (``schedulers.spec_identity``: ``release`` spelled with
        what changed in its meaning). Not per family (FLUX.1 ignores it): that would read the model's
        config, which ``output_identity`` must not need."""
        return spec_identity(self.scheduler)

    def segment_config(self) -> SegmentConfig:
        """How the run makes masks (``stages.masks.segment``)."""
        return SegmentConfig(sam_checkpoint=self.sam_checkpoint, sam_model_type=self.sam_model_type,
                             detector=self.detector, mask_policy=self.mask_policy)

    def uses_segment_models(self) -> bool:
        """SAM or a detector makes masks: their models load where concept groups are resolved."""
        return bool(self.sam_checkpoint or self.detector)

    def model_identity(self) -> str:
        """The model part of a concept-set id: what, besides the concepts and parameters, the K/V depend on."""
        return (f"{self.model}|{self.dtype}|{self.scheduler_identity()}" + ("|channels_last" if self.channels_last else "")
                + (f"|config={self.model_config}" if self.model_config else "")
                + self.family.model_identity(self.defaults))

    def training_kwargs(self, out_location: str) -> dict:
        """``GenerateStage``'s arguments of ``--embed-references`` and ``--annotate`` (none without them)."""
        return {**({"embed_references": out_location} if self.embed_references else {}),
                **({"annotate": True, "annotate_segment": {"sam_checkpoint": self.sam_checkpoint,
                                                           "sam_model_type": self.sam_model_type,
                                                           "detector": self.detector}} if self.annotate else {})}

    def generator_kwargs(self) -> dict:
        """How stages load the model (``stages.reference.models.load_generator``), apart from compiling."""
        return {"dtype": self.dtype, "scheduler": self.scheduler, "channels_last": self.channels_last,
                **({"model_config": self.model_config} if self.model_config else {}),
                **({"controlnet": list(self.controlnet)} if self.controlnet else {})}
